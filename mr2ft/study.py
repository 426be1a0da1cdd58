"""``mr2ft study``: does MR2 help the hard classes on this data, beyond a matched control and beyond noise?

Three methods, each over N seeds, on the same data:

- ERM (``ce``), weight decay and a global logit temperature tuned on validation;
- the matched control (``uniform``): one margin ``c_bar`` for every class, i.e. MR2 without its class dependence,
  tuned on validation over the same grid as MR2's ``c_bar``;
- MR2 (``mr2``), ``c_bar`` tuned on validation over that grid.

In probe mode every fit uses the same cached features and the same validation split (its seed is the config seed);
seed i changes only the head's initialisation and the minibatch order. Choices are made on validation only
(:func:`mr2ft.probe.fit_probe`); the test split is read once per run, for the final figures. In finetune mode each
method/seed is one :func:`mr2ft.finetune.run` with the config's settings (nothing is tuned) and, per seed, the same
data order for every method.

Then, from the run folders alone: the easy/medium/hard groups (from ERM's per-class test accuracy averaged over the
seeds), the paper's table averaged over seeds, paired bootstrap intervals over test images and seeds for every
change, the attribution row "MR2 vs matched control", one verdict in words, and the diagnostics MR2's argument rests
on (is spread S higher for the hard classes; do the margins gamma point at them).

Layout of the study folder::

    config.yaml                    the resolved study config (``mr2ft study --recipe DIR`` repeats it)
    <method>-seed<i>/              one complete run folder per method and seed (``mr2ft report`` reads it)
    study.json, study.md, study.html
"""

from __future__ import annotations

import dataclasses
import html
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from mr2ft import metrics
from mr2ft.config import CommonConfig, FinetuneConfig, ProbeConfig, StudyConfig, build_config, dump_config, replace
from mr2ft.errors import UserError
from mr2ft.io import read_jsonl, write_json, write_text
from mr2ft.runs import CONFIG, METRICS, check_run_dir, default_run_dir, load_run, run_folder

METHODS = ("ce", "uniform", "mr2")
LABELS = {"ce": "ERM", "uniform": "matched control", "mr2": "MR2"}
# (a, b): each comparison is the change b - a. The last one is the attribution row.
COMPARISONS = (("ce", "uniform"), ("ce", "mr2"), ("uniform", "mr2"))
ATTRIBUTION = "mr2_vs_uniform"
TABLE_FIGURES = ("top1", "easy", "medium", "hard", "worst_class", "std")
HEADERS = {"top1": "overall", "worst_class": "worst class", "std": "std"}
MODES = ("probe", "finetune")
RUN_REPORTS = "json,csv,md"  # per-run reports; HTML (plots) only for the study, to keep many runs fast
CI = 0.95
FINETUNE_CONFIG = "finetune_config.yaml"


def comparison_key(a: str, b: str) -> str:
    """``"mr2_vs_uniform"`` for the change from ``a`` to ``b``."""
    return f"{b}_vs_{a}"


def seeds_of(cfg: StudyConfig) -> list[int]:
    """The training seeds of a study: ``seed, seed + 1, ...``; the validation split always uses ``seed``."""
    return [cfg.seed + i for i in range(cfg.seeds)]


# ---- configuration -----------------------------------------------------------------------------------------------


def study_configs(recipe: str | None = None, **overrides: Any) -> tuple[StudyConfig, FinetuneConfig | None]:
    """Resolve the study config (and, with ``mode="finetune"``, the fine-tune config every run starts from).

    In probe mode the recipe is a probe/study recipe. In finetune mode it is a fine-tune recipe: it sets every run's
    training, and the study keeps only its own settings (seeds, bootstrap) plus the data and backbone.
    """
    mode = overrides.get("mode") or "probe"
    study_fields = {f.name for f in dataclasses.fields(StudyConfig)}
    if mode != "finetune":
        cfg = build_config(StudyConfig, recipe, **{k: v for k, v in overrides.items() if k in study_fields})
        return cfg, None
    ft_fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    ft = build_config(FinetuneConfig, recipe, **{k: v for k, v in overrides.items() if k in ft_fields})
    common = {f.name: getattr(ft, f.name) for f in dataclasses.fields(CommonConfig)}
    mine = {k: v for k, v in overrides.items() if k in study_fields and k not in common}
    return build_config(StudyConfig, None, **common, **mine), ft


def _probe_base(cfg: StudyConfig) -> ProbeConfig:
    """The probe settings of a study, as a plain ProbeConfig (what each run folder's config.yaml holds)."""
    return ProbeConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ProbeConfig)})


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
    if cfg.mode == "probe":
        from mr2ft import probe

        if not cfg.wd_grid or not cfg.cbar_grid:
            raise UserError("the study tunes on validation: --wd-grid and --cbar-grid need at least one value each")
        base = _probe_base(cfg)
        for method in METHODS:
            probe.validate(method_config(base, method, cfg.seed))
    else:
        from mr2ft import finetune

        if finetune_cfg is None:
            raise UserError("--mode finetune needs fine-tune settings; pass them with --recipe or flags")
        for method in METHODS:
            finetune.validate(replace(finetune_cfg, loss=method))


