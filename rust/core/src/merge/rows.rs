//! The fused row kernel of the merge: decode a tile of rows, add `s * B @ A` (or its
//! transpose for `conv1d`) in float32 in a fixed operation order, encode.

use crate::adapter::Adapter;
use crate::codec;
use crate::error::Result;
use crate::format::{AdapterModule, ModuleKind};
use crate::safetensors::Dtype;

/// The factors of every module, arranged for row-wise merging (small: `D` floats).
pub(super) fn prepare_factors(adapter: &Adapter) -> Result<Vec<Prepared>> {
    let pairs = adapter.lora_pairs()?;
    let r = adapter.config.rank as usize;
    Ok(adapter
        .config
        .modules
        .iter()
        .zip(&pairs)
        .map(|(m, p)| Prepared::new(m, &p.b, &p.a, r))
        .collect())
}

/// A tile of full rows of one weight: `input` holds them in dtype `src`, the first being
/// row `row0`; `output` receives the merged rows in dtype `dst`.
pub(super) struct Rows<'a> {
    pub(super) input: &'a [u8],
    pub(super) src: Dtype,
    pub(super) output: &'a mut [u8],
    pub(super) dst: Dtype,
    pub(super) row0: usize,
}

/// One update of a weight: a module's factors and the coefficient `c` of `c * B @ A`
/// (the scaling `alpha / r`, times the adapter's weight in a weighted merge).
pub(super) type Term<'a> = (&'a Prepared, f32);

