"""The study's runs: its settings, every check before any training, and one run folder per method and seed.

Probe mode: every fit uses the same cached features and validation split (its seed is the config seed); seed i
changes only the head's initialisation and the minibatch order; choices are made on validation only
(:func:`mr2ft.probe.fit_probe`). Finetune mode: each method/seed is one :func:`mr2ft.finetune.run` with the config's
settings (nothing tuned) and, per seed, the same data order and validation split for every method. What the
analysis needs besides the run folders (ERM's per-class validation accuracy, the representation margin's gradient
share, the control's matched margin) is gathered here and handed to :func:`mr2ft.study.build.build_study`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from mr2ft import metrics
from mr2ft.config import (
    CommonConfig,
    FinetuneConfig,
    ProbeConfig,
    StudyConfig,
    build_config,
    dump_config,
    load_recipe,
    replace,
)
from mr2ft.errors import UserError
from mr2ft.features import is_main_process
from mr2ft.io import read_jsonl
from mr2ft.report.kit import class_stat
from mr2ft.runs import CONFIG, METRICS, check_run_dir, default_run_dir, load_run, run_folder
from mr2ft.study.analysis import GROUP_RULES, LABELS, matched_c_bar, mean_inverse_margin, methods_of
from mr2ft.study.build import build_study
from mr2ft.study.render import print_study, write_study

MODES = ("probe", "finetune")
RUN_REPORTS = "json,csv,md"  # per-run reports; HTML (plots) only for the study, to keep many runs fast
FINETUNE_CONFIG = "finetune_config.yaml"
FINETUNE_VAL_FRACTION = 0.2  # what a fine-tune study holds out of train for the groups when nothing else is set


def seeds_of(cfg: Any) -> list[int]:
    """The training seeds of a study: ``seed, seed + 1, ...``; the probe's validation split always uses ``seed``."""
    return [cfg.seed + i for i in range(cfg.seeds)]


# ---- configuration -----------------------------------------------------------------------------------------------


def study_configs(recipe: str | None = None, **overrides: Any) -> tuple[StudyConfig, FinetuneConfig | None]:
    """Resolve the study config (and, with ``mode="finetune"``, the fine-tune config every run starts from).

    In probe mode the recipe is a study or probe recipe; a probe recipe's ``loss``, ``sweep_*`` and ``baseline`` are
    not used (the study sets them per method). In finetune mode it is a fine-tune recipe: it sets every run's
    training, and the study keeps only its own settings (seeds, bootstrap, groups) plus the data and backbone.
    """
    mode = overrides.get("mode") or "probe"
    study_fields = {f.name for f in dataclasses.fields(StudyConfig)}
    given = {k: v for k, v in overrides.items() if v is not None}
    if mode != "finetune":
        base: dict[str, Any] = {}
        if recipe and load_recipe(recipe).get("command") == "probe":
            probe_cfg = build_config(ProbeConfig, recipe)
            base = {k: getattr(probe_cfg, k) for k in study_fields if hasattr(probe_cfg, k)}
            recipe = None
        mine = {k: v for k, v in given.items() if k in study_fields}
        return build_config(StudyConfig, recipe, **{**base, **mine}), None
    ft_fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    ft = build_config(FinetuneConfig, recipe, **{k: v for k, v in given.items() if k in ft_fields})
    common = {f.name: getattr(ft, f.name) for f in dataclasses.fields(CommonConfig) if f.name in study_fields}
    mine = {k: v for k, v in given.items() if k in study_fields and k not in common}
    return build_config(StudyConfig, None, **common, **mine), ft


def finetune_settings(cfg: StudyConfig) -> FinetuneConfig:
    """Fine-tune settings for a study called from Python without them: FinetuneConfig's defaults, plus every shared
    setting the study config changed from its own defaults (the data, the backbone, the seed, ...)."""
    defaults = StudyConfig()
    changed = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(CommonConfig)
        if hasattr(cfg, f.name) and getattr(cfg, f.name) != getattr(defaults, f.name)
    }
    return build_config(FinetuneConfig, None, **changed)


def with_validation(cfg: StudyConfig, ft: FinetuneConfig) -> FinetuneConfig:
    """A fine-tune study grouping on validation holds out 20% of train (stratified) unless a share is set."""
    if cfg.groups == "validation" and not ft.val_fraction:
        return replace(ft, val_fraction=FINETUNE_VAL_FRACTION)
    return ft


