"""``mr2ft study``: the analysis on hand-made predictions, and the whole study on a tiny backbone and image folder."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from mr2ft import study
from mr2ft.cli import app
from mr2ft.config import StudyConfig, build_config
from mr2ft.errors import UserError
from mr2ft.io import load_tensors
from tests._images import make_image_folder

runner = CliRunner()

K = 4
TINY = ["--backbone", "timm", "--model", "test_resnet", "--weights", "none"]
# Full-batch fits (batch >= train size): one step per epoch keeps 30 fits per study fast on two cores.
FAST = ["--epochs", "6", "--lr", "0.05", "--batch-size", "64", "--num-workers", "0", "--extract-batch-size", "32"]
GRIDS = ["--wd-grid", "0,0.001", "--cbar-grid", "0.5,2", "--n-boot", "200"]


# ---- hand-made predictions ---------------------------------------------------------------------------------------


def fixed_accuracy_preds(targets: np.ndarray, acc: list[float], k: int, rng: np.random.Generator) -> np.ndarray:
    """Predictions right on exactly round(acc[c] * n_c) images of class c (which ones is random), wrong elsewhere."""
    preds = (targets + 1) % k
    for c in range(k):
        idx = np.flatnonzero(targets == c)
        right = rng.choice(idx, size=int(round(acc[c] * len(idx))), replace=False)
        preds[right] = c
    return preds


def flip(preds: np.ndarray, targets: np.ndarray, classes: list[int], n: int, to_right: bool) -> np.ndarray:
    """Make the first ``n`` wrong (or right) images of each class right (or wrong)."""
    out = preds.copy()
    for c in classes:
        idx = np.flatnonzero((targets == c) & ((preds != targets) if to_right else (preds == targets)))[:n]
        out[idx] = c if to_right else (c + 1) % int(targets.max() + 1)
    return out


@pytest.fixture()
def erm():
    """6 classes x 100 test images; two ERM seeds with per-class accuracy 95/90/80/70/50/40 (hard: classes 4, 5)."""
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(6), 100)
    acc = [0.95, 0.9, 0.8, 0.7, 0.5, 0.4]
    return targets, [fixed_accuracy_preds(targets, acc, 6, rng) for _ in range(2)]


def test_identical_predictions_give_zero_deltas_and_a_no_effect_verdict(erm):
    targets, seeds = erm
    one = study.analyze(targets, {m: seeds[:1] for m in study.METHODS}, 6, n_boot=300, seed=1)
    for comp in one["comparisons"].values():
        for name, f in comp["figures"].items():
            assert f["delta"] == 0.0 and f["low"] == 0.0 and f["high"] == 0.0, name
    v = one["verdict"]
    assert v["kind"] == "no distinguishable effect" and v["vs_erm"] == "no distinguishable difference"
    assert "changed hard-class accuracy by +0.0 points [+0.0, +0.0] beyond the matched control" in v["text"]
    assert "no effect distinguishable from noise" in v["text"]
    assert one["grouping"]["class_groups"] == [0, 0, 1, 1, 2, 2]
    # Two seeds: each replicate draws a seed of each method independently, so the interval widens by the seeds'
    # spread but stays around a zero change.
    two = study.analyze(targets, {m: seeds for m in study.METHODS}, 6, n_boot=300, seed=1)
    for comp in two["comparisons"].values():
        for name, f in comp["figures"].items():
            assert f["delta"] == 0.0 and f["low"] <= 0.0 <= f["high"], name
    assert two["comparisons"][study.ATTRIBUTION]["figures"]["hard"]["high"] > 0
    assert two["verdict"]["kind"] == "no distinguishable effect"
    assert two["table"]["mr2"]["values"] == two["table"]["ce"]["values"]


def test_a_known_gain_on_the_hard_classes_is_measured_covered_and_called_a_help(erm):
    targets, seeds = erm
    # MR2 = the control + 20 more right images in each hard class (of 100), in every seed: +20 points on "hard".
    mr2 = [flip(p, targets, [4, 5], 20, to_right=True) for p in seeds]
    result = study.analyze(targets, {"ce": seeds, "uniform": seeds, "mr2": mr2}, 6, n_boot=500, seed=0)
    attr = result["comparisons"][study.ATTRIBUTION]["figures"]
    assert attr["hard"]["delta"] == pytest.approx(20.0)
    assert 0 < attr["hard"]["low"] <= 20.0 <= attr["hard"]["high"]
    assert attr["top1"]["delta"] == pytest.approx(40 / 6)
    assert attr["easy"]["delta"] == 0.0 and attr["medium"]["delta"] == 0.0
    assert result["comparisons"]["mr2_vs_ce"]["figures"]["hard"]["delta"] == pytest.approx(20.0)
    assert result["table"]["mr2"]["values"]["hard"] == pytest.approx(result["table"]["ce"]["values"]["hard"] + 20)
    v = result["verdict"]
    assert (v["kind"], v["vs_erm"]) == ("helps", "better")
    assert "by +20.0 points [" in v["text"] and "MR2 beat ERM on the hard classes" in v["text"]


def test_a_loss_on_the_hard_classes_is_called_a_hurt(erm):
    targets, seeds = erm
    mr2 = [flip(p, targets, [4, 5], 25, to_right=False) for p in seeds]
    v = study.analyze(targets, {"ce": seeds, "uniform": seeds, "mr2": mr2}, 6, n_boot=300)["verdict"]
    assert (v["kind"], v["vs_erm"]) == ("hurts", "worse")
    assert "-25.0 points" in v["text"] and "MR2 did worse than ERM" in v["text"]


def test_a_gain_the_control_also_gets_is_credited_to_the_shared_margin(erm):
    targets, seeds = erm
    better = [flip(p, targets, [4, 5], 20, to_right=True) for p in seeds]
    v = study.analyze(targets, {"ce": seeds, "uniform": better, "mr2": better}, 6, n_boot=300)["verdict"]
    assert (v["kind"], v["vs_erm"], v["control_vs_erm"]) == ("no distinguishable effect", "better", "better")
    assert "not from making it depend on the class" in v["text"]


def test_intervals_cover_the_true_difference_at_about_the_nominal_rate():
    """Repeated test sets drawn from known per-class accuracies: the 95% interval of MR2 - control holds the true
    change in overall accuracy in roughly 95% of them (a swapped a/b or unpaired seeds would break this)."""
    k, n, reps = 5, 40, 80
    p_control = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    p_mr2 = p_control + np.array([0.0, 0.0, 0.05, 0.1, 0.1])
    truth = 100 * float(np.mean(p_mr2 - p_control))
    targets = np.repeat(np.arange(k), n)
    rng = np.random.default_rng(0)

    def draw(p: np.ndarray) -> np.ndarray:
        return np.where(rng.random(targets.shape) < p[targets], targets, (targets + 1) % k)

    covered, deltas = 0, []
    for _ in range(reps):
        preds = {"ce": [draw(p_control)], "uniform": [draw(p_control), draw(p_control)]}
        preds["mr2"] = [draw(p_mr2), draw(p_mr2)]
        f = study.analyze(targets, preds, k, n_boot=300, seed=1)["comparisons"][study.ATTRIBUTION]["figures"]["top1"]
        covered += f["low"] <= truth <= f["high"]
        deltas.append(f["delta"])
    assert 0.85 <= covered / reps <= 1.0
    assert abs(np.mean(deltas) - truth) < 1.5  # the point estimate is unbiased, and its sign is b - a


def test_diagnostics_warn_when_spread_or_margins_point_the_wrong_way():
    acc = [90.0, 80.0, 70.0, 60.0]
    good = study.diagnostics(acc, spread=[1.0, 2.0, 3.0, 4.0], gamma=[0.8, 0.9, 1.1, 1.2])
    assert good["spread_vs_accuracy"] == pytest.approx(-1.0) and good["gamma_vs_accuracy"] == pytest.approx(-1.0)
    assert good["warnings"] == []
    bad = study.diagnostics(acc, spread=[4.0, 3.0, 2.0, 1.0], gamma=[1.2, 1.1, 1.0, 0.7])
    assert bad["spread_vs_accuracy"] == pytest.approx(1.0)
    assert any("premise fails" in w for w in bad["warnings"])
    assert any("point the wrong way" in w for w in bad["warnings"])
    flat = study.diagnostics(acc, spread=[1.0, 2.0, 3.0, 4.0], gamma=[1.0] * 4)
    assert flat["gamma_vs_accuracy"] is None and any("equal for every class" in w for w in flat["warnings"])


def test_bad_study_settings_are_refused_before_any_work(tmp_path):
    for overrides, needle in (
        ({"seeds": 0}, "--seeds"),
        ({"n_boot": 0}, "--n-boot"),
        ({"mode": "both"}, "--mode"),
        ({"cbar_grid": ()}, "--cbar-grid"),
        ({"dataset": ""}, "--dataset"),
    ):
        cfg = build_config(StudyConfig, None, **{"dataset": "x", "out": str(tmp_path / "s"), **overrides})
        with pytest.raises(UserError, match=re.escape(needle)):
            study.run_study(cfg, console=Console(quiet=True))
        assert not (tmp_path / "s").exists()


# ---- the whole study on a tiny backbone ----------------------------------------------------------------------------


def relabel_test_split(src: Path, dst: Path, k: int) -> Path:
    """A copy of an image folder whose test images of class c are filed under class (c + 1) mod K."""
    shutil.copytree(src / "train", dst / "train")
    for c in range(k):
        target = dst / "test" / f"class_{(c + 1) % k:02d}"
        target.mkdir(parents=True)
        for f in sorted((src / "test" / f"class_{c:02d}").iterdir()):
            shutil.copy2(f, target / f.name)
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", num_classes=K, per_class=8, size=32)


@pytest.fixture(scope="module")
def cli_study(images, tmp_path_factory):
    """One study through the CLI with --seeds 2; the random backbone is seeded so a second study can match it."""
    root = tmp_path_factory.mktemp("study")
    out = root / "study"
    torch.manual_seed(1234)
    args = ["study", *TINY, *FAST, *GRIDS, "--dataset", str(images), "--seeds", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result.output


def test_cli_writes_the_study_folder_and_prints_the_verdict(cli_study):
    out, output = cli_study
    for name in ("study.json", "study.md", "study.html", "config.yaml"):
        assert (out / name).is_file(), name
    for m in study.METHODS:
        for i in (0, 1):
            run = out / f"{m}-seed{i}"
            for name in ("predictions.safetensors", "class_stats.safetensors", "config.yaml", "report.json"):
                assert (run / name).is_file(), (run, name)
    s = json.loads((out / "study.json").read_text())
    assert s["verdict"]["kind"] in ("helps", "hurts", "no distinguishable effect")
    assert "Verdict:" in output and "Full report:" in output and "study.html" in output
    md = (out / "study.md").read_text()
    assert s["verdict"]["text"] in md.replace("\\", "") and "| **MR2 vs matched control** |" in md
    page = (out / "study.html").read_text()
    assert "MR2 vs matched control" in page and not re.search(r'(src|href)="https?:', page)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG") and png.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["command"] == "study" and cfg["seeds"] == 2


def test_seeds_grids_choices_and_split_are_recorded(cli_study):
    out, _ = cli_study
    s = json.loads((out / "study.json").read_text())
    assert s["seeds"] == [0, 1]
    assert s["grids"]["weight_decay"] == [0.0, 0.001] and s["grids"]["knob"] == [0.5, 2.0]
    assert s["split"]["split_seed"] == 0 and "split seed 0" in s["split"]["validation"]
    assert len(s["runs"]) == 6
    for r in s["runs"]:
        assert r["weight_decay"] in (0.0, 0.001) and r["knob"] in (0.5, 2.0)
        assert r["knob_name"] == ("temperature" if r["method"] == "ce" else "c_bar")
        tried = {(v["weight_decay"], v["knob"]) for v in r["validation"]}
        assert tried == {(0.0, 0.5), (0.0, 2.0), (0.001, 0.5), (0.001, 2.0)}
        run_cfg = yaml.safe_load((out / r["dir"] / "config.yaml").read_text())
        assert run_cfg["loss"] == r["method"] and run_cfg["seed"] == r["seed"]
        assert run_cfg["weight_decay"] == r["weight_decay"]
    # the seed changes the head (its initialisation and minibatch order), not the data
    h0, h1 = (load_tensors(out / f"ce-seed{i}" / "head.safetensors")["fc.weight"] for i in (0, 1))
    assert not torch.equal(h0, h1)
    t0, t1 = (
        load_tensors(out / f"{m}-seed{i}" / "predictions.safetensors")["targets"] for m, i in (("ce", 0), ("mr2", 1))
    )
    assert torch.equal(t0, t1)


def test_the_control_gives_every_class_the_same_margin_and_mr2_does_not(cli_study):
    out, _ = cli_study
    s = json.loads((out / "study.json").read_text())
    for r in s["runs"]:
        stats = load_tensors(out / r["dir"] / "class_stats.safetensors")
        if r["method"] == "uniform":
            assert torch.allclose(stats["gamma"], torch.full((K,), r["knob"]))
        elif r["method"] == "mr2":
            gamma = stats["gamma"].double()
            assert gamma.mean().item() == pytest.approx(r["knob"], rel=1e-5)
            assert gamma.max() - gamma.min() > 1e-4 * r["knob"]
            # MR2's margins follow (M + S)^(1/3) of the training features, which the control ignores
            a = (stats["M"].double() + stats["S"].double()) ** (1 / 3)
            assert torch.allclose(gamma, r["knob"] * K * a / a.sum(), rtol=1e-4)
    # In scale mode one shared margin c_bar is ERM at temperature c_bar: same choices give the very same predictions.
    for i in (0, 1):
        erm, control = (next(r for r in s["runs"] if r["dir"] == f"{m}-seed{i}") for m in ("ce", "uniform"))
        if (erm["weight_decay"], erm["knob"]) == (control["weight_decay"], control["knob"]):
            p_erm, p_control = (
                load_tensors(out / r["dir"] / "predictions.safetensors")["topk"] for r in (erm, control)
            )
            assert torch.equal(p_erm, p_control)


def test_no_choice_depends_on_the_test_labels(cli_study, images, tmp_path):
    """The same study on a copy whose test labels are permuted: every choice on validation stays the same."""
    out, _ = cli_study
    swapped = relabel_test_split(images, tmp_path / "swapped", K)
    torch.manual_seed(1234)  # the same random backbone as the CLI study
    cfg = build_config(
        StudyConfig,
        None,
        backbone="timm",
        model="test_resnet",
        weights="none",
        dataset=str(swapped),
        epochs=6,
        lr=0.05,
        batch_size=64,
        num_workers=0,
        extract_batch_size=32,
        wd_grid=(0.0, 0.001),
        cbar_grid=(0.5, 2.0),
        n_boot=200,
        seeds=2,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "study"),
    )
    second = study.run_study(cfg, console=Console(quiet=True))
    first = json.loads((out / "study.json").read_text())
    keys = ("method", "seed", "weight_decay", "knob", "validation")
    assert [{k: r[k] for k in keys} for r in second["runs"]] == [{k: r[k] for k in keys} for r in first["runs"]]
    for r in first["runs"]:
        head_a = load_tensors(out / r["dir"] / "head.safetensors")
        head_b = load_tensors(Path(second["path"]) / r["dir"] / "head.safetensors")
        assert all(torch.equal(head_a[n], head_b[n]) for n in head_a), r["dir"]
        # The same test images, filed under the next class: the same predictions, now scored against other labels.
        a = load_tensors(out / r["dir"] / "predictions.safetensors")
        b = load_tensors(Path(second["path"]) / r["dir"] / "predictions.safetensors")
        for c in range(K):
            assert torch.equal(b["preds"][b["targets"] == (c + 1) % K], a["preds"][a["targets"] == c]), r["dir"]


def test_study_configs_split_the_settings_by_mode():
    cfg, ft = study.study_configs(None, dataset="x", lr=0.5, seeds=2, wd_grid=None, mode=None)
    assert ft is None and cfg.lr == 0.5 and cfg.seeds == 2 and cfg.mode == "probe"
    cfg, ft = study.study_configs(None, dataset="x", lr=0.5, seeds=2, mode="finetune", cache_dir="c")
    assert ft is not None and ft.lr == 0.5 and ft.dataset == "x" and ft.weight_decay == 0.05  # FinetuneConfig's own
    assert cfg.mode == "finetune" and cfg.seeds == 2 and cfg.dataset == "x"


def test_cli_refuses_bad_settings_with_one_line(tmp_path):
    result = runner.invoke(app, ["study", "--dataset", "x", "--seeds", "0", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and result.output.strip().startswith("error:") and "--seeds" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_finetune_mode_runs_every_method_from_the_same_settings(images, tmp_path):
    out = tmp_path / "study"
    args = ["study", "--mode", "finetune", *TINY, "--dataset", str(images), "--seeds", "1", "--epochs", "1"]
    args += ["--batch-size", "8", "--lr", "0.001", "--num-workers", "0", "--n-boot", "100", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    s = json.loads((out / "study.json").read_text())
    assert s["mode"] == "finetune" and s["seeds"] == [0] and s["grids"] is None
    configs = {r["method"]: yaml.safe_load((out / r["dir"] / "config.yaml").read_text()) for r in s["runs"]}
    assert {m: c["loss"] for m, c in configs.items()} == {m: m for m in study.METHODS}
    for key in ("seed", "lr", "weight_decay", "epochs", "batch_size", "c_bar", "dataset"):
        assert len({str(c[key]) for c in configs.values()}) == 1, key
    assert yaml.safe_load((out / "finetune_config.yaml").read_text())["command"] == "finetune"
    assert (out / "study.html").is_file() and "Verdict:" in result.output
    # ERM's own fine-tune recorded class statistics, and the premise check reads them.
    erm = next(r for r in s["runs"] if r["method"] == "ce")
    assert (out / erm["dir"] / "class_stats.safetensors").is_file()
    assert s["diagnostics"]["spread_source"].startswith("ERM runs'")
