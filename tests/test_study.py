"""``mr2ft study``: the analysis on hand-made predictions, and the whole study on a tiny backbone and image folder."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console
from test_finetune_switches import read_scalars
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


ALL3 = ("ce", "uniform", "mr2")


def val_accuracy(k: int = 6) -> list[float]:
    """ERM's per-class validation accuracy for the fixture's classes: the same order as its test accuracy."""
    return [95.0, 90.0, 80.0, 70.0, 50.0, 40.0][:k]


def run(targets, preds, k=6, **kw):
    kw.setdefault("group_accuracy", val_accuracy(k))
    return study.analyze(targets, preds, k, **kw)


def test_identical_models_give_zero_width_intervals_and_a_no_effect_verdict(erm):
    targets, seeds = erm
    for n in (1, 2):
        out = run(targets, {m: seeds[:n] for m in ALL3}, n_boot=300, seed=1)
        for comp in out["comparisons"].values():
            assert comp["paired"] is True
            for name, f in comp["figures"].items():
                assert f["delta"] == 0.0 and f["low"] == 0.0 and f["high"] == 0.0, (n, name)
        v = out["verdict"]
        assert v["kind"] == "no distinguishable effect" and v["vs_erm"] == "no distinguishable difference"
        assert "against the matched control, hard +0.0 [+0.0, +0.0]" in v["text"]
        assert ("seed-to-seed variance is not included" in v["text"]) == (n == 1)
        assert ("NOT included" in out["bootstrap"]["method"]) == (n == 1)
    assert out["grouping"]["class_groups"] == [0, 0, 1, 1, 2, 2]
    assert out["table"]["mr2"]["values"] == out["table"]["ce"]["values"]


def test_a_known_gain_on_the_hard_classes_is_measured_covered_and_called_a_help(erm):
    targets, seeds = erm
    # MR2 = the control + 20 more right images in each hard class (of 100), in every seed: +20 points on "hard".
    mr2 = [flip(p, targets, [4, 5], 20, to_right=True) for p in seeds]
    result = run(targets, {"ce": seeds, "uniform": seeds, "mr2": mr2}, n_boot=500, seed=0)
    attr = result["comparisons"][result["attribution"]]["figures"]
    assert result["attribution"] == "mr2_vs_uniform"
    assert attr["hard"]["delta"] == pytest.approx(20.0)
    assert 0 < attr["hard"]["low"] <= 20.0 <= attr["hard"]["high"]
    assert attr["top1"]["delta"] == pytest.approx(40 / 6)
    assert attr["easy"]["delta"] == 0.0 and attr["medium"]["delta"] == 0.0
    assert result["comparisons"]["mr2_vs_ce"]["figures"]["hard"]["delta"] == pytest.approx(20.0)
    assert result["table"]["mr2"]["values"]["hard"] == pytest.approx(result["table"]["ce"]["values"]["hard"] + 20)
    v = result["verdict"]
    assert (v["kind"], v["vs_erm"]) == ("helps", "better")
    assert "MR2 helps the hard classes: against the matched control, hard +20.0 [" in v["text"]
    assert "not worse beyond the 0.5-point tolerance" in v["text"]
    assert "Against ERM, MR2 changed hard +20.0" in v["text"]
    assert any(g.startswith("hard +20.0 [") for g in v["gains"]) and v["costs"] == []


def test_a_hard_gain_paid_for_overall_is_not_a_help_and_the_trade_off_is_named(erm):
    """+20 on the hard classes, but -40 on the easy ones: overall falls, so the verdict says "mixed", not "helps"."""
    targets, seeds = erm
    mr2 = [flip(flip(p, targets, [4, 5], 20, to_right=True), targets, [0, 1], 40, to_right=False) for p in seeds]
    v = run(targets, {"ce": seeds, "mr2": mr2}, n_boot=300)["verdict"]
    assert v["kind"] == "mixed" and v["against"] == "ce"
    assert "overall accuracy may be worse by more than the 0.5-point tolerance" in v["text"]
    assert any(c.startswith("easy -40.0 [") for c in v["costs"]) and "costs overall -6.7 [" in v["text"]
    assert any(c.startswith("overall -") for c in v["costs"])


def test_a_loss_on_the_hard_classes_is_called_a_hurt(erm):
    targets, seeds = erm
    mr2 = [flip(p, targets, [4, 5], 25, to_right=False) for p in seeds]
    v = run(targets, {"ce": seeds, "uniform": seeds, "mr2": mr2}, n_boot=300)["verdict"]
    assert (v["kind"], v["vs_erm"]) == ("hurts", "worse")
    assert "hard -25.0 [" in v["text"] and "MR2 hurt the hard classes" in v["text"]


def test_a_gain_the_control_also_gets_is_credited_to_the_shared_margin(erm):
    targets, seeds = erm
    better = [flip(p, targets, [4, 5], 20, to_right=True) for p in seeds]
    v = run(targets, {"ce": seeds, "uniform": better, "mr2": better}, n_boot=300)["verdict"]
    assert (v["kind"], v["vs_erm"], v["control_vs_erm"]) == ("no distinguishable effect", "better", "better")
    assert "not from making it depend on the class" in v["text"]


def test_without_a_control_row_mr2_is_judged_against_the_tuned_erm(erm):
    targets, seeds = erm
    mr2 = [flip(p, targets, [4, 5], 20, to_right=True) for p in seeds]
    out = run(targets, {"ce": seeds, "mr2": mr2}, n_boot=300)
    assert out["methods"] == ["ce", "mr2"] and out["control"] == "ce" and out["attribution"] == "mr2_vs_ce"
    assert list(out["comparisons"]) == ["mr2_vs_ce"]
    v = out["verdict"]
    assert v["kind"] == "helps" and v["vs_erm"] is None
    assert "against ERM (temperature tuned on validation: the matched control)" in v["text"]
    assert study.methods_of("probe", "scale") == ("ce", "mr2")
    assert study.methods_of("probe", "additive") == ALL3 and study.methods_of("finetune", "scale") == ALL3


def test_in_scale_mode_one_shared_margin_is_erm_at_that_temperature():
    """Why a probe study has no control row: ``uniform`` at c_bar and cross-entropy at temperature c_bar give the same
    loss and the same gradient on any logits, so with ERM's temperature tuned over the same grid they coincide."""
    from mr2ft.losses import build_loss

    torch.manual_seed(0)
    logits = torch.randn(32, 5, requires_grad=True)
    feats, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    grads = []
    for name, knob in (("uniform", {"c_bar": 2.5}), ("ce", {"temperature": 2.5})):
        loss = build_loss(name, 5, 8, lambda_rep=0.0, **knob)
        if name == "uniform":
            loss.fit_statistics(feats, y)
        value = loss(logits, feats, y)["loss"]
        (g,) = torch.autograd.grad(value, logits)
        grads.append((value.detach(), g))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6) and torch.allclose(grads[0][1], grads[1][1], rtol=1e-6)


