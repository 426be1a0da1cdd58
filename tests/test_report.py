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
    """The paper's protocol (--groups test): groups from the baseline's test accuracy, labelled as biased."""
    k, targets = pair7["k"], pair7["targets"]
    rep = report.build_report(load_run(pair7["run"]), load_run(pair7["base"]), groups="test")
    assert rep["grouping"]["method"] == "test" and rep["grouping"]["selection_bias"] is True
    assert "selection bias" in rep["grouping"]["rule"] and "selection bias" in rep["warnings"][-1]
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
    titles = {title: caption for title, caption, _ in report.report_plots(rep)}
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
    result = report.compare_runs(
        [pair7["run"], same, pair7["base"]], baseline_dir=pair7["base"], n_boot=300, groups="test"
    )
    assert [r["name"] for r in result["rows"]] == ["base", "run", "same"]  # baseline first, listed only once
    assert result["reference"]["is_baseline"] is True and result["grouping"]["source"] == "baseline"
    ref_rep = report.build_report(load_run(pair7["run"]), load_run(pair7["base"]), groups="test", n_boot=300)
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
        ["report", "{run}", "--groups", "test"],  # --groups without a baseline
        ["report", "{run}", "--baseline", "{base}", "--groups", "val"],  # no validation predictions saved
        ["compare", "{base}", "{run}", "--groups", "train"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, pair7, args):
    (tmp_path / "empty").mkdir()
    values = {"missing": str(tmp_path / "nope"), "run": str(pair7["run"]), "empty": str(tmp_path / "empty")}
    values["base"] = str(pair7["base"])
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


# ---- which images choose the groups (issue 13) ----------------------------------------------------------------


def loop_group_means(acc_by_class, members):
    return {g: sum(acc_by_class[c] for c in cs) / len(cs) for g, cs in members.items() if cs}


def loop_crossfit(targets, base_preds, run_preds, k):
    """Cross-fitted group means of baseline and run by plain loops: rank on one half, score on the other, average."""
    first = metrics.crossfit_halves(np.array(targets), k)  # the split itself; everything else is plain Python
    out = {"base": {}, "run": {}}
    for choose in (True, False):
        pick = [i for i in range(len(targets)) if first[i] == choose]
        score = [i for i in range(len(targets)) if first[i] != choose]
        base_acc, _, _ = ref_accuracy([base_preds[i] for i in pick], [targets[i] for i in pick], k)
        ranked = sorted((c for c in range(k) if base_acc[c] is not None), key=lambda c: (-base_acc[c], c))
        sizes = metrics.group_sizes(len(ranked))
        members = {
            "easy": ranked[: sizes[0]],
            "medium": ranked[sizes[0] : sizes[0] + sizes[1]],
            "hard": ranked[sizes[0] + sizes[1] :],
        }
        for who, preds in (("base", base_preds), ("run", run_preds)):
            acc, _, _ = ref_accuracy([preds[i] for i in score], [targets[i] for i in score], k)
            for g, v in loop_group_means(acc, members).items():
                out[who].setdefault(g, []).append(v)
    return {who: {g: sum(v) / len(v) for g, v in groups.items()} for who, groups in out.items()}


def test_default_groups_are_crossfitted_and_match_a_loop(pair7):
    k = pair7["k"]
    rep = report.build_report(load_run(pair7["run"]), load_run(pair7["base"]))
    assert rep["grouping"]["method"] == "crossfit" and rep["grouping"]["selection_bias"] is False
    assert "cross-fitted" in rep["grouping"]["rule"] and "1 class without test images" in rep["grouping"]["rule"]
    assert not any("selection bias" in w for w in rep["warnings"])
    expected = loop_crossfit(pair7["targets"], pair7["base_preds"], pair7["run_preds"], k)
    for g in ("easy", "medium", "hard"):
        assert rep["summary"]["groups"][g]["accuracy"] == pytest.approx(expected["run"][g])
        assert rep["baseline"]["summary"]["groups"][g]["accuracy"] == pytest.approx(expected["base"][g])
        assert rep["deltas"][g] == pytest.approx(expected["run"][g] - expected["base"][g])
        lo, hi = rep["intervals"][g]
        assert lo <= rep["deltas"][g] <= hi
    # Figures that do not depend on groups are those of every test image.
    run_acc, _, correct = ref_accuracy(pair7["run_preds"], pair7["targets"], k)
    assert rep["summary"]["top1"] == pytest.approx(100 * sum(correct) / len(pair7["targets"]))
    text = report.render_markdown(rep)
    assert "cross-fitted" in text and "paired bootstrap interval" in text


