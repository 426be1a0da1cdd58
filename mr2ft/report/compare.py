"""``mr2ft compare``: many runs on one test set in the paper's table, with paired bootstrap intervals.

:func:`compare_runs` computes the table (a JSON-safe dict); :func:`compare_table` (terminal), :func:`compare_markdown`
and :func:`compare_csv` format it; :func:`write_compare` writes ``compare.md`` and ``compare.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mr2ft import metrics
from mr2ft.config import RANGES
from mr2ft.errors import UserError
from mr2ft.io import write_text
from mr2ft.report.build import check_run, read_run
from mr2ft.report.groups import CI, check_rule, choose_groups, group_values, paired_changes
from mr2ft.report.kit import (
    PAPER_HEADERS,
    csv_text,
    excludes_zero,
    fmt_delta,
    fmt_interval,
    fmt_num,
    json_safe,
    md_escape,
)

COMPARE_MD, COMPARE_CSV = "compare.md", "compare.csv"  # written into compare's --out folder, not a run folder
MAX_N_BOOT = int(RANGES["n_boot"].high)  # the CLI's bound on --n-boot, kept in one place


def _load_runs(run_dirs: Sequence[str | Path], baseline_dir: str | Path | None) -> tuple[list[Path], list[dict]]:
    """The runs, reference first, checked to share classes and test images."""
    paths = [Path(p) for p in run_dirs]
    if baseline_dir is not None:
        baseline_path = Path(baseline_dir)
        paths = [baseline_path] + [p for p in paths if p.resolve() != baseline_path.resolve()]
    if not paths:
        raise UserError("no runs to compare; pass one or more run folders")
    runs = [read_run(p) for p in paths]
    ref = runs[0]
    check_run(ref)
    for run in runs[1:]:
        check_run(run)
        if run["class_names"] != ref["class_names"]:
            raise UserError(f"{run['path']} has different classes from {ref['path']}; compare runs on one dataset")
        if not torch.equal(run["targets"], ref["targets"]):
            raise UserError(
                f"{run['path']} was tested on different images from {ref['path']} (their saved test labels differ); "
                "a paired comparison needs runs on the same test split"
            )
    return paths, runs


def check_n_boot(n_boot: int) -> None:
    """Refuse a bootstrap size outside 1..:data:`MAX_N_BOOT`."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or not 1 <= n_boot <= MAX_N_BOOT:
        raise UserError(f"--n-boot {n_boot} is outside 1..{MAX_N_BOOT}; 1000 resamples are usually enough")


def compare_runs(
    run_dirs: Sequence[str | Path],
    baseline_dir: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: str | None = None,
) -> dict:
    """The paper's table for several runs on one test set, with paired bootstrap intervals.

    The reference run is the baseline, or the first run when no baseline is given (the result says which). Its
    per-class accuracy fixes the groups for every run, by the rule ``groups`` (see :mod:`mr2ft.report.groups`:
    ``val``, ``crossfit`` or ``test``; default val when the reference saved validation predictions, else
    crossfit). Every other run gets a change against it with a paired, class-stratified bootstrap interval
    (:func:`mr2ft.metrics.paired_bootstrap`) per figure.

    Raises:
        UserError: no runs, runs with different classes, runs tested on different images, an unusable grouping,
            or ``n_boot`` outside 1..100000.
    """
    check_n_boot(n_boot)
    check_rule(groups)
    paths, runs = _load_runs(run_dirs, baseline_dir)
    ref = runs[0]
    k = len(ref["class_names"])
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    source = "baseline" if baseline_dir is not None else "first run"
    choice = choose_groups(ref, k, groups, f"the {source}'s ({names[0]})")
    targets = ref["targets"].numpy()
    correct_ref = (ref["preds"] == ref["targets"]).numpy()
    rows = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        summary = metrics.summarize(run["preds"], run["targets"], k, topk=run["topk"], groups=choice.display)
        correct = (run["preds"] == run["targets"]).numpy()
        worst = summary["worst_class"]["index"]
        row: dict[str, Any] = {
            "name": name,
            "path": str(run["path"]),
            "is_reference": i == 0,
            "values": {**metrics.headline_figures(summary), **group_values(choice, targets, correct, k)},
            "worst_class_name": ref["class_names"][worst] if worst >= 0 else None,
            "deltas": None,
            "intervals": None,
        }
        if i > 0:
            changes = paired_changes(choice, targets, correct_ref, correct, k, n_boot, seed)
            row["deltas"] = {key: f["delta"] for key, f in changes.items()}
            row["intervals"] = {key: [f["low"], f["high"]] for key, f in changes.items()}
        rows.append(row)
    return json_safe(
        {
            "reference": {"path": str(ref["path"]), "name": names[0], "is_baseline": baseline_dir is not None},
            "num_classes": k,
            "num_images": int(targets.shape[0]),
            "grouping": choice.describe(source),
            "bootstrap": {
                "n_boot": n_boot,
                "seed": seed,
                "ci": CI,
                "method": "paired, resampling test images within each class",
            },
            "units": "percentages; changes are percentage points against the reference run",
            "rows": rows,
        }
    )


