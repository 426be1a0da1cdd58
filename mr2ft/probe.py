"""The linear probe: features of a frozen backbone, cached once, then a head trained with any loss.

Read top to bottom: :func:`run` validates, loads the backbone and data, gets features (from the cache when it can),
chooses hyper-parameters on a validation split (weight decay by default; never on test), fits the final head on
train+val, evaluates once on test and writes the run folder. This module owns the method-level choices (which loss,
which knob: MR2's ``c_bar`` or cross-entropy's ``temperature``, the two-pass comparators JTT and LfF, LDAM's cosine
classifier); :mod:`mr2ft.headfit` owns the optimisation of one head (to convergence by default) and how it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mr2ft import featrows, metrics
from mr2ft.config import ProbeConfig, replace
from mr2ft.errors import UserError
from mr2ft.features import FeatureCache, cache_key, is_main_process, stored_features
from mr2ft.headfit import (
    Features,
    Stopped,
    check_schedule,
    fit_head,
    fit_lff,
    plan_for,
    predict,
    rep_grad_share,
    standardize,
)
from mr2ft.heads import HEADS, LinearHead
from mr2ft.io import load_tensors, log_record, state_checksum
from mr2ft.losses import LOSSES, build_loss, keeps_class_statistics
from mr2ft.report.kit import fmt_num
from mr2ft.runs import (
    CLASS_STATS,
    HEAD,
    METRICS,
    VAL_PREDICTIONS,
    check_run_dir,
    default_run_dir,
    load_run,
    run_folder,
    save_class_stats,
    save_predictions,
    write_header,
)
from mr2ft.tracking import parse_trackers, record_trackers

log = logging.getLogger("mr2ft")
# Where a probe's metrics records go (mr2ft.io.log_record): metrics.jsonl, a callable (mr2ft.tracking) or nowhere.
LogTo = Path | Callable[[dict], None] | None

# Comparators that need two passes or two heads; cheap on cached features, so the probe offers them.
TWO_PASS = {
    "jtt": "Just Train Twice: upweight the training samples an ERM head gets wrong, then refit",
    "lff": "Learning from Failure: a GCE-trained biased head re-weights the main head's samples",
}
CRITERIA = ("overall", "hard")


def probe_losses() -> list[str]:
    """Every ``--loss`` the probe accepts."""
    return [*LOSSES, *TWO_PASS]


# ---- validation ----------------------------------------------------------------------------------------------


def validate(cfg: ProbeConfig) -> None:
    """Refuse bad settings before any heavy work."""
    if not cfg.dataset:
        raise UserError("no dataset given; pass --dataset (a folder, a CSV, hf:NAME or a name like cifar100)")
    if cfg.loss not in probe_losses():
        raise UserError(f"unknown loss {cfg.loss!r}; the probe accepts: {', '.join(probe_losses())}")
    if cfg.head not in HEADS:
        raise UserError(f"unknown head {cfg.head!r}; choose one of: {', '.join(HEADS)}")
    check_schedule(cfg)
    featrows.choose_memory(cfg.feature_memory, 0)  # refuses an unknown --feature-memory
    if cfg.sweep_cbar and knob_name(cfg.loss) != "c_bar":
        raise UserError(f"--sweep-cbar tunes MR2's average margin; it needs --loss mr2 or uniform, not {cfg.loss}")
    if cfg.sweep_temperature and cfg.loss != "ce":
        raise UserError("--sweep-temperature tunes plain cross-entropy's global temperature; use it with --loss ce")
    if cfg.sweep_criterion not in CRITERIA:
        raise UserError(f"--sweep-criterion must be one of {', '.join(CRITERIA)}, got {cfg.sweep_criterion!r}")
    parse_trackers(cfg.report_to)


def sweeping(cfg: ProbeConfig) -> bool:
    return cfg.sweep_wd or cfg.sweep_cbar or cfg.sweep_temperature


# ---- fitting one head (the optimisation itself is mr2ft.headfit) ----------------------------------------------


def knob_name(loss: str) -> str | None:
    """The probe's second tuned setting for ``loss``: ``c_bar`` (mr2, uniform), ``temperature`` (ce) or None."""
    if keeps_class_statistics(loss):
        return "c_bar"
    return "temperature" if loss == "ce" else None


def default_knob(cfg: ProbeConfig) -> float:
    """The knob's value when it is not swept: the config's c_bar, or temperature 1."""
    return cfg.c_bar if knob_name(cfg.loss) == "c_bar" else 1.0


