"""`mr2ft probe` end to end through the CLI, with tiny random backbones and generated image folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mr2ft.cli import app
from mr2ft.io import load_tensors, read_jsonl
from mr2ft.probe import probe_losses
from tests._images import make_image_folder

runner = CliRunner()

TIMM = ["--backbone", "timm", "--model", "test_resnet", "--weights", "none"]
FAST = ["--epochs", "3", "--batch-size", "16", "--num-workers", "0", "--extract-batch-size", "16"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", num_classes=4, per_class=10, size=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def probe(*args: str, backbone=TIMM):
    result = runner.invoke(app, ["probe", *backbone, *FAST, *args])
    return result


def ok(result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def test_probe_writes_a_complete_run_folder(images, cache, tmp_path):
    out = tmp_path / "run"
    ok(probe("--dataset", str(images), "--loss", "mr2", "--cache-dir", str(cache), "--out", str(out)))
    for name in (
        "config.yaml",
        "classes.json",
        "metrics.jsonl",
        "predictions.safetensors",
        "class_stats.safetensors",
        "head.safetensors",
        "report.json",
        "per_class.csv",
        "report.md",
        "report.html",
    ):
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["command"] == "probe" and cfg["loss"] == "mr2" and cfg["dataset"] == str(images)
    classes = json.loads((out / "classes.json").read_text())
    assert classes["class_names"] == [f"class_{k:02d}" for k in range(4)]
    preds = load_tensors(out / "predictions.safetensors")
    assert preds["targets"].shape == (40,) and preds["topk"].shape == (40, 4)
    assert sorted(preds["targets"].tolist()) == sorted([k for k in range(4) for _ in range(10)])
    stats = load_tensors(out / "class_stats.safetensors")
    assert stats["gamma"].shape == (4,) and stats["gamma"].mean().item() == pytest.approx(1.0, rel=1e-5)
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "final" and "step" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["num_images"] == 40
    # the config in the run folder repeats the run
    out2 = tmp_path / "again"
    ok(runner.invoke(app, ["probe", "--recipe", str(out / "config.yaml"), "--out", str(out2)]))
    assert torch.equal(
        load_tensors(out2 / "head.safetensors")["fc.weight"], load_tensors(out / "head.safetensors")["fc.weight"]
    )


def test_second_probe_loads_no_images(images, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ok(probe("--dataset", str(images), "--loss", "ce", "--cache-dir", str(cache), "--out", str(tmp_path / "a")))
    assert list(cache.rglob("*.safetensors"))

    import mr2ft.data

    def no_images(self, index):
        raise AssertionError("an image was loaded although the features are cached")

    monkeypatch.setattr(mr2ft.data.ImageDataset, "__getitem__", no_images)
    ok(probe("--dataset", str(images), "--loss", "ce", "--cache-dir", str(cache), "--out", str(tmp_path / "b")))
    a = load_tensors(tmp_path / "a" / "predictions.safetensors")
    b = load_tensors(tmp_path / "b" / "predictions.safetensors")
    assert torch.equal(a["topk"], b["topk"])


def test_broken_cache_entry_is_detected_and_rebuilt(images, tmp_path):
    cache = tmp_path / "cache"
    ok(probe("--dataset", str(images), "--cache-dir", str(cache), "--out", str(tmp_path / "a")))
    entries = sorted(cache.rglob("*.safetensors"))
    before = {k: v.clone() for k, v in load_tensors(entries[0]).items()}
    data = entries[0].read_bytes()
    entries[0].write_bytes(data[: len(data) // 2])  # truncated by a kill or a full disk
    result = probe("--dataset", str(images), "--cache-dir", str(cache), "--out", str(tmp_path / "b"))
    ok(result)
    after = load_tensors(entries[0])  # rebuilt to the same content
    assert torch.equal(before["features"], after["features"]) and torch.equal(before["targets"], after["targets"])
    a = load_tensors(tmp_path / "a" / "predictions.safetensors")
    b = load_tensors(tmp_path / "b" / "predictions.safetensors")
    assert torch.equal(a["topk"], b["topk"])


def _chosen(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


def _sweep_records(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "sweep"]


@pytest.mark.parametrize(
    ("loss", "flag", "grid_flag", "grid"),
    [
        ("ce", "--sweep-wd", "--wd-grid", [0.0, 0.5, 50.0]),
        ("mr2", "--sweep-cbar", "--cbar-grid", [0.05, 1.0, 20.0]),
        ("ce", "--sweep-temperature", "--cbar-grid", [0.05, 1.0, 20.0]),
    ],
)
def test_sweeps_choose_from_their_grid_by_validation(images, cache, tmp_path, loss, flag, grid_flag, grid):
    out = tmp_path / "run"
    grid_text = ",".join(str(v) for v in grid)
    ok(
        probe(
            "--dataset",
            str(images),
            "--loss",
            loss,
            flag,
            *([] if flag == "--sweep-wd" else ["--no-sweep-wd"]),  # the knob alone (weight decay is swept by default)
            grid_flag,
            grid_text,
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
            "--val-fraction",
            "0.3",
        )
    )
    records = _sweep_records(out)
    field = "weight_decay" if flag == "--sweep-wd" else "knob"
    assert sorted(r[field] for r in records) == sorted(grid)
    # the choice is the first grid value with the best validation accuracy (ties keep the earlier one)
    best = max(r["val_overall"] for r in records)
    expected = next(r for r in records if r["val_overall"] == best)
    cfg = _chosen(out)
    assert cfg["weight_decay"] == expected["weight_decay"]
    if flag == "--sweep-cbar":
        assert cfg["c_bar"] == expected["knob"]
    text = (out / "config.yaml").read_text()
    assert "chosen_on_validation" in text and "of train, stratified" in text


def test_sweep_criterion_hard(images, cache, tmp_path):
    out = tmp_path / "run"
    ok(
        probe(
            "--dataset",
            str(images),
            "--loss",
            "mr2",
            "--sweep-cbar",
            "--sweep-criterion",
            "hard",
            "--cbar-grid",
            "0.5,2",
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
        )
    )
    records = _sweep_records(out)
    assert all("val_hard" in r for r in records)
    best = max((r["val_hard"], r["val_overall"]) for r in records)
    expected = next(r for r in records if (r["val_hard"], r["val_overall"]) == best)
    assert _chosen(out)["c_bar"] == expected["knob"]


@pytest.fixture(scope="module")
def baseline_pair(images, cache, tmp_path_factory) -> tuple[Path, Path]:
    """A default CE probe and an MR2 probe that takes it as its baseline (shared by the tests that read them)."""
    folder = tmp_path_factory.mktemp("pair")
    base, run = folder / "ce", folder / "mr2"
    ok(probe("--dataset", str(images), "--loss", "ce", "--cache-dir", str(cache), "--out", str(base)))
    common = ["--dataset", str(images), "--loss", "mr2", "--cache-dir", str(cache), "--out", str(run)]
    ok(probe(*common, "--baseline", str(base)))
    return base, run


def test_groups_come_from_a_baseline_run(baseline_pair):
    base, run = baseline_pair
    b = json.loads((base / "report.json").read_text())
    r = json.loads((run / "report.json").read_text())
    assert [c["group"] for c in r["per_class"]] == [c["group"] for c in b["per_class"]]
    assert [c["baseline_accuracy"] for c in r["per_class"]] == [c["accuracy"] for c in b["per_class"]]
    assert r["grouping"]["source"] == "baseline"


@pytest.mark.parametrize("loss", probe_losses())
def test_every_loss_name_runs(images, cache, tmp_path, loss):
    out = tmp_path / loss
    ok(probe("--dataset", str(images), "--loss", loss, "--cache-dir", str(cache), "--out", str(out)))
    assert json.loads((out / "classes.json").read_text())["loss"] == loss


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "mr3"], "unknown loss"),
        (["--loss", "ce", "--sweep-cbar"], "--sweep-cbar"),
        (["--loss", "mr2", "--sweep-temperature"], "--sweep-temperature"),
        (["--lr", "0"], "--lr must be positive"),
        (["--epochs", "-1"], "--epochs must be positive"),
        (["--head", "zeroshot"], "CLIP"),
    ],
)
def test_bad_probe_options_end_in_one_line(images, cache, tmp_path, args, message):
    out = tmp_path / "run"
    result = probe("--dataset", str(images), "--cache-dir", str(cache), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_existing_output_folder_is_refused(images, cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = probe("--dataset", str(images), "--cache-dir", str(cache), "--out", str(out))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_keeps_the_old_run_until_the_new_one_succeeds(images, cache, tmp_path):
    out = tmp_path / "run"
    ok(probe("--dataset", str(images), "--cache-dir", str(cache), "--out", str(out)))
    before = (out / "report.json").read_text()
    # a failing replacement (a baseline of other classes) leaves the old run as it was
    other = make_image_folder(tmp_path / "other", num_classes=3, per_class=4, size=32)
    base = tmp_path / "base"
    ok(probe("--dataset", str(other), "--cache-dir", str(cache), "--out", str(base)))
    bad = probe(
        "--dataset", str(images), "--cache-dir", str(cache), "--out", str(out), "--overwrite", "--baseline", str(base)
    )
    assert bad.exit_code == 2
    assert (out / "report.json").read_text() == before
    assert not list(tmp_path.glob(".run.replaced-*"))
    ok(probe("--dataset", str(images), "--cache-dir", str(cache), "--out", str(out), "--overwrite", "--loss", "mr2"))
    assert json.loads((out / "classes.json").read_text())["loss"] == "mr2"
    assert not list(tmp_path.glob(".run.replaced-*"))


@pytest.mark.parametrize("family", ["clip", "clip-dir", "mae", "mae-hf", "mocov2", "timm-vit"])
def test_probe_per_family_from_real_checkpoint_formats(images, tmp_path, family):
    from _models import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(family, tmp_path / "weights")
    backbone = ["--backbone", tiny["family"], "--weights", tiny["weights"], "--image-size", "32"]
    if tiny["model"]:
        backbone += ["--model", tiny["model"]]
    out = tmp_path / "run"
    head = ["--head", "zeroshot"] if family == "clip" else []
    ok(
        probe(
            "--dataset",
            str(images),
            "--loss",
            "mr2",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(out),
            *head,
            backbone=backbone,
        )
    )
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["backbone"] == tiny["family"]
    text = (out / "config.yaml").read_text()
    assert f"feature_dim: {tiny['feature_dim']}" in text
    assert ("normalized_features: true" in text) == family.startswith("clip")
    stats = load_tensors(out / "class_stats.safetensors")
    assert stats["seen"].all()


# ---- training to convergence (mr2ft.headfit) -------------------------------------------------------------------

NO_EPOCHS = ["--batch-size", "16", "--num-workers", "0", "--extract-batch-size", "16"]


def _blobs(n_per_class: int = 40, dim: int = 12, classes: int = 3, seed: int = 0, overlap: float = 1.5):
    from mr2ft.headfit import Features

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2.0
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + overlap * torch.randn(len(y), dim, generator=g)
    return Features(x, y)


def _cfg(**kw):
    from mr2ft.config import ProbeConfig

    return ProbeConfig(dataset="x", batch_size=32, **kw)


def test_default_probe_trains_until_converged_and_records_how_it_stopped(images, cache, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        # the default grid, shortened to keep the test quick
        ["probe", *TIMM, *NO_EPOCHS, "--dataset", str(images), "--cache-dir", str(cache), "--out", str(out)]
        + ["--wd-grid", "0.03,0.3"],
    )
    ok(result)
    records = read_jsonl(out / "metrics.jsonl")
    stopped = [r for r in records if r["stage"] == "final" and r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["schedule"] == "plateau" and stopped[0]["converged"] is True
    training = [r for r in records if r["stage"] == "final" and "step" in r]
    assert training[-1]["step"] == stopped[0]["steps"] and training[-1]["train_loss"] == stopped[0]["train_loss"]
    # three plateaus: lr, lr/10, lr/100 all appear in the records
    lrs = sorted({r["lr"] for r in training})
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2])
    text = (out / "config.yaml").read_text()
    assert "head_training:" in text and "converged: true" in text
    # the weight decay was chosen on validation by default, every sweep fit converged
    sweep = _sweep_records(out)
    assert sorted(r["weight_decay"] for r in sweep) == [0.03, 0.3]
    assert all(r["converged"] for r in sweep)


def test_the_fit_reaches_the_regularised_optimum_found_by_lbfgs():
    """The default plateau fit ends at (nearly) the minimum of mean CE + (wd/2)||W||^2 that full-batch L-BFGS finds
    on the same standardised features, and predicts like it."""
    from mr2ft.headfit import fit_head, standardize
    from mr2ft.losses import build_loss

    train, wd = _blobs(), 0.05
    head, stopped = fit_head(_cfg(), train, 3, build_loss("ce", 3, 12), weight_decay=wd, seed=0)
    assert stopped.converged is True and stopped.steps < 10_000
    xs = standardize(train.x).double()
    w = torch.zeros(3, 12, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(xs @ w.T + b, train.y) + 0.5 * wd * w.pow(2).sum()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        optimum = float(torch.nn.functional.cross_entropy(xs @ w.T + b, train.y) + 0.5 * wd * w.pow(2).sum())
    assert stopped.train_loss == pytest.approx(optimum, rel=5e-3)
    with torch.no_grad():
        ref = (xs @ w.T + b).argmax(1)
    assert (head(train.x).argmax(1) == ref).float().mean() >= 0.97


def test_standardised_fit_is_the_same_for_raw_and_rescaled_features():
    """Defaults that work for raw features work for features 1024x smaller (L2-normalised ones are ~30x smaller): the
    fit sees the same standardised features (a power of two keeps them bit-identical), so it is the same fit."""
    from mr2ft.headfit import Features, fit_head
    from mr2ft.losses import build_loss

    train = _blobs()
    head_a, a = fit_head(_cfg(), train, 3, build_loss("ce", 3, 12), weight_decay=0.01, seed=0)
    small = Features(train.x / 1024.0, train.y)
    head_b, b = fit_head(_cfg(), small, 3, build_loss("ce", 3, 12), weight_decay=0.01, seed=0)
    assert a.steps == b.steps and a.train_loss == b.train_loss
    # the saved head reads raw features: standardisation is folded into its weights
    assert torch.allclose(head_a(train.x), head_b(small.x), atol=1e-3)


def test_standard_coordinates_fold_back_exactly():
    from mr2ft.heads import build_head, from_standard_coordinates, to_standard_coordinates

    head = build_head("linear", 5, 4)
    x = torch.randn(10, 5) * 3 + 2
    mean, std = x.mean(0), x.std(0)
    before = head(x)
    to_standard_coordinates(head, mean, std)
    assert torch.allclose(head((x - mean) / std), before, atol=1e-5)
    from_standard_coordinates(head, mean, std)
    assert torch.allclose(head(x), before, atol=1e-5)


def test_without_weight_decay_a_separable_fit_stops_at_the_cap_not_converged():
    from mr2ft.headfit import fit_head
    from mr2ft.losses import build_loss

    train = _blobs(overlap=0.05)  # separable: the unregularised loss has no minimum
    _, stopped = fit_head(_cfg(max_steps=300), train, 3, build_loss("ce", 3, 12), weight_decay=0.0, seed=0)
    assert stopped.steps == 300 and stopped.converged is False and "budget" in stopped.reason


def test_step_schedule_multiplies_lr_by_a_tenth_at_each_milestone():
    from mr2ft.headfit import plan_for

    plan = plan_for(_cfg(epochs=10, schedule="step", lr_steps=(6.0, 8.0), warmup_epochs=1), n=64)
    assert plan.steps_per_epoch == 2 and plan.total == 20 and plan.milestones == (12, 16)
    factors = [plan.factor(t, 0) for t in range(20)]
    assert factors[:2] == [0.5, 1.0]  # one epoch of warm-up
    assert factors[2:12] == [1.0] * 10
    assert factors[12:16] == pytest.approx([0.1] * 4) and factors[16:] == pytest.approx([0.01] * 4)


def test_blr_resolves_to_the_mae_rule():
    from mr2ft.config import resolve_lr
    from mr2ft.headfit import plan_for

    assert resolve_lr(1e-3, None, 4096) == 1e-3
    assert resolve_lr(1e-3, 0.1, 4096) == pytest.approx(1.6)  # MAE's linear probe: blr 0.1 at batch 4096
    assert resolve_lr(1.0, 5e-4, 1024) == pytest.approx(2e-3)  # MAE's fine-tune
    assert plan_for(_cfg(blr=0.1), n=1000).lr == pytest.approx(0.1 * 32 / 256)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "cosine"], "--epochs"),
        (["--schedule", "step", "--epochs", "3"], "--lr-steps"),
        (["--lr-steps", "2", "--epochs", "3"], "--schedule step"),
        (["--schedule", "sgdr", "--epochs", "3"], "unknown --schedule"),
    ],
)
def test_bad_schedules_end_in_one_line(images, cache, tmp_path, args, message):
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["probe", *TIMM, *NO_EPOCHS, "--dataset", str(images), "--cache-dir", str(cache), "--out", str(out), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_ldam_probe_uses_a_cosine_head_and_says_so(images, cache, tmp_path):
    from mr2ft.heads import head_from_state

    out = tmp_path / "ldam"
    ok(probe("--dataset", str(images), "--loss", "ldam", "--cache-dir", str(cache), "--out", str(out)))
    text = (out / "config.yaml").read_text()
    assert "classifier: 'cosine:" in text and "s=30" in text
    tensors = load_tensors(out / "head.safetensors")
    assert "fc.bias" not in tensors
    head = head_from_state(tensors["fc.weight"].shape[1], 4, tensors)
    head.load_state_dict(tensors)
    assert head.cosine and not head.is_linear


def test_knob_is_passed_by_name():
    from mr2ft.probe import make_loss

    train = _blobs()
    mr2 = make_loss(_cfg(), "mr2", train, 3, False, c_bar=2.5)
    assert mr2.c_bar == 2.5 and mr2.lambda_rep == 0.0 and bool(mr2.frozen)
    assert make_loss(_cfg(), "ce", train, 3, False, temperature=3.0).temperature == 3.0
    assert make_loss(_cfg(c_bar=0.7), "uniform", train, 3, False).c_bar == 0.7


def test_rep_grad_share_is_recorded_and_scales_with_lambda(images, cache, tmp_path):
    from mr2ft.headfit import fit_head, rep_grad_share
    from mr2ft.probe import make_loss

    out = tmp_path / "mr2"
    ok(probe("--dataset", str(images), "--loss", "mr2", "--cache-dir", str(cache), "--out", str(out)))
    shares = [r["rep_grad_share"] for r in read_jsonl(out / "metrics.jsonl") if "rep_grad_share" in r]
    assert len(shares) == 1 and shares[0] > 0
    train = _blobs()
    loss = make_loss(_cfg(), "mr2", train, 3, False)
    head, _ = fit_head(_cfg(), train, 3, loss, weight_decay=0.01, seed=0)
    one = rep_grad_share(head, loss, train, 0.1, 64, 0)
    assert rep_grad_share(head, loss, train, 0.2, 64, 0) == pytest.approx(2 * one, rel=1e-5)
    assert rep_grad_share(head, loss, train, 0.0, 64, 0) is None


def test_a_probe_chosen_on_validation_saves_its_validation_predictions_and_reports_group_by_them(
    baseline_pair, images, cache, tmp_path
):
    base, run = baseline_pair
    val = load_tensors(base / "val_predictions.safetensors")
    records = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    chosen = _chosen(base)
    best = next(r for r in records if r.get("stage") == "sweep" and r["weight_decay"] == chosen["weight_decay"])
    # the saved predictions are the chosen head's on validation: their accuracy is the one the sweep logged
    assert float((val["preds"] == val["targets"]).double().mean() * 100) == pytest.approx(best["val_overall"])
    r = json.loads((run / "report.json").read_text())
    assert r["grouping"]["method"] == "val" and r["grouping"]["selection_bias"] is False
    plain = tmp_path / "plain"
    ok(probe("--dataset", str(images), "--loss", "ce", "--no-sweep-wd", "--cache-dir", str(cache), "--out", str(plain)))
    assert not (plain / "val_predictions.safetensors").exists()  # nothing chosen on validation


def test_a_two_class_probe_and_a_class_without_test_images_finish_with_their_report(tmp_path, cache):
    two = make_image_folder(tmp_path / "two", num_classes=2, per_class=8, size=32)
    out = tmp_path / "run2"
    ok(probe("--dataset", str(two), "--cache-dir", str(cache), "--out", str(out)))  # an empty "medium" group
    assert json.loads((out / "report.json").read_text())["summary"]["groups"]["medium"]["accuracy"] is None
    three = make_image_folder(tmp_path / "three", num_classes=3, per_class=8, size=32)
    shutil.rmtree(next(p for p in sorted((three / "test").iterdir())))  # one class has no test images
    out = tmp_path / "run3"
    ok(probe("--dataset", str(three), "--cache-dir", str(cache), "--out", str(out)))
    assert (out / "report.md").is_file()


def test_an_unknown_dataset_name_is_reported_before_any_weights_are_looked_for(tmp_path, cache, monkeypatch):
    import mr2ft.backbones as backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the dataset was checked")

    monkeypatch.setattr(backbones, "load_backbone", no_backbone)
    result = probe("--dataset", "cifar1000", "--cache-dir", str(cache), "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "cifar1000" in result.output, result.output
