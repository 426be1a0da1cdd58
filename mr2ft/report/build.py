"""From a finished run folder to the report dict: every figure, the grouping, confusions and per-class rows.

:func:`build_report` is the one place that computes a report's numbers; :mod:`mr2ft.report.render` and
:mod:`mr2ft.report.page` only format them. All accuracy figures are percentages (0-100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mr2ft import metrics, runs
from mr2ft.errors import UserError
from mr2ft.io import load_tensors, read_jsonl
from mr2ft.report.groups import CI, RULE_NAMES, GroupChoice, choose_groups, paired_changes
from mr2ft.report.kit import class_stat, json_safe

TOP_CONFUSED = 10
REPORT_N_BOOT = 1000
REP_SHARE_WARN = 0.01  # below 1% of the logit margin's gradient, the representation margin does nothing useful
SUMMARY_LISTS = ("per_class_accuracy", "per_class_precision", "class_groups")


def read_run(run_dir: str | Path) -> dict:
    """:func:`mr2ft.runs.load_run` plus what a report shows besides predictions, with damage as one clear error.

    Adds ``records`` (metrics.jsonl, [] when missing), ``config`` (config.yaml as a dict, {} when missing or
    unreadable) and, when the run saved them, ``val_targets`` / ``val_preds`` (its validation predictions).

    Raises:
        UserError: the folder is not a finished run, or one of its result files is damaged.
    """
    path = Path(run_dir)
    try:
        run = runs.load_run(path)
        val_name = getattr(runs, "VAL_PREDICTIONS", None)  # saved by runs with a validation split
        if val_name and run.get("val_targets") is None and (path / val_name).is_file():
            val = load_tensors(path / val_name)
            run["val_targets"], run["val_preds"] = val["targets"], val["preds"]
    except UserError:
        raise
    except Exception as e:  # a damaged classes.json, predictions or class_stats file
        raise UserError(
            f"{path} has a damaged result file (classes.json, predictions or class statistics: "
            f"{e.__class__.__name__}); run it again"
        ) from None
    try:
        records = read_jsonl(path / runs.METRICS)
    except (OSError, UnicodeDecodeError):  # the log is optional here: a damaged one only hides the epochs
        records = []
    run["records"] = [r for r in records if isinstance(r, dict)]
    run["config"] = _read_config(path / runs.CONFIG)
    return run


def _read_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def check_run(run: dict) -> int:
    """Validate a loaded run against its own class list; returns K."""
    where = run.get("path", "the run")
    names = run.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}/classes.json has no list of class names; run the probe or finetune again")
    k = len(names)
    t, p, top = run["targets"], run["preds"], run["topk"]
    if t.ndim != 1 or p.shape != t.shape or top.ndim != 2 or top.shape[0] != t.shape[0]:
        raise UserError(f"{where}/predictions.safetensors has inconsistent shapes; run the probe or finetune again")
    vt, vp = run.get("val_targets"), run.get("val_preds")
    if vt is not None and (vp is None or vt.ndim != 1 or vp.shape != vt.shape):
        raise UserError(f"{where} has validation predictions of inconsistent shapes; run it again")
    checks = [("targets", t), ("predictions", p), ("top-k predictions", top)]
    checks += [("validation targets", vt), ("validation predictions", vp)] if vt is not None else []
    for what, x in checks:
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= k):
            raise UserError(
                f"{where} has {what} outside 0..{k - 1} for its {k} classes: predictions.safetensors does not "
                "match classes.json; run it again"
            )
    if not isinstance(run.get("info"), dict) and run.get("info") is not None:
        raise UserError(f"{where}/classes.json is not a mapping of class names and run facts; run it again")
    for key, value in (run.get("stats") or {}).items():
        if not isinstance(value, torch.Tensor) or value.reshape(-1).shape[0] != k:
            raise UserError(f"{where}/class_stats.safetensors has {key} for {value.numel()} classes, not {k}")
    return k


def check_same_classes(run: dict, other: dict, what: str = "baseline") -> None:
    """Refuse a second run (a baseline) whose class list differs from ``run``'s."""
    names, other_names = run["class_names"], other["class_names"]
    if other_names == names:
        return
    k, kb = len(names), len(other_names)
    if kb != k:
        detail = f"{k} vs {kb} classes"
    else:
        diff = next(i for i, (a, b) in enumerate(zip(names, other_names, strict=True)) if a != b)
        detail = f"class {diff} is {names[diff]!r} vs {other_names[diff]!r}"
    raise UserError(
        f"{what} {other['path']} has different classes from {run['path']} ({detail}); "
        "pass a baseline trained on the same dataset"
    )


