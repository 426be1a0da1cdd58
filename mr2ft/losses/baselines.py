"""Baseline objectives behind MR2's call shape: ``forward(logits, features, targets) -> dict`` with ``loss``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mr2ft.errors import UserError


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


class CrossEntropy(nn.Module):
    """Plain cross-entropy, optionally at a global logit temperature (``logits / temperature``).

    ``weight`` in :meth:`forward` gives per-sample weights (JTT, LfF); the weighted mean is normalised by the
    sum of weights.
    """

    def __init__(self, num_classes: int, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise UserError(f"temperature must be positive, got {temperature}")
        self.num_classes = num_classes
        self.temperature = float(temperature)

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor | None,
        targets: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        ce = _weighted_mean(F.cross_entropy(logits.float() / self.temperature, targets, reduction="none"), weight)
        return {"loss": ce, "ce": ce.detach()}


class FocalLoss(nn.Module):
    """Focal loss ``-(1 - p_t)^g log p_t`` (Lin et al. 2017)."""

    def __init__(self, num_classes: int, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if focal_gamma < 0:
            raise UserError(f"focal gamma must be >= 0, got {focal_gamma}")
        self.num_classes = num_classes
        self.focal_gamma = float(focal_gamma)

    def forward(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor) -> dict:
        logp = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        loss = (-(1.0 - logp.exp()).pow(self.focal_gamma) * logp).mean()
        return {"loss": loss, "ce": (-logp.mean()).detach()}


def _counts(class_counts: torch.Tensor | list | None, num_classes: int) -> torch.Tensor:
    if class_counts is None:
        return torch.ones(num_classes)
    c = torch.as_tensor(class_counts, dtype=torch.float64)
    if c.shape != (num_classes,):
        raise UserError(f"class_counts has {tuple(c.shape)} entries but the dataset has {num_classes} classes")
    return c.clamp(min=1)


class LDAMLoss(nn.Module):
    """LDAM (Cao et al. 2019): subtract ``m_k ∝ n_k^(-1/4)`` (largest ``max_margin``) from the true logit, then
    cross-entropy of ``ldam_scale`` (s = 30) times the result.

    As in LDAM-DRW, the logits must be cosine similarities from a normalised head (``NormedLinear``: normalised
    features and class weights, see :class:`mr2ft.heads.LinearHead` with ``cosine=True``): s = 30 is a scale for
    logits in [-1, 1] and would be meaningless on a plain linear head's logits.
    """

    def __init__(self, num_classes: int, class_counts=None, max_margin: float = 0.5, ldam_scale: float = 30.0) -> None:
        super().__init__()
        m = _counts(class_counts, num_classes).pow(-0.25)
        self.register_buffer("class_margins", (m * (max_margin / m.max())).float())
        self.num_classes = num_classes
        self.ldam_scale = float(ldam_scale)

    def forward(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor) -> dict:
        f = logits.float() - F.one_hot(targets, self.num_classes).float() * self.class_margins[targets][:, None]
        loss = F.cross_entropy(self.ldam_scale * f, targets)
        return {"loss": loss, "ce": loss.detach()}


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted / balanced-softmax loss (Menon et al. 2021): CE on ``logits + tau * log prior``."""

    def __init__(self, num_classes: int, class_counts=None, tau: float = 1.0) -> None:
        super().__init__()
        c = _counts(class_counts, num_classes)
        self.register_buffer("log_prior", (c / c.sum()).log().float())
        self.num_classes = num_classes
        self.tau = float(tau)

    def forward(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor) -> dict:
        loss = F.cross_entropy(logits.float() + self.tau * self.log_prior, targets)
        return {"loss": loss, "ce": loss.detach()}


class ClassDROLoss(nn.Module):
    """Online group DRO over classes (Sagawa et al. 2020, ``LossComputer.compute_robust_loss``), groups = classes.

    Each training step: the batch's per-class mean losses ``loss_g`` (0 for a class absent from the batch, as in the
    original), then ``q_g <- q_g * exp(eta * loss_g)`` and q renormalised over all classes, and the loss is
    ``sum_g q_g * loss_g`` with the updated q (the original's ``group_loss @ adv_probs``; absent classes add
    nothing, and the sum is not renormalised over the classes present). In eval mode q is not updated. q is state
    (a buffer) and checkpointed.
    """

    def __init__(self, num_classes: int, dro_step_size: float = 0.01) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dro_step_size = float(dro_step_size)
        self.register_buffer("q", torch.full((num_classes,), 1.0 / num_classes))

    def forward(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor) -> dict:
        per_sample = F.cross_entropy(logits.float(), targets, reduction="none")
        counts = torch.bincount(targets, minlength=self.num_classes).float()
        class_loss = torch.zeros(self.num_classes, device=logits.device).index_add(0, targets, per_sample)
        class_loss = class_loss / counts.clamp(min=1)
        if self.training:
            with torch.no_grad():
                q = self.q * torch.exp(self.dro_step_size * class_loss.detach())
                self.q.copy_(q / q.sum())
        loss = class_loss @ self.q
        return {"loss": loss, "ce": per_sample.mean().detach(), "q_max": self.q.max().detach()}
