"""The linear probe: features of a frozen backbone, cached once, then a head trained with any loss.

Read top to bottom: :func:`run` validates, loads the backbone and data, gets features (from the cache when it can),
chooses hyper-parameters on a validation split when asked (never on test), fits the final head on train+val,
evaluates once on test and writes the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from mr2ft import metrics
from mr2ft.config import ProbeConfig, dump_config, replace, to_dict
from mr2ft.errors import UserError
from mr2ft.features import FeatureCache, cache_key, extract_features
from mr2ft.heads import HEADS, LinearHead, build_head
from mr2ft.io import append_jsonl, state_checksum
from mr2ft.losses import LOSSES, USES_FEATURES, build_loss
from mr2ft.runs import (
    HEAD,
    METRICS,
    check_run_dir,
    default_run_dir,
    load_run,
    run_folder,
    save_class_stats,
    save_classes,
    save_predictions,
)

log = logging.getLogger("mr2ft")

# Comparators that need two passes or two heads; cheap on cached features, so the probe offers them.
TWO_PASS = {
    "jtt": "Just Train Twice: upweight the training samples an ERM head gets wrong, then refit",
    "lff": "Learning from Failure: a GCE-trained biased head re-weights the main head's samples",
}
CRITERIA = ("overall", "hard")


def probe_losses() -> list[str]:
    """Every ``--loss`` the probe accepts."""
    return [*LOSSES, *TWO_PASS]


@dataclass
class Features:
    """Features and labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def subset(self, idx: torch.Tensor) -> Features:
        return Features(self.x[idx], self.y[idx])

    @staticmethod
    def concat(a: Features, b: Features) -> Features:
        return Features(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]))


# ---- validation ----------------------------------------------------------------------------------------------


def validate(cfg: ProbeConfig) -> None:
    """Refuse bad settings before any heavy work."""
    if not cfg.dataset:
        raise UserError("no dataset given; pass --dataset (a folder, a CSV, hf:NAME or a name like cifar100)")
    if cfg.loss not in probe_losses():
        raise UserError(f"unknown loss {cfg.loss!r}; the probe accepts: {', '.join(probe_losses())}")
    if cfg.head not in HEADS:
        raise UserError(f"unknown head {cfg.head!r}; choose one of: {', '.join(HEADS)}")
    for name in ("lr", "epochs", "batch_size", "extract_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}; pass a value above 0"
            )
    if cfg.weight_decay < 0:
        raise UserError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; use adamw or sgd")
    if cfg.sweep_cbar and cfg.loss not in USES_FEATURES:
        raise UserError(f"--sweep-cbar tunes MR2's average margin; it needs --loss mr2 or uniform, not {cfg.loss}")
    if cfg.sweep_temperature and cfg.loss != "ce":
        raise UserError("--sweep-temperature tunes plain cross-entropy's global temperature; use it with --loss ce")
    if cfg.sweep_criterion not in CRITERIA:
        raise UserError(f"--sweep-criterion must be one of {', '.join(CRITERIA)}, got {cfg.sweep_criterion!r}")
    if any(v <= 0 for v in cfg.cbar_grid):
        raise UserError("every value of the c_bar / temperature grid must be positive")
    if cfg.jtt_upweight < 1:
        raise UserError(f"--jtt-upweight must be >= 1, got {cfg.jtt_upweight}")


def sweeping(cfg: ProbeConfig) -> bool:
    return cfg.sweep_wd or cfg.sweep_cbar or cfg.sweep_temperature


# ---- training one head ---------------------------------------------------------------------------------------


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """What BatchNorm1d(affine=False) converges to on these features: per-dimension standardisation."""
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-6)


