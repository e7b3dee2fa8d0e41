//! The keyed Feistel network of spec v1 (docs/SPEC.md sections 1.1 to 1.4).
//!
//! One type, [`Feistel`], holds the round keys and the half widths; its rounds are
//! written once and run on any [`Word`]: `u64` for every domain (`k <= 64` bits) and
//! `u32` as the fast path for domains of at most 32 bits. The SIMD kernels in
//! `kernel.rs` take their keys and masks from this type.

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

/// `2^w - 1` for `w <= 32`.
#[inline(always)]
pub fn low_mask(w: u32) -> u32 {
    ((1u64 << w) - 1) as u32
}

/// An unsigned integer that holds a value of the Feistel domain `[0, 2^k)`.
pub trait Word: Copy + PartialOrd {
    /// `(x >> wr, x & mask(wr))`: the high and low halves (each fits in `u32`).
    fn split(self, wr: u32) -> (u32, u32);
    /// `(l << wr) | r`.
    fn join(l: u32, r: u32, wr: u32) -> Self;
}

impl Word for u32 {
    #[inline(always)]
    fn split(self, wr: u32) -> (u32, u32) {
        (self >> wr, self & low_mask(wr))
    }
    #[inline(always)]
    fn join(l: u32, r: u32, wr: u32) -> Self {
        (l << wr) | r
    }
}

impl Word for u64 {
    #[inline(always)]
    fn split(self, wr: u32) -> (u32, u32) {
        ((self >> wr) as u32, (self as u32) & low_mask(wr))
    }
    #[inline(always)]
    fn join(l: u32, r: u32, wr: u32) -> Self {
        (u64::from(l) << wr) | u64::from(r)
    }
}

/// The 4-round alternating Feistel network `E` on `k` bits, keyed from a seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feistel {
    keys: [u32; ROUNDS],
    /// Width of the high half at the start (and end) of the network.
    wl: u32,
    /// Width of the low half at the start (and end) of the network.
    wr: u32,
}

impl Feistel {
    /// The network for `seed` on a domain of `bits` bits (`2 <= bits <= 64`).
    pub fn new(seed: u64, bits: u32) -> Self {
        debug_assert!((2..=64).contains(&bits));
        let mut state = seed;
        let mut keys = [0u32; ROUNDS];
        for key in &mut keys {
            *key = (splitmix64(&mut state) >> 32) as u32;
        }
        Self::from_keys(keys, bits)
    }

    /// The network with the round keys `keys` on a domain of `bits` bits
    /// (`2 <= bits <= 64`).
    pub fn from_keys(keys: [u32; ROUNDS], bits: u32) -> Self {
        debug_assert!((2..=64).contains(&bits));
        let wl = bits / 2;
        Self {
            keys,
            wl,
            wr: bits - wl,
        }
    }

    /// The network of spec v1 for `D = total` rows: `k = max(2, bitlength(D - 1))`.
    pub fn for_rows(seed: u64, total: u64) -> Self {
        debug_assert!(total >= 1);
        Self::new(seed, (64 - (total - 1).leading_zeros()).max(2))
    }

    /// The round keys `K[0..4]`.
    pub fn keys(&self) -> [u32; ROUNDS] {
        self.keys
    }

    /// Half widths `(wl, wr)` at the start of the network.
    pub fn widths(&self) -> (u32, u32) {
        (self.wl, self.wr)
    }

    /// Bit width `k` of the domain `[0, 2^k)`.
    pub fn bits(&self) -> u32 {
        self.wl + self.wr
    }

    /// `E(x)` for `x` in `[0, 2^k)`.
    #[inline(always)]
    pub fn encrypt<W: Word>(&self, x: W) -> W {
        let (mut a, mut b) = (self.wl, self.wr);
        let (mut l, mut r) = x.split(b);
        for &key in &self.keys {
            let f = mix32(r ^ key) & low_mask(a);
            (l, r) = (r, l ^ f);
            std::mem::swap(&mut a, &mut b);
        }
        W::join(l, r, b)
    }

    /// `E^-1(y)`: undoes the rounds from the last to the first.
    #[inline(always)]
    pub fn decrypt<W: Word>(&self, y: W) -> W {
        // After an even number of rounds the widths are back to (wl, wr).
        let (mut a, mut b) = (self.wl, self.wr);
        let (mut l, mut r) = y.split(b);
        for &key in self.keys.iter().rev() {
            std::mem::swap(&mut a, &mut b);
            (l, r) = (r ^ (mix32(l ^ key) & low_mask(a)), l);
        }
        W::join(l, r, b)
    }

    /// Cycle-walking with `E`: `perm(x)` for `x <= last` (`last = D - 1`).
    #[inline(always)]
    pub fn walk<W: Word>(&self, x: W, last: W) -> W {
        let mut y = self.encrypt(x);
        while y > last {
            y = self.encrypt(y);
        }
        y
    }

    /// Cycle-walking with `E^-1`: `perm^-1(y)` for `y <= last`.
    #[inline(always)]
    pub fn walk_back<W: Word>(&self, y: W, last: W) -> W {
        let mut x = self.decrypt(y);
        while x > last {
            x = self.decrypt(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::Feistel;

    #[test]
    fn u32_and_u64_words_agree_and_invert() {
        for (seed, bits) in [(0u64, 2u32), (5, 3), (9, 17), (u64::MAX, 31), (3, 32)] {
            let f = Feistel::new(seed, bits);
            let top = (1u64 << bits) - 1;
            for x in [0u64, 1, 2, top / 3, top - 1, top] {
                let y = f.encrypt(x);
                assert_eq!(u64::from(f.encrypt(x as u32)), y);
                assert_eq!(f.decrypt(y), x);
                assert_eq!(u64::from(f.decrypt(y as u32)), x);
            }
        }
        let f = Feistel::new(11, 64);
        for x in [0u64, 1, u64::MAX, 1 << 63] {
            assert_eq!(f.decrypt(f.encrypt(x)), x);
        }
    }
}