# ---- the runs ----------------------------------------------------------------------------------------------------


def _run_dir(out_dir: Path, method: str, index: int) -> Path:
    return out_dir / f"{method}-seed{index}"


def _probe_runs(cfg: StudyConfig, out_dir: Path, console: Console) -> tuple[list[dict], str]:
    """Fit every method and seed on one set of cached features; returns run records and the split description."""
    from mr2ft import probe

    base = _probe_base(cfg)
    # The p check of MR2 on normalised features runs inside prepare: fail there, before any fit.
    data = probe.prepare(replace(base, loss="mr2"), console, need_val=True)
    records, split = [], ""
    for i, seed in enumerate(seeds_of(cfg)):
        erm_dir = None
        for method in METHODS:
            run_dir = _run_dir(out_dir, method, i)
            run_dir.mkdir(parents=True)
            run_cfg = method_config(base, method, seed, baseline=None if method == "ce" else str(erm_dir))
            console.print(f"[bold]{LABELS[method]}[/bold], seed {seed} -> {run_dir}")
            result = probe.fit_probe(run_cfg, data, run_dir / METRICS, split_seed=cfg.seed, console=console)
            probe.write_probe_run(run_cfg, data, result, run_dir, RUN_REPORTS)
            split = result.val_source or split
            records.append(
                {
                    "method": method,
                    "seed": seed,
                    "dir": run_dir.name,
                    "weight_decay": result.weight_decay,
                    "knob_name": "temperature" if method == "ce" else "c_bar",
                    "knob": result.knob,
                    "validation": [
                        {k: v for k, v in r.items() if k != "stage"}
                        for r in read_jsonl(run_dir / METRICS)
                        if r.get("stage") == "sweep"
                    ],
                }
            )
            if method == "ce":
                erm_dir = run_dir
    return records, split


def _finetune_runs(cfg: StudyConfig, ft: FinetuneConfig, out_dir: Path) -> tuple[list[dict], str]:
    """Fine-tune every method and seed with the same settings; per seed, every method sees the same data order."""
    from mr2ft import finetune

    records = []
    for i, seed in enumerate(seeds_of(cfg)):
        erm_dir = None
        for method in METHODS:
            run_dir = _run_dir(out_dir, method, i)
            run_cfg = replace(
                ft,
                loss=method,
                seed=seed,
                out=str(run_dir),
                overwrite=False,
                resume=None,
                baseline=None if method == "ce" else str(erm_dir),
            )
            finetune.run(run_cfg)
            records.append(
                {
                    "method": method,
                    "seed": seed,
                    "dir": run_dir.name,
                    "weight_decay": ft.weight_decay,
                    "knob_name": None if method == "ce" else "c_bar",
                    "knob": None if method == "ce" else ft.c_bar,
                    "validation": [],
                }
            )
            if method == "ce":
                erm_dir = run_dir
    if ft.val_fraction:
        split = (
            f"{ft.val_fraction:.0%} of train held out, carved with each run's seed; it only logs per-epoch figures "
            "(the final model is the last one)"
        )
    else:
        split = "none: nothing is chosen in finetune mode (the final model is the last one; per-epoch logs use test)"
    return records, split


def run_study(cfg: StudyConfig, console: Console | None = None, finetune_cfg: FinetuneConfig | None = None) -> dict:
    """Run the whole study and write its folder; returns the ``study.json`` contents (plus ``path`` and ``files``).

    Args:
        cfg: the study settings (probe settings plus ``mode``, ``seeds``, ``n_boot``).
        console: where progress and the final table go (default: stderr).
        finetune_cfg: in finetune mode, the settings every fine-tune run starts from (see :func:`study_configs`).

    Raises:
        UserError: bad settings, data or weights (checked before any fit where possible).
    """
    console = console or Console(stderr=True)
    if cfg.mode == "finetune" and finetune_cfg is None:
        finetune_cfg = finetune_settings(cfg)
    validate_study(cfg, finetune_cfg)
    out_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.backbone, cfg.dataset, "study")
    if cfg.mode == "probe":
        with run_folder(out_dir, overwrite=cfg.overwrite, resumable=False) as folder:
            dump_config(cfg, folder / CONFIG, command="study")
            records, split = _probe_runs(cfg, folder, console)
            study = build_study(cfg, folder, records, split)
            study["files"] = write_study(study, folder)
    else:
        # Fine-tunes are expensive: a failure in a later run must not delete the finished ones, so no run_folder.
        check_run_dir(out_dir, overwrite=cfg.overwrite, resumable=False)
        if cfg.overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        folder = out_dir
        folder.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, folder / CONFIG, command="study")
        dump_config(
            replace(finetune_cfg, out=None),
            folder / FINETUNE_CONFIG,
            command="finetune",
            extra={"study": "every run starts from these settings; the study sets loss, seed, out and baseline"},
        )
        records, split = _finetune_runs(cfg, finetune_cfg, folder)
        study = build_study(cfg, folder, records, split)
        study["files"] = write_study(study, folder)
    print_study(console, study, folder)
    return dict(study, path=str(folder))


