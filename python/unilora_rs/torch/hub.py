"""The Hugging Face Hub side of adapters: the local folder of an adapter named by a path
or a Hub repo id (downloaded into the Hub cache), and uploading a saved adapter."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..adapter import CONFIG_NAME, WEIGHTS_NAME
from ..errors import MismatchError
from ..extras import require

__all__ = ["push_adapters", "resolve_adapter_dir"]


def resolve_adapter_dir(
    adapter: str | os.PathLike[str],
    revision: str | None,
    subfolder: str | None,
    token: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Path:
    """The folder of ``adapter``: a local folder (``/ subfolder``), else a Hub repo id whose
    config and weights are downloaded (``huggingface_hub``, the ``[hub]`` extra)."""
    path = Path(adapter)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return path
    text = str(adapter)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(2, "adapter folder not found", str(path))
    require(f"{text!r} is not a local folder; loading it from the Hub", ["huggingface_hub"])
    import huggingface_hub

    files = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        files[filename] = huggingface_hub.hf_hub_download(
            repo_id=text,
            filename=filename,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,  # type: ignore[arg-type]
        )
    folder = Path(files[CONFIG_NAME]).parent
    if Path(files[WEIGHTS_NAME]).parent != folder:
        raise MismatchError(f"hub download of {text!r} put config and weights in different folders")
    return folder


def push_adapters(
    repo_id: str,
    save: Callable[[str], object],
    *,
    private: bool | None,
    token: str | None,
    commit_message: str,
) -> str:
    """Creates the repo if needed, ``save(folder)`` into a temporary folder and uploads it;
    returns the commit's URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