def make_loss(
    cfg: ProbeConfig,
    name: str,
    train: Features,
    num_classes: int,
    normalized: bool,
    *,
    c_bar: float | None = None,
    temperature: float = 1.0,
) -> torch.nn.Module:
    """The loss for a probe fit. MR2 and its control use exact statistics of the training features (what the
    classifier sees) and no representation term: the features are constants in a probe, so L_RM has no gradient."""
    d = train.x.shape[1]
    if keeps_class_statistics(name):
        loss = build_loss(
            name,
            num_classes,
            d,
            c_bar=cfg.c_bar if c_bar is None else c_bar,
            lambda_rep=0.0,
            p=cfg.p,
            momentum=cfg.momentum,
            margin_mode=cfg.margin_mode,
            normalize_features=normalized,
            temperature_factor=cfg.temperature_factor,
        )
        loss.fit_statistics(standardize(train.x) if cfg.head == "bn_linear" else train.x, train.y)
        return loss
    return build_loss(
        name, num_classes, d, temperature=temperature, class_counts=torch.bincount(train.y, minlength=num_classes)
    )


def classifier_of(cfg: ProbeConfig) -> str:
    """What the head computes, for the run's config: LDAM gets the cosine classifier its s=30 is meant for."""
    if cfg.loss == "ldam" or cfg.head == "cosine":
        why = " (LDAM-DRW's NormedLinear: LDAM's s=30 scales cosine logits)" if cfg.loss == "ldam" else ""
        return f"cosine: normalize(features) @ normalize(W).T, no bias{why}"
    if cfg.head == "bn_linear":
        return "linear after BatchNorm1d(affine=False)"
    return "linear" + (", fitted on standardised features and folded back" if cfg.standardize else "")


@dataclass
class Fitted:
    """One fitted head, its loss (None for the two-pass comparators) and how its training stopped."""

    head: LinearHead
    loss: torch.nn.Module | None
    stopped: Stopped


def fit(
    cfg: ProbeConfig,
    train: Features,
    num_classes: int,
    normalized: bool,
    *,
    weight_decay: float,
    seed: int,
    c_bar: float | None = None,
    temperature: float = 1.0,
    zero_shot: tuple[torch.Tensor, float] | None = None,
    log_to: LogTo = None,
    tag: str = "fit",
) -> Fitted:
    """Fit the configured method once, at MR2's/the control's ``c_bar`` or cross-entropy's ``temperature``."""
    init, scale = zero_shot if zero_shot else (None, 1.0)
    common = {"weight_decay": weight_decay, "seed": seed, "init": init, "init_scale": scale, "log_to": log_to}
    cosine = cfg.loss == "ldam"
    if cfg.loss == "jtt":
        erm = make_loss(cfg, "ce", train, num_classes, normalized)
        first, _ = fit_head(cfg, train, num_classes, erm, epochs=cfg.jtt_epochs, tag=f"{tag}:jtt-erm", **common)
        wrong = predict(first, train.x).argmax(1) != train.y
        w = torch.where(wrong, torch.tensor(float(cfg.jtt_upweight)), torch.tensor(1.0))
        head, stopped = fit_head(cfg, train, num_classes, erm, sample_weight=w, tag=f"{tag}:jtt", **common)
        return Fitted(head, None, stopped)
    if cfg.loss == "lff":
        head, stopped = fit_lff(cfg, train, num_classes, weight_decay=weight_decay, seed=seed, log_to=log_to)
        return Fitted(head, None, stopped)
    loss = make_loss(cfg, cfg.loss, train, num_classes, normalized, c_bar=c_bar, temperature=temperature)
    head, stopped = fit_head(cfg, train, num_classes, loss, cosine=cosine, tag=tag, **common)
    return Fitted(head, loss, stopped)


