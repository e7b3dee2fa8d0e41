//! The adapter fingerprint: a SHA-256 over the spec version, the seed, `d` and the
//! named matrix shapes in flattening order. Two adapters with the same fingerprint
//! reconstruct the same matrices from the same `theta_d`.

use sha2::{Digest, Sha256};

use crate::projection::SPEC_VERSION;

/// The canonical UTF-8 text that is hashed (see `docs/SPEC.md`).
pub fn canonical_text(seed: u64, d: u64, matrices: &[(&str, u64, u64)]) -> String {
    let mut text = format!("unilora-spec-v{SPEC_VERSION}\nseed={seed}\nd={d}\n");
    for (name, rows, cols) in matrices {
        text.push_str(&format!("{name}\t{rows}\t{cols}\n"));
    }
    text
}

/// `"sha256:" + hex(SHA-256(canonical_text))`.
pub fn fingerprint(seed: u64, d: u64, matrices: &[(&str, u64, u64)]) -> String {
    let digest = Sha256::digest(canonical_text(seed, d, matrices).as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}
