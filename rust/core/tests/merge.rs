//! Integration tests of the streaming merge and the LoRA export on generated files.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use unilora_core::adapter::Adapter;
use unilora_core::codec;
use unilora_core::merge::{Control, MergeOptions, merge};
use unilora_core::safetensors::{Dtype, Header, build_header};
use unilora_core::{CoreError, ExportOptions, export_lora, fingerprint, parallel};

/// A deterministic pseudo-random float in [-1, 1).
fn rnd(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Tensors as (name, dtype, shape, values as f32 before encoding).
type Spec = Vec<(String, Dtype, Vec<u64>)>;

fn write_st(path: &Path, spec: &Spec, seed: u64) -> Vec<Vec<u8>> {
    let mut state = seed;
    let s: Vec<(&str, Dtype, &[u64])> = spec
        .iter()
        .map(|(n, d, sh)| (n.as_str(), *d, sh.as_slice()))
        .collect();
    let mut meta = Map::new();
    meta.insert("format".into(), Value::from("pt"));
    let (header, _) = build_header(&s, Some(&meta)).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    let mut datas = Vec::new();
    for (_, dtype, shape) in spec {
        let n: u64 = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| rnd(&mut state)).collect();
        let mut raw = vec![0u8; (n * dtype.bits() / 8) as usize];
        if dtype.is_float() {
            codec::encode(*dtype, &vals, &mut raw).unwrap();
        } else {
            for (k, b) in raw.iter_mut().enumerate() {
                *b = (k * 7 + 3) as u8;
            }
        }
        bytes.extend_from_slice(&raw);
        datas.push(raw);
    }
    fs::write(path, bytes).unwrap();
    datas
}

/// (name, in, out, kind)
fn write_adapter(
    dir: &Path,
    modules: &[(&str, u64, u64, &str)],
    rank: u64,
    alpha: f64,
    d: u64,
    seed: u64,
) -> Vec<f32> {
    fs::create_dir_all(dir).unwrap();
    let mut mats = Vec::new();
    for (name, fin, fout, _) in modules {
        mats.push((format!("{name}.lora_B"), *fout, rank));
        mats.push((format!("{name}.lora_A"), rank, *fin));
    }
    let named: Vec<(&str, u64, u64)> = mats.iter().map(|(n, r, c)| (n.as_str(), *r, *c)).collect();
    let fp = fingerprint(seed, d, &named);
    let mods: Vec<Value> = modules
        .iter()
        .map(|(n, i, o, k)| json!({"name": n, "in_features": i, "out_features": o, "kind": k}))
        .collect();
    let cfg = json!({
        "format": "unilora_rs", "format_version": 1, "spec_version": 1, "seed": seed,
        "vector_length": d, "rank": rank, "alpha": alpha, "modules": mods,
        "modules_to_save": [], "fingerprint": fp,
    });
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let mut state = seed ^ 0xABCDEF;
    let theta: Vec<f32> = (0..d).map(|_| rnd(&mut state) * 0.5).collect();
    let dims = [d];
    let spec: Vec<(&str, Dtype, &[u64])> = vec![("theta_d", Dtype::F32, &dims[..])];
    let (header, _) = build_header(&spec, None).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    for v in &theta {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    theta
}

fn tensor_bytes(path: &Path, name: &str) -> (Dtype, Vec<u64>, Vec<u8>) {
    let (file, h) = Header::read(path).unwrap();
    let info = h.get(name).unwrap();
    let mut buf = vec![0u8; info.nbytes() as usize];
    unilora_core::io::pio::read_exact_at(&file, &mut buf, h.data_start() + info.begin).unwrap();
    (info.dtype, info.shape.clone(), buf)
}

fn decode(dtype: Dtype, raw: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; raw.len() / (dtype.bits() / 8) as usize];
    codec::decode(dtype, raw, &mut out).unwrap();
    out
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    adapter: PathBuf,
}