def test_every_grouping_rule_is_stated_and_only_test_groups_carry_the_selection_bias_label(erm):
    targets, seeds = erm
    preds = {"ce": seeds, "mr2": seeds}
    # Validation accuracy in the reverse order of the test accuracy: the groups follow validation, not test.
    val = run(targets, preds, n_boot=50, group_accuracy=val_accuracy()[::-1])
    assert val["grouping"]["class_groups"] == [2, 2, 1, 1, 0, 0]
    assert "ERM's validation" in val["grouping"]["rule"] and not val["grouping"]["selection_bias"]
    cross = run(targets, preds, n_boot=50, groups="crossfit", group_accuracy=None)
    assert "cross-fitted" in cross["grouping"]["rule"] and cross["grouping"]["class_groups_other_half"] is not None
    test = run(targets, preds, n_boot=50, groups="test", group_accuracy=None)
    assert test["grouping"]["selection_bias"] and "selection bias" in test["grouping"]["rule"]
    assert "selection bias" in test["verdict"]["text"] and "selection bias" not in val["verdict"]["text"]
    with pytest.raises(ValueError, match="validation"):
        run(targets, preds, group_accuracy=None)
    with pytest.raises(ValueError, match="same number of seeds"):
        run(targets, {"ce": seeds, "mr2": seeds[:1]})


