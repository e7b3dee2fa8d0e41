//! AVX-512 version of the 32-bit kernel: 16 rows per vector, in three passes over a
//! block of rows.
//!
//! 1. Encrypt every row once and store its column `y mod d`; the lanes that must
//!    cycle-walk (`y >= D`) are compressed into a side list with their positions.
//! 2. Walk the side list 16 at a time; finished lanes scatter their column to their
//!    position, the rest are compressed again.
//! 3. Gather `vector[j]`, scale and store, 16 at a time (independent loads keep many
//!    cache misses in flight).
//!
//! Unsigned compares, compress, scatter and masked gathers/stores are native here, so
//! there is no permutation table and no scalar loop per lane.

use std::arch::x86_64::*;

use super::{BLOCK, Ctx32, Modulus};
use crate::projection::feistel::low_mask;

struct Consts {
    /// `K[r] ^ (K[r] >> 16)`: the key folded into the first xor-shift of `mix32`.
    keys: [__m512i; 4],
    wr: __m128i,
    mask_l: __m512i,
    mask_r: __m512i,
    last: __m512i,
    c1: __m512i,
    c2: __m512i,
    /// `Some(d - 1)` for a power-of-two `d`.
    mask_d: Option<__m512i>,
    magic: __m512i,
    shift2: __m128i,
    d: __m512i,
    rem: __m512i,
    hi: __m512,
    lo: __m512,
}

impl Consts {
    #[target_feature(enable = "avx512f")]
    fn new(ctx: &Ctx32) -> Self {
        let (wl, wr) = ctx.f.widths();
        let (mask_d, magic, shift2, d) = match ctx.modulus {
            Modulus::Mask(m) => (Some(_mm512_set1_epi32(m as i32)), 0, 0, 0),
            Modulus::Magic { div, d } => (None, div.magic, div.shift2, d),
        };
        Self {
            keys: ctx
                .f
                .keys()
                .map(|k| _mm512_set1_epi32((k ^ (k >> 16)) as i32)),
            wr: _mm_cvtsi32_si128(wr as i32),
            mask_l: _mm512_set1_epi32(low_mask(wl) as i32),
            mask_r: _mm512_set1_epi32(low_mask(wr) as i32),
            last: _mm512_set1_epi32(ctx.last as i32),
            c1: _mm512_set1_epi32(0x21F0_AAADu32 as i32),
            c2: _mm512_set1_epi32(0xD35A_2D97u32 as i32),
            mask_d,
            magic: _mm512_set1_epi32(magic as i32),
            shift2: _mm_cvtsi32_si128(shift2 as i32),
            d: _mm512_set1_epi32(d as i32),
            rem: _mm512_set1_epi32(ctx.rem as i32),
            hi: _mm512_set1_ps(ctx.hi),
            lo: _mm512_set1_ps(ctx.lo),
        }
    }
}

/// Sixteen Feistel encryptions; the widths alternate wl, wr, wl, wr.
///
/// Each round computes `l ^ (mix32(r ^ K) & mask)` with two ternary-logic operations:
/// `(r ^ K) ^ ((r ^ K) >> 16) = r ^ (r >> 16) ^ (K ^ (K >> 16))`, and the final
/// `l ^ (f & mask)`.
#[inline]
#[target_feature(enable = "avx512f")]
fn encrypt(x: __m512i, c: &Consts) -> __m512i {
    let mut l = _mm512_srl_epi32(x, c.wr);
    let mut r = _mm512_and_si512(x, c.mask_r);
    for (round, key) in c.keys.iter().enumerate() {
        let mask = if round % 2 == 0 { c.mask_l } else { c.mask_r };
        // 0x96: a ^ b ^ c; 0x78: a ^ (b & c).
        let f = _mm512_ternarylogic_epi32(r, _mm512_srli_epi32(r, 16), *key, 0x96);
        let f = _mm512_mullo_epi32(f, c.c1);
        let f = _mm512_xor_si512(f, _mm512_srli_epi32(f, 15));
        let f = _mm512_mullo_epi32(f, c.c2);
        let f = _mm512_xor_si512(f, _mm512_srli_epi32(f, 15));
        let new_r = _mm512_ternarylogic_epi32(l, f, mask, 0x78);
        l = r;
        r = new_r;
    }
    _mm512_or_si512(_mm512_sll_epi32(l, c.wr), r)
}

/// `y mod d` for 16 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn column(y: __m512i, c: &Consts) -> __m512i {
    match c.mask_d {
        Some(m) => _mm512_and_si512(y, m),
        None => {
            // Multiply-high division (first shift 1: d is not a power of two).
            let even = _mm512_srli_epi64(_mm512_mul_epu32(y, c.magic), 32);
            let odd = _mm512_mul_epu32(_mm512_srli_epi64(y, 32), c.magic);
            let q = _mm512_mask_blend_epi32(0xAAAA, even, odd);
            let t = _mm512_add_epi32(_mm512_srli_epi32(_mm512_sub_epi32(y, q), 1), q);
            let q = _mm512_srl_epi32(t, c.shift2);
            _mm512_sub_epi32(y, _mm512_mullo_epi32(q, c.d))
        }
    }
}

