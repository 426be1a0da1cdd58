"""A report dict as text: the terminal headline, ``per_class.csv`` and ``report.md``; and writing the files.

:func:`write_report` is the entry point probe, finetune and ``mr2ft report`` call: it loads the run folder,
builds the report (:mod:`mr2ft.report.build`) and writes each chosen format atomically. The HTML page is
:mod:`mr2ft.report.page`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mr2ft import metrics
from mr2ft.errors import UserError
from mr2ft.io import write_json, write_text
from mr2ft.report.build import REPORT_N_BOOT, build_report, read_run
from mr2ft.report.kit import FIGURE_LABELS, csv_text, fmt_delta, fmt_interval, fmt_num, md_escape
from mr2ft.runs import REPORT_FILES

FORMATS = tuple(REPORT_FILES)
FILES = REPORT_FILES
CSV_COLUMNS = ("class", "name", "support", "correct", "accuracy", "precision", "group", "gamma", "spread_S")
MD_FULL_TABLE_MAX = 100


def margins_note(report: dict) -> str:
    """Said wherever gamma appears when the run's loss did not use it (CE and the other baselines)."""
    if report.get("run", {}).get("margins_applied") is False:
        return " This run's loss did not apply these margins: gamma is what MR2 would set from its class statistics."
    return ""


def run_line(report: dict) -> str:
    """What was run, in a few words: ``loss mr2, probe, 30 epochs`` (only the facts the run recorded)."""
    r = report["run"]
    parts = [f"loss {r['loss']}" if r.get("loss") else None, r.get("mode")]
    if r.get("epochs") is not None:
        parts.append(f"{r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}")
    if r.get("rep_grad_share") is not None:
        parts.append(f"representation margin's gradient {100 * r['rep_grad_share']:.3g}% of the logit margin's")
    return ", ".join(p for p in parts if p) or "loss, mode and epochs not recorded"


def change_text(report: dict, key: str, delta: float | None) -> str:
    """``+1.2 [+0.3, +2.0]*``: a change with its interval when the report has one."""
    if delta is None:
        return ""
    low, high = (report.get("intervals") or {}).get(key) or (None, None)
    interval = fmt_interval(low, high)
    return fmt_delta(delta) + (f" {interval}" if interval else "")


def grouping_label(grouping: dict) -> str:
    """``--groups crossfit`` (the option that gives this grouping), or ``no baseline``."""
    return "no baseline" if grouping["method"] == "self" else f"--groups {grouping['method']}"


def interval_note(report: dict) -> str:
    """What the brackets mean, or why there are none."""
    if report["baseline"] is None:
        return ""
    boot = report.get("bootstrap")
    if not boot:
        return "No intervals: the baseline was tested on other images, so the changes cannot be paired."
    return (
        f"Brackets: {round(100 * boot['ci'])}% paired bootstrap interval of the change ({boot['n_boot']} resamples "
        "of the test images within each class); * = the interval excludes 0."
    )


