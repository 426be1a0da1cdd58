"""``report.html``: one self-contained page per run (inline CSS and JS, plots as base64 PNG, nothing fetched).

The page has the summary table, the plots of :mod:`mr2ft.report.plots`, the most confused pairs, and a per-class
table that sorts by any column and filters by name or group in the browser.
"""

from __future__ import annotations

from mr2ft.report.kit import esc, excludes_zero, fmt_delta, fmt_interval, fmt_num, html_figure, html_head
from mr2ft.report.plots import report_plots
from mr2ft.report.render import grouping_label, headline_rows, interval_note, run_line

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


def cell_num(
    x: float | int | None,
    delta: bool = False,
    digits: int = 1,
    lower_is_better: bool = False,
    interval: list | None = None,
) -> str:
    """A right-aligned table cell that sorts by its value.

    A change is coloured by sign (``up``/``down``); with an ``interval`` it shows it, and is coloured only when the
    interval excludes 0.
    """
    if x is None:
        return '<td class="n" data-v="">-</td>'
    text = fmt_delta(x, digits) if delta else (str(x) if isinstance(x, int) else fmt_num(x, digits))
    gain = -x if lower_is_better else x
    if interval is not None:
        low, high = interval
        text += f' <span class="meta">{esc(fmt_interval(low, high))}</span>' if low is not None else ""
        gain = gain if excludes_zero(low, high) else 0
    cls = "n" + ((" up" if gain > 0 else " down" if gain < 0 else "") if delta else "")
    return f'<td class="{cls}" data-v="{x!r}">{text}</td>'


def _intro(report: dict) -> list[str]:
    r = report["run"]
    base = report["baseline"]
    facts = [f"run <code>{esc(r['path'])}</code>"]
    facts += [f"{key} <b>{esc(r[key])}</b>" for key in ("dataset", "backbone") if r.get(key)]
    facts += [f"{report['num_classes']} classes", f"{report['num_images']} test images"]
    parts = [f'<p class="meta">{", ".join(facts)}.<br>Run: <b>{esc(run_line(report))}</b>.<br>']
    if base:
        note = "" if base["same_test_set"] else " (tested on other images)"
        parts.append(f"Baseline <code>{esc(base['path'])}</code>{note}: it fixes the groups and every change.</p>")
    else:
        parts.append("No baseline: the groups come from this run's own per-class accuracy.</p>")
    parts += [f'<p class="warn"><b>Warning:</b> {esc(w)}</p>' for w in report.get("warnings", [])]
    return parts


def _summary(report: dict) -> list[str]:
    base = report["baseline"]
    parts = [f'<h2>Summary</h2><p class="meta">{esc(report["units"].capitalize())}.</p><table>']
    parts.append(
        '<tr><th>figure</th><th class="n">this run</th>'
        + ('<th class="n">baseline</th><th class="n">change</th>' if base else "")
        + "</tr>"
    )
    intervals = report.get("intervals") or {}
    for key, label, value, bvalue, delta in headline_rows(report):
        cells = f"<tr><td>{esc(label)}</td>{cell_num(value)}"
        if base:
            # A wider spread of per-class accuracy is the disparity MR2 aims to shrink: lower std is better.
            better_low = key == "std"
            cells += cell_num(bvalue) + cell_num(delta, True, lower_is_better=better_low, interval=intervals.get(key))
        parts.append(cells + "</tr>")
    parts.append("</table>")
    if base:
        parts.append(f'<p class="meta">{esc(interval_note(report))}</p>')
    grouping = report["grouping"]
    parts.append(f"<p><b>Grouping ({esc(grouping_label(grouping))}).</b> {esc(grouping['rule'])}</p>")
    return parts


def _confusions(report: dict) -> list[str]:
    parts = ["<h2>Most confused pairs</h2>"]
    if not report["confused_pairs"]:
        return parts + ["<p>No test image was confused.</p>"]
    parts.append(
        '<table id="confused"><tr><th>true class</th><th>predicted as</th><th class="n">images</th>'
        '<th class="n">share of true class (%)</th></tr>'
    )
    for p in report["confused_pairs"]:
        parts.append(
            f"<tr><td>{esc(p['true_name'])}</td><td>{esc(p['pred_name'])}</td>{cell_num(p['count'])}"
            f"{cell_num(p['share'])}</tr>"
        )
    return parts + ["</table>"]


def _class_table(report: dict) -> list[str]:
    k = len(report["per_class"])
    parts = [
        "<h2>Per-class results</h2>",
        f'<p><input type="search" id="filter" placeholder="filter by class name or group" '
        f'aria-label="filter classes"> <span id="shown" class="meta">{k} of {k} classes shown</span> '
        '<span class="meta">· click a column to sort</span></p>',
    ]
    columns = [
        ("class", "#", "num"),
        ("name", "class", "text"),
        ("group", "group", "text"),
        ("support", "images", "num"),
        ("correct", "correct", "num"),
        ("accuracy", "accuracy", "num"),
        ("precision", "precision", "num"),
    ]
    if report["baseline"]:
        columns += [("baseline_accuracy", "baseline", "num"), ("delta", "change", "num")]
    columns += [("spread_S", "spread S", "num"), ("gamma", "margin γ", "num")]
    heads = "".join(
        f'<th data-type="{t}" data-key="{key}"{" class=n" if t == "num" else ""}>{esc(label)}</th>'
        for key, label, t in columns
    )
    parts.append(f'<div class="scroll"><table id="per-class"><thead><tr>{heads}</tr></thead><tbody>')
    for row in report["per_class"]:
        search = f"{row['name']} {row['group'] or ''}".lower()
        cells = []
        for key, _, t in columns:
            v = row[key]
            if t == "text":
                cls = f' class="g-{esc(v)}"' if key == "group" and v else ""
                cells.append(f"<td{cls}>{esc(v if v is not None else '-')}</td>")
            elif key in ("spread_S", "gamma"):
                cells.append(cell_num(v, digits=3))
            else:
                cells.append(cell_num(v, delta=key == "delta"))
        parts.append(f'<tr data-search="{esc(search)}">{"".join(cells)}</tr>')
    parts.append("</tbody></table></div>")
    return parts


def render_html(report: dict) -> str:
    """``report.html``: one self-contained page (inline CSS, JS and base64 PNG plots; nothing fetched)."""
    parts = html_head(f"mr2ft report: {report['run']['name']}")
    parts += _intro(report)
    parts += _summary(report)
    parts.append("<h2>Plots</h2>")
    parts += [html_figure(title, caption, data) for title, caption, data in report_plots(report)]
    if not any(row["spread_S"] is not None or row["gamma"] is not None for row in report["per_class"]):
        parts.append('<p class="meta">This run saved no class statistics, so there are no spread or margin plots.</p>')
    parts += _confusions(report)
    parts += _class_table(report)
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"
