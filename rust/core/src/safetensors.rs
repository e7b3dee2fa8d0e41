//! A strict reader of safetensors headers, and a writer of new ones.
//!
//! Layout of a safetensors file: an 8-byte little-endian `N`, then `N` bytes of UTF-8
//! JSON (the header), then the data buffer. The header maps every tensor name to
//! `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data
//! buffer) and may hold a `"__metadata__"` object of string values.
//!
//! [`Header::read`] checks the declared header length against the file size *before*
//! allocating anything (a header-size bomb costs nothing), then validates every entry:
//! known dtype, byte count equal to `numel * size(dtype)`, offsets inside the file, no
//! overlaps, no holes, no duplicate names. Tensor data is then read with positional
//! reads (`pread`); files are never memory-mapped, so a file truncated by another
//! process yields an I/O error rather than a `SIGBUS`, and resident memory stays
//! bounded by the working buffers.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::{CoreError, Result};
use crate::io::fs::open_regular;
use crate::io::pio::read_exact_at;

/// Largest header accepted (the limit of the reference safetensors implementation).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// A safetensors element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 5 exponent bits.
    F8E5M2,
    /// 8-bit float, 4 exponent bits.
    F8E4M3,
    /// 8-bit exponent-only scale.
    F8E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// Complex of two binary32.
    C64,
    /// 4-bit float (two per byte).
    F4,
    /// 6-bit float, 2 exponent bits.
    F6E2M3,
    /// 6-bit float, 3 exponent bits.
    F6E3M2,
}