const MODULES: [(&str, u64, u64, &str); 3] = [
    ("model.l0.q", 24, 40, "linear"),
    ("model.l0.c", 16, 48, "conv1d"),
    ("model.l1.q", 24, 40, "linear"),
];

fn fixture(dtype: Dtype) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let base = root.join("base.safetensors");
    let spec: Spec = vec![
        ("model.embed.weight".into(), dtype, vec![10, 24]),
        ("model.l0.q.weight".into(), dtype, vec![40, 24]),
        ("model.l0.q.bias".into(), dtype, vec![40]),
        ("model.l0.c.weight".into(), dtype, vec![16, 48]),
        ("model.l1.q.weight".into(), dtype, vec![40, 24]),
        ("model.ids".into(), Dtype::I64, vec![5]),
    ];
    write_st(&base, &spec, 7);
    let adapter = root.join("adapter");
    write_adapter(&adapter, &MODULES, 4, 8.0, 100, 42);
    Fixture {
        _tmp: tmp,
        root,
        base,
        adapter,
    }
}

/// The specified arithmetic, written independently as plain loops over (i, j, k).
fn reference(fx: &Fixture, module: &str, w: &[f32]) -> Vec<f32> {
    let a = Adapter::open(&fx.adapter).unwrap();
    let pairs = a.lora_pairs().unwrap();
    let k = a
        .config
        .modules
        .iter()
        .position(|m| m.name == module)
        .unwrap();
    let m = &a.config.modules[k];
    let (b, aa) = (&pairs[k].b, &pairs[k].a);
    let (r, fin, fout) = (
        a.config.rank as usize,
        m.in_features as usize,
        m.out_features as usize,
    );
    let s = a.config.scaling();
    let mut out = w.to_vec();
    for i in 0..fout {
        for j in 0..fin {
            let mut acc = 0f32;
            for kk in 0..r {
                acc += b[i * r + kk] * aa[kk * fin + j];
            }
            let pos = if m.kind == unilora_core::format::ModuleKind::Conv1d {
                j * fout + i
            } else {
                i * fin + j
            };
            out[pos] = w[pos] + s * acc;
        }
    }
    out
}

#[test]
fn merge_matches_the_specified_arithmetic() {
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        let fx = fixture(dtype);
        let out = fx.root.join("out.safetensors");
        let report = merge(
            &MergeOptions::new(&fx.base, &fx.adapter, &out),
            &Control::new(),
        )
        .unwrap();
        assert_eq!(report.merged.len(), 3);
        assert_eq!(report.copied, 3);
        for (name, _, _, _) in MODULES {
            let (dt, _, before) = tensor_bytes(&fx.base, &format!("{name}.weight"));
            let (dt2, _, after) = tensor_bytes(&out, &format!("{name}.weight"));
            assert_eq!(dt, dt2);
            let want = reference(&fx, name, &decode(dt, &before));
            let mut want_raw = vec![0u8; after.len()];
            codec::encode(dt, &want, &mut want_raw).unwrap();
            assert_eq!(after, want_raw, "{dtype} {name}");
            assert_ne!(after, before);
        }
        for name in ["model.embed.weight", "model.l0.q.bias", "model.ids"] {
            assert_eq!(tensor_bytes(&fx.base, name), tensor_bytes(&out, name));
        }
        // Same header bytes when no dtype changes.
        let (_, h_in) = Header::read(&fx.base).unwrap();
        let (_, h_out) = Header::read(&out).unwrap();
        assert_eq!(h_in.raw, h_out.raw);
    }
}