/// Lanes `0 .. min(count, 16)`.
#[inline]
fn live_mask(count: usize) -> __mmask16 {
    if count >= 16 {
        0xFFFF
    } else {
        (1u16 << count) - 1
    }
}

/// Appends the lanes of `keep` of `y` (values) and `p` (positions) to `walk` and `pos`
/// at index `at`, in lane order; returns how many.
///
/// # Safety
/// `walk` and `pos` have at least `at + 16` slots.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn append(
    walk: &mut [u32],
    pos: &mut [u32],
    at: usize,
    keep: __mmask16,
    y: __m512i,
    p: __m512i,
) -> usize {
    debug_assert!(at + 16 <= walk.len().min(pos.len()));
    // SAFETY: both lists have `at + 16` slots (the caller's contract).
    unsafe {
        let values = _mm512_maskz_compress_epi32(keep, y);
        _mm512_storeu_si512(walk.as_mut_ptr().add(at).cast(), values);
        _mm512_storeu_si512(
            pos.as_mut_ptr().add(at).cast(),
            _mm512_maskz_compress_epi32(keep, p),
        );
    }
    keep.count_ones() as usize
}

/// # Safety
/// The CPU must support AVX-512F, and `ctx.d < 2^30` (indices are used as signed
/// 32-bit gather offsets). `vector.len() == d` and `start + out.len() <= D` are
/// asserted by the caller.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn gather(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
    let c = Consts::new(ctx);
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut cols = [0u32; BLOCK];
    let mut walk = [0u32; BLOCK + 16];
    let mut pos = [0u32; BLOCK + 16];
    let vec_ptr = vector.as_ptr();
    for (b, chunk) in out.chunks_mut(BLOCK).enumerate() {
        let base = start.wrapping_add((b * BLOCK) as u32);
        let n = chunk.len();
        // 1. Encrypt every row once; the columns of the lanes inside [0, D) go to
        //    `cols`, the other values are compressed into `walk` with their positions.
        let mut m = 0usize;
        for v in 0..n.div_ceil(16) {
            let live = live_mask(n - v * 16);
            let offset = _mm512_add_epi32(_mm512_set1_epi32((v * 16) as i32), lane);
            let x = _mm512_add_epi32(_mm512_set1_epi32(base as i32), offset);
            let y = encrypt(x, &c);
            let outside = _mm512_cmpgt_epu32_mask(y, c.last) & live;
            // SAFETY: cols has BLOCK (a multiple of 16) slots and v * 16 + 16 <= BLOCK;
            // walk and pos have BLOCK + 16 slots and m <= v * 16.
            unsafe {
                _mm512_storeu_si512(cols.as_mut_ptr().add(v * 16).cast(), column(y, &c));
                m += append(&mut walk, &mut pos, m, outside, y, offset);
            }
        }
        // 2. Walk the compressed values 16 at a time until every one lies in [0, D);
        //    finished lanes write their column through their position.
        while m > 0 {
            let mut k = 0usize;
            for s in (0..m).step_by(16) {
                let live = live_mask(m - s);
                // SAFETY: walk/pos have BLOCK + 16 slots, s < m <= BLOCK and k <= s; the
                // positions are rows < n <= BLOCK.
                unsafe {
                    let y = encrypt(_mm512_loadu_si512(walk.as_ptr().add(s).cast()), &c);
                    let p = _mm512_loadu_si512(pos.as_ptr().add(s).cast());
                    let outside = _mm512_cmpgt_epu32_mask(y, c.last) & live;
                    let inside = live & !outside;
                    _mm512_mask_i32scatter_epi32(
                        cols.as_mut_ptr().cast(),
                        inside,
                        p,
                        column(y, &c),
                        4,
                    );
                    k += append(&mut walk, &mut pos, k, outside, y, p);
                }
            }
            m = k;
        }
        // 3. Gather and scale, 16 lanes at a time.
        let out_ptr = chunk.as_mut_ptr();
        for v in 0..n.div_ceil(16) {
            let live = live_mask(n - v * 16);
            // SAFETY: cols has BLOCK slots (v * 16 + 16 <= BLOCK); every j < d < 2^30 and
            // vector has d floats; the stored lanes are rows < n of `chunk`.
            unsafe {
                let j = _mm512_loadu_si512(cols.as_ptr().add(v * 16).cast());
                let scale = _mm512_mask_blend_ps(_mm512_cmplt_epu32_mask(j, c.rem), c.lo, c.hi);
                let g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, j, vec_ptr, 4);
                let dst = out_ptr.add(v * 16);
                if ctx.stream && live == 0xFFFF && (dst as usize).is_multiple_of(64) {
                    _mm512_stream_ps(dst, _mm512_mul_ps(g, scale));
                } else {
                    _mm512_mask_storeu_ps(dst, live, _mm512_mul_ps(g, scale));
                }
            }
        }
    }
    // Streaming stores are weakly ordered: make them visible before returning.
    _mm_sfence();
}