def test_validation_groups_when_the_baseline_saved_validation_predictions(pair7):
    k = pair7["k"]
    base = load_run(pair7["base"])
    val_targets, val_preds = synthetic(k, 10, [0.2, 0.9, 0.5, 0.5, 0.8, 0.3, 0.6], seed=5, empty=(3,))
    base["val_targets"], base["val_preds"] = torch.tensor(val_targets), torch.tensor(val_preds)
    rep = report.build_report(load_run(pair7["run"]), base)
    assert rep["grouping"]["method"] == "val" and "validation" in rep["grouping"]["rule"]
    val_acc, _, _ = ref_accuracy(val_preds, val_targets, k)
    ranked = sorted((c for c in range(k) if val_acc[c] is not None), key=lambda c: (-val_acc[c], c))
    members = {"easy": ranked[:2], "medium": ranked[2:4], "hard": ranked[4:]}
    run_acc, _, _ = ref_accuracy(pair7["run_preds"], pair7["targets"], k)
    for g, v in loop_group_means(run_acc, members).items():
        assert rep["summary"]["groups"][g]["accuracy"] == pytest.approx(v)
    assert [row["group"] for row in rep["per_class"]] == [
        next((g for g, cs in members.items() if c in cs), None) for c in range(k)
    ]
    # Asked for explicitly without validation predictions: one clear error.
    with pytest.raises(UserError, match="--groups val needs validation predictions"):
        report.build_report(load_run(pair7["run"]), load_run(pair7["base"]), groups="val")
    with pytest.raises(UserError, match="unknown --groups"):
        report.build_report(load_run(pair7["run"]), load_run(pair7["base"]), groups="train")


def simulated_pair(rng, k=30, n=40):
    """Two runs with the same per-class accuracy and independent errors: no real difference between them."""
    p = rng.uniform(0.3, 0.9, k)
    targets = np.repeat(np.arange(k), n)
    preds = []
    for _ in range(2):
        right = rng.random(targets.size) < p[targets]
        preds.append(np.where(right, targets, (targets + 1 + rng.integers(0, k - 1, targets.size)) % k))
    run = {"path": Path("sim-run"), "class_names": [f"c{c}" for c in range(k)], "stats": None, "info": {}}
    runs = []
    for pr in preds:
        t, pr_t = torch.tensor(targets), torch.tensor(pr)
        runs.append(dict(run, targets=t, preds=pr_t, topk=pr_t[:, None].repeat(1, 5)))
    return runs


def test_crossfit_removes_the_regression_to_the_mean_that_test_groups_show():
    rng = np.random.default_rng(13)
    hard = {"test": [], "crossfit": []}
    for _ in range(150):
        base, run = simulated_pair(rng)
        for rule in hard:
            rep = report.build_report(run, base, groups=rule, n_boot=1)
            hard[rule].append(rep["deltas"]["hard"])
    test, cross = np.array(hard["test"]), np.array(hard["crossfit"])
    # Groups chosen on the scored images: the baseline's unlucky classes recover for the other run.
    assert test.mean() > 2.0, test.mean()
    # Cross-fitted: centred at 0 (within 3 standard errors and well under the test-group bias).
    assert abs(cross.mean()) < 3 * cross.std() / np.sqrt(cross.size), (cross.mean(), cross.std())
    assert abs(cross.mean()) < 0.25 * test.mean()
    assert np.abs(cross).mean() < np.abs(test).mean()


def test_test_groups_are_labelled_in_every_output(tmp_path, pair7):
    out = report.write_report(pair7["run"], pair7["base"], groups="test")
    run = Path(pair7["run"])
    assert out["grouping"]["selection_bias"] is True
    assert strict_json((run / "report.json").read_text())["grouping"]["warning"].startswith("Subject to selection")
    for name in ("report.md", "report.html"):
        assert "selection bias" in (run / name).read_text(encoding="utf-8"), name
    assert "selection bias" in report.headline(out)
    result = report.compare_runs([pair7["base"], pair7["run"]], n_boot=20, groups="test")
    assert result["grouping"]["selection_bias"] is True
    assert "selection bias" in report.compare_markdown(result)
    assert set(r["groups"] for r in csv.DictReader(io.StringIO(report.compare_csv(result)))) == {"test"}
    cli = CliRunner().invoke(app, ["compare", str(pair7["base"]), str(pair7["run"]), "--groups", "test"])
    assert cli.exit_code == 0 and "selection bias" in " ".join(cli.stdout.split()), cli.output
    cli = CliRunner().invoke(app, ["report", str(pair7["run"]), "--baseline", str(pair7["base"]), "--groups", "test"])
    assert cli.exit_code == 0 and "selection bias" in cli.stdout, cli.output
    default = CliRunner().invoke(app, ["compare", str(pair7["base"]), str(pair7["run"]), "--n-boot", "20"])
    assert default.exit_code == 0 and "--groups crossfit" in " ".join(default.stdout.split()), default.output


