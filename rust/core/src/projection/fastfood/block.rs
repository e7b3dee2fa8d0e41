//! One Fastfood block, forward (`H G Π H B x`) and backward (`B H Π^T G H g`): its
//! Gaussian diagonal and permutation from the block's keys, and the permuted product,
//! with an AVX2 build chosen at run time (the same operations in the same order).

use super::fwht::fwht_with;
use super::{BlockKeys, Fastfood};

/// `1 / 65536`: the Gaussian integers are scaled by it (exactly).
const GAUSS_UNIT: f32 = 1.0 / 65536.0;
/// Squares summed in a `u64` before they join the `u128` total (`2^38 * 2^20 < 2^64`).
const SQUARES_CHUNK: usize = 1 << 20;

/// Scratch buffers of one block: two vectors, the Gaussian diagonal and `Π`.
pub(super) struct Scratch {
    pub(super) v: Vec<f32>,
    pub(super) w: Vec<f32>,
    pub(super) g: Vec<f32>,
    pub(super) p: Vec<u32>,
}

impl Scratch {
    pub(super) fn new(n: usize) -> Self {
        Scratch {
            v: vec![0.0; n],
            w: vec![0.0; n],
            g: vec![0.0; n],
            p: vec![0; n],
        }
    }
}

/// Block `b` of the forward pass into `s.w` (unscaled); returns `c_b`.
pub(super) fn forward_block(ff: &Fastfood, b: u64, theta: &[f32], s: &mut Scratch) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, the only target feature of the function.
        return unsafe { forward_block_avx2(ff, b, theta, s) };
    }
    forward_block_impl::<false>(ff, b, theta, s)
}