def finetune_settings(cfg: StudyConfig) -> FinetuneConfig:
    """Fine-tune settings for a study called from Python without them: FinetuneConfig's defaults, plus every shared
    setting the study config changed from its own defaults (the data, the backbone, the seed, ...)."""
    defaults = StudyConfig()
    changed = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(CommonConfig)
        if getattr(cfg, f.name) != getattr(defaults, f.name)
    }
    return build_config(FinetuneConfig, None, **changed)


# ---- analysis ----------------------------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    from mr2ft.report import json_safe as clean

    return clean(obj)


def analyze(
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    preds: Mapping[str, Sequence[Any]],
    num_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = CI,
) -> dict:
    """Groups, the table over seeds, every paired comparison and the verdict, from test predictions alone.

    Args:
        targets: (N,) test labels shared by every run.
        preds: for each of ``ce``, ``uniform``, ``mr2``, a list of (N,) top-1 predictions, one per seed.
        num_classes: K.
        n_boot: bootstrap replicates per comparison.
        seed: seed of the bootstrap resampling.
        ci: coverage of the intervals.

    Returns:
        JSON-safe dict with ``grouping`` (groups from ERM's per-class accuracy averaged over its seeds),
        ``table`` (per method: mean over seeds of each figure, the seeds' standard deviation, each seed's figures),
        ``per_class_accuracy`` (per method, mean over seeds), ``comparisons`` (per :data:`COMPARISONS`,
        :func:`mr2ft.metrics.paired_bootstrap` figures) and ``verdict`` (:func:`verdict`).
    """
    t = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64).reshape(-1)
    missing = [m for m in METHODS if not preds.get(m)]
    if missing:
        raise ValueError(f"no predictions for {', '.join(missing)}")
    p = {
        m: [np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x).reshape(-1) for x in preds[m]] for m in METHODS
    }
    per_class = {
        m: np.mean([metrics.per_class_accuracy(metrics.confusion_matrix(x, t, num_classes)) for x in p[m]], axis=0)
        for m in METHODS
    }
    groups = metrics.assign_groups(per_class["ce"])
    table = {}
    for m in METHODS:
        per_seed = [metrics.headline_figures(metrics.summarize(x, t, num_classes, groups=groups)) for x in p[m]]
        values = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0]}
        spread = {k: float(np.std([s[k] for s in per_seed], ddof=1)) if len(per_seed) > 1 else None for k in values}
        table[m] = {
            "label": LABELS[m],
            "seeds": len(per_seed),
            "values": values,
            "seed_std": spread,
            "per_seed": per_seed,
        }
    comparisons = {}
    for a, b in COMPARISONS:
        boot = metrics.paired_bootstrap(
            t, [x == t for x in p[a]], [x == t for x in p[b]], groups, num_classes, n_boot=n_boot, seed=seed, ci=ci
        )
        comparisons[comparison_key(a, b)] = {
            "a": a,
            "b": b,
            "label": f"{LABELS[b]} vs {LABELS[a]}",
            "figures": boot["figures"],
        }
    sizes = [int((groups == g).sum()) for g in range(3)]
    n_seeds = len(p["ce"])
    source = f"ERM's (mean over {n_seeds} seed{'s' if n_seeds > 1 else ''})"
    out = {
        "num_classes": int(num_classes),
        "num_images": int(t.shape[0]),
        "grouping": {
            "source": "ERM, per-class test accuracy averaged over its seeds",
            "rule": metrics.grouping_rule(sizes, source, int((groups < 0).sum())),
            "sizes": dict(zip(metrics.GROUP_NAMES, sizes, strict=True)),
            "class_groups": groups.tolist(),
        },
        "table": table,
        "per_class_accuracy": {m: per_class[m].tolist() for m in METHODS},
        "comparisons": comparisons,
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "ci": float(ci),
            "method": "paired, resampling test images within each class; each replicate also draws one seed of "
            "each method (independently), so seed-to-seed variation is in the interval",
        },
    }
    out = json_safe(out)
    out["verdict"] = verdict(out["comparisons"], ci)
    return out


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def direction(figure: Mapping[str, Any]) -> str:
    """``"up"`` when the whole interval is above 0, ``"down"`` when below, ``"none"`` when it holds 0, else
    ``"unknown"`` (no interval)."""
    low, high = _num(figure.get("low")), _num(figure.get("high"))
    if low is None or high is None or _num(figure.get("delta")) is None:
        return "unknown"
    return "up" if low > 0 else "down" if high < 0 else "none"


def _points(figure: Mapping[str, Any]) -> str:
    return f"{figure['delta']:+.1f} points [{figure['low']:+.1f}, {figure['high']:+.1f}]"


