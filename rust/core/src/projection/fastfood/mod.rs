//! The Fastfood projection (docs/SPEC.md section 4, spec v2): the paper's dense
//! alternative to the sparse map.
//!
//! `theta_d` is zero-padded to `n` (a power of two, at least 4 and at least `d`), and
//! `theta_D` is made of `ceil(D / n)` blocks, block `b` being
//! `c_b * H G_b Π_b H B_b x`: `B_b` a ±1 diagonal, `H` the unnormalised Walsh–Hadamard
//! transform, `Π_b` a permutation (the Feistel network of spec v1 on `log2 n` bits),
//! `G_b` a diagonal of approximately Gaussian values (the sum of twelve 16-bit
//! uniforms, exact in float32) and `c_b = 1 / sqrt(n * sum(G_b^2) * blocks)`, so that
//! the whole map is close to an isometry. The blocks are concatenated and cut to `D`.
//!
//! Every key comes from one splitmix64 stream of the seed, 11 words per block, so any
//! block is built in O(n) from the seed alone: no memory grows with `D`, and the time
//! is O(D log n). Float32 arithmetic follows a fixed order (the butterflies stage by
//! stage, one multiplication per diagonal), so results do not depend on threads or
//! SIMD width, and the torch implementation gives the same bits. The backward pass is
//! the exact adjoint `P^T`, summed over blocks in increasing order.

mod block;
mod fwht;

pub use fwht::fwht;

use rayon::prelude::*;

use super::feistel::{Feistel, ROUNDS, mix32, splitmix64};
use super::shapes::{check_dims, check_vector, cut_pieces};
use crate::error::{CoreError, Result};
use crate::parallel;
use block::{Scratch, backward_block, forward_block, gaussians};

/// XORed into the seed to start the key stream (`"fastfood"` in ASCII).
pub const STREAM_TAG: u64 = 0x6661_7374_666F_6F64;
/// Words of the key stream per block: 4 round keys, the sign key, 6 Gaussian keys.
pub const WORDS_PER_BLOCK: usize = ROUNDS + 1 + GAUSS_KEYS;
/// Keys of the Gaussian diagonal per block (two 16-bit uniforms from each).
pub const GAUSS_KEYS: usize = 6;
/// The mean of the sum of twelve 16-bit uniforms, `12 * 65535 / 2`.
pub const GAUSS_MEAN: i32 = 393_210;
/// The smallest block length (the Feistel network needs two bits).
pub const MIN_BLOCK: u64 = 4;

/// Rows per parallel work item of the forward pass (whole blocks, at least one).
const ITEM_ROWS: u64 = 1 << 16;
/// Partial sums of the backward pass held at once, in floats.
const BACKWARD_BUFFER: u64 = 1 << 24;

/// The keys of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockKeys {
    /// The permutation `Π`: the Feistel network on `log2 n` bits with these round keys.
    pub perm: Feistel,
    /// Key of the sign diagonal `B`.
    pub sign: u32,
    /// Keys of the Gaussian diagonal `G`.
    pub gauss: [u32; GAUSS_KEYS],
}

impl BlockKeys {
    /// The block's 11 stream words in stream order (round keys, sign key, Gaussian keys).
    pub fn words(&self) -> [u32; WORDS_PER_BLOCK] {
        let mut out = [0u32; WORDS_PER_BLOCK];
        out[..ROUNDS].copy_from_slice(&self.perm.keys());
        out[ROUNDS] = self.sign;
        out[ROUNDS + 1..].copy_from_slice(&self.gauss);
        out
    }

    /// The sign bit of `B[i]` (`0x8000_0000` when `B[i] = -1`, else 0).
    #[inline(always)]
    pub fn sign_bit(&self, i: u32) -> u32 {
        mix32(i ^ self.sign) & 0x8000_0000
    }

    /// `65536 * G[i]`: the sum of twelve 16-bit uniforms minus their mean, an integer
    /// in `(-2^19, 2^19)`.
    #[inline(always)]
    pub fn gauss_int(&self, i: u32) -> i32 {
        let mut s = 0u32;
        for &k in &self.gauss {
            let h = mix32(i ^ k);
            s += (h & 0xFFFF) + (h >> 16);
        }
        s as i32 - GAUSS_MEAN
    }
}

/// The Fastfood projection of `total` rows onto `d` columns for one seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fastfood {
    seed: u64,
    total: u64,
    d: u64,
    bits: u32,
    blocks: u64,
}

