"""``UniLoRAModel``: a torch / transformers model with Uni-LoRA layers and one ``theta_d``.

The user surface follows PEFT: :func:`get_unilora_model`, ``print_trainable_parameters``,
``save_pretrained`` / ``from_pretrained`` (local folder or the Hugging Face Hub),
``merge_and_unload``, ``merge_adapter`` / ``unmerge_adapter`` and ``disable_adapter()``.
Adapters are written in the single format of docs/SPEC.md through
:mod:`unilora_rs.adapter`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    ModuleSpec,
    load_adapter,
    load_projection_map,
    save_adapter,
)
from ..errors import InvalidArgumentError, MismatchError, VectorError
from .config import (
    UniLoRAConfig,
    find_modules_to_save,
    find_targets,
    module_features,
    module_kind,
    target_rule,
)
from .kernels import INDEX_MODES, build_index_map, rebuild, resolve_backend
from .layers import SharedState, UniLoRALayer
from .params import make_projection

__all__ = ["UniLoRAModel", "get_unilora_model"]


def _get_submodule(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child, getattr(parent, child)


def _suggest_d(total: int) -> int:
    return max(1, min(total, 2 ** max(0, (total // 10).bit_length() - 1)))


class UniLoRAModel(nn.Module):
    """A base model whose target layers share one trainable float32 vector ``theta_d``.

    Build it with :func:`get_unilora_model` (new adapter) or
    :meth:`UniLoRAModel.from_pretrained` (saved adapter). Attribute lookups that fail
    here are forwarded to the base model (``config``, ``generate``,
    ``gradient_checkpointing_enable``, ...), as in PEFT.
    """

    #: transformers' Trainer refuses to fine-tune a quantized base (bitsandbytes, a GGUF
    #: checkpoint) unless trainable adapters are attached; this flag, which the Trainer
    #: reads from the model it is given, says they are (theta_d is the trainable tensor).
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        config: UniLoRAConfig,
        *,
        modules: Sequence[ModuleSpec] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, UniLoRAModel) or any(
            isinstance(m, UniLoRALayer) for m in model.modules()
        ):
            raise InvalidArgumentError("the model already holds Uni-LoRA layers")
        _refuse_peft_model(model)
        self.base_model = model
        self.unilora_config = config
        self.saved_module_names = find_modules_to_save(model, config)
        if modules is None:
            specs = []
            for name, module, kind in find_targets(model, config, self.saved_module_names):
                fan_in, fan_out = module_features(module, kind)
                specs.append(ModuleSpec(name, fan_in, fan_out, kind))
            if not specs:
                raise InvalidArgumentError(
                    f"target_modules={config.target_modules!r} matches no nn.Linear / Conv1D "
                    "layer of the model"
                )
        else:
            specs = list(modules)
            _check_modules_exist(model, specs)
        total = config.rank * sum(s.in_features + s.out_features for s in specs)
        if config.vector_length > total:
            raise InvalidArgumentError(
                f"vector_length d = {config.vector_length} is larger than D = {total}, the "
                f"number of LoRA parameters of the {len(specs)} adapted modules at rank "
                f"{config.rank}; choose d <= D, e.g. d = {_suggest_d(total)}"
            )
        self.projection = make_projection(
            config.projection, config.seed, total, config.vector_length, config.projection_map
        )
        self.adapter_config = AdapterConfig(
            seed=config.seed,
            vector_length=config.vector_length,
            rank=config.rank,
            alpha=float(config.alpha),  # type: ignore[arg-type]
            modules=specs,
            target_modules=target_rule(model, config) if modules is None else config.target_modules,
            exclude_modules=config.exclude_modules,
            modules_to_save=list(self.saved_module_names),
            base_model_name_or_path=config.base_model_name_or_path or _name_or_path(model),
            init_range=config.init_range,
            library_version=__version__,
            projection=self.projection.kind,
            map_sha256=self.projection.map_sha256,
        )
        self.index_mode = config.index_mode
        self.backend = config.backend
        self._index_map: torch.Tensor | None = None

        device = _model_device(model)
        theta = torch.empty(config.vector_length, dtype=torch.float32, device=device)
        theta.uniform_(-config.init_range, config.init_range)
        self.theta_d = nn.Parameter(theta)
        self._sync_index_map()

        for p in model.parameters():
            p.requires_grad_(False)
        for name in self.saved_module_names:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)

        self._state = SharedState(self._rebuild)
        self._state.bind_source(lambda: self.theta_d)
        offset = 0
        layers: list[UniLoRALayer] = []
        for spec in specs:
            parent, child, module = _get_submodule(model, spec.name)
            layer = UniLoRALayer(
                module,
                spec,
                rank=config.rank,
                scaling=config.scaling,
                offset=offset,
                slot=2 * len(layers),
                dropout=config.dropout,
                state=self._state,
            )
            setattr(parent, child, layer)
            layers.append(layer)
            self._state.sizes += [spec.out_features * config.rank, config.rank * spec.in_features]
            offset += config.rank * (spec.in_features + spec.out_features)
        self._layers = layers
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    # ------------------------------------------------------------------ internals

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "_modules", "_parameters", "_buffers"}:
                raise
            return getattr(self.base_model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "peft_config":  # set by peft.get_peft_model once it has wrapped us
            raise InvalidArgumentError(
                "peft.get_peft_model cannot wrap a UniLoRAModel: PEFT would freeze theta_d "
                "and leave it out of what it saves. Use one tuner per model: call "
                "merge_and_unload() first and give PEFT the plain model (this model now "
                "holds PEFT layers too; rebuild it)"
            )
        super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> UniLoRAModel:
        super()._apply(fn, recurse)
        # theta_d stays float32 whatever the base dtype (model.half(), .to(bfloat16)).
        if self.theta_d.dtype != torch.float32:
            self.theta_d.data = self.theta_d.data.to(torch.float32)
        self._sync_index_map()
        self._state.clear()
        return self

    def _sync_index_map(self) -> None:
        """Builds (cached mode) or drops (on-the-fly mode) the int32 map on theta_d's device."""
        if self.index_mode != "cached":
            self._index_map = None
            return
        device = self.theta_d.device
        if self._index_map is None or self._index_map.device != device:
            with torch.no_grad():
                self._index_map = build_index_map(self.projection, device)

    def _rebuild(self) -> torch.Tensor:
        theta = self.theta_d
        if self.index_mode == "cached":
            if self._index_map is None or self._index_map.device != theta.device:
                self._sync_index_map()
            return rebuild(theta, self.projection, index=self._index_map)
        return rebuild(theta, self.projection, backend=self.backend)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if self._state.disabled or all(layer.merged for layer in self._layers):
            return
        self._state.refresh()

    # ------------------------------------------------------------------ forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the base model (``theta_D`` is rebuilt once, by the root's pre-hook)."""
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` (each decoding step rebuilds ``theta_D`` once)."""
        return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    # ------------------------------------------------------------------ inspection

    def unilora_layers(self) -> Iterator[UniLoRALayer]:
        """The adapted layers, in flattening order."""
        yield from self._layers

    @property
    def total_size(self) -> int:
        """``D``, the number of LoRA parameters represented by ``theta_d``."""
        return self.projection.total

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts."""
        trainable = 0
        total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    @torch.no_grad()
    def lora_matrices(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``name -> (A, B)`` for every adapted module (float32 copies, detached)."""
        theta_big = self._rebuild().detach()
        return {
            layer.spec.name: tuple(m.clone() for m in layer.lora_matrices(theta_big))  # type: ignore[misc]
            for layer in self.unilora_layers()
        }

    def set_index_mode(self, mode: str, backend: str | None = None) -> None:
        """Switches between ``"on_the_fly"`` and ``"cached"`` indices (and the backend)."""
        if mode not in INDEX_MODES:
            raise InvalidArgumentError(
                f"index mode {mode!r} is not one of {', '.join(INDEX_MODES)}"
            )
        if backend is not None:
            resolve_backend(self.theta_d.device, backend)
            self.backend = backend
        self.index_mode = mode
        self._sync_index_map()
        self._state.clear()

    # ------------------------------------------------------------------ merging

    def merge_adapter(self) -> None:
        """Adds every ``delta W`` into the base weights (the LoRA branch is then skipped)."""
        with torch.no_grad():
            theta_big = self._rebuild()
            for layer in self.unilora_layers():
                layer.merge(theta_big)
        self._state.clear()

    def unmerge_adapter(self) -> None:
        """Subtracts the merged ``delta W`` again (exact in float32 up to rounding)."""
        with torch.no_grad():
            theta_big = self._rebuild()
            for layer in self.unilora_layers():
                layer.unmerge(theta_big)
        self._state.clear()

    def _unload(self, merge: bool) -> nn.Module:
        if merge:
            self.merge_adapter()
        for layer in list(self.unilora_layers()):
            parent, child, _ = _get_submodule(self.base_model, layer.spec.name)
            setattr(parent, child, layer.base_layer)
        self._hook.remove()
        self._state.clear()
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """Merges the adapter into the base weights and returns the plain base model."""
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """Removes the Uni-LoRA layers without merging; returns the base model."""
        for layer in self.unilora_layers():
            if layer.merged:
                raise InvalidArgumentError(
                    "unload() on a merged model: call unmerge_adapter() first"
                )
        return self._unload(merge=False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the context the model computes the base model's outputs."""
        merged = [layer for layer in self.unilora_layers() if layer.merged]
        if merged:
            self.unmerge_adapter()
        self._state.disabled = True
        try:
            yield
        finally:
            self._state.disabled = False
            if merged:
                self.merge_adapter()

    # ------------------------------------------------------------------ saving / loading

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        **_: Any,
    ) -> Path | None:
        """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` (SPEC.md section 3).

        modules_to_save tensors are stored under their base state-dict names; bfloat16
        tensors are stored as float32 (exact) since the format is read with numpy.

        Under FSDP2 or DeepSpeed ZeRO-3 (``theta_d`` sharded) call it on every rank with
        ``is_main_process=(rank == 0)``: the tensors are gathered (a collective) and only
        the main process writes. ``state_dict`` (this model's keys, e.g. a full state dict
        from ``torch.distributed.checkpoint.state_dict.get_model_state_dict``, as
        ``Trainer`` passes it) supplies the tensors instead of the live parameters.
        """
        theta_t = state_dict["theta_d"] if state_dict is not None else self.theta_d
        theta = _full_tensor(theta_t).detach().to("cpu", torch.float32).numpy()
        extra: dict[str, np.ndarray] = {}
        for name in self.saved_module_names:
            module = self.base_model.get_submodule(name)
            for pname, p in module.state_dict().items():
                if state_dict is not None:
                    p = state_dict[f"base_model.{name}.{pname}"]
                t = _full_tensor(p).detach().to("cpu")
                if t.dtype == torch.bfloat16:
                    t = t.to(torch.float32)
                extra[f"{name}.{pname}"] = t.contiguous().numpy()
        if not is_main_process:
            return None
        if not np.isfinite(theta).all():
            raise VectorError("theta_d holds NaN or Inf: refusing to save a broken adapter")
        return save_adapter(save_directory, self.adapter_config, theta, extra, self.projection.map)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload Uni-LoRA adapter",
    ) -> str:
        """Saves the adapter to a temporary folder and uploads it with ``huggingface_hub``."""
        import tempfile

        import huggingface_hub

        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message
            )
        return str(getattr(info, "commit_url", info))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter: str | os.PathLike[str],
        *,
        is_trainable: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        index_mode: str = "on_the_fly",
        backend: str = "auto",
        dropout: float = 0.0,
    ) -> UniLoRAModel:
        """Loads an adapter from a local folder or a Hub repo id onto ``model``.

        The adapter is checked as the Rust merge checks it (a changed seed, ``d`` or
        module list raises :class:`MismatchError`), the recorded modules must exist in
        ``model`` with the recorded kind and shapes, and ``theta_d`` must be finite.
        With ``is_trainable=False`` (the default) nothing requires grad and the model is
        in eval mode, as with PEFT; with ``is_trainable=True`` the mode is left as is.
        """
        directory = _resolve_adapter_dir(adapter, revision, subfolder, token, cache_dir)
        adapter_cfg, theta, extra = load_adapter(directory)
        config = UniLoRAConfig.from_adapter_config(
            adapter_cfg,
            index_mode=index_mode,
            backend=backend,
            dropout=dropout,
            projection_map=load_projection_map(directory),
        )
        saved = find_modules_to_save(model, config)
        if sorted(saved) != sorted(adapter_cfg.modules_to_save):
            raise MismatchError(
                f"{directory}: modules_to_save {adapter_cfg.modules_to_save} resolve to "
                f"{saved} in this model"
            )
        _load_saved_tensors(model, extra, directory)
        wrapped = cls(model, config, modules=adapter_cfg.modules)
        if wrapped.adapter_config.fingerprint != adapter_cfg.fingerprint:
            raise MismatchError(f"{directory}: fingerprint differs after resolving the modules")
        with torch.no_grad():
            wrapped.theta_d.copy_(torch.from_numpy(theta))
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
            wrapped.eval()
        return wrapped


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter, gathered from every rank (a collective):
    an FSDP2 DTensor or a DeepSpeed ZeRO-3 partitioned parameter; else ``t``."""
    full = getattr(t, "full_tensor", None)
    if callable(full):
        return full()
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone()
    return t