def verdict(comparisons: Mapping[str, Any], ci: float = CI) -> dict:
    """The study's answer in words, from the hard group's changes and their intervals.

    ``kind`` says what MR2's class-dependent margins did beyond the matched control: ``helps``, ``hurts``,
    ``no distinguishable effect`` or ``unknown``; ``vs_erm`` says whether MR2 beat ERM on the hard group
    (``better``, ``worse``, ``no distinguishable difference``, ``unknown``). A change counts only when its
    ``ci`` interval excludes 0.
    """
    attr = comparisons[ATTRIBUTION]["figures"]["hard"]
    vs_erm = comparisons[comparison_key("ce", "mr2")]["figures"]["hard"]
    ctrl = comparisons[comparison_key("ce", "uniform")]["figures"]["hard"]
    pct = f"{round(100 * ci)}%"
    d_attr, d_erm, d_ctrl = direction(attr), direction(vs_erm), direction(ctrl)
    if d_attr == "unknown":
        kind = "unknown"
        first = (
            "The hard group's accuracy could not be measured (no hard class with test images), so there is no verdict."
        )
    else:
        kind = {"up": "helps", "down": "hurts", "none": "no distinguishable effect"}[d_attr]
        tail = {
            "up": "they help the hard classes beyond what one shared margin does",
            "down": "they hurt the hard classes compared with one shared margin",
            "none": "no effect distinguishable from noise",
        }[d_attr]
        first = (
            f"MR2's class-dependent margins changed hard-class accuracy by {_points(attr)} beyond the matched "
            f"control: {tail}."
        )
    if d_erm == "unknown":
        erm_kind, second = "unknown", ""
    else:
        erm_kind = {"up": "better", "down": "worse", "none": "no distinguishable difference"}[d_erm]
        said = {
            "up": "MR2 beat ERM on the hard classes",
            "down": "MR2 did worse than ERM on the hard classes",
            "none": "MR2 and ERM are not distinguishable on the hard classes",
        }[d_erm]
        second = f" Against ERM, MR2 changed hard-class accuracy by {_points(vs_erm)}: {said}."
    third = ""
    if d_attr == "none" and d_erm == "up" and d_ctrl == "up":
        third = (
            f" The matched control gained too ({_points(ctrl)}): the gain comes from having a margin (one global logit "
            "temperature), not from making it depend on the class."
        )
    return {
        "kind": kind,
        "vs_erm": erm_kind,
        "control_vs_erm": {"up": "better", "down": "worse", "none": "no distinguishable difference"}.get(
            d_ctrl, "unknown"
        ),
        "text": first + second + third,
        "interval": f"{pct} paired bootstrap interval over test images and seeds",
    }


def diagnostics(
    accuracy: Sequence[float] | np.ndarray,
    spread: Sequence[float] | np.ndarray | None,
    gamma: Sequence[float] | np.ndarray | None,
) -> dict:
    """Spearman correlations the paper's argument rests on, against ERM's per-class accuracy, with warnings.

    Hard classes should be more spread out (spread vs accuracy negative) and MR2 should give them larger margins
    (gamma vs accuracy negative). A positive (or unmeasurable) correlation gets a warning in words.
    """
    acc = np.asarray(accuracy, dtype=np.float64)

    def rho(values: Any) -> float | None:
        if values is None:
            return None
        return _num(metrics.spearman(np.asarray(values, dtype=np.float64), acc))

    r_s, r_g = rho(spread), rho(gamma)
    warnings = []
    if spread is None or r_s is None:
        warnings.append("The spread-accuracy correlation could not be measured (no class statistics, or constant).")
    elif r_s > 0:
        warnings.append(
            f"The premise fails here: more accurate classes have MORE spread-out features (Spearman {r_s:+.2f}); "
            "MR2 assumes hard classes are the spread-out ones."
        )
    if gamma is None or r_g is None:
        warnings.append(
            "MR2's margins are equal for every class (or were not saved): it cannot act differently from the control."
        )
    elif r_g > 0:
        warnings.append(
            f"MR2's margins point the wrong way: the largest margins went to the most accurate classes (Spearman "
            f"{r_g:+.2f}); on L2-normalised features (CLIP) the Lp statistics can do this: compare --p values."
        )
    return {
        "spread_vs_accuracy": r_s,
        "gamma_vs_accuracy": r_g,
        "expected": "negative: hard (less accurate) classes are more spread out and get larger margins",
        "method": "Spearman rank correlation (average ranks for ties) with ERM's per-class test accuracy",
        "warnings": warnings,
    }


def class_stat(run: dict, key: str, k: int) -> np.ndarray:
    from mr2ft.report import class_stat as stat

    return stat(run, key, k)


