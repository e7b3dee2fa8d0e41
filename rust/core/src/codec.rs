//! Element conversions between little-endian tensor bytes and float32.
//!
//! Widening (`F16`/`BF16` to `F32`, `F32` to `F64`) is exact. Narrowing rounds once to
//! the nearest representable value, ties to even (IEEE 754 `roundTiesToEven`); NaN stays
//! NaN (quiet, sign kept) and values beyond the largest finite number become infinite.
//! `F16` conversions go through `half` (F16C instructions where the CPU has them);
//! `BF16` rounding is a branch-free integer formula that the compiler vectorises and
//! that the tests check against `half` bit for bit.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::error::{CoreError, Result};
use crate::safetensors::Dtype;

/// Elements converted per stack block for `F16`.
const BLOCK: usize = 256;

/// Rounds `x` to bfloat16 bits, to nearest, ties to even; NaN becomes a quiet NaN.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let is_nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000;
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    let quiet = (bits >> 16) | 0x0040;
    (if is_nan { quiet } else { rounded }) as u16
}

/// Rounds `v` to float32 with round-to-odd: the nearest value toward zero, with the
/// last bit set when inexact. A second rounding of the result to a format with at most
/// 22 significand bits (BF16, F16) then equals a single rounding of `v`.
#[inline]
fn f64_to_f32_round_odd(v: f64) -> f32 {
    let f = v as f32;
    if f.is_nan() || f64::from(f) == v {
        return f;
    }
    if f.is_infinite() {
        return f32::MAX.copysign(f);
    }
    let mut bits = f.to_bits();
    if f64::from(f).abs() > v.abs() {
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// Bytes per element of a float dtype this module converts.
fn float_size(dtype: Dtype) -> Result<usize> {
    match dtype {
        Dtype::F16 | Dtype::BF16 => Ok(2),
        Dtype::F32 => Ok(4),
        Dtype::F64 => Ok(8),
        other => Err(CoreError::Dtype(format!(
            "cannot convert {other}: supported floating dtypes are BF16, F16, F32, F64"
        ))),
    }
}

/// Decodes `out.len()` elements of `dtype` from `raw` into float32 (`F64` is rounded to
/// nearest even).
pub fn decode(dtype: Dtype, raw: &[u8], out: &mut [f32]) -> Result<()> {
    let size = float_size(dtype)?;
    debug_assert_eq!(raw.len(), out.len() * size);
    decode_unchecked(dtype, raw, out);
    Ok(())
}

/// [`decode`] for a dtype already known to be BF16, F16, F32 or F64 (anything else is
/// read as F64); inlined so that a caller compiled for a wider instruction set
/// vectorises it with that set.
#[inline(always)]
pub(crate) fn decode_unchecked(dtype: Dtype, raw: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
            }
        }
        Dtype::F16 => {
            let mut bits = [0u16; BLOCK];
            for (o, c) in out.chunks_mut(BLOCK).zip(raw.chunks(2 * BLOCK)) {
                let n = o.len();
                for (b, p) in bits[..n].iter_mut().zip(c.chunks_exact(2)) {
                    *b = u16::from_le_bytes([p[0], p[1]]);
                }
                bits[..n].reinterpret_cast::<f16>().convert_to_f32_slice(o);
            }
        }
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32;
            }
        }
    }
}

/// Encodes float32 `src` as `dtype` into `raw` (`src.len() * size` bytes), rounding to
/// nearest even for `F16` and `BF16`.
pub fn encode(dtype: Dtype, src: &[f32], raw: &mut [u8]) -> Result<()> {
    let size = float_size(dtype)?;
    debug_assert_eq!(raw.len(), src.len() * size);
    encode_unchecked(dtype, src, raw);
    Ok(())
}