# ---- issue 19: what a report says, and what it refuses --------------------------------------------------------


def test_per_class_csv_neutralises_formula_injection(tmp_path):
    names = ['=HYPERLINK("http://x")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "fine", "1-2"]
    k = len(names)
    targets, preds = synthetic(k, 6, [0.9, 0.1, 0.5, 0.5, 0.5, 0.5, 0.2, 0.8], seed=3)
    base_targets, base_preds = synthetic(k, 6, [0.1, 0.9, 0.5, 0.5, 0.5, 0.5, 0.8, 0.2], seed=4)
    base = make_run(tmp_path / "base", names, base_targets, base_preds)
    run = make_run(tmp_path / "run", names, targets, preds)
    report.write_report(run, base, formats="csv")
    rows = list(csv.DictReader(io.StringIO((run / "per_class.csv").read_bytes().decode("utf-8"), newline="")))
    assert [r["name"] for r in rows] == ["'" + n for n in names[:6]] + ["fine", "1-2"]
    deltas = [r["delta"] for r in rows if r["delta"].startswith("-")]
    assert deltas and all(float(d) < 0 for d in deltas), "a negative change must stay a number"
    evil = make_run(tmp_path / "=cmd", names, targets, preds)
    result = report.compare_runs([base, evil], n_boot=10)
    assert [r["run"] for r in csv.DictReader(io.StringIO(report.compare_csv(result)))] == ["base", "'=cmd"]


def _fake_result(delta, low, high):
    fig = {"top1": 50.0, "easy": 80.0, "medium": 50.0, "hard": 20.0, "worst_class": 5.0, "std": 10.0}
    row = {"name": "run", "path": "run", "is_reference": False, "values": fig, "worst_class_name": "c0"}
    row["deltas"] = {key: delta for key in fig}
    row["intervals"] = {key: [low, high] for key in fig}
    ref = dict(row, name="ref", is_reference=True, deltas=None, intervals=None)
    return {
        "reference": {"path": "ref", "name": "ref", "is_baseline": True},
        "num_classes": 3,
        "num_images": 30,
        "grouping": {"method": "crossfit", "method_name": "cross-fitted", "warning": None,
                     "sizes": {"easy": 1, "medium": 1, "hard": 1}},
        "bootstrap": {"n_boot": 10, "seed": 0, "ci": 0.95},
        "rows": [ref, row],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("delta", "low", "high", "top1_color", "std_color", "star"),
    [
        (1.5, 0.5, 2.5, "green", "red", True),  # interval above 0: a gain (a loss for std, where lower is better)
        (1.5, -0.5, 3.5, "default", "default", False),  # positive change, interval across 0: not coloured
        (-1.5, -2.5, -0.5, "red", "green", True),
        (-1.5, -3.5, 0.5, "default", "default", False),
    ],
)
def test_compare_terminal_marks_and_colours_by_interval(delta, low, high, top1_color, std_color, star):
    table = report.compare_table(_fake_result(delta, low, high))
    headers = [str(c.header) for c in table.columns]
    cells = {h: list(c._cells) for h, c in zip(headers, table.columns, strict=True)}
    top1, std = cells["overall"][1], cells["std"][1]
    assert f"[{top1_color}]" in top1 and f"[{std_color}]" in std, (top1, std)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert ("]*" in text) == star
    assert "* = the interval excludes 0" in " ".join(text.split())


def with_header(path, loss="mr2", mode="probe", epochs=30, records=None):
    """Give a test run the facts a real run records: loss and mode in classes.json, epochs, metrics.jsonl."""
    from mr2ft.io import read_json, write_json

    info = read_json(path / "classes.json")
    write_json(path / "classes.json", {**info, "loss": loss, "mode": mode})
    (path / "config.yaml").write_text(f"command: {mode}\nloss: {loss}\nepochs: {epochs}\n")
    if records is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_pages_name_loss_mode_epochs_and_show_intervals(pair7):
    with_header(Path(pair7["run"]))
    out = report.write_report(pair7["run"], pair7["base"])
    run = Path(pair7["run"])
    facts = "loss mr2, probe, 30 epochs"
    assert out["run"]["mode"] == "probe" and out["run"]["epochs"] == 30
    md = (run / "report.md").read_text(encoding="utf-8")
    page = (run / "report.html").read_text(encoding="utf-8")
    assert facts in md and facts in page and facts in report.headline(out)
    assert re.search(r"\| [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\]\*? \|", md), "changes need their intervals"
    assert re.search(r"\([+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\]\*?\)", report.headline(out))
    assert "paired bootstrap interval" in page


@pytest.mark.parametrize(("share", "warned"), [(1e-4, True), (0.05, False)])
def test_inactive_representation_margin_is_warned_about(pair7, share, warned):
    records = [{"epoch": e, "train_rep_grad_share": share} for e in (1, 2)] + [{"final": True, "epoch": 2}]
    with_header(Path(pair7["run"]), mode="finetune", epochs=5, records=records)
    out = report.write_report(pair7["run"], formats="md,html")
    assert out["run"]["rep_grad_share"] == pytest.approx(share) and out["run"]["epochs"] == 2
    note = "MR2's representation margin was inactive in this run"
    for name in ("report.md", "report.html"):
        assert (note in html_unescape((Path(pair7["run"]) / name).read_text(encoding="utf-8"))) == warned
    assert (note in report.headline(out)) == warned


@pytest.mark.parametrize("sign", [-1, 1])
def test_plot_captions_follow_the_data(tmp_path, sign):
    k = 9
    skill = [0.95 - 0.1 * c for c in range(k)]
    targets, preds = synthetic(k, 20, skill, seed=7)
    acc, _, _ = ref_accuracy(preds, targets, k)
    spread = torch.tensor([100.0 - sign * a for a in acc])  # sign -1: spread grows with accuracy
    stats = {"M": torch.ones(k), "S": spread, "S2": spread.clone(), "gamma": spread.sqrt(), "seen": torch.ones(k)}
    run = make_run(tmp_path / "r", [f"c{c}" for c in range(k)], targets, preds, stats=stats)
    rep = report.build_report(load_run(run))
    assert (rep["correlations"]["spread_vs_accuracy"] < 0) == (sign == 1)
    captions = {title: caption for title, caption, _ in report.report_plots(rep)}
    spread_caption = captions["Accuracy against feature spread"]
    if sign == 1:
        assert spread_caption.startswith("As expected, harder classes have more spread-out features")
    else:
        assert spread_caption.startswith("Opposite to the expectation") and "As expected" not in spread_caption


def damage(path, what):
    if what == "classes-not-json":
        (path / "classes.json").write_text("{ not json")
    elif what == "classes-a-list":
        (path / "classes.json").write_text("[1, 2, 3]")
    elif what == "classes-no-names":
        (path / "classes.json").write_text('{"dataset": "toy"}')
    elif what == "names-not-strings":
        (path / "classes.json").write_text('{"class_names": [1, 2, 3, 4, 5, 6, 7]}')
    elif what == "stats-truncated":
        data = (path / "class_stats.safetensors").read_bytes()
        (path / "class_stats.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "stats-garbage":
        (path / "class_stats.safetensors").write_bytes(b"\x00\x01garbage")
    elif what == "predictions-missing-key":
        from mr2ft.io import save_tensors

        save_tensors(path / "predictions.safetensors", {"preds": torch.zeros(3, dtype=torch.long)})


DAMAGES = [
    "classes-not-json",
    "classes-a-list",
    "classes-no-names",
    "names-not-strings",
    "stats-truncated",
    "stats-garbage",
    "predictions-missing-key",
]


@pytest.mark.parametrize("what", DAMAGES)
@pytest.mark.parametrize("command", ["report", "compare"])
def test_damaged_run_files_are_one_error_line(tmp_path, pair7, what, command):
    bad = Path(pair7["run"])
    damage(bad, what)
    args = ["report", str(bad)] if command == "report" else ["compare", str(pair7["base"]), str(bad)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(bad) in lines[0] or bad.name in lines[0]


def test_two_classes_and_a_class_without_test_images_report_and_compare(tmp_path):
    runner = CliRunner()
    targets, preds = synthetic(2, 20, [0.9, 0.6], seed=1)
    _, base_preds = synthetic(2, 20, [0.8, 0.5], seed=2)
    two = make_run(tmp_path / "two", ["cat", "dog"], targets, preds, stats=stats_for(2))
    two_base = make_run(tmp_path / "two_base", ["cat", "dog"], targets, base_preds)
    t4, p4 = synthetic(4, 12, [0.9, 0.6, 0.5, 0.4], seed=3, empty=(2,))
    _, b4 = synthetic(4, 12, [0.8, 0.5, 0.5, 0.6], seed=4, empty=(2,))
    gap = make_run(tmp_path / "gap", ["a", "b", "none", "d"], t4, p4, stats=stats_for(4))
    gap_base = make_run(tmp_path / "gap_base", ["a", "b", "none", "d"], t4, b4)
    for run, base in ((two, two_base), (gap, gap_base)):
        for rule in ("crossfit", "test"):
            result = runner.invoke(app, ["report", str(run), "--baseline", str(base), "--groups", rule])
            assert result.exit_code == 0, result.output
            result = runner.invoke(app, ["compare", str(base), str(run), "--n-boot", "30", "--groups", rule])
            assert result.exit_code == 0, result.output
    rep = strict_json((two / "report.json").read_text())
    assert rep["grouping"]["sizes"]["medium"] == 0 and rep["summary"]["groups"]["medium"]["accuracy"] is None
    rep = strict_json((gap / "report.json").read_text())
    assert rep["per_class"][2]["support"] == 0 and rep["per_class"][2]["group"] is None


@pytest.mark.parametrize("n_boot", ["0", "-5", "100001", "1e9", "many"])
def test_compare_n_boot_is_bounded(pair7, n_boot):
    result = CliRunner().invoke(app, ["compare", str(pair7["base"]), str(pair7["run"]), "--n-boot", n_boot])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "n-boot" in lines[0], result.stderr


def test_compare_runs_refuses_n_boot_out_of_range(pair7):
    for n_boot in (0, report.MAX_N_BOOT + 1):
        with pytest.raises(UserError, match="--n-boot"):
            report.compare_runs([pair7["base"], pair7["run"]], n_boot=n_boot)


def test_validation_predictions_saved_in_the_run_folder_are_read(tmp_path, pair7, monkeypatch):
    """A run folder with validation predictions (the file named by runs.VAL_PREDICTIONS) groups by them."""
    from mr2ft import runs
    from mr2ft.io import save_tensors
    from mr2ft.report.build import read_run

    name = getattr(runs, "VAL_PREDICTIONS", "val_predictions.safetensors")
    monkeypatch.setattr(runs, "VAL_PREDICTIONS", name, raising=False)
    val_targets, val_preds = synthetic(pair7["k"], 10, [0.2, 0.9, 0.5, 0.5, 0.8, 0.3, 0.6], seed=5, empty=(3,))
    tensors = {"targets": torch.tensor(val_targets), "preds": torch.tensor(val_preds)}
    save_tensors(Path(pair7["base"]) / runs.VAL_PREDICTIONS, tensors)
    base = read_run(pair7["base"])
    assert torch.equal(base["val_targets"], tensors["targets"]) and torch.equal(base["val_preds"], tensors["preds"])
    out = report.write_report(pair7["run"], pair7["base"], formats="json")
    assert out["grouping"]["method"] == "val"
    result = report.compare_runs([pair7["base"], pair7["run"]], n_boot=20)
    assert result["grouping"]["method"] == "val"


def test_baseline_on_other_test_images_has_no_intervals_and_says_its_groups_are_biased(tmp_path, pair7):
    targets, preds = synthetic(7, 12, [0.9, 0.3, 0.6, 0.5, 0.15, 0.75, 0.45], seed=9, empty=(3,))
    other = make_run(tmp_path / "other", NAMES7, targets, preds)
    rep = report.build_report(load_run(pair7["run"]), load_run(other))
    assert rep["baseline"]["same_test_set"] is False and rep["intervals"] is None
    assert rep["grouping"]["method"] == "test" and "tested on other images" in rep["grouping"]["warning"]
    assert "cannot be paired" in report.render_markdown(rep)
    with pytest.raises(UserError, match="--groups crossfit needs runs tested on the same images"):
        report.build_report(load_run(pair7["run"]), load_run(other), groups="crossfit")