def knob_setting(cfg: ProbeConfig, knob: float) -> dict[str, float]:
    """``{"c_bar": knob}``, ``{"temperature": knob}`` or ``{}``: the knob passed to :func:`fit` by its name."""
    name = knob_name(cfg.loss)
    return {name: knob} if name else {}


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
    log_to: LogTo,
) -> tuple[float, float, list[dict], tuple[torch.Tensor, torch.Tensor]]:
    """Pick weight decay and/or the knob (c_bar or temperature) by validation; returns (wd, knob, records, and the
    chosen head's validation (targets, logits): the model fitted without the validation images, which is what
    ``report --groups val`` ranks classes by).

    For the ``hard`` criterion the hard classes are the bottom third of an ERM head's per-class validation accuracy
    (fit on the same split with the default settings). Ties keep the earlier grid value; grids are in the config.
    """
    wds = list(cfg.wd_grid) if cfg.sweep_wd else [cfg.weight_decay]
    knobs = list(cfg.cbar_grid) if (cfg.sweep_cbar or cfg.sweep_temperature) else [default_knob(cfg)]
    common = {"seed": cfg.seed, "zero_shot": zero_shot}
    hard = None
    if cfg.sweep_criterion == "hard":
        erm = fit(replace(cfg, loss="ce"), fit_part, num_classes, normalized, weight_decay=cfg.weight_decay, **common)
        val_acc = metrics.per_class_accuracy(
            metrics.confusion_matrix(predict(erm.head, val.x).argmax(1), val.y, num_classes).numpy()
        )
        hard = np.nonzero(metrics.assign_groups(val_acc) == 2)[0]
    records, best, best_key = [], None, None
    for wd in wds:
        for knob in knobs:
            f = fit(
                cfg,
                fit_part,
                num_classes,
                normalized,
                weight_decay=wd,
                tag="sweep",
                **knob_setting(cfg, knob),
                **common,
            )
            val_logits = predict(f.head, val.x)
            s = score(val_logits, val.y, num_classes, hard)
            rec = {"stage": "sweep", "weight_decay": wd, "knob": knob, **{f"val_{k}": v for k, v in s.items()}}
            rec.update(steps=f.stopped.steps, converged=f.stopped.converged)
            records.append(rec)
            if log_to is not None:
                log_record(log_to, rec)
            key = (s[cfg.sweep_criterion], s["overall"])
            if best_key is None or key > best_key:
                best, best_key, best_val = (wd, knob), key, (val.y, val_logits)
    return best[0], best[1], records, best_val


# ---- the job -------------------------------------------------------------------------------------------------


def get_features(cfg: ProbeConfig, bb, splits, console: Console) -> tuple[dict[str, Features | None], str]:
    """Features of every split, from the cache when valid, else extracted (and cached); returns them and where the
    head reads them: ``"memory"`` (loaded) or ``"stream"`` (rows of the chunked store, :mod:`mr2ft.featrows`), as
    ``cfg.feature_memory`` says (``auto``: streamed when they would not fit in memory)."""
    from mr2ft.data import TransformedDataset

    cache = FeatureCache(cfg.cache_dir)
    stores = {}
    transform = None
    checksum_before = None
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        if ds is None:
            stores[name] = None
            continue
        key = cache_key(bb.fingerprint, splits.split_fingerprint(name))
        cached = cache.path(key).is_file()
        transform = transform or bb.preprocess.eval_transform()
        if checksum_before is None and not cached:
            checksum_before = state_checksum(bb.model)
        t0, info = time.perf_counter(), {"backbone": bb.source, "split": name, "dataset": splits.name}
        stores[name] = stored_features(  # every process of an accelerate launch extracts its shard; None on the others
            cache, key, bb.model, TransformedDataset(ds, transform), batch_size=cfg.extract_batch_size,
            num_workers=cfg.num_workers, description=f"extracting {name} features", info=info,
        )  # fmt: skip
        how = "cached" if cached else f"extracted in {time.perf_counter() - t0:.1f}s,"
        console.print(f"[dim]{name}: {len(ds)} features {how} ({cache.path(key)})[/dim]")
    if checksum_before is not None and state_checksum(bb.model) != checksum_before:
        raise RuntimeError("the backbone's weights changed during feature extraction; it must stay frozen")
    where, why = featrows.choose_memory(cfg.feature_memory, sum(s.nbytes for s in stores.values() if s is not None))
    out: dict[str, Features | None] = {}
    for name, s in stores.items():
        rows = None if s is None else (featrows.rows_of(s, where), s.targets)
        out[name] = None if rows is None else Features(*rows)
    if any(s is not None for s in stores.values()):
        console.print(f"[dim]features for the head: {'in memory' if where == 'memory' else 'streamed'} ({why})[/dim]")
    return out, where


@dataclass
class ProbeData:
    """Everything a probe fit needs, loaded once: the backbone, the splits and their cached features."""

    backbone: object
    splits: object
    train: Features
    val: Features | None
    test: Features
    zero_shot: tuple[torch.Tensor, float] | None
    feature_memory: str = "memory"  # where the head reads the features: memory or stream (the chunked store)

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
    stopped: Stopped | None = None
    rep_grad_share: float | None = None
    # (targets, logits) on validation of the head chosen there, fitted without the validation images; None unless
    # settings were chosen on validation (the final head is refitted on train+val, so its own val figures are biased).
    val_predictions: tuple[torch.Tensor, torch.Tensor] | None = None


