//! The gather kernel behind `reconstruct`: `out[t] = vector[idx(start + t)] * scale`.
//!
//! For domains of at most 32 bits (every `D <= 2^32`) the Feistel network runs on
//! `u32` lanes in blocks of 2048 rows: one pass encrypts the whole block, the values
//! that must cycle-walk are left-packed into a side list and re-encrypted until all lie
//! in `[0, D)`, then columns (`mod d` by multiply-high), scales and the gather follow.
//! An explicit AVX2 version (8 lanes, branch-free packing through a permutation table)
//! is chosen at run time where the CPU has AVX2; the portable version is the reference
//! it is tested against. No index array larger than one block ever exists, and every
//! output element is a pure function of its row, so results never depend on blocking
//! or threading.

use crate::fastdiv::DivMagic;
use crate::feistel::{Feistel, low_mask};
use crate::projection::Projection;

/// Rows handled per block (the block's scratch lives on the stack).
const BLOCK: usize = 2048;

/// `y mod d` for `y < 2^32`, `1 <= d <= 2^32`, without a division instruction.
#[derive(Clone, Copy)]
enum Modulus {
    /// `d` is a power of two: `y & mask`.
    Mask(u32),
    /// Any other `d` (`< 2^32`): `y - d * floor(y / d)` with a multiply-high division.
    Magic { div: DivMagic, d: u32 },
}

impl Modulus {
    fn new(d: u64) -> Self {
        debug_assert!((1..=1 << 32).contains(&d));
        if d.is_power_of_two() {
            Modulus::Mask((d - 1) as u32)
        } else {
            let div = DivMagic::new(d as u32);
            debug_assert_eq!(div.shift1, 1);
            Modulus::Magic { div, d: d as u32 }
        }
    }
}

/// Which implementation of the kernel to run (all give identical results).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelImpl {
    /// The fastest available on this CPU.
    Auto,
    /// The portable blocked kernel (no explicit SIMD).
    Portable,
    /// One row at a time through `Projection::index` (the plain reference).
    Scalar,
}

/// Fills `out` with rows `start ..` of the reconstruction:
/// `out[t] = vector[idx(start + t)] * scale(start + t)`.
pub(crate) fn gather(p: &Projection, vector: &[f32], start: u64, out: &mut [f32]) {
    gather_rows(p, vector, start, out, KernelImpl::Auto);
}

/// [`gather`] with an explicit choice of implementation (for tests and benchmarks of
/// the kernel alone).
///
/// # Panics
/// When `vector.len() != d` or the rows leave `[0, D)`.
#[doc(hidden)]
pub fn gather_rows(p: &Projection, vector: &[f32], start: u64, out: &mut [f32], which: KernelImpl) {
    assert_eq!(vector.len() as u64, p.d(), "vector length must equal d");
    assert!(
        start
            .checked_add(out.len() as u64)
            .is_some_and(|end| end <= p.total())
    );
    if p.domain_bits() <= 32 && which != KernelImpl::Scalar {
        let ctx = Ctx32::new(p);
        if which == KernelImpl::Auto {
            gather32_dispatch(&ctx, vector, start as u32, out);
        } else {
            gather32(&ctx, vector, start as u32, out);
        }
    } else {
        for (t, o) in out.iter_mut().enumerate() {
            let j = p.index(start + t as u64);
            *o = vector[j as usize] * p.column_scale(j);
        }
    }
}

/// A projection whose Feistel domain fits in `u32`, with its column constants.
#[derive(Clone, Copy)]
struct Ctx32 {
    f: Feistel,
    /// `D - 1`: values above it walk again.
    last: u32,
    d: u64,
    modulus: Modulus,
    rem: u32,
    hi: f32,
    lo: f32,
}

impl Ctx32 {
    fn new(p: &Projection) -> Self {
        debug_assert!(p.domain_bits() <= 32);
        let b = p.balance();
        Self {
            f: *p.feistel(),
            last: (p.total() - 1) as u32,
            d: p.d(),
            modulus: Modulus::new(p.d()),
            rem: b.rem as u32,
            hi: b.scale_hi,
            lo: b.scale_lo,
        }
    }
}

fn gather32_dispatch(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && ctx.d < (1 << 30) {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement
            // of the target features of `avx2::gather`; `d < 2^30` is its precondition.
            unsafe { avx2::gather(ctx, vector, start, out) };
            return;
        }
    }
    gather32(ctx, vector, start, out);
}