def _probe_base(cfg: StudyConfig) -> ProbeConfig:
    """The probe settings of a study, as a plain ProbeConfig (loss ``ce`` until :func:`method_config` sets it)."""
    shared = [f.name for f in dataclasses.fields(ProbeConfig) if hasattr(cfg, f.name)]
    return ProbeConfig(**{name: getattr(cfg, name) for name in shared})


def method_config(base: ProbeConfig, method: str, seed: int, baseline: str | None = None) -> ProbeConfig:
    """One probe run of the study: the method's loss, its sweeps switched on, the run's seed."""
    return replace(
        base,
        loss=method,
        seed=seed,
        sweep_wd=True,
        sweep_temperature=method == "ce",
        sweep_cbar=method != "ce",
        baseline=baseline,
        out=None,
        overwrite=False,
    )


def validate_study(cfg: StudyConfig, finetune_cfg: FinetuneConfig | None = None) -> None:
    """Refuse bad study settings before any heavy work."""
    if cfg.mode not in MODES:
        raise UserError(f"--mode must be probe or finetune, got {cfg.mode!r}")
    if cfg.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {cfg.seeds}")
    if cfg.n_boot < 1:
        raise UserError(f"--n-boot must be at least 1, got {cfg.n_boot}")
    if cfg.groups not in GROUP_RULES:
        raise UserError(f"--groups must be one of {', '.join(GROUP_RULES)}, got {cfg.groups!r}")
    if cfg.mode == "probe":
        from mr2ft import probe

        if not cfg.wd_grid or not cfg.cbar_grid:
            raise UserError("the study tunes on validation: --wd-grid and --cbar-grid need at least one value each")
        base = _probe_base(cfg)
        for method in methods_of(cfg.mode, cfg.margin_mode):
            probe.validate(method_config(base, method, cfg.seed))
    else:
        from mr2ft import finetune

        if finetune_cfg is None:
            raise UserError("--mode finetune needs fine-tune settings; pass them with --recipe or flags")
        for method in methods_of(cfg.mode, finetune_cfg.margin_mode):
            finetune.validate(replace(finetune_cfg, loss=method))


def check_p(normalized: bool, p: float | None) -> None:
    """MR2's statistics on L2-normalised features need p != 2 (with p = 2 every class gets the same margin)."""
    if normalized and (p or 5.0) == 2.0:
        raise UserError(
            "p=2 on L2-normalised features gives every class the same margin; use --p 5 (the default) or --no-normalize"
        )


def preflight_finetune(ft: FinetuneConfig, seeds: list[int]) -> list[np.ndarray]:
    """Before any fine-tune: every seed must see the same classes and the very same test images (a paired study
    needs one test set). Returns each seed's training images per class (the control's margin weights)."""
    from mr2ft.data import load_dataset_for

    counts, first = [], None
    for seed in seeds:
        splits = load_dataset_for(ft, seed=seed)
        identity = (list(splits.class_names), splits.split_fingerprint("test"))
        if first is None:
            first = identity
        elif identity[0] != first[0]:
            raise UserError(f"seed {seed} loads other classes than seed {seeds[0]}; a study needs one class list")
        elif identity[1] != first[1]:
            raise UserError(
                f"seed {seed} tests on other images than seed {seeds[0]} (the test subset depends on the seed): a "
                "paired study needs one test set; drop --test-max-per-class or run each seed as its own study"
            )
        counts.append(np.bincount(np.asarray(splits.train.targets), minlength=len(splits.class_names)))
    return counts


# ---- the runs ----------------------------------------------------------------------------------------------------


def _run_dir(out_dir: Path, method: str, index: int) -> Path:
    return out_dir / f"{method}-seed{index}"


def _record(method: str, seed: int, run_dir: Path, weight_decay: float, knob: float | None, sweep: bool) -> dict:
    knob_name = None if knob is None else ("temperature" if method == "ce" else "c_bar")
    validation = []
    if sweep:
        validation = [
            {k: v for k, v in r.items() if k != "stage"}
            for r in read_jsonl(run_dir / METRICS)
            if r.get("stage") == "sweep"
        ]
    return {
        "method": method,
        "seed": seed,
        "dir": run_dir.name,
        "weight_decay": weight_decay,
        "knob_name": knob_name,
        "knob": knob,
        "validation": validation,
    }


