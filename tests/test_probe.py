"""`mr2ft probe` end to end through the CLI, with tiny random backbones and generated image folders."""

from __future__ import annotations

import json
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
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "final"]
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


def test_groups_come_from_a_baseline_run(images, cache, tmp_path):
    base, run = tmp_path / "ce", tmp_path / "mr2"
    ok(probe("--dataset", str(images), "--loss", "ce", "--cache-dir", str(cache), "--out", str(base)))
    ok(
        probe(
            "--dataset",
            str(images),
            "--loss",
            "mr2",
            "--cache-dir",
            str(cache),
            "--out",
            str(run),
            "--baseline",
            str(base),
        )
    )
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
