"""Training objectives: MR2, its matched uniform-margin control, and baselines, behind one registry.

Every loss is an ``nn.Module`` whose ``forward(logits, features, targets)`` returns a dict with ``loss`` (to
backpropagate) and detached components to log. Add a loss with one builder function and ``@register_loss``.

Example::

    loss_fn = build_loss("mr2", num_classes=100, feature_dim=768, c_bar=1.0, lambda_rep=0.1)
    out = loss_fn(logits, features, targets)
    out["loss"].backward()
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from mr2ft.errors import UserError
from mr2ft.losses.baselines import ClassDROLoss, CrossEntropy, FocalLoss, LDAMLoss, LogitAdjustedLoss
from mr2ft.losses.mr2 import MR2Loss, WatchedLoss, default_p, representation_margin
from mr2ft.losses.stats import ClassStatistics

LossBuilder = Callable[..., nn.Module]
LOSSES: dict[str, LossBuilder] = {}
LOSS_HELP: dict[str, str] = {}

# Losses that keep per-class feature statistics (MR2Loss: mr2 sets its margins from them; the uniform control keeps
# the same statistics but gives every class c_bar). Ask :func:`keeps_class_statistics`, not this set.
_KEEP_CLASS_STATISTICS = frozenset({"mr2", "uniform"})


def keeps_class_statistics(name: str) -> bool:
    """Whether the loss ``name`` keeps class statistics of the features (and so needs the features passed, takes
    ``c_bar``, checkpoints the statistics and reports them as the margins it applied)."""
    return name in _KEEP_CLASS_STATISTICS


def register_loss(name: str, help: str) -> Callable[[LossBuilder], LossBuilder]:
    """Register ``builder(num_classes, feature_dim, **settings) -> nn.Module`` under ``name``."""

    def deco(fn: LossBuilder) -> LossBuilder:
        LOSSES[name] = fn
        LOSS_HELP[name] = help
        return fn

    return deco


def list_losses() -> list[str]:
    """Names accepted by ``--loss`` (training objectives; the probe adds its two-pass comparators)."""
    return list(LOSSES)


def build_loss(name: str, num_classes: int, feature_dim: int, **settings) -> nn.Module:
    """Build a registered loss. Settings a loss does not use are ignored, so a whole config can be passed.

    Raises:
        UserError: ``name`` is not registered (the message lists the valid names).
    """
    if name not in LOSSES:
        close = difflib.get_close_matches(name, list(LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown loss {name!r}{hint}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](num_classes, feature_dim, **settings)


def _mr2_kwargs(settings: dict) -> dict:
    keys = ("c_bar", "lambda_rep", "p", "momentum", "margin_mode", "normalize_features", "temperature_factor")
    return {k: settings[k] for k in keys if settings.get(k) is not None}


@register_loss("ce", "plain cross-entropy (ERM), optionally at a global logit temperature")
def _ce(num_classes: int, feature_dim: int, temperature: float = 1.0, **_) -> nn.Module:
    return CrossEntropy(num_classes, temperature=temperature)


@register_loss("mr2", "MR2: class-dependent logit margins from feature spread + representation margin")
def _mr2(num_classes: int, feature_dim: int, **settings) -> nn.Module:
    return MR2Loss(num_classes, feature_dim, **_mr2_kwargs(settings))


@register_loss("uniform", "matched control: MR2 with the same margin c_bar for every class")
def _uniform(num_classes: int, feature_dim: int, **settings) -> nn.Module:
    return MR2Loss(num_classes, feature_dim, class_dependent=False, **_mr2_kwargs(settings))


@register_loss("focal", "focal loss (gamma 2)")
def _focal(num_classes: int, feature_dim: int, focal_gamma: float = 2.0, **_) -> nn.Module:
    return FocalLoss(num_classes, focal_gamma=focal_gamma)


@register_loss("ldam", "LDAM: margins from class counts (uniform on balanced data), s=30 on a cosine head's logits")
def _ldam(num_classes: int, feature_dim: int, class_counts=None, **_) -> nn.Module:
    return LDAMLoss(num_classes, class_counts=class_counts)


@register_loss("la", "logit adjustment / balanced softmax with class priors")
def _la(num_classes: int, feature_dim: int, class_counts=None, **_) -> nn.Module:
    return LogitAdjustedLoss(num_classes, class_counts=class_counts)


@register_loss("dro", "online group DRO over classes (Sagawa et al. 2020)")
def _dro(num_classes: int, feature_dim: int, dro_step_size: float = 0.01, **_) -> nn.Module:
    return ClassDROLoss(num_classes, dro_step_size=dro_step_size)


__all__ = [
    "ClassStatistics",
    "MR2Loss",
    "WatchedLoss",
    "CrossEntropy",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "ClassDROLoss",
    "LOSSES",
    "keeps_class_statistics",
    "build_loss",
    "default_p",
    "list_losses",
    "register_loss",
    "representation_margin",
]
