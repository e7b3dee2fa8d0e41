"""Writing an ONNX graph's files: the weights inside the ``.onnx`` file or in
``OUT.onnx.data`` beside it, the free-space check before, fsync and clear errors when
the disk fills up; existing outputs are refused without ``overwrite``."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InvalidArgumentError

__all__ = [
    "SINGLE_FILE_LIMIT",
    "Progress",
    "WeightFiles",
    "check_existing",
    "fsync_file",
    "gb",
    "initializer_bytes",
    "plan_files",
    "save_graph",
    "write_files",
]

#: Weights above this many bytes cannot be embedded in one ``.onnx`` file: a protobuf
#: message is limited to 2 GiB, and the graph itself needs some room (64 MiB kept free).
SINGLE_FILE_LIMIT = 2**31 - 2**26
_DISK_MARGIN = 2**26  # room for the graph and file-system overhead beside the weights

#: Receives one line per step of the work.
Progress = Callable[[str], None]


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def initializer_bytes(model: Any) -> int:
    """Bytes of the graph's initializers (the weights that go to the file)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def check_existing(out: Path, data: Path | None, overwrite: bool) -> None:
    """Without ``overwrite`` an existing output file (``out``, and ``data`` when given)
    is refused, as by every other command (a folder in the way is refused later, as
    such)."""
    for path in (out, data):
        if path is not None and path.exists() and not path.is_dir() and not overwrite:
            raise FileExistsError(
                17, "output exists (pass overwrite=True or --overwrite to replace it)", str(path)
            )


def choose_external(
    external_data: bool | None, weight_bytes: int, data: Path, overwrite: bool = False
) -> tuple[bool, bool]:
    """``(use external data, chosen automatically)``; refuses a single file over the
    limit, and an existing data file without ``overwrite``."""
    too_big = weight_bytes > SINGLE_FILE_LIMIT
    if external_data is False and too_big:
        raise InvalidArgumentError(
            f"the weights are {gb(weight_bytes)}, over the 2 GB limit of a single ONNX "
            "file: allow external data (external_data=None or True)"
        )
    use = bool(external_data) or too_big
    if use and data.exists() and not data.is_file():
        raise IsADirectoryError(21, "external-data path exists and is not a file", str(data))
    if use:
        check_existing(data, None, overwrite)
    return use, use and not external_data


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space for the export: it needs about {gb(needed)}, {gb(free)} free",
            str(folder),
        )


def save_graph(model: Any, path: Path, data_name: str | None, say: Progress) -> None:
    """Writes the graph to ``path``; with ``data_name`` the weights go to that file beside
    it, tensor by tensor straight from the torch tensors (no copy of the model)."""
    import onnx_ir as ir

    if data_name is None:
        ir.save(model, path)
        return
    total = initializer_bytes(model)
    done = 0

    def callback(tensor: Any, info: Any) -> None:  # called before each tensor is written
        nonlocal done
        size = int(tensor.nbytes)
        if size >= 2**26 or info.index == 0:
            n = f"{info.index + 1}/{info.total}"
            say(f"  tensor {n} ({gb(size)}), {gb(done)} of {gb(total)} written")
        done += size

    # 64 KiB-aligned large tensors let onnxruntime map them from the file
    ir.save(model, path, external_data=data_name, callback=callback, alignment=65536)


@dataclass(frozen=True)
class WeightFiles:
    """Where the weights go: ``weight_bytes`` of them, into ``data`` beside the graph when
    ``external`` (``auto``: because they exceed :data:`SINGLE_FILE_LIMIT`)."""

    weight_bytes: int
    external: bool
    auto: bool
    data: Path


def plan_files(graph: Any, external_data: bool | None, out: Path, overwrite: bool) -> WeightFiles:
    """Embedded or external weights, after checking there is room for them."""
    data = out.with_name(out.name + ".data")
    weight_bytes = initializer_bytes(graph)
    use_external, auto = choose_external(external_data, weight_bytes, data, overwrite)
    check_free_space(out.parent, weight_bytes + _DISK_MARGIN)
    return WeightFiles(weight_bytes, use_external, auto, data)


def write_files(graph: Any, staged: Path, files: WeightFiles, say: Progress) -> None:
    """Writes the graph (and its external data) into the staging folder."""
    if files.external:
        why = " (over the 2 GB single-file limit)" if files.auto else ""
        say(f"writing {gb(files.weight_bytes)} of weights to {files.data.name}{why}")
    else:
        say(f"writing {staged.name} ({gb(files.weight_bytes)} of weights inside)")
    try:
        save_graph(graph, staged, files.data.name if files.external else None, say)
        for path in (staged, staged.with_name(files.data.name)):
            if path.exists():
                fsync_file(path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"the disk filled up while writing the ONNX files ({gb(files.weight_bytes)} "
                "of weights); nothing was kept",
                str(files.data.parent),
            ) from err
        raise OSError(
            err.errno or errno.EIO,
            f"writing the ONNX files failed ({err.strerror or err}); nothing was kept",
            str(staged.parent.parent / staged.name),
        ) from err


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
