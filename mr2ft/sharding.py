"""The model and optimizer as Accelerate holds them: whole on every process, or sharded by FSDP.

Owns: which sharding a run has (:func:`sharding`; a checkpoint resumes only under the same), the full weights of a
possibly sharded model (:func:`full_weights`, gathered), the finite check over every process's shards
(:func:`weights_finite`), the hooks that keep ``accelerator.save_state`` / ``load_state`` off the model when it is
unsharded (:func:`keep_full_weights_ours`), and reading ``save_state``'s folder back safely
(:func:`check_accelerate_files`, :func:`load_state`). The checkpoint format around them is :mod:`mr2ft.checkpoints`.

Safety. Accelerate reads its own files with ``torch.load(weights_only=True)`` (numpy's RNG arrays allowed), but
torch's distributed checkpoints (FSDP's ``SHARDED_STATE_DICT``) keep a ``.metadata`` pickle that torch reads with
plain ``pickle.load``. :func:`check_accelerate_files` reads every file first: ``weights_only=True``, and
``.metadata`` with only torch's checkpoint-metadata classes allowed; anything else is refused in one line. DeepSpeed
reads its checkpoints by unpickling them, so mr2ft does not run under it (:func:`refuse_unsupported`).
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


def sharding(accelerator: Any) -> str | None:
    """How Accelerate shards the model and optimizer, e.g. ``"FSDP2 SHARDED_STATE_DICT"``; None when every process
    holds them whole (one process, data parallel)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != "FSDP" or plugin is None:
        return None
    kind = getattr(plugin.state_dict_type, "name", plugin.state_dict_type)
    return f"FSDP{plugin.fsdp_version} {kind}"


def refuse_unsupported(accelerator: Any, model_ema: bool, wise: bool) -> None:
    """Refuse, before any work, what cannot run under this accelerate config.

    Raises:
        UserError: DeepSpeed or Megatron-LM; an FSDP config that Accelerate ignored (it shards on GPUs only);
            ``--model-ema`` or ``--wise-alpha`` under FSDP.
    """
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    name = {"DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}.get(kind)
    if name:
        raise UserError(
            f"mr2ft does not run under {name}: its checkpoints can only be read back by unpickling them, which mr2ft "
            "never does; shard with FSDP instead (accelerate config: distributed_type FSDP)"
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


def keep_full_weights_ours(accelerator: Any) -> None:
    """Unsharded, the model's weights are ``model.safetensors`` alone (what eval and export read): these hooks
    keep ``save_state`` / ``load_state`` to the optimizer, scaler and RNG states. Under FSDP Accelerate saves and
    loads the model itself (these lists are then empty) and ``model.safetensors`` is the gathered copy."""
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
            elif path.suffix != ".distcp":  # .distcp: raw tensor bytes; torch reads its other items weights_only
                accelerate_load(path, map_location="cpu", mmap=True)
        except Exception as e:  # (torch's own message would suggest weights_only=False: not repeated here)
            why = str(e) if isinstance(e, _NotAllowed) else e.__class__.__name__
            raise UserError(
                f"checkpoint file {path} is unreadable or holds more than tensors ({why}); resume an earlier "
                "checkpoint (pass its checkpoints/ckpt-* folder to --resume) or start again with --overwrite"
            ) from None


__all__ = [
    "check_accelerate_files",
    "full_weights",
    "keep_full_weights_ours",
    "load_state",
    "refuse_unsupported",
    "sharding",
    "weights_finite",
]
