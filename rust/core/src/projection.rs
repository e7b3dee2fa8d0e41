//! The Uni-LoRA projection generator, spec v1 (see `docs/SPEC.md`).
//!
//! Row `i` of the projection `P` (shape `D x d`) has a single non-zero at column
//! `idx(i) = perm(i) mod d` with value `1 / sqrt(n_idx(i))`, where `perm` is a keyed
//! bijection of `[0, D)` (a 4-round alternating Feistel network on `k` bits with
//! cycle-walking) and `n_j` is the number of rows that use column `j`. Because `perm`
//! is a bijection, column `j` is used by exactly the rows whose image is congruent to
//! `j` mod `d`: `n_j = floor(D / d) + [j < D mod d]`, so the map is exactly balanced and
//! `P^T P = I`.
//!
//! Everything is integer arithmetic with defined wrap-around; the only floating-point
//! operation is `1 / sqrt(n)` in IEEE-754 binary64 rounded once to binary32, which is
//! correctly rounded on every conforming platform.

use crate::error::{CoreError, Result};

/// Version of the generator specification implemented here.
pub const SPEC_VERSION: u32 = 1;

/// Number of Feistel rounds (even, so the half widths return to their start).
pub const ROUNDS: usize = 4;

/// The splitmix64 step: advances `state` and returns the next output.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 32-bit mixing function used as Feistel round function (before masking).
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x21F0_AAAD);
    x ^= x >> 15;
    x = x.wrapping_mul(0xD35A_2D97);
    x ^= x >> 15;
    x
}

/// The scale `1 / sqrt(n)` of a column used by `n` rows, as float32.
#[inline]
pub fn scale_for_count(n: u64) -> f32 {
    (1.0f64 / (n as f64).sqrt()) as f32
}

/// A seeded projection of `total` rows onto `d` columns.
///
/// Construction is O(1); every query is O(1) expected (cycle-walking takes at most
/// `2^k / D < 2` Feistel evaluations on average, `k` being the bit width of `D - 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Projection {
    seed: u64,
    total: u64,
    d: u64,
    keys: [u32; ROUNDS],
    /// Width in bits of the high half at the start (and end) of the network.
    wl: u32,
    /// Width in bits of the low half at the start (and end) of the network.
    wr: u32,
    q: u64,
    rem: u64,
    scale_hi: f32,
    scale_lo: f32,
}

impl Projection {
    /// Builds the projection for `seed`, `total` rows (`D`) and `d` columns.
    ///
    /// Errors when `d == 0`, `total == 0`, `d > total` or `d > 2^32`.
    pub fn new(seed: u64, total: u64, d: u64) -> Result<Self> {
        if d == 0 {
            return Err(CoreError::InvalidArgument(
                "d (the trainable vector length) must be at least 1, got 0".into(),
            ));
        }
        if total == 0 {
            return Err(CoreError::InvalidArgument(
                "the total size D of all reconstructed matrices must be at least 1, got 0".into(),
            ));
        }
        if d > total {
            return Err(CoreError::InvalidArgument(format!(
                "d = {d} is larger than the total size D = {total} of the reconstructed \
                 matrices; d must satisfy 1 <= d <= D"
            )));
        }
        if d > u64::from(u32::MAX) + 1 {
            return Err(CoreError::InvalidArgument(format!(
                "d = {d} exceeds the spec v1 limit of 2^32 columns"
            )));
        }
        let mut state = seed;
        let mut keys = [0u32; ROUNDS];
        for key in &mut keys {
            *key = (splitmix64(&mut state) >> 32) as u32;
        }
        let bits = (64 - (total - 1).leading_zeros()).max(2);
        let wl = bits / 2;
        let wr = bits - wl;
        let q = total / d;
        let rem = total % d;
        Ok(Self {
            seed,
            total,
            d,
            keys,
            wl,
            wr,
            q,
            rem,
            scale_hi: scale_for_count(q + 1),
            scale_lo: scale_for_count(q),
        })
    }

    /// The seed this projection was built from.
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

    /// The Feistel round keys derived from the seed.
    pub fn round_keys(&self) -> [u32; ROUNDS] {
        self.keys
    }

    /// Bit width `k` of the Feistel domain `[0, 2^k)`.
    pub fn domain_bits(&self) -> u32 {
        self.wl + self.wr
    }

    /// One pass of the Feistel network on the `k`-bit domain (a bijection of `[0, 2^k)`).
    #[inline(always)]
    fn encrypt(&self, x: u64) -> u64 {
        let (mut wl, mut wr) = (self.wl, self.wr);
        let mut l = (x >> wr) as u32;
        let mut r = (x & ((1u64 << wr) - 1)) as u32;
        for &key in &self.keys {
            let f = mix32(r ^ key) & low_mask(wl);
            let new_r = l ^ f;
            l = r;
            r = new_r;
            std::mem::swap(&mut wl, &mut wr);
        }
        (u64::from(l) << wr) | u64::from(r)
    }

    /// Inverse of [`Self::encrypt`].
    #[inline(always)]
    fn decrypt(&self, y: u64) -> u64 {
        // After an even number of rounds the widths are back to (wl, wr).
        let (mut wl, mut wr) = (self.wl, self.wr);
        let mut l = (y >> wr) as u32;
        let mut r = (y & ((1u64 << wr) - 1)) as u32;
        for &key in self.keys.iter().rev() {
            // Undo: (l, r) = (r_prev, l_prev ^ F(r_prev)); widths swapped back.
            std::mem::swap(&mut wl, &mut wr);
            let prev_r = l;
            let prev_l = r ^ (mix32(prev_r ^ key) & low_mask(wl));
            l = prev_l;
            r = prev_r;
        }
        (u64::from(l) << wr) | u64::from(r)
    }

