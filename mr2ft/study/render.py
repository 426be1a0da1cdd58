"""The study for people: the terminal table and verdict, ``study.md``, ``study.html`` (plots inline) and the files.

Everything here reads a ``study.json`` dict (:func:`mr2ft.study.build.build_study`); number formats, escaping, the
page head and plot embedding come from the shared page kit (:mod:`mr2ft.report.kit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from mr2ft.io import write_json, write_text
from mr2ft.report.kit import (
    GROUP_COLORS,
    PAPER_HEADERS,
    esc,
    fmt_delta,
    fmt_interval,
    fmt_num,
    fmt_sig,
    html_figure,
    html_head,
    md_escape,
    plot_label,
    png_base64,
)
from mr2ft.runs import REPORT_MD
from mr2ft.study.analysis import LABELS, TABLE_FIGURES, comparison_key

FILES = ("study.json", "study.md", "study.html")


def _interval(f: Mapping[str, Any]) -> str:
    return fmt_interval(f.get("low"), f.get("high"))


def _label(study: dict, method: str) -> str:
    if method == "ce" and study["control"] == "ce":
        return "ERM (matched control)"
    return LABELS[method]


def table_rows(study: dict, seed_std: bool = True) -> list[tuple[str, list[str], list[str]]]:
    """(row label, value cells, interval cells) of the paper-style table: the methods, then (with a separate
    control) the attribution row "MR2 vs matched control"."""
    rows = []
    for m in study["methods"]:
        entry = study["table"][m]
        cells, cis = [], []
        comp = study["comparisons"].get(comparison_key("ce", m)) if m != "ce" else None
        for key in TABLE_FIGURES:
            cell = fmt_num(entry["values"].get(key))
            sd = entry["seed_std"].get(key)
            if seed_std and sd is not None:
                cell += f" ±{sd:.1f}"
            ci = ""
            if comp is not None:
                f = comp["figures"][key]
                cell += f" ({fmt_delta(f['delta'], missing='-')})"
                ci = _interval(f)
            cells.append(cell)
            cis.append(ci)
        rows.append((_label(study, m), cells, cis))
    if study["control"] != "ce":
        attr = study["comparisons"][study["attribution"]]["figures"]
        rows.append(
            (
                "MR2 vs matched control",
                [fmt_delta(attr[key]["delta"], missing="-") for key in TABLE_FIGURES],
                [_interval(attr[key]) for key in TABLE_FIGURES],
            )
        )
    return rows


def table_note(study: dict, seed_std: bool = True) -> str:
    """What the table's numbers are, in one paragraph (the grouping rule and the interval included)."""
    b = study["bootstrap"]
    n = len(study["seeds"])
    std = " (±: the seeds' standard deviation)" if seed_std and n > 1 else ""
    seeds_note = " One seed: seed-to-seed variance is not in the intervals." if n == 1 else ""
    return (
        f"Mean over {n} seed{'s' if n > 1 else ''}{std}; (+x.x) is the change against ERM; brackets are the "
        f"{round(100 * b['ci'])}% bootstrap interval of that change, paired by seed, resampling test images within "
        f"each class and the seeds ({b['n_boot']} resamples); * = the interval excludes 0.{seeds_note} "
        f"{study['grouping']['rule']} std is the standard deviation of per-class accuracy (lower is more even). "
        f"{study['num_classes']} classes, {study['num_images']} test images; accuracy in %."
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
        table.add_column(PAPER_HEADERS.get(key, key), justify="right")
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
    console.print(f"Rule: {study['verdict']['rule']}.", highlight=False)
    for w in study["diagnostics"]["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    console.print(f"Full report: {folder / 'study.html'}", highlight=False)


def _margin_lines(study: dict) -> list[str]:
    lines = []
    for m in study.get("margins") or []:
        if m.get("mr2_mean_inverse_margin") is not None:
            lines.append(
                f"Seed {m['seed']}: MR2's mean inverse margin {m['mr2_mean_inverse_margin']:.4g}, the control's "
                f"{m['control_mean_inverse_margin']:.4g} (its c_bar {m['control_c_bar']:.4g})."
            )
    return lines


def _diagnostic_lines(study: dict) -> list[str]:
    """The diagnostics as plain sentences (Markdown and HTML list items)."""
    d = study["diagnostics"]
    rep = d.get("representation") or {}
    share = rep.get("rep_grad_share")
    lines = [
        f"Spearman(spread S, ERM accuracy) = {fmt_delta(d['spread_vs_accuracy'], 2, '-')} ({d['spread_source']}); "
        "expected negative: hard classes are more spread out.",
        f"Spearman(margin γ, ERM accuracy) = {fmt_delta(d['gamma_vs_accuracy'], 2, '-')} ({d['gamma_source']}); "
        "expected negative: hard classes get larger margins.",
        "Representation margin's gradient share (the norm of λ L_RM's gradient over L_LM's, on the features): "
        + ("not measured" if share is None else f"{100 * share:.3g}%")
        + f" ({rep.get('source', '')}).",
    ]
    return lines + _margin_lines(study)


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


def _knob(r: dict) -> str:
    return "-" if r["knob"] is None else format(r["knob"], ".4g")


def render_markdown(study: dict) -> str:
    """``study.md``."""
    methods = study["methods"]
    lines = [f"# mr2ft study: {md_escape(study['backbone'])} on {md_escape(study['dataset'])}", ""]
    lines += [
        f"Mode {study['mode']}, {study['num_classes']} classes, {study['num_images']} test images, seeds "
        f"{', '.join(str(s) for s in study['seeds'])}.",
        "",
        "## Verdict",
        "",
        md_escape(study["verdict"]["text"]),
        "",
        f"Rule: {md_escape(study['verdict']['rule'])}.",
        "",
        "## Results",
        "",
        "| method | " + " | ".join(PAPER_HEADERS.get(k, k) for k in TABLE_FIGURES) + " |",
        "|---|" + "---:|" * len(TABLE_FIGURES),
    ]
    for label, cells, cis in table_rows(study):
        row = [f"{c} {i}".strip() for c, i in zip(cells, cis, strict=True)]
        name = f"**{label}**" if label.startswith("MR2 vs") else label
        lines.append(f"| {name} | " + " | ".join(md_escape(c) for c in row) + " |")
    lines += ["", md_escape(table_note(study)), "", "## Diagnostics", ""]
    lines += [f"- {md_escape(x)}" for x in _diagnostic_lines(study)]
    lines += [f"- **Warning:** {md_escape(w)}" for w in study["diagnostics"]["warnings"]]
    lines += ["", "## Choices made on validation", "", md_escape(_split_text(study)), ""]
    lines += ["| run | seed | weight decay | knob | value |", "|---|---:|---:|---|---:|"]
    for r in study["runs"]:
        lines.append(f"| {r['dir']} | {r['seed']} | {r['weight_decay']:g} | {r['knob_name'] or '-'} | {_knob(r)} |")
    header = " | ".join(LABELS[m] for m in methods)
    lines += ["", "## Per class (mean over seeds)", "", f"| class | group | {header} | spread S | margin γ |"]
    lines.append("|---|---|" + "---:|" * (len(methods) + 2))
    for row in study["per_class"]:
        accs = " | ".join(fmt_num(row[m]) for m in methods)
        lines.append(
            f"| {md_escape(row['name'])} | {row['group'] or '-'} | {accs} | {fmt_sig(row['spread_S'])} | "
            f"{fmt_sig(row['gamma'])} |"
        )
    lines += ["", "## Caveats", ""] + [f"- {md_escape(c)}" for c in study["caveats"]]
    lines += ["", f"- {md_escape(study['grouping']['rule'])}", ""]
    lines.append("Run folders: " + ", ".join(f"`{r['dir']}`" for r in study["runs"]))
    return "\n".join(lines) + "\n"


def _changes_plot(study: dict) -> tuple[str, str, str]:
    from matplotlib.figure import Figure

    colors = {"uniform_vs_ce": "#9a9a9a", "mr2_vs_ce": "#1f5fbf", "mr2_vs_uniform": "#d1495b"}
    comps = list(study["comparisons"])
    fig = Figure(figsize=(8, 0.3 * len(TABLE_FIGURES) * (len(comps) + 1) + 0.8), layout="constrained")
    ax = fig.subplots()
    ticks, labels = [], []
    for j, key in enumerate(TABLE_FIGURES):
        for c, name in enumerate(comps):
            f = study["comparisons"][name]["figures"][key]
            if f["delta"] is None:
                continue
            lo = f["low"] if f["low"] is not None else f["delta"]
            hi = f["high"] if f["high"] is not None else f["delta"]
            ax.errorbar(
                f["delta"],
                -(j * (len(comps) + 1) + c),
                xerr=[[f["delta"] - lo], [hi - f["delta"]]],
                fmt="o",
                color=colors.get(name, "#333333"),
                capsize=3,
                label=study["comparisons"][name]["label"] if j == 0 else None,
            )
        ticks.append(-(j * (len(comps) + 1) + (len(comps) - 1) / 2))
        labels.append(PAPER_HEADERS.get(key, key))
    ax.axvline(0, color="#555555", lw=0.8)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("change (percentage points)")
    ax.legend(loc="best", fontsize=8)
    caption = (
        "Each change and its bootstrap interval, paired by seed, over test images and seeds; the last comparison "
        "is the attribution (MR2 vs its matched control). For std, lower is better."
    )
    return "Changes with 95% intervals", caption, png_base64(fig)


def _per_class_plot(study: dict, erm: np.ndarray) -> tuple[str, str, str]:
    from matplotlib.figure import Figure

    rows = study["per_class"]
    k = len(rows)
    order = sorted(range(k), key=lambda i: (math.isnan(erm[i]), -(0 if math.isnan(erm[i]) else erm[i]), i))
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(k)
    styles = {"ce": ("#333333", "-"), "uniform": ("#9a9a9a", "--"), "mr2": ("#1f5fbf", "-")}
    for m in study["methods"]:
        color, style = styles[m]
        vals = np.array([np.nan if rows[i][m] is None else rows[i][m] for i in order])
        ax.plot(x, vals, style, color=color, marker="o" if k <= 60 else None, ms=3, label=_label(study, m))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    if k <= 40:
        ax.set_xticks(x, [plot_label(rows[i]["name"]) for i in order], rotation=90, fontsize=8)
    else:
        ax.set_xlabel(f"class rank by ERM accuracy ({k} classes)")
    ax.legend(loc="lower left", fontsize=8)
    return "Per-class accuracy", "Mean over seeds, classes ranked by ERM's test accuracy.", png_base64(fig)


def _diagnostics_plot(study: dict, erm: np.ndarray) -> tuple[str, str, str]:
    from matplotlib.figure import Figure

    rows, d = study["per_class"], study["diagnostics"]
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
        ax.set_title(f"Spearman {fmt_delta(rho, 2, '-')} (expected negative)", fontsize=10)
    caption = "ERM's per-class accuracy against spread and margin; colours are the groups."
    return "Diagnostics", caption, png_base64(fig)


def _plots(study: dict) -> list[tuple[str, str, str]]:
    erm = np.array([np.nan if r["ce"] is None else r["ce"] for r in study["per_class"]])
    return [_changes_plot(study), _per_class_plot(study, erm), _diagnostics_plot(study, erm)]


def _html_table(study: dict) -> list[str]:
    parts = [
        "<h2>Results</h2><table><tr><th>method</th>"
        + "".join(f'<th class="n">{esc(PAPER_HEADERS.get(k, k))}</th>' for k in TABLE_FIGURES)
        + "</tr>"
    ]
    for label, cells, cis in table_rows(study):
        name = f"<b>{esc(label)}</b>" if label.startswith("MR2 vs") else esc(label)
        row = f"<tr><td>{name}</td>"
        for c, i in zip(cells, cis, strict=True):
            row += f'<td class="n">{esc(c)}' + (f'<br><span class="meta">{esc(i)}</span>' if i else "") + "</td>"
        parts.append(row + "</tr>")
    parts.append(f'</table><p class="meta">{esc(table_note(study))}</p>')
    return parts


def _html_runs_and_classes(study: dict) -> list[str]:
    parts = [f"<h2>Choices made on validation</h2><p>{esc(_split_text(study))}</p>"]
    parts.append(
        '<table><tr><th>run</th><th class="n">seed</th><th class="n">weight decay</th><th>knob</th>'
        '<th class="n">value</th></tr>'
    )
    for r in study["runs"]:
        parts.append(
            # each run folder holds report.md / report.json (HTML pages only for the study itself, to keep it quick)
            f'<tr><td><a href="{esc(r["dir"])}/{REPORT_MD}">{esc(r["dir"])}</a></td><td class="n">{r["seed"]}</td>'
            f'<td class="n">{r["weight_decay"]:g}</td><td>{esc(r["knob_name"] or "-")}</td>'
            f'<td class="n">{_knob(r)}</td></tr>'
        )
    methods = study["methods"]
    parts.append("</table><h2>Per class (mean over seeds)</h2><table><tr><th>class</th><th>group</th>")
    parts.append("".join(f'<th class="n">{esc(LABELS[m])}</th>' for m in methods))
    parts.append('<th class="n">spread S</th><th class="n">margin γ</th></tr>')
    for row in study["per_class"]:
        g = row["group"]
        parts.append(
            f"<tr><td>{esc(row['name'])}</td><td{f' class=g-{g}' if g in GROUP_COLORS else ''}>{esc(g or '-')}</td>"
            + "".join(f'<td class="n">{fmt_num(row[m])}</td>' for m in methods)
            + f'<td class="n">{fmt_sig(row["spread_S"])}</td><td class="n">{fmt_sig(row["gamma"])}</td></tr>'
        )
    return parts


def render_html(study: dict) -> str:
    """``study.html``: one self-contained page (inline CSS and base64 PNG plots; nothing fetched)."""
    title = f"mr2ft study: {study['backbone']} on {study['dataset']}"
    css = ".verdict{font-size:1.1em;padding:.6em 1em;background:#f4f6fa;border-left:4px solid #1f5fbf}"
    parts = html_head(title, css)
    parts += [
        f'<p class="meta">Mode {esc(study["mode"])}, {study["num_classes"]} classes, {study["num_images"]} test '
        f"images, seeds {esc(', '.join(str(s) for s in study['seeds']))}.</p>",
        f'<h2>Verdict</h2><p class="verdict">{esc(study["verdict"]["text"])}</p>',
        f'<p class="meta">Rule: {esc(study["verdict"]["rule"])}.</p>',
    ]
    parts += _html_table(study)
    parts.append("<h2>Diagnostics</h2><ul>")
    parts += [f"<li>{esc(x)}</li>" for x in _diagnostic_lines(study)]
    parts += [f'<li class="warn"><b>Warning:</b> {esc(w)}</li>' for w in study["diagnostics"]["warnings"]]
    parts.append("</ul><h2>Plots</h2>")
    parts += [html_figure(name, caption, data) for name, caption, data in _plots(study)]
    parts += _html_runs_and_classes(study)
    parts.append("</table><h2>Caveats</h2><ul>")
    parts += [f"<li>{esc(c)}</li>" for c in study["caveats"]]
    parts.append(f"<li>{esc(study['grouping']['rule'])}</li></ul></body></html>")
    return "\n".join(parts) + "\n"


def write_study(study: dict, folder: str | Path) -> list[str]:
    """Write ``study.json``, ``study.md`` and ``study.html`` into ``folder``, each atomically."""
    folder = Path(folder)
    files = [folder / name for name in FILES]
    write_json(files[0], study)
    write_text(files[1], render_markdown(study))
    write_text(files[2], render_html(study))
    return [str(f) for f in files]