def _compare_keys(result: dict) -> list[str]:
    return ["top1", *result["grouping"]["sizes"], "worst_class", "std"]


def _change(row: dict, key: str) -> tuple[float | None, float | None, float | None]:
    """(delta, low, high) of one figure of a row; all None for the reference."""
    if row["deltas"] is None or row["deltas"].get(key) is None:
        return None, None, None
    lo, hi = row["intervals"][key]
    return row["deltas"][key], lo, hi


def _compare_cell(row: dict, key: str) -> str:
    value = fmt_num(row["values"].get(key))
    delta, lo, hi = _change(row, key)
    if delta is None:
        return value
    interval = fmt_interval(lo, hi)
    return f"{value} ({fmt_delta(delta)})" + (f" {interval}" if interval else "")


def _compare_note(result: dict) -> str:
    ref = result["reference"]
    who = "the baseline" if ref["is_baseline"] else "the first run (no --baseline given)"
    b = result["bootstrap"]
    grouping = result["grouping"]
    sizes = "/".join(str(s) for s in grouping["sizes"].values())
    text = (
        f"Reference: {who}, {ref['name']}; it fixes the groups ({sizes} classes) and every change (+x.x). "
        f"Brackets: {round(100 * b['ci'])}% paired bootstrap interval of the change "
        f"({b['n_boot']} resamples of the test images within each class); * = the interval excludes 0. "
        f"{result['num_classes']} classes, {result['num_images']} test images; accuracy in %. "
        f"Groups (--groups {grouping['method']}): {grouping['method_name']}."
    )
    if grouping.get("warning"):
        text += f" WARNING: {grouping['warning']}"
    return text


def change_color(key: str, low: float | None, high: float | None) -> str:
    """Green only when the interval shows a gain, red only when it shows a loss (lower std is a gain)."""
    if not excludes_zero(low, high):
        return "default"
    gain = high < 0 if key == "std" else low > 0
    return "green" if gain else "red"


def compare_table(result: dict) -> Any:
    """A Rich table of :func:`compare_runs`'s result (change and interval on a second line of each cell)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="mr2ft compare", caption=escape(_compare_note(result)), caption_justify="left")
    table.add_column("run", overflow="fold")
    for key in _compare_keys(result):
        table.add_column(PAPER_HEADERS.get(key, key), justify="right")
    for row in result["rows"]:
        cells = []
        for key in _compare_keys(result):
            cell = fmt_num(row["values"].get(key))
            delta, lo, hi = _change(row, key)
            if delta is not None:
                cell += f" [{change_color(key, lo, hi)}]({fmt_delta(delta)})[/]"
                if lo is not None:
                    cell += "\n" + escape(fmt_interval(lo, hi))
            cells.append(cell)
        name = escape(row["name"]) + ("\n[dim](reference)[/]" if row["is_reference"] else "")
        table.add_row(name, *cells)
    return table


def compare_markdown(result: dict) -> str:
    """``compare.md``: the paper's table in Markdown."""
    keys = _compare_keys(result)
    lines = [
        "| run | " + " | ".join(PAPER_HEADERS.get(key, key) for key in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for row in result["rows"]:
        name = md_escape(row["name"]) + (" (reference)" if row["is_reference"] else "")
        lines.append(f"| {name} | " + " | ".join(_compare_cell(row, key) for key in keys) + " |")
    return "\n".join(lines) + "\n\n" + md_escape(_compare_note(result)) + "\n"


def compare_csv(result: dict) -> str:
    """``compare.csv``: one row per run; for every figure its value, change, and interval bounds."""
    keys = list(dict.fromkeys([*_compare_keys(result)[:-2], "balanced_accuracy", "worst10", "worst_class", "std"]))
    header = ["run", "path", "is_reference", "groups", "worst_class_name"]
    for key in keys:
        header += [key, f"{key}_delta", f"{key}_low", f"{key}_high"]

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.6g}"

    out_rows = []
    for row in result["rows"]:
        method = result["grouping"]["method"]
        out = [row["name"], row["path"], int(row["is_reference"]), method, row["worst_class_name"] or ""]
        for key in keys:
            delta, lo, hi = _change(row, key)
            out += [num(row["values"].get(key)), num(delta), num(lo), num(hi)]
        out_rows.append(out)
    return csv_text(header, out_rows)


def write_compare(result: dict, out_dir: str | Path) -> list[str]:
    """Write ``compare.md`` and ``compare.csv`` into ``out_dir`` (created if needed), atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose a folder for compare.md and compare.csv")
    files = [out / COMPARE_MD, out / COMPARE_CSV]
    write_text(files[0], compare_markdown(result))
    write_text(files[1], compare_csv(result))
    return [str(f) for f in files]
