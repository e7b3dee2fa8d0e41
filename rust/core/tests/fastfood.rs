//! The Fastfood projection: a plain reference straight from docs/SPEC.md section 4,
//! the exact adjoint, near-isometry and thread-count independence.

use unilora_core::parallel;
use unilora_core::projection::Fastfood;

fn fwht(v: &mut [f32]) {
    let mut h = 1;
    while h < v.len() {
        for i in 0..v.len() {
            if i & h == 0 {
                let (a, b) = (v[i], v[i + h]);
                v[i] = a + b;
                v[i + h] = a - b;
            }
        }
        h <<= 1;
    }
}

fn flip(x: f32, negative: bool) -> f32 {
    if negative { -x } else { x }
}

/// One block, written as the spec reads: `(B, G, Π, c)` of block `b`.
fn block_parts(f: &Fastfood, b: u64) -> (Vec<bool>, Vec<f32>, Vec<usize>, f32) {
    let keys = f.block_keys(b);
    let n = f.n() as u32;
    let neg = (0..n).map(|i| keys.sign_bit(i) != 0).collect();
    let gi: Vec<i64> = (0..n).map(|i| i64::from(keys.gauss_int(i))).collect();
    let g = gi.iter().map(|&k| k as f32 / 65536.0).collect();
    let perm = (0..n).map(|i| keys.perm.encrypt(i) as usize).collect();
    let q: u128 = gi.iter().map(|&k| (k * k) as u128).sum();
    let w = (q as f64) * f.n() as f64 / 4294967296.0 * f.blocks() as f64;
    (neg, g, perm, (1.0 / w.sqrt()) as f32)
}

fn reference_forward(f: &Fastfood, theta: &[f32]) -> Vec<f32> {
    let n = f.n() as usize;
    let mut out = Vec::new();
    for b in 0..f.blocks() {
        let (neg, g, perm, c) = block_parts(f, b);
        let mut v: Vec<f32> = (0..n)
            .map(|i| flip(theta.get(i).copied().unwrap_or(0.0), neg[i]))
            .collect();
        fwht(&mut v);
        let mut w: Vec<f32> = (0..n).map(|i| g[i] * v[perm[i]]).collect();
        fwht(&mut w);
        out.extend(w.iter().map(|&x| c * x));
    }
    out.truncate(f.total() as usize);
    out
}

fn reference_backward(f: &Fastfood, grad: &[f32]) -> Vec<f32> {
    let (n, d) = (f.n() as usize, f.d() as usize);
    let mut acc = vec![0f32; d];
    for b in 0..f.blocks() {
        let (neg, g, perm, c) = block_parts(f, b);
        let mut u: Vec<f32> = (0..n)
            .map(|i| grad.get(b as usize * n + i).copied().unwrap_or(0.0))
            .collect();
        fwht(&mut u);
        let mut z = vec![0f32; n];
        for i in 0..n {
            z[perm[i]] = g[i] * u[i];
        }
        fwht(&mut z);
        for j in 0..d {
            acc[j] += c * flip(z[j], neg[j]);
        }
    }
    acc
}