/// Merges a tile of full rows (see [`Rows`]) with every term, in order: each element is
/// decoded, then `w = w + c * acc` for each term (`acc` the term's `sum_k B A` in
/// float32), then encoded. All terms belong to the same weight (same `cols`). The AVX2
/// build is used where the CPU has it; both builds perform the same IEEE operations in
/// the same order (no fused multiply-add), so their results are identical.
pub(super) fn merge_rows(terms: &[Term<'_>], rows: Rows<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { merge_rows_avx2(terms, rows) };
    }
    merge_rows_body(terms, rows);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn merge_rows_avx2(terms: &[Term<'_>], rows: Rows<'_>) {
    merge_rows_body(terms, rows);
}

/// The kernel: chunks of 64 columns that stay in registers / L1.
#[inline(always)]
fn merge_rows_body(terms: &[Term<'_>], rows: Rows<'_>) {
    let Rows {
        input,
        src,
        output,
        dst,
        row0,
    } = rows;
    const CHUNK: usize = 64;
    let Some(cols) = terms.first().map(|t| t.0.cols) else {
        return;
    };
    let (isz, osz) = ((src.bits() / 8) as usize, (dst.bits() / 8) as usize);
    let mut w = [0f32; CHUNK];
    for (i, (in_row, out_row)) in input
        .chunks_exact(cols * isz)
        .zip(output.chunks_exact_mut(cols * osz))
        .enumerate()
    {
        let mut j0 = 0;
        while j0 < cols {
            let n = CHUNK.min(cols - j0);
            codec::decode_unchecked(src, &in_row[j0 * isz..][..n * isz], &mut w[..n]);
            for &(prep, s) in terms {
                let r = prep.r;
                let coef = &prep.coef[(row0 + i) * r..][..r];
                let mut acc = [0f32; CHUNK];
                for (k, &c) in coef.iter().enumerate() {
                    let mk = &prep.m[k * cols + j0..][..n];
                    for (a, &y) in acc[..n].iter_mut().zip(mk) {
                        *a += c * y;
                    }
                }
                for (x, &a) in w[..n].iter_mut().zip(&acc[..n]) {
                    *x += s * a;
                }
            }
            codec::encode_unchecked(dst, &w[..n], &mut out_row[j0 * osz..][..n * osz]);
            j0 += n;
        }
    }
}

/// A module's factors arranged for row-wise merging: output row `t` of the weight is
/// `sum_k coef[t, k] * m[k, :]`.
pub(super) struct Prepared {
    coef: Vec<f32>,
    m: Vec<f32>,
    r: usize,
    pub(super) cols: usize,
}

impl Prepared {
    fn new(module: &AdapterModule, b: &[f32], a: &[f32], r: usize) -> Prepared {
        let (out_f, in_f) = (module.out_features as usize, module.in_features as usize);
        match module.kind {
            // W [out, in]: row i = sum_k B[i, k] * A[k, :].
            ModuleKind::Linear => Prepared {
                coef: b.to_vec(),
                m: a.to_vec(),
                r,
                cols: in_f,
            },
            // W [in, out]: row j = sum_k A[k, j] * B[:, k]^T.
            ModuleKind::Conv1d => {
                let mut coef = vec![0f32; in_f * r];
                for k in 0..r {
                    for j in 0..in_f {
                        coef[j * r + k] = a[k * in_f + j];
                    }
                }
                let mut m = vec![0f32; r * out_f];
                for i in 0..out_f {
                    for k in 0..r {
                        m[k * out_f + i] = b[i * r + k];
                    }
                }
                Prepared {
                    coef,
                    m,
                    r,
                    cols: out_f,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// The run-time selected build (AVX2 here when the CPU has it) and the portable
    /// build give identical bytes, and both equal the plain triple loop.
    #[test]
    fn kernel_builds_agree_with_the_plain_loop() {
        let mut st = 3u64;
        for (kind, fin, fout, r) in [
            (ModuleKind::Linear, 131, 70, 4),
            (ModuleKind::Conv1d, 45, 97, 3),
        ] {
            let module = AdapterModule {
                name: "m".into(),
                in_features: fin,
                out_features: fout,
                kind,
            };
            let (fi, fo) = (fin as usize, fout as usize);
            let b: Vec<f32> = (0..fo * r).map(|_| lcg(&mut st)).collect();
            let a: Vec<f32> = (0..r * fi).map(|_| lcg(&mut st)).collect();
            let prep = Prepared::new(&module, &b, &a, r);
            let [rows, cols] = module.weight_shape().map(|x| x as usize);
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut st)).collect();
            for (src, dst) in [
                (Dtype::F32, Dtype::F32),
                (Dtype::BF16, Dtype::BF16),
                (Dtype::F16, Dtype::F32),
            ] {
                let (isz, osz) = ((src.bits() / 8) as usize, (dst.bits() / 8) as usize);
                let mut input = vec![0u8; rows * cols * isz];
                codec::encode(src, &w, &mut input).unwrap();
                let mut fast = vec![0u8; rows * cols * osz];
                let mut portable = vec![0u8; rows * cols * osz];
                let tile = |output| Rows {
                    input: &input,
                    src,
                    output,
                    dst,
                    row0: 0,
                };
                merge_rows(&[(&prep, 0.75)], tile(&mut fast));
                merge_rows_body(&[(&prep, 0.75)], tile(&mut portable));
                assert_eq!(fast, portable);
                let mut w32 = vec![0f32; rows * cols];
                codec::decode(src, &input, &mut w32).unwrap();
                for i in 0..fo {
                    for j in 0..fi {
                        let mut acc = 0f32;
                        for k in 0..r {
                            acc += b[i * r + k] * a[k * fi + j];
                        }
                        let pos = if kind == ModuleKind::Conv1d {
                            j * fo + i
                        } else {
                            i * fi + j
                        };
                        w32[pos] += 0.75 * acc;
                    }
                }
                let mut want = vec![0u8; rows * cols * osz];
                codec::encode(dst, &w32, &mut want).unwrap();
                assert_eq!(fast, want, "{kind:?} {src} -> {dst}");
            }
        }
    }

    /// Two terms (a weighted merge): each element gets `w + c1 * acc1 + c2 * acc2`, in
    /// that order, as the plain loop computes it.
    #[test]
    fn terms_are_added_in_order() {
        let mut st = 11u64;
        let module = AdapterModule {
            name: "m".into(),
            in_features: 70,
            out_features: 33,
            kind: ModuleKind::Linear,
        };
        let (fi, fo) = (70usize, 33usize);
        let factors: Vec<(Vec<f32>, Vec<f32>, usize)> = [(4usize, 0), (2, 1)]
            .iter()
            .map(|&(r, _)| {
                let b: Vec<f32> = (0..fo * r).map(|_| lcg(&mut st)).collect();
                let a: Vec<f32> = (0..r * fi).map(|_| lcg(&mut st)).collect();
                (b, a, r)
            })
            .collect();
        let preps: Vec<Prepared> = factors
            .iter()
            .map(|(b, a, r)| Prepared::new(&module, b, a, *r))
            .collect();
        let coefs = [0.7f32 * 2.0, -0.3f32 * 0.5];
        let w: Vec<f32> = (0..fo * fi).map(|_| lcg(&mut st)).collect();
        let mut input = vec![0u8; fo * fi * 4];
        codec::encode(Dtype::F32, &w, &mut input).unwrap();
        let mut got = vec![0u8; fo * fi * 4];
        let terms: Vec<Term<'_>> = preps.iter().zip(coefs).collect();
        merge_rows(
            &terms,
            Rows {
                input: &input,
                src: Dtype::F32,
                output: &mut got,
                dst: Dtype::F32,
                row0: 0,
            },
        );
        let mut want = w.clone();
        for i in 0..fo {
            for j in 0..fi {
                for ((b, a, r), c) in factors.iter().zip(coefs) {
                    let mut acc = 0f32;
                    for k in 0..*r {
                        acc += b[i * r + k] * a[k * fi + j];
                    }
                    want[i * fi + j] += c * acc;
                }
            }
        }
        let mut want_bytes = vec![0u8; fo * fi * 4];
        codec::encode(Dtype::F32, &want, &mut want_bytes).unwrap();
        assert_eq!(got, want_bytes);
    }
}