def _probe_val_accuracy(run_cfg: ProbeConfig, data: Any, result: Any, split_seed: int) -> np.ndarray:
    """ERM's per-class validation accuracy at the settings it chose, fit on the training part alone (as in the
    sweep), so no image it is measured on was trained on or is scored by the study."""
    from mr2ft import probe

    fit_part, val, _ = probe.validation_split(run_cfg, data, split_seed)
    fitted = probe.fit(
        run_cfg,
        fit_part,
        data.num_classes,
        data.backbone.normalize,
        weight_decay=result.weight_decay,
        seed=run_cfg.seed,
        zero_shot=data.zero_shot,
        tag="groups",
        **probe.knob_setting(run_cfg, result.knob),
    )
    preds = probe.predict(fitted.head, val.x).argmax(1)
    return metrics.per_class_accuracy(metrics.confusion_matrix(preds, val.y, data.num_classes))


def _probe_runs(cfg: StudyConfig, out_dir: Path, console: Console) -> tuple[list[dict], str, dict]:
    """Fit every method and seed on one set of cached features; returns the run records, the split in words and
    what the analysis needs besides the folders (ERM's validation accuracy, the representation margin's share)."""
    from mr2ft import probe

    base = _probe_base(cfg)
    data = probe.prepare(base, console, need_val=True)
    check_p(data.backbone.normalize, cfg.p)  # before any fit
    records, split, val_acc, shares = [], "", [], []
    for i, seed in enumerate(seeds_of(cfg)):
        erm_dir = None
        for method in methods_of("probe", cfg.margin_mode):
            run_dir = _run_dir(out_dir, method, i)
            run_dir.mkdir(parents=True)
            run_cfg = method_config(base, method, seed, baseline=None if method == "ce" else str(erm_dir))
            console.print(f"[bold]{LABELS[method]}[/bold], seed {seed} -> {run_dir}")
            result, _ = probe.fit_and_write(run_cfg, data, run_dir, console, cfg.seed, RUN_REPORTS)
            split = result.val_source or split
            records.append(_record(method, seed, run_dir, result.weight_decay, result.knob, sweep=True))
            if method == "ce":
                erm_dir = run_dir
                val_acc.append(_probe_val_accuracy(run_cfg, data, result, cfg.seed))
            elif method == "mr2" and result.rep_grad_share is not None:
                shares.append(result.rep_grad_share)
    extras = {
        "group_accuracy": np.mean(val_acc, axis=0),
        "rep_grad_share": float(np.mean(shares)) if shares else None,
        "rep_source": "a probe never applies it (its features are fixed); what it would add on these features, "
        f"measured by each MR2 probe on its training features at lambda_rep {cfg.lambda_rep:g}, mean over seeds",
        "margins": None,
    }
    return records, split, extras


def _last_val_accuracy(run_dir: Path) -> np.ndarray | None:
    """ERM's per-class accuracy on its held-out validation split at its last evaluation, when the run logged it."""
    rows = [r for r in read_jsonl(run_dir / METRICS) if r.get("split") == "val" and r.get("per_class_accuracy")]
    if not rows:
        return None
    return np.array([np.nan if v is None else v for v in rows[-1]["per_class_accuracy"]], dtype=np.float64)


def _logged_rep_share(run_dir: Path) -> list[float]:
    """Every ``rep_grad_share`` a fine-tune logged (under any prefix, e.g. ``train_rep_grad_share``)."""
    return [
        float(v)
        for r in read_jsonl(run_dir / METRICS)
        for k, v in r.items()
        if k.endswith("rep_grad_share") and isinstance(v, (int, float))
    ]