    /// The keyed bijection `perm` of `[0, D)` (cycle-walking over the Feistel network).
    ///
    /// # Panics
    /// In debug builds, when `i >= D`.
    #[inline]
    pub fn permute(&self, i: u64) -> u64 {
        debug_assert!(i < self.total);
        let mut x = self.encrypt(i);
        while x >= self.total {
            x = self.encrypt(x);
        }
        x
    }

    /// The inverse bijection: `inverse_permute(permute(i)) == i`.
    #[inline]
    pub fn inverse_permute(&self, y: u64) -> u64 {
        debug_assert!(y < self.total);
        let mut x = self.decrypt(y);
        while x >= self.total {
            x = self.decrypt(x);
        }
        x
    }

    /// Column of row `i`: `perm(i) mod d`.
    #[inline]
    pub fn index(&self, i: u64) -> u64 {
        self.permute(i) % self.d
    }

    /// Number of rows that use column `j`: `floor(D/d) + [j < D mod d]`.
    #[inline]
    pub fn column_count(&self, j: u64) -> u64 {
        self.q + u64::from(j < self.rem)
    }

    /// Scale of column `j`: `1 / sqrt(column_count(j))` as float32.
    #[inline]
    pub fn column_scale(&self, j: u64) -> f32 {
        if j < self.rem {
            self.scale_hi
        } else {
            self.scale_lo
        }
    }

    /// Scale of row `i`.
    #[inline]
    pub fn scale(&self, i: u64) -> f32 {
        self.column_scale(self.index(i))
    }

    /// The rows that use column `j`, in increasing order of their image `perm(row)`
    /// (`j, j + d, j + 2d, ...`). Yields exactly `column_count(j)` rows.
    pub fn rows_of_column(&self, j: u64) -> impl Iterator<Item = u64> + '_ {
        debug_assert!(j < self.d);
        (0..self.column_count(j)).map(move |t| self.inverse_permute(j + t * self.d))
    }

    /// Fills `idx` and `scale` with rows `start .. start + idx.len()` of the map.
    ///
    /// Errors when the range leaves `[0, D)` or the two slices differ in length.
    pub fn fill(&self, start: u64, idx: &mut [u64], scale: &mut [f32]) -> Result<()> {
        if idx.len() != scale.len() {
            return Err(CoreError::InvalidArgument(format!(
                "idx and scale buffers differ in length ({} != {})",
                idx.len(),
                scale.len()
            )));
        }
        self.check_range(start, idx.len())?;
        for (t, (o, s)) in idx.iter_mut().zip(scale.iter_mut()).enumerate() {
            let j = self.index(start + t as u64);
            *o = j;
            *s = self.column_scale(j);
        }
        Ok(())
    }

    pub(crate) fn check_range(&self, start: u64, len: usize) -> Result<()> {
        match start.checked_add(len as u64) {
            Some(end) if end <= self.total => Ok(()),
            _ => Err(CoreError::InvalidArgument(format!(
                "rows {start}..{} are outside the projection's {} rows",
                start as u128 + len as u128,
                self.total
            ))),
        }
    }

    /// Gathers `out[t] = vector[idx(start + t)] * scale(start + t)`.
    ///
    /// `vector` must have length `d` (checked by the caller's public entry points;
    /// a debug assertion here).
    pub(crate) fn gather_into(&self, vector: &[f32], start: u64, out: &mut [f32]) {
        debug_assert_eq!(vector.len() as u64, self.d);
        crate::kernel::gather(self, vector, start, out);
    }

    /// Half widths `(wl, wr)` at the start of the network.
    #[inline]
    pub(crate) fn widths(&self) -> (u32, u32) {
        (self.wl, self.wr)
    }

    /// `(q, rem, scale_hi, scale_lo)`: `D = q d + rem`, scales of the long/short columns.
    #[inline]
    pub(crate) fn balance(&self) -> (u64, u64, f32, f32) {
        (self.q, self.rem, self.scale_hi, self.scale_lo)
    }
}

/// `2^w - 1` for `w <= 32`.
#[inline(always)]
pub(crate) fn low_mask(w: u32) -> u32 {
    ((1u64 << w) - 1) as u32
}

pub use crate::kernel::KernelImpl;

/// Runs one implementation of the gather kernel directly on rows `start ..` (for
/// tests and benchmarks of the kernel alone).
///
/// # Panics
/// When `vector.len() != d` or the rows leave `[0, D)`.
#[doc(hidden)]
pub fn gather_rows(p: &Projection, vector: &[f32], start: u64, out: &mut [f32], which: KernelImpl) {
    crate::kernel::gather_with(p, vector, start, out, which);
}

impl Projection {
    /// The whole map as explicit arrays `(idx, scale)` of all `D` rows, in parallel.
    ///
    /// Errors (instead of aborting) when the arrays cannot be allocated.
    pub fn materialize(&self) -> Result<(Vec<u64>, Vec<f32>)> {
        use rayon::prelude::*;
        let mut idx: Vec<u64> = CoreError::try_zeroed(self.total, "the explicit index map")?;
        let mut scale: Vec<f32> = CoreError::try_zeroed(self.total, "the explicit scale map")?;
        const CHUNK: usize = 1 << 16;
        crate::parallel::install(|| {
            idx.par_chunks_mut(CHUNK)
                .zip(scale.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(c, (i, s))| {
                    // The range lies inside [0, D) by construction.
                    let _ = self.fill((c * CHUNK) as u64, i, s);
                });
        });
        Ok((idx, scale))
    }
}