def build_study(cfg: StudyConfig, folder: Path, records: list[dict], split: str) -> dict:
    """Read every run folder of a study back and assemble ``study.json``'s contents."""
    runs = {m: [load_run(folder / r["dir"]) for r in records if r["method"] == m] for m in METHODS}
    ref = runs["ce"][0]
    names = ref["class_names"]
    k = len(names)
    for m in METHODS:
        for run in runs[m]:
            if run["class_names"] != names or not torch.equal(run["targets"], ref["targets"]):
                raise UserError(f"{run['path']} was tested on other classes or images than {ref['path']}; run it again")
    result = analyze(ref["targets"], {m: [r["preds"] for r in runs[m]] for m in METHODS}, k, cfg.n_boot, cfg.seed)
    if cfg.mode == "probe":
        spread = class_stat(ref, "S", k)
        spread_source = "exact statistics of the training features (every run shares them)"
    else:
        # ERM's own features answer the premise (are its hard classes the spread-out ones?); a fine-tune keeps
        # them as an EMA over its last steps. Where ERM runs kept none (older run folders), MR2's stand in.
        erm = [class_stat(r, "S", k) for r in runs["ce"]]
        if all(np.isfinite(s).any() for s in erm):
            spread = np.nanmean(erm, axis=0)
            spread_source = "ERM runs' class statistics at the end of training (EMA), mean over seeds"
        else:
            spread = np.nanmean([class_stat(r, "S", k) for r in runs["mr2"]], axis=0)
            spread_source = "MR2 runs' class statistics at the end of training (EMA), mean over seeds"
    gamma = np.nanmean([class_stat(r, "gamma", k) for r in runs["mr2"]], axis=0)
    diag = diagnostics(result["per_class_accuracy"]["ce"], spread, gamma)
    diag.update(spread_source=spread_source, gamma_source="MR2 runs' margins, mean over seeds")
    caveats = [
        "The groups come from ERM's own test accuracy, so ERM's hard group is partly hard by chance on these test "
        "images and any other method tends to look a little better there (regression to the mean). The MR2 vs "
        "matched control row has no such bias: neither of those runs chose the groups.",
    ]
    if cfg.mode == "probe":
        if cfg.margin_mode == "scale":
            caveats.append(
                "With margin_mode scale, one shared margin c_bar divides every logit by c_bar: the matched control is "
                "ERM at temperature c_bar. ERM tunes its temperature over the same grid, so the two rows coincide "
                "whenever they choose the same values; MR2 vs the control isolates exactly the class dependence."
            )
        caveats.append(
            "In a linear probe the features are fixed, so MR2's representation margin has no gradient: this study "
            "compares its logit margins (class-dependent vs one shared margin)."
        )
    else:
        caveats.append(
            "Nothing is tuned in finetune mode: every method uses the config's weight decay and c_bar (the control "
            "and MR2 the same c_bar). The control keeps all of MR2, representation margin included, except the class "
            "dependence of the logit margin; MR2 vs ERM also contains the representation margin's effect."
        )
        if cfg.val_fraction:
            caveats.append(
                "Each seed carves its own validation share out of train (the data loader seeds it with the run's "
                "seed), so seeds differ in their training images as well as their initialisation and data order; "
                "within a seed every method sees the same images in the same order."
            )
    per_class = []
    groups = result["grouping"]["class_groups"]
    for i, name in enumerate(names):
        per_class.append(
            {
                "class": i,
                "name": name,
                "group": metrics.GROUP_NAMES[groups[i]] if groups[i] >= 0 else None,
                **{m: result["per_class_accuracy"][m][i] for m in METHODS},
                "spread_S": spread[i],
                "gamma": gamma[i],
            }
        )
    grids = (
        {
            "weight_decay": list(cfg.wd_grid),
            "knob": list(cfg.cbar_grid),
            "knob_is": "ERM's temperature; the control's and MR2's c_bar",
            "criterion": cfg.sweep_criterion,
        }
        if cfg.mode == "probe"
        else None
    )
    info = ref["info"]
    study = {
        "mr2ft_study": 1,
        "units": "accuracy figures are percentages (0-100); changes are percentage points",
        "mode": cfg.mode,
        "backbone": info.get("backbone"),
        "dataset": info.get("dataset"),
        "class_names": names,
        "seeds": seeds_of(cfg),
        "split": {
            "validation": split,
            "split_seed": cfg.seed if cfg.mode == "probe" else None,
            "test": "used only for the final figures of each run",
        },
        "grids": grids,
        "p": cfg.p,
        "runs": records,
        **{key: result[key] for key in ("num_classes", "num_images", "grouping", "table", "comparisons")},
        "bootstrap": result["bootstrap"],
        "verdict": result["verdict"],
        "diagnostics": diag,
        "per_class": per_class,
        "caveats": caveats,
    }
    return json_safe(study)


# ---- rendering ---------------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _sig(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _fmt_d(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def _interval(f: Mapping[str, Any]) -> str:
    if f.get("low") is None:
        return ""
    mark = "*" if direction(f) in ("up", "down") else ""
    return f"[{_fmt_d(f['low'])}, {_fmt_d(f['high'])}]{mark}"