def test_intervals_cover_the_true_difference_at_about_the_nominal_rate():
    """Repeated test sets drawn from known per-class accuracies: the 95% interval of MR2 - control holds the true
    change in overall accuracy in roughly 95% of them (a swapped a/b or a wrong pairing would break this)."""
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
        preds = {"ce": [draw(p_control)] * 2, "uniform": [draw(p_control), draw(p_control)]}
        preds["mr2"] = [draw(p_mr2), draw(p_mr2)]
        out = study.analyze(targets, preds, k, n_boot=300, seed=1, group_accuracy=100 * p_control)
        f = out["comparisons"]["mr2_vs_uniform"]["figures"]["top1"]
        covered += f["low"] <= truth <= f["high"]
        deltas.append(f["delta"])
    assert 0.85 <= covered / reps <= 1.0
    assert abs(np.mean(deltas) - truth) < 1.5  # the point estimate is unbiased, and its sign is b - a


def test_representation_margin_share_warns_under_one_percent_and_the_control_margin_is_the_harmonic_mean():
    low = study.representation_check(0.0004, "logged")
    assert low["warning"] and "0.04%" in low["warning"] and "under 1%" in low["warning"]
    assert study.representation_check(0.05, "logged")["warning"] is None
    assert study.representation_check(None, "not logged")["warning"] is None
    # Closed form: weights 1/4, 1/4, 1/2 on margins 0.5, 1, 2: mean 1/gamma = (2 + 1 + 2 * 0.5) / 4 = 1.
    assert study.mean_inverse_margin([0.5, 1.0, 2.0], [10, 10, 20]) == pytest.approx(1.0)
    assert study.matched_c_bar([0.5, 1.0, 2.0], [10, 10, 20]) == pytest.approx(1.0)
    # Jensen: the harmonic mean is below the arithmetic one (1.375 here), so matching on c_bar would not match 1/gamma.
    assert study.matched_c_bar([0.5, 1.0, 2.0], [1, 1, 2]) < np.average([0.5, 1.0, 2.0], weights=[1, 1, 2])


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
        ({"groups": "train"}, "--groups"),
        ({"cbar_grid": ()}, "--cbar-grid"),
        ({"dataset": ""}, "--dataset"),
    ):
        with pytest.raises(UserError, match=re.escape(needle)):  # refused when the config is built, or by the study
            cfg = build_config(StudyConfig, None, **{"dataset": "x", "out": str(tmp_path / "s"), **overrides})
            study.run_study(cfg, console=Console(quiet=True))
        assert not (tmp_path / "s").exists()


def test_study_config_holds_no_probe_loss_or_sweep_settings():
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    assert {"mode", "seeds", "n_boot", "groups", "wd_grid", "cbar_grid"} <= names
    assert not names & {"loss", "sweep_wd", "sweep_cbar", "sweep_temperature", "baseline"}
    # A probe recipe still drives a study; its loss and sweeps are the study's to set.
    cfg, ft = study.study_configs("clip-vitb16-probe", dataset="x", seeds=2)
    assert ft is None and cfg.backbone == "clip" and cfg.p == 5.0 and cfg.seeds == 2 and cfg.groups == "validation"


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


