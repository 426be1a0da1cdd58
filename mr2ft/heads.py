"""Classifier heads on fixed features: linear, BatchNorm(affine=False)+linear (MAE's linear-probe protocol), cosine
(LDAM's normalised head) and zero-shot initialised; plus rebuilding a saved head from its tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mr2ft.errors import UserError

HEADS = ("linear", "bn_linear", "zeroshot", "cosine")


def cosine_logits(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LDAM-DRW's ``NormedLinear``: normalised features times normalised class weights (cosines in [-1, 1])."""
    return F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).T


class LinearHead(nn.Module):
    """``Linear(d, K)``, optionally after ``BatchNorm1d(d, affine=False)``; or a cosine classifier.

    ``features(x)`` returns what the classifier sees (the input, or its batch-normalised version), which is what
    MR2's statistics are defined on; ``classify(z)`` maps those features to logits. With ``cosine`` the logits are
    ``normalize(z) @ normalize(W).T`` (no bias), in [-1, 1]: LDAM-DRW's ``NormedLinear`` (Cao et al. 2019), whose
    loss scales them by s = 30.
    """

    def __init__(self, feature_dim: int, num_classes: int, batchnorm: bool = False, cosine: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.fc = nn.Linear(feature_dim, num_classes, bias=not cosine)
        self.cosine = cosine

    @property
    def is_linear(self) -> bool:
        """True for a plain affine map of the input (no BatchNorm, not cosine)."""
        return not self.cosine and isinstance(self.norm, nn.Identity)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            return cosine_logits(z, self.fc.weight)
        return self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(x))


def build_head(
    kind: str,
    feature_dim: int,
    num_classes: int,
    zero_shot_weights: torch.Tensor | None = None,
    scale: float = 1.0,
    cosine: bool = False,
) -> LinearHead:
    """Build a head; ``zeroshot`` copies ``scale * zero_shot_weights`` (K, d) into the weight and zeroes the bias.

    ``cosine`` (or ``kind="cosine"``) makes the classifier a cosine one; with ``zeroshot`` it starts from the prompt
    directions (the scale does not matter to a cosine head).
    """
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r}; choose one of: {', '.join(HEADS)}")
    head = LinearHead(feature_dim, num_classes, batchnorm=kind == "bn_linear", cosine=cosine or kind == "cosine")
    if kind == "zeroshot":
        if zero_shot_weights is None:
            raise UserError("--head zeroshot needs a CLIP backbone (class-name prompts); use --head linear")
        if tuple(zero_shot_weights.shape) != (num_classes, feature_dim):
            shape = tuple(zero_shot_weights.shape)
            raise UserError(f"zero-shot weights have shape {shape}, expected ({num_classes}, {feature_dim})")
        with torch.no_grad():
            head.fc.weight.copy_(scale * zero_shot_weights.float())
            if head.fc.bias is not None:
                head.fc.bias.zero_()
    return head


def head_from_state(feature_dim: int, num_classes: int, tensors: dict[str, torch.Tensor]) -> LinearHead:
    """An empty head of the kind a saved ``head.safetensors`` holds (BatchNorm if it has running statistics, cosine
    if it has no bias), ready for ``load_state_dict(tensors)``."""
    return LinearHead(
        feature_dim, num_classes, batchnorm="norm.running_mean" in tensors, cosine="fc.bias" not in tensors
    )


@torch.no_grad()
def to_standard_coordinates(head: LinearHead, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Rewrite a linear head on raw features ``x`` as the same map of ``(x - mean) / std`` (in place)."""
    w = head.fc.weight
    head.fc.bias.add_(w @ mean)
    w.mul_(std[None, :])


@torch.no_grad()
def from_standard_coordinates(head: LinearHead, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold ``(x - mean) / std`` back into a linear head trained on standardised features (in place): the head then
    reads raw features and gives the same logits."""
    w = head.fc.weight
    w.div_(std[None, :])
    head.fc.bias.sub_(w @ mean)