def _finetune_runs(
    cfg: StudyConfig, ft: FinetuneConfig, out_dir: Path, console: Console, counts: list[np.ndarray]
) -> tuple[list[dict], str, dict]:
    """Fine-tune every method and seed with the same settings; per seed, every method sees the same data order and
    validation split. MR2 runs before the control, whose one shared margin (scale mode) is matched on MR2's mean
    inverse margin."""
    from mr2ft import finetune

    records, val_acc, shares, margins = [], [], [], []
    order = [m for m in ("ce", "mr2", "uniform") if m in methods_of("finetune", ft.margin_mode)]
    for i, seed in enumerate(seeds_of(cfg)):
        erm_dir = None
        c_bars = {"ce": None, "mr2": ft.c_bar, "uniform": ft.c_bar}
        for method in order:
            run_dir = _run_dir(out_dir, method, i)
            run_cfg = replace(
                ft,
                loss=method,
                seed=seed,
                c_bar=c_bars[method] or ft.c_bar,
                out=str(run_dir),
                overwrite=False,
                resume=None,
                baseline=None if method == "ce" else str(erm_dir),
            )
            console.print(f"[bold]{LABELS[method]}[/bold], seed {seed} -> {run_dir}")
            finetune.run(run_cfg)
            records.append(_record(method, seed, run_dir, ft.weight_decay, c_bars[method], sweep=False))
            if method == "ce":
                erm_dir = run_dir
                val_acc.append(_last_val_accuracy(run_dir))
            elif method == "mr2":
                shares += _logged_rep_share(run_dir)
                gamma = class_stat(load_run(run_dir), "gamma", len(counts[i]))
                inv = mean_inverse_margin(gamma, counts[i]) if ft.margin_mode == "scale" else None
                if inv is not None:
                    c_bars["uniform"] = matched_c_bar(gamma, counts[i])
                margins.append(
                    {
                        "seed": seed,
                        "mr2_mean_inverse_margin": inv,
                        "control_c_bar": c_bars["uniform"],
                        "control_mean_inverse_margin": 1.0 / c_bars["uniform"],
                    }
                )
    split = (
        f"{ft.val_fraction:.0%} of train held out (stratified), carved with each seed (shared by that seed's "
        "methods); ERM's per-class accuracy on it sets the groups; the final model is the best epoch on it"
        if ft.val_fraction
        else "none held out (the final model is the last one; per-epoch logs use test)"
    )
    extras = {
        "group_accuracy": None if any(v is None for v in val_acc) else np.mean(val_acc, axis=0),
        "rep_grad_share": float(np.mean(shares)) if shares else None,
        "rep_source": "mean of what the MR2 runs logged during training"
        if shares
        else "the MR2 runs logged no rep_grad_share",
        "margins": margins,
    }
    return records, split, extras


def run_study(cfg: StudyConfig, console: Console | None = None, finetune_cfg: FinetuneConfig | None = None) -> dict:
    """Run the whole study and write its folder; returns the ``study.json`` contents (plus ``path`` and ``files``).

    Args:
        cfg: the study settings (probe settings plus ``mode``, ``seeds``, ``n_boot``, ``groups``).
        console: where progress and the final table go (default: stderr).
        finetune_cfg: in finetune mode, the settings every fine-tune run starts from (see :func:`study_configs`).

    Raises:
        UserError: bad settings, data or weights (checked before any fit where possible).
    """
    console = console or Console(stderr=True)
    if cfg.mode == "finetune":
        finetune_cfg = with_validation(cfg, finetune_cfg or finetune_settings(cfg))
    validate_study(cfg, finetune_cfg)
    out_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.backbone, cfg.dataset, "study")
    if cfg.mode == "probe" and not is_main_process():
        # Another process of an ``accelerate launch``: it extracts its share of the features; the main one fits and
        # writes every run.
        from mr2ft import probe

        probe.prepare(_probe_base(cfg), console, need_val=True)
        return {}
    if cfg.mode == "probe":
        with run_folder(out_dir, overwrite=cfg.overwrite, resumable=False) as folder:
            dump_config(cfg, folder / CONFIG, command="study")
            records, split, extras = _probe_runs(cfg, folder, console)
            study = build_study(cfg, folder, records, split, extras)
            study["files"] = write_study(study, folder)
    else:
        check_run_dir(out_dir, overwrite=cfg.overwrite, resumable=False)
        counts = preflight_finetune(finetune_cfg, seeds_of(cfg))  # classes and test set, before any training
        # Fine-tunes are expensive: a failure in a later run must not delete the finished ones, so no run_folder.
        if cfg.overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        folder = out_dir
        folder.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, folder / CONFIG, command="study")
        dump_config(
            replace(finetune_cfg, out=None),
            folder / FINETUNE_CONFIG,
            command="finetune",
            extra={"study": "every run starts from these settings; the study sets loss, seed, out, baseline, c_bar"},
        )
        records, split, extras = _finetune_runs(cfg, finetune_cfg, folder, console, counts)
        study = build_study(cfg, folder, records, split, extras)
        study["files"] = write_study(study, folder)
    print_study(console, study, folder)
    return dict(study, path=str(folder))
