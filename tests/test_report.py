"""mr2ft.report and the ``report`` / ``compare`` commands, on run folders written by hand with mr2ft.runs."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mr2ft import metrics, report
from mr2ft.cli import app
from mr2ft.errors import UserError
from mr2ft.runs import load_run, save_class_stats, save_classes, save_predictions

# Names that break naive HTML, Markdown, CSV and matplotlib mathtext.
NAMES7 = ["<b>bold</b>", "a|b", 'quote "q", comma', "empty class", "$x^2$", "ünïcode", "plain & simple"]


def make_run(path, names, targets, preds, stats=None, seed=0):
    """Write a finished run folder: classes.json, predictions (with a top-k list), optional class stats."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    k = len(names)
    rng = np.random.default_rng(seed)
    rows = []
    for p in preds:
        others = [c for c in rng.permutation(k).tolist() if c != p]
        rows.append([p] + others[: min(5, k) - 1])
    save_classes(path, names, dataset="toy", backbone="tiny")
    save_predictions(path, torch.tensor(targets), torch.tensor(rows, dtype=torch.long), k)
    if stats is not None:
        save_class_stats(path, stats)
    return path


def synthetic(k, n_per_class, skill, seed, empty=()):
    """Targets in class order and predictions right with probability skill[c] (else a random other class)."""
    rng = np.random.default_rng(seed)
    targets, preds = [], []
    for c in range(k):
        if c in empty:
            continue
        for _ in range(n_per_class):
            targets.append(c)
            preds.append(c if rng.random() < skill[c] else int((c + 1 + rng.integers(0, k - 1)) % k))
    return targets, preds