def make_loss(cfg: ProbeConfig, name: str, train: Features, num_classes: int, normalized: bool, **overrides):
    """The loss for a probe fit: MR2 and its control use exact statistics of the training features, no rep term."""
    settings = {**to_dict(cfg), **overrides}
    settings["lambda_rep"] = 0.0  # features are constants in a probe: the representation margin has no gradient
    settings["normalize_features"] = normalized
    settings["class_counts"] = torch.bincount(train.y, minlength=num_classes)
    loss = build_loss(name, num_classes, train.x.shape[1], **settings)
    if name in USES_FEATURES:
        x = _standardize(train.x) if cfg.head == "bn_linear" else train.x
        loss.fit_statistics(x, train.y)
    return loss


def _fit_head(
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
    log_to: Path | None = None,
    tag: str = "fit",
) -> LinearHead:
    """Train a head on fixed features with minibatch AdamW/SGD, linear warm-up then cosine per step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    head = build_head(cfg.head, train.x.shape[1], num_classes, zero_shot_weights=init, scale=init_scale)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    n = train.x.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the last short batch so BatchNorm never sees a single sample
    epochs = epochs or cfg.epochs
    total = epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup))
    loss.train()
    head.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        running, seen = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            x, y = train.x[idx], train.y[idx]
            logits = head(x)
            if sample_weight is not None:
                out = loss(logits, head.features(x), y, weight=sample_weight[idx])
            else:
                out = loss(logits, head.features(x), y)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            running += float(out["loss"].detach()) * len(idx)
            seen += len(idx)
        if not math.isfinite(running):
            raise UserError(
                f"the probe's loss became {running} in epoch {epoch + 1} ({tag}); lower --lr or check the features"
            )
        if log_to is not None:
            append_jsonl(log_to, {"stage": tag, "epoch": epoch + 1, "train_loss": running / max(1, seen)})
    head.eval()
    return head


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


def fit_head(cfg: ProbeConfig, train: Features, num_classes: int, loss: torch.nn.Module, **kwargs) -> LinearHead:
    """Train a head on fixed features with minibatch AdamW/SGD, linear warm-up then cosine per step.

    Keyword arguments: ``weight_decay``, ``seed``, ``sample_weight``, ``init`` / ``init_scale`` (zero-shot weights),
    ``epochs``, ``log_to`` (metrics.jsonl) and ``tag``.
    """
    with _threads_for(min(cfg.batch_size, len(train.y)), train.x.shape[1], num_classes):
        return _fit_head(cfg, train, num_classes, loss, **kwargs)


def fit_lff(cfg: ProbeConfig, train: Features, num_classes: int, **kwargs) -> LinearHead:
    """Learning from Failure (Nam et al. 2020) on fixed features; see :func:`_fit_lff`."""
    with _threads_for(min(cfg.batch_size, len(train.y)), train.x.shape[1], num_classes):
        return _fit_lff(cfg, train, num_classes, **kwargs)


@torch.no_grad()
def predict(head: LinearHead, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """Logits of a head over features, in eval mode."""
    head.eval()
    return torch.cat([head(x[i : i + batch]) for i in range(0, max(1, x.shape[0]), batch)]) if len(x) else x


def _gce(logits: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Generalized cross-entropy (Zhang & Sabuncu 2018), per sample: (1 - p_y^q) / q."""
    p = F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1).clamp(min=1e-8)
    return (1.0 - p.pow(q)) / q


