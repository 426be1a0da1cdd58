"""Per-class reports a person reads, and the paper's table across runs.

``write_report`` turns a finished run folder (see :mod:`mr2ft.runs`) into ``report.json`` (every figure),
``per_class.csv``, ``report.md`` and ``report.html`` (one self-contained page: plots embedded as PNG, a sortable
per-class table, no network). ``compare_runs`` puts many runs on one test set into the paper's table with paired
bootstrap intervals. All accuracy figures are percentages (0-100); groups follow :mod:`mr2ft.metrics`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mr2ft import metrics
from mr2ft.errors import UserError
from mr2ft.io import write_json, write_text
from mr2ft.runs import load_run

FORMATS = ("json", "csv", "md", "html")
FILES = {"json": "report.json", "csv": "per_class.csv", "md": "report.md", "html": "report.html"}
CSV_COLUMNS = ("class", "name", "support", "correct", "accuracy", "precision", "group", "gamma", "spread_S")
FIGURE_LABELS = {
    "top1": "top-1",
    "top5": "top-5",
    "balanced_accuracy": "balanced accuracy",
    "easy": "easy",
    "medium": "medium",
    "hard": "hard",
    "worst_class": "worst class",
    "worst10": "worst 10% of classes",
    "std": "std of per-class accuracy",
}
# The paper's table: overall, easy, medium, hard, worst class, std.
COMPARE_FIGURES = ("top1", "easy", "medium", "hard", "worst_class", "std")
COMPARE_HEADERS = {"top1": "overall", "worst_class": "worst class", "std": "std"}
TOP_CONFUSED = 10
MD_FULL_TABLE_MAX = 100
ANNOTATE_MAX_CLASSES = 100
GROUP_COLORS = {"easy": "#2a9d58", "medium": "#e0a526", "hard": "#d1495b", None: "#9a9a9a"}


# ---- building the report ----------------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars and arrays become Python values."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.integer, bool)):
        return obj if isinstance(obj, bool) else int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _check_run(run: dict) -> int:
    """Validate a loaded run against its own class list; returns K."""
    where = run.get("path", "the run")
    names = run.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}/classes.json has no list of class names; run the probe or finetune again")
    k = len(names)
    t, p, top = run["targets"], run["preds"], run["topk"]
    if t.ndim != 1 or p.shape != t.shape or top.ndim != 2 or top.shape[0] != t.shape[0]:
        raise UserError(f"{where}/predictions.safetensors has inconsistent shapes; run the probe or finetune again")
    for what, x in (("targets", t), ("predictions", p), ("top-k predictions", top)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= k):
            raise UserError(
                f"{where} has {what} outside 0..{k - 1} for its {k} classes: predictions.safetensors does not "
                "match classes.json; run it again"
            )
    for key, value in (run.get("stats") or {}).items():
        if value.reshape(-1).shape[0] != k:
            raise UserError(f"{where}/class_stats.safetensors has {key} for {value.numel()} classes, not {k}")
    return k


def class_stat(run: dict, key: str, k: int) -> np.ndarray:
    """Per-class statistic ``key`` of a loaded run (K floats); NaN where the run has none or never saw the class."""
    stats = run.get("stats") or {}
    if key not in stats:
        return np.full(k, np.nan)
    values = stats[key].double().reshape(-1).numpy().copy()
    if key in ("S", "M", "S2") and "seen" in stats:
        # A class never seen by the statistics has no measured spread, only its initial value.
        values[stats["seen"].reshape(-1).numpy() == 0] = np.nan
    return values


def _confused_pairs(conf: np.ndarray, names: Sequence[str], top: int = TOP_CONFUSED) -> list[dict]:
    k = conf.shape[0]
    off = conf.copy()
    np.fill_diagonal(off, 0)
    flat = off.reshape(-1)
    candidates = np.flatnonzero(flat)
    # Most images first; ties in (true, predicted) index order.
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


def build_report(run: dict, baseline: dict | None = None) -> dict:
    """Every figure of a run's per-class report, as a JSON-safe dict (percentages, None where undefined).

    Args:
        run: a :func:`mr2ft.runs.load_run` result.
        baseline: optionally the same for a baseline run (e.g. plain cross-entropy on the same backbone and
            data). Its per-class accuracy fixes the easy/medium/hard groups, and every figure gets a delta.

    Returns:
        dict with ``run`` (path, name, dataset, backbone), ``num_classes``, ``num_images``, ``summary`` (see
        :func:`mr2ft.metrics.summarize`, plus the worst class's name), ``baseline`` (None or its path,
        summary and whether it shares the test set), ``deltas`` (run - baseline per headline figure, or None),
        ``grouping`` (source, rule in words, sizes), ``correlations`` (Spearman of spread S and of margin gamma
        against accuracy, None without class statistics), ``confused_pairs`` and ``per_class`` rows.

    Raises:
        UserError: the run is inconsistent, or the baseline has different classes.
    """
    k = _check_run(run)
    names = run["class_names"]
    base_groups = None
    base_summary = None
    if baseline is not None:
        kb = _check_run(baseline)
        if kb != k or baseline["class_names"] != names:
            diff = next(
                (i for i, (a, b) in enumerate(zip(names, baseline["class_names"], strict=False)) if a != b), None
            )
            detail = (
                f"{k} vs {kb} classes"
                if kb != k
                else f"class {diff} is {names[diff]!r} vs {baseline['class_names'][diff]!r}"
            )
            raise UserError(
                f"baseline {baseline['path']} has different classes from {run['path']} ({detail}); "
                "pass a baseline trained on the same dataset"
            )
        base_summary = metrics.summarize(baseline["preds"], baseline["targets"], k, topk=baseline["topk"])
        base_groups = np.asarray(base_summary["class_groups"])
    summary = metrics.summarize(run["preds"], run["targets"], k, topk=run["topk"], groups=base_groups)
    conf = metrics.confusion_matrix(run["preds"], run["targets"], k).numpy()
    acc = np.asarray(summary["per_class_accuracy"], dtype=np.float64)
    prec = np.asarray(summary["per_class_precision"], dtype=np.float64)
    groups = np.asarray(summary["class_groups"])
    gnames = metrics.group_names(len(summary["groups"]))
    spread, gamma = class_stat(run, "S", k), class_stat(run, "gamma", k)
    has_stats = bool(run.get("stats"))

    rows = []
    base_acc = np.asarray(base_summary["per_class_accuracy"], dtype=np.float64) if base_summary else None
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

    sizes = [g["size"] for g in summary["groups"].values()]
    source = f"the baseline's ({baseline['path']})" if baseline is not None else "this run's own"
    summary = dict(summary, grouping="baseline" if baseline is not None else "self")
    summary["worst_class"] = dict(
        summary["worst_class"],
        name=names[summary["worst_class"]["index"]] if summary["worst_class"]["index"] >= 0 else None,
    )
    deltas = None
    base_info = None
    if base_summary is not None:
        fr, fb = metrics.headline_figures(summary), metrics.headline_figures(base_summary)
        deltas = {key: fr[key] - fb[key] for key in fr}
        if summary["top5"] is not None and base_summary["top5"] is not None:
            deltas["top5"] = summary["top5"] - base_summary["top5"]
        base_summary = dict(base_summary, grouping="given")
        base_summary["worst_class"] = dict(
            base_summary["worst_class"],
            name=names[base_summary["worst_class"]["index"]] if base_summary["worst_class"]["index"] >= 0 else None,
        )
        base_info = {
            "path": str(baseline["path"]),
            "name": Path(baseline["path"]).name,
            "same_test_set": bool(torch.equal(baseline["targets"], run["targets"])),
            "summary": {
                k2: v
                for k2, v in base_summary.items()
                if k2 not in ("per_class_accuracy", "per_class_precision", "class_groups")
            },
        }
    info = run.get("info") or {}
    report = {
        "mr2ft_report": 1,
        "units": "accuracy figures are percentages (0-100); deltas are percentage points",
        "run": {
            "path": str(run["path"]),
            "name": Path(run["path"]).name,
            "dataset": info.get("dataset"),
            "backbone": info.get("backbone"),
            "loss": info.get("loss"),
            "margins_applied": info.get("margins_applied"),
        },
        "num_classes": k,
        "num_images": summary["num_images"],
        "summary": {
            key: v
            for key, v in summary.items()
            if key not in ("per_class_accuracy", "per_class_precision", "class_groups")
        },
        "baseline": base_info,
        "deltas": deltas,
        "grouping": {
            "source": "baseline" if baseline is not None else "self",
            "rule": metrics.grouping_rule(sizes, source, summary["classes_without_support"]),
            "sizes": dict(zip(gnames, sizes, strict=True)),
        },
        "correlations": {
            "spread_vs_accuracy": metrics.spearman(spread, acc) if has_stats else None,
            "gamma_vs_accuracy": metrics.spearman(gamma, acc) if has_stats else None,
            "method": "Spearman rank correlation (average ranks for ties) over classes with both values",
        },
        "confused_pairs": _confused_pairs(conf, names),
        "per_class": rows,
    }
    return json_safe(report)


# ---- text renderers --------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_delta(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:+.{digits}f}"


def _headline_rows(report: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(key, label, run value, baseline value, delta) for each headline figure."""
    s = report["summary"]
    b = report["baseline"]["summary"] if report["baseline"] else None
    d = report["deltas"] or {}

    def flat(summary: dict | None) -> dict:
        if summary is None:
            return {}
        out = metrics.headline_figures(summary)
        out["top5"] = summary["top5"]
        return out

    fr, fb = flat(s), flat(b)
    keys = (
        ["top1"]
        + (["top5"] if s["top5"] is not None else [])
        + ["balanced_accuracy", *s["groups"], "worst_class", "worst10", "std"]
    )
    rows = []
    for key in keys:
        label = FIGURE_LABELS.get(key, key)
        if key in s["groups"]:
            label = f"{label} ({s['groups'][key]['size']} classes)"
        if key == "worst_class" and s["worst_class"]["name"] is not None:
            label = f"worst class ({s['worst_class']['name']})"
        if key == "worst10":
            n = s["worst10"]["count"]
            label = f"worst 10% of classes ({n} class{'es' if n != 1 else ''})"
        rows.append((key, label, fr.get(key), fb.get(key), d.get(key)))
    return rows


