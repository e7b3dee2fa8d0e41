//! Explicit AVX2 version of the 32-bit kernel: 8 rows per vector, cycle-walking
//! values left-packed into a side list and re-encrypted 8 at a time.

use std::arch::x86_64::*;

use super::{BLOCK, Ctx32, Modulus};

/// For each 8-bit lane mask, the `vpermd` indices that move the selected lanes to
/// the front, in order.
static PACK: [__m256i; 256] = {
    let mut table = [[0i32; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let mut k = 0;
        let mut lane = 0;
        while lane < 8 {
            if mask & (1 << lane) != 0 {
                table[mask][k] = lane;
                k += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    // SAFETY: [i32; 8] and __m256i have the same size, and every bit pattern is a
    // valid value of both.
    unsafe { std::mem::transmute::<[[i32; 8]; 256], [__m256i; 256]>(table) }
};

/// The vector constants of one projection: the Feistel network's keys and masks, the
/// walk's bound, and the column (`y mod d`) constants.
struct Consts {
    keys: [__m256i; 4],
    wr: __m128i,
    mask_l: __m256i,
    mask_r: __m256i,
    bias: __m256i,
    last_b: __m256i,
    c1: __m256i,
    c2: __m256i,
    /// `Some(d - 1)` for a power-of-two `d`.
    mask_d: Option<__m256i>,
    magic: __m256i,
    shift2: __m128i,
    d: __m256i,
}

impl Consts {
    #[target_feature(enable = "avx2")]
    fn new(ctx: &Ctx32) -> Self {
        let (wl, wr) = ctx.f.widths();
        let (mask_d, magic, shift2, d) = match ctx.modulus {
            Modulus::Mask(m) => (Some(_mm256_set1_epi32(m as i32)), 0, 0, 0),
            Modulus::Magic { div, d } => (None, div.magic, div.shift2, d),
        };
        Consts {
            keys: ctx.f.keys().map(|k| _mm256_set1_epi32(k as i32)),
            wr: _mm_cvtsi32_si128(wr as i32),
            mask_l: _mm256_set1_epi32(super::low_mask(wl) as i32),
            mask_r: _mm256_set1_epi32(super::low_mask(wr) as i32),
            bias: _mm256_set1_epi32(i32::MIN),
            last_b: _mm256_set1_epi32((ctx.last ^ 0x8000_0000) as i32),
            c1: _mm256_set1_epi32(0x21F0_AAADu32 as i32),
            c2: _mm256_set1_epi32(0xD35A_2D97u32 as i32),
            mask_d,
            magic: _mm256_set1_epi32(magic as i32),
            shift2: _mm_cvtsi32_si128(shift2 as i32),
            d: _mm256_set1_epi32(d as i32),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2")]
fn mix(x: __m256i, c: &Consts) -> __m256i {
    let x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    let x = _mm256_mullo_epi32(x, c.c1);
    let x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    let x = _mm256_mullo_epi32(x, c.c2);
    _mm256_xor_si256(x, _mm256_srli_epi32(x, 15))
}

/// Eight Feistel encryptions; the widths alternate wl, wr, wl, wr.
#[inline]
#[target_feature(enable = "avx2")]
fn encrypt(x: __m256i, c: &Consts) -> __m256i {
    let mut l = _mm256_srl_epi32(x, c.wr);
    let mut r = _mm256_and_si256(x, c.mask_r);
    for (round, key) in c.keys.iter().enumerate() {
        let mask = if round % 2 == 0 { c.mask_l } else { c.mask_r };
        let f = _mm256_and_si256(mix(_mm256_xor_si256(r, *key), c), mask);
        let new_r = _mm256_xor_si256(l, f);
        l = r;
        r = new_r;
    }
    _mm256_or_si256(_mm256_sll_epi32(l, c.wr), r)
}

/// Lanes whose value is above `D - 1` (unsigned compare through a sign bias).
#[inline]
#[target_feature(enable = "avx2")]
fn out_of_range(y: __m256i, c: &Consts) -> i32 {
    let gt = _mm256_cmpgt_epi32(_mm256_xor_si256(y, c.bias), c.last_b);
    _mm256_movemask_ps(_mm256_castsi256_ps(gt))
}

/// Vector `y / d` (quotient) for a non-power-of-two `d` (so the first shift is 1).
#[inline]
#[target_feature(enable = "avx2")]
fn div(y: __m256i, magic: __m256i, shift: __m128i) -> __m256i {
    // High 32 bits of magic * y, lanes 0,2,4,6 then 1,3,5,7.
    let even = _mm256_srli_epi64(_mm256_mul_epu32(y, magic), 32);
    let odd = _mm256_mul_epu32(_mm256_srli_epi64(y, 32), magic);
    let q = _mm256_blend_epi32(even, odd, 0b1010_1010);
    let t = _mm256_add_epi32(_mm256_srli_epi32(_mm256_sub_epi32(y, q), 1), q);
    _mm256_srl_epi32(t, shift)
}

/// `y mod d` for 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn column(y: __m256i, c: &Consts) -> __m256i {
    match c.mask_d {
        Some(mk) => _mm256_and_si256(y, mk),
        None => _mm256_sub_epi32(y, _mm256_mullo_epi32(div(y, c.magic, c.shift2), c.d)),
    }
}

/// Appends the lanes of `bits` of `y` (values) and `p` (positions) to `walk` and `pos`
/// at index `at`, in lane order (branch-free, through the permutation table); returns
/// how many.
///
/// # Safety
/// `walk` and `pos` have at least `at + 8` slots.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn append(
    walk: &mut [u32],
    pos: &mut [u32],
    at: usize,
    bits: usize,
    y: __m256i,
    p: __m256i,
) -> usize {
    debug_assert!(at + 8 <= walk.len().min(pos.len()));
    let perm = PACK[bits];
    // SAFETY: both lists have `at + 8` slots (the caller's contract).
    unsafe {
        let values = _mm256_permutevar8x32_epi32(y, perm);
        _mm256_storeu_si256(walk.as_mut_ptr().add(at).cast(), values);
        _mm256_storeu_si256(
            pos.as_mut_ptr().add(at).cast(),
            _mm256_permutevar8x32_epi32(p, perm),
        );
    }
    bits.count_ones() as usize
}

/// # Safety
/// The CPU must support AVX2, and `ctx.d < 2^30` (indices are used as signed
/// 32-bit gather offsets). `vector.len() == d` and `start + out.len() <= D` are
/// asserted by the caller.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn gather(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
    let c = Consts::new(ctx);
    let mut buf = [0u32; BLOCK];
    let mut walk = [0u32; BLOCK + 8];
    let mut pos = [0u32; BLOCK + 8];
    for (b, chunk) in out.chunks_mut(BLOCK).enumerate() {
        let base = start.wrapping_add((b * BLOCK) as u32);
        let n = chunk.len();
        // SAFETY: `chunks_mut(BLOCK)` gives n <= BLOCK; every column is below d (the
        // caller's contract: vector.len() == d).
        unsafe {
            let m = encrypt_block(&c, base, n, &mut buf, &mut walk, &mut pos);
            walk_block(&c, m, &mut buf, &mut walk, &mut pos);
            gather_block(ctx, &c, vector, &mut buf[..n], chunk);
        }
    }
}

/// Pass 1 of a block: encrypts rows `base .. base + n` once into `buf`; left-packs
/// (branch-free) the lanes that must walk on, with their positions, into `walk` and
/// `pos`. Returns how many.
///
/// # Safety
/// `n <= BLOCK`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn encrypt_block(
    c: &Consts,
    base: u32,
    n: usize,
    buf: &mut [u32; BLOCK],
    walk: &mut [u32; BLOCK + 8],
    pos: &mut [u32; BLOCK + 8],
) -> usize {
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut m = 0usize;
    for v in 0..n.div_ceil(8) {
        let x = _mm256_add_epi32(
            _mm256_set1_epi32(base.wrapping_add((v * 8) as u32) as i32),
            lane,
        );
        let y = encrypt(x, c);
        let bits = out_of_range(y, c) as usize;
        let p = _mm256_add_epi32(_mm256_set1_epi32((v * 8) as i32), lane);
        // SAFETY: buf has BLOCK (a multiple of 8) slots and v * 8 + 8 <= BLOCK (n <=
        // BLOCK); walk/pos have BLOCK + 8 slots and m <= v * 8.
        unsafe {
            _mm256_storeu_si256(buf.as_mut_ptr().add(v * 8).cast(), y);
            m += append(walk, pos, m, bits, y, p);
        }
    }
    // Rows of the last, partial vector beyond `n` must not walk.
    while m > 0 && pos[m - 1] as usize >= n {
        m -= 1;
    }
    m
}

/// Pass 2 of a block: walks the `m` packed values until all lie in [0, D), 8 at a time; each pass
/// scatters its results back into `buf` and re-packs those still outside.
///
/// # Safety
/// `m <= BLOCK`, and the first `m` positions are rows of `buf` (as
/// [`encrypt_block`] leaves them).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn walk_block(
    c: &Consts,
    mut m: usize,
    buf: &mut [u32; BLOCK],
    walk: &mut [u32; BLOCK + 8],
    pos: &mut [u32; BLOCK + 8],
) {
    while m > 0 {
        let mut k = 0usize;
        for s in (0..m).step_by(8) {
            // SAFETY: walk/pos have BLOCK + 8 slots, s < m <= BLOCK, and k <= s; the
            // positions are rows of buf (the caller's contract).
            unsafe {
                let y = encrypt(_mm256_loadu_si256(walk.as_ptr().add(s).cast()), c);
                let p = _mm256_loadu_si256(pos.as_ptr().add(s).cast());
                _mm256_storeu_si256(walk.as_mut_ptr().add(s).cast(), y);
                let live = if m - s >= 8 {
                    0xFF
                } else {
                    (1usize << (m - s)) - 1
                };
                let bits = out_of_range(y, c) as usize & live;
                for lane in 0..(m - s).min(8) {
                    *buf.get_unchecked_mut(*pos.get_unchecked(s + lane) as usize) =
                        *walk.get_unchecked(s + lane);
                }
                k += append(walk, pos, k, bits, y, p);
            }
        }
        m = k;
    }
}

/// Pass 3 of a block: the columns (vectorised modulus) of the rows in `buf`, then
/// gather and scale into `chunk`. Scalar loads keep more cache misses in flight than
/// vpgatherdd does.
///
/// # Safety
/// `buf.len() == chunk.len()`, and every value of `buf` lies in `[0, D)` (so its
/// column is below `d == vector.len()`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn gather_block(
    ctx: &Ctx32,
    c: &Consts,
    vector: &[f32],
    buf: &mut [u32],
    chunk: &mut [f32],
) {
    let n = chunk.len();
    let full = n / 8;
    let vec_ptr = vector.as_ptr();
    for v in 0..full {
        // SAFETY: v * 8 + 8 <= n == buf.len().
        let p = unsafe { buf.as_mut_ptr().add(v * 8).cast::<__m256i>() };
        let y = unsafe { _mm256_loadu_si256(p) };
        let j = column(y, c);
        unsafe { _mm256_storeu_si256(p, j) };
    }
    for (o, &j) in chunk[..full * 8].iter_mut().zip(&buf[..full * 8]) {
        let s = if j < ctx.rem { ctx.hi } else { ctx.lo };
        // SAFETY: every j < d == vector.len().
        *o = unsafe { *vec_ptr.add(j as usize) } * s;
    }
    let tail = full * 8;
    super::write_block(ctx, vector, &buf[tail..n], &mut chunk[tail..]);
}