def confused_pairs(conf: np.ndarray, names: Sequence[str], top: int = TOP_CONFUSED) -> list[dict]:
    """The ``top`` most frequent (true, predicted) confusions, most images first, ties in index order."""
    k = conf.shape[0]
    off = conf.copy()
    np.fill_diagonal(off, 0)
    flat = off.reshape(-1)
    candidates = np.flatnonzero(flat)
    candidates = candidates[np.lexsort((candidates, -flat[candidates]))][:top]
    support = conf.sum(axis=1)
    return [
        {
            "true": int(i // k),
            "true_name": names[i // k],
            "pred": int(i % k),
            "pred_name": names[i % k],
            "count": int(flat[i]),
            "share": 100.0 * flat[i] / support[i // k],
        }
        for i in candidates
    ]


def public_summary(summary: dict, names: Sequence[str], grouping: str) -> dict:
    """A :func:`mr2ft.metrics.summarize` result without its per-class lists, with the worst class's name."""
    out = {key: v for key, v in summary.items() if key not in SUMMARY_LISTS}
    out["grouping"] = grouping
    index = summary["worst_class"]["index"]
    out["worst_class"] = dict(summary["worst_class"], name=names[index] if index >= 0 else None)
    return out


def figure_deltas(summary: dict, base_summary: dict) -> dict:
    """Run minus baseline for every headline figure (and top-5 when both have it)."""
    fr, fb = metrics.headline_figures(summary), metrics.headline_figures(base_summary)
    deltas = {key: fr[key] - fb[key] for key in fr}
    if summary["top5"] is not None and base_summary["top5"] is not None:
        deltas["top5"] = summary["top5"] - base_summary["top5"]
    return deltas


def class_rows(run: dict, summary: dict, conf: np.ndarray, base_summary: dict | None) -> list[dict]:
    """One row per class: support, correct, accuracy, precision, group, gamma, spread (and baseline, change)."""
    k = conf.shape[0]
    names = run["class_names"]
    acc = np.asarray(summary["per_class_accuracy"], dtype=np.float64)
    prec = np.asarray(summary["per_class_precision"], dtype=np.float64)
    groups = np.asarray(summary["class_groups"])
    gnames = metrics.group_names(len(summary["groups"]))
    spread, gamma = class_stat(run, "S", k), class_stat(run, "gamma", k)
    base_acc = np.asarray(base_summary["per_class_accuracy"], dtype=np.float64) if base_summary else None
    rows = []
    for i in range(k):
        row = {
            "class": i,
            "name": names[i],
            "support": int(conf[i].sum()),
            "correct": int(conf[i, i]),
            "accuracy": acc[i],
            "precision": prec[i],
            "group": gnames[groups[i]] if groups[i] >= 0 else None,
            "gamma": gamma[i],
            "spread_S": spread[i],
        }
        if base_acc is not None:
            row["baseline_accuracy"] = base_acc[i]
            row["delta"] = acc[i] - base_acc[i]
        rows.append(row)
    return rows


def _mean_record(records: Sequence[dict], *keys: str) -> float | None:
    values = [r[key] for r in records for key in keys if isinstance(r.get(key), (int, float))]
    values = [float(v) for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run_facts(run: dict) -> dict:
    """Who the run is: path, name, dataset, backbone, loss, mode, epochs and whether its loss applied margins."""
    info = run.get("info") or {}
    config = run.get("config") or {}
    records = run.get("records") or []
    final = next((r for r in reversed(records) if r.get("final")), None)
    epochs = final.get("epoch") if final else config.get("epochs")
    return {
        "path": str(run["path"]),
        "name": Path(run["path"]).name,
        "dataset": info.get("dataset"),
        "backbone": info.get("backbone"),
        "loss": info.get("loss"),
        "mode": info.get("mode") or config.get("command"),
        "epochs": epochs if isinstance(epochs, int) else None,
        "margins_applied": info.get("margins_applied"),
        "rep_grad_share": _mean_record(
            [r for r in records if not r.get("final")], "rep_grad_share", "train_rep_grad_share"
        ),
    }


def run_warnings(facts: dict, grouping: dict) -> list[str]:
    """Plain warnings a reader must not miss: an inactive representation margin, groups with selection bias."""
    out = []
    share = facts.get("rep_grad_share")
    if facts.get("loss") == "mr2" and share is not None and share < REP_SHARE_WARN:
        out.append(
            "MR2's representation margin was inactive in this run: its gradient was "
            f"{100 * share:.2g}% of the logit margin's (below 1%), so in effect only the logit margin acted; any "
            "effect seen here is the logit margin's."
        )
    if grouping.get("warning"):
        out.append(grouping["warning"])
    return out


def _self_grouping(summary: dict) -> dict:
    sizes = [g["size"] for g in summary["groups"].values()]
    return {
        "source": "self",
        "method": "self",
        "method_name": RULE_NAMES["self"],
        "selection_bias": False,
        "warning": None,
        "rule": metrics.grouping_rule(sizes, "this run's own", summary["classes_without_support"]),
        "sizes": dict(zip(summary["groups"], sizes, strict=True)),
    }


def _against_baseline(run: dict, baseline: dict, k: int, groups: str | None, n_boot: int) -> dict:
    """Summaries of run and baseline under the chosen grouping, changes and (same test images) intervals."""
    check_run(baseline)
    check_same_classes(run, baseline)
    same = bool(torch.equal(baseline["targets"], run["targets"]))
    choice: GroupChoice = choose_groups(baseline, k, groups, f"the baseline's ({baseline['path']})", same)
    summary = metrics.summarize(run["preds"], run["targets"], k, topk=run["topk"], groups=choice.display)
    base_summary = metrics.summarize(
        baseline["preds"], baseline["targets"], k, topk=baseline["topk"], groups=choice.display
    )
    intervals = boot = None
    deltas = figure_deltas(summary, base_summary)
    if same:
        targets = run["targets"].numpy()
        correct_base = (baseline["preds"] == baseline["targets"]).numpy()
        changes = paired_changes(choice, targets, correct_base, (run["preds"] == run["targets"]).numpy(), k, n_boot)
        for name, group in summary["groups"].items():
            group["accuracy"] = changes[name]["b"]
            base_summary["groups"][name]["accuracy"] = changes[name]["a"]
        deltas.update({key: f["delta"] for key, f in changes.items()})
        intervals = {key: [f["low"], f["high"]] for key, f in changes.items()}
        boot = {"n_boot": n_boot, "seed": 0, "ci": CI, "method": "paired, resampling test images within each class"}
    return {
        "summary": summary,
        "base_summary": base_summary,
        "grouping": choice.describe("baseline"),
        "deltas": deltas,
        "intervals": intervals,
        "bootstrap": boot,
        "same_test_set": same,
    }


def build_report(
    run: dict, baseline: dict | None = None, groups: str | None = None, n_boot: int = REPORT_N_BOOT
) -> dict:
    """Every figure of a run's per-class report, as a JSON-safe dict (percentages, None where undefined).

    Args:
        run: a :func:`read_run` (or :func:`mr2ft.runs.load_run`) result.
        baseline: optionally the same for a baseline run (e.g. plain cross-entropy on the same backbone and
            data). Its per-class accuracy fixes the easy/medium/hard groups, and every figure gets a change with a
            paired bootstrap interval (when both were tested on the same images).
        groups: how the baseline fixes the groups: ``val``, ``crossfit`` or ``test`` (see
            :mod:`mr2ft.report.groups`; default val when the baseline saved validation predictions, else crossfit).
        n_boot: bootstrap resamples of the intervals.

    Returns:
        dict with ``run`` (path, name, dataset, backbone, loss, mode, epochs, rep_grad_share), ``num_classes``,
        ``num_images``, ``summary`` (see :func:`mr2ft.metrics.summarize`, plus the worst class's name),
        ``baseline`` (None or its path, summary and whether it shares the test set), ``deltas`` and
        ``intervals`` (run - baseline per headline figure, or None), ``bootstrap``, ``grouping`` (source,
        method, rule in words, sizes, selection-bias warning), ``warnings``, ``correlations`` (Spearman of
        spread S and of margin gamma against accuracy, None without class statistics), ``confused_pairs`` and
        ``per_class`` rows.

    Raises:
        UserError: the run is inconsistent, the baseline has different classes, or the grouping cannot be used.
    """
    k = check_run(run)
    names = run["class_names"]
    if baseline is None:
        if groups is not None:
            raise UserError("--groups chooses how a baseline fixes the groups; pass --baseline too")
        summary = metrics.summarize(run["preds"], run["targets"], k, topk=run["topk"])
        cmp = {"summary": summary, "base_summary": None, "grouping": _self_grouping(summary), "deltas": None}
    else:
        cmp = _against_baseline(run, baseline, k, groups, n_boot)
    summary, base_summary = cmp["summary"], cmp["base_summary"]
    conf = metrics.confusion_matrix(run["preds"], run["targets"], k).numpy()
    base_info = None
    if base_summary is not None:
        base_info = {
            "path": str(baseline["path"]),
            "name": Path(baseline["path"]).name,
            "same_test_set": cmp["same_test_set"],
            "summary": public_summary(base_summary, names, "given"),
        }
    acc = np.asarray(summary["per_class_accuracy"], dtype=np.float64)
    has_stats = bool(run.get("stats"))
    facts = run_facts(run)
    report = {
        "mr2ft_report": 2,
        "units": "accuracy figures are percentages (0-100); deltas are percentage points",
        "run": facts,
        "num_classes": k,
        "num_images": summary["num_images"],
        "summary": public_summary(summary, names, "baseline" if baseline is not None else "self"),
        "baseline": base_info,
        "deltas": cmp["deltas"],
        "intervals": cmp.get("intervals"),
        "bootstrap": cmp.get("bootstrap"),
        "grouping": cmp["grouping"],
        "warnings": run_warnings(facts, cmp["grouping"]),
        "correlations": {
            "spread_vs_accuracy": metrics.spearman(class_stat(run, "S", k), acc) if has_stats else None,
            "gamma_vs_accuracy": metrics.spearman(class_stat(run, "gamma", k), acc) if has_stats else None,
            "method": "Spearman rank correlation (average ranks for ties) over classes with both values",
        },
        "confused_pairs": confused_pairs(conf, names),
        "per_class": class_rows(run, summary, conf, base_summary),
    }
    return json_safe(report)