def stats_for(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(k, generator=g) + 0.5
    return {"M": torch.ones(k), "S": s, "S2": s.clone(), "gamma": s.pow(1 / 3), "seen": torch.ones(k)}


def ref_accuracy(preds, targets, k):
    support, correct = [0] * k, [0] * k
    for p, t in zip(preds, targets, strict=True):
        support[t] += 1
        correct[t] += p == t
    return [100.0 * correct[c] / support[c] if support[c] else None for c in range(k)], support, correct


@pytest.fixture
def pair7(tmp_path):
    """A baseline and a run on 7 classes (class 3 has no test images), the run with class statistics."""
    k = 7
    targets, base_preds = synthetic(k, 20, [0.9, 0.3, 0.6, 0.5, 0.15, 0.75, 0.45], seed=1, empty=(3,))
    _, run_preds = synthetic(k, 20, [0.8, 0.5, 0.6, 0.5, 0.4, 0.9, 0.45], seed=2, empty=(3,))
    base = make_run(tmp_path / "base", NAMES7, targets, base_preds)
    run = make_run(tmp_path / "run", NAMES7, targets, run_preds, stats=stats_for(k))
    return {"k": k, "targets": targets, "base_preds": base_preds, "run_preds": run_preds, "base": base, "run": run}


# ---- build_report ----------------------------------------------------------------------------------------------


def test_build_report_figures_against_loops_with_baseline_groups(pair7):
    k, targets = pair7["k"], pair7["targets"]
    rep = report.build_report(load_run(pair7["run"]), load_run(pair7["base"]))
    run_acc, support, correct = ref_accuracy(pair7["run_preds"], targets, k)
    base_acc, _, _ = ref_accuracy(pair7["base_preds"], targets, k)

    # Groups come from the baseline's ranking (ties by index), not the run's own.
    ranked = sorted((c for c in range(k) if base_acc[c] is not None), key=lambda c: (-base_acc[c], c))
    expected_group = {c: "easy" for c in ranked[:2]} | {c: "medium" for c in ranked[2:4]}
    expected_group |= {c: "hard" for c in ranked[4:]}
    assert rep["grouping"]["source"] == "baseline"
    assert rep["grouping"]["sizes"] == {"easy": 2, "medium": 2, "hard": 2}
    assert "baseline" in rep["grouping"]["rule"] and "1 class without test images" in rep["grouping"]["rule"]
    assert rep["summary"]["grouping"] == "baseline"
    own = metrics.assign_groups([np.nan if a is None else a for a in run_acc])
    assert [metrics.GROUP_NAMES[g] if g >= 0 else None for g in own] != [expected_group.get(c) for c in range(k)], (
        "test data should group differently by the run's own accuracy"
    )

    for c, row in enumerate(rep["per_class"]):
        assert row["class"] == c and row["name"] == NAMES7[c]
        assert row["support"] == support[c] and row["correct"] == correct[c]
        assert row["group"] == expected_group.get(c)
        if support[c]:
            assert row["accuracy"] == pytest.approx(run_acc[c])
            assert row["baseline_accuracy"] == pytest.approx(base_acc[c])
            assert row["delta"] == pytest.approx(run_acc[c] - base_acc[c])
        else:
            assert row["accuracy"] is None and row["delta"] is None

    for name in ("easy", "medium", "hard"):
        members = [c for c, g in expected_group.items() if g == name]
        run_mean = sum(run_acc[c] for c in members) / len(members)
        base_mean = sum(base_acc[c] for c in members) / len(members)
        assert rep["summary"]["groups"][name]["accuracy"] == pytest.approx(run_mean)
        assert rep["baseline"]["summary"]["groups"][name]["accuracy"] == pytest.approx(base_mean)
        assert rep["deltas"][name] == pytest.approx(run_mean - base_mean)
    defined = [a for a in run_acc if a is not None]
    worst = min(range(k), key=lambda c: (run_acc[c] if run_acc[c] is not None else 1e9, c))
    assert rep["summary"]["worst_class"]["name"] == NAMES7[worst]
    assert rep["summary"]["top1"] == pytest.approx(100 * sum(correct) / len(targets))
    assert rep["summary"]["balanced_accuracy"] == pytest.approx(sum(defined) / len(defined))
    assert rep["baseline"]["same_test_set"] is True
    assert rep["num_classes"] == k and rep["num_images"] == len(targets)


def test_confused_pairs_and_correlations_against_loops(pair7):
    k, targets, preds = pair7["k"], pair7["targets"], pair7["run_preds"]
    rep = report.build_report(load_run(pair7["run"]))
    counts = {}
    for p, t in zip(preds, targets, strict=True):
        if p != t:
            counts[(t, p)] = counts.get((t, p), 0) + 1
    expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    got = [((p["true"], p["pred"]), p["count"]) for p in rep["confused_pairs"]]
    assert got == expected
    first = rep["confused_pairs"][0]
    assert first["true_name"] == NAMES7[first["true"]] and first["pred_name"] == NAMES7[first["pred"]]
    assert first["share"] == pytest.approx(100 * first["count"] / targets.count(first["true"]))

    acc, _, _ = ref_accuracy(preds, targets, k)
    spread = stats_for(k)["S"].tolist()
    pairs = [(spread[c], acc[c]) for c in range(k) if acc[c] is not None]

    def avg_ranks(values):
        return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]

    rx, ry = avg_ranks([a for a, _ in pairs]), avg_ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    rho = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert rep["correlations"]["spread_vs_accuracy"] == pytest.approx(rho)
    assert rep["per_class"][0]["spread_S"] == pytest.approx(spread[0])
    assert rep["per_class"][0]["gamma"] == pytest.approx(spread[0] ** (1 / 3), rel=1e-5)


@pytest.mark.parametrize("applied", [True, False, None])
def test_margins_not_applied_by_the_runs_loss_are_said_to_be_so(pair7, applied):
    run = load_run(pair7["run"])
    if applied is not None:
        run["info"] = {**run["info"], "margins_applied": applied}
    else:
        run["info"] = {k: v for k, v in run["info"].items() if k != "margins_applied"}  # older classes.json
    rep = report.build_report(run)
    md = report.render_markdown(rep)
    titles = {title: caption for title, caption, _ in report._plots(rep)}
    note = "did not apply these margins"
    assert (note in md) == (applied is False)
    assert (note in titles["Accuracy against margin"]) == (applied is False)


def test_report_without_baseline_groups_by_own_accuracy_and_without_stats(pair7):
    rep = report.build_report(load_run(pair7["base"]))
    assert rep["baseline"] is None and rep["deltas"] is None
    assert rep["grouping"]["source"] == "self" and rep["summary"]["grouping"] == "self"
    assert "this run's own" in rep["grouping"]["rule"]
    assert rep["correlations"]["spread_vs_accuracy"] is None
    assert all(row["spread_S"] is None and "delta" not in row for row in rep["per_class"])


