"""The fine-tune's optimizer: mr2ft's own parameter groups (layer-wise lr scales, no weight decay on norms and
biases, the head at scale 1) handed to timm's optimizer factory (``timm.optim.create_optimizer_v2``), so every name
in timm's registry works: adamw, lamb, lars, lion, nadamw, ... ``sgd`` keeps mr2ft's meaning (heavy-ball momentum
0.9, timm's ``momentum``); timm's Nesterov SGD is ``nesterov``.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from mr2ft.errors import UserError

ALIASES = {"sgd": "momentum"}  # mr2ft's sgd (momentum 0.9, no Nesterov) under timm's name for it


def check_optimizer(name: str) -> str:
    """The timm registry name of ``--optimizer name``.

    Raises:
        UserError: a name timm does not know (with the closest ones).
    """
    from timm.optim import list_optimizers

    known = list_optimizers()
    key = ALIASES.get(name.lower(), name.lower())
    if key not in known:
        close = difflib.get_close_matches(name.lower(), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (e.g. adamw, sgd, lamb, lars, lion)"
        raise UserError(f"unknown --optimizer {name!r}; choose one of timm's optimizers{hint}")
    return key


def build_optimizer(model: Any, bb: Any, cfg: Any) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the backbone's parameter groups (layer-wise lr scales, no decay on norms and biases)
    plus the head at lr scale 1. Each group's ``lr`` is ``cfg.lr * lr_scale``; the schedule multiplies it.

    Raises:
        RuntimeError: the groups miss or repeat a trainable parameter (a backbone bug, not a user error).
        UserError: an unknown optimizer, or one whose package is not installed.
    """
    from timm.optim import create_optimizer_v2

    groups = [dict(g) for g in bb.param_groups(cfg.lr, cfg.weight_decay, layer_decay=cfg.layer_decay)]
    groups.append({"params": [model.head.weight], "weight_decay": cfg.weight_decay, "lr_scale": 1.0})
    bias = getattr(model.head, "bias", None)  # a cosine (LDAM) head has none
    groups.append({"params": [] if bias is None else [bias], "weight_decay": 0.0, "lr_scale": 1.0})
    for g in groups:
        g["params"] = list(g["params"])
        g.setdefault("lr_scale", 1.0)
        g["lr"] = cfg.lr * g["lr_scale"]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if len(grouped) != len(set(grouped)) or set(grouped) != trainable:
        raise RuntimeError("parameter groups do not cover each trainable parameter exactly once")
    groups = [g for g in groups if g["params"]]
    name = check_optimizer(cfg.optimizer)
    try:
        # The groups carry their own weight decay; timm's filter applies to modules only.
        return create_optimizer_v2(groups, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
    except ImportError as e:
        raise UserError(f"--optimizer {cfg.optimizer} needs a package that is not installed ({e.name or e})") from None


__all__ = ["build_optimizer", "check_optimizer"]
