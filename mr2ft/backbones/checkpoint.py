"""Checkpoint files of backbone weights: read safely, the state dict found, loaded strictly, identified by content.

A checkpoint is read with safetensors or ``torch.load(weights_only=True)`` only. A state dict is loaded with the
MAE/MoCo habit of refusing any load whose missing or unexpected keys are not exactly the expected ones, so a
mis-load never goes silent; BatchNorm's ``num_batches_tracked`` counters, which TF ports and many published weights
omit (PyTorch itself accepts that), may be missing and are left at their defaults. :func:`file_identity` names the
weights by their content for the feature-cache key.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mr2ft.errors import UserError
from mr2ft.io import file_digest, readable_file

logger = logging.getLogger("mr2ft")

#: Buffers a checkpoint may lack: the model keeps its own value (BatchNorm's step counter, 0 when created).
OPTIONAL_BUFFERS = (r"(.*\.)?num_batches_tracked$",)


def file_identity(path: str | os.PathLike) -> str:
    """``resolved-path:sha256`` of a file's content, or of every file under a folder (sorted).

    Each file is hashed once (:func:`mr2ft.io.file_digest` remembers the digest by path, size, mtime, inode and
    ctime), so weights replaced by others of the same size and mtime get a new identity.
    """
    p = Path(path).resolve()
    if p.is_dir():
        parts = [f"{f.relative_to(p)}:{file_digest(f)}" for f in sorted(q for q in p.rglob("*") if q.is_file())]
        return f"{p}/[{';'.join(parts)}]"
    return f"{p}:{file_digest(p)}"


# ---- checkpoints -----------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file safely: ``.safetensors`` or ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        UserError: the file is missing, truncated, not a checkpoint, or holds pickled Python objects.
    """
    p = readable_file(path, "weights file", "pass an existing file with --weights")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError on truncated or foreign files
            raise UserError(f"weights file {p} is not a readable safetensors file ({e}); is it complete?") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(
            f"weights file {p} holds Python objects that a safe load (weights_only=True) refuses ({first[:200]}); "
            "save just the state dict (torch.save(model.state_dict(), path)) or use safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        # torch's reasons run to several sentences and lines; the error must stay one line
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise UserError(
            f"weights file {p} cannot be read as a PyTorch checkpoint ({e.__class__.__name__}: {reason}); "
            "is it complete and a .pth/.pt/.bin/.safetensors file?"
        ) from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, path: str | os.PathLike, keys: Sequence[str] = ("state_dict", "model")) -> dict:
    """The tensor dict inside a checkpoint: the object itself, or the first of ``keys`` that holds one.

    Raises:
        UserError: no state dict of tensors is found.
    """
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in keys:
            if key in obj and _is_tensor_dict(obj[key]):
                return dict(obj[key])
        top = ", ".join(str(k) for k in list(obj)[:8]) or "nothing"
        raise UserError(
            f"checkpoint {path} holds no state dict of tensors (top-level keys: {top}; looked in: "
            f"{', '.join(keys)}); pass a checkpoint of this backbone family"
        )
    raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; pass a weights file")


def _sample(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.match(p, name) for p in patterns)


def map_by_position(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], path: Any) -> dict:
    """Rename a checkpoint's tensors onto ``target``'s names by position, checking count and every shape.

    Raises:
        UserError: the counts differ or any shape differs.
    """
    src = list(state_dict.items())
    dst = list(target.items())
    if len(src) != len(dst):
        raise UserError(
            f"checkpoint {path}: no key matches the model and its {len(src)} tensors cannot map one-to-one by "
            f"position onto the model's {len(dst)} (checkpoint keys look like {_sample(k for k, _ in src)}; model "
            f"keys like {_sample(k for k, _ in dst)}); pass weights for this architecture"
        )
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst, strict=True)):
        if tuple(sv.shape) != tuple(dv.shape):
            raise UserError(
                f"checkpoint {path}: no key matches the model and mapping by position fails at tensor {i} "
                f"({sk} {tuple(sv.shape)} vs {dk} {tuple(dv.shape)}); pass weights for this architecture"
            )
    return {dk: sv for (_, sv), (dk, _) in zip(src, dst, strict=True)}


def load_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    path: Any,
    what: str,
    allowed_missing: Sequence[str] = (),
    allowed_unexpected: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Load ``state_dict`` into ``module`` only if it fits exactly.

    Every model key must be in the checkpoint (except those matching ``allowed_missing``, regexes, and BatchNorm's
    ``num_batches_tracked`` counters, which keep the model's own value), every
    checkpoint key must be in the model (except ``allowed_unexpected``), and every shape must agree. Otherwise a
    :class:`UserError` names up to five offending keys and the total count, so a mis-load never goes silent.

    Returns:
        ``{"missing": [...], "unexpected": [...]}``: the allowed keys that were missing or ignored.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_missing = [k for k in missing if not _matches(k, (*allowed_missing, *OPTIONAL_BUFFERS))]
    bad_unexpected = [k for k in unexpected if not _matches(k, allowed_unexpected)]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if len(missing) == len(own):
        raise UserError(
            f"checkpoint {path} does not hold a {what}: none of the model's {len(own)} keys is in it (checkpoint "
            f"keys look like {_sample(state_dict)}; model keys like {_sample(own)}); pass a checkpoint of this "
            "family and architecture"
        )
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have the wrong shape ({_sample(mismatched)})")
    if bad_missing:
        problems.append(f"{len(bad_missing)} model keys are missing ({_sample(bad_missing)})")
    if bad_unexpected:
        problems.append(f"{len(bad_unexpected)} checkpoint keys are unexpected ({_sample(bad_unexpected)})")
    if problems:
        raise UserError(
            f"checkpoint {path} does not fit {what}: {'; '.join(problems)}; pass a checkpoint of this family and "
            "architecture (check --model)"
        )
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    if missing or unexpected:
        logger.info(
            "loaded %s from %s; left missing as expected: %s; ignored as expected: %d keys (%s)",
            what,
            path,
            _sample(missing) or "none",
            len(unexpected),
            _sample(unexpected) or "none",
        )
    return {"missing": missing, "unexpected": unexpected}