def headline_rows(report: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(key, label, run value, baseline value, delta) for each headline figure."""
    s = report["summary"]
    b = report["baseline"]["summary"] if report["baseline"] else None
    d = report["deltas"] or {}

    def flat(summary: dict | None) -> dict:
        if summary is None:
            return {}
        return {**metrics.headline_figures(summary), "top5": summary["top5"]}

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
    """The main figures for the terminal: what was run, then one line of figures (changes with intervals)."""
    s = report["summary"]
    d = report["deltas"] or {}
    parts = []
    for key in ("top1", *s["groups"], "worst_class", "std"):
        value = metrics.headline_figures(s)[key]
        change = change_text(report, key, d.get(key))
        label = {"top1": "top-1", "worst_class": "worst class"}.get(key, key)
        parts.append(f"{label} {fmt_num(value)}" + (f" ({change})" if change else ""))
    lines = [f"{report['run']['name']}: {run_line(report)}", " | ".join(parts)]
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def render_csv(report: dict) -> str:
    """``per_class.csv``: one row per class; baseline columns only when the report has a baseline."""
    columns = list(CSV_COLUMNS) + (["baseline_accuracy", "delta"] if report["baseline"] else [])
    rows = (
        ["" if row[c] is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in columns]
        for row in report["per_class"]
    )
    return csv_text(columns, rows)


def _md_class_table(rows: Sequence[dict], with_baseline: bool) -> list[str]:
    out = [
        "| class | group | images | accuracy | precision |" + (" baseline | change |" if with_baseline else ""),
        "|---|---|---:|---:|---:|" + ("---:|---:|" if with_baseline else ""),
    ]
    for row in rows:
        line = (
            f"| {md_escape(row['name'])} | {row['group'] or '-'} | {row['support']} | {fmt_num(row['accuracy'])} | "
            f"{fmt_num(row['precision'])} |"
        )
        if with_baseline:
            line += f" {fmt_num(row['baseline_accuracy'])} | {fmt_delta(row['delta'])} |"
        out.append(line)
    return out


def _md_header(report: dict) -> list[str]:
    r = report["run"]
    base = report["baseline"]
    lines = [f"# mr2ft report: {md_escape(r['name'])}", ""]
    facts = [f"run `{r['path']}`"]
    facts += [f"{key} {md_escape(r[key])}" for key in ("dataset", "backbone") if r.get(key)]
    facts += [f"{report['num_classes']} classes", f"{report['num_images']} test images"]
    lines += [", ".join(facts) + ".", ""]
    lines += [f"Run: {md_escape(run_line(report))}.", ""]
    if base:
        lines.append(
            f"Baseline: `{base['path']}`" + ("" if base["same_test_set"] else " (tested on other images)") + "."
        )
    else:
        lines.append("No baseline: the groups come from this run's own per-class accuracy.")
    lines += [f"\n**Warning:** {md_escape(w)}" for w in report.get("warnings", [])]
    return lines


def render_markdown(report: dict) -> str:
    """``report.md``: the figures, the grouping, the hardest classes, confusions and (small K) every class."""
    base = report["baseline"]
    lines = _md_header(report)
    lines += ["", f"{report['units'].capitalize()}.", ""]
    lines += ["| figure | this run |" + (" baseline | change |" if base else "")]
    lines += ["|---|---:|" + ("---:|---:|" if base else "")]
    for key, label, value, bvalue, delta in headline_rows(report):
        cells = f"| {md_escape(label)} | {fmt_num(value)} |"
        if base:
            cells += f" {fmt_num(bvalue)} | {change_text(report, key, delta)} |"
        lines.append(cells)
    if base:
        lines += ["", md_escape(interval_note(report))]
    grouping = report["grouping"]
    lines += ["", f"Grouping ({grouping_label(grouping)}): {md_escape(grouping['rule'])}", ""]
    corr = report["correlations"]
    if corr["spread_vs_accuracy"] is not None or corr["gamma_vs_accuracy"] is not None:
        lines += [
            "Spearman rank correlation with per-class accuracy: feature spread S "
            f"{fmt_num(corr['spread_vs_accuracy'], 2)}, margin gamma {fmt_num(corr['gamma_vs_accuracy'], 2)}."
            f"{margins_note(report)}",
            "",
        ]
    rows = report["per_class"]
    ranked = sorted((row for row in rows if row["accuracy"] is not None), key=lambda x: (x["accuracy"], x["class"]))
    lines += ["## Hardest classes", "", *_md_class_table(ranked[:10], base is not None), ""]
    lines += ["## Most confused pairs", ""]
    if report["confused_pairs"]:
        lines += ["| true class | predicted as | images | share of true class |", "|---|---|---:|---:|"]
        lines += [
            f"| {md_escape(p['true_name'])} | {md_escape(p['pred_name'])} | {p['count']} | {fmt_num(p['share'])} |"
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


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"json,csv"`` or ``["json", "csv"]`` -> validated tuple; an unknown name raises :class:`UserError`."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    items = [f.strip().lower() for f in items if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise UserError(f"unknown report format {', '.join(bad) or '(none)'}; choose from {','.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def write_report(
    run_dir: str | Path,
    baseline_dir: str | Path | None = None,
    formats: str | Sequence[str] = FORMATS,
    groups: str | None = None,
    n_boot: int = REPORT_N_BOOT,
) -> dict:
    """Build a run's report and write it into the run folder, each file atomically.

    Args:
        run_dir: a finished run folder.
        baseline_dir: optional baseline run folder (same classes) that fixes the groups and the deltas.
        formats: any of ``json`` (report.json), ``csv`` (per_class.csv), ``md`` (report.md), ``html``
            (report.html).
        groups: ``val``, ``crossfit`` or ``test``: how the baseline fixes the groups (see
            :mod:`mr2ft.report.groups`); None for the default (val when available, else crossfit).
        n_boot: bootstrap resamples of the changes' intervals.

    Returns:
        The report dict (see :func:`build_report`) with ``files``: the paths written.
    """
    from mr2ft.report.page import render_html

    chosen = parse_formats(formats)
    run = read_run(run_dir)
    baseline = read_run(baseline_dir) if baseline_dir is not None else None
    report = build_report(run, baseline, groups=groups, n_boot=n_boot)
    out = Path(run_dir)
    renderers = {"csv": render_csv, "md": render_markdown, "html": render_html}
    files = []
    for fmt in chosen:
        path = out / FILES[fmt]
        if fmt == "json":
            write_json(path, report)
        else:
            write_text(path, renderers[fmt](report))
        files.append(str(path))
    return dict(report, files=files)
