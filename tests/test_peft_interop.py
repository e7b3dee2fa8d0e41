"""PEFT's Uni-LoRA adapters in and out: convert-peft (both save_indices settings),
export-peft, the numpy regeneration of PEFT's map and the map checks."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import unilora_rs as ur  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_roberta  # noqa: E402
from unilora_rs.cli import main  # noqa: E402
from unilora_rs.peft_interop import (  # noqa: E402
    convert_peft,
    peft_index,
    peft_map,
    peft_scales,
)
from unilora_rs.torch import UniLoRAConfig, UniLoRAModel, get_unilora_model  # noqa: E402

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS: dict[str, Any] = {"llama": "all-linear", "gpt2": ["c_attn", "c_fc"]}


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    # PEFT and transformers warn about fan_in_fan_out, loss types and the like.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def load_base(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for arch, make in MAKERS.items():
        make().save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def train_peft(base: Path, out: Path, arch: str, save_indices: bool, **kw: Any) -> Path:
    """A PEFT Uni-LoRA adapter trained a few steps with PEFT's own tuner."""
    torch.manual_seed(0)
    cfg = peft.UniLoraConfig(
        r=2,
        theta_d_length=150,
        target_modules=TARGETS[arch],
        save_indices=save_indices,
        proj_seed=7,
        **kw,
    )
    model = peft.get_peft_model(load_base(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("save_indices", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_converted_adapters_match_peft(
    bases: dict[str, Path], tmp_path: Path, arch: str, save_indices: bool
) -> None:
    base = bases[arch]
    peft_dir = train_peft(base, tmp_path / "peft", arch, save_indices)
    assert main(["convert-peft", str(peft_dir), str(tmp_path / "ours")]) == 0
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["projection"] == ("explicit" if save_indices else "peft-numpy")
    assert config["spec_version"] == 2 and config["map_sha256"].startswith("sha256:")
    theirs = peft.PeftModel.from_pretrained(load_base(base), peft_dir).eval()
    ours = UniLoRAModel.from_pretrained(load_base(base), tmp_path / "ours")
    ids = batch(1)
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert (ours(input_ids=ids).logits - want).abs().max() <= 1e-5
    # The offline merge equals PEFT's merge_and_unload.
    ur.merge(base, tmp_path / "ours", tmp_path / "merged")
    merged = load_base(tmp_path / "merged").state_dict()
    for name, tensor in theirs.merge_and_unload().state_dict().items():
        assert (merged[name] - tensor).abs().max() <= 1e-4, name
    # export-lora and inspect take it too.
    ur.export_lora(tmp_path / "ours", tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(load_base(base), tmp_path / "lora").eval()
    with torch.no_grad():
        assert (lora(input_ids=ids).logits - want).abs().max() <= 1e-5
    info = ur.inspect(tmp_path / "ours")
    assert info.map_ok and info.fingerprint_ok and info.projection == config["projection"]


def test_explicit_flag_and_equal_maps(bases: dict[str, Path], tmp_path: Path) -> None:
    """Without saved indices, --explicit stores the numpy map; it is the map PEFT saves
    with save_indices=True (the same SHA-256)."""
    plain = train_peft(bases["llama"], tmp_path / "plain", "llama", False)
    saved = train_peft(bases["llama"], tmp_path / "saved", "llama", True)
    a = convert_peft(plain, tmp_path / "a", explicit=True)
    b = convert_peft(saved, tmp_path / "b")
    c = convert_peft(plain, tmp_path / "c")
    assert (a.projection, b.projection, c.projection) == ("explicit", "explicit", "peft-numpy")
    assert a.map_sha256 == b.map_sha256 == c.map_sha256
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors["theta_d.indices"].dtype == np.int32
    assert tensors["theta_d.scales"].dtype == np.float32
    assert "theta_d.indices" not in load_file(tmp_path / "c" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("total", "d", "seed"), [(1000, 100, 0), (10_007, 300, 42), (5, 5, 3), (70_000, 4096, 2**40)]
)
def test_numpy_map_is_peft_generate_index(total: int, d: int, seed: int) -> None:
    from peft.tuners.unilora import UniLoraModel

    theirs = UniLoraModel.generate_index(total, d, seed)
    assert np.array_equal(peft_index(total, d, seed), theirs.numpy())
    counts = torch.bincount(theirs, minlength=d)
    rsqrt = counts.float().rsqrt().numpy()
    assert np.array_equal(peft_scales(theirs.numpy(), d).view(np.uint32), rsqrt.view(np.uint32))


def test_changed_maps_are_detected(
    bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = convert_peft(
        train_peft(bases["gpt2"], tmp_path / "p1", "gpt2", True), tmp_path / "explicit"
    )
    weights = tmp_path / "explicit" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["theta_d.indices"][3] = (tensors["theta_d.indices"][3] + 1) % 150
    save_file(tensors, weights)
    with pytest.raises(ur.MismatchError, match=r"map mismatch.*changed after it was recorded"):
        ur.load_adapter(tmp_path / "explicit")
    assert ur.inspect(tmp_path / "explicit").map_ok is False
    assert main(["inspect", str(tmp_path / "explicit")]) == 1
    assert saved.projection == "explicit"
    # A numpy whose stream changed gives another map: refused on load, by every reader.
    convert_peft(train_peft(bases["gpt2"], tmp_path / "p2", "gpt2", False), tmp_path / "numpy")
    import unilora_rs.peft_interop as interop

    real = interop.peft_index
    monkeypatch.setattr(interop, "peft_index", lambda *a: np.roll(real(*a), 1))
    for load in (
        lambda: ur.load_adapter(tmp_path / "numpy"),
        lambda: ur.merge(bases["gpt2"], tmp_path / "numpy", tmp_path / "m"),
        lambda: ur.export_lora(tmp_path / "numpy", tmp_path / "l"),
        lambda: UniLoRAModel.from_pretrained(tiny_gpt2(), tmp_path / "numpy"),
    ):
        with pytest.raises(ur.MismatchError, match="numpy's generator stream changed"):
            load()
    assert not (tmp_path / "m").exists() and not (tmp_path / "l").exists()


def test_export_peft_loads_in_peft(tmp_path: Path) -> None:
    """Our adapters (alpha != r, a classification head, GPT-2 Conv1D) in PEFT's format."""
    torch.manual_seed(0)
    cases = {
        "roberta": (
            tiny_roberta,
            UniLoRAConfig(rank=2, vector_length=200, alpha=3.0, modules_to_save=["classifier"]),
            transformers.AutoModelForSequenceClassification,
        ),
        "gpt2": (tiny_gpt2, UniLoRAConfig(rank=2, vector_length=200), None),
    }
    for name, (make, cfg, _auto) in cases.items():
        model = get_unilora_model(make(), cfg)
        with torch.no_grad():
            model.theta_d.uniform_(-0.3, 0.3)
            for p in model.parameters():
                if p.requires_grad and p is not model.theta_d:
                    p.add_(0.1)
        model.save_pretrained(tmp_path / name)
        assert main(["export-peft", str(tmp_path / name), str(tmp_path / f"{name}-peft")]) == 0
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / f"{name}-peft").eval()
        model.eval()
        ids = batch(3)
        with torch.no_grad():
            assert (theirs(ids).logits - model(ids).logits).abs().max() <= 1e-5, name
        # And back: convert-peft of the export gives the same model again.
        base = tmp_path / f"{name}-base"
        make().save_pretrained(base)
        convert_peft(tmp_path / f"{name}-peft", tmp_path / f"{name}-back", base=base)
        back = UniLoRAModel.from_pretrained(make(), tmp_path / f"{name}-back")
        with torch.no_grad():
            assert (back(ids).logits - model(ids).logits).abs().max() <= 1e-5, name


def test_export_peft_refuses_fastfood(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = get_unilora_model(
        tiny_gpt2(), UniLoRAConfig(rank=2, vector_length=64, projection="fastfood")
    )
    model.save_pretrained(tmp_path / "ff")
    assert main(["export-peft", str(tmp_path / "ff"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fastfood" in err[0] and "export-lora" in err[0]
    assert not (tmp_path / "out").exists()


def test_convert_errors(
    bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = train_peft(bases["gpt2"], tmp_path / "good", "gpt2", False)
    big_d = tmp_path / "big_d"
    peft.get_peft_model(
        load_base(bases["gpt2"]),
        peft.UniLoraConfig(r=1, theta_d_length=4000, target_modules=["c_attn"]),
    ).save_pretrained(big_d)

    def variant(name: str, **changes: Any) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    cases = [
        (variant("lora", peft_type="LORA"), [], "not a PEFT Uni-LoRA adapter"),
        (variant("hub", base_model_name_or_path="gpt2"), [], "pass --base DIR"),
        (variant("bias", bias="all"), [], "bias = 'all'"),
        (variant("seed", proj_seed=-1), [], "proj_seed must be an integer"),
        (variant("length", theta_d_length=10**6), [], "has 150 values, theta_d_length is"),
        (big_d, [], "is larger than D"),
        (good, ["--base", str(tmp_path / "nowhere")], "config.json not found"),
        (tmp_path / "missing", [], "PEFT adapter folder not found"),
        (good, [], "exists"),  # the output below exists
    ]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    capsys.readouterr()
    for source, extra, message in cases:
        out = tmp_path / ("taken" if message == "exists" else "out")
        if source == big_d:
            extra = ["--base", str(bases["gpt2"])]
        assert main(["convert-peft", str(source), str(out), *extra]) == 1, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    assert main(["convert-peft", str(good), str(tmp_path / "taken"), "--overwrite"]) == 1
    # An earlier output of the command is replaced with --overwrite.
    assert main(["convert-peft", str(good), str(tmp_path / "o")]) == 0
    assert main(["convert-peft", str(good), str(tmp_path / "o"), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_convert_refuses_a_foreign_base_and_non_finite_scales(
    bases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A base config of another architecture raised an internal AttributeError; NaN in
    PEFT's saved scales was converted into an adapter that merge and inspect refuse."""
    saved = train_peft(bases["llama"], tmp_path / "saved", "llama", True)
    capsys.readouterr()
    assert (
        main(["convert-peft", str(saved), str(tmp_path / "o"), "--base", str(bases["gpt2"])]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on a LlamaForCausalLM" in err[0], err
    assert "describes a GPT2Config: is this the adapter's base model?" in err[0]
    weights = saved / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if ".unilora_scales_A" in k)
    tensors[key][0, 0] = np.nan
    save_file(tensors, weights)
    assert main(["convert-peft", str(saved), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{key} holds NaN or Inf" in err[0], err
    assert not (tmp_path / "o").exists()


def test_convert_prints_nothing_on_stderr(bases: dict[str, Path], tmp_path: Path) -> None:
    """bitsandbytes (imported by peft) logged a missing CPU kernel on every run."""
    import subprocess
    import sys

    peft_dir = train_peft(bases["llama"], tmp_path / "peft", "llama", False)
    proc = subprocess.run(
        [sys.executable, "-m", "unilora_rs", "convert-peft", str(peft_dir), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("converted "), proc.stderr
    assert proc.stderr == ""


def test_peft_map_orders_b_before_a() -> None:
    idx, scales = peft_map(5, 16, 2, [(8, 4), (4, 6)])
    whole = peft_index(2 * (12 + 10), 16, 5)
    # PEFT: module 0 A (2x8) then B (4x2); module 1 A (2x4) then B (6x2). Ours: B then A.
    assert np.array_equal(idx[:8], whole[16:24]) and np.array_equal(idx[8:24], whole[:16])
    assert np.array_equal(idx[24:36], whole[32:44]) and np.array_equal(idx[36:], whole[24:32])
    assert np.array_equal(scales, peft_scales(whole, 16)[idx])


def test_converted_adapters_train_and_save(bases: dict[str, Path], tmp_path: Path) -> None:
    """A converted adapter trains on with its map and saves it again, loadable."""
    for save_indices in (False, True):
        source = train_peft(bases["llama"], tmp_path / f"p{save_indices}", "llama", save_indices)
        convert_peft(source, tmp_path / f"c{save_indices}")
        model = UniLoRAModel.from_pretrained(
            load_base(bases["llama"]), tmp_path / f"c{save_indices}", is_trainable=True
        )
        opt = torch.optim.AdamW([model.theta_d], lr=1e-2)
        ids = batch(5)
        losses = []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0]
        model.save_pretrained(tmp_path / f"t{save_indices}")
        again = UniLoRAModel.from_pretrained(
            load_base(bases["llama"]), tmp_path / f"t{save_indices}"
        )
        model.eval()
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
        info = ur.inspect(tmp_path / f"t{save_indices}")
        assert info.projection == ("explicit" if save_indices else "peft-numpy") and info.map_ok
