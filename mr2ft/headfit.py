"""Training a classifier head on fixed (cached) features until it has converged: the probe's optimisation.

What a fit minimises: the loss's mean over the training features plus ``(wd / 2) * ||W||^2`` on the head's weights
(a plain L2 penalty, not AdamW's decoupled decay, so the optimum does not depend on the lr or the schedule). A linear
head is fitted on per-dimension standardised features and the standardisation is folded back into its weights
afterwards (:func:`mr2ft.heads.from_standard_coordinates`): the saved head reads raw features, and the same lr and
weight decay suit raw features (norm ~30) and L2-normalised ones (norm 1) alike.

How long (``schedule``), counted in optimizer steps:

- ``plateau`` (the default without ``--epochs``): lr constant after the warm-up; every window (two epochs, at least
  50 steps) the training objective is measured on a fixed subset of at most 16,384 training samples (no noise); when
  it improved by less than ``converge_tol`` (relative) over the window, lr x0.1; at the third such plateau the fit
  stops, converged. At most ``max_steps`` steps (default max(10,000, 100 epochs)); stopping there is recorded as not
  converged (a separable problem without weight decay never converges).
- ``cosine``: linear warm-up then cosine over ``--epochs`` (:func:`mr2ft.schedule.lr_factor`).
- ``step``: lr x0.1 at each epoch of ``--lr-steps`` over ``--epochs`` (MoCo's linear probe: 60, 80 of 100).

Every fit returns how it stopped (:class:`Stopped`): schedule, steps, epochs, final training objective, converged.

The features are a tensor or rows of the chunked feature store (:mod:`mr2ft.featrows`), through the same code: stored
rows are read a batch at a time in chunk-blocked epochs, standardised per batch with one-pass moments, and the fixed
objective rows are read into memory once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mr2ft import featrows
from mr2ft.config import ProbeConfig, resolve_lr
from mr2ft.errors import UserError
from mr2ft.heads import LinearHead, build_head, from_standard_coordinates, to_standard_coordinates
from mr2ft.io import log_record
from mr2ft.schedule import lr_factor

SCHEDULES = ("plateau", "cosine", "step")
PLATEAU_DECAYS = 2  # lr x0.1 twice, stop at the third plateau
OBJECTIVE_ROWS = 16_384  # the objective is measured on at most this many training samples
DEFAULT_MAX_STEPS = 10_000
DEFAULT_MAX_EPOCHS = 100


@dataclass
class Features:
    """Features and labels of one split; the features in memory or in the feature store (:mod:`mr2ft.featrows`)."""

    x: featrows.Rows
    y: torch.Tensor

    def subset(self, idx: torch.Tensor) -> Features:
        return Features(featrows.subset(self.x, idx), self.y[idx])

    @staticmethod
    def concat(a: Features, b: Features) -> Features:
        return Features(featrows.concat(a.x, b.x), torch.cat([a.y, b.y]))


@dataclass
class Stopped:
    """How a fit ended: ``converged`` is None for a fixed budget (cosine, step), where nothing is judged."""

    schedule: str
    steps: int
    epochs: float
    train_loss: float
    converged: bool | None
    reason: str

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """The step budget and lr schedule of one fit."""

    schedule: str
    lr: float
    batch: int
    steps_per_epoch: int
    total: int
    warmup: int
    window: int
    tol: float
    milestones: tuple[int, ...] = ()

    def factor(self, step: int, decays: int) -> float:
        """The lr multiplier at ``step`` after ``decays`` plateaus."""
        if self.schedule == "cosine":
            return lr_factor(step, self.warmup, self.total)
        warm = (step + 1) / self.warmup if step < self.warmup else 1.0
        if self.schedule == "step":
            return warm * 0.1 ** sum(step >= m for m in self.milestones)
        return warm * 0.1**decays


def schedule_of(cfg: ProbeConfig) -> str:
    """The schedule a config asks for: its own, else cosine with ``--epochs`` and plateau without."""
    return cfg.schedule or ("cosine" if cfg.epochs else "plateau")


def check_schedule(cfg: ProbeConfig) -> None:
    """Refuse schedule settings that do not fit together (called by the probe's validation)."""
    schedule = schedule_of(cfg)
    if schedule not in SCHEDULES:
        raise UserError(f"unknown --schedule {cfg.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if schedule in ("cosine", "step") and not cfg.epochs:
        raise UserError(f"--schedule {schedule} runs a fixed budget: pass --epochs (or use --schedule plateau)")
    if (schedule == "step") != bool(cfg.lr_steps):
        raise UserError(
            "--lr-steps goes with --schedule step (and it needs them), e.g. --schedule step --lr-steps 60,80"
        )
    if cfg.optimizer not in ("adamw", "sgd"):
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; use adamw or sgd")


def plan_for(cfg: ProbeConfig, n: int, epochs: int | None = None) -> Plan:
    """The plan of a fit on ``n`` samples (``epochs`` overrides ``cfg.epochs``, e.g. JTT's first pass)."""
    epochs = epochs or cfg.epochs
    batch = min(cfg.batch_size, n)
    spe = max(1, n // batch)  # drop the last short batch so BatchNorm never sees a single sample
    schedule = "plateau" if epochs is None and cfg.schedule is None else (cfg.schedule or "cosine")
    if epochs:
        total = epochs * spe
    else:
        total = cfg.max_steps or max(DEFAULT_MAX_STEPS, DEFAULT_MAX_EPOCHS * spe)
    return Plan(
        schedule=schedule,
        lr=resolve_lr(cfg.lr, cfg.blr, cfg.batch_size),
        batch=batch,
        steps_per_epoch=spe,
        total=total,
        warmup=int(cfg.warmup_epochs * spe),
        window=max(2 * spe, 50) if schedule == "plateau" else spe,
        tol=cfg.converge_tol,
        milestones=tuple(int(round(m * spe)) for m in (cfg.lr_steps or ())),
    )


def make_optimizer(cfg: ProbeConfig, params, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9), both without built-in decay: the L2 penalty is part of the objective."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_steps(
    opt: torch.optim.Optimizer,
    plan: Plan,
    x: featrows.Rows,
    run: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    modules: list[torch.nn.Module],
    seed: int,
    log_to: Path | None,
    tag: str,
) -> Stopped:
    """Minimise ``run(rows of x, their indices, training=True)`` over batches of ``x`` under ``plan``; every window
    measure the objective ``run(objective rows, their indices, training=False)`` with ``modules`` in eval mode;
    return how it ended. The objective rows are read once; an epoch's order comes from :func:`featrows.epoch_order`."""
    n = len(x)
    rows = _objective_rows(n, seed)
    fixed = x[rows]

    @torch.no_grad()
    def objective() -> float:
        _modes(False, *modules)
        try:
            return float(run(fixed, rows, False))
        finally:
            _modes(True, *modules)

    _modes(True, *modules)
    g = torch.Generator().manual_seed(seed)
    base = [group["lr"] for group in opt.param_groups]
    t, decays, ref, obj, done = 0, 0, None, float("nan"), None
    while done is None:
        perm = featrows.epoch_order(x, g)
        for i in range(plan.steps_per_epoch):
            f = plan.factor(t, decays)
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * f
            idx = perm[i * plan.batch : (i + 1) * plan.batch]
            value = run(x[idx], idx, True)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            t += 1
            if t % plan.window == 0 or t == plan.total:
                obj = objective()
                if not math.isfinite(obj):
                    raise UserError(
                        f"the probe's loss became {obj} at step {t} ({tag}); lower --lr or check the features"
                    )
                epoch = t / plan.steps_per_epoch
                if log_to is not None:
                    rec = {"stage": tag, "epoch": int(epoch) if epoch.is_integer() else round(epoch, 3), "step": t}
                    log_record(log_to, {**rec, "train_loss": obj, "lr": base[0] * f})
                if plan.schedule == "plateau" and t >= plan.warmup:
                    if ref is not None and ref - obj < plan.tol * abs(ref):
                        if decays == PLATEAU_DECAYS:
                            done = "the training objective stopped improving at the lowest lr"
                            break
                        decays += 1
                    ref = obj
            if t >= plan.total:
                done = "step budget reached" if plan.schedule == "plateau" else f"fixed budget ({plan.schedule})"
                break
    converged = None if plan.schedule != "plateau" else done.startswith("the training objective")
    stopped = Stopped(plan.schedule, t, round(t / plan.steps_per_epoch, 3), obj, converged, done)
    if log_to is not None:
        log_record(log_to, {"stage": tag, "event": "stopped", **stopped.record()})
    return stopped


def _moments(x: featrows.Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation (constant dimensions get 1); stored rows in one float64 pass."""
    if isinstance(x, torch.Tensor):
        mean, std = x.mean(0), x.std(0, unbiased=False)
    else:
        mean, std = featrows.column_moments(x)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def _shift_scale(x: featrows.Rows, mean: torch.Tensor, std: torch.Tensor) -> featrows.Rows:
    """``(x - mean) / std``: computed now for a tensor, per batch read for stored rows."""
    if isinstance(x, torch.Tensor):
        return (x - mean) / std
    return x.map(lambda b: b.sub_(mean).div_(std))  # a block read is a fresh tensor: changed in place


def standardize(x: featrows.Rows) -> featrows.Rows:
    """What BatchNorm1d(affine=False) converges to on these features: per-dimension standardisation."""
    return _shift_scale(x, *_moments(x))


def _penalty(heads: list[LinearHead], wd: float) -> torch.Tensor | float:
    return 0.5 * wd * sum(h.fc.weight.pow(2).sum() for h in heads) if wd > 0 else 0.0


def _modes(training: bool, *modules: torch.nn.Module) -> None:
    for m in modules:
        m.train(training)


def _objective_rows(n: int, seed: int) -> torch.Tensor:
    if n <= OBJECTIVE_ROWS:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))[:OBJECTIVE_ROWS].sort().values


@contextlib.contextmanager
def _standard_coordinates(
    heads: list[LinearHead], x: featrows.Rows, on: bool, initialised: bool = False
) -> Iterator[featrows.Rows]:
    """Yield the features the heads train on: standardised (folded back into the heads after) or raw.

    A randomly initialised head starts in the standardised coordinates (so the fit does not depend on the features'
    scale); an ``initialised`` one (zero-shot weights, a function of raw features) is rewritten to match first."""
    if not on or not all(h.is_linear for h in heads):
        yield x
        return
    mean, std = _moments(x)
    for h in heads if initialised else []:
        to_standard_coordinates(h, mean, std)
    try:
        yield _shift_scale(x, mean, std)
    finally:
        for h in heads:
            from_standard_coordinates(h, mean, std)


def fit_head(
    cfg: ProbeConfig,
    train: Features,
    num_classes: int,
    loss: torch.nn.Module,
    *,
    weight_decay: float,
    seed: int,
    sample_weight: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    init_scale: float = 1.0,
    epochs: int | None = None,
    cosine: bool = False,
    log_to: Path | None = None,
    tag: str = "fit",
) -> tuple[LinearHead, Stopped]:
    """Train a head on fixed features with ``loss`` (see the module docstring); returns it in eval mode."""
    torch.manual_seed(seed)
    head = build_head(cfg.head, train.x.shape[1], num_classes, zero_shot_weights=init, scale=init_scale, cosine=cosine)
    plan = plan_for(cfg, len(train.y), epochs)
    opt = make_optimizer(cfg, head.parameters(), plan.lr)
    with (
        _threads_for(plan.batch, train.x.shape[1], num_classes),
        _standard_coordinates([head], train.x, cfg.standardize, initialised=init is not None) as x,
    ):

        def run(rows: torch.Tensor, idx: torch.Tensor, training: bool) -> torch.Tensor:
            z = head.features(rows)
            w = {} if sample_weight is None else {"weight": sample_weight[idx]}
            return loss(head.classify(z), z, train.y[idx], **w)["loss"] + _penalty([head], weight_decay)

        stopped = train_steps(opt, plan, x, run, [head, loss], seed, log_to, tag)
    head.eval()
    return head, stopped


@contextlib.contextmanager
def _threads_for(batch: int, dim: int, num_classes: int) -> Iterator[None]:
    """One intra-op thread for small head steps on the CPU.

    A probe step on a few hundred features is microseconds of arithmetic; with several threads the synchronisation
    dominates it, and on a loaded machine a step gets 10-25x slower. Large steps keep every thread.
    """
    small = batch * dim * max(num_classes, 8) < 2**24 and not torch.cuda.is_available()
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def predict(head: LinearHead, x: featrows.Rows, batch: int = 8192) -> torch.Tensor:
    """Logits of a head over features (a tensor, or stored rows read ``batch`` at a time in order), in eval mode."""
    head.eval()
    if not len(x):
        return torch.zeros(0, head.fc.out_features)
    return torch.cat([head(rows) for rows in featrows.blocks(x, batch)])


def _gce(logits: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu 2018), per sample: (1 - p_y^q) / q."""
    p = F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1).clamp(min=1e-8)
    return (1.0 - p.pow(q)) / q


def fit_lff(
    cfg: ProbeConfig, train: Features, num_classes: int, *, weight_decay: float, seed: int, log_to: Path | None = None
) -> tuple[LinearHead, Stopped]:
    """Learning from Failure (Nam et al. 2020) on fixed features: a biased head (GCE) and a debiased head trained
    together; the debiased head's samples are weighted by ``ce_b / (ce_b + ce_d)`` from EMAs of per-sample losses
    (alpha 0.7). The objective watched is the pair's loss on the objective rows at the current weights."""
    torch.manual_seed(seed)
    d, n = train.x.shape[1], len(train.y)
    biased, main = build_head(cfg.head, d, num_classes), build_head(cfg.head, d, num_classes)
    plan = plan_for(cfg, n)
    opt = make_optimizer(cfg, [*biased.parameters(), *main.parameters()], plan.lr)
    ema_b, ema_d = torch.zeros(n), torch.zeros(n)
    with _threads_for(plan.batch, d, num_classes), _standard_coordinates([biased, main], train.x, cfg.standardize) as x:

        def run(rows: torch.Tensor, idx: torch.Tensor, update: bool) -> torch.Tensor:  # update: a training step
            lb, ld, y = biased(rows), main(rows), train.y[idx]
            if update:
                ema_b[idx] = 0.7 * ema_b[idx] + 0.3 * F.cross_entropy(lb, y, reduction="none").detach()
                ema_d[idx] = 0.7 * ema_d[idx] + 0.3 * F.cross_entropy(ld, y, reduction="none").detach()
            w = ema_b[idx] / (ema_b[idx] + ema_d[idx] + 1e-8)
            main_loss = (F.cross_entropy(ld, y, reduction="none") * w).mean()
            return main_loss + _gce(lb, y, cfg.lff_q).mean() + _penalty([biased, main], weight_decay)

        stopped = train_steps(opt, plan, x, run, [biased, main], seed, log_to, "lff")
    main.eval()
    return main, stopped


def rep_grad_share(
    head: LinearHead, loss: torch.nn.Module, train: Features, lambda_rep: float, batch: int, seed: int
) -> float | None:
    """||grad_z (lambda_rep * L_RM)|| / ||grad_z L_LM|| on one training batch of the fitted head, where z are the
    features the classifier sees: how much the representation margin would pull on the features next to the
    logit-margin term (a probe cannot apply it: its features are fixed). None without a representation margin."""
    from mr2ft.losses import representation_margin

    if lambda_rep <= 0 or not hasattr(loss, "stats"):
        return None
    idx = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))[:batch]
    with torch.no_grad():
        z0 = head.features(train.x[idx].float())
    z = z0.clone().requires_grad_(True)
    lm = loss(head.classify(z), z, train.y[idx])["loss"]
    (g_lm,) = torch.autograd.grad(lm, z)
    zr = F.normalize(z, dim=1) if loss.normalize_features else z
    rm = lambda_rep * representation_margin(
        zr, train.y[idx], loss.num_classes, loss.stats.s_bar(), loss.temperature_factor
    )
    (g_rm,) = torch.autograd.grad(rm, z, allow_unused=True)
    if g_rm is None:
        return 0.0
    return float(g_rm.norm() / g_lm.norm().clamp(min=1e-30))
