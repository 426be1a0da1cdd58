"""Per-class feature statistics that set MR2's margins.

For each class k: ``M_k = ||mu_k||_p^2`` (squared p-norm of the class mean), ``S_k = mean_i ||z_i - mu_k||_p^2``
(spread), and ``S2_k``, the spread in L2 whatever p is (used by the representation margin).

Under gradient accumulation the statistics step once per optimizer step: :meth:`ClassStatistics.collect` pools the
micro-batches of a step and :meth:`ClassStatistics.commit` applies one EMA update from all of them, so a step of
A micro-batches of B gives the statistics one batch of A x B gives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _pnorm_sq(x: torch.Tensor, p: float) -> torch.Tensor:
    """Row-wise squared p-norm, ``||x||_p^2``."""
    if p == 2.0:
        return x.pow(2).sum(dim=1)
    return x.abs().pow(p).sum(dim=1).pow(2.0 / p)


def gather_batch(features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every process's batch, in rank order, when a process group is initialised.

    Batches may differ in size across ranks (a last, short batch), so sizes are exchanged first and each batch is
    padded to the largest before ``all_gather``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, targets
    world = dist.get_world_size()
    n = torch.tensor([features.shape[0]], device=features.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_ = [int(s.item()) for s in sizes]
    top = max(sizes_)
    pad = top - features.shape[0]
    f = torch.cat([features, features.new_zeros(pad, features.shape[1])]) if pad else features
    t = torch.cat([targets, targets.new_zeros(pad)]) if pad else targets
    fs = [torch.empty_like(f) for _ in range(world)]
    ts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(fs, f.contiguous())
    dist.all_gather(ts, t.contiguous())
    return (
        torch.cat([x[:s] for x, s in zip(fs, sizes_, strict=True)]),
        torch.cat([x[:s] for x, s in zip(ts, sizes_, strict=True)]),
    )


class ClassStatistics(nn.Module):
    """Class-wise feature mean norm (M), spread (S, in Lp) and L2 spread (S2), kept as float32 buffers.

    Args:
        num_classes: K, the dataset's true number of classes.
        feature_dim: d, the width of the features that feed the classifier.
        p: norm used for M and S (S2 is always L2).
        momentum: EMA momentum beta for :meth:`update` (new = beta * old + (1 - beta) * batch).
    """

    def __init__(self, num_classes: int, feature_dim: int, p: float = 2.0, momentum: float = 0.9) -> None:
        super().__init__()
        if num_classes < 1 or feature_dim < 1:
            raise ValueError(f"num_classes and feature_dim must be positive, got {num_classes}, {feature_dim}")
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.p = float(p)
        self.momentum = float(momentum)
        self.register_buffer("M", torch.zeros(num_classes, dtype=torch.float32))
        self.register_buffer("S", torch.zeros(num_classes, dtype=torch.float32))
        self.register_buffer("S2", torch.zeros(num_classes, dtype=torch.float32))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # micro-batches collected, not yet applied

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, p={self.p}, momentum={self.momentum}"

    @torch.no_grad()
    def batch_statistics(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """M, S, S2 and counts of one batch (zeros for absent classes), in float32, without a loop over classes.

        The work is done over the classes present in the batch only (at most B of them), then scattered into
        K-sized vectors, so the cost does not grow with K.
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = features.detach().float()
            classes, y = torch.unique(targets.long(), return_inverse=True)
            n = torch.bincount(y, minlength=classes.numel()).to(z.dtype)
            mu = torch.zeros(classes.numel(), z.shape[1], device=z.device, dtype=z.dtype).index_add_(0, y, z)
            mu /= n[:, None]
            dev = z - mu[y]
            S_c = torch.zeros_like(n).index_add_(0, y, _pnorm_sq(dev, self.p)) / n
            S2_c = S_c if self.p == 2.0 else torch.zeros_like(n).index_add_(0, y, _pnorm_sq(dev, 2.0)) / n
            out = [z.new_zeros(self.num_classes).index_copy_(0, classes, v) for v in (_pnorm_sq(mu, self.p), S_c, S2_c)]
            counts = torch.zeros(self.num_classes, dtype=torch.long, device=z.device)
            counts.index_copy_(0, classes, n.long())
        return out[0], out[1], out[2], counts

    @torch.no_grad()
    def update(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """EMA update from one batch (the global batch under torch.distributed, so all ranks agree).

        A class seen for the first time takes its batch value; a class absent from the batch keeps its value.
        """
        features, targets = gather_batch(features.detach(), targets)
        M, S, S2, counts = self.batch_statistics(features, targets)
        present = counts > 0
        first = present & ~self.seen
        ema = present & self.seen
        b = self.momentum
        for buf, new in ((self.M, M), (self.S, S), (self.S2, S2)):
            buf.copy_(torch.where(first, new, torch.where(ema, b * buf + (1.0 - b) * new, buf)))
        self.seen |= present

    @torch.no_grad()
    def collect(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Keep one micro-batch for the next :meth:`commit` (detached; nothing changes until then)."""
        self._pending.append((features.detach(), targets.detach()))

    @torch.no_grad()
    def commit(self) -> None:
        """One EMA :meth:`update` from every micro-batch :meth:`collect` kept since the last commit (if any)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            self.update(*pending[0])
        else:
            self.update(torch.cat([f for f, _ in pending]), torch.cat([t for _, t in pending]))

    @torch.no_grad()
    def set_exact(self, features: torch.Tensor, targets: torch.Tensor, chunk_size: int = 65536) -> None:
        """Exact statistics over a whole (frozen) feature set, replacing any previous state.

        Processed in chunks (two passes: means, then spreads) so a large feature matrix never needs a second copy.
        """
        K, dev_ = self.num_classes, self.M.device
        y_all = targets.long()
        counts = torch.bincount(y_all.to(dev_), minlength=K)
        denom = counts.clamp(min=1).double()
        sums = torch.zeros(K, features.shape[1], dtype=torch.float64, device=dev_)
        for i in range(0, features.shape[0], chunk_size):
            z = features[i : i + chunk_size].to(dev_, torch.float64)
            sums.index_add_(0, y_all[i : i + chunk_size].to(dev_), z)
        mu = sums / denom[:, None]
        S = torch.zeros(K, dtype=torch.float64, device=dev_)
        S2 = torch.zeros(K, dtype=torch.float64, device=dev_)
        for i in range(0, features.shape[0], chunk_size):
            y = y_all[i : i + chunk_size].to(dev_)
            d = features[i : i + chunk_size].to(dev_, torch.float64) - mu[y]
            S.index_add_(0, y, _pnorm_sq(d, self.p))
            S2.index_add_(0, y, _pnorm_sq(d, 2.0))
        present = counts > 0
        self.M.copy_(torch.where(present, _pnorm_sq(mu, self.p), 0.0).float())
        self.S.copy_((S / denom).float())
        self.S2.copy_((S2 / denom).float())
        self.seen.copy_(present)

    def margins(self, c_bar: float = 1.0) -> torch.Tensor:
        """Per-class logit margins gamma (K,): ``c_bar * K_seen * a_k / sum_seen a_j`` with ``a = (M + S)^(1/3)``.

        The margins of seen classes average to ``c_bar``; unseen classes get ``c_bar``. No gradient.
        """
        # Written without data-dependent branches so a CUDA step never waits on the host.
        with torch.no_grad():
            a = (self.M + self.S).clamp(min=0).pow(1.0 / 3.0)
            total = torch.where(self.seen, a, torch.zeros_like(a)).sum()
            k_seen = self.seen.sum().to(a.dtype)
            gamma = c_bar * k_seen * a / total.clamp(min=torch.finfo(a.dtype).tiny)
            gamma = torch.where(self.seen & (total > 0), gamma, torch.full_like(a, float(c_bar)))
        return gamma

    def s_bar(self) -> torch.Tensor:
        """Mean L2 spread over seen classes (0 before any class is seen)."""
        with torch.no_grad():
            k_seen = self.seen.sum().clamp(min=1).to(self.S2.dtype)
            return torch.where(self.seen, self.S2, torch.zeros_like(self.S2)).sum() / k_seen