def _fit_lff(
    cfg: ProbeConfig, train: Features, num_classes: int, *, weight_decay: float, seed: int, log_to: Path | None = None
) -> LinearHead:
    """Learning from Failure (Nam et al. 2020) on fixed features: a biased head (GCE) and a debiased head trained
    together; the debiased head's samples are weighted by ``ce_b / (ce_b + ce_d)`` from EMAs of per-sample losses."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    d = train.x.shape[1]
    biased = build_head(cfg.head, d, num_classes)
    main = build_head(cfg.head, d, num_classes)
    params = list(biased.parameters()) + list(main.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=weight_decay)
    n = train.x.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, 0))
    ema_b, ema_d = torch.zeros(n), torch.zeros(n)
    alpha = 0.7  # LfF's loss EMA
    biased.train()
    main.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * bs : (i + 1) * bs]
            x, y = train.x[idx], train.y[idx]
            lb, ld = biased(x), main(x)
            ce_b = F.cross_entropy(lb, y, reduction="none").detach()
            ce_d = F.cross_entropy(ld, y, reduction="none").detach()
            ema_b[idx] = alpha * ema_b[idx] + (1 - alpha) * ce_b
            ema_d[idx] = alpha * ema_d[idx] + (1 - alpha) * ce_d
            w = ema_b[idx] / (ema_b[idx] + ema_d[idx] + 1e-8)
            loss = (F.cross_entropy(ld, y, reduction="none") * w).mean() + _gce(lb, y, cfg.lff_q).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log_to is not None:
            append_jsonl(log_to, {"stage": "lff", "epoch": epoch + 1, "train_loss": float(loss.detach())})
    main.eval()
    return main


def fit(
    cfg: ProbeConfig,
    train: Features,
    num_classes: int,
    normalized: bool,
    *,
    weight_decay: float,
    knob: float,
    seed: int,
    zero_shot: tuple[torch.Tensor, float] | None = None,
    log_to: Path | None = None,
    tag: str = "fit",
) -> tuple[LinearHead, torch.nn.Module | None]:
    """Fit the configured method once. ``knob`` is c_bar (mr2/uniform) or the temperature (ce)."""
    init, scale = zero_shot if zero_shot else (None, 1.0)
    common = {"weight_decay": weight_decay, "seed": seed, "init": init, "init_scale": scale, "log_to": log_to}
    if cfg.loss == "jtt":
        erm = build_loss("ce", num_classes, train.x.shape[1])
        first = fit_head(cfg, train, num_classes, erm, epochs=cfg.jtt_epochs, tag=f"{tag}:jtt-erm", **common)
        wrong = predict(first, train.x).argmax(1) != train.y
        w = torch.where(wrong, torch.tensor(float(cfg.jtt_upweight)), torch.tensor(1.0))
        ce = build_loss("ce", num_classes, train.x.shape[1])
        return fit_head(cfg, train, num_classes, ce, sample_weight=w, tag=f"{tag}:jtt", **common), None
    if cfg.loss == "lff":
        return fit_lff(cfg, train, num_classes, weight_decay=weight_decay, seed=seed, log_to=log_to), None
    overrides = {"temperature": knob} if cfg.loss == "ce" else {"c_bar": knob}
    loss = make_loss(cfg, cfg.loss, train, num_classes, normalized, **overrides)
    return fit_head(cfg, train, num_classes, loss, tag=tag, **common), loss


# ---- choosing hyper-parameters on validation -----------------------------------------------------------------


def split_validation(train: Features, fraction: float, seed: int) -> tuple[Features, Features]:
    """A stratified, seeded train/val split of training features (at least one val sample per class with 2+)."""
    g = torch.Generator().manual_seed(seed + 7919)
    val_idx, train_idx = [], []
    for c in torch.unique(train.y).tolist():
        idx = torch.nonzero(train.y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return train.subset(torch.cat(train_idx).sort().values), train.subset(torch.cat(val_idx).sort().values)


def score(logits: torch.Tensor, y: torch.Tensor, num_classes: int, hard: np.ndarray | None) -> dict[str, float]:
    """Validation figures: overall accuracy and, when a hard group is given, its mean per-class accuracy."""
    conf = metrics.confusion_matrix(logits.argmax(1), y, num_classes).numpy()
    acc = metrics.per_class_accuracy(conf)
    out = {"overall": 100.0 * float(np.trace(conf)) / max(1, conf.sum())}
    if hard is not None:
        out["hard"] = 100.0 * float(np.nanmean(acc[hard])) if np.any(~np.isnan(acc[hard])) else float("nan")
    return out


def choose(
    cfg: ProbeConfig,
    fit_part: Features,
    val: Features,
    num_classes: int,
    normalized: bool,
    zero_shot,
    log_to: Path,
) -> tuple[float, float, list[dict]]:
    """Pick weight decay and/or the knob (c_bar or temperature) by validation; returns (wd, knob, records).

    For the ``hard`` criterion the hard classes are the bottom third of an ERM head's per-class validation accuracy
    (fit on the same split with the default settings). Ties keep the earlier grid value; grids are in the config.
    """
    wds = list(cfg.wd_grid) if cfg.sweep_wd else [cfg.weight_decay]
    default_knob = cfg.c_bar if cfg.loss in USES_FEATURES else 1.0
    knobs = list(cfg.cbar_grid) if (cfg.sweep_cbar or cfg.sweep_temperature) else [default_knob]
    hard = None
    if cfg.sweep_criterion == "hard":
        erm_cfg = replace(cfg, loss="ce")
        erm, _ = fit(
            erm_cfg,
            fit_part,
            num_classes,
            normalized,
            weight_decay=cfg.weight_decay,
            knob=1.0,
            seed=cfg.seed,
            zero_shot=zero_shot,
            tag="sweep:erm-groups",
        )
        val_acc = metrics.per_class_accuracy(
            metrics.confusion_matrix(predict(erm, val.x).argmax(1), val.y, num_classes).numpy()
        )
        hard = np.nonzero(metrics.assign_groups(val_acc) == 2)[0]
    records, best, best_key = [], None, None
    for wd in wds:
        for knob in knobs:
            head, _ = fit(
                cfg,
                fit_part,
                num_classes,
                normalized,
                weight_decay=wd,
                knob=knob,
                seed=cfg.seed,
                zero_shot=zero_shot,
                tag="sweep",
            )
            s = score(predict(head, val.x), val.y, num_classes, hard)
            rec = {"stage": "sweep", "weight_decay": wd, "knob": knob, **{f"val_{k}": v for k, v in s.items()}}
            records.append(rec)
            if log_to is not None:
                append_jsonl(log_to, rec)
            key = (s[cfg.sweep_criterion], s["overall"])
            if best_key is None or key > best_key:
                best, best_key = (wd, knob), key
    return best[0], best[1], records


# ---- the job -------------------------------------------------------------------------------------------------


def get_features(cfg: ProbeConfig, bb, splits, console: Console) -> dict[str, Features | None]:
    """Features of every split, from the cache when valid, else extracted (and cached)."""
    from mr2ft.data import TransformedDataset

    cache = FeatureCache(cfg.cache_dir)
    out: dict[str, Features | None] = {}
    transform = None
    checksum_before = None
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        if ds is None:
            out[name] = None
            continue
        key = cache_key(bb.fingerprint, splits.split_fingerprint(name))
        hit = cache.load(key, expected_rows=len(ds))
        if hit is not None:
            console.print(f"[dim]{name}: {len(ds)} cached features ({cache.path(key)})[/dim]")
            out[name] = Features(*hit)
            continue
        if transform is None:
            transform = bb.preprocess.eval_transform()
            checksum_before = state_checksum(bb.model)
        t0 = time.perf_counter()
        x, y = extract_features(
            bb.model,
            TransformedDataset(ds, transform),
            batch_size=cfg.extract_batch_size,
            num_workers=cfg.num_workers,
            description=f"extracting {name} features",
        )
        console.print(f"[dim]{name}: extracted {len(ds)} features in {time.perf_counter() - t0:.1f}s[/dim]")
        cache.save(key, x, y, backbone=bb.source, split=name, dataset=splits.name)
        out[name] = Features(x, y)
    if checksum_before is not None and state_checksum(bb.model) != checksum_before:
        raise RuntimeError("the backbone's weights changed during feature extraction; it must stay frozen")
    return out


@dataclass
class ProbeData:
    """Everything a probe fit needs, loaded once: the backbone, the splits and their cached features."""

    backbone: object
    splits: object
    train: Features
    val: Features | None
    test: Features
    zero_shot: tuple[torch.Tensor, float] | None

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes


@dataclass
class ProbeResult:
    """One fitted probe: the head, its loss, test logits and what was chosen on validation."""

    head: LinearHead
    loss: torch.nn.Module | None
    train: Features
    logits: torch.Tensor
    weight_decay: float
    knob: float
    val_source: str | None


def prepare(cfg: ProbeConfig, console: Console, need_val: bool | None = None) -> ProbeData:
    """Load the backbone and data and get features of every split (cached after the first time)."""
    from mr2ft.backbones import load_backbone
    from mr2ft.data import load_dataset

    options = {"normalize": cfg.normalize, "pool": cfg.pool, "image_size": cfg.image_size}
    bb = load_backbone(
        cfg.backbone, model=cfg.model, weights=cfg.weights, **{k: v for k, v in options.items() if v is not None}
    )
    if cfg.loss in USES_FEATURES and bb.normalize and (cfg.p or 5.0) == 2.0:
        raise UserError(
            "p=2 on L2-normalised features gives every class the same margin; use --p 5 (the default) or --no-normalize"
        )
    need_val = sweeping(cfg) if need_val is None else need_val
    splits = load_dataset(
        cfg.dataset,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        val_fraction=0.0 if need_val else cfg.val_fraction,
        seed=cfg.seed,
        shots=cfg.shots,
        max_per_class=cfg.max_per_class,
        test_max_per_class=cfg.test_max_per_class,
        skip_bad_images=cfg.skip_bad_images,
    )
    console.print(
        f"[bold]probe[/bold] {bb.family}:{bb.name} ({bb.source}) on {splits.name}: {splits.num_classes} classes, "
        f"{len(splits.train)} train / {len(splits.test)} test images; feature dim {bb.feature_dim}"
        + (", L2-normalised" if bb.normalize else "")
    )
    feats = get_features(cfg, bb, splits, console)
    zero_shot = None
    if cfg.head == "zeroshot":
        zero_shot = (bb.text_classifier(splits.class_names).float().cpu(), float(bb.logit_scale))
    return ProbeData(bb, splits, feats["train"], feats["val"], feats["test"], zero_shot)


def validation_split(cfg: ProbeConfig, data: ProbeData, split_seed: int) -> tuple[Features, Features, str]:
    """(fit part, validation part, description): the dataset's own val split, else a seeded share of train."""
    if data.val is not None:
        return data.train, data.val, "the dataset's validation split"
    frac = cfg.val_fraction or 0.2
    fit_part, val = split_validation(data.train, frac, split_seed)
    return fit_part, val, f"{frac:.0%} of train, stratified, split seed {split_seed}"


