//! Properties of the spec v1 generator: golden vectors, balance, isometry, the inverse,
//! kernel agreement and thread-count independence.

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use unilora_core::projection::kernel::{KernelImpl, gather_rows};
use unilora_core::{CoreError, Projection, parallel, reconstruct, reconstruct_into};

fn map(p: &Projection) -> (Vec<u64>, Vec<f32>) {
    p.materialize().unwrap()
}

fn checksum(idx: &[u64], scale: &[f32]) -> String {
    let mut h = Sha256::new();
    for &j in idx {
        h.update((j as u32).to_le_bytes());
    }
    for &s in scale {
        h.update(s.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

struct Golden {
    seed: u64,
    total: u64,
    d: u64,
    idx: [u64; 12],
    scale_bits: [u32; 12],
    checksum: &'static str,
}

/// The golden vectors of docs/SPEC.md section 1.5.
const GOLDEN: [Golden; 3] = [
    Golden {
        seed: 0,
        total: 1000,
        d: 100,
        idx: [26, 63, 23, 95, 12, 75, 61, 49, 21, 7, 60, 65],
        scale_bits: [0x3ea1e89b; 12],
        checksum: "9a3af82f276e9619d06de803e32bf23ecb1bf6191f1c5fe28541cbcb356f4624",
    },
    Golden {
        seed: 42,
        total: 10_000_019,
        d: 23_040,
        idx: [
            21486, 21368, 6546, 8261, 20186, 22613, 7650, 11146, 628, 8053, 20268, 12774,
        ],
        scale_bits: [
            0x3d449d42, 0x3d449d42, 0x3d449d42, 0x3d449d42, 0x3d449d42, 0x3d449d42, 0x3d449d42,
            0x3d449d42, 0x3d44635f, 0x3d449d42, 0x3d449d42, 0x3d449d42,
        ],
        checksum: "311e4bab29c9b4e6931941036dc0b55c48d0bc2d77c807e0d3f8a7e4fe14406e",
    },
    Golden {
        seed: u64::MAX,
        total: 1_048_577,
        d: 524_288,
        idx: [
            329959, 439341, 197474, 409402, 454501, 422959, 328354, 496037, 1350, 360436, 516900,
            221416,
        ],
        scale_bits: [0x3f3504f3; 12],
        checksum: "b8aea54e901f1e22e03d8854d8ec0f88a64cc4c1a1f254b1d4df7fe3d693ddea",
    },
];

#[test]
fn golden_vectors() {
    for g in &GOLDEN {
        let p = Projection::new(g.seed, g.total, g.d).unwrap();
        let (idx, scale) = map(&p);
        assert_eq!(&idx[..12], &g.idx, "seed {}", g.seed);
        let bits: Vec<u32> = scale[..12].iter().map(|s| s.to_bits()).collect();
        assert_eq!(bits, g.scale_bits, "seed {}", g.seed);
        assert_eq!(checksum(&idx, &scale), g.checksum, "seed {}", g.seed);
    }
}

#[test]
fn golden_beyond_32_bits() {
    // D > 2^32 uses the 64-bit path (no map is materialised).
    let p = Projection::new(7, 5_000_000_000, 524_288).unwrap();
    let rows = [0u64, 1, 2, 3, 4_294_967_296, 4_999_999_999];
    let want = [62654u64, 474627, 402121, 376218, 20137, 317302];
    for (&r, &w) in rows.iter().zip(&want) {
        assert_eq!(p.index(r), w, "row {r}");
        assert_eq!(p.inverse_permute(p.permute(r)), r);
    }
    let v: Vec<f32> = (0..524_288).map(|i| i as f32).collect();
    let mut out = vec![0f32; 4];
    gather_rows(&p, &v, 4_999_999_996, &mut out, KernelImpl::Auto);
    for (t, o) in out.iter().enumerate() {
        let j = p.index(4_999_999_996 + t as u64);
        assert_eq!(*o, v[j as usize] * p.column_scale(j));
    }
}

fn check_balance_and_isometry(seed: u64, total: u64, d: u64) {
    let p = Projection::new(seed, total, d).unwrap();
    let (idx, scale) = map(&p);
    let mut counts = vec![0u64; d as usize];
    for &j in &idx {
        counts[j as usize] += 1;
    }
    let (lo, hi) = (total / d, total.div_ceil(d));
    for (j, &c) in counts.iter().enumerate() {
        assert!(
            c == lo || c == hi,
            "column {j} used {c} times, expected {lo} or {hi}"
        );
        assert_eq!(c, p.column_count(j as u64));
    }
    // P^T P x = x for a vector x with distinct entries (float64 accumulation).
    let x: Vec<f64> = (0..d).map(|j| 1.0 + j as f64 * 0.37).collect();
    let mut ptpx = vec![0f64; d as usize];
    for (i, &j) in idx.iter().enumerate() {
        let s = f64::from(scale[i]);
        ptpx[j as usize] += s * (s * x[j as usize]);
    }
    for j in 0..d as usize {
        assert!(
            (ptpx[j] - x[j]).abs() <= 1e-6 * x[j],
            "column {j}: {} != {}",
            ptpx[j],
            x[j]
        );
    }
    // The inverse enumerates exactly the rows of each column.
    let mut seen = vec![false; total as usize];
    for j in 0..d {
        let rows: Vec<u64> = p.rows_of_column(j).collect();
        assert_eq!(rows.len() as u64, p.column_count(j));
        for r in rows {
            assert_eq!(idx[r as usize], j);
            assert!(!seen[r as usize]);
            seen[r as usize] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn balance_edge_cases() {
    for &(seed, total, d) in &[
        (0, 1, 1),
        (1, 2, 1),
        (2, 2, 2),
        (3, 5, 5),
        (4, 17, 1),
        (5, 1000, 1000),
        (6, 1001, 1000),
        (7, 1 << 16, 1 << 15),
        (8, (1 << 16) + 1, 3),
        (9, 123_457, 23_040),
    ] {
        check_balance_and_isometry(seed, total, d);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn balance_isometry_inverse(seed in any::<u64>(), total in 1u64..40_000, frac in 0.0f64..1.0) {
        let d = ((total as f64 * frac) as u64).clamp(1, total);
        check_balance_and_isometry(seed, total, d);
    }

    #[test]
    fn permutation_round_trip(seed in any::<u64>(), total in 1u64..u64::MAX / 2, row in any::<u64>()) {
        let p = Projection::new(seed, total, 1).unwrap();
        let i = row % total;
        let y = p.permute(i);
        prop_assert!(y < total);
        prop_assert_eq!(p.inverse_permute(y), i);
    }

    #[test]
    fn kernels_agree(seed in any::<u64>(), total in 1u64..3_000_000, dfrac in 0.0f64..1.0,
                     start_frac in 0.0f64..1.0, len in 0usize..9000) {
        let d = ((total as f64 * dfrac * dfrac) as u64).clamp(1, total.min(1 << 20));
        let p = Projection::new(seed, total, d).unwrap();
        let v: Vec<f32> = (0..d).map(|j| (j as f32 * 0.618).sin()).collect();
        let start = ((total as f64 * start_frac) as u64).min(total - 1);
        let len = len.min((total - start) as usize);
        let mut a = vec![0f32; len];
        let mut b = vec![1f32; len];
        let mut c = vec![2f32; len];
        let mut e = vec![3f32; len];
        gather_rows(&p, &v, start, &mut a, KernelImpl::Auto);
        gather_rows(&p, &v, start, &mut b, KernelImpl::Portable);
        gather_rows(&p, &v, start, &mut c, KernelImpl::Scalar);
        gather_rows(&p, &v, start, &mut e, KernelImpl::Avx2);
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&a), bits(&c));
        prop_assert_eq!(bits(&b), bits(&c));
        prop_assert_eq!(bits(&e), bits(&c));
    }
}

#[test]
fn kernels_agree_at_power_of_two_boundaries() {
    // D just above and at a power of two (longest and shortest cycle walks), with
    // power-of-two and other d, through whole blocks and ragged tails.
    for &total in &[(1u64 << 20) + 1, 1 << 20, (1 << 21) - 1, 4_194_305] {
        for &d in &[1u64, 3, 1024, 23_040, 524_288] {
            let p = Projection::new(11, total, d).unwrap();
            let v: Vec<f32> = (0..d).map(|j| j as f32 + 0.5).collect();
            for &(start, len) in &[
                (0u64, 70_001usize),
                (total - 5000, 5000),
                (12_345, 2048 * 3 + 7),
            ] {
                let mut c = vec![0f32; len];
                gather_rows(&p, &v, start, &mut c, KernelImpl::Scalar);
                for which in [
                    KernelImpl::Auto,
                    KernelImpl::Streaming,
                    KernelImpl::Avx2,
                    KernelImpl::Portable,
                ] {
                    let mut a = vec![-1f32; len];
                    gather_rows(&p, &v, start, &mut a, which);
                    assert!(
                        a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "D={total} d={d} {which:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn streaming_stores_at_every_alignment() {
    // The streaming kernel writes the rows before the first 64-byte boundary the usual
    // way: slices starting at every offset inside a cache line, ragged lengths.
    let p = Projection::new(5, 3_000_017, 23_040).unwrap();
    let v: Vec<f32> = (0..23_040).map(|j| j as f32 * 0.25 - 7.0).collect();
    let mut want = vec![0f32; 5000];
    gather_rows(&p, &v, 1234, &mut want, KernelImpl::Scalar);
    let mut buf = vec![0f32; 5000 + 16];
    for offset in 0..16 {
        for len in [0usize, 1, 15, 16, 17, 2047, 4999 - offset] {
            let out = &mut buf[offset..offset + len];
            out.fill(f32::NAN);
            gather_rows(&p, &v, 1234, out, KernelImpl::Streaming);
            assert!(
                out.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "offset {offset}, len {len}"
            );
        }
    }
    // reconstruct streams outputs of 2^24 rows and more
    let shapes = [(1u64 << 22, 4u64), (3, 5)];
    let got = reconstruct(&v, 5, &shapes).unwrap();
    let total = (1u64 << 24) + 15;
    let q = Projection::new(5, total, 23_040).unwrap();
    let flat: Vec<f32> = got.iter().flatten().copied().collect();
    for start in [0u64, 1 << 20, (1 << 24) - 3] {
        let mut w = vec![0f32; 18];
        gather_rows(&q, &v, start, &mut w, KernelImpl::Scalar);
        assert_eq!(&flat[start as usize..start as usize + 18], &w[..]);
    }
}

#[test]
fn reconstruct_equals_gather_of_map_and_is_thread_independent() {
    let shapes = [(4096u64, 4u64), (4, 4096), (11008, 4), (4, 11008), (3, 5)];
    let total: u64 = shapes.iter().map(|(r, c)| r * c).sum();
    let d = 23_040u64;
    let v: Vec<f32> = (0..d)
        .map(|j| ((j * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let p = Projection::new(99, total, d).unwrap();
    let (idx, scale) = map(&p);
    let mut results = Vec::new();
    for threads in [1, 2, 3] {
        parallel::set_num_threads(threads);
        results.push(reconstruct(&v, 99, &shapes).unwrap());
    }
    parallel::set_num_threads(0);
    let mut off = 0usize;
    for (k, &(r, c)) in shapes.iter().enumerate() {
        for t in 0..(r * c) as usize {
            let want = v[idx[off + t] as usize] * scale[off + t];
            for res in &results {
                assert_eq!(res[k][t].to_bits(), want.to_bits());
            }
        }
        off += (r * c) as usize;
    }
}

#[test]
fn bad_arguments_are_specific_errors() {
    let err = |r: Result<_, CoreError>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(Projection::new(0, 10, 0)).contains("at least 1"));
    assert!(err(Projection::new(0, 10, 11)).contains("larger than the total size"));
    assert!(err(Projection::new(0, 0, 1)).contains("at least 1"));
    let v = vec![0.1f32; 8];
    assert!(matches!(
        reconstruct(&v, 0, &[]),
        Err(CoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        reconstruct(&v, 0, &[(0, 3)]),
        Err(CoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        reconstruct(&v, 0, &[(2, 3)]),
        Err(CoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        reconstruct(&v, 0, &[(u64::MAX, 3)]),
        Err(CoreError::InvalidArgument(_))
    ));
    let mut nan = v.clone();
    nan[5] = f32::NAN;
    let e = reconstruct(&nan, 0, &[(4, 4)]).unwrap_err();
    assert!(matches!(e, CoreError::Vector(_)) && e.to_string().contains("vector[5]"));
    let mut out = [0f32; 15];
    let e = reconstruct_into(&v, 0, &[(4, 4)], &mut [&mut out[..]]).unwrap_err();
    assert!(e.to_string().contains("needs 16"));
}

#[test]
fn backward_is_the_chunked_inverse_sum_for_any_thread_count() {
    use unilora_core::{BACKWARD_T_CHUNK, reconstruct_backward};
    for &(seed, total, d) in &[
        (3u64, 1u64, 1u64),
        (4, 1000, 7),
        (5, 70_001, 23_040),
        (6, (1 << 20) + 1, 524_288),
        (7, 300_000, 1),
        (8, 50_000, 50_000),
        (9, 640, 10),
        (10, 641, 10),
        (11, 200_000, 4_097),
        (12, 1_000_000, 3),
    ] {
        let p = Projection::new(seed, total, d).unwrap();
        let grad: Vec<f32> = (0..total)
            .map(|i| ((i * 2_654_435_761) % 1997) as f32 * 1e-3 - 1.0)
            .collect();
        // The spec's order: chunks of 64 consecutive t, each summed from 0.0 in t
        // order, then the chunk sums added in chunk order from 0.0, then the scale.
        let mut want = vec![0f32; d as usize];
        for (j, w) in want.iter_mut().enumerate() {
            let rows: Vec<u64> = p.rows_of_column(j as u64).collect();
            let mut acc = 0f32;
            for chunk in rows.chunks(BACKWARD_T_CHUNK as usize) {
                acc += chunk.iter().fold(0f32, |s, &r| s + grad[r as usize]);
            }
            *w = acc * p.column_scale(j as u64);
        }
        for threads in [1, 2, 3] {
            parallel::set_num_threads(threads);
            let got = reconstruct_backward(&grad, seed, d).unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "D={total} d={d}"
            );
        }
        parallel::set_num_threads(0);
        // And it is P^T applied to grad (float64 reference, loose tolerance).
        let (idx, scale) = map(&p);
        let mut ref64 = vec![0f64; d as usize];
        for i in 0..total as usize {
            ref64[idx[i] as usize] += f64::from(grad[i]) * f64::from(scale[i]);
        }
        for (a, b) in want.iter().zip(&ref64) {
            assert!((f64::from(*a) - b).abs() <= 1e-3 * (1.0 + b.abs()));
        }
    }
}
