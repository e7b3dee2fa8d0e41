"""``unilora inspect ADAPTER``: what an adapter holds, and whether it is intact."""

from __future__ import annotations

import argparse
import json

from ..inspection import AdapterInfo, inspect
from ._options import add_adapter


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "inspect",
        help="show d, seed, projection, modules, parameter counts, fingerprint check and sizes",
    )
    add_adapter(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--modules", action="store_true", help="also list every module")
    p.set_defaults(run=run)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes} B"


def _projection(info: AdapterInfo) -> str:
    if info.map_sha256 is None:
        return info.projection
    if info.map_ok:
        return f"{info.projection} (map {info.map_sha256} ok)"
    return (
        f"{info.projection} (map MISMATCH: recorded {info.map_sha256}, "
        f"the map has {info.actual_map_sha256})"
    )


def run(args: argparse.Namespace) -> int:
    info = inspect(args.adapter)
    ok = info.fingerprint_ok and info.theta_finite and info.map_ok
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0 if ok else 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info.kinds.items()))
    status = "ok" if info.fingerprint_ok else f"MISMATCH (expected {info.expected_fingerprint})"
    rows = [
        ("adapter", str(info.path)),
        ("base model", info.base_model_name_or_path or "-"),
        ("spec / format", f"v{info.spec_version} / v{info.format_version}"),
        ("projection", _projection(info)),
        ("seed", str(info.seed)),
        ("d (trainable)", f"{info.d:,}"),
        ("rank r / alpha", f"{info.rank} / {info.alpha:g} (scaling {info.scaling:g})"),
        ("modules", f"{len(info.modules)} ({kinds})"),
        ("LoRA parameters D", f"{info.lora_parameters:,} ({info.compression:,.1f}x d)"),
        (
            "modules_to_save",
            f"{len(info.saved_tensors)} tensor(s), {info.saved_parameters:,} params",
        ),
        ("fingerprint", f"{info.fingerprint} {status}"),
        ("theta_d", f"finite, norm {info.theta_norm:.6g}" if info.theta_finite else "NOT FINITE"),
        ("size on disk", _size(info.size_on_disk)),
        (
            "equivalent LoRA",
            f"{_size(info.lora_bytes)} as float32 "
            f"({info.lora_bytes / max(info.size_on_disk, 1):,.1f}x larger)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if args.modules:
        for m in info.modules:
            print(f"  {m.name}  {m.kind} in={m.in_features} out={m.out_features}")
    return 0 if ok else 1
