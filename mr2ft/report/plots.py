"""The report's plots: per-class accuracy, the group bars, and accuracy against spread S and margin gamma.

Each plot is a matplotlib ``Figure`` (no pyplot, no global backend state) returned as base64 PNG with a title and
a caption that describes what the plotted data shows.
"""

from __future__ import annotations

import math

import numpy as np

from mr2ft import metrics
from mr2ft.report.kit import (
    FIGURE_LABELS,
    GROUP_COLORS,
    correlation_words,
    fmt_num,
    nan_float,
    plot_label,
    png_base64,
)
from mr2ft.report.render import margins_note

ANNOTATE_MAX_CLASSES = 100


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean that skips NaN and, at the ends, averages only the points the window covers."""
    ok = ~np.isnan(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _group_bands(ax, sizes: dict) -> None:
    start = 0
    for gname, size in sizes.items():
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


def accuracy_plot(report: dict) -> tuple[str, str, str]:
    """Per-class accuracy, classes ranked as the grouping ranks them (reference accuracy, most accurate first)."""
    from matplotlib.figure import Figure

    rows = report["per_class"]
    k = len(rows)
    acc = np.array([nan_float(row["accuracy"]) for row in rows])
    base = report["baseline"] is not None
    ref = np.array([nan_float(row["baseline_accuracy"]) for row in rows]) if base else acc
    # Reference accuracy descending, ties by class index, no-support classes last.
    order = sorted(range(k), key=lambda i: (math.isnan(ref[i]), -ref[i] if not math.isnan(ref[i]) else 0, i))
    labelled = k <= 40
    fig = Figure(figsize=(10, 5.2 if labelled else 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(k)
    colors = [GROUP_COLORS.get(rows[i]["group"], GROUP_COLORS[None]) for i in order]
    if base:
        ax.plot(x, ref[order], color="#333333", lw=1.5, label="baseline", zorder=3)
        ax.scatter(x, acc[order], s=18 if k <= 200 else 5, c=colors, label="this run", zorder=4)
        if k > 20:
            window = max(3, k // 25)
            smooth = moving_mean(acc[order], window)
            ax.plot(x, smooth, color="#1f5fbf", lw=1.2, label=f"this run, moving mean of {window}", zorder=3)
        ax.legend(loc="upper right", fontsize=8)
        caption = (
            "Per-class accuracy with classes ranked by the baseline's test accuracy (line); dots are this run, "
            "coloured by group. Dots above the line are classes this run improved."
        )
    else:
        ax.bar(x, acc[order], color=colors, width=0.85 if k <= 200 else 1.0)
        caption = "Per-class accuracy of this run, classes ranked from most to least accurate, coloured by group."
    if report["grouping"].get("bands", True):
        _group_bands(ax, report["grouping"]["sizes"])
    ax.set_xlim(-0.7, k - 0.3)
    ax.set_ylim(0, 102)
    ax.set_ylabel("accuracy (%)")
    if labelled:
        ax.set_xticks(x, [plot_label(rows[i]["name"]) for i in order], rotation=90, fontsize=8)
    else:
        who = "the baseline's" if base else "this run's"
        ax.set_xlabel(f"{k} classes ranked by {who} accuracy, most accurate first (names in the table below)")
    return "Per-class accuracy", caption, png_base64(fig)


def groups_plot(report: dict) -> tuple[str, str, str]:
    """Bars of overall, balanced, per-group, worst-10% and worst-class accuracy (and the baseline's)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    keys = ["top1", "balanced_accuracy", *report["summary"]["groups"], "worst10", "worst_class"]
    series = [("this run", metrics.headline_figures(report["summary"]), "#1f5fbf")]
    if report["baseline"] is not None:
        series.insert(0, ("baseline", metrics.headline_figures(report["baseline"]["summary"]), "#9a9a9a"))
    width = 0.8 / len(series)
    for j, (label, values, color) in enumerate(series):
        xs = np.arange(len(keys)) + (j - (len(series) - 1) / 2) * width
        vals = np.array([nan_float(values[key]) for key in keys])
        bars = ax.bar(xs, np.nan_to_num(vals), width, label=label, color=color)
        ax.bar_label(bars, labels=[fmt_num(v) if not math.isnan(v) else "-" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(
        np.arange(len(keys)), [FIGURE_LABELS.get(key, key).replace(" of classes", "") for key in keys], fontsize=9
    )
    ax.set_ylim(0, 110)
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="upper right", fontsize=8)
    caption = "Overall, balanced and per-group mean accuracy; the worst 10% and the single worst class."
    return "Groups", caption, png_base64(fig)


SCATTERS = (
    # (row key, x label, title, correlation key, what, what the method expects)
    (
        "spread_S",
        "feature spread S (mean squared distance to the class mean)",
        "Accuracy against feature spread",
        "spread_vs_accuracy",
        "feature spread S",
        "harder classes have more spread-out features (the paper's Figure 1b)",
    ),
    (
        "gamma",
        "logit margin gamma",
        "Accuracy against margin",
        "gamma_vs_accuracy",
        "margin gamma",
        "MR2 gives the harder, spread-out classes larger margins",
    ),
)


def scatter_plot(report: dict, key: str, xlabel: str, title: str, rho: float | None, caption: str):
    """Accuracy against one per-class statistic; None when the run has no value of it."""
    from matplotlib.figure import Figure

    rows = report["per_class"]
    k = len(rows)
    acc = np.array([nan_float(row["accuracy"]) for row in rows])
    values = np.array([nan_float(row[key]) for row in rows])
    if np.isnan(values).all():
        return None
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    colors = [GROUP_COLORS.get(row["group"], GROUP_COLORS[None]) for row in rows]
    ax.scatter(values, acc, s=24 if k <= 200 else 6, alpha=0.8, c=colors)
    named = ""
    if k <= ANNOTATE_MAX_CLASSES:
        # Past ~100 classes the five worst usually sit on top of each other: the table names them instead.
        worst = [
            i
            for i in np.argsort(np.where(np.isnan(acc), np.inf, acc), kind="stable")[:5]
            if not (math.isnan(acc[i]) or math.isnan(values[i]))
        ]
        for i in worst:
            label = plot_label(rows[i]["name"], 18)
            ax.annotate(label, (values[i], acc[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        named = " The five least accurate classes are named."
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Spearman rank correlation {fmt_num(rho, 2)}", fontsize=10)
    return title, f"{caption} Colours are groups.{named}", png_base64(fig)


def report_plots(report: dict) -> list[tuple[str, str, str]]:
    """(title, caption, base64 PNG) for each plot the report's data supports."""
    plots = [accuracy_plot(report), groups_plot(report)]
    corr = report["correlations"]
    for key, xlabel, title, corr_key, what, expected in SCATTERS:
        rho = corr[corr_key]
        caption = correlation_words(rho, what, expected)
        if key == "gamma":
            caption += margins_note(report)
        plot = scatter_plot(report, key, xlabel, title, rho, caption)
        if plot is not None:
            plots.append(plot)
    return plots