/// [`encode`] for a dtype already known to be BF16, F16, F32 or F64 (anything else is
/// written as F64); inlined like [`decode_unchecked`].
#[inline(always)]
pub(crate) fn encode_unchecked(dtype: Dtype, src: &[f32], raw: &mut [u8]) {
    match dtype {
        Dtype::BF16 => {
            for (c, &v) in raw.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            let mut bits = [0u16; BLOCK];
            for (s, c) in src.chunks(BLOCK).zip(raw.chunks_mut(2 * BLOCK)) {
                let n = s.len();
                bits[..n]
                    .reinterpret_cast_mut::<f16>()
                    .convert_from_f32_slice(s);
                for (p, b) in c.chunks_exact_mut(2).zip(&bits[..n]) {
                    p.copy_from_slice(&b.to_le_bytes());
                }
            }
        }
        Dtype::F32 => {
            for (c, &v) in raw.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => {
            for (c, &v) in raw.chunks_exact_mut(8).zip(src) {
                c.copy_from_slice(&f64::from(v).to_le_bytes());
            }
        }
    }
}

/// Whether `raw`, elements of the float `dtype` (BF16, F16, F32 or F64; anything else
/// is read as F64), holds an Inf or a NaN: an exponent of all ones. Branch-free over
/// the whole slice, so that it vectorises.
#[inline]
pub(crate) fn any_non_finite(dtype: Dtype, raw: &[u8]) -> bool {
    fn any<const N: usize>(raw: &[u8], mask: u64, to: fn([u8; N]) -> u64) -> bool {
        raw.chunks_exact(N).fold(false, |seen, c| {
            let bits = to(c.try_into().expect("N-byte chunk"));
            seen | (bits & mask == mask)
        })
    }
    match dtype {
        Dtype::BF16 => any::<2>(raw, 0x7f80, |b| u64::from(u16::from_le_bytes(b))),
        Dtype::F16 => any::<2>(raw, 0x7c00, |b| u64::from(u16::from_le_bytes(b))),
        Dtype::F32 => any::<4>(raw, 0x7f80_0000, |b| u64::from(u32::from_le_bytes(b))),
        _ => any::<8>(raw, 0x7ff0_0000_0000_0000, u64::from_le_bytes),
    }
}

/// Converts `n` elements from `src_dtype` bytes to `dst_dtype` bytes with one rounding
/// (`F64` sources go through float32 with round-to-odd, which keeps the single
/// rounding exact). `scratch`
/// holds at least `n` floats.
pub fn cast(
    src_dtype: Dtype,
    src: &[u8],
    dst_dtype: Dtype,
    dst: &mut [u8],
    scratch: &mut [f32],
) -> Result<()> {
    let n = src.len() / float_size(src_dtype)?;
    debug_assert_eq!(dst.len(), n * float_size(dst_dtype)?);
    if src_dtype == dst_dtype {
        dst.copy_from_slice(src);
        return Ok(());
    }
    if src_dtype == Dtype::F64 {
        let scratch = &mut scratch[..n];
        for (o, c) in scratch.iter_mut().zip(src.chunks_exact(8)) {
            let v = f64::from_le_bytes(c.try_into().expect("8-byte chunk"));
            *o = if dst_dtype == Dtype::F32 {
                v as f32
            } else {
                f64_to_f32_round_odd(v)
            };
        }
        return encode(dst_dtype, scratch, dst);
    }
    let scratch = &mut scratch[..n];
    decode(src_dtype, src, scratch)?;
    encode(dst_dtype, scratch, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// An independent reference: round-to-nearest-even on the integer bits.
    fn bf16_reference(x: f32) -> u16 {
        let b = x.to_bits();
        if x.is_nan() {
            return ((b >> 16) as u16) | 0x40;
        }
        let upper = b >> 16;
        let lower = b & 0xFFFF;
        let up = lower > 0x8000 || (lower == 0x8000 && upper & 1 == 1);
        (upper + u32::from(up)) as u16
    }

    #[test]
    fn bf16_rounding_matches_half_and_reference() {
        // Every upper half with the interesting lower halves (ties, just below/above).
        let lows = [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000];
        for upper in 0u32..=0xFFFF {
            for &low in &lows {
                let x = f32::from_bits((upper << 16) | low);
                let ours = f32_to_bf16_bits(x);
                assert_eq!(
                    ours,
                    bf16::from_f32(x).to_bits(),
                    "half differs at {:#x}",
                    x.to_bits()
                );
                assert_eq!(
                    ours,
                    bf16_reference(x),
                    "reference differs at {:#x}",
                    x.to_bits()
                );
            }
        }
        // A deterministic pseudo-random sweep of the rest.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = f32::from_bits(s as u32);
            assert_eq!(f32_to_bf16_bits(x), bf16::from_f32(x).to_bits());
        }
    }

    #[test]
    fn known_rounding_values() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7F80); // overflow to +inf
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        // f16: 1 + 2^-11 ties to 1.0; 1 + 3 * 2^-11 rounds up to 1 + 2^-9.
        let mut raw = [0u8; 4];
        encode(
            Dtype::F16,
            &[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)],
            &mut raw,
        )
        .unwrap();
        assert_eq!(raw, [0x00, 0x3C, 0x02, 0x3C]);
        // 65520 is halfway between f16 max 65504 and 65536: ties to even = +inf.
        encode(Dtype::F16, &[65520.0, 65519.0], &mut raw).unwrap();
        assert_eq!(raw, [0x00, 0x7C, 0xFF, 0x7B]);
    }

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64] {
            let size = float_size(dtype).unwrap();
            let finite = [0.0, -0.0, 1.5, -3.0e4, 1e-40];
            let mut raw = vec![0u8; finite.len() * size];
            encode(dtype, &finite, &mut raw).unwrap();
            assert!(!any_non_finite(dtype, &raw), "{dtype}");
            for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                let mut raw = vec![0u8; 3 * size];
                encode(dtype, &[1.0, bad, 2.0], &mut raw).unwrap();
                assert!(any_non_finite(dtype, &raw), "{dtype} {bad}");
            }
        }
        let mut raw = [0u8; 4];
        encode(Dtype::F16, &[65504.0, 65520.0], &mut raw).unwrap(); // the latter rounds to Inf
        assert!(!any_non_finite(Dtype::F16, &raw[..2]) && any_non_finite(Dtype::F16, &raw));
    }

    #[test]
    fn f16_encode_decode_match_half() {
        let mut s = 12345u64;
        let vals: Vec<f32> = (0..10_000)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f32::from_bits((s >> 32) as u32)
            })
            .collect();
        let mut raw = vec![0u8; vals.len() * 2];
        encode(Dtype::F16, &vals, &mut raw).unwrap();
        for (k, &v) in vals.iter().enumerate() {
            let got = u16::from_le_bytes([raw[2 * k], raw[2 * k + 1]]);
            let want = f16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(f16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want, "{v:e}");
            }
        }
        let mut back = vec![0f32; vals.len()];
        decode(Dtype::F16, &raw, &mut back).unwrap();
        for (k, &b) in back.iter().enumerate() {
            let bits = u16::from_le_bytes([raw[2 * k], raw[2 * k + 1]]);
            let want = f16::from_bits(bits).to_f32();
            assert!(b.to_bits() == want.to_bits() || (b.is_nan() && want.is_nan()));
        }
    }

    #[test]
    fn casts_round_once() {
        let v = 1.0f64 + 2f64.powi(-8) + 2f64.powi(-40); // just above a bf16 tie
        let mut dst = [0u8; 2];
        let mut scratch = [0f32; 1];
        cast(
            Dtype::F64,
            &v.to_le_bytes(),
            Dtype::BF16,
            &mut dst,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(u16::from_le_bytes(dst), 0x3F81); // direct rounding goes up
        for (v, want) in [
            (1.0 + 2f64.powi(-8), 0x3F80u16),
            (1.0 + 3.0 * 2f64.powi(-8) - 2f64.powi(-40), 0x3F81),
        ] {
            cast(
                Dtype::F64,
                &v.to_le_bytes(),
                Dtype::BF16,
                &mut dst,
                &mut scratch,
            )
            .unwrap();
            assert_eq!(u16::from_le_bytes(dst), want, "{v}");
        }
        let v = 1.0f64 + 2f64.powi(-11) + 2f64.powi(-45); // just above an f16 tie
        cast(
            Dtype::F64,
            &v.to_le_bytes(),
            Dtype::F16,
            &mut dst,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(u16::from_le_bytes(dst), 0x3C01);
        cast(
            Dtype::F64,
            &1e300f64.to_le_bytes(),
            Dtype::BF16,
            &mut dst,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(u16::from_le_bytes(dst), 0x7F80);
        let mut out = [0u8; 8];
        cast(
            Dtype::BF16,
            &0x3F81u16.to_le_bytes(),
            Dtype::F64,
            &mut out,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(f64::from_le_bytes(out), 1.0 + 2f64.powi(-7));
        assert!(matches!(
            decode(Dtype::I32, &[0; 4], &mut scratch),
            Err(CoreError::Dtype(_))
        ));
    }
}