def fit_probe(
    cfg: ProbeConfig,
    data: ProbeData,
    log_to: Path | None,
    split_seed: int | None = None,
    console: Console | None = None,
) -> ProbeResult:
    """Choose settings on validation when sweeping (never on test), refit on train+val, predict test."""
    K = data.num_classes
    wd, knob = cfg.weight_decay, (cfg.c_bar if cfg.loss in USES_FEATURES else 1.0)
    train, val_source = data.train, None
    if sweeping(cfg):
        fit_part, val, val_source = validation_split(cfg, data, cfg.seed if split_seed is None else split_seed)
        wd, knob, _ = choose(cfg, fit_part, val, K, data.backbone.normalize, data.zero_shot, log_to)
        if console is not None:
            console.print(
                f"chosen on validation ({val_source}): weight decay {wd:g}, "
                f"{'temperature' if cfg.loss == 'ce' else 'c_bar'} {knob:g}; refitting on train+val"
            )
        train = Features.concat(fit_part, val)
    elif data.val is not None:
        train = Features.concat(data.train, data.val)
    head, loss = fit(
        cfg,
        train,
        K,
        data.backbone.normalize,
        weight_decay=wd,
        knob=knob,
        seed=cfg.seed,
        zero_shot=data.zero_shot,
        log_to=log_to,
        tag="final",
    )
    return ProbeResult(head, loss, train, predict(head, data.test.x), wd, knob, val_source)