def prepare(cfg: ProbeConfig, console: Console, need_val: bool | None = None) -> ProbeData:
    """Load the backbone and data and get features of every split (cached after the first time)."""
    from mr2ft.backbones import load_backbone
    from mr2ft.data import load_dataset_for

    need_val = sweeping(cfg) if need_val is None else need_val
    # The data first: a wrong --dataset is reported before any weights are looked for (and in seconds).
    splits = load_dataset_for(cfg, val_fraction=0.0 if need_val else cfg.val_fraction)
    options = {"normalize": cfg.normalize, "pool": cfg.pool, "image_size": cfg.image_size}
    bb = load_backbone(
        cfg.backbone, model=cfg.model, weights=cfg.weights, **{k: v for k, v in options.items() if v is not None}
    )
    if keeps_class_statistics(cfg.loss) and bb.normalize and (cfg.p or 5.0) == 2.0:
        raise UserError(
            "p=2 on L2-normalised features gives every class the same margin; use --p 5 (the default) or --no-normalize"
        )
    console.print(
        f"[bold]probe[/bold] {bb.family}:{bb.name} ({bb.source}) on {splits.name}: {splits.num_classes} classes, "
        f"{len(splits.train)} train / {len(splits.test)} test images; feature dim {bb.feature_dim}"
        + (", L2-normalised" if bb.normalize else "")
    )
    feats, where = get_features(cfg, bb, splits, console)
    zero_shot = None
    if cfg.head == "zeroshot":
        zero_shot = (bb.text_classifier(splits.class_names).float().cpu(), float(bb.logit_scale))
    return ProbeData(bb, splits, feats["train"], feats["val"], feats["test"], zero_shot, where)


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
    log_to: LogTo,
    split_seed: int | None = None,
    console: Console | None = None,
) -> ProbeResult:
    """Choose settings on validation when sweeping (never on test), refit on train+val, predict test."""
    K = data.num_classes
    wd, knob = cfg.weight_decay, default_knob(cfg)
    train, val_source, val_predictions = data.train, None, None
    if sweeping(cfg):
        fit_part, val, val_source = validation_split(cfg, data, cfg.seed if split_seed is None else split_seed)
        wd, knob, _, val_predictions = choose(cfg, fit_part, val, K, data.backbone.normalize, data.zero_shot, log_to)
        if console is not None:
            named = f", {knob_name(cfg.loss)} {knob:g}" if knob_name(cfg.loss) else ""
            console.print(f"chosen on validation ({val_source}): weight decay {wd:g}{named}; refitting on train+val")
        train = Features.concat(fit_part, val)
    elif data.val is not None:
        train = Features.concat(data.train, data.val)
    t0 = time.perf_counter()
    f = fit(
        cfg,
        train,
        K,
        data.backbone.normalize,
        weight_decay=wd,
        seed=cfg.seed,
        zero_shot=data.zero_shot,
        log_to=log_to,
        tag="final",
        **knob_setting(cfg, knob),
    )
    seconds = time.perf_counter() - t0
    share = None
    if f.loss is not None and keeps_class_statistics(cfg.loss):
        share = rep_grad_share(f.head, f.loss, train, cfg.lambda_rep, plan_for(cfg, len(train.y)).batch, cfg.seed)
        if log_to is not None and share is not None:
            log_record(log_to, {"stage": "final", "rep_grad_share": share, "lambda_rep": cfg.lambda_rep})
    if console is not None:
        s = f.stopped
        state = {True: "converged", False: "NOT converged", None: "fixed budget"}[s.converged]
        console.print(
            f"head: {s.steps} steps ({s.epochs:g} epochs, {s.schedule}), {state}, training objective "
            f"{s.train_loss:.4g}, {seconds:.1f}s"
        )
    test_logits = predict(f.head, data.test.x)
    return ProbeResult(f.head, f.loss, train, test_logits, wd, knob, val_source, f.stopped, share, val_predictions)


