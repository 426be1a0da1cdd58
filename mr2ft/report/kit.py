"""The page kit shared by ``mr2ft report``, ``compare`` and ``study``: one copy of every small rendering helper.

What lives here: JSON cleaning (:func:`json_safe`), reading a run's class statistics (:func:`class_stat`), number
formats (:func:`fmt_num`, :func:`fmt_delta`, :func:`fmt_sig`, :func:`fmt_interval`), escaping for Markdown, HTML
and spreadsheets (:func:`md_escape`, :func:`esc`, :func:`csv_cell`), the page's CSS and head, embedded PNG plots
(:func:`png_base64`, :func:`plot_label`, :func:`html_figure`), the group colours and the paper table's columns.
Nothing here knows what a report or a study contains.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

GROUP_COLORS = {"easy": "#2a9d58", "medium": "#e0a526", "hard": "#d1495b", None: "#9a9a9a"}
# The paper's table: overall, easy, medium, hard, worst class, std (report, compare and study all show it).
PAPER_FIGURES = ("top1", "easy", "medium", "hard", "worst_class", "std")
PAPER_HEADERS = {"top1": "overall", "worst_class": "worst class", "std": "std"}
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
# Spreadsheets run a cell that starts with one of these as a formula (OWASP, "CSV injection").
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


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


def nan_float(x: float | None) -> float:
    """None (a JSON-safe missing value) back to NaN, for numpy."""
    return float("nan") if x is None else float(x)


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


# ---- numbers -----------------------------------------------------------------------------------------------------


def fmt_num(x: float | None, digits: int = 1) -> str:
    """``12.3``; ``-`` when missing."""
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_delta(x: float | None, digits: int = 1, missing: str = "") -> str:
    """A signed change, ``+1.2``; ``missing`` when there is none."""
    return missing if x is None else f"{x:+.{digits}f}"


def fmt_sig(x: float | None) -> str:
    """Three significant digits (class statistics); ``-`` when missing."""
    return "-" if x is None else f"{x:.3g}"


def excludes_zero(low: float | None, high: float | None) -> bool:
    """Whether an interval lies entirely above or entirely below 0."""
    return low is not None and high is not None and (low > 0 or high < 0)


def fmt_interval(low: float | None, high: float | None, star: bool = True) -> str:
    """``[-0.4, +1.8]``, with ``*`` when it excludes 0 (and ``star``); empty when there is no interval."""
    if low is None or high is None:
        return ""
    return f"[{fmt_delta(low)}, {fmt_delta(high)}]" + ("*" if star and excludes_zero(low, high) else "")


# ---- escaping ----------------------------------------------------------------------------------------------------


def md_escape(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    # Class names are text: keep a name like "<b>" from becoming inline HTML in rendered Markdown.
    return text.replace("<", "\\<").replace(">", "\\>")


def esc(x: object) -> str:
    """Text safe in HTML content and in a quoted attribute."""
    return html.escape(str(x), quote=True)


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string starting with ``= + - @`` TAB or CR gets a leading ``'``.

    Numbers, also written as text (``-1.5``, ``+2e-3``), are left alone so a negative change stays a number;
    any other text such as a class name is neutralised, as OWASP recommends against formula injection.
    """
    if isinstance(value, str) and value.startswith(CSV_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A whole CSV file, every text cell passed through :func:`csv_cell`.

    Lines end in CRLF as RFC 4180 says: with a bare ``\\n`` terminator the csv module would leave a cell holding a
    lone CR unquoted, and that cell would split its row in any reader.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return buf.getvalue()


# ---- pages and plots ---------------------------------------------------------------------------------------------

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
.g-hard{color:#d1495b}input[type=search]{font:inherit;padding:.2em .4em;width:18em}.warn{color:#b00020}
"""


def html_head(title: str, extra_css: str = "") -> list[str]:
    """The opening lines of a self-contained page up to and including its ``<h1>``."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{PAGE_CSS}{extra_css}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]


def html_figure(title: str, caption: str, png: str) -> str:
    """One embedded plot with its caption (``png`` from :func:`png_base64`)."""
    return (
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{png}">'
        f"<figcaption><b>{esc(title)}.</b> {esc(caption)}</figcaption></figure>"
    )


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


def correlation_words(rho: float | None, what: str, expected: str) -> str:
    """What a plotted rank correlation with accuracy shows, in words that follow the data.

    Args:
        rho: Spearman correlation of ``what`` with per-class accuracy (None or NaN: not measurable).
        what: the per-class quantity, e.g. "feature spread S".
        expected: what the method expects, as a clause without a final period (e.g. "harder classes have more
            spread-out features"); it expects a negative correlation. Stated as a finding only when the data agrees.
    """
    if rho is None or math.isnan(rho):
        return f"The rank correlation of {what} with accuracy could not be measured (expected: {expected})."
    if abs(rho) < 0.1:
        return f"No clear relation between {what} and accuracy here (Spearman {rho:+.2f}; expected: {expected})."
    if rho < 0:
        return f"As expected, {expected} (Spearman {rho:+.2f})."
    return (
        f"Opposite to the expectation: classes with larger {what} are the more accurate ones here "
        f"(Spearman {rho:+.2f}; expected: {expected})."
    )