def test_mismatched_baseline_is_a_user_error(tmp_path, pair7):
    other = list(NAMES7)
    other[2] = "something else"
    make_run(tmp_path / "renamed", other, pair7["targets"], pair7["base_preds"])
    with pytest.raises(UserError, match="different classes"):
        report.build_report(load_run(pair7["run"]), load_run(tmp_path / "renamed"))
    make_run(tmp_path / "fewer", NAMES7[:6], [0, 1, 2], [0, 1, 1])
    with pytest.raises(UserError, match="7 vs 6 classes"):
        report.build_report(load_run(pair7["run"]), load_run(tmp_path / "fewer"))


def test_predictions_outside_the_class_list_are_a_user_error(tmp_path):
    make_run(tmp_path / "bad", ["a", "b", "c"], [0, 1, 2], [0, 1, 2])
    save_classes(tmp_path / "bad", ["a", "b"])  # classes.json no longer matches the predictions
    with pytest.raises(UserError, match="outside 0..1"):
        report.build_report(load_run(tmp_path / "bad"))


# ---- files -----------------------------------------------------------------------------------------------------


def strict_json(text):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


def test_write_report_files_exist_and_parse(pair7):
    out = report.write_report(pair7["run"], pair7["base"])
    run = Path(pair7["run"])
    assert sorted(Path(f).name for f in out["files"]) == ["per_class.csv", "report.html", "report.json", "report.md"]
    data = strict_json((run / "report.json").read_text(encoding="utf-8"))  # NaN would make it invalid JSON
    assert data["baseline"]["path"] == str(pair7["base"])
    assert data["per_class"][1]["name"] == "a|b"

    rows = list(csv.DictReader(io.StringIO((run / "per_class.csv").read_text(encoding="utf-8"))))
    assert len(rows) == 7
    assert list(rows[0]) == [*report.CSV_COLUMNS, "baseline_accuracy", "delta"]
    assert rows[2]["name"] == 'quote "q", comma'
    assert rows[3]["accuracy"] == "" and rows[3]["support"] == "0"
    assert float(rows[0]["accuracy"]) == pytest.approx(data["per_class"][0]["accuracy"], rel=1e-5)

    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| figure | this run | baseline | change |" in md
    assert "a\\|b" in md and "\\<b\\>bold\\</b\\>" in md
    lines = md.splitlines()
    table = [line for line in lines[lines.index("## Every class") :] if line.startswith("|")]
    assert len(table) == 2 + 7
    assert {line.count("|") - line.count("\\|") for line in table} == {8}  # escaped pipes keep the columns

    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("data:image/png;base64,") == 4  # per-class, groups, spread, margin
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not fetch anything"


def test_write_report_formats_and_unknown_format(pair7):
    out = report.write_report(pair7["run"], formats="json,md")
    assert [Path(f).name for f in out["files"]] == ["report.json", "report.md"]
    assert not (Path(pair7["run"]) / "report.html").exists()
    with pytest.raises(UserError, match="unknown report format pdf"):
        report.write_report(pair7["run"], formats="json,pdf")


@pytest.mark.parametrize("k", [2, 3, 5])
def test_small_k_reports_render(tmp_path, k):
    names = [f"class {c}" for c in range(k)]
    targets, preds = synthetic(k, 15, [0.9 - 0.2 * c for c in range(k)], seed=k)
    run = make_run(tmp_path / "r", names, targets, preds, stats=stats_for(k))
    out = report.write_report(run)
    assert len(out["files"]) == 4
    if k == 2:
        assert out["grouping"]["sizes"] == {"easy": 1, "medium": 0, "hard": 1}
        assert out["summary"]["groups"]["medium"]["accuracy"] is None
        assert out["summary"]["top5"] is None