fn vector(len: usize, salt: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let h = unilora_core::projection::mix32(i.wrapping_mul(2654435761) ^ salt);
            (h as f32 / u32::MAX as f32 - 0.5) * 0.04
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn equals_the_plain_reference_bit_for_bit() {
    for (seed, total, d) in [
        (0u64, 1000u64, 100u64),
        (7, 5, 5),
        (9, 3, 1),
        (u64::MAX, 70_000, 9_000),
        (42, 1 << 15, 1 << 13),
    ] {
        let f = Fastfood::new(seed, total, d).unwrap();
        let theta = vector(d as usize, 1);
        let grad = vector(total as usize, 2);
        assert_eq!(
            bits(&f.reconstruct(&theta).unwrap()),
            bits(&reference_forward(&f, &theta)),
            "forward {seed} {total} {d}"
        );
        assert_eq!(
            bits(&f.backward(&grad).unwrap()),
            bits(&reference_backward(&f, &grad)),
            "backward {seed} {total} {d}"
        );
    }
}

#[test]
fn backward_is_the_adjoint() {
    let f = Fastfood::new(5, 50_000, 3_000).unwrap();
    let x = vector(3_000, 3);
    let g = vector(50_000, 4);
    let px = f.reconstruct(&x).unwrap();
    let ptg = f.backward(&g).unwrap();
    let lhs: f64 = px
        .iter()
        .zip(&g)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let rhs: f64 = x
        .iter()
        .zip(&ptg)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    // Float32 rounding, measured against the size of the terms (Cauchy-Schwarz).
    let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
    let scale = norm(&px) * norm(&g);
    assert!(
        (lhs - rhs).abs() <= 1e-6 * scale,
        "{lhs} vs {rhs} (scale {scale})"
    );
}

/// `P^T P` is close to the identity: its diagonal is near 1 and its largest
/// off-diagonal entries are of the order of `sqrt(2 / D)`.
#[test]
fn nearly_isometric() {
    let (total, d) = (20_000u64, 200u64);
    let f = Fastfood::new(11, total, d).unwrap();
    let mut worst_diag = 0f64;
    let mut worst_off = 0f64;
    for j in 0..d as usize {
        let mut e = vec![0f32; d as usize];
        e[j] = 1.0;
        let col = f.backward(&f.reconstruct(&e).unwrap()).unwrap();
        for (k, &x) in col.iter().enumerate() {
            let x = f64::from(x);
            if k == j {
                worst_diag = worst_diag.max((x - 1.0).abs());
            } else {
                worst_off = worst_off.max(x.abs());
            }
        }
    }
    assert!(worst_diag < 0.05, "diagonal off by {worst_diag}");
    assert!(
        worst_off < 8.0 * (2.0 / total as f64).sqrt(),
        "off-diagonal {worst_off}"
    );
}

#[test]
fn thread_count_does_not_change_the_bits() {
    let f = Fastfood::new(1, 300_000, 1 << 12).unwrap();
    let theta = vector(1 << 12, 5);
    let grad = vector(300_000, 6);
    parallel::set_num_threads(1);
    let (a, ga) = (f.reconstruct(&theta).unwrap(), f.backward(&grad).unwrap());
    parallel::set_num_threads(3);
    let (b, gb) = (f.reconstruct(&theta).unwrap(), f.backward(&grad).unwrap());
    parallel::set_num_threads(0);
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(bits(&ga), bits(&gb));
    // Pieces cut anywhere give the same rows.
    let mut out = vec![0f32; 300_000];
    {
        let (x, rest) = out.split_at_mut(1);
        let (y, z) = rest.split_at_mut(70_001);
        f.reconstruct_into(&theta, &mut [x, y, z]).unwrap();
    }
    assert_eq!(bits(&a), bits(&out));
}

#[test]
fn bad_sizes_are_refused() {
    let f = Fastfood::new(0, 100, 10).unwrap();
    assert!(f.reconstruct(&[0.0; 9]).is_err());
    assert!(f.reconstruct(&[f32::NAN; 10]).is_err());
    assert!(f.backward(&[0.0; 99]).is_err());
    let mut short = vec![0f32; 99];
    assert!(
        f.reconstruct_into(&[0.0; 10], &mut [short.as_mut_slice()])
            .is_err()
    );
}

/// Golden vector F1 of docs/SPEC.md section 4.6 (also in tests/data/golden_fastfood.json).
#[test]
fn golden_vector_f1() {
    use sha2::{Digest, Sha256};
    let f = Fastfood::new(0, 1000, 100).unwrap();
    assert_eq!((f.n(), f.blocks()), (128, 8));
    let words: Vec<String> = f
        .block_keys(0)
        .words()
        .iter()
        .map(|w| format!("{w:08x}"))
        .collect();
    assert_eq!(words[..4], ["d6064338", "a55d0d49", "4fe6a95f", "7b08c668"]);
    assert_eq!(f.block_scale(0).to_bits(), 0x3b2f1e43);
    let theta: Vec<f32> = (0..100).map(|j| ((j % 7) as f32 - 3.0) / 16.0).collect();
    let grad: Vec<f32> = (0..1000).map(|i| ((i % 5) as f32 - 2.0) / 8.0).collect();
    let hex = |v: &[f32]| -> String {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let out = f.reconstruct(&theta).unwrap();
    assert_eq!(out[0].to_bits(), 0xbcdfb9a0);
    assert_eq!(
        hex(&out),
        "1912c801cdae94e641641bf59b524620bdb9b3e61fc1e6b8429b10f7aa7feaaa"
    );
    assert_eq!(
        hex(&f.backward(&grad).unwrap()),
        "9323110547fb59c32d97597ac2befcf156a093f0a104498d82137cd11c91b238"
    );
}
