"""MR2: logit margin from class statistics plus a representation margin (arXiv 2602.00205, sections 3-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mr2ft.errors import UserError
from mr2ft.losses.stats import ClassStatistics

MARGIN_MODES = ("scale", "additive")


def default_p(normalize_features: bool) -> float:
    """p = 5 on L2-normalised features (where p = 2 makes every margin equal), else 2."""
    return 5.0 if normalize_features else 2.0


def representation_margin(
    z: torch.Tensor, targets: torch.Tensor, num_classes: int, s_bar: torch.Tensor, temperature_factor: float = 10.0
) -> torch.Tensor:
    """The representation margin L_RM of one batch, as one masked B x B distance matrix.

    ``l_i = softplus(logsumexp_{j != i, y_j = y_i} (D_ij - 2 s_bar) / T)``, averaged within each class, summed
    over classes and scaled by ``T' / K`` with ``T = tf * d`` and ``T' = d / tf``. Classes with fewer than two
    samples in the batch contribute nothing; with no such class the result is 0.
    """
    z = z.float()
    d = z.shape[1]
    y = targets.long()
    # Only samples with a same-class partner can contribute: the matrix is built over those alone, which keeps
    # it small when K is large and classes rarely repeat within a batch.
    counts = torch.bincount(y, minlength=num_classes)
    paired = counts[y] >= 2
    z, y = z[paired], y[paired]
    P = z.shape[0]
    if P == 0:
        return (z.sum() * 0.0).reshape(())
    sq = z.pow(2).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp(min=0)
    same = (y[:, None] == y[None, :]) & ~torch.eye(P, dtype=torch.bool, device=z.device)
    x = (dist - 2.0 * s_bar.to(z.dtype)) / (temperature_factor * d)
    # A finite fill (not -inf) keeps the backward pass free of NaN.
    x = x.masked_fill(~same, torch.finfo(x.dtype).min / 4)
    l_i = F.softplus(torch.logsumexp(x, dim=1))
    per_class = torch.zeros(num_classes, device=z.device, dtype=z.dtype).index_add_(0, y, l_i)
    per_class = per_class / counts.clamp(min=1).to(z.dtype)
    return (d / temperature_factor) / num_classes * per_class.sum()


class MR2Loss(nn.Module):
    """The MR2 objective ``L = L_LM + lambda_rep * L_RM`` with statistics kept in buffers.

    Args:
        num_classes: K, the dataset's number of classes.
        feature_dim: width of the features passed to :meth:`forward`.
        c_bar: average logit margin.
        lambda_rep: weight of the representation margin (0 turns it off).
        p: norm for the class statistics; ``None`` picks 5 when ``normalize_features`` else 2.
        momentum: EMA momentum of the statistics during training.
        margin_mode: ``"scale"`` (divide the sample's logits by gamma_y) or ``"additive"`` (subtract gamma_y from
            the true-class logit).
        normalize_features: L2-normalise the features before the statistics and the representation margin.
        temperature_factor: tf in ``T = tf * d`` and ``T' = d / tf``.
        class_dependent: ``False`` gives every class the margin ``c_bar`` (the matched uniform-margin control); all
            else stays identical.

    In training mode :meth:`forward` first updates the statistics with the batch, then computes the margins; in
    eval mode (or after :meth:`fit_statistics`) the statistics are left alone. Under gradient accumulation the
    trainer calls :meth:`accumulate` before each micro-batch: the statistics then step once per optimizer step, from
    all of its micro-batches, at the last one (the earlier micro-batches use the previous step's margins).
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        c_bar: float = 1.0,
        lambda_rep: float = 0.1,
        p: float | None = None,
        momentum: float = 0.9,
        margin_mode: str = "scale",
        normalize_features: bool = False,
        temperature_factor: float = 10.0,
        class_dependent: bool = True,
    ) -> None:
        super().__init__()
        if margin_mode not in MARGIN_MODES:
            raise UserError(f"unknown margin mode {margin_mode!r}; use one of {', '.join(MARGIN_MODES)}")
        if p is None:
            p = default_p(normalize_features)
        if normalize_features and p == 2.0:
            raise UserError(
                "p=2 on L2-normalised features gives every class the same margin (||mu||^2 + spread = 1 for all); "
                "use p=5 (the default with normalisation) or turn normalisation off"
            )
        if c_bar <= 0:
            raise UserError(f"c_bar must be positive, got {c_bar}")
        if lambda_rep < 0:
            raise UserError(f"lambda_rep must be >= 0, got {lambda_rep}")
        if temperature_factor <= 0:
            raise UserError(f"temperature_factor must be positive, got {temperature_factor}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.c_bar = float(c_bar)
        self.lambda_rep = float(lambda_rep)
        self.margin_mode = margin_mode
        self.normalize_features = normalize_features
        self.temperature_factor = float(temperature_factor)
        self.class_dependent = class_dependent
        self.stats = ClassStatistics(num_classes, feature_dim, p=p, momentum=momentum)
        # The buffer carries the flag through state_dict; the Python mirror is what forward reads, so a CUDA step
        # never waits on the host to learn it.
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._frozen = False
        self._step_end = True  # whether the next training forward ends an optimizer step (see accumulate)
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module._sync_frozen())

    def _sync_frozen(self) -> None:
        self._frozen = bool(self.frozen)

    def extra_repr(self) -> str:
        return (
            f"c_bar={self.c_bar}, lambda_rep={self.lambda_rep}, margin_mode={self.margin_mode!r}, "
            f"normalize_features={self.normalize_features}, class_dependent={self.class_dependent}"
        )

    def _features(self, features: torch.Tensor) -> torch.Tensor:
        z = features.float()
        return F.normalize(z, dim=1) if self.normalize_features else z

    @torch.no_grad()
    def fit_statistics(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Set exact statistics from frozen features (a linear probe) and stop updating them.

        ``features`` may also be rows of the feature store (:class:`mr2ft.featrows.StoredRows`: ``shape``, slices,
        ``map``): they are then read in blocks, never whole in memory."""
        if isinstance(features, torch.Tensor):
            self.stats.set_exact(self._features(features), targets)
        else:
            self.stats.set_exact(features.map(self._features), targets, chunk_size=8192)
        self.frozen.fill_(True)
        self._frozen = True

    def accumulate(self, step_end: bool) -> None:
        """Say whether the next training micro-batch is the last of its optimizer step (``True`` without
        accumulation). Micro-batches before it are only collected; at it, one EMA update pools them all."""
        self._step_end = bool(step_end)

    @torch.no_grad()
    def _update(self, z: torch.Tensor, targets: torch.Tensor) -> None:
        self.stats.collect(z, targets)
        if self._step_end:
            self.stats.commit()

    @torch.no_grad()
    def observe(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Update the statistics from one batch as a training step would, computing no loss."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            self._update(self._features(features.detach()), targets)

    def margins(self) -> torch.Tensor:
        """The current per-class margins gamma (K,)."""
        if not self.class_dependent:
            return torch.full_like(self.stats.M, self.c_bar)
        return self.stats.margins(self.c_bar)

    def forward(self, logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the loss.

        Args:
            logits: (B, K) classifier outputs.
            features: (B, d) the classifier's input features.
            targets: (B,) integer labels.

        Returns:
            dict with ``loss`` (to backpropagate), ``ce`` (the logit-margin term), ``rep``, ``gamma_mean``,
            ``gamma_max``, ``s_bar``, all but ``loss`` detached; and ``terms``, the two weighted parts of ``loss``
            with their graphs (``{"logit": L_LM, "rep": lambda_rep * L_RM}``), to measure each one's gradient.
        """
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = self._features(features)
            if self.training and not self._frozen:
                self._update(z.detach(), targets)
            gamma = self.margins()
            g = gamma[targets]
            f = logits.float()
            if self.margin_mode == "scale":
                ce = F.cross_entropy(f / g[:, None], targets)
            else:
                ce = F.cross_entropy(f - F.one_hot(targets, self.num_classes).to(f.dtype) * g[:, None], targets)
            s_bar = self.stats.s_bar()
            if self.lambda_rep > 0:
                rep = representation_margin(z, targets, self.num_classes, s_bar, self.temperature_factor)
            else:
                rep = ce.new_zeros(())
            weighted_rep = self.lambda_rep * rep
            loss = ce + weighted_rep
        return {
            "loss": loss,
            "terms": {"logit": ce, "rep": weighted_rep},
            "ce": ce.detach(),
            "rep": rep.detach(),
            "gamma_mean": gamma.mean().detach(),
            "gamma_max": gamma.max().detach(),
            "s_bar": s_bar.detach(),
        }

    def class_stats(self) -> dict[str, torch.Tensor]:
        """M, S, S2, gamma and seen per class, for the run folder and reports."""
        return {
            "M": self.stats.M.detach().cpu(),
            "S": self.stats.S.detach().cpu(),
            "S2": self.stats.S2.detach().cpu(),
            "gamma": self.margins().detach().cpu(),
            "seen": self.stats.seen.detach().cpu(),
        }


class WatchedLoss(nn.Module):
    """A loss that keeps no class statistics, plus the statistics MR2 would keep on the same features.

    The loss value and its gradients are the wrapped loss's own; the statistics only watch (updated in training
    mode, from the global batch), so a CE run's report and study can show per-class spread and the margins MR2
    would have set (at ``c_bar`` 1), measured the same way as an MR2 run's. ``state_dict`` holds both modules.
    """

    def __init__(self, loss: nn.Module, watch: MR2Loss) -> None:
        super().__init__()
        self.loss = loss
        self.watch = watch

    def accumulate(self, step_end: bool) -> None:
        """See :meth:`MR2Loss.accumulate` (the watched statistics step once per optimizer step too)."""
        self.watch.accumulate(step_end)

    def forward(self, logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            self.watch.observe(features, targets)
        return self.loss(logits, features, targets)

    def class_stats(self) -> dict[str, torch.Tensor]:
        """The watched statistics: M, S, S2, gamma (margins not applied) and seen per class."""
        return self.watch.class_stats()
