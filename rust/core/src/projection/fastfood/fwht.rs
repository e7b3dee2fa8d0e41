//! The unnormalised fast Walsh–Hadamard transform of the Fastfood blocks, in a fixed
//! order of operations (stage by stage, tile by tile), with an AVX2 build of its first
//! three stages that performs the same operations.

/// Butterfly stages up to this length run tile by tile (a tile stays in L1).
const FWHT_TILE: usize = 1 << 12;

/// The unnormalised fast Walsh–Hadamard transform, in place: stages `h = 1, 2, 4, ...`
/// in that order, each replacing `(v[i], v[i + h])` by `(v[i] + v[i + h], v[i] - v[i + h])`
/// for every `i` with `i & h == 0`. Stages below `FWHT_TILE` run tile by tile, which
/// changes no operation (a tile's elements depend only on each other there).
pub fn fwht(v: &mut [f32]) {
    fwht_with::<false>(v);
}

/// [`fwht`]; with `AVX2` (only inside an AVX2 function) the first three stages run on
/// whole vectors.
#[inline(always)]
pub(super) fn fwht_with<const AVX2: bool>(v: &mut [f32]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    let tile = n.min(FWHT_TILE);
    for t in v.chunks_exact_mut(tile) {
        let mut h = 1;
        if tile >= 8 {
            first_stages::<AVX2>(t);
            h = 8;
        }
        while h < tile {
            stage(t, h);
            h <<= 1;
        }
    }
    let mut h = tile;
    while h < n {
        stage(v, h);
        h <<= 1;
    }
}

/// Stages 1, 2 and 4 of every group of eight values.
#[inline(always)]
fn first_stages<const AVX2: bool>(t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: `AVX2` is true only in functions compiled for AVX2, which run only on
        // CPUs that have it (checked before they are called).
        unsafe { first_stages_avx2(t) };
        return;
    }
    for c in t.chunks_exact_mut(8) {
        butterfly8(c);
    }
}

/// Stages 1, 2 and 4 on vectors of eight: each stage adds and subtracts a lane
/// permutation, then keeps the sum in the lower and the difference in the upper lane
/// of every pair (the same two operations, on the same operands, as [`butterfly8`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn first_stages_avx2(t: &mut [f32]) {
    use std::arch::x86_64::*;
    for c in t.chunks_exact_mut(8) {
        // SAFETY: `c` holds eight floats; the load and store are unaligned.
        let mut x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        // h = 1: partner lane i ^ 1; upper lanes 1, 3, 5, 7 take partner - x.
        let p = _mm256_permute_ps(x, 0b10_11_00_01);
        x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0b1010_1010);
        // h = 2: partner lane i ^ 2; upper lanes 2, 3, 6, 7.
        let p = _mm256_permute_ps(x, 0b01_00_11_10);
        x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0b1100_1100);
        // h = 4: partner lane i ^ 4; upper lanes 4 to 7.
        let p = _mm256_permute2f128_ps(x, x, 1);
        x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0b1111_0000);
        // SAFETY: as for the load.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), x) };
    }
}

/// Stages 1, 2 and 4 on eight values.
#[inline(always)]
fn butterfly8(c: &mut [f32]) {
    let mut x = [0f32; 8];
    x.copy_from_slice(c);
    for h in [1, 2, 4] {
        for i in 0..8 {
            if i & h == 0 {
                let (a, b) = (x[i], x[i + h]);
                x[i] = a + b;
                x[i + h] = a - b;
            }
        }
    }
    c.copy_from_slice(&x);
}

#[inline(always)]
fn stage(v: &mut [f32], h: usize) {
    for pair in v.chunks_exact_mut(2 * h) {
        let (a, b) = pair.split_at_mut(h);
        for (x, y) in a.iter_mut().zip(b.iter_mut()) {
            let (s, t) = (*x + *y, *x - *y);
            *x = s;
            *y = t;
        }
    }
}
