"""Per-class reports a person reads, and the paper's table across runs.

``write_report`` turns a finished run folder (see :mod:`mr2ft.runs`) into ``report.json`` (every figure),
``per_class.csv``, ``report.md`` and ``report.html`` (one self-contained page: plots embedded as PNG, a sortable
per-class table, no network). ``compare_runs`` puts many runs on one test set into the paper's table with paired
bootstrap intervals. All accuracy figures are percentages (0-100); groups follow :mod:`mr2ft.metrics`.

Modules: :mod:`~mr2ft.report.build` (run folder to report dict), :mod:`~mr2ft.report.render` (terminal, CSV,
Markdown, writing the files), :mod:`~mr2ft.report.page` (HTML), :mod:`~mr2ft.report.plots`,
:mod:`~mr2ft.report.compare`, :mod:`~mr2ft.report.groups` (which images choose the easy/medium/hard groups of a
comparison: ``--groups val|crossfit|test``), and :mod:`~mr2ft.report.kit`, the page kit ``mr2ft study`` shares.
"""

from __future__ import annotations

from mr2ft.report.build import build_report, check_run, read_run
from mr2ft.report.compare import (
    MAX_N_BOOT,
    compare_csv,
    compare_markdown,
    compare_runs,
    compare_table,
    write_compare,
)
from mr2ft.report.groups import GROUP_RULES
from mr2ft.report.kit import (
    FIGURE_LABELS,
    GROUP_COLORS,
    PAGE_CSS,
    PAPER_FIGURES,
    PAPER_HEADERS,
    class_stat,
    csv_cell,
    json_safe,
    md_escape,
    plot_label,
    png_base64,
)
from mr2ft.report.page import render_html
from mr2ft.report.plots import report_plots
from mr2ft.report.render import (
    CSV_COLUMNS,
    FILES,
    FORMATS,
    headline,
    parse_formats,
    render_csv,
    render_markdown,
    write_report,
)

COMPARE_FIGURES = PAPER_FIGURES
COMPARE_HEADERS = PAPER_HEADERS

__all__ = [
    "COMPARE_FIGURES",
    "COMPARE_HEADERS",
    "CSV_COLUMNS",
    "FIGURE_LABELS",
    "FILES",
    "FORMATS",
    "GROUP_COLORS",
    "GROUP_RULES",
    "MAX_N_BOOT",
    "PAGE_CSS",
    "PAPER_FIGURES",
    "PAPER_HEADERS",
    "build_report",
    "check_run",
    "class_stat",
    "compare_csv",
    "compare_markdown",
    "compare_runs",
    "compare_table",
    "csv_cell",
    "headline",
    "json_safe",
    "md_escape",
    "parse_formats",
    "plot_label",
    "png_base64",
    "read_run",
    "render_csv",
    "render_html",
    "render_markdown",
    "report_plots",
    "write_compare",
    "write_report",
]
