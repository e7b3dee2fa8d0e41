//! JSON text and values of the adapter format: parsing with errors that name the key at
//! fault, and reading checked numbers out of parsed values.

use serde_json::Value;

/// An integer in `[min, max]` (not a bool, not a float); the error is the value as shown.
pub(super) fn uint(value: Option<&Value>, min: u64, max: u64) -> std::result::Result<u64, String> {
    match value.and_then(Value::as_u64) {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(shown(value)),
    }
}

/// A number (JSON numbers are always finite).
pub(super) fn finite(value: Option<&Value>) -> std::result::Result<f64, String> {
    match value {
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| n.to_string()),
        other => Err(shown(other)),
    }
}

/// A value as messages show it: its JSON text, or that the key is missing.
pub(super) fn shown(value: Option<&Value>) -> String {
    value.map_or_else(|| "nothing (the key is missing)".into(), Value::to_string)
}

/// Parses JSON text; errors name the key at fault where they can, and say so plainly
/// for `NaN` / `Infinity` (accepted by some JSON writers, but not JSON).
pub fn parse_json(text: &[u8]) -> std::result::Result<Value, String> {
    let err = match serde_json::from_slice(text) {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let offset = byte_offset(text, err.line(), err.column());
    let key = key_before(text, offset).map_or_else(String::new, |k| format!("{k}: "));
    let near = &text[offset.saturating_sub(2)..];
    let non_finite = ["NaN", "Infinity", "-Infinity"]
        .iter()
        .any(|lit| (0..3).any(|s| near.get(s..).is_some_and(|t| t.starts_with(lit.as_bytes()))));
    if non_finite {
        return Err(format!(
            "invalid JSON at line {} column {}: {key}NaN or Infinity is not finite (JSON numbers must be finite)",
            err.line(),
            err.column()
        ));
    }
    Err(format!("invalid JSON ({key}{err})"))
}

fn byte_offset(text: &[u8], line: usize, column: usize) -> usize {
    let start: usize = text
        .split_inclusive(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(<[u8]>::len)
        .sum();
    (start + column.saturating_sub(1)).min(text.len())
}

/// The object key whose value starts before `offset`, if the text there is `"key":`.
fn key_before(text: &[u8], offset: usize) -> Option<String> {
    let head = &text[..offset];
    let colon = head.iter().rposition(|&b| b == b':')?;
    let before = head[..colon].trim_ascii_end();
    let inner = before.strip_suffix(b"\"")?;
    let open = inner.iter().rposition(|&b| b == b'"')?;
    let key = std::str::from_utf8(&inner[open + 1..]).ok()?;
    (!key.is_empty() && !key.contains(['{', '}', ',', '\n'])).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn json_errors_name_the_key() {
        let text = b"{\n  \"format\": \"unilora_rs\",\n  \"alpha\": Infinity\n}";
        let got = parse_json(text).unwrap_err();
        assert!(
            got.contains("line 3") && got.contains("alpha: NaN or Infinity is not finite"),
            "{got}"
        );
        for lit in ["NaN", "-Infinity"] {
            let text = format!("{{\"rank\": 4, \"alpha\": {lit}}}");
            let got = parse_json(text.as_bytes()).unwrap_err();
            assert!(
                got.contains("alpha: NaN or Infinity is not finite"),
                "{got}"
            );
        }
        let got = parse_json(b"{\"alpha\": 1e400}").unwrap_err();
        assert!(got.contains("alpha: number out of range"), "{got}");
        let got = parse_json(b"{\"a\": [1, 2,]}").unwrap_err();
        assert!(got.starts_with("invalid JSON ("), "{got}");
    }
}