def write_probe_run(
    cfg: ProbeConfig, data: ProbeData, result: ProbeResult, run_dir: Path, report_formats: str = "json,csv,md,html"
) -> dict:
    """Write config, classes, predictions, class statistics, head and the report into ``run_dir``."""
    from mr2ft.io import save_tensors
    from mr2ft.report import write_report

    bb, K = data.backbone, data.num_classes
    uses_margins = cfg.loss in USES_FEATURES
    final = replace(cfg, weight_decay=result.weight_decay, **({"c_bar": result.knob} if uses_margins else {}))
    extra = {
        "backbone_source": bb.source,
        "feature_dim": bb.feature_dim,
        "normalized_features": bb.normalize,
        "preprocess": bb.preprocess.to_dict(),
        "chosen_on_validation": {"weight_decay": result.weight_decay, "knob": result.knob, "from": result.val_source}
        if result.val_source
        else None,
        "representation_margin": "off: features are fixed in a probe, so L_RM has no gradient (logit margin only)",
    }
    if cfg.loss == "ce":
        extra["temperature"] = result.knob
    dump_config(final, run_dir / "config.yaml", command="probe", extra=extra)
    save_classes(
        run_dir,
        data.splits.class_names,
        dataset=data.splits.name,
        backbone=f"{bb.family}:{bb.name}",
        loss=cfg.loss,
        mode="probe",
        margins_applied=uses_margins,
        skipped_images=len(getattr(data.splits, "skipped", []) or []),
    )
    save_predictions(run_dir, data.test.y, result.logits, K)
    # Every run records the class statistics of its training features (the report plots accuracy against spread);
    # gamma is the margin MR2 would give at this c_bar, applied only when margins_applied is true.
    stats_loss = result.loss if uses_margins else make_loss(cfg, "mr2", result.train, K, bb.normalize, c_bar=1.0)
    save_class_stats(run_dir, stats_loss.class_stats())
    save_tensors(run_dir / HEAD, dict(result.head.state_dict()))
    return write_report(run_dir, cfg.baseline, report_formats)