#[test]
fn results_do_not_depend_on_threads_or_tiles() {
    let fx = fixture(Dtype::BF16);
    let mut outputs = Vec::new();
    for (k, (threads, tile)) in [(1usize, 0usize), (3, 0), (2, 1), (4, 7)]
        .into_iter()
        .enumerate()
    {
        parallel::set_num_threads(threads);
        let out = fx.root.join(format!("out{k}.safetensors"));
        let mut opts = MergeOptions::new(&fx.base, &fx.adapter, &out);
        opts.tile_elems = tile;
        merge(&opts, &Control::new()).unwrap();
        outputs.push(fs::read(&out).unwrap());
    }
    parallel::set_num_threads(0);
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn dtype_cast_rewrites_header_and_rounds_once() {
    let fx = fixture(Dtype::F32);
    let out = fx.root.join("out.safetensors");
    let mut opts = MergeOptions::new(&fx.base, &fx.adapter, &out);
    opts.dtype = Some(Dtype::BF16);
    let report = merge(&opts, &Control::new()).unwrap();
    assert_eq!(report.cast, 2); // embed and bias; ids stay I64
    let (dt, shape, raw) = tensor_bytes(&out, "model.l0.q.weight");
    assert_eq!((dt, shape), (Dtype::BF16, vec![40, 24]));
    let (_, _, before) = tensor_bytes(&fx.base, "model.l0.q.weight");
    let want = reference(&fx, "model.l0.q", &decode(Dtype::F32, &before));
    let mut want_raw = vec![0u8; raw.len()];
    codec::encode(Dtype::BF16, &want, &mut want_raw).unwrap();
    assert_eq!(raw, want_raw);
    let (dt, _, ids) = tensor_bytes(&out, "model.ids");
    assert_eq!(
        (dt, ids),
        (Dtype::I64, tensor_bytes(&fx.base, "model.ids").2)
    );
    let (_, h) = Header::read(&out).unwrap();
    assert_eq!(h.metadata.unwrap()["format"], "pt");
}

fn assert_clean(fx: &Fixture, base_bytes: &[u8]) {
    assert_eq!(
        fs::read(&fx.base).unwrap(),
        base_bytes,
        "the base was modified"
    );
    let names: Vec<_> = fs::read_dir(&fx.root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "leftover output: {names:?}");
}

#[test]
fn bad_targets_are_errors_and_leave_nothing() {
    let fx = fixture(Dtype::F32);
    let base_bytes = fs::read(&fx.base).unwrap();
    let out = fx.root.join("out.safetensors");
    let run = |fx: &Fixture| {
        merge(
            &MergeOptions::new(&fx.base, &fx.adapter, &out),
            &Control::new(),
        )
    };

    write_adapter(
        &fx.adapter,
        &[("model.l9.q", 24, 40, "linear")],
        4,
        4.0,
        50,
        1,
    );
    let e = run(&fx).unwrap_err();
    assert!(
        matches!(e, CoreError::Mismatch(_)) && e.to_string().contains("has no tensor"),
        "{e}"
    );
    assert_clean(&fx, &base_bytes);

    // Suffix match: the adapter names a prefix the base lacks, or vice versa.
    write_adapter(
        &fx.adapter,
        &[
            ("base.model.l0.q", 24, 40, "linear"),
            ("l1.q", 24, 40, "linear"),
        ],
        4,
        4.0,
        50,
        1,
    );
    let report = run(&fx).unwrap();
    assert_eq!(report.merged[0].tensor, "model.l0.q.weight");
    assert_eq!(report.merged[1].tensor, "model.l1.q.weight");
    fs::remove_file(&out).unwrap();

    // Ambiguous: "q" is a suffix of both layers.
    write_adapter(&fx.adapter, &[("q", 24, 40, "linear")], 4, 4.0, 50, 1);
    let e = run(&fx).unwrap_err();
    assert!(
        e.to_string().contains("ambiguous") && e.to_string().contains("model.l1.q.weight"),
        "{e}"
    );
    assert_clean(&fx, &base_bytes);

    // Shape mismatch (and a conv1d declared as linear).
    write_adapter(
        &fx.adapter,
        &[("model.l0.c", 16, 48, "linear")],
        4,
        4.0,
        50,
        1,
    );
    let e = run(&fx).unwrap_err();
    assert!(
        matches!(e, CoreError::Mismatch(_)) && e.to_string().contains("shape"),
        "{e}"
    );
    assert_clean(&fx, &base_bytes);

    // Fingerprint tampering.
    write_adapter(&fx.adapter, &MODULES, 4, 8.0, 100, 42);
    let cfg_path = fx.adapter.join("adapter_config.json");
    let text = fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"seed\": 42", "\"seed\": 43");
    fs::write(&cfg_path, text).unwrap();
    let e = run(&fx).unwrap_err();
    assert!(e.to_string().contains("fingerprint mismatch"), "{e}");
    assert_clean(&fx, &base_bytes);
}

