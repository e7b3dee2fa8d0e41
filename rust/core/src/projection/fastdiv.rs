//! Division of 32-bit values by a run-time constant without a division instruction.
//!
//! For `1 <= d < 2^32`, with `l = ceil(log2 d)`:
//!
//! ```text
//! m   = floor(2^32 (2^l - d) / d) + 1          (fits in u32)
//! q   = mulhi32(x, m)
//! x/d = (q + ((x - q) >> min(l, 1))) >> max(l - 1, 0)      for every x < 2^32
//! ```
//!
//! (Granlund and Montgomery, "Division by invariant integers using multiplication",
//! 1994, figure 4.1.) The CPU kernel uses it for `idx = perm(i) mod d`; the GPU kernels
//! receive the same three numbers.

/// Multiply-high division by a fixed `d` (`1 <= d < 2^32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DivMagic {
    /// `m`, the multiplier.
    pub magic: u32,
    /// First shift, `min(l, 1)`.
    pub shift1: u32,
    /// Second shift, `max(l - 1, 0)`.
    pub shift2: u32,
}

impl DivMagic {
    /// The constants for division by `d`.
    ///
    /// # Panics
    /// When `d == 0`.
    pub fn new(d: u32) -> Self {
        assert!(d >= 1, "division by zero");
        let l = 32 - (d - 1).leading_zeros();
        let m = ((1u128 << 32) * ((1u128 << l) - u128::from(d))) / u128::from(d) + 1;
        Self {
            magic: u32::try_from(m).expect("the multiplier fits in 32 bits"),
            shift1: l.min(1),
            shift2: l.saturating_sub(1),
        }
    }

    /// `floor(x / d)`.
    #[inline(always)]
    pub fn quotient(self, x: u32) -> u32 {
        let q = ((u64::from(self.magic) * u64::from(x)) >> 32) as u32;
        (q + ((x - q) >> self.shift1)) >> self.shift2
    }
}

#[cfg(test)]
mod tests {
    use super::DivMagic;

    #[test]
    fn matches_division() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || crate::projection::feistel::splitmix64(&mut state);
        let mut divisors: Vec<u32> = vec![
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            1 << 17,
            10_000,
            23_040,
            1_000_003,
            (1 << 31) - 1,
            1 << 31,
            (1 << 31) + 1,
            u32::MAX - 1,
            u32::MAX,
        ];
        divisors.extend((0..200).map(|_| (next() as u32).max(1)));
        divisors.extend((0..100).map(|_| (next() as u32 >> (next() % 32)).max(1)));
        for d in divisors {
            let m = DivMagic::new(d);
            let edges = [
                0u32,
                1,
                d - 1,
                d,
                d.wrapping_add(1),
                u32::MAX,
                u32::MAX - 1,
                u32::MAX / d * d,
                (u32::MAX / d * d).wrapping_sub(1),
            ];
            for x in edges.into_iter().chain((0..2000).map(|_| next() as u32)) {
                assert_eq!(m.quotient(x), x / d, "x = {x}, d = {d}");
            }
        }
        // Exhaustive over a sparse grid of all numerators for a few divisors.
        for d in [7u32, 641, 0x8000_0001] {
            let m = DivMagic::new(d);
            for x in (0..=u32::MAX).step_by(97) {
                assert_eq!(m.quotient(x), x / d);
            }
        }
    }
}