def test_thousand_class_report_builds_in_seconds(tmp_path):
    k = 1000
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(k), 20)
    skill = rng.random(k)
    preds = np.where(rng.random(targets.size) < skill[targets], targets, rng.integers(0, k, targets.size))
    names = [f"class number {c}" for c in range(k)]
    base = make_run(tmp_path / "base", names, targets.tolist(), rng.integers(0, k, targets.size).tolist())
    run = make_run(tmp_path / "run", names, targets.tolist(), preds.tolist(), stats=stats_for(k))
    start = time.perf_counter()
    report.write_report(run, base)
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0, f"1000-class report took {elapsed:.1f}s"
    page = (run / "report.html").read_text(encoding="utf-8")
    assert len(page) < 3_000_000 and page.count("<tr data-search") == k
    assert "1000 classes: see `per_class.csv`" in (run / "report.md").read_text(encoding="utf-8")


# ---- compare ---------------------------------------------------------------------------------------------------


def test_compare_runs_fixes_groups_by_baseline_and_bootstraps(tmp_path, pair7):
    same = make_run(tmp_path / "same", NAMES7, pair7["targets"], pair7["base_preds"])
    result = report.compare_runs([pair7["run"], same, pair7["base"]], baseline_dir=pair7["base"], n_boot=300)
    assert [r["name"] for r in result["rows"]] == ["base", "run", "same"]  # baseline first, listed only once
    assert result["reference"]["is_baseline"] is True and result["grouping"]["source"] == "baseline"
    ref_rep = report.build_report(load_run(pair7["run"]), load_run(pair7["base"]))
    run_row = result["rows"][1]
    for name in ("top1", "easy", "medium", "hard", "worst_class", "std"):
        assert run_row["values"][name] == pytest.approx(metrics.headline_figures(ref_rep["summary"])[name])
        assert run_row["deltas"][name] == pytest.approx(ref_rep["deltas"][name])
        lo, hi = run_row["intervals"][name]
        assert lo <= run_row["deltas"][name] <= hi or name in ("worst_class", "std")
    same_row = result["rows"][2]  # identical predictions to the baseline: zero change, zero width
    assert all(v == 0.0 for v in same_row["deltas"].values())
    assert all(lo == hi == 0.0 for lo, hi in same_row["intervals"].values())
    assert result["rows"][0]["deltas"] is None

    md = report.compare_markdown(result)
    assert md.splitlines()[0] == "| run | overall | easy | medium | hard | worst class | std |"
    assert re.search(r"\| run \| [\d.]+ \([+-][\d.]+\) \[[+-][\d.]+, [+-][\d.]+\]", md)
    assert "the baseline" in md
    rows = list(csv.DictReader(io.StringIO(report.compare_csv(result))))
    assert [r["run"] for r in rows] == ["base", "run", "same"]
    assert float(rows[1]["hard_delta"]) == pytest.approx(run_row["deltas"]["hard"], rel=1e-5)
    assert rows[0]["hard_delta"] == ""

    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(report.compare_table(result))
    text = console.export_text()
    assert "overall" in text and "reference" in text and f"({run_row['deltas']['top1']:+.1f})" in text


def test_compare_without_baseline_uses_first_run_and_says_so(pair7):
    result = report.compare_runs([pair7["base"], pair7["run"]], n_boot=50)
    assert result["reference"]["name"] == "base" and result["reference"]["is_baseline"] is False
    assert result["grouping"]["source"] == "first run"
    assert "first run (no --baseline given)" in report.compare_markdown(result)


def test_compare_refuses_different_test_sets_and_classes(tmp_path, pair7):
    shuffled = list(reversed(pair7["targets"]))
    make_run(tmp_path / "other_split", NAMES7, shuffled, pair7["base_preds"])
    with pytest.raises(UserError, match="different images"):
        report.compare_runs([pair7["base"], tmp_path / "other_split"], n_boot=10)
    make_run(tmp_path / "other_classes", [n + "!" for n in NAMES7], pair7["targets"], pair7["base_preds"])
    with pytest.raises(UserError, match="different classes"):
        report.compare_runs([pair7["base"], tmp_path / "other_classes"], n_boot=10)


# ---- CLI -------------------------------------------------------------------------------------------------------