def write_probe_run(
    cfg: ProbeConfig, data: ProbeData, result: ProbeResult, run_dir: Path, report_formats: str = "json,csv,md,html"
) -> dict:
    """Write config, classes, predictions, class statistics, head and the report into ``run_dir``."""
    from mr2ft.io import save_tensors
    from mr2ft.report import write_report

    bb, K = data.backbone, data.num_classes
    uses_margins = keeps_class_statistics(cfg.loss)
    final = replace(cfg, weight_decay=result.weight_decay, **({"c_bar": result.knob} if uses_margins else {}))
    plan = plan_for(cfg, len(result.train.y))
    extra = {
        "backbone_source": bb.source,
        "feature_dim": bb.feature_dim,
        "normalized_features": bb.normalize,
        "preprocess": bb.preprocess.to_dict(),
        "chosen_on_validation": {"weight_decay": result.weight_decay, "knob": result.knob, "from": result.val_source}
        if result.val_source
        else None,
        "representation_margin": "off: features are fixed in a probe, so L_RM has no gradient (logit margin only)",
        "classifier": classifier_of(cfg),
        "lr": plan.lr,
        "head_training": result.stopped.record() if result.stopped else None,
        "feature_memory_used": data.feature_memory,
    }
    if result.rep_grad_share is not None:
        extra["rep_grad_share"] = result.rep_grad_share
    if cfg.loss == "ce":
        extra["temperature"] = result.knob
    write_header(run_dir, final, "probe", data.splits, bb, extra=extra, margins_applied=uses_margins)
    save_predictions(run_dir, data.test.y, result.logits, K)
    if result.val_predictions is not None:
        save_predictions(run_dir, *result.val_predictions, K, name=VAL_PREDICTIONS)
    # Every run records the class statistics of its training features (the report plots accuracy against spread);
    # gamma is the margin MR2 would give at this c_bar, applied only when margins_applied is true.
    stats_loss = result.loss if uses_margins else make_loss(cfg, "mr2", result.train, K, bb.normalize, c_bar=1.0)
    save_class_stats(run_dir, stats_loss.class_stats())
    save_tensors(run_dir / HEAD, dict(result.head.state_dict()))
    return write_report(run_dir, cfg.baseline, report_formats)


def run(cfg: ProbeConfig, console: Console | None = None) -> Path:
    """Run a linear probe end to end and return its run folder.

    With ``cfg.report_to`` the main process also logs every ``metrics.jsonl`` record's figures and the test figures
    to those trackers (:func:`mr2ft.tracking.record_trackers`; TensorBoard: under ``RUN/mr2ft/``).
    """
    console = console or Console(stderr=True)
    validate(cfg)
    out_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.backbone, cfg.dataset, cfg.loss)
    check_run_dir(out_dir, overwrite=cfg.overwrite, resumable=False)
    baseline = load_run(cfg.baseline) if cfg.baseline else None  # fail now, not after the work
    data = prepare(cfg, console)
    if not is_main_process():  # the other processes of an accelerate launch only extracted their shards
        return out_dir
    if baseline is not None and list(baseline["class_names"]) != list(data.splits.class_names):
        raise UserError(
            f"baseline {cfg.baseline} was run on other classes ({_names(baseline['class_names'])}) than "
            f"{data.splits.name} ({_names(data.splits.class_names)}); pass a baseline run on the same dataset"
        )
    with run_folder(out_dir, overwrite=cfg.overwrite, resumable=False) as run_dir:
        _, report = fit_and_write(cfg, data, run_dir, console)
    print_summary(console, report, run_dir, cfg.loss)
    return run_dir


def fit_and_write(
    cfg: ProbeConfig,
    data: ProbeData,
    run_dir: Path,
    console: Console | None,
    split_seed: int | None = None,
    report_formats: str = "json,csv,md,html",
) -> tuple[ProbeResult, dict]:
    """Fit the probe and write its run folder (a probe's run, one run of a study); with ``cfg.report_to`` every
    ``metrics.jsonl`` record's figures and the test figures also go to those trackers."""
    with record_trackers(cfg, run_dir, run_dir / METRICS) as tracked:  # None without trackers
        result = fit_probe(cfg, data, tracked or run_dir / METRICS, split_seed=split_seed, console=console)
        report = write_probe_run(cfg, data, result, run_dir, report_formats)
        if tracked is not None:  # the test figures, at the final head's last step, with the saved classes' margins
            gamma = load_tensors(run_dir / CLASS_STATS)["gamma"]
            tracked.evaluation("test", report.get("summary", report), gamma, step=result.stopped.steps)
    return result, report


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
        fmt_num(s["top1"]),
        fmt_num(s["balanced_accuracy"]),
        fmt_num(s["worst_class"]["accuracy"]),
        *(fmt_num(g[n]["accuracy"]) if n in g else "-" for n in ("easy", "medium", "hard")),  # a group can be empty
        fmt_num(s["std"]),
    )
    console.print(table)