def table_rows(study: dict, seed_std: bool = True) -> list[tuple[str, list[str], list[str]]]:
    """(row label, value cells, interval cells) of the paper-style table: the methods, then the attribution row."""
    rows = []
    for m in METHODS:
        entry = study["table"][m]
        cells, cis = [], []
        comp = study["comparisons"].get(comparison_key("ce", m)) if m != "ce" else None
        for key in TABLE_FIGURES:
            cell = _fmt(entry["values"].get(key))
            sd = entry["seed_std"].get(key)
            if seed_std and sd is not None:
                cell += f" ±{sd:.1f}"
            ci = ""
            if comp is not None:
                f = comp["figures"][key]
                cell += f" ({_fmt_d(f['delta'])})"
                ci = _interval(f)
            cells.append(cell)
            cis.append(ci)
        rows.append((LABELS[m], cells, cis))
    attr = study["comparisons"][ATTRIBUTION]["figures"]
    rows.append(
        (
            "MR2 vs matched control",
            [_fmt_d(attr[key]["delta"]) for key in TABLE_FIGURES],
            [_interval(attr[key]) for key in TABLE_FIGURES],
        )
    )
    return rows


def table_note(study: dict, seed_std: bool = True) -> str:
    """What the table's numbers are, in one paragraph."""
    b = study["bootstrap"]
    n = len(study["seeds"])
    sizes = "/".join(str(s) for s in study["grouping"]["sizes"].values())
    std = " (±: the seeds' standard deviation)" if seed_std and n > 1 else ""
    return (
        f"Mean over {n} seed{'s' if n > 1 else ''}{std}; (+x.x) is the change against "
        f"ERM; brackets are the {round(100 * b['ci'])}% paired bootstrap interval of that change over test images "
        f"and seeds ({b['n_boot']} resamples); * = the interval excludes 0. Groups easy/medium/hard ({sizes} "
        "classes) come from ERM's per-class test accuracy. std is the standard deviation of per-class accuracy "
        f"(lower is more even). {study['num_classes']} classes, {study['num_images']} test images; accuracy in %."
    )


