"""Classifier heads: linear, BatchNorm(affine=False)+linear (MAE's linear-probe protocol), zero-shot initialised."""

from __future__ import annotations

import torch
from torch import nn

from mr2ft.errors import UserError

HEADS = ("linear", "bn_linear", "zeroshot")


class LinearHead(nn.Module):
    """``Linear(d, K)``, optionally after ``BatchNorm1d(d, affine=False)``.

    ``features(x)`` returns what the linear layer sees (the input, or its batch-normalised version), which is what
    MR2's statistics are defined on.
    """

    def __init__(self, feature_dim: int, num_classes: int, batchnorm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.fc = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def build_head(
    kind: str, feature_dim: int, num_classes: int, zero_shot_weights: torch.Tensor | None = None, scale: float = 1.0
) -> LinearHead:
    """Build a head; ``zeroshot`` copies ``scale * zero_shot_weights`` (K, d) into the weight and zeroes the bias."""
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}")
    head = LinearHead(feature_dim, num_classes, batchnorm=kind == "bn_linear")
    if kind == "zeroshot":
        if zero_shot_weights is None:
            raise UserError("--head zeroshot needs a CLIP backbone (class-name prompts); use --head linear")
        if tuple(zero_shot_weights.shape) != (num_classes, feature_dim):
            shape = tuple(zero_shot_weights.shape)
            raise UserError(f"zero-shot weights have shape {shape}, expected ({num_classes}, {feature_dim})")
        with torch.no_grad():
            head.fc.weight.copy_(scale * zero_shot_weights.float())
            head.fc.bias.zero_()
    return head
