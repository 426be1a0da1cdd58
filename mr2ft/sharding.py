"""The model and optimizer as Accelerate holds them: whole on every process, sharded by FSDP, or inside a DeepSpeed
ZeRO-1/2 engine.

Owns: which sharding a run has (:func:`sharding`; a checkpoint resumes only under the same), the full weights of a
possibly sharded model (:func:`full_weights`, gathered), the finite check over every process's shards
(:func:`weights_finite`), the hooks that keep ``accelerator.save_state`` / ``load_state`` off the model when it is
unsharded (:func:`keep_full_weights_ours`), and reading ``save_state``'s folder back safely
(:func:`check_accelerate_files`, :func:`load_state`). The checkpoint format around them is :mod:`mr2ft.checkpoints`.

Safety. Accelerate reads its own files with ``torch.load(weights_only=True)`` (numpy's RNG arrays allowed), but
torch's distributed checkpoints (FSDP's ``SHARDED_STATE_DICT``) keep a ``.metadata`` pickle that torch reads with
plain ``pickle.load``. :func:`check_accelerate_files` reads every file first: ``weights_only=True``, and
``.metadata`` with only torch's checkpoint-metadata classes allowed; anything else is refused in one line. DeepSpeed
reads its checkpoints (``pytorch_model/*_states.pt``) with ``torch.load(weights_only=False)``: they are read first
``weights_only=True`` with only four plain DeepSpeed classes allowed (:data:`DEEPSPEED_GLOBALS`); its
``zero_to_*.py`` recovery scripts and ``latest`` tag file are never run or read on resume. Under DeepSpeed only
ZeRO stages 1 and 2 run (ZeRO-3 partitions the weights, which mr2ft would have to gather).
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mr2ft.errors import UserError
from mr2ft.io import load_tensors


def _kind(accelerator: Any) -> str:
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))


def under_deepspeed(accelerator: Any) -> bool:
    """Whether Accelerate runs the model in a DeepSpeed engine."""
    return _kind(accelerator) == "DEEPSPEED"


def sharding(accelerator: Any) -> str | None:
    """How Accelerate shards the model and optimizer, e.g. ``"FSDP2 SHARDED_STATE_DICT"`` or ``"DeepSpeed ZeRO-2"``;
    None when every process holds them whole (one process, data parallel)."""
    if under_deepspeed(accelerator):
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != "FSDP" or plugin is None:
        return None
    kind = getattr(plugin.state_dict_type, "name", plugin.state_dict_type)
    return f"FSDP{plugin.fsdp_version} {kind}"


def refuse_unsupported(accelerator: Any, model_ema: bool, wise: bool) -> None:
    """Refuse, before any work, what cannot run under this accelerate config.

    Raises:
        UserError: Megatron-LM; DeepSpeed ZeRO stages other than 1 and 2; an FSDP config that Accelerate ignored (it
            shards on GPUs only); ``--model-ema`` or ``--wise-alpha`` under FSDP or DeepSpeed.
    """
    kind = _kind(accelerator)
    if kind == "MEGATRON_LM":
        raise UserError(
            "mr2ft does not run under Megatron-LM: its checkpoints can only be read back by unpickling them, which "
            "mr2ft never does; shard with FSDP or DeepSpeed ZeRO-1/2 instead"
        )
    if kind == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage not in (1, 2):
            raise UserError(
                f"mr2ft runs under DeepSpeed ZeRO stage 1 or 2 only, and this accelerate config asks for stage "
                f"{stage}; set zero_stage 1 or 2 (ZeRO-3 partitions the weights: shard them with FSDP instead)"
            )
        for flag, used in (("--model-ema", model_ema), ("--wise-alpha", wise)):
            if used:
                raise UserError(f"{flag} does not run under DeepSpeed; drop {flag} or run without DeepSpeed")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and kind != "DEEPSPEED":
        raise UserError(
            f"the accelerate config asks for DeepSpeed, which Accelerate did not apply, and this run is {kind} "
            "(it would silently run without it); check the config, or drop DeepSpeed (ACCELERATE_USE_DEEPSPEED=false)"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != "FSDP":
        raise UserError(
            f"the accelerate config asks for FSDP, which Accelerate applies on GPUs only, and this run is {kind} "
            "(it would silently run unsharded); run on GPUs, or drop FSDP from the config (ACCELERATE_USE_FSDP=false)"
        )
    if sharding(accelerator):
        for flag, used in (("--model-ema", model_ema), ("--wise-alpha", wise)):
            if used:
                raise UserError(
                    f"{flag} works on the whole weights, which FSDP shards over the processes; drop {flag} or run "
                    "without FSDP"
                )


def fit_deepspeed_config(accelerator: Any, grad_clip: float | None) -> None:
    """Under DeepSpeed, which clips gradients itself (Accelerate's ``clip_grad_norm_`` does nothing there and its
    default config clips at 1.0): make the config clip as ``--grad-clip`` says (no clipping without it). Call before
    ``accelerator.prepare``; nothing without DeepSpeed.

    Raises:
        UserError: the DeepSpeed config sets another ``gradient_clipping`` than ``--grad-clip``.
    """
    if not under_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    want = float(grad_clip or 0.0)
    have = config.get("gradient_clipping", "auto")
    if have == "auto":
        config["gradient_clipping"] = want
    elif float(have) != want:
        raise UserError(
            f"the DeepSpeed config clips gradients at {have} and --grad-clip is {grad_clip}; make them agree (or set "
            "gradient_clipping: auto in the DeepSpeed config to follow --grad-clip)"
        )


def keep_full_weights_ours(accelerator: Any) -> None:
    """Unsharded, the model's weights are ``model.safetensors`` alone (what eval and export read): these hooks
    keep ``save_state`` / ``load_state`` to the optimizer, scaler and RNG states. Under FSDP and DeepSpeed Accelerate
    saves and loads the model itself (these lists are then empty) and ``model.safetensors`` is the gathered copy."""
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())


def full_weights(accelerator: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights on the CPU, cloned (tied weights fit safetensors); ``{}`` on processes other than
    the main one. Under FSDP the weights are gathered, so every process must call this at the same point."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return {}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def weights_finite(accelerator: Any, model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite on every process (each checks its own shards;
    one all-reduce). Every process must call this at the same point."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers())]
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    bad = (~torch.stack(checks).all()).float().reshape(1) if checks else torch.zeros(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.to(accelerator.device), reduction="sum")
    return not bool(bad.sum())


def load_state(accelerator: Any, folder: Path) -> None:
    """``accelerator.load_state(folder)`` after :func:`check_accelerate_files`, every failure one line.

    Raises:
        UserError: a damaged, foreign or unsafe file, or states of another model.
    """
    check_accelerate_files(folder)
    try:
        accelerator.load_state(str(folder))
    except Exception as e:  # a missing file, the states of another model, a foreign folder
        raise UserError(
            f"{folder} does not fit this run ({e.__class__.__name__}: {str(e).splitlines()[0][:160]}); resume an "
            "earlier checkpoint or start a new run with another --out"
        ) from None


# What a torch.distributed.checkpoint ``.metadata`` file may name besides torch dtypes and the classes defined in
# torch.distributed.checkpoint.metadata.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


# The classes DeepSpeed (0.19, ZeRO-1/2) pickles into its ``*_optim_states.pt`` besides tensors and plain values:
# plain data (no __setstate__, __reduce__ or __new__ of their own; the enum is a lookup by value). Read with
# ``weights_only=True``, these are built with ``__new__`` and their ``__dict__`` set, nothing else runs.
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # fp16
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _deepspeed_globals() -> list[Any]:
    """The classes of :data:`DEEPSPEED_GLOBALS` that this DeepSpeed has ([] without DeepSpeed: its files are then
    refused, as they name classes that are not allowed)."""
    found = []
    for module, name in DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def _is_deepspeed_file(path: Path) -> bool:
    return path.suffix == ".pt" and path.name.endswith(("_model_states.pt", "_optim_states.pt"))


class _NotAllowed(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:  # no attribute paths (pickle resolves "a.b" from module to module)
            if (module, name) in _METADATA_GLOBALS:
                return super().find_class(module, name)
            if module in ("torch", _METADATA_MODULE):
                found = getattr(importlib.import_module(module), name, None)
                if isinstance(found, torch.dtype):
                    return found
                if isinstance(found, type) and found.__module__ == _METADATA_MODULE:
                    return found
        raise _NotAllowed(f"{module}.{name} is not allowed in checkpoint metadata")


def check_accelerate_files(folder: Path) -> None:
    """Read every file of a ``save_state`` folder as Accelerate and torch will, but safely, before they do.

    Raises:
        UserError: a file that is unreadable, or that would unpickle anything but tensors and plain values.
    """
    from accelerate.utils import load as accelerate_load  # weights_only=True, numpy's RNG arrays allowed

    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} is missing; resume an earlier checkpoint or start again")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.name == ".metadata":
                with open(path, "rb") as fh:
                    _MetadataUnpickler(fh).load()
            elif path.suffix == ".safetensors":
                load_tensors(path)
            elif _is_deepspeed_file(path):
                with torch.serialization.safe_globals(_deepspeed_globals()):
                    accelerate_load(path, map_location="cpu", mmap=True)
            elif path.parent == folder and (path.name == "latest" or path.name.startswith("zero_to_")):
                continue  # DeepSpeed's tag file (Accelerate passes the tag) and recovery scripts: never read or run
            elif path.suffix != ".distcp":  # .distcp: raw tensor bytes; torch reads its other items weights_only
                accelerate_load(path, map_location="cpu", mmap=True)
        except Exception as e:  # (torch's own message would suggest weights_only=False: not repeated here)
            why = str(e) if isinstance(e, _NotAllowed) else e.__class__.__name__
            raise UserError(
                f"checkpoint file {path} is unreadable or holds more than tensors ({why}); resume an earlier "
                "checkpoint (pass its checkpoints/ckpt-* folder to --resume) or start again with --overwrite"
            ) from None


__all__ = [
    "DEEPSPEED_GLOBALS",
    "check_accelerate_files",
    "fit_deepspeed_config",
    "full_weights",
    "keep_full_weights_ours",
    "load_state",
    "refuse_unsupported",
    "sharding",
    "under_deepspeed",
    "weights_finite",
]
