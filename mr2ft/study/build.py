"""``study.json``'s contents, assembled from a study's finished run folders and what its runs gathered.

Reads every run folder back (:func:`mr2ft.runs.load_run`), checks they share classes and test images, runs the
analysis (:func:`mr2ft.study.analysis.analyze`) under the study's grouping rule, adds the diagnostics (spread and
margins against accuracy, the representation margin's gradient share, the control's matched margin) and the caveats
in words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mr2ft import metrics
from mr2ft.errors import UserError
from mr2ft.report.kit import class_stat, json_safe
from mr2ft.runs import load_run
from mr2ft.study.analysis import analyze, diagnostics, methods_of, representation_check

PROBE_CONTROL = (
    "No separate control row in this probe: with margin_mode scale one shared margin c_bar divides every logit by "
    "c_bar, which is exactly ERM at temperature c_bar, and ERM tunes its temperature on validation over the same grid "
    "as MR2's c_bar (with the same choices the logits are bit-identical). The temperature-tuned ERM is therefore the "
    "matched control, and MR2 vs ERM isolates what MR2 adds: making the margin depend on the class."
)
FINETUNE_CONTROL = (
    "Nothing is tuned in finetune mode: every method uses the config's weight decay. The control keeps all of MR2 "
    "(representation margin included) except the class dependence of the logit margin. In scale mode what acts is "
    "1/gamma, so the control's one margin is matched on MR2's mean inverse margin (the harmonic mean of MR2's final "
    "margins, weighted by each class's share of the training images): both divide the logits by the same average, "
    "and 'MR2 vs control' holds no shift of the average temperature. MR2 vs ERM also contains the representation "
    "margin's effect."
)


def _spread(cfg: Any, runs: dict[str, list[dict]], k: int) -> tuple[np.ndarray, str]:
    ref = runs["ce"][0]
    if cfg.mode == "probe":
        return class_stat(ref, "S", k), "exact statistics of the training features (every run shares them)"
    # ERM's own features answer the premise (are its hard classes the spread-out ones?); a fine-tune keeps them as
    # an EMA over its last steps. Where ERM runs kept none (older run folders), MR2's stand in.
    erm = [class_stat(r, "S", k) for r in runs["ce"]]
    if all(np.isfinite(s).any() for s in erm):
        return np.nanmean(erm, axis=0), "ERM runs' class statistics at the end of training (EMA), mean over seeds"
    mr2 = np.nanmean([class_stat(r, "S", k) for r in runs["mr2"]], axis=0)
    return mr2, "MR2 runs' class statistics at the end of training (EMA), mean over seeds"


def _groups_rule(cfg: Any, extras: dict) -> tuple[str, str | None]:
    """The rule the analysis uses, and a note when the study could not use the one asked for."""
    if cfg.groups == "validation" and extras.get("group_accuracy") is None:
        return "crossfit", (
            "Groups from validation were asked for, but ERM's runs recorded no per-class validation accuracy (no "
            "validation split, or a fine-tune that does not log it): the groups are cross-fitted on test halves "
            "instead, which is also free of selection bias."
        )
    return cfg.groups, None


def _caveats(cfg: Any, methods: tuple[str, ...], note: str | None) -> list[str]:
    caveats = [note] if note else []
    if cfg.mode == "probe":
        if "uniform" not in methods:
            caveats.append(PROBE_CONTROL)
        else:
            caveats.append(
                "With margin_mode additive the control (one margin c_bar subtracted from every true-class logit) is "
                "not a temperature, so it differs from ERM; it is tuned over the same c_bar grid as MR2."
            )
        caveats.append(
            "In a linear probe the features are fixed, so MR2's representation margin has no gradient: this study "
            "compares its logit margins (class-dependent vs one shared margin)."
        )
    else:
        caveats.append(FINETUNE_CONTROL)
        if cfg.margin_mode != "scale":
            caveats.append("margin_mode additive: gamma is subtracted, so the control's c_bar is MR2's mean margin.")
    return caveats


def _per_class(names: list[str], result: dict, spread: np.ndarray, gamma: np.ndarray) -> list[dict]:
    rows = []
    first = result["grouping"]["class_groups"]
    other = result["grouping"]["class_groups_other_half"] or first
    for i, name in enumerate(names):
        g = {metrics.GROUP_NAMES[x] if x >= 0 else "-" for x in (first[i], other[i])}
        group = "/".join(sorted(g)) if g != {"-"} else None
        rows.append(
            {
                "class": i,
                "name": name,
                "group": group,
                **{m: result["per_class_accuracy"][m][i] for m in result["methods"]},
                "spread_S": spread[i],
                "gamma": gamma[i],
            }
        )
    return rows


def build_study(cfg: Any, folder: Path, records: list[dict], split: str, extras: dict) -> dict:
    """Read every run folder of a study back and assemble ``study.json``'s contents."""
    methods = methods_of(cfg.mode, cfg.margin_mode)
    runs = {m: [load_run(folder / r["dir"]) for r in records if r["method"] == m] for m in methods}
    ref = runs["ce"][0]
    names = ref["class_names"]
    k = len(names)
    for m in methods:
        for run in runs[m]:
            if run["class_names"] != names or not torch.equal(run["targets"], ref["targets"]):
                raise UserError(f"{run['path']} was tested on other classes or images than {ref['path']}; run it again")
    rule, note = _groups_rule(cfg, extras)
    preds = {m: [r["preds"] for r in runs[m]] for m in methods}
    result = analyze(
        ref["targets"], preds, k, cfg.n_boot, cfg.seed, groups=rule, group_accuracy=extras.get("group_accuracy")
    )
    spread, spread_source = _spread(cfg, runs, k)
    gamma = np.nanmean([class_stat(r, "gamma", k) for r in runs["mr2"]], axis=0)
    diag = diagnostics(result["per_class_accuracy"]["ce"], spread, gamma)
    diag.update(spread_source=spread_source, gamma_source="MR2 runs' margins, mean over seeds")
    diag["representation"] = representation_check(
        extras.get("rep_grad_share"), extras.get("rep_source", ""), applied=cfg.mode == "finetune"
    )
    if diag["representation"]["warning"]:
        diag["warnings"].append(diag["representation"]["warning"])
    grids = None
    if cfg.mode == "probe":
        knob_is = "ERM's temperature; MR2's c_bar" + ("; the control's c_bar" if "uniform" in methods else "")
        grids = {"weight_decay": list(cfg.wd_grid), "knob": list(cfg.cbar_grid), "knob_is": knob_is}
        grids["criterion"] = cfg.sweep_criterion
    info = ref["info"]
    study = {
        "mr2ft_study": 2,
        "units": "accuracy figures are percentages (0-100); changes are percentage points",
        "mode": cfg.mode,
        "backbone": info.get("backbone"),
        "dataset": info.get("dataset"),
        "class_names": names,
        "seeds": [cfg.seed + i for i in range(cfg.seeds)],
        "split": {
            "validation": split,
            "split_seed": cfg.seed if cfg.mode == "probe" else None,
            "test": "used only for the final figures of each run",
        },
        "grids": grids,
        "p": cfg.p,
        "runs": records,
        **{key: result[key] for key in ("methods", "control", "attribution", "num_classes", "num_images")},
        **{key: result[key] for key in ("grouping", "table", "comparisons", "bootstrap", "verdict")},
        "margins": extras.get("margins"),
        "diagnostics": diag,
        "per_class": _per_class(names, result, spread, gamma),
        "caveats": _caveats(cfg, methods, note),
    }
    return json_safe(study)
