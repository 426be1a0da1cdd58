"""The fine-tuned model and what is done with it outside the training step.

Owns: :class:`Classifier` (a backbone plus a linear head, or a cosine one for LDAM, returning logits and the
features MR2 measures), CLIP's zero-shot head initialisation, ranked top-k evaluation over a prepared loader,
WiSE-FT weight interpolation, and the representation margin's gradient share (:func:`rep_grad_share`), gradient
checkpointing (:func:`enable_grad_checkpointing`) and the weight EMA (:class:`WeightEma`). Library level: torch,
:mod:`mr2ft.errors` and :mod:`mr2ft.heads`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from mr2ft.errors import UserError
from mr2ft.heads import cosine_logits


class CosineHead(nn.Module):
    """A cosine classifier (LDAM-DRW's ``NormedLinear``): normalised features times normalised weights, no bias.
    The state dict holds ``weight`` alone, which is how a saved fine-tune tells this head from a linear one."""

    cosine = True

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim).uniform_(-1, 1) / math.sqrt(feature_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight)


def make_head(feature_dim: int, num_classes: int, cosine: bool = False) -> nn.Module:
    """The fine-tune's head: linear, or cosine (LDAM, whose scale s multiplies cosine logits)."""
    return CosineHead(feature_dim, num_classes) if cosine else nn.Linear(feature_dim, num_classes)


class Classifier(nn.Module):
    """A backbone plus a head (linear; cosine for LDAM); ``forward`` returns ``(logits, features)``.

    ``features`` is the head's input and what MR2 measures: the backbone's output, which the backbone already
    L2-normalises when ``bb.normalize`` is on (CLIP).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, cosine: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = make_head(feature_dim, num_classes, cosine)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        return self.head(features), features


def init_zeroshot_head(model: Classifier, bb: Any, class_names: list[str], templates: list[str] | None = None) -> None:
    """Set the head to CLIP's zero-shot classifier: ``logit_scale * text embedding`` per class, bias 0.

    ``templates``: prompt templates holding ``{}`` (None: the backbone's defaults).

    Raises:
        UserError: the backbone has no text tower (from ``bb.text_classifier``).
    """
    with torch.no_grad():
        weights = bb.text_classifier(list(class_names), templates).float()
        model.head.weight.copy_(float(bb.logit_scale) * weights)
        model.head.bias.zero_()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranked top-k (k = min(5, K)) predictions and targets of a prepared loader, gathered from every process.

    ``gather_for_metrics`` drops the samples accelerate repeats to even out the last batch, so the counts per
    class are exact.
    """
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    all_targets, all_topk = [], []
    for x, y in loader:
        logits, _ = model(x)
        topk = logits.float().topk(k, dim=1).indices
        topk, y = accelerator.gather_for_metrics((topk, y))
        all_topk.append(topk.cpu())
        all_targets.append(y.cpu())
    model.train(was_training)
    if not all_targets:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(all_targets).long(), torch.cat(all_topk).long()


def apply_wise(model: nn.Module, zeroshot: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT: set every floating-point weight to ``(1 - alpha) * zero-shot + alpha * fine-tuned``, in place."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if value.is_floating_point():
                value.copy_(torch.lerp(zeroshot[key].to(value.device, value.dtype), value, alpha))


def enable_grad_checkpointing(backbone: nn.Module, what: str) -> None:
    """Recompute activations in the backward pass: timm and open_clip ``set_grad_checkpointing``, transformers
    ``gradient_checkpointing_enable`` (the outermost module that has one).

    Raises:
        UserError: no part of the model supports it.
    """
    for module in backbone.modules():
        for method in ("set_grad_checkpointing", "gradient_checkpointing_enable"):
            fn = getattr(module, method, None)
            if callable(fn):
                try:
                    fn(True) if method == "set_grad_checkpointing" else fn()
                except (AssertionError, NotImplementedError, ValueError):
                    break
                return
    raise UserError(f"the {what} model does not support gradient checkpointing; drop --grad-checkpointing")


class WeightEma:
    """An exponential moving average of a model's weights: after each optimizer step every floating-point
    parameter and buffer becomes ``decay * ema + (1 - decay) * weight`` (others are copied). ``module`` is a frozen
    copy of the model in eval mode, evaluated beside the raw weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for key, value in self.module.state_dict().items():
            if value.is_floating_point():
                value.lerp_(current[key].to(value.dtype), 1.0 - self.decay)
            else:
                value.copy_(current[key])


def weights_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one device sync)."""
    checks = [torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def rep_grad_share(out: dict[str, Any], features: torch.Tensor) -> float:
    """The representation margin's gradient share: ``||d(lambda_rep L_RM)/dz|| / ||d L_LM/dz||`` on ``features``.

    ``out`` is a loss's output; a loss with a representation margin (MR2) puts its two weighted terms, with their
    graphs, under ``out["terms"]`` as ``{"logit": ..., "rep": ...}``. Any other loss has no representation margin:
    its share is 0. The graphs are kept, so the step's own backward pass follows unchanged; no parameter's
    ``.grad`` is touched.
    """
    terms = out.get("terms")
    if not terms or not terms["rep"].requires_grad or not features.requires_grad:
        return 0.0
    norms = []
    for key in ("rep", "logit"):
        (grad,) = torch.autograd.grad(terms[key], features, retain_graph=True, allow_unused=True)
        norms.append(0.0 if grad is None else float(grad.float().norm()))
    rep, logit = norms
    if logit == 0.0:
        return 0.0 if rep == 0.0 else math.inf
    return rep / logit


__all__ = [
    "Classifier",
    "WeightEma",
    "apply_wise",
    "enable_grad_checkpointing",
    "evaluate",
    "init_zeroshot_head",
    "rep_grad_share",
    "weights_finite",
]
