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

use super::fastdiv::DivMagic;
use super::feistel::{Feistel, low_mask};
use super::sparse::Projection;

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
    /// The fastest available on this CPU (AVX-512, else AVX2, else portable).
    Auto,
    /// [`KernelImpl::Auto`] with streaming (non-temporal) stores where the kernel has
    /// them: for outputs far larger than the caches.
    Streaming,
    /// The AVX2 kernel where the CPU has AVX2, else the portable one.
    Avx2,
    /// The portable blocked kernel (no explicit SIMD).
    Portable,
    /// One row at a time through `Projection::index` (the plain reference).
    Scalar,
}

/// Fills `out` with rows `start ..` of the reconstruction:
/// `out[t] = vector[idx(start + t)] * scale(start + t)`.
/// With `stream`, large outputs bypass the caches (see [`KernelImpl::Streaming`]).
pub(crate) fn gather(p: &Projection, vector: &[f32], start: u64, out: &mut [f32], stream: bool) {
    let which = if stream {
        KernelImpl::Streaming
    } else {
        KernelImpl::Auto
    };
    gather_rows(p, vector, start, out, which);
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
        let mut ctx = Ctx32::new(p);
        if which == KernelImpl::Streaming {
            // Streaming stores need 64-byte aligned vectors: the rows before the first
            // aligned address are written the usual way.
            let head = out.as_ptr().align_offset(64).min(out.len());
            let (first, rest) = out.split_at_mut(head);
            gather32_dispatch(&ctx, vector, start as u32, first, true);
            ctx.stream = true;
            gather32_dispatch(&ctx, vector, (start + head as u64) as u32, rest, true);
            return;
        }
        match which {
            KernelImpl::Auto | KernelImpl::Streaming => {
                gather32_dispatch(&ctx, vector, start as u32, out, true)
            }
            KernelImpl::Avx2 => gather32_dispatch(&ctx, vector, start as u32, out, false),
            _ => gather32(&ctx, vector, start as u32, out),
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
    /// Write the output with streaming (non-temporal) stores where the kernel can: for
    /// outputs much larger than the caches, which are not read back soon.
    stream: bool,
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
            stream: false,
        }
    }
}

fn gather32_dispatch(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32], wide: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(unilora_avx512)]
        if wide && std::arch::is_x86_feature_detected!("avx512f") && ctx.d < (1 << 30) {
            // SAFETY: the CPU supports AVX-512F (checked just above), the only target
            // feature of `avx512::gather`; `d < 2^30` is its precondition.
            unsafe { avx512::gather(ctx, vector, start, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && ctx.d < (1 << 30) {
            // SAFETY: the CPU supports AVX2 (checked just above), the only requirement
            // of the target features of `avx2::gather`; `d < 2^30` is its precondition.
            unsafe { avx2::gather(ctx, vector, start, out) };
            return;
        }
    }
    let _ = wide;
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
mod avx2;
// Stable AVX-512 intrinsics need Rust 1.89 (newer than the crate's minimum): see build.rs.
#[cfg(all(target_arch = "x86_64", unilora_avx512))]
#[allow(clippy::incompatible_msrv)]
mod avx512;

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
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, the only requirement of the target feature.
            unsafe { accumulate32_avx2(&ctx, grad, ts, j0, acc) };
            return;
        }
        accumulate32(&ctx, grad, ts, j0, acc);
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
