//! The gather kernel behind `reconstruct`: `out[t] = vector[idx(start + t)] * scale`.
//!
//! For domains of at most 32 bits (every `D <= 2^32`) the Feistel network runs on
//! `u32` lanes in blocks: one branch-free pass encrypts a whole block (the compiler
//! vectorises it; an AVX2 build is selected at run time where the CPU has it), then the
//! few values that cycle-walk are compacted and re-encrypted, again branch-free, until
//! all lie in `[0, D)`. No index array larger than one block ever exists.

use crate::projection::{Projection, ROUNDS, low_mask, mix32};

/// Rows handled per block (the block's scratch lives on the stack).
const BLOCK: usize = 2048;

/// The 32-bit view of a projection whose Feistel domain fits in `u32`.
#[derive(Clone, Copy)]
struct Feistel32 {
    keys: [u32; ROUNDS],
    wl: u32,
    wr: u32,
    /// `D - 1`: values above it walk again.
    last: u32,
}

impl Feistel32 {
    #[inline(always)]
    fn encrypt(&self, x: u32) -> u32 {
        let (mut wl, mut wr) = (self.wl, self.wr);
        let mut l = x >> wr;
        let mut r = x & low_mask(wr);
        for &key in &self.keys {
            let f = mix32(r ^ key) & low_mask(wl);
            let new_r = l ^ f;
            l = r;
            r = new_r;
            std::mem::swap(&mut wl, &mut wr);
        }
        (l << wr) | r
    }
}

/// `y mod d` for `y < 2^32`, `1 <= d <= 2^32`, without a division instruction.
#[derive(Clone, Copy)]
enum Modulus {
    /// `d` is a power of two: `y & mask`.
    Mask(u32),
    /// Lemire's fastmod: `((m * y mod 2^64) * d) >> 64` with `m = ceil(2^64 / d)`.
    Magic { m: u64, d: u64 },
}

impl Modulus {
    fn new(d: u64) -> Self {
        if d.is_power_of_two() {
            Modulus::Mask((d - 1) as u32)
        } else {
            Modulus::Magic { m: (u64::MAX / d).wrapping_add(1), d }
        }
    }
}

/// Fills `out` with rows `start ..` of the reconstruction.
pub(crate) fn gather(p: &Projection, vector: &[f32], start: u64, out: &mut [f32]) {
    if p.domain_bits() <= 32 {
        let (wl, wr) = p.widths();
        let f = Feistel32 { keys: p.round_keys(), wl, wr, last: (p.total() - 1) as u32 };
        let (_, rem, hi, lo) = p.balance();
        let ctx = Ctx32 { f, modulus: Modulus::new(p.d()), rem: rem as u32, hi, lo };
        gather32_dispatch(&ctx, vector, start as u32, out);
    } else {
        for (t, o) in out.iter_mut().enumerate() {
            let j = p.index(start + t as u64);
            *o = vector[j as usize] * p.column_scale(j);
        }
    }
}

#[derive(Clone, Copy)]
struct Ctx32 {
    f: Feistel32,
    modulus: Modulus,
    rem: u32,
    hi: f32,
    lo: f32,
}

fn gather32_dispatch(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), which is the only
            // requirement of `gather32_avx2`'s target feature.
            unsafe { gather32_avx2(ctx, vector, start, out) };
            return;
        }
    }
    gather32(ctx, vector, start, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gather32_avx2(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
    gather32(ctx, vector, start, out);
}

#[inline(always)]
fn gather32(ctx: &Ctx32, vector: &[f32], start: u32, out: &mut [f32]) {
    let f = ctx.f;
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
            m += usize::from(y > f.last);
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
                k += usize::from(y > f.last);
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
        Modulus::Magic { m, d } => {
            for (o, &y) in out.iter_mut().zip(ys) {
                let low = m.wrapping_mul(u64::from(y));
                let j = ((u128::from(low) * u128::from(d)) >> 64) as u32;
                let s = if j < ctx.rem { ctx.hi } else { ctx.lo };
                *o = vector[j as usize] * s;
            }
        }
    }
}