#[test]
fn output_rules() {
    let fx = fixture(Dtype::F32);
    let out = fx.root.join("out.safetensors");
    merge(
        &MergeOptions::new(&fx.base, &fx.adapter, &out),
        &Control::new(),
    )
    .unwrap();
    let e = merge(
        &MergeOptions::new(&fx.base, &fx.adapter, &out),
        &Control::new(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, CoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{e}"
    );
    let mut opts = MergeOptions::new(&fx.base, &fx.adapter, &out);
    opts.overwrite = true;
    merge(&opts, &Control::new()).unwrap();
    let e = merge(
        &MergeOptions::new(&fx.base, &fx.adapter, &fx.base),
        &Control::new(),
    )
    .unwrap_err();
    assert!(matches!(e, CoreError::InvalidArgument(_)), "{e}");
    let e = merge(
        &MergeOptions::new(&fx.base, &fx.adapter, fx.adapter.join("x")),
        &Control::new(),
    )
    .unwrap_err();
    assert!(matches!(e, CoreError::InvalidArgument(_)), "{e}");
}

#[test]
fn cancellation_leaves_nothing() {
    let fx = fixture(Dtype::F32);
    let base_bytes = fs::read(&fx.base).unwrap();
    let control = Control::new();
    control.cancel();
    let e = merge(
        &MergeOptions::new(&fx.base, &fx.adapter, fx.root.join("o")),
        &control,
    )
    .unwrap_err();
    assert!(matches!(e, CoreError::Interrupted));
    assert_clean(&fx, &base_bytes);
}

fn sharded(fx: &Fixture, index: Value) -> PathBuf {
    let dir = fx.root.join("model");
    fs::create_dir_all(&dir).unwrap();
    write_st(
        &dir.join("a.safetensors"),
        &vec![("model.l0.q.weight".into(), Dtype::F16, vec![40, 24])],
        1,
    );
    write_st(
        &dir.join("b.safetensors"),
        &vec![("model.l1.q.weight".into(), Dtype::F16, vec![40, 24])],
        2,
    );
    fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    fs::write(dir.join("config.json"), b"{\"x\": 1}").unwrap();
    dir
}

#[test]
fn sharded_folder_and_index_checks() {
    let fx = fixture(Dtype::F32);
    write_adapter(
        &fx.adapter,
        &[
            ("model.l0.q", 24, 40, "linear"),
            ("model.l1.q", 24, 40, "linear"),
        ],
        2,
        2.0,
        64,
        3,
    );
    let good = json!({"metadata": {"total_size": 3840}, "weight_map": {
        "model.l0.q.weight": "a.safetensors", "model.l1.q.weight": "b.safetensors"}});
    let dir = sharded(&fx, good);
    let out = fx.root.join("merged");
    let report = merge(&MergeOptions::new(&dir, &fx.adapter, &out), &Control::new()).unwrap();
    assert_eq!(report.shards, vec!["a.safetensors", "b.safetensors"]);
    assert_eq!(
        report.other_files,
        vec!["config.json", "model.safetensors.index.json"]
    );
    assert_eq!(fs::read(out.join("config.json")).unwrap(), b"{\"x\": 1}");
    assert_eq!(
        fs::read(out.join("model.safetensors.index.json")).unwrap(),
        fs::read(dir.join("model.safetensors.index.json")).unwrap()
    );
    // Casting updates total_size.
    let mut opts = MergeOptions::new(&dir, &fx.adapter, fx.root.join("merged32"));
    opts.dtype = Some(Dtype::F32);
    merge(&opts, &Control::new()).unwrap();
    let idx: Value = serde_json::from_slice(
        &fs::read(fx.root.join("merged32/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(idx["metadata"]["total_size"], 7680);

    for (bad, what) in [
        ("../a.safetensors", "'..'"),
        ("/etc/passwd", "absolute"),
        ("sub/../../x.safetensors", "'..'"),
    ] {
        let index =
            json!({"weight_map": {"model.l0.q.weight": bad, "model.l1.q.weight": "b.safetensors"}});
        fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        let e = merge(
            &MergeOptions::new(&dir, &fx.adapter, fx.root.join("bad")),
            &Control::new(),
        )
        .unwrap_err();
        assert!(
            matches!(e, CoreError::Format { .. }) && e.to_string().contains(what),
            "{e}"
        );
        assert!(!fx.root.join("bad").exists());
    }
    // An index naming a tensor that its shard lacks.
    let index = json!({"weight_map": {"model.l0.q.weight": "b.safetensors", "model.l1.q.weight": "b.safetensors"}});
    fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let e = merge(
        &MergeOptions::new(&dir, &fx.adapter, fx.root.join("bad")),
        &Control::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no such tensor"), "{e}");
}

#[test]
fn truncated_base_is_a_format_error() {
    let fx = fixture(Dtype::F32);
    let bytes = fs::read(&fx.base).unwrap();
    fs::write(&fx.base, &bytes[..bytes.len() - 3]).unwrap();
    let e = merge(
        &MergeOptions::new(&fx.base, &fx.adapter, fx.root.join("o")),
        &Control::new(),
    )
    .unwrap_err();
    assert!(matches!(e, CoreError::Format { .. }), "{e}");
}

#[test]
fn export_writes_peft_layout() {
    let fx = fixture(Dtype::F32);
    let out = fx.root.join("lora");
    let report = export_lora(&ExportOptions::new(&fx.adapter, &out)).unwrap();
    assert_eq!(report.modules, 3);
    let cfg: Value =
        serde_json::from_slice(&fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8);
    assert_eq!(
        cfg["target_modules"],
        json!(["model.l0.q", "model.l0.c", "model.l1.q"])
    );
    let a = Adapter::open(&fx.adapter).unwrap();
    let pairs = a.lora_pairs().unwrap();
    let w = out.join("adapter_model.safetensors");
    let (dt, shape, raw) = tensor_bytes(&w, "base_model.model.model.l0.c.lora_A.weight");
    assert_eq!((dt, shape), (Dtype::F32, vec![4, 16]));
    assert_eq!(decode(dt, &raw), pairs[1].a);
    let (_, shape, raw) = tensor_bytes(&w, "base_model.model.model.l0.c.lora_B.weight");
    assert_eq!(shape, vec![48, 4]);
    assert_eq!(decode(Dtype::F32, &raw), pairs[1].b);
    let e = export_lora(&ExportOptions::new(&fx.adapter, &out)).unwrap_err();
    assert!(matches!(e, CoreError::Io { .. }));
}

#[cfg(feature = "progress")]
#[test]
fn merge_with_progress_bar_gives_the_same_output() {
    use unilora_core::merge::merge_with_progress_bar;
    let fx = fixture(Dtype::BF16);
    let plain = fx.root.join("plain.safetensors");
    let with_bar = fx.root.join("bar.safetensors");
    merge(
        &MergeOptions::new(&fx.base, &fx.adapter, &plain),
        &Control::new(),
    )
    .unwrap();
    let report =
        merge_with_progress_bar(&MergeOptions::new(&fx.base, &fx.adapter, &with_bar)).unwrap();
    assert_eq!(report.merged.len(), 3);
    assert_eq!(fs::read(&plain).unwrap(), fs::read(&with_bar).unwrap());
    // Errors pass through unchanged (an existing output without overwrite).
    let err =
        merge_with_progress_bar(&MergeOptions::new(&fx.base, &fx.adapter, &with_bar)).unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
}
