//! The adapter fingerprint: a SHA-256 over the spec version, the seed, `d` and the
//! named matrix shapes in flattening order. Two adapters with the same fingerprint
//! reconstruct the same matrices from the same `theta_d`.
//!
//! The hashed text has one line per matrix, `<name>\t<rows>\t<cols>`; it is unambiguous
//! (two different lists never give the same text) as long as no name holds a line
//! break or a tab. [`check_name`] is that rule, and adapter configs refuse module names
//! that break it ([`super::config`]).

use sha2::{Digest, Sha256};

use super::error::ConfigError;
use super::kind::SPEC_VERSION;

/// The canonical UTF-8 text that is hashed (see `docs/SPEC.md`).
pub fn canonical_text(seed: u64, d: u64, matrices: &[(&str, u64, u64)]) -> String {
    let head = format!("unilora-spec-v{SPEC_VERSION}\nseed={seed}\nd={d}\n");
    with_matrices(head, matrices)
}

/// The canonical text of a spec v2 adapter: the projection's name and, for a map, its
/// SHA-256 come before the seed (docs/SPEC.md section 2).
pub fn canonical_text_v2(
    projection: &str,
    map_sha256: Option<&str>,
    seed: u64,
    d: u64,
    matrices: &[(&str, u64, u64)],
) -> String {
    let mut head = format!("unilora-spec-v2\nprojection={projection}\n");
    if let Some(map) = map_sha256 {
        head.push_str(&format!("map={map}\n"));
    }
    head.push_str(&format!("seed={seed}\nd={d}\n"));
    with_matrices(head, matrices)
}

fn with_matrices(mut text: String, matrices: &[(&str, u64, u64)]) -> String {
    for (name, rows, cols) in matrices {
        text.push_str(&format!("{name}\t{rows}\t{cols}\n"));
    }
    text
}

/// `"sha256:" + hex(SHA-256(canonical_text))`. Names must pass [`check_name`] for the
/// result to identify the list.
pub fn fingerprint(seed: u64, d: u64, matrices: &[(&str, u64, u64)]) -> String {
    hash_text(&canonical_text(seed, d, matrices))
}

/// [`fingerprint`] after checking every name with [`check_name`]: names with control
/// characters are refused (the error names the matrix), so two different lists never
/// share a fingerprint.
pub fn checked_fingerprint(
    seed: u64,
    d: u64,
    matrices: &[(&str, u64, u64)],
) -> Result<String, ConfigError> {
    for (name, _, _) in matrices {
        check_name(name).map_err(|e| e.at(format!("matrix {name:?}")))?;
    }
    Ok(fingerprint(seed, d, matrices))
}

/// `"sha256:" + hex(SHA-256(text))`.
pub fn hash_text(text: &str) -> String {
    hex_digest(&Sha256::digest(text.as_bytes()))
}

/// `"sha256:"` followed by the lower-case hex of a digest.
pub fn hex_digest(digest: &[u8]) -> String {
    let mut out = String::with_capacity(7 + 2 * digest.len());
    out.push_str("sha256:");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Refuses a name holding a control character (U+0000 to U+001F, U+007F: tab and line
/// breaks among them), which would make the fingerprint text ambiguous.
pub fn check_name(name: &str) -> Result<(), ConfigError> {
    match name.chars().find(|c| c.is_ascii_control()) {
        Some(c) => Err(ConfigError::ControlCharacter(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_refused() {
        for bad in ["a\tb", "a\nb", "a\rb", "\u{0}", "x\u{7f}"] {
            assert!(
                check_name(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("control character"),
                "{bad:?}"
            );
        }
        for good in ["model.layers.0.self_attn.q_proj", "", "é.ü", "a b", "0"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn checked_fingerprint_names_the_matrix() {
        let err = checked_fingerprint(0, 2, &[("ok", 1, 1), ("a\t2\t2\nb", 2, 2)])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("matrix \"a\\t2\\t2\\nb\": "), "{err}");
        assert!(
            err.contains("control character") && !err.contains('\n'),
            "{err}"
        );
        let two = [("a", 2, 2), ("b", 2, 2)];
        assert_eq!(
            checked_fingerprint(0, 2, &two).unwrap(),
            fingerprint(0, 2, &two)
        );
    }

    /// Without the rule, a name with a tab and a line break imitates two matrices.
    #[test]
    fn the_rule_is_what_keeps_the_text_unambiguous() {
        let one = canonical_text(0, 2, &[("a\t1\t1\nb", 1, 1)]);
        let two = canonical_text(0, 2, &[("a", 1, 1), ("b", 1, 1)]);
        assert_eq!(one, two);
        assert!(check_name("a\t1\t1\nb").is_err());
    }
    #[test]
    fn spec_v2_fingerprint_text() {
        let text = canonical_text_v2("explicit", Some("sha256:00"), 3, 8, &[("m.lora_B", 4, 2)]);
        assert_eq!(
            text,
            "unilora-spec-v2\nprojection=explicit\nmap=sha256:00\nseed=3\nd=8\nm.lora_B\t4\t2\n"
        );
        let text = canonical_text_v2("fastfood", None, 3, 8, &[]);
        assert_eq!(text, "unilora-spec-v2\nprojection=fastfood\nseed=3\nd=8\n");
    }
}