fn gather32(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
    let (f, last) = (ctx.f, ctx.last);
    let mut buf = [0u32; BLOCK];
    let mut walk = [0u32; BLOCK];
    let mut pos = [0u16; BLOCK];
    for (b, chunk) in out.chunks_mut(BLOCK).enumerate() {
        let base = start.wrapping_add((b * BLOCK) as u32);
        let n = chunk.len();
        let buf = &mut buf[..n];
        for (t, y) in buf.iter_mut().enumerate() {
            *y = f.encrypt(base.wrapping_add(t as u32));
        }
        // Compact the values that must walk again.
        let mut m = 0usize;
        for (t, &y) in buf.iter().enumerate() {
            walk[m] = y;
            pos[m] = t as u16;
            m += usize::from(y > last);
        }
        while m > 0 {
            for y in &mut walk[..m] {
                *y = f.encrypt(*y);
            }
            let mut k = 0usize;
            for s in 0..m {
                let y = walk[s];
                let t = pos[s];
                buf[t as usize] = y;
                walk[k] = y;
                pos[k] = t;
                k += usize::from(y > last);
            }
            m = k;
        }
        write_block(ctx, vector, buf, chunk);
    }
}

#[inline(always)]
fn write_block(ctx: &Ctx32, vector: &[f32], ys: &[u32], out: &mut [f32]) {
    match ctx.modulus {
        Modulus::Mask(mask) => {
            for (o, &y) in out.iter_mut().zip(ys) {
                let j = y & mask;
                let s = if j < ctx.rem { ctx.hi } else { ctx.lo };
                *o = vector[j as usize] * s;
            }
        }
        Modulus::Magic { div, d } => {
            for (o, &y) in out.iter_mut().zip(ys) {
                let j = y - d * div.quotient(y);
                let s = if j < ctx.rem { ctx.hi } else { ctx.lo };
                *o = vector[j as usize] * s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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

    struct Consts {
        keys: [__m256i; 4],
        wr: __m128i,
        mask_l: __m256i,
        mask_r: __m256i,
        bias: __m256i,
        last_b: __m256i,
        c1: __m256i,
        c2: __m256i,
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

    /// # Safety
    /// The CPU must support AVX2, and `ctx.d < 2^30` (indices are used as signed
    /// 32-bit gather offsets). `vector.len() == d` and `start + out.len() <= D` are
    /// asserted by the caller.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gather(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
        let (wl, wr) = ctx.f.widths();
        let c = Consts {
            keys: ctx.f.keys().map(|k| _mm256_set1_epi32(k as i32)),
            wr: _mm_cvtsi32_si128(wr as i32),
            mask_l: _mm256_set1_epi32(super::low_mask(wl) as i32),
            mask_r: _mm256_set1_epi32(super::low_mask(wr) as i32),
            bias: _mm256_set1_epi32(i32::MIN),
            last_b: _mm256_set1_epi32((ctx.last ^ 0x8000_0000) as i32),
            c1: _mm256_set1_epi32(0x21F0_AAADu32 as i32),
            c2: _mm256_set1_epi32(0xD35A_2D97u32 as i32),
        };
        let (mask, magic, shift, dv) = match ctx.modulus {
            Modulus::Mask(m) => (
                Some(_mm256_set1_epi32(m as i32)),
                _mm256_setzero_si256(),
                _mm_setzero_si128(),
                0,
            ),
            Modulus::Magic { div, d } => (
                None,
                _mm256_set1_epi32(div.magic as i32),
                _mm_cvtsi32_si128(div.shift2 as i32),
                d as i32,
            ),
        };
        let dvec = _mm256_set1_epi32(dv);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);

        let mut buf = [0u32; BLOCK];
        let mut walk = [0u32; BLOCK + 8];
        let mut pos = [0u32; BLOCK + 8];
        let vec_ptr = vector.as_ptr();
        for (b, chunk) in out.chunks_mut(BLOCK).enumerate() {
            let base = start.wrapping_add((b * BLOCK) as u32);
            let n = chunk.len();
            let nv = n.div_ceil(8);
            // 1. Encrypt every row once; left-pack (branch-free) the lanes that must
            //    walk on, with their positions.
            let mut m = 0usize;
            for v in 0..nv {
                let x = _mm256_add_epi32(
                    _mm256_set1_epi32(base.wrapping_add((v * 8) as u32) as i32),
                    lane,
                );
                let y = encrypt(x, &c);
                let bits = out_of_range(y, &c) as usize;
                let perm = PACK[bits];
                let p = _mm256_add_epi32(_mm256_set1_epi32((v * 8) as i32), lane);
                // SAFETY: buf has BLOCK (a multiple of 8) slots and v * 8 + 8 <= BLOCK;
                // walk/pos have BLOCK + 8 slots and m <= v * 8.
                unsafe {
                    _mm256_storeu_si256(buf.as_mut_ptr().add(v * 8).cast(), y);
                    _mm256_storeu_si256(
                        walk.as_mut_ptr().add(m).cast(),
                        _mm256_permutevar8x32_epi32(y, perm),
                    );
                    _mm256_storeu_si256(
                        pos.as_mut_ptr().add(m).cast(),
                        _mm256_permutevar8x32_epi32(p, perm),
                    );
                }
                m += bits.count_ones() as usize;
            }
            // Rows of the last, partial vector beyond `n` must not walk.
            while m > 0 && pos[m - 1] as usize >= n {
                m -= 1;
            }
            // 2. Walk the packed values until all lie in [0, D), 8 at a time; each pass
            //    scatters its results back and re-packs those still outside.
            while m > 0 {
                let mut k = 0usize;
                for s in (0..m).step_by(8) {
                    // SAFETY: walk/pos have BLOCK + 8 slots, s < m <= BLOCK, and k <= s.
                    unsafe {
                        let y = encrypt(_mm256_loadu_si256(walk.as_ptr().add(s).cast()), &c);
                        let p = _mm256_loadu_si256(pos.as_ptr().add(s).cast());
                        _mm256_storeu_si256(walk.as_mut_ptr().add(s).cast(), y);
                        let live = if m - s >= 8 {
                            0xFF
                        } else {
                            (1usize << (m - s)) - 1
                        };
                        let bits = out_of_range(y, &c) as usize & live;
                        for lane in 0..(m - s).min(8) {
                            *buf.get_unchecked_mut(*pos.get_unchecked(s + lane) as usize) =
                                *walk.get_unchecked(s + lane);
                        }
                        let perm = PACK[bits];
                        _mm256_storeu_si256(
                            walk.as_mut_ptr().add(k).cast(),
                            _mm256_permutevar8x32_epi32(y, perm),
                        );
                        _mm256_storeu_si256(
                            pos.as_mut_ptr().add(k).cast(),
                            _mm256_permutevar8x32_epi32(p, perm),
                        );
                        k += bits.count_ones() as usize;
                    }
                }
                m = k;
            }
            // 3. Columns (vectorised modulus), then gather and scale. Scalar loads
            //    keep more cache misses in flight than vpgatherdd does.
            let full = n / 8;
            for v in 0..full {
                // SAFETY: v * 8 + 8 <= n <= BLOCK.
                let p = unsafe { buf.as_mut_ptr().add(v * 8).cast::<__m256i>() };
                let y = unsafe { _mm256_loadu_si256(p) };
                let j = match mask {
                    Some(mk) => _mm256_and_si256(y, mk),
                    None => _mm256_sub_epi32(y, _mm256_mullo_epi32(div(y, magic, shift), dvec)),
                };
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
    }
}

/// Writes `perm^-1(start + t)` for `t < out.len()` (all inside `[0, D)`), for a domain
/// of at most 32 bits: one decryption pass over the block, then the values that walk
/// on are re-decrypted until they fall inside `[0, D)`.
#[inline(always)]
fn inverse_block32(f: &Feistel, last: u32, start: u32, out: &mut [u32]) {
    for (t, y) in out.iter_mut().enumerate() {
        *y = f.decrypt(start.wrapping_add(t as u32));
    }
    for y in out.iter_mut() {
        while *y > last {
            *y = f.decrypt(*y);
        }
    }
}

/// `acc[k] += grad[perm^-1(t d + j0 + k)]` for `t` in `ts`, in increasing order, and
/// every `k < acc.len()` with `t d + j0 + k < D`: one chunk of the deterministic
/// backward of the gather for a block of columns (see `reconstruct_backward`).
pub(crate) fn accumulate_columns(
    p: &Projection,
    grad: &[f32],
    ts: std::ops::Range<u64>,
    j0: u64,
    acc: &mut [f32],
) {
    assert_eq!(grad.len() as u64, p.total(), "gradient length must equal D");
    if p.domain_bits() <= 32 {
        let ctx = Ctx32::new(p);
        accumulate32_dispatch(&ctx, grad, ts, j0, acc);
    } else {
        let (d, total) = (p.d(), p.total());
        for t in ts {
            for (k, a) in acc.iter_mut().enumerate() {
                let y = t * d + j0 + k as u64;
                if y < total {
                    *a += grad[p.inverse_permute(y) as usize];
                }
            }
        }
    }
}

fn accumulate32_dispatch(
    ctx: &Ctx32,
    grad: &[f32],
    ts: std::ops::Range<u64>,
    j0: u64,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, the only requirement of the target feature.
            unsafe { accumulate32_avx2(ctx, grad, ts, j0, acc) };
            return;
        }
    }
    accumulate32(ctx, grad, ts, j0, acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn accumulate32_avx2(
    ctx: &Ctx32,
    grad: &[f32],
    ts: std::ops::Range<u64>,
    j0: u64,
    acc: &mut [f32],
) {
    accumulate32(ctx, grad, ts, j0, acc);
}

#[inline(always)]
fn accumulate32(ctx: &Ctx32, grad: &[f32], ts: std::ops::Range<u64>, j0: u64, acc: &mut [f32]) {
    let total = u64::from(ctx.last) + 1;
    let mut rows = [0u32; BLOCK];
    for t in ts {
        let y0 = t * ctx.d + j0;
        if y0 >= total {
            break;
        }
        let len = (acc.len() as u64).min(total - y0) as usize;
        for (c, a) in acc[..len].chunks_mut(BLOCK).enumerate() {
            let rows = &mut rows[..a.len()];
            inverse_block32(&ctx.f, ctx.last, (y0 + (c * BLOCK) as u64) as u32, rows);
            for (x, &r) in a.iter_mut().zip(rows.iter()) {
                *x += grad[r as usize];
            }
        }
    }
}
