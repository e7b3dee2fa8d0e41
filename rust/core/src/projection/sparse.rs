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

use super::fastdiv::DivMagic;
use super::feistel::{Feistel, ROUNDS};
use super::shapes::check_dims;
use crate::error::{CoreError, Result};

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
    feistel: Feistel,
    q: u64,
    rem: u64,
    scale_hi: f32,
    scale_lo: f32,
}

/// How `D = q d + rem` splits over the columns, with the two column scales.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Balance {
    /// `floor(D / d)`: every column is used `q` or `q + 1` times.
    pub q: u64,
    /// `D mod d`: columns `j < rem` are used `q + 1` times.
    pub rem: u64,
    /// Scale `1 / sqrt(q + 1)` of the columns `j < rem`.
    pub scale_hi: f32,
    /// Scale `1 / sqrt(q)` of the other columns.
    pub scale_lo: f32,
}

impl Projection {
    /// Builds the projection for `seed`, `total` rows (`D`) and `d` columns.
    ///
    /// Errors when `d == 0`, `total == 0`, `d > total` or `d > 2^32`.
    pub fn new(seed: u64, total: u64, d: u64) -> Result<Self> {
        check_dims(total, d)?;
        let q = total / d;
        let rem = total % d;
        Ok(Self {
            seed,
            total,
            d,
            feistel: Feistel::for_rows(seed, total),
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

    /// The Feistel network of this projection.
    pub fn feistel(&self) -> &Feistel {
        &self.feistel
    }

    /// The Feistel round keys derived from the seed.
    pub fn round_keys(&self) -> [u32; ROUNDS] {
        self.feistel.keys()
    }

    /// Bit width `k` of the Feistel domain `[0, 2^k)`.
    pub fn domain_bits(&self) -> u32 {
        self.feistel.bits()
    }

    /// Half widths `(wl, wr)` at the start of the network.
    pub fn widths(&self) -> (u32, u32) {
        self.feistel.widths()
    }

    /// `D = q d + rem` and the scales of the long and short columns.
    pub fn balance(&self) -> Balance {
        Balance {
            q: self.q,
            rem: self.rem,
            scale_hi: self.scale_hi,
            scale_lo: self.scale_lo,
        }
    }

    /// The multiply-high division by `d` for 32-bit kernels, when both the Feistel
    /// domain (`k <= 32`) and `d` (`< 2^32`) fit in 32 bits; `None` otherwise.
    pub fn narrow_divisor(&self) -> Option<DivMagic> {
        (self.domain_bits() <= 32 && self.d < 1 << 32).then(|| DivMagic::new(self.d as u32))
    }

    /// The keyed bijection `perm` of `[0, D)` (cycle-walking over the Feistel network).
    ///
    /// # Panics
    /// In debug builds, when `i >= D`.
    #[inline]
    pub fn permute(&self, i: u64) -> u64 {
        debug_assert!(i < self.total);
        self.feistel.walk(i, self.total - 1)
    }

    /// The inverse bijection: `inverse_permute(permute(i)) == i`.
    #[inline]
    pub fn inverse_permute(&self, y: u64) -> u64 {
        debug_assert!(y < self.total);
        self.feistel.walk_back(y, self.total - 1)
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