def test_cli_report_and_compare(tmp_path, pair7):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(pair7["run"]), "--baseline", str(pair7["base"])])
    assert result.exit_code == 0, result.output
    assert "hard" in result.stdout and "wrote" in result.stdout
    assert (Path(pair7["run"]) / "report.html").is_file()

    result = runner.invoke(
        app,
        [
            "compare",
            str(pair7["run"]),
            "--baseline",
            str(pair7["base"]),
            "--out",
            str(tmp_path / "cmp"),
            "--n-boot",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "overall" in result.stdout
    assert (tmp_path / "cmp" / "compare.md").is_file() and (tmp_path / "cmp" / "compare.csv").is_file()


@pytest.mark.parametrize(
    "args",
    [
        ["report", "{missing}"],
        ["report", "{run}", "--baseline", "{missing}"],
        ["report", "{run}", "--format", "pdf"],
        ["compare", "{run}", "{empty}"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, pair7, args):
    (tmp_path / "empty").mkdir()
    values = {"missing": str(tmp_path / "nope"), "run": str(pair7["run"]), "empty": str(tmp_path / "empty")}
    result = CliRunner().invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


# ---- the HTML in a real browser --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)

# Records page errors before the report's own script runs.
_PROBE_HEAD = (
    "<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push(String(e.message))});"
    "</script>"
)
# After load: are all images decoded; does sorting by accuracy and filtering by name work; how long did it take.
_PROBE_BODY = """<script>
// A PNG can have a valid header (so a width) and still be cut short: draw it and require the bottom-right pixel
// (plots have an opaque background) to be opaque. All synchronous inside the load event, so that --dump-dom,
// which waits for it, always sees the result.
function imageOk(img){
  if(!(img.complete && img.naturalWidth > 0 && img.naturalHeight > 0)) return false;
  var c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  var ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  return ctx.getImageData(c.width - 1, c.height - 1, 1, 1).data[3] === 255;
}
window.addEventListener('load', function(){
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function(img){ return !imageOk(img); }).length;
  var table = document.getElementById('per-class'), th = table.querySelector('th[data-key=accuracy]');
  th.click();  // first click on a numeric column sorts descending
  var vals = Array.prototype.map.call(table.tBodies[0].rows, function(r){ return r.cells[th.cellIndex].dataset.v; })
    .filter(function(v){ return v !== ''; }).map(parseFloat);
  var sorted = vals.every(function(v, i){ return i === 0 || vals[i-1] >= v; });
  var box = document.getElementById('filter'); box.value = 'class 1'; box.dispatchEvent(new Event('input'));
  var shown = Array.prototype.filter.call(table.tBodies[0].rows, function(r){ return !r.hidden; }).length;
  var out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({images: imgs.length, bad: bad, sorted: sorted, shown: shown,
    errors: window.__errors, ms: Math.round(performance.now())});
  document.body.appendChild(out);
});
</script>"""


def open_in_chromium(page: Path, tmp_path: Path) -> tuple[dict, str]:
    probe = page.with_name("probe.html")
    text = page.read_text(encoding="utf-8")
    probe.write_text(text.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace("</body>", _PROBE_BODY + "</body>"))
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"chromium printed no probe result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html_unescape(match.group(1))), proc.stderr


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")
@pytest.mark.parametrize("k", [2, 1000])
def test_html_report_renders_in_headless_chromium(tmp_path, k):
    names = [f"class {c} <i>&amp;</i>" for c in range(k)]
    rng = np.random.default_rng(k)
    targets = np.repeat(np.arange(k), 30 if k < 1000 else 10)
    skill = np.linspace(0.95, 0.2, k)
    preds = np.where(rng.random(targets.size) < skill[targets], targets, rng.integers(0, k, targets.size))
    base_preds = np.where(rng.random(targets.size) < skill[targets] - 0.1, targets, rng.integers(0, k, targets.size))
    base = make_run(tmp_path / "base", names, targets.tolist(), base_preds.tolist())
    run = make_run(tmp_path / "run", names, targets.tolist(), preds.tolist(), stats=stats_for(k))
    report.write_report(run, base, formats="html")
    result, stderr = open_in_chromium(run / "report.html", tmp_path)
    assert result["images"] == 4 and result["bad"] == 0, result
    assert result["errors"] == [], result
    assert result["sorted"] is True
    expected_shown = sum(1 for n in names if "class 1" in n.lower())
    assert result["shown"] == expected_shown
    console = [line for line in stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "console output: " + "\n".join(console)
    assert result["ms"] < 15000, f"the page took {result['ms']} ms to load"