/// Block `b` of the backward pass: `out = c_b * (B H Π^T G H grad_b)[..d]`.
pub(super) fn backward_block(
    ff: &Fastfood,
    b: u64,
    grad: &[f32],
    s: &mut Scratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, the only target feature of the function.
        unsafe { backward_block_avx2(ff, b, grad, s, out) };
        return;
    }
    backward_block_impl::<false>(ff, b, grad, s, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn forward_block_avx2(ff: &Fastfood, b: u64, theta: &[f32], s: &mut Scratch) -> f32 {
    forward_block_impl::<true>(ff, b, theta, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn backward_block_avx2(ff: &Fastfood, b: u64, grad: &[f32], s: &mut Scratch, out: &mut [f32]) {
    backward_block_impl::<true>(ff, b, grad, s, out);
}

/// `w = H G Π H B x` for block `b` (`x` = `theta` zero-padded to `n`); returns `c_b`.
#[inline(always)]
fn forward_block_impl<const AVX2: bool>(
    ff: &Fastfood,
    b: u64,
    theta: &[f32],
    s: &mut Scratch,
) -> f32 {
    let keys = ff.block_keys(b);
    let n = ff.n() as usize;
    let (v, w) = (&mut s.v[..n], &mut s.w[..n]);
    v[..theta.len()].copy_from_slice(theta);
    v[theta.len()..].fill(0.0);
    for (i, x) in v.iter_mut().enumerate() {
        *x = f32::from_bits(x.to_bits() ^ keys.sign_bit(i as u32));
    }
    fwht_with::<AVX2>(v);
    let (g, p) = (&mut s.g[..n], &mut s.p[..n]);
    let q = gaussians(&keys, g);
    permutation(&keys, p);
    permuted_product::<AVX2>(w, Some(g), p, v);
    fwht_with::<AVX2>(w);
    ff.scale_of(q)
}

/// `out = c_b * (B H Π^T G H g)[..d]` for block `b`, `g` its rows of the gradient,
/// zero-padded to `n`.
#[inline(always)]
fn backward_block_impl<const AVX2: bool>(
    ff: &Fastfood,
    b: u64,
    grad: &[f32],
    s: &mut Scratch,
    out: &mut [f32],
) {
    let keys = ff.block_keys(b);
    let n = ff.n() as usize;
    let row0 = (b * ff.n()) as usize;
    let rows = &grad[row0..grad.len().min(row0 + n)];
    let (u, z) = (&mut s.v[..n], &mut s.w[..n]);
    u[..rows.len()].copy_from_slice(rows);
    u[rows.len()..].fill(0.0);
    fwht_with::<AVX2>(u);
    let (g, p) = (&mut s.g[..n], &mut s.p[..n]);
    let q = gaussians(&keys, g);
    // z[Π(i)] = G[i] u[i], written as the gather z[j] = (G u)[Π^-1(j)].
    for (x, &g) in u.iter_mut().zip(&*g) {
        *x *= g;
    }
    inverse_permutation(&keys, p);
    permuted_product::<AVX2>(z, None, p, u);
    fwht_with::<AVX2>(z);
    let c = ff.scale_of(q);
    for (j, o) in out.iter_mut().enumerate() {
        *o = c * f32::from_bits(z[j].to_bits() ^ keys.sign_bit(j as u32));
    }
}

/// Fills `g` with the block's Gaussian diagonal `G[i]` and returns the sum of the
/// squared Gaussian integers (`2^32 sum G^2`).
#[inline(always)]
pub(super) fn gaussians(keys: &BlockKeys, g: &mut [f32]) -> u128 {
    // Two passes, so that the generation runs on whole vectors of 32-bit lanes; the
    // integers come back exactly from G (|65536 G| < 2^19).
    for (i, o) in g.iter_mut().enumerate() {
        *o = keys.gauss_int(i as u32) as f32 * GAUSS_UNIT;
    }
    let mut q = 0u128;
    for chunk in g.chunks(SQUARES_CHUNK) {
        let part: u64 = chunk
            .iter()
            .map(|&x| {
                let k = i64::from((x * 65536.0) as i32);
                (k * k) as u64
            })
            .sum();
        q += u128::from(part);
    }
    q
}

/// Fills `p` with `Π`: `p[i] = E(i)`, the block's Feistel network.
#[inline(always)]
fn permutation(keys: &BlockKeys, p: &mut [u32]) {
    for (i, o) in p.iter_mut().enumerate() {
        *o = keys.perm.encrypt(i as u32);
    }
}

/// Fills `p` with `Π^-1`: `p[j] = E^-1(j)`.
#[inline(always)]
fn inverse_permutation(keys: &BlockKeys, p: &mut [u32]) {
    for (j, o) in p.iter_mut().enumerate() {
        *o = keys.perm.decrypt(j as u32);
    }
}

/// `w[i] = g[i] * v[p[i]]`, or `w[i] = v[p[i]]` without `g`. `v.len()` is a power of
/// two and every `p[i] < v.len()` (`Π` maps `[0, n)` onto itself).
#[inline(always)]
fn permuted_product<const AVX2: bool>(w: &mut [f32], g: Option<&[f32]>, p: &[u32], v: &[f32]) {
    debug_assert!(v.len().is_power_of_two() && p.len() == w.len());
    #[cfg(target_arch = "x86_64")]
    if AVX2 && v.len() <= 1 << 31 {
        // SAFETY: as in `first_stages`.
        unsafe { permuted_product_avx2(w, g, p, v) };
        return;
    }
    match g {
        Some(g) => {
            for ((o, &g), &p) in w.iter_mut().zip(g).zip(p) {
                *o = g * v[p as usize];
            }
        }
        None => {
            for (o, &p) in w.iter_mut().zip(p) {
                *o = v[p as usize];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn permuted_product_avx2(w: &mut [f32], g: Option<&[f32]>, p: &[u32], v: &[f32]) {
    use std::arch::x86_64::*;
    assert!(v.len().is_power_of_two() && v.len() <= 1 << 31);
    let n = w.len().min(p.len()).min(g.map_or(usize::MAX, <[f32]>::len));
    // Indices are masked to [0, v.len()): no gather can read outside `v` (they are all
    // below it anyway, so the mask changes no value).
    let mask = _mm256_set1_epi32((v.len() - 1) as i32);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: lanes i .. i + 8 lie inside w, p and g (i + 8 <= n); the masked
        // indices lie in [0, v.len()) and fit in i32 (v.len() <= 2^31).
        unsafe {
            let idx = _mm256_and_si256(_mm256_loadu_si256(p.as_ptr().add(i).cast()), mask);
            let mut x = _mm256_i32gather_ps::<4>(v.as_ptr(), idx);
            if let Some(g) = g {
                x = _mm256_mul_ps(_mm256_loadu_ps(g.as_ptr().add(i)), x);
            }
            _mm256_storeu_ps(w.as_mut_ptr().add(i), x);
        }
        i += 8;
    }
    for k in i..n {
        let x = v[p[k] as usize];
        w[k] = g.map_or(x, |g| g[k] * x);
    }
}