def noise_folder(root: Path, k: int, per_class: int, seed: int = 0) -> Path:
    """An image folder of pure noise: no image carries anything about its (random) class."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in range(k):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


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
    result = runner.invoke(app, [*args, "--cache-dir", str(root / "cache"), "--report-to", "tensorboard"])
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result.output


def test_cli_writes_the_study_folder_and_prints_the_verdict_and_the_rule(cli_study):
    out, output = cli_study
    for name in ("study.json", "study.md", "study.html", "config.yaml"):
        assert (out / name).is_file(), name
    for m in ("ce", "mr2"):
        for i in (0, 1):
            run_dir = out / f"{m}-seed{i}"
            for name in ("predictions.safetensors", "class_stats.safetensors", "config.yaml", "report.json"):
                assert (run_dir / name).is_file(), (run_dir, name)
            # --report-to: each run's head fits and test figures reach its own tracker folder
            scalars = read_scalars(run_dir)
            assert scalars["probe/final/train_loss"] and scalars["test/top1"], (run_dir, sorted(scalars))
            top1 = json.loads((run_dir / "report.json").read_text())["summary"]["top1"]
            assert scalars["test/top1"][0][1] == pytest.approx(top1, rel=1e-5)
    # In a probe with scale margins the control would be ERM itself: no control runs.
    assert not list(out.glob("uniform-seed*"))
    s = json.loads((out / "study.json").read_text())
    assert s["methods"] == ["ce", "mr2"] and s["control"] == "ce" and s["attribution"] == "mr2_vs_ce"
    assert s["verdict"]["kind"] in ("helps", "mixed", "hurts", "no distinguishable effect")
    assert s["grouping"]["rule_name"] == "validation" and "ERM's validation" in s["grouping"]["rule"]
    assert any("temperature-tuned ERM is therefore the matched control" in c for c in s["caveats"])
    assert "Verdict:" in output and "Rule: helps = " in output and "Full report:" in output
    md = (out / "study.md").read_text().replace("\\", "")
    assert s["verdict"]["text"] in md and "ERM's validation" in md and "Rule: helps = " in md
    assert "| ERM (matched control) |" in md and "| MR2 |" in md
    page = (out / "study.html").read_text()
    assert "ERM&#x27;s validation" in page and not re.search(r'(src|href)="https?:', page)
    links = [html.unescape(h) for h in re.findall(r'href="([^"#]+)"', page)]
    assert len(links) == 4 and all((out / link).is_file() for link in links), links  # every run's link opens a file
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG") and png.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["command"] == "study" and cfg["seeds"] == 2 and cfg["groups"] == "validation" and "loss" not in cfg
    rep = s["diagnostics"]["representation"]
    assert rep["rep_grad_share"] is not None and rep["applied"] is False


def test_seeds_grids_choices_and_split_are_recorded(cli_study):
    out, _ = cli_study
    s = json.loads((out / "study.json").read_text())
    assert s["seeds"] == [0, 1]
    assert s["grids"]["weight_decay"] == [0.0, 0.001] and s["grids"]["knob"] == [0.5, 2.0]
    assert s["split"]["split_seed"] == 0 and "split seed 0" in s["split"]["validation"]
    assert len(s["runs"]) == 4
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


def test_mr2_margins_follow_the_class_statistics(cli_study):
    out, _ = cli_study
    s = json.loads((out / "study.json").read_text())
    for r in s["runs"]:
        if r["method"] != "mr2":
            continue
        stats = load_tensors(out / r["dir"] / "class_stats.safetensors")
        gamma = stats["gamma"].double()
        assert gamma.mean().item() == pytest.approx(r["knob"], rel=1e-5)
        assert gamma.max() - gamma.min() > 1e-4 * r["knob"]
        # MR2's margins follow (M + S)^(1/3) of the training features, which one shared margin ignores
        a = (stats["M"].double() + stats["S"].double()) ** (1 / 3)
        assert torch.allclose(gamma, r["knob"] * K * a / a.sum(), rtol=1e-4)


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
    # The groups come from validation: the same whatever the test labels say.
    assert second["grouping"]["class_groups"] == first["grouping"]["class_groups"]
    for r in first["runs"]:
        head_a = load_tensors(out / r["dir"] / "head.safetensors")
        head_b = load_tensors(Path(second["path"]) / r["dir"] / "head.safetensors")
        assert all(torch.equal(head_a[n], head_b[n]) for n in head_a), r["dir"]
        # The same test images, filed under the next class: the same predictions, now scored against other labels.
        a = load_tensors(out / r["dir"] / "predictions.safetensors")
        b = load_tensors(Path(second["path"]) / r["dir"] / "predictions.safetensors")
        for c in range(K):
            assert torch.equal(b["preds"][b["targets"] == (c + 1) % K], a["preds"][a["targets"] == c]), r["dir"]


@pytest.mark.parametrize("groups", ["validation", "test"])
def test_a_study_on_pure_noise_never_says_helps(groups, tmp_path):
    """Images of pure noise under random classes: nothing to learn, so whatever the runs do, no gain is found. With
    --groups test every output carries the selection-bias label."""
    data = noise_folder(tmp_path / "noise", k=6, per_class=10)
    out = tmp_path / "study"
    torch.manual_seed(0)
    args = ["study", *TINY, *FAST, *GRIDS, "--dataset", str(data), "--seeds", "2", "--groups", groups]
    result = runner.invoke(app, [*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, (result.output, result.exception)
    s = json.loads((out / "study.json").read_text())
    assert s["verdict"]["kind"] != "helps", s["verdict"]["text"]
    biased = groups == "test"
    assert s["grouping"]["selection_bias"] is biased
    for text in (result.output, (out / "study.md").read_text(), (out / "study.html").read_text()):
        assert ("subject to selection bias" in " ".join(text.split())) is biased


def test_study_configs_split_the_settings_by_mode():
    cfg, ft = study.study_configs(None, dataset="x", lr=0.5, seeds=2, wd_grid=None, mode=None)
    assert ft is None and cfg.lr == 0.5 and cfg.seeds == 2 and cfg.mode == "probe"
    cfg, ft = study.study_configs(None, dataset="x", lr=0.5, seeds=2, mode="finetune", cache_dir="c", groups="test")
    assert ft is not None and ft.lr == 0.5 and ft.dataset == "x" and ft.weight_decay == 0.05  # FinetuneConfig's own
    assert cfg.mode == "finetune" and cfg.seeds == 2 and cfg.dataset == "x" and cfg.groups == "test"


def test_cli_refuses_bad_settings_with_one_line(tmp_path):
    for flags, needle in ((["--seeds", "0"], "--seeds"), (["--groups", "train"], "--groups")):
        result = runner.invoke(app, ["study", "--dataset", "x", *flags, "--out", str(tmp_path / "s")])
        assert result.exit_code == 2 and result.output.strip().startswith("error:") and needle in result.output
        assert "Traceback" not in result.output and not (tmp_path / "s").exists()


def test_finetune_study_refuses_a_test_set_that_moves_with_the_seed_before_training(tmp_path, monkeypatch):
    """The paired design needs one test set: a loader whose test subset changes with the seed is refused before
    any fine-tune starts, and nothing is written."""
    from types import SimpleNamespace

    import mr2ft.data
    from mr2ft import finetune

    def fake_load(settings, seed=0, **_):
        return SimpleNamespace(
            class_names=["a", "b"],
            split_fingerprint=lambda name: f"{name}-{seed}",
            train=SimpleNamespace(targets=[0, 1, 0, 1]),
        )

    def no_training(cfg):
        raise AssertionError("a fine-tune started")

    monkeypatch.setattr(mr2ft.data, "load_dataset_for", fake_load)
    monkeypatch.setattr(finetune, "run", no_training)
    cfg, ft = study.study_configs(None, mode="finetune", dataset="x", seeds=2, out=str(tmp_path / "s"))
    with pytest.raises(UserError, match="tests on other images"):
        study.run_study(cfg, console=Console(quiet=True), finetune_cfg=ft)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_finetune_mode_runs_every_method_and_matches_the_control_on_the_mean_inverse_margin(images, tmp_path):
    out = tmp_path / "study"
    args = ["study", "--mode", "finetune", *TINY, "--dataset", str(images), "--seeds", "1", "--epochs", "1"]
    args += ["--batch-size", "8", "--lr", "0.001", "--num-workers", "0", "--n-boot", "100", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    s = json.loads((out / "study.json").read_text())
    assert s["mode"] == "finetune" and s["seeds"] == [0] and s["grids"] is None
    assert s["methods"] == list(ALL3) and s["control"] == "uniform"
    configs = {r["method"]: yaml.safe_load((out / r["dir"] / "config.yaml").read_text()) for r in s["runs"]}
    assert {m: c["loss"] for m, c in configs.items()} == {m: m for m in ALL3}
    for key in ("seed", "lr", "weight_decay", "epochs", "batch_size", "dataset", "val_fraction"):
        assert len({str(c[key]) for c in configs.values()}) == 1, key
    assert configs["ce"]["val_fraction"] == 0.2  # held out for the groups
    ft = yaml.safe_load((out / "finetune_config.yaml").read_text())
    assert ft["command"] == "finetune"
    # The control's one margin has MR2's mean inverse margin (its final margins, weighted by training images).
    gamma = load_tensors(out / "mr2-seed0" / "class_stats.safetensors")["gamma"].double().numpy()
    margins = s["margins"][0]
    assert margins["mr2_mean_inverse_margin"] == pytest.approx(float(np.mean(1 / gamma)), rel=1e-6)
    assert configs["uniform"]["c_bar"] == pytest.approx(1 / margins["mr2_mean_inverse_margin"], rel=1e-6)
    assert margins["control_mean_inverse_margin"] == pytest.approx(margins["mr2_mean_inverse_margin"], rel=1e-9)
    assert s["grouping"]["rule_name"] in ("validation", "crossfit")
    assert (out / "study.html").is_file() and "Verdict:" in result.output
    erm = next(r for r in s["runs"] if r["method"] == "ce")
    assert (out / erm["dir"] / "class_stats.safetensors").is_file()
    assert s["diagnostics"]["spread_source"].startswith("ERM runs'")