impl Dtype {
    const ALL: [Dtype; 20] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::F8E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
        Dtype::C64,
        Dtype::F4,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
    ];

    /// The name transformers writes for this dtype in `config.json` (`"bfloat16"`,
    /// `"float16"`, `"float32"`, `"float64"`; the safetensors name otherwise).
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
            other => other.name(),
        }
    }

    /// The name used in safetensors headers (`"BF16"`, `"F32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::C64 => "C64",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
        }
    }

    /// Parses a header dtype name.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Size of one element in bits.
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => {
                8
            }
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 64,
        }
    }

    /// The floating types a merge can compute on and cast between: F16, BF16, F32, F64.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// Parses a user-facing output dtype (`bf16`, `f16`, `f32` and common aliases);
    /// the error lists the valid names.
    pub fn parse_target(name: &str) -> Result<Dtype> {
        match name.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(Dtype::BF16),
            "f16" | "fp16" | "float16" | "half" => Ok(Dtype::F16),
            "f32" | "fp32" | "float32" | "float" => Ok(Dtype::F32),
            _ => Err(CoreError::Dtype(format!(
                "unknown dtype {name:?}: expected one of bf16, f16, f32 \
                 (aliases: bfloat16, fp16, float16, half, fp32, float32, float)"
            ))),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor entry of a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (state-dict key).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<u64>,
    /// Start of the data, relative to the data buffer.
    pub begin: u64,
    /// End (exclusive) of the data, relative to the data buffer.
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Number of data bytes.
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// Byte size of `shape` elements of `dtype`, or a message saying why it is invalid.
pub fn byte_size(dtype: Dtype, shape: &[u64]) -> std::result::Result<u64, String> {
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let bits = numel
        .checked_mul(dtype.bits())
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if bits % 8 != 0 {
        return Err(format!(
            "{numel} elements of {dtype} do not fill whole bytes"
        ));
    }
    Ok(bits / 8)
}

/// A parsed and validated safetensors header.
#[derive(Clone, Debug)]
pub struct Header {
    /// The file the header was read from.
    pub path: PathBuf,
    /// The header bytes exactly as stored (without the 8-byte length prefix).
    pub raw: Vec<u8>,
    /// The `__metadata__` object, if any (all values are strings).
    pub metadata: Option<Map<String, Value>>,
    /// The tensors, sorted by data offset.
    pub tensors: Vec<TensorInfo>,
    /// Size of the whole file in bytes.
    pub file_len: u64,
    by_name: HashMap<String, usize>,
}

/// The `__metadata__` object of a header (all values are strings).
type Metadata = Map<String, Value>;

/// The header's top-level object with its keys in file order; duplicates are kept so
/// that the caller can reject them.
struct RawEntries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for RawEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawEntries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(RawEntries(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

impl Header {
    /// Opens `path` (a regular file: see [`open_regular`]) and reads its header
    /// (see the module docs for the checks).
    pub fn read(path: &Path) -> Result<(File, Header)> {
        let file = open_regular(path)?;
        let header = Header::read_from(&file, path)?;
        Ok((file, header))
    }

    /// Reads and validates the header of the open `file` (named `path` in errors).
    pub fn read_from(file: &File, path: &Path) -> Result<Header> {
        let bad = |msg: String| CoreError::format(path, msg);
        let file_len = file.metadata().map_err(|e| CoreError::io(path, e))?.len();
        if file_len < 8 {
            return Err(bad(format!(
                "not a safetensors file: {file_len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut len_buf = [0u8; 8];
        read_exact_at(file, &mut len_buf, 0).map_err(|e| CoreError::io(path, e))?;
        let n = u64::from_le_bytes(len_buf);
        if n > MAX_HEADER_SIZE {
            return Err(bad(format!(
                "header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit (corrupt or hostile file)"
            )));
        }
        if n > file_len - 8 {
            return Err(bad(format!(
                "header length {n} runs past the end of the file ({file_len} bytes): truncated or corrupt"
            )));
        }
        if n < 2 {
            return Err(bad(format!(
                "header length {n} is too small for a JSON object"
            )));
        }
        let mut raw = vec![0u8; n as usize];
        read_exact_at(file, &mut raw, 8).map_err(|e| CoreError::io(path, e))?;
        let header = Header::parse(path, raw, file_len)?;
        Ok(header)
    }

    /// Parses header bytes `raw` of a file of `file_len` bytes.
    pub fn parse(path: &Path, raw: Vec<u8>, file_len: u64) -> Result<Header> {
        let bad = |msg: String| CoreError::format(path, msg);
        if raw.first() != Some(&b'{') {
            return Err(bad(
                "header does not start with '{': not a safetensors file".into(),
            ));
        }
        let text =
            std::str::from_utf8(&raw).map_err(|e| bad(format!("header is not UTF-8 ({e})")))?;
        let RawEntries(entries) = serde_json::from_str(text.trim_end_matches(' '))
            .map_err(|e| bad(format!("header is not valid JSON ({e})")))?;
        let data_len = file_len - 8 - raw.len() as u64;
        let (metadata, mut tensors) = parse_entries(entries, data_len).map_err(bad)?;
        tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
        check_layout(&tensors, data_len).map_err(bad)?;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(k, t)| (t.name.clone(), k))
            .collect();
        Ok(Header {
            path: path.to_path_buf(),
            raw,
            metadata,
            tensors,
            file_len,
            by_name,
        })
    }

    /// Offset of the data buffer in the file: `8 + N`.
    pub fn data_start(&self) -> u64 {
        8 + self.raw.len() as u64
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&k| &self.tensors[k])
    }

    /// Index of the tensor named `name` in [`Header::tensors`].
    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The same header with another tensor list (a view: `raw` is kept as read, and
    /// the entries are not checked against the file).
    pub(crate) fn with_tensors(&self, tensors: Vec<TensorInfo>) -> Header {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(k, t)| (t.name.clone(), k))
            .collect();
        Header {
            path: self.path.clone(),
            raw: self.raw.clone(),
            metadata: self.metadata.clone(),
            tensors,
            file_len: self.file_len,
            by_name,
        }
    }
}

/// The `__metadata__` object and the tensor entries of a header, each checked alone
/// (unique names, data inside the `data_len` bytes of the data buffer).
fn parse_entries(
    entries: Vec<(String, Value)>,
    data_len: u64,
) -> std::result::Result<(Option<Metadata>, Vec<TensorInfo>), String> {
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut names = HashSet::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            if metadata.is_some() {
                return Err("duplicate \"__metadata__\" entry".into());
            }
            let Value::Object(map) = value else {
                return Err("\"__metadata__\" must be an object of strings".into());
            };
            if let Some((k, _)) = map.iter().find(|(_, v)| !v.is_string()) {
                return Err(format!("\"__metadata__\" value of {k:?} is not a string"));
            }
            metadata = Some(map);
            continue;
        }
        if names.contains(&name) {
            return Err(format!("tensor {name:?} is listed twice"));
        }
        let info = parse_entry(&name, &value).map_err(|m| format!("tensor {name:?}: {m}"))?;
        if info.end > data_len {
            return Err(format!(
                "tensor {name:?}: data_offsets [{}, {}] run past the end of the data ({data_len} bytes): \
                 truncated or corrupt",
                info.begin, info.end
            ));
        }
        names.insert(name);
        tensors.push(info);
    }
    Ok((metadata, tensors))
}

/// The tensors (sorted by offset) fill the `data_len` bytes of the data buffer exactly:
/// no overlap, no hole, nothing left over.
fn check_layout(tensors: &[TensorInfo], data_len: u64) -> std::result::Result<(), String> {
    let mut expected = 0u64;
    for t in tensors {
        if t.begin < expected {
            return Err(format!(
                "tensor {:?}: data_offsets [{}, {}] overlap the previous tensor (which ends at {expected})",
                t.name, t.begin, t.end
            ));
        }
        if t.begin > expected {
            return Err(format!(
                "tensor {:?}: data_offsets start at {}, leaving a hole after byte {expected}",
                t.name, t.begin
            ));
        }
        expected = t.end;
    }
    if expected != data_len {
        return Err(format!(
            "the tensors cover {expected} bytes but the data buffer holds {data_len}: \
             truncated or trailing garbage"
        ));
    }
    Ok(())
}

fn parse_entry(name: &str, value: &Value) -> std::result::Result<TensorInfo, String> {
    let obj = value.as_object().ok_or("entry is not an object")?;
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("missing or non-string \"dtype\"")?;
    let dtype =
        Dtype::from_name(dtype_name).ok_or_else(|| format!("unknown dtype {dtype_name:?}"))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing or non-array \"shape\"")?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or("shape entries must be non-negative integers")
        })
        .collect::<std::result::Result<Vec<u64>, _>>()?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or("missing \"data_offsets\" pair")?;
    let (Some(begin), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
        return Err("data_offsets must be non-negative integers".into());
    };
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] are reversed"));
    }
    let expected = byte_size(dtype, &shape)?;
    if end - begin != expected {
        return Err(format!(
            "shape {shape:?} of {dtype} needs {expected} bytes but data_offsets [{begin}, {end}] hold {}",
            end - begin
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Header bytes and each tensor's `(begin, end)` data offsets.
pub type BuiltHeader = (Vec<u8>, Vec<(u64, u64)>);

/// Serialises a header for `tensors` (laid out in the given order, contiguously) with
/// optional `metadata`; returns the header bytes (space-padded so that the data starts
/// at a multiple of 8) and each tensor's `(begin, end)` offsets.
pub fn build_header(
    tensors: &[(&str, Dtype, &[u64])],
    metadata: Option<&Map<String, Value>>,
) -> Result<BuiltHeader> {
    let mut root = Map::new();
    if let Some(meta) = metadata {
        root.insert("__metadata__".into(), Value::Object(meta.clone()));
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut pos = 0u64;
    for &(name, dtype, shape) in tensors {
        let size = byte_size(dtype, shape)
            .map_err(|m| CoreError::InvalidArgument(format!("tensor {name:?}: {m}")))?;
        let mut entry = Map::new();
        entry.insert("dtype".into(), Value::from(dtype.name()));
        entry.insert("shape".into(), Value::from(shape.to_vec()));
        entry.insert("data_offsets".into(), Value::from(vec![pos, pos + size]));
        root.insert(name.to_string(), Value::Object(entry));
        offsets.push((pos, pos + size));
        pos += size;
    }
    let mut raw = serde_json::to_vec(&Value::Object(root))
        .map_err(|e| CoreError::InvalidArgument(format!("cannot serialise header: {e}")))?;
    while (8 + raw.len()) % 8 != 0 {
        raw.push(b' ');
    }
    Ok((raw, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(header: &str, data_len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&vec![0u8; data_len]).unwrap();
        f.flush().unwrap();
        f
    }

    fn err_of(header: &str, data_len: usize) -> String {
        let f = file_with(header, data_len);
        match Header::read(f.path()) {
            Ok(_) => panic!("header {header} was accepted"),
            Err(e) => {
                assert!(matches!(e, CoreError::Format { .. }), "{e:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn reads_a_valid_header() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[8,20]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let f = file_with(h, 20);
        let (_, hdr) = Header::read(f.path()).unwrap();
        assert_eq!(hdr.tensors.len(), 2);
        assert_eq!(hdr.tensors[0].name, "a");
        assert_eq!(hdr.get("b").unwrap().shape, vec![2, 3]);
        assert_eq!(hdr.data_start(), 8 + h.len() as u64);
        assert_eq!(hdr.metadata.as_ref().unwrap()["format"], "pt");
        assert_eq!(hdr.raw, h.as_bytes());
    }

    #[test]
    fn rejects_header_size_bomb_before_allocating() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&(u64::MAX - 3).to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        let e = Header::read(f.path()).unwrap_err().to_string();
        assert!(e.contains("exceeds"), "{e}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&1_000_000u64.to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        let e = Header::read(f.path()).unwrap_err().to_string();
        assert!(e.contains("past the end of the file"), "{e}");
    }

    #[test]
    fn rejects_short_and_garbage_files() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"abc").unwrap();
        assert!(
            Header::read(f.path())
                .unwrap_err()
                .to_string()
                .contains("shorter")
        );
        assert!(err_of("[1,2,3]", 0).contains("does not start"));
        assert!(err_of("{\"a\": ", 0).contains("not valid JSON"));
    }

    #[test]
    fn rejects_bad_entries() {
        let e = err_of(
            r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert!(e.contains("unknown dtype"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(e.contains("needs 12 bytes"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            4,
        );
        assert!(e.contains("run past the end"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        assert!(e.contains("overlap"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        );
        assert!(e.contains("hole"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            8,
        );
        assert!(e.contains("trailing"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        );
        assert!(e.contains("listed twice"), "{e}");
        let e = err_of(r#"{"__metadata__":{"x":1}}"#, 0);
        assert!(e.contains("not a string"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
            4,
        );
        assert!(e.contains("overflows"), "{e}");
    }

    #[test]
    fn built_header_round_trips() {
        let mut meta = Map::new();
        meta.insert("format".into(), Value::from("pt"));
        let shape_a = [3u64, 5];
        let shape_b = [7u64];
        let (raw, offs) = build_header(
            &[
                ("z.weight", Dtype::BF16, &shape_a),
                ("a.bias", Dtype::F32, &shape_b),
            ],
            Some(&meta),
        )
        .unwrap();
        assert_eq!((8 + raw.len()) % 8, 0);
        assert_eq!(offs, vec![(0, 30), (30, 58)]);
        let hdr = Header::parse(Path::new("x"), raw.clone(), 8 + raw.len() as u64 + 58).unwrap();
        assert_eq!(hdr.tensors[0].name, "z.weight");
        assert_eq!(hdr.tensors[1].dtype, Dtype::F32);
        assert_eq!(hdr.metadata.unwrap()["format"], "pt");
    }

    #[test]
    fn target_dtype_errors_list_valid_names() {
        assert_eq!(Dtype::parse_target("BF16").unwrap(), Dtype::BF16);
        assert_eq!(Dtype::parse_target("float16").unwrap(), Dtype::F16);
        let e = Dtype::parse_target("int8").unwrap_err();
        assert!(matches!(e, CoreError::Dtype(_)));
        assert!(e.to_string().contains("bf16, f16, f32"));
    }
}