def _name_or_path(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _refuse_peft_model(model: nn.Module) -> None:
    peft_layers = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")}
    )
    if peft_layers or hasattr(model, "peft_config"):
        raise InvalidArgumentError(
            f"the model already holds PEFT layers ({', '.join(peft_layers) or 'a PEFT model'}); "
            "Uni-LoRA does not stack on another tuner: give get_unilora_model the base model, "
            "or merge_and_unload() the PEFT model first"
        )


def _check_modules_exist(model: nn.Module, specs: Sequence[ModuleSpec]) -> None:
    for spec in specs:
        try:
            module = model.get_submodule(spec.name)
        except AttributeError:
            raise MismatchError(
                f"adapter module {spec.name!r} does not exist in the base model "
                f"({type(model).__name__}); is this the base model the adapter was trained on?"
            ) from None
        kind = module_kind(module)
        if kind != spec.kind:
            raise MismatchError(
                f"adapter module {spec.name!r} is {spec.kind!r} but the base model has a "
                f"{type(module).__name__} there"
            )
        fan_in, fan_out = module_features(module, kind)
        if (fan_in, fan_out) != (spec.in_features, spec.out_features):
            raise MismatchError(
                f"adapter module {spec.name!r} was trained on in={spec.in_features}, "
                f"out={spec.out_features} but the base model's layer has in={fan_in}, out={fan_out}"
            )


