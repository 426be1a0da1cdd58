"""`mr2ft probe --report-to`: the head fits' records and the test figures reach Accelerate's trackers (TensorBoard's
event files are read back), metrics.jsonl is unchanged, and a bad tracker is one line before any work. CPU only,
timm's tiny random test_resnet on 32 px images (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_finetune import error_line, invoke, ok
from test_finetune_switches import read_scalars

from mr2ft import probe
from mr2ft.io import load_tensors, read_jsonl
from mr2ft.tracking import TrackedRecords

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TIMM = ["--backbone", "timm", "--model", "test_resnet", "--weights", "none"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def probe_args(out: Path, images: Path, cache: Path, *extra: str) -> list[str]:
    """An MR2 probe choosing weight decay among two values, then a final fit of 3 epochs (1 step each)."""
    fast = ["--epochs", "3", "--num-workers", "0", "--extract-batch-size", "18", "--wd-grid", "0.01,0.1"]
    return ["probe", *TIMM, "--dataset", str(images), "--loss", "mr2", *fast, "--cache-dir", str(cache),
            "--out", str(out), *extra]  # fmt: skip


def fit_records(records: list[dict], stage: str) -> list[dict]:
    return [r for r in records if r.get("stage") == stage and "step" in r]


def test_report_to_tensorboard_logs_the_head_fits_and_the_test_figures(images: Path, cache: Path, tmp_path: Path):
    tracked, plain = tmp_path / "tracked", tmp_path / "plain"
    ok(probe_args(tracked, images, cache, "--report-to", "tensorboard"))
    ok(probe_args(plain, images, cache))
    records = read_jsonl(tracked / "metrics.jsonl")
    assert records == read_jsonl(plain / "metrics.jsonl")  # the trackers change nothing in metrics.jsonl
    assert not list(plain.rglob("events.out.tfevents.*")) and not (plain / "mr2ft").exists()  # none by default
    assert list((tracked / "mr2ft").rglob("events.out.tfevents.*"))
    scalars = read_scalars(tracked)

    final = fit_records(records, "final")
    for key in ("train_loss", "lr"):
        logged = scalars[f"probe/final/{key}"]
        assert [s for s, _ in logged] == [r["step"] for r in final] == [1, 2, 3], key
        assert [v for _, v in logged] == pytest.approx([r[key] for r in final], rel=1e-6), key
    # A sweep logs one record per grid point (not its fits): one step each.
    points = [r for r in records if r.get("stage") == "sweep"]
    assert [s for s, _ in scalars["probe/sweep/val_overall"]] == [0, 1]
    assert [v for _, v in scalars["probe/sweep/val_overall"]] == pytest.approx([r["val_overall"] for r in points])
    assert [v for _, v in scalars["probe/sweep/weight_decay"]] == pytest.approx([0.01, 0.1])
    assert scalars["probe/final/rep_grad_share"][0][0] == 3  # at the end of the fit it describes

    summary = json.loads((tracked / "report.json").read_text())["summary"]
    figures = {
        "top1": summary["top1"],
        "balanced_accuracy": summary["balanced_accuracy"],
        "worst_class": summary["worst_class"]["accuracy"],
        **{g: summary["groups"][g]["accuracy"] for g in ("easy", "medium", "hard") if g in summary["groups"]},
        "gamma_std": float(load_tensors(tracked / "class_stats.safetensors")["gamma"].std()),
    }
    assert {"easy", "hard"} <= set(figures)
    for name, value in figures.items():
        assert scalars[f"test/{name}"] == [(3, pytest.approx(value, rel=1e-5))], name


@pytest.mark.parametrize(("value", "needle"), [("tensorbord", "unknown --report-to"), ("aim", "pip install aim")])
def test_a_bad_tracker_is_one_line_before_any_work(value, needle, images, cache, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("data or weights were loaded before --report-to was checked")

    monkeypatch.setattr(probe, "prepare", no_work)
    out = tmp_path / "run"
    assert needle in error_line(invoke(probe_args(out, images, cache, "--report-to", value)))
    assert not out.exists()


def test_the_trackers_end_when_the_probe_fails(images, cache, tmp_path, monkeypatch):
    from accelerate import Accelerator

    ended, end_training = [], Accelerator.end_training

    def fail(cfg, data, log_to, **kwargs):
        log_to({"stage": "final", "epoch": 1, "step": 1, "train_loss": 1.0, "lr": 0.1})
        raise probe.UserError("the head diverged")

    def end(self):
        ended.append(self.trackers)
        end_training(self)

    monkeypatch.setattr(probe, "fit_probe", fail)
    monkeypatch.setattr(Accelerator, "end_training", end)
    out = tmp_path / "run"
    assert "the head diverged" in error_line(invoke(probe_args(out, images, cache, "--report-to", "tensorboard")))
    assert len(ended) == 1 and len(ended[0]) == 1  # the TensorBoard writer was closed
    assert not out.exists()  # and the failed run's folder removed, event files and all


class Recorder:
    """Stands in for an Accelerator: keeps what ``log`` received."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))


def test_tracked_records_name_each_stage_and_keep_its_steps_growing(tmp_path: Path):
    acc = Recorder()
    sink = TrackedRecords(acc, tmp_path / "metrics.jsonl")
    records = [
        {"stage": "final:jtt-erm", "epoch": 1, "step": 2, "train_loss": 0.9, "lr": 0.1},
        {"stage": "final:jtt-erm", "event": "stopped", "steps": 2, "train_loss": 0.9, "converged": None},
        {"stage": "final:jtt", "epoch": 0.5, "step": 1, "train_loss": 0.8, "lr": 0.1},
        {"stage": "final:jtt", "event": "stopped", "steps": 1, "train_loss": 0.8, "converged": True},
        {"stage": "final:jtt", "epoch": 1, "step": 1, "train_loss": 0.7, "lr": 0.1},  # a second fit of the stage
        {"stage": "final:jtt", "val_overall": 50.0, "converged": False, "note": "text", "nan": float("nan")},
        {"stage": "sweep", "weight_decay": 0.01, "val_overall": 40.0},  # a stage without fits: one step each
        {"stage": "sweep", "weight_decay": 0.1, "val_overall": 60.0},
    ]
    for record in records:
        sink(record)
    assert [r["stage"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [r["stage"] for r in records]
    assert acc.logged == [
        (2, {"probe/final/jtt-erm/train_loss": 0.9, "probe/final/jtt-erm/lr": 0.1}),
        (1, {"probe/final/jtt/train_loss": 0.8, "probe/final/jtt/lr": 0.1}),
        (2, {"probe/final/jtt/train_loss": 0.7, "probe/final/jtt/lr": 0.1}),
        (2, {"probe/final/jtt/val_overall": 50.0}),
        (0, {"probe/sweep/weight_decay": 0.01, "probe/sweep/val_overall": 40.0}),
        (1, {"probe/sweep/weight_decay": 0.1, "probe/sweep/val_overall": 60.0}),
    ]