impl Fastfood {
    /// The projection for `seed`, `total` rows (`D`) and `d` columns.
    ///
    /// Errors when `d == 0`, `total == 0`, `d > total` or `d > 2^32`.
    pub fn new(seed: u64, total: u64, d: u64) -> Result<Self> {
        check_dims(total, d)?;
        let bits = (64 - (d - 1).leading_zeros()).max(MIN_BLOCK.trailing_zeros());
        Ok(Fastfood {
            seed,
            total,
            d,
            bits,
            blocks: total.div_ceil(1 << bits),
        })
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The number of rows `D`.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The number of columns `d`.
    pub fn d(&self) -> u64 {
        self.d
    }

    /// `log2 n`.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The block length `n`.
    pub fn n(&self) -> u64 {
        1 << self.bits
    }

    /// The number of blocks, `ceil(D / n)`.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The keys of block `b`: words `11 b .. 11 b + 10` of the splitmix64 stream that
    /// starts from `seed ^ STREAM_TAG`, each the high half of an output.
    pub fn block_keys(&self, b: u64) -> BlockKeys {
        let mut state = (self.seed ^ STREAM_TAG)
            .wrapping_add((b.wrapping_mul(WORDS_PER_BLOCK as u64)).wrapping_mul(GAMMA));
        let mut words = [0u32; WORDS_PER_BLOCK];
        for w in &mut words {
            *w = (splitmix64(&mut state) >> 32) as u32;
        }
        let mut keys = [0u32; ROUNDS];
        keys.copy_from_slice(&words[..ROUNDS]);
        let mut gauss = [0u32; GAUSS_KEYS];
        gauss.copy_from_slice(&words[ROUNDS + 1..]);
        BlockKeys {
            perm: Feistel::from_keys(keys, self.bits),
            sign: words[ROUNDS],
            gauss,
        }
    }

    /// The scale `c_b` of block `b` (generates its Gaussian diagonal: O(n)).
    pub fn block_scale(&self, b: u64) -> f32 {
        let mut g = vec![0f32; self.n() as usize];
        self.scale_of(gaussians(&self.block_keys(b), &mut g))
    }

    /// Every block's key words ([`BlockKeys::words`], [`WORDS_PER_BLOCK`] per block)
    /// and scale `c_b`, in block order: what a kernel elsewhere needs. The scales cost
    /// one pass over the Gaussian diagonals (O(D), in the crate's pool).
    pub fn block_table(&self) -> Result<(Vec<u32>, Vec<f32>)> {
        let words = self.blocks.saturating_mul(WORDS_PER_BLOCK as u64);
        let mut keys: Vec<u32> = CoreError::try_zeroed(words, "the Fastfood block keys")?;
        let mut scales: Vec<f32> = CoreError::try_zeroed(self.blocks, "the Fastfood block scales")?;
        for (b, k) in keys.chunks_mut(WORDS_PER_BLOCK).enumerate() {
            k.copy_from_slice(&self.block_keys(b as u64).words());
        }
        let n = self.n() as usize;
        parallel::install(|| {
            scales.par_iter_mut().enumerate().for_each_init(
                || vec![0f32; n],
                |g, (b, c)| *c = self.scale_of(gaussians(&self.block_keys(b as u64), g)),
            );
        });
        Ok((keys, scales))
    }

    /// `c = float32(1 / sqrt(float64(nb) * (float64(q) * 2^(k - 32))))`, with `q` the
    /// sum of the squared Gaussian integers of a block (`q / 2^32 = sum G^2`).
    fn scale_of(&self, q: u128) -> f32 {
        let sum = (q as f64) / (1u64 << (32 - self.bits)) as f64;
        let w = sum * self.blocks as f64;
        (1.0 / w.sqrt()) as f32
    }

    /// Fills `outs` (consecutive pieces of `theta_D`, in order, `D` values in all) with
    /// the projection of `theta` (length `d`). Runs in the crate's pool; the result is
    /// the same for every thread count.
    pub fn reconstruct_into(&self, theta: &[f32], outs: &mut [&mut [f32]]) -> Result<()> {
        check_vector(theta, self.d)?;
        let filled: u64 = outs.iter().map(|o| o.len() as u64).sum();
        if filled != self.total {
            return Err(CoreError::InvalidArgument(format!(
                "the output buffers hold {filled} values, the projection has D = {} rows",
                self.total
            )));
        }
        let n = self.n();
        let item_rows = ITEM_ROWS.div_ceil(n) * n;
        let mut pieces = cut_pieces(outs, item_rows);
        let mut items: Vec<&mut [(u64, &mut [f32])]> = pieces
            .chunk_by_mut(|a, b| a.0 / item_rows == b.0 / item_rows)
            .collect();
        // Every block costs the same: one contiguous share of the items per thread,
        // with one set of scratch buffers each.
        let share = items.len().div_ceil(parallel::num_threads().max(1));
        parallel::install(|| {
            items.par_chunks_mut(share).for_each(|share| {
                let mut scratch = Scratch::new(n as usize);
                for item in share.iter_mut() {
                    let (first, end) = (item[0].0, item[item.len() - 1].0);
                    let end = end + item[item.len() - 1].1.len() as u64;
                    for b in first / n..end.div_ceil(n) {
                        let c = forward_block(self, b, theta, &mut scratch);
                        write_block(b * n, c, &scratch.w, item);
                    }
                }
            });
        });
        Ok(())
    }

    /// `theta_D` as one vector (length `D`).
    pub fn reconstruct(&self, theta: &[f32]) -> Result<Vec<f32>> {
        let mut out = CoreError::try_zeroed(self.total, "the reconstructed vector")?;
        self.reconstruct_into(theta, &mut [out.as_mut_slice()])?;
        Ok(out)
    }

    /// The backward pass, `P^T grad` (length `d`) for the gradient of `theta_D`
    /// (length `D`): per block `c_b * B H Π^T G H grad_b`, added over the blocks in
    /// increasing order, in float32, starting from zero.
    pub fn backward(&self, grad: &[f32]) -> Result<Vec<f32>> {
        if grad.len() as u64 != self.total {
            return Err(CoreError::InvalidArgument(format!(
                "the gradient has {} values, the projection has D = {} rows",
                grad.len(),
                self.total
            )));
        }
        let d = self.d as usize;
        let mut acc: Vec<f32> = CoreError::try_zeroed(self.d, "the gradient of theta_d")?;
        let threads = parallel::num_threads().max(1) as u64;
        let group = (BACKWARD_BUFFER / self.d)
            .clamp(1, 2 * threads)
            .min(self.blocks) as usize;
        let mut parts: Vec<f32> =
            CoreError::try_zeroed((group * d) as u64, "the partial sums of the backward pass")?;
        let n = self.n() as usize;
        // One set of scratch buffers per worker, made on first use and kept for the call.
        let mut scratches: Vec<Option<Scratch>> = (0..threads).map(|_| None).collect();
        let mut b0 = 0u64;
        while b0 < self.blocks {
            let m = (self.blocks - b0).min(group as u64) as usize;
            let share = m.div_ceil(threads as usize);
            let parts = &mut parts[..m * d];
            parallel::install(|| {
                parts
                    .par_chunks_mut(share * d)
                    .zip(scratches.par_iter_mut())
                    .enumerate()
                    .for_each(|(k, (outs, scratch))| {
                        let scratch = scratch.get_or_insert_with(|| Scratch::new(n));
                        for (t, out) in outs.chunks_mut(d).enumerate() {
                            let b = b0 + (k * share + t) as u64;
                            backward_block(self, b, grad, scratch, out);
                        }
                    });
            });
            for part in parts.chunks(d) {
                for (a, p) in acc.iter_mut().zip(part) {
                    *a += *p;
                }
            }
            b0 += m as u64;
        }
        Ok(acc)
    }
}

/// The splitmix64 increment (docs/SPEC.md section 1.1).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Writes `c * w[t]` to every row `row0 + t` of the block that the item's pieces hold.
fn write_block(row0: u64, c: f32, w: &[f32], item: &mut [(u64, &mut [f32])]) {
    let row1 = row0 + w.len() as u64;
    for (start, buf) in item.iter_mut() {
        let end = *start + buf.len() as u64;
        let (lo, hi) = ((*start).max(row0), end.min(row1));
        if lo >= hi {
            continue;
        }
        let dst = &mut buf[(lo - *start) as usize..(hi - *start) as usize];
        let src = &w[(lo - row0) as usize..(hi - row0) as usize];
        for (o, &x) in dst.iter_mut().zip(src) {
            *o = c * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_keys() {
        let f = Fastfood::new(3, 1000, 100).unwrap();
        assert_eq!((f.n(), f.blocks()), (128, 8));
        assert_eq!(Fastfood::new(0, 10, 1).unwrap().n(), 4);
        assert_eq!(Fastfood::new(0, 10, 5).unwrap().n(), 8);
        assert_eq!(Fastfood::new(0, 10, 8).unwrap().n(), 8);
        // Block keys are words 11 b .. 11 b + 10 of one stream.
        let mut state = 3 ^ STREAM_TAG;
        let stream: Vec<u32> = (0..33)
            .map(|_| (splitmix64(&mut state) >> 32) as u32)
            .collect();
        for b in 0..3 {
            assert_eq!(
                f.block_keys(b).words().to_vec(),
                stream[11 * b as usize..][..11]
            );
        }
        assert!(Fastfood::new(0, 10, 11).is_err());
        assert!(Fastfood::new(0, 0, 1).is_err());
    }
}