def study_table(study: dict) -> Any:
    """A Rich table of the study (interval on a second line of each cell)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"mr2ft study ({study['mode']})",
        caption=escape(table_note(study, seed_std=False)),
        caption_justify="left",
    )
    table.add_column("method")
    for key in TABLE_FIGURES:
        table.add_column(HEADERS.get(key, key), justify="right")
    for label, cells, cis in table_rows(study, seed_std=False):
        table.add_row(
            escape(label),
            *(escape(c) + (f"\n[dim]{escape(i)}[/]" if i else "") for c, i in zip(cells, cis, strict=True)),
        )
    return table


def print_study(console: Console, study: dict, folder: Path) -> None:
    """The table, the verdict, any diagnostic warning and where the full report is."""
    console.print(study_table(study))
    console.print(f"[bold]Verdict:[/bold] {study['verdict']['text']}", highlight=False)
    for w in study["diagnostics"]["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    console.print(f"Full report: {folder / 'study.html'}", highlight=False)


def md_escape(text: object) -> str:
    from mr2ft.report import md_escape as md

    return md(text)


def render_markdown(study: dict) -> str:
    """``study.md``."""
    lines = [f"# mr2ft study: {md_escape(study['backbone'])} on {md_escape(study['dataset'])}", ""]
    lines += [
        f"Mode {study['mode']}, {study['num_classes']} classes, {study['num_images']} test images, seeds "
        f"{', '.join(str(s) for s in study['seeds'])}.",
        "",
        "## Verdict",
        "",
        md_escape(study["verdict"]["text"]),
        "",
        "## Results",
        "",
        "| method | " + " | ".join(HEADERS.get(k, k) for k in TABLE_FIGURES) + " |",
        "|---|" + "---:|" * len(TABLE_FIGURES),
    ]
    for label, cells, cis in table_rows(study):
        row = [f"{c} {i}".strip() for c, i in zip(cells, cis, strict=True)]
        name = f"**{label}**" if label.startswith("MR2 vs") else label
        lines.append(f"| {name} | " + " | ".join(md_escape(c) for c in row) + " |")
    lines += ["", md_escape(table_note(study)), "", "## Diagnostics", ""]
    lines += _diagnostic_lines(study)
    lines += ["", "## Choices made on validation", "", md_escape(_split_text(study)), ""]
    lines += ["| run | seed | weight decay | knob | value |", "|---|---:|---:|---|---:|"]
    for r in study["runs"]:
        lines.append(
            f"| {r['dir']} | {r['seed']} | {r['weight_decay']:g} | {r['knob_name'] or '-'} | "
            f"{'-' if r['knob'] is None else format(r['knob'], 'g')} |"
        )
    lines += ["", "## Per class (mean over seeds)", "", "| class | group | ERM | control | MR2 | spread S | margin γ |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for row in study["per_class"]:
        lines.append(
            f"| {md_escape(row['name'])} | {row['group'] or '-'} | {_fmt(row['ce'])} | {_fmt(row['uniform'])} | "
            f"{_fmt(row['mr2'])} | {_sig(row['spread_S'])} | {_sig(row['gamma'])} |"
        )
    lines += ["", "## Caveats", ""] + [f"- {md_escape(c)}" for c in study["caveats"]]
    lines += [
        "",
        f"- {md_escape(study['grouping']['rule'])}",
        "",
        "Run folders: " + ", ".join(f"`{r['dir']}`" for r in study["runs"]),
    ]
    return "\n".join(lines) + "\n"


def _split_text(study: dict) -> str:
    s = study["split"]
    text = f"Validation: {s['validation']}."
    if study["grids"]:
        g = study["grids"]
        text += (
            f" Every run chose weight decay from {{{', '.join(format(v, 'g') for v in g['weight_decay'])}}} and its "
            f"knob ({g['knob_is']}) from {{{', '.join(format(v, 'g') for v in g['knob'])}}} by validation "
            f"{g['criterion']} accuracy, then refit on train+val."
        )
    return text + " The test split was used only for the final figures."


def _diagnostic_lines(study: dict) -> list[str]:
    d = study["diagnostics"]
    lines = [
        f"- Spearman(spread S, ERM accuracy) = {_fmt_d(d['spread_vs_accuracy'], 2)} ({md_escape(d['spread_source'])}); "
        "expected negative: hard classes are more spread out.",
        f"- Spearman(margin γ, ERM accuracy) = {_fmt_d(d['gamma_vs_accuracy'], 2)} ({md_escape(d['gamma_source'])}); "
        "expected negative: hard classes get larger margins.",
    ]
    lines += [f"- **Warning:** {md_escape(w)}" for w in d["warnings"]]
    return lines


def _plots(study: dict) -> list[tuple[str, str, str]]:
    from matplotlib.figure import Figure

    from mr2ft.report import GROUP_COLORS, plot_label, png_base64

    plots = []
    colors = {"uniform_vs_ce": "#9a9a9a", "mr2_vs_ce": "#1f5fbf", ATTRIBUTION: "#d1495b"}
    comps = list(study["comparisons"])
    fig = Figure(figsize=(8, 0.3 * len(TABLE_FIGURES) * (len(comps) + 1) + 0.8), layout="constrained")
    ax = fig.subplots()
    ticks, labels = [], []
    for j, key in enumerate(TABLE_FIGURES):
        for c, name in enumerate(comps):
            f = study["comparisons"][name]["figures"][key]
            y = -(j * (len(comps) + 1) + c)
            if f["delta"] is None:
                continue
            lo, hi = (
                f["low"] if f["low"] is not None else f["delta"],
                f["high"] if f["high"] is not None else f["delta"],
            )
            ax.errorbar(
                f["delta"],
                y,
                xerr=[[f["delta"] - lo], [hi - f["delta"]]],
                fmt="o",
                color=colors.get(name, "#333333"),
                capsize=3,
                label=study["comparisons"][name]["label"] if j == 0 else None,
            )
        ticks.append(-(j * (len(comps) + 1) + (len(comps) - 1) / 2))
        labels.append(HEADERS.get(key, key))
    ax.axvline(0, color="#555555", lw=0.8)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("change (percentage points)")
    ax.legend(loc="best", fontsize=8)
    plots.append(
        (
            "Changes with 95% intervals",
            "Each change and its paired bootstrap interval over test images and seeds; red is the attribution "
            "(MR2 vs the matched control). For std, lower is better.",
            png_base64(fig),
        )
    )

    rows = study["per_class"]
    k = len(rows)
    erm = np.array([np.nan if r["ce"] is None else r["ce"] for r in rows])
    order = sorted(range(k), key=lambda i: (math.isnan(erm[i]), -(0 if math.isnan(erm[i]) else erm[i]), i))
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(k)
    for m, color, style in (("ce", "#333333", "-"), ("uniform", "#9a9a9a", "--"), ("mr2", "#1f5fbf", "-")):
        vals = np.array([np.nan if rows[i][m] is None else rows[i][m] for i in order])
        ax.plot(x, vals, style, color=color, marker="o" if k <= 60 else None, ms=3, label=LABELS[m])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    if k <= 40:
        ax.set_xticks(x, [plot_label(rows[i]["name"]) for i in order], rotation=90, fontsize=8)
    else:
        ax.set_xlabel(f"class rank by ERM accuracy ({k} classes)")
    ax.legend(loc="lower left", fontsize=8)
    plots.append(("Per-class accuracy", "Mean over seeds, classes ranked by ERM's accuracy.", png_base64(fig)))

    d = study["diagnostics"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    group_colors = [GROUP_COLORS.get(r["group"], GROUP_COLORS[None]) for r in rows]
    for ax, key, xlabel, rho in (
        (axes[0], "spread_S", "feature spread S", d["spread_vs_accuracy"]),
        (axes[1], "gamma", "MR2 margin γ", d["gamma_vs_accuracy"]),
    ):
        vals = np.array([np.nan if r[key] is None else r[key] for r in rows])
        ax.scatter(vals, erm, c=group_colors, s=20)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ERM accuracy (%)")
        ax.set_title(f"Spearman {_fmt_d(rho, 2)} (expected negative)", fontsize=10)
    plots.append(
        ("Diagnostics", "ERM's per-class accuracy against spread and margin; colours are the groups.", png_base64(fig))
    )
    return plots


def render_html(study: dict) -> str:
    """``study.html``: one self-contained page (inline CSS and base64 PNG plots; nothing fetched)."""
    from mr2ft.report import PAGE_CSS

    e = html.escape
    title = f"mr2ft study: {study['backbone']} on {study['dataset']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{PAGE_CSS}.verdict{{font-size:1.1em;padding:.6em 1em;background:#f4f6fa;"
        "border-left:4px solid #1f5fbf}.warn{color:#b00020}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">Mode {e(study["mode"])}, {study["num_classes"]} classes, {study["num_images"]} test images, '
        f"seeds {e(', '.join(str(s) for s in study['seeds']))}.</p>",
        "<h2>Verdict</h2>",
        f'<p class="verdict">{e(study["verdict"]["text"])}</p>',
        "<h2>Results</h2><table><tr><th>method</th>"
        + "".join(f'<th class="n">{e(HEADERS.get(k, k))}</th>' for k in TABLE_FIGURES)
        + "</tr>",
    ]
    for label, cells, cis in table_rows(study):
        bold = label.startswith("MR2 vs")
        row = f"<tr><td>{'<b>' if bold else ''}{e(label)}{'</b>' if bold else ''}</td>"
        for c, i in zip(cells, cis, strict=True):
            row += f'<td class="n">{e(c)}' + (f'<br><span class="meta">{e(i)}</span>' if i else "") + "</td>"
        parts.append(row + "</tr>")
    parts.append(f'</table><p class="meta">{e(table_note(study))}</p>')
    parts.append("<h2>Diagnostics</h2><ul>")
    d = study["diagnostics"]
    parts.append(
        f"<li>Spearman(spread S, ERM accuracy) = {e(_fmt_d(d['spread_vs_accuracy'], 2))} ({e(d['spread_source'])}); "
        "expected negative.</li>"
        f"<li>Spearman(margin γ, ERM accuracy) = {e(_fmt_d(d['gamma_vs_accuracy'], 2))} ({e(d['gamma_source'])}); "
        "expected negative.</li>"
    )
    parts += [f'<li class="warn"><b>Warning:</b> {e(w)}</li>' for w in d["warnings"]]
    parts.append("</ul><h2>Plots</h2>")
    for name, caption, data in _plots(study):
        parts.append(
            f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{e(name)}.</b> {e(caption)}</figcaption></figure>"
        )
    parts.append(f"<h2>Choices made on validation</h2><p>{e(_split_text(study))}</p>")
    parts.append(
        '<table><tr><th>run</th><th class="n">seed</th><th class="n">weight decay</th><th>knob</th>'
        '<th class="n">value</th></tr>'
    )
    for r in study["runs"]:
        knob = "-" if r["knob"] is None else format(r["knob"], "g")
        parts.append(
            f'<tr><td><a href="{e(r["dir"])}/">{e(r["dir"])}</a></td><td class="n">{r["seed"]}</td>'
            f'<td class="n">{r["weight_decay"]:g}</td><td>{e(r["knob_name"] or "-")}</td><td class="n">{knob}</td></tr>'
        )
    parts.append("</table><h2>Per class (mean over seeds)</h2>")
    parts.append(
        '<table><tr><th>class</th><th>group</th><th class="n">ERM</th><th class="n">control</th><th class="n">MR2</th>'
        '<th class="n">spread S</th><th class="n">margin γ</th></tr>'
    )
    for row in study["per_class"]:
        g = row["group"]
        parts.append(
            f"<tr><td>{e(row['name'])}</td><td{f' class=g-{g}' if g else ''}>{e(g or '-')}</td>"
            + "".join(f'<td class="n">{_fmt(row[m])}</td>' for m in METHODS)
            + f'<td class="n">{_sig(row["spread_S"])}</td><td class="n">{_sig(row["gamma"])}</td></tr>'
        )
    parts.append("</table><h2>Caveats</h2><ul>")
    parts += [f"<li>{e(c)}</li>" for c in study["caveats"]]
    parts.append(f"<li>{e(study['grouping']['rule'])}</li></ul></body></html>")
    return "\n".join(parts) + "\n"


def write_study(study: dict, folder: str | Path) -> list[str]:
    """Write ``study.json``, ``study.md`` and ``study.html`` into ``folder``, each atomically."""
    folder = Path(folder)
    files = [folder / "study.json", folder / "study.md", folder / "study.html"]
    write_json(files[0], study)
    write_text(files[1], render_markdown(study))
    write_text(files[2], render_html(study))
    return [str(f) for f in files]


__all__ = [
    "ATTRIBUTION",
    "COMPARISONS",
    "METHODS",
    "analyze",
    "build_study",
    "diagnostics",
    "direction",
    "method_config",
    "print_study",
    "render_html",
    "render_markdown",
    "run_study",
    "seeds_of",
    "study_configs",
    "study_table",
    "validate_study",
    "verdict",
    "write_study",
]