def run(cfg: ProbeConfig, console: Console | None = None) -> Path:
    """Run a linear probe end to end and return its run folder."""
    console = console or Console(stderr=True)
    validate(cfg)
    out_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.backbone, cfg.dataset, cfg.loss)
    check_run_dir(out_dir, overwrite=cfg.overwrite, resumable=False)
    baseline = load_run(cfg.baseline) if cfg.baseline else None  # fail now, not after the work
    data = prepare(cfg, console)
    if baseline is not None and list(baseline["class_names"]) != list(data.splits.class_names):
        raise UserError(
            f"baseline {cfg.baseline} was run on other classes ({_names(baseline['class_names'])}) than "
            f"{data.splits.name} ({_names(data.splits.class_names)}); pass a baseline run on the same dataset"
        )
    with run_folder(out_dir, overwrite=cfg.overwrite, resumable=False) as run_dir:
        result = fit_probe(cfg, data, run_dir / METRICS, console=console)
        report = write_probe_run(cfg, data, result, run_dir)
    print_summary(console, report, run_dir, cfg.loss)
    return run_dir


def _names(names: list[str], shown: int = 3) -> str:
    more = ", ..." if len(names) > shown else ""
    return f"{len(names)}: {', '.join(names[:shown])}{more}"


def print_summary(console: Console, report: dict, run_dir: Path, loss: str) -> None:
    """A short Rich table: overall, balanced, worst class and per-group accuracy."""
    s = report["summary"] if "summary" in report else report
    table = Table(title=f"{loss}: per-class results ({run_dir})")
    for col in ("overall", "balanced", "worst class", "easy", "medium", "hard", "std"):
        table.add_column(col, justify="right")
    g = s["groups"]
    table.add_row(
        f"{s['top1']:.1f}",
        f"{s['balanced_accuracy']:.1f}",
        f"{s['worst_class']['accuracy']:.1f}",
        *(f"{g[n]['accuracy']:.1f}" if n in g else "-" for n in ("easy", "medium", "hard")),
        f"{s['std']:.1f}",
    )
    console.print(table)