def headline(report: dict) -> str:
    """One line of the main figures, for the terminal."""
    s = report["summary"]
    d = report["deltas"] or {}
    parts = []
    for key in ("top1", *s["groups"], "worst_class", "std"):
        value = metrics.headline_figures(s)[key]
        delta = f" ({_fmt_delta(d[key])})" if key in d and d[key] is not None else ""
        label = {"top1": "top-1", "worst_class": "worst class"}.get(key, key)
        parts.append(f"{label} {_fmt(value)}{delta}")
    return " | ".join(parts)


def md_escape(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    # Class names are text: keep a name like "<b>" from becoming inline HTML in rendered Markdown.
    return text.replace("<", "\\<").replace(">", "\\>")


def _margins_note(report: dict) -> str:
    """Said wherever gamma appears when the run's loss did not use it (CE and the other baselines)."""
    if report.get("run", {}).get("margins_applied") is False:
        return " This run's loss did not apply these margins: gamma is what MR2 would set from its class statistics."
    return ""


def render_csv(report: dict) -> str:
    """``per_class.csv``: one row per class; baseline columns only when the report has a baseline."""
    columns = list(CSV_COLUMNS) + (["baseline_accuracy", "delta"] if report["baseline"] else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in report["per_class"]:
        writer.writerow(
            ["" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in columns]
        )
    return buf.getvalue()


def render_markdown(report: dict) -> str:
    """``report.md``: the figures, the grouping, the hardest classes, confusions and (small K) every class."""
    r = report["run"]
    base = report["baseline"]
    lines = [f"# mr2ft report: {md_escape(r['name'])}", ""]
    facts = [f"run `{r['path']}`"]
    facts += [f"{key} {md_escape(r[key])}" for key in ("dataset", "backbone") if r.get(key)]
    facts += [f"{report['num_classes']} classes", f"{report['num_images']} test images"]
    lines += [", ".join(facts) + ".", ""]
    if base:
        lines.append(
            f"Baseline: `{base['path']}`" + ("" if base["same_test_set"] else " (tested on other images)") + "."
        )
    else:
        lines.append("No baseline: the groups come from this run's own per-class accuracy.")
    lines += ["", f"{report['units'].capitalize()}.", ""]
    header = "| figure | this run |" + (" baseline | change |" if base else "")
    lines += [header, "|---|---:|" + ("---:|---:|" if base else "")]
    for _, label, value, bvalue, delta in _headline_rows(report):
        cells = f"| {md_escape(label)} | {_fmt(value)} |"
        if base:
            cells += f" {_fmt(bvalue)} | {_fmt_delta(delta)} |"
        lines.append(cells)
    lines += ["", f"Grouping: {md_escape(report['grouping']['rule'])}", ""]
    corr = report["correlations"]
    if corr["spread_vs_accuracy"] is not None or corr["gamma_vs_accuracy"] is not None:
        lines += [
            "Spearman rank correlation with per-class accuracy: feature spread S "
            f"{_fmt(corr['spread_vs_accuracy'], 2)}, margin gamma {_fmt(corr['gamma_vs_accuracy'], 2)}."
            f"{_margins_note(report)}",
            "",
        ]
    rows = report["per_class"]
    ranked = sorted((row for row in rows if row["accuracy"] is not None), key=lambda x: (x["accuracy"], x["class"]))
    lines += ["## Hardest classes", "", *_md_class_table(ranked[:10], base is not None), ""]
    lines += ["## Most confused pairs", ""]
    if report["confused_pairs"]:
        lines += ["| true class | predicted as | images | share of true class |", "|---|---|---:|---:|"]
        lines += [
            f"| {md_escape(p['true_name'])} | {md_escape(p['pred_name'])} | {p['count']} | {_fmt(p['share'])} |"
            for p in report["confused_pairs"]
        ]
    else:
        lines.append("No test image was confused.")
    lines += ["", "## Every class", ""]
    if len(rows) <= MD_FULL_TABLE_MAX:
        lines += _md_class_table(rows, base is not None)
    else:
        lines.append(f"{len(rows)} classes: see `per_class.csv` or the sortable table in `report.html`.")
    return "\n".join(lines) + "\n"


def _md_class_table(rows: Sequence[dict], with_baseline: bool) -> list[str]:
    out = [
        "| class | group | images | accuracy | precision |" + (" baseline | change |" if with_baseline else ""),
        "|---|---|---:|---:|---:|" + ("---:|---:|" if with_baseline else ""),
    ]
    for row in rows:
        line = (
            f"| {md_escape(row['name'])} | {row['group'] or '-'} | {row['support']} | {_fmt(row['accuracy'])} | "
            f"{_fmt(row['precision'])} |"
        )
        if with_baseline:
            line += f" {_fmt(row['baseline_accuracy'])} | {_fmt_delta(row['delta'])} |"
        out.append(line)
    return out


# ---- HTML and plots --------------------------------------------------------------------------------------------


def png_base64(fig: Any) -> str:
    """A matplotlib figure as base64 PNG, for an ``<img src="data:image/png;base64,...">`` in a self-contained page."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_label(name: str, width: int = 24) -> str:
    """A class name as a matplotlib tick label: shortened to ``width`` and never read as math."""
    # Matplotlib reads $...$ as math; class names are plain text.
    name = name if len(name) <= width else name[: width - 1] + "…"
    return name.replace("$", r"\$")


def _moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean that skips NaN and, at the ends, averages only the points the window covers."""
    ok = ~np.isnan(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _plots(report: dict) -> list[tuple[str, str, str]]:
    """(title, caption, base64 PNG) for each plot the report's data supports."""
    from matplotlib.figure import Figure  # Figure with no pyplot: the Agg canvas, no global backend state

    rows = report["per_class"]
    k = len(rows)
    names = [row["name"] for row in rows]
    acc = np.array([_nan(row["accuracy"]) for row in rows])
    group = [row["group"] for row in rows]
    base = report["baseline"] is not None
    ref = np.array([_nan(row["baseline_accuracy"]) for row in rows]) if base else acc
    # Same ranking as the grouping: reference accuracy descending, ties by class index, no-support classes last.
    order = sorted(range(k), key=lambda i: (math.isnan(ref[i]), -ref[i] if not math.isnan(ref[i]) else 0, i))
    plots = []
    labelled = k <= 40

    fig = Figure(figsize=(10, 5.2 if labelled else 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(k)
    colors = [GROUP_COLORS.get(group[i], GROUP_COLORS[None]) for i in order]
    if base:
        ax.plot(x, ref[order], color="#333333", lw=1.5, label="baseline", zorder=3)
        ax.scatter(x, acc[order], s=18 if k <= 200 else 5, c=colors, label="this run", zorder=4)
        if k > 20:
            window = max(3, k // 25)
            smooth = _moving_mean(acc[order], window)
            ax.plot(x, smooth, color="#1f5fbf", lw=1.2, label=f"this run, moving mean of {window}", zorder=3)
        ax.legend(loc="upper right", fontsize=8)
        caption = (
            "Per-class accuracy with classes ranked by the baseline's accuracy (line); dots are this run, "
            "coloured by group. Dots above the line are classes this run improved."
        )
    else:
        ax.bar(x, acc[order], color=colors, width=0.85 if k <= 200 else 1.0)
        caption = "Per-class accuracy of this run, classes ranked from most to least accurate, coloured by group."
    start = 0
    for gname, size in report["grouping"]["sizes"].items():
        if size:
            ax.axvline(start - 0.5, color="#bbbbbb", lw=0.8, ls="--")
            ax.text(
                start + size / 2 - 0.5,
                1.01,
                f"{gname} ({size})",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=9,
                color=GROUP_COLORS.get(gname, "#555555"),
            )
        start += size
    ax.set_xlim(-0.7, k - 0.3)
    ax.set_ylim(0, 102)
    ax.set_ylabel("accuracy (%)")
    if labelled:
        ax.set_xticks(x, [plot_label(names[i]) for i in order], rotation=90, fontsize=8)
    else:
        who = "the baseline's" if base else "this run's"
        ax.set_xlabel(f"{k} classes ranked by {who} accuracy, most accurate first (names in the table below)")
    plots.append(("Per-class accuracy", caption, png_base64(fig)))

    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    keys = ["top1", "balanced_accuracy", *report["summary"]["groups"], "worst10", "worst_class"]
    cur = metrics.headline_figures(report["summary"])
    series = [("this run", cur, "#1f5fbf")]
    if base:
        series.insert(0, ("baseline", metrics.headline_figures(report["baseline"]["summary"]), "#9a9a9a"))
    width = 0.8 / len(series)
    for j, (label, values, color) in enumerate(series):
        xs = np.arange(len(keys)) + (j - (len(series) - 1) / 2) * width
        vals = np.array([_nan(values[key]) for key in keys])
        bars = ax.bar(xs, np.nan_to_num(vals), width, label=label, color=color)
        ax.bar_label(bars, labels=[_fmt(v) if not math.isnan(v) else "-" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(
        np.arange(len(keys)), [FIGURE_LABELS.get(key, key).replace(" of classes", "") for key in keys], fontsize=9
    )
    ax.set_ylim(0, 110)
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="upper right", fontsize=8)
    plots.append(
        (
            "Groups",
            "Overall, balanced and per-group mean accuracy; the worst 10% and the single worst class.",
            png_base64(fig),
        )
    )

    corr = report["correlations"]
    for key, xlabel, title, rho, caption in (
        (
            "spread_S",
            "feature spread S (mean squared distance to the class mean)",
            "Accuracy against feature spread",
            corr["spread_vs_accuracy"],
            "Harder classes have more spread-out features (the paper's Figure 1b).",
        ),
        (
            "gamma",
            "logit margin gamma",
            "Accuracy against margin",
            corr["gamma_vs_accuracy"],
            "MR2 gives spread-out classes larger margins." + _margins_note(report),
        ),
    ):
        values = np.array([_nan(row[key]) for row in rows])
        if np.isnan(values).all():
            continue
        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.subplots()
        ax.scatter(
            values, acc, s=24 if k <= 200 else 6, alpha=0.8, c=[GROUP_COLORS.get(g, GROUP_COLORS[None]) for g in group]
        )
        named = ""
        if k <= ANNOTATE_MAX_CLASSES:
            # Past ~100 classes the five worst usually sit on top of each other: the table names them instead.
            worst = [
                i
                for i in np.argsort(np.where(np.isnan(acc), np.inf, acc), kind="stable")[:5]
                if not (math.isnan(acc[i]) or math.isnan(values[i]))
            ]
            for i in worst:
                ax.annotate(
                    plot_label(names[i], 18), (values[i], acc[i]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
            named = " The five least accurate classes are named."
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Spearman rank correlation {_fmt(rho, 2)}", fontsize=10)
        plots.append((title, f"{caption} Colours are groups.{named}", png_base64(fig)))
    return plots


PAGE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1080px;padding:1em 1.5em;
color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#555}table{border-collapse:collapse;margin:.5em 0}th,td{padding:.2em .6em;border-bottom:1px solid #eee;
text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.up{color:#1a7f37}.down{color:#c62828}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
#per-class th{cursor:pointer;position:sticky;top:0;background:#fafafa;user-select:none}
#per-class th[aria-sort=ascending]::after{content:" ▲"}#per-class th[aria-sort=descending]::after{content:" ▼"}
.scroll{max-height:70vh;overflow:auto;border:1px solid #eee}.g-easy{color:#2a9d58}.g-medium{color:#b07d10}
.g-hard{color:#d1495b}input[type=search]{font:inherit;padding:.2em .4em;width:18em}
"""

# Sorting and filtering of the per-class table: numeric columns sort by data-v, missing values always last.
_JS = """
(function(){
  var table=document.getElementById('per-class'); if(!table) return;
  var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows), col=-1, asc=true;
  var heads=table.tHead.rows[0].cells;
  table.tHead.addEventListener('click',function(e){
    var th=e.target.closest('th'); if(!th) return;
    var num=th.dataset.type==='num';
    asc=(th.cellIndex===col)?!asc:!num; col=th.cellIndex;
    function key(r){var c=r.cells[col]; return num?parseFloat(c.dataset.v):c.textContent.toLowerCase();}
    rows.sort(function(a,b){
      var x=key(a), y=key(b);
      if(num){ if(isNaN(x)) return isNaN(y)?0:1; if(isNaN(y)) return -1; }
      return (x<y?-1:x>y?1:0)*(asc?1:-1);
    });
    var frag=document.createDocumentFragment(); rows.forEach(function(r){frag.appendChild(r);}); body.appendChild(frag);
    for(var i=0;i<heads.length;i++) heads[i].removeAttribute('aria-sort');
    th.setAttribute('aria-sort',asc?'ascending':'descending');
  });
  var box=document.getElementById('filter'), shown=document.getElementById('shown');
  box.addEventListener('input',function(){
    var q=box.value.trim().toLowerCase(), n=0;
    rows.forEach(function(r){var hit=!q||r.dataset.search.indexOf(q)>=0; r.hidden=!hit; if(hit) n++;});
    shown.textContent=n+' of '+rows.length+' classes shown';
  });
})();
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _cell_num(x: float | int | None, digits: int = 1, delta: bool = False, lower_is_better: bool = False) -> str:
    if x is None:
        return '<td class="n" data-v="">-</td>'
    text = _fmt_delta(x, digits) if delta else (str(x) if isinstance(x, int) else _fmt(x, digits))
    gain = -x if lower_is_better else x
    cls = "n" + ((" up" if gain > 0 else " down" if gain < 0 else "") if delta else "")
    return f'<td class="{cls}" data-v="{x!r}">{text}</td>'


def render_html(report: dict) -> str:
    """``report.html``: one self-contained page (inline CSS, JS and base64 PNG plots; nothing fetched)."""
    r = report["run"]
    base = report["baseline"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mr2ft report: {_e(r['name'])}</title><style>{PAGE_CSS}</style></head><body>",
        f"<h1>mr2ft report: {_e(r['name'])}</h1>",
    ]
    facts = [f"run <code>{_e(r['path'])}</code>"]
    facts += [f"{key} <b>{_e(r[key])}</b>" for key in ("dataset", "backbone") if r.get(key)]
    facts += [f"{report['num_classes']} classes", f"{report['num_images']} test images"]
    parts.append(f'<p class="meta">{", ".join(facts)}.<br>')
    if base:
        note = "" if base["same_test_set"] else " (tested on other images)"
        parts.append(f"Baseline <code>{_e(base['path'])}</code>{note}: it fixes the groups and every change.</p>")
    else:
        parts.append("No baseline: the groups come from this run's own per-class accuracy.</p>")

    parts.append(f'<h2>Summary</h2><p class="meta">{_e(report["units"].capitalize())}.</p><table>')
    parts.append(
        '<tr><th>figure</th><th class="n">this run</th>'
        + ('<th class="n">baseline</th><th class="n">change</th>' if base else "")
        + "</tr>"
    )
    for key, label, value, bvalue, delta in _headline_rows(report):
        cells = f"<tr><td>{_e(label)}</td>{_cell_num(value)}"
        if base:
            # A wider spread of per-class accuracy is the disparity MR2 aims to shrink: lower std is better.
            cells += _cell_num(bvalue) + _cell_num(delta, delta=True, lower_is_better=key == "std")
        parts.append(cells + "</tr>")
    parts.append(f"</table><p>{_e(report['grouping']['rule'])}</p>")

    parts.append("<h2>Plots</h2>")
    for title, caption, data in _plots(report):
        parts.append(
            f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{_e(title)}.</b> {_e(caption)}</figcaption></figure>"
        )
    if not any(row["spread_S"] is not None or row["gamma"] is not None for row in report["per_class"]):
        parts.append('<p class="meta">This run saved no class statistics, so there are no spread or margin plots.</p>')

    parts.append("<h2>Most confused pairs</h2>")
    if report["confused_pairs"]:
        parts.append(
            '<table id="confused"><tr><th>true class</th><th>predicted as</th><th class="n">images</th>'
            '<th class="n">share of true class (%)</th></tr>'
        )
        for p in report["confused_pairs"]:
            parts.append(
                f"<tr><td>{_e(p['true_name'])}</td><td>{_e(p['pred_name'])}</td>{_cell_num(p['count'])}"
                f"{_cell_num(p['share'])}</tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>No test image was confused.</p>")

    k = len(report["per_class"])
    parts.append("<h2>Per-class results</h2>")
    parts.append(
        f'<p><input type="search" id="filter" placeholder="filter by class name or group" '
        f'aria-label="filter classes"> <span id="shown" class="meta">{k} of {k} classes shown</span> '
        '<span class="meta">· click a column to sort</span></p>'
    )
    columns = [
        ("class", "#", "num"),
        ("name", "class", "text"),
        ("group", "group", "text"),
        ("support", "images", "num"),
        ("correct", "correct", "num"),
        ("accuracy", "accuracy", "num"),
        ("precision", "precision", "num"),
    ]
    if base:
        columns += [("baseline_accuracy", "baseline", "num"), ("delta", "change", "num")]
    columns += [("spread_S", "spread S", "num"), ("gamma", "margin γ", "num")]
    parts.append('<div class="scroll"><table id="per-class"><thead><tr>')
    parts.append(
        "".join(
            f'<th data-type="{t}" data-key="{key}"{" class=n" if t == "num" else ""}>{_e(label)}</th>'
            for key, label, t in columns
        )
    )
    parts.append("</tr></thead><tbody>")
    for row in report["per_class"]:
        search = f"{row['name']} {row['group'] or ''}".lower()
        cells = []
        for key, _, t in columns:
            v = row[key]
            if t == "text":
                cls = f' class="g-{_e(v)}"' if key == "group" and v else ""
                cells.append(f"<td{cls}>{_e(v if v is not None else '-')}</td>")
            elif key in ("spread_S", "gamma"):
                cells.append(_cell_num(v, digits=3))
            else:
                cells.append(_cell_num(v, delta=key == "delta"))
        parts.append(f'<tr data-search="{_e(search)}">{"".join(cells)}</tr>')
    parts.append(f"</tbody></table></div><script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


# ---- files -----------------------------------------------------------------------------------------------------


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"json,csv"`` or ``["json", "csv"]`` -> validated tuple; an unknown name raises :class:`UserError`."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    items = [f.strip().lower() for f in items if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise UserError(f"unknown report format {', '.join(bad) or '(none)'}; choose from {','.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def write_report(
    run_dir: str | Path, baseline_dir: str | Path | None = None, formats: str | Sequence[str] = FORMATS
) -> dict:
    """Build a run's report and write it into the run folder, each file atomically.

    Args:
        run_dir: a finished run folder.
        baseline_dir: optional baseline run folder (same classes) that fixes the groups and the deltas.
        formats: any of ``json`` (report.json), ``csv`` (per_class.csv), ``md`` (report.md), ``html``
            (report.html).

    Returns:
        The report dict (see :func:`build_report`) with ``files``: the paths written.
    """
    chosen = parse_formats(formats)
    run = load_run(run_dir)
    baseline = load_run(baseline_dir) if baseline_dir is not None else None
    report = build_report(run, baseline)
    out = Path(run_dir)
    files = []
    for fmt in chosen:
        path = out / FILES[fmt]
        if fmt == "json":
            write_json(path, report)
        elif fmt == "csv":
            write_text(path, render_csv(report))
        elif fmt == "md":
            write_text(path, render_markdown(report))
        else:
            write_text(path, render_html(report))
        files.append(str(path))
    return dict(report, files=files)


# ---- comparing runs --------------------------------------------------------------------------------------------


def compare_runs(
    run_dirs: Sequence[str | Path], baseline_dir: str | Path | None = None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """The paper's table for several runs on one test set, with paired bootstrap intervals.

    The reference run is the baseline, or the first run when no baseline is given (the result says which). Its
    per-class accuracy fixes the groups for every run, and every other run gets a change against it with a
    paired, class-stratified bootstrap interval (:func:`mr2ft.metrics.paired_bootstrap`) per figure.

    Raises:
        UserError: no runs, runs with different classes, or runs tested on different images.
    """
    paths = [Path(p) for p in run_dirs]
    if baseline_dir is not None:
        baseline_path = Path(baseline_dir)
        paths = [baseline_path] + [p for p in paths if p.resolve() != baseline_path.resolve()]
    if not paths:
        raise UserError("no runs to compare; pass one or more run folders")
    runs = [load_run(p) for p in paths]
    ref = runs[0]
    k = _check_run(ref)
    for run in runs[1:]:
        _check_run(run)
        if run["class_names"] != ref["class_names"]:
            raise UserError(f"{run['path']} has different classes from {ref['path']}; compare runs on one dataset")
        if not torch.equal(run["targets"], ref["targets"]):
            raise UserError(
                f"{run['path']} was tested on different images from {ref['path']} (their saved test labels differ); "
                "a paired comparison needs runs on the same test split"
            )
    ref_summary = metrics.summarize(ref["preds"], ref["targets"], k, topk=ref["topk"])
    groups = np.asarray(ref_summary["class_groups"])
    sizes = [g["size"] for g in ref_summary["groups"].values()]
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    ci = 0.95
    correct_ref = (ref["preds"] == ref["targets"]).numpy()
    rows = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        summary = metrics.summarize(run["preds"], run["targets"], k, topk=run["topk"], groups=groups)
        row: dict[str, Any] = {
            "name": name,
            "path": str(run["path"]),
            "is_reference": i == 0,
            "values": metrics.headline_figures(summary),
            "worst_class_name": ref["class_names"][summary["worst_class"]["index"]]
            if summary["worst_class"]["index"] >= 0
            else None,
            "deltas": None,
            "intervals": None,
        }
        if i > 0:
            correct = (run["preds"] == run["targets"]).numpy()
            boot = metrics.paired_bootstrap(ref["targets"], correct_ref, correct, groups, k, n_boot, seed, ci)
            row["deltas"] = {key: f["delta"] for key, f in boot["figures"].items()}
            row["intervals"] = {key: [f["low"], f["high"]] for key, f in boot["figures"].items()}
        rows.append(row)
    source = "baseline" if baseline_dir is not None else "first run"
    return json_safe(
        {
            "reference": {"path": str(ref["path"]), "name": names[0], "is_baseline": baseline_dir is not None},
            "num_classes": k,
            "num_images": int(ref["targets"].shape[0]),
            "grouping": {
                "source": source,
                "rule": metrics.grouping_rule(
                    sizes, f"the {source}'s ({names[0]})", ref_summary["classes_without_support"]
                ),
                "sizes": dict(zip(ref_summary["groups"], sizes, strict=True)),
            },
            "bootstrap": {
                "n_boot": n_boot,
                "seed": seed,
                "ci": ci,
                "method": "paired, resampling test images within each class",
            },
            "units": "percentages; changes are percentage points against the reference run",
            "rows": rows,
        }
    )


def _compare_keys(result: dict) -> list[str]:
    return ["top1", *result["grouping"]["sizes"], "worst_class", "std"]


def _compare_cell(row: dict, key: str, interval: bool = True) -> str:
    value = _fmt(row["values"].get(key))
    if row["deltas"] is None or row["deltas"].get(key) is None:
        return value
    text = f"{value} ({_fmt_delta(row['deltas'][key])})"
    lo, hi = row["intervals"][key]
    if interval and lo is not None:
        mark = "*" if lo > 0 or hi < 0 else ""
        text += f" [{_fmt_delta(lo)}, {_fmt_delta(hi)}]{mark}"
    return text


def _compare_note(result: dict) -> str:
    ref = result["reference"]
    who = "the baseline" if ref["is_baseline"] else "the first run (no --baseline given)"
    b = result["bootstrap"]
    sizes = "/".join(str(s) for s in result["grouping"]["sizes"].values())
    return (
        f"Reference: {who}, {ref['name']}; it fixes the groups ({sizes} classes) and every change (+x.x). "
        f"Brackets: {round(100 * b['ci'])}% paired bootstrap interval of the change "
        f"({b['n_boot']} resamples of the test images within each class); * = the interval excludes 0. "
        f"{result['num_classes']} classes, {result['num_images']} test images; accuracy in %."
    )


def compare_table(result: dict) -> Any:
    """A Rich table of :func:`compare_runs`'s result (change and interval on a second line of each cell)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="mr2ft compare", caption=escape(_compare_note(result)), caption_justify="left")
    table.add_column("run", overflow="fold")
    for key in _compare_keys(result):
        table.add_column(COMPARE_HEADERS.get(key, key), justify="right")
    for row in result["rows"]:
        cells = []
        for key in _compare_keys(result):
            cell = _fmt(row["values"].get(key))
            if row["deltas"] is not None and row["deltas"].get(key) is not None:
                d = row["deltas"][key]
                good = d < 0 if key == "std" else d > 0
                color = "green" if good else "red" if d != 0 else "default"
                lo, hi = row["intervals"][key]
                cell += f" [{color}]({_fmt_delta(d)})[/]"
                if lo is not None:
                    cell += f"\n[dim][{_fmt_delta(lo)}, {_fmt_delta(hi)}][/]"
            cells.append(cell)
        name = escape(row["name"]) + ("\n[dim](reference)[/]" if row["is_reference"] else "")
        table.add_row(name, *cells)
    return table


def compare_markdown(result: dict) -> str:
    """``compare.md``: the paper's table in Markdown."""
    keys = _compare_keys(result)
    lines = [
        "| run | " + " | ".join(COMPARE_HEADERS.get(key, key) for key in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for row in result["rows"]:
        name = md_escape(row["name"]) + (" (reference)" if row["is_reference"] else "")
        lines.append(f"| {name} | " + " | ".join(_compare_cell(row, key) for key in keys) + " |")
    return "\n".join(lines) + "\n\n" + md_escape(_compare_note(result)) + "\n"


def compare_csv(result: dict) -> str:
    """``compare.csv``: one row per run; for every figure its value, change, and interval bounds."""
    keys = [*_compare_keys(result)[:-2], "balanced_accuracy", "worst10", "worst_class", "std"]
    keys = list(dict.fromkeys(keys))
    header = ["run", "path", "is_reference", "worst_class_name"]
    for key in keys:
        header += [key, f"{key}_delta", f"{key}_low", f"{key}_high"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    for row in result["rows"]:
        out = [row["name"], row["path"], int(row["is_reference"]), row["worst_class_name"] or ""]
        for key in keys:
            d = row["deltas"].get(key) if row["deltas"] else None
            lo, hi = row["intervals"][key] if row["intervals"] else (None, None)
            out += [num(row["values"].get(key)), num(d), num(lo), num(hi)]
        writer.writerow(out)
    return buf.getvalue()


def write_compare(result: dict, out_dir: str | Path) -> list[str]:
    """Write ``compare.md`` and ``compare.csv`` into ``out_dir`` (created if needed), atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose a folder for compare.md and compare.csv")
    files = [out / "compare.md", out / "compare.csv"]
    write_text(files[0], compare_markdown(result))
    write_text(files[1], compare_csv(result))
    return [str(f) for f in files]