def _load_saved_tensors(model: nn.Module, extra: dict[str, np.ndarray], source: Path) -> None:
    state = model.state_dict()
    for name, arr in extra.items():
        if name not in state:
            raise MismatchError(
                f"{source}: saved tensor {name!r} is not in the base model's state dict"
            )
        target = state[name]
        if tuple(arr.shape) != tuple(target.shape):
            raise MismatchError(
                f"{source}: saved tensor {name!r} has shape {tuple(arr.shape)}, the base model "
                f"has {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(target.dtype))


def _resolve_adapter_dir(
    adapter: str | os.PathLike[str],
    revision: str | None,
    subfolder: str | None,
    token: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Path:
    path = Path(adapter)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return path
    text = str(adapter)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(2, "adapter folder not found", str(path))
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError(
            f"{text!r} is not a local folder; loading from the Hub needs huggingface_hub "
            "(pip install 'unilora_rs[hub]')"
        ) from err
    files = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        files[filename] = huggingface_hub.hf_hub_download(
            repo_id=text,
            filename=filename,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
        )
    folder = Path(files[CONFIG_NAME]).parent
    if Path(files[WEIGHTS_NAME]).parent != folder:
        raise MismatchError(f"hub download of {text!r} put config and weights in different folders")
    return folder


def get_unilora_model(model: nn.Module, config: UniLoRAConfig) -> UniLoRAModel:
    """Wraps ``model``: adds Uni-LoRA layers to the targets, freezes everything except
    ``theta_d`` (and ``modules_to_save``). The model is modified in place."""
    return UniLoRAModel(model, config)
