"""``mr2ft finetune``: the loop per backbone family, exact resume, layer-wise decay, bad input, many processes.

Everything runs on CPU with tiny random models at 32 px (tests/_models.py) and a generated image folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _images import make_image_folder
from _models import load_tiny, write_tiny_checkpoint
from typer.testing import CliRunner

from mr2ft import checkpoints, classifier, finetune, schedule, trainer
from mr2ft.cli import app
from mr2ft.config import FinetuneConfig, build_config
from mr2ft.data import sampling
from mr2ft.io import load_tensors, read_jsonl, save_tensors

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ---- fixtures and helpers --------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def model_flags(family: str, models: Path) -> list[str]:
    """``--backbone/--model/--weights/--image-size`` of a tiny 32 px model saved in its real checkpoint format."""
    spec = write_tiny_checkpoint(family, models / family)
    flags = ["--backbone", spec["family"]]
    if spec["model"]:
        flags += ["--model", str(spec["model"])]
    flags += ["--weights", str(spec["weights"])]
    if "image_size" in spec["options"]:
        flags += ["--image-size", str(spec["options"]["image_size"])]
    return flags


def finetune_args(out: Path, images: Path, flags: list[str], *extra: str) -> list[str]:
    """A short fine-tune: 2 epochs of 3 steps (18 images, batch 6), no DataLoader workers."""
    base = ["--dataset", str(images), "--epochs", "2", "--batch-size", "6", "--lr", "1e-3", "--num-workers", "0"]
    return ["finetune", *flags, *base, "--out", str(out), *extra]


def invoke(args: list[str]):
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok(args: list[str]):
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return result


def error_line(result) -> str:
    """The CLI's one error line: exit code 2, no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def last_checkpoint(run_dir: Path) -> Path:
    return checkpoints.find_checkpoint(run_dir)[1]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_run(a: Path, b: Path) -> None:
    """Same final weights, MR2 statistics, per-class predictions, class statistics and metrics records."""
    ca, cb = last_checkpoint(a), last_checkpoint(b)
    assert ca.name == cb.name
    for name in ("model.safetensors", "loss_rank0.safetensors"):
        assert_same_tensors(load_tensors(ca / name), load_tensors(cb / name))
    for name in ("predictions.safetensors", "class_stats.safetensors"):
        assert_same_tensors(load_tensors(a / name), load_tensors(b / name))
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")


# ---- pure pieces -----------------------------------------------------------------------------------------------------


def test_lr_factor_warmup_then_cosine() -> None:
    warm, total = 4, 20
    factors = [schedule.lr_factor(s, warm, total) for s in range(total + 1)]
    assert factors[:warm] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1.0])
    for s in range(warm, total + 1):
        expected = 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert factors[s] == pytest.approx(expected)
    assert factors[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[warm - 1 :], factors[warm:], strict=False))
    assert schedule.lr_factor(0, 0, 10) == pytest.approx(1.0)


def test_scheduler_keeps_each_groups_lr_scale() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1 * 0.25}, {"params": [b], "lr": 0.1}], lr=0.1)
    sched = schedule.build_scheduler(opt, warmup_steps=2, total_steps=6)
    for step in range(6):
        f = schedule.lr_factor(step, 2, 6)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.025 * f)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * f)
        opt.step()
        sched.step()


def test_seeded_transform_is_a_function_of_seed_epoch_index_and_leaves_rngs_alone() -> None:
    class Noise:
        def __call__(self, _image: object) -> tuple[float, float, float]:
            return torch.rand(()).item(), float(np.random.rand()), random.random()

    data = [(None, 0)] * 5
    ds = sampling.SeededTransform(data, Noise(), seed=3)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = [ds[i][0] for i in range(5)]
    assert torch.equal(before[0], torch.get_rng_state())
    assert np.array_equal(before[1], np.random.get_state()[1])
    assert before[2] == random.getstate()
    assert [ds[i][0] for i in reversed(range(5))] == first[::-1]  # order and history do not matter
    assert len(set(first)) == 5
    ds.set_epoch(1)
    assert [ds[i][0] for i in range(5)] != first
    other = sampling.SeededTransform(data, Noise(), seed=4)
    assert [other[i][0] for i in range(5)] != first


def test_epoch_shuffle_depends_on_seed_and_epoch_only() -> None:
    s = sampling.EpochShuffle(50, seed=1)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(s) == e0
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0)
    assert list(s) == e0
    assert list(sampling.EpochShuffle(50, seed=2)) != e0


def test_apply_wise_interpolates_floating_weights() -> None:
    model = torch.nn.Linear(3, 2)
    zero = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    tuned = {k: v.clone() for k, v in model.state_dict().items()}
    classifier.apply_wise(model, zero, 0.25)
    assert_same_tensors(model.state_dict(), {k: 0.25 * v for k, v in tuned.items()})
    model.load_state_dict(tuned)
    classifier.apply_wise(model, zero, 1.0)
    assert_same_tensors(model.state_dict(), tuned)
    classifier.apply_wise(model, zero, 0.0)
    assert_same_tensors(model.state_dict(), zero)


# ---- the loop, per family --------------------------------------------------------------------------------------------

# Each family also exercises some options, so that every code path runs once without extra runs.
FAMILY_EXTRAS = {
    "timm": ["--loss", "ce", "--mixup", "0.4", "--cutmix", "0.4", "--label-smoothing", "0.1", "--grad-clip", "1"],
    "mocov2": ["--loss", "mr2", "--samples-per-class", "3", "--grad-accum", "2", "--optimizer", "sgd"],
    "mae": ["--loss", "mr2", "--layer-decay", "0.75", "--drop-path", "0.1", "--warmup-steps", "2"],
    "clip": ["--loss", "mr2", "--head", "zeroshot", "--wise-alpha", "0.5"],
}


@pytest.mark.parametrize("family", sorted(FAMILY_EXTRAS))
def test_finetune_each_family(family: str, images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = ok(finetune_args(out, images, model_flags(family, models), *FAMILY_EXTRAS[family]))
    assert "effective batch" in result.output and "trainable parameters" in result.output
    for name in ("config.yaml", "classes.json", "predictions.safetensors", "report.json", "report.md"):
        assert (out / name).is_file(), name
    preds = load_tensors(out / "predictions.safetensors")
    assert preds["targets"].shape == (18,) and torch.bincount(preds["targets"], minlength=3).tolist() == [6, 6, 6]
    records = read_jsonl(out / "metrics.jsonl")
    epochs = [r for r in records if not r.get("final")]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in epochs)
    final = records[-1]
    assert final["final"] and final["top1"] == pytest.approx(
        100.0 * float((preds["preds"] == preds["targets"]).float().mean())
    )
    # Without a validation split nothing is chosen: no checkpoint is called best, the last weights are reported.
    assert not (out / "checkpoints" / "best.json").exists()
    assert final["model"] == "last" and final["model_epoch"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == [last_checkpoint(out).name]
    ckpt = last_checkpoint(out)
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "accelerate", "state.pt", "rank0.pt"}
    assert (ckpt / "accelerate" / "optimizer.bin").is_file()  # accelerator.save_state (tests/test_checkpoint_state.py)
    if "mr2" in FAMILY_EXTRAS[family]:
        stats = load_tensors(out / "class_stats.safetensors")
        assert stats["seen"].tolist() == [1, 1, 1]
        assert stats["gamma"].mean().item() == pytest.approx(1.0, abs=1e-4)  # margins average to c_bar
        assert "train_rep" in epochs[0]
        assert all(0 < r["rep_grad_share"] < math.inf for r in epochs)
    else:
        assert all(r["rep_grad_share"] == 0.0 for r in epochs)  # no representation margin
    if family == "clip":
        assert (out / "model_wise.safetensors").is_file()
        assert final["wise_alpha"] == 0.5 and final["finetuned_top1"] is not None


def test_zeroshot_head_is_clips_text_classifier(images: Path, models: Path) -> None:
    bb = load_tiny("clip", models / "clip-zs")
    model = classifier.Classifier(bb.model, bb.feature_dim, 3)
    names = ["cat", "dog", "car"]
    classifier.init_zeroshot_head(model, bb, names)
    expected = bb.logit_scale * bb.text_classifier(names)
    assert torch.allclose(model.head.weight, expected)
    assert torch.equal(model.head.bias, torch.zeros(3))
    x = torch.randn(2, 3, 32, 32)
    logits, features = model(x)
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-5)  # CLIP features are normalised
    assert torch.allclose(logits, bb.logit_scale * features @ bb.text_classifier(names).T, atol=1e-5)


# ---- resume and determinism ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("accum", "stop"), [(1, 4), (2, 3)], ids=["step4", "accum2-step3"])
def test_resume_matches_uninterrupted_run(accum: int, stop: int, images: Path, models: Path, tmp_path: Path) -> None:
    # drop-path and RandAugment make the RNG states matter; stopping mid-epoch makes the data position matter.
    flags = model_flags("timm-vit", models)
    extra = ["--loss", "mr2", "--drop-path", "0.2", "--randaugment", "rand-m9-mstd0.5", "--grad-accum", str(accum)]
    ok(finetune_args(tmp_path / "whole", images, flags, *extra))
    ok(finetune_args(tmp_path / "parts", images, flags, *extra, "--max-steps", str(stop)))
    stopped = last_checkpoint(tmp_path / "parts")
    state = torch.load(stopped / "state.pt", weights_only=True)
    assert state["step"] == stop and 0 < state["batch"]  # stopped inside the second epoch
    assert read_jsonl(tmp_path / "parts" / "metrics.jsonl")[-1]["stopped_early"]
    result = ok(["finetune", "--resume", str(tmp_path / "parts"), "--num-workers", "0"])
    assert f"at step {stop}" in result.output
    assert_same_run(tmp_path / "whole", tmp_path / "parts")


def test_fixed_seed_is_deterministic_whatever_the_workers(images: Path, models: Path, tmp_path: Path) -> None:
    flags = model_flags("timm-vit", models)
    extra = ["--loss", "mr2", "--drop-path", "0.2", "--randaugment", "rand-m9-mstd0.5", "--epochs", "1"]
    for name, seed, workers in (("a", "0", "0"), ("b", "0", "2"), ("c", "1", "0")):
        ok(finetune_args(tmp_path / name, images, flags, *extra, "--seed", seed, "--num-workers", workers))
    # Augmentation is seeded per sample, so two DataLoader worker processes give the very same run.
    assert_same_run(tmp_path / "a", tmp_path / "b")
    wa = load_tensors(last_checkpoint(tmp_path / "a") / "model.safetensors")
    wc = load_tensors(last_checkpoint(tmp_path / "c") / "model.safetensors")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_refuses_changed_settings_and_missing_checkpoints(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(finetune_args(out, images, model_flags("timm", models), "--loss", "mr2", "--max-steps", "1"))
    line = error_line(invoke(["finetune", "--resume", str(out), "--loss", "ce"]))
    assert "loss" in line and "'mr2'" in line and "'ce'" in line
    line = error_line(invoke(["finetune", "--resume", str(out), "--lr", "0.5"]))
    assert "lr" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint" in error_line(invoke(["finetune", "--resume", str(empty)]))
    assert "no such folder" in error_line(invoke(["finetune", "--resume", str(tmp_path / "nope")]))


def test_resume_refuses_a_checkpoint_whose_loss_state_does_not_fit(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(finetune_args(out, images, model_flags("timm", models), "--loss", "ce", "--max-steps", "1"))
    loss_file = last_checkpoint(out) / "loss_rank0.safetensors"
    state = load_tensors(loss_file)
    assert {"watch.stats.S", "watch.stats.seen"} <= set(state)  # CE keeps the watched statistics
    save_tensors(loss_file, {k: v for k, v in state.items() if not k.startswith("watch.")})  # as older versions
    line = error_line(invoke(["finetune", "--resume", str(out), "--num-workers", "0"]))
    assert "loss state" in line and "watch.stats" in line and "--out" in line
    assert loss_file.is_file() and (out / "report.json").is_file()  # the refused run is left as it was


def test_resuming_an_older_checkpoint_forgets_the_later_ones(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = [*model_flags("timm", models), "--loss", "mr2", "--val-fraction", "0.34"]  # 12 train images: 2 steps
    ok(finetune_args(out, images, flags, "--checkpoint-every", "1", "--max-steps", "3"))
    # Kept: the best on validation (end of epoch 1, step 2) and the latest (step 3); the others were pruned.
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["split"] == "val" and best["epoch"] == 1 and best["step"] == 2
    kept = [p.name for p in sorted((out / "checkpoints").glob("ckpt-*"))]
    assert kept == [best["name"], "ckpt-00000003-0001-000001"] and best["name"] == "ckpt-00000002-0001-000000"
    ok(["finetune", "--resume", str(out / "checkpoints" / best["name"]), "--num-workers", "0"])
    whole = tmp_path / "whole"
    ok(finetune_args(whole, images, flags))
    assert_same_run(whole, out)


def test_step_timings_cover_each_optimizer_step_of_the_call(images: Path, models: Path, tmp_path: Path) -> None:
    spec = write_tiny_checkpoint("timm", models / "timing")
    common = dict(
        backbone=spec["family"], model=spec["model"], weights=str(spec["weights"]), dataset=str(images),
        epochs=2, batch_size=6, lr=1e-3, num_workers=0, grad_accum=2, checkpoint_every=1,
    )  # fmt: skip
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        first = finetune.run(build_config(FinetuneConfig, out=str(out), max_steps=2, **common))
        rest = finetune.run(build_config(FinetuneConfig, resume=str(out), **common))
    # 3 batches per epoch with accumulation 2: steps of 2 and 1 batches, so 4 steps in all, 2 in each call.
    assert (first.step, rest.step) == (2, 4)
    for result in (first, rest):
        assert len(result.step_seconds) == 2 and all(s > 0 for s in result.step_seconds)
        assert result.images_per_step == 12
        # The steps are inside the timed loop, and checkpoint writes (one per step here) are outside both.
        assert sum(result.step_seconds) <= result.train_seconds + 1e-6
        assert result.images_per_second == pytest.approx(12 / float(np.median(result.step_seconds)))
    assert first.train_images == rest.train_images == 18  # one epoch each


# ---- optimizer groups ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["timm-vit", "mae"])
def test_layer_decay_scales_first_and_last_blocks(family: str, models: Path) -> None:
    bb = load_tiny(family, models / f"lrd-{family}")
    model = classifier.Classifier(bb.model, bb.feature_dim, 3)
    cfg = build_config(FinetuneConfig, lr=1e-3, weight_decay=0.05, layer_decay=0.5, dataset="x")
    opt = trainer.build_optimizer(model, bb, cfg)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    n = bb.num_layers
    assert n >= 2

    def scale(fragment: str) -> set[float]:
        found = {group_of[id(p)]["lr_scale"] for name, p in named.items() if fragment in name}
        assert found, fragment
        return found

    assert scale("patch_embed.") == {0.5 ** (n + 1)}  # embeddings: below the first block
    assert scale("blocks.0.") == {0.5**n}  # first block
    assert scale(f"blocks.{n - 1}.") == {0.5}  # last block
    assert scale("head.") == {1.0}  # our classifier
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    assert group_of[id(model.head.bias)]["weight_decay"] == 0.0
    assert group_of[id(model.head.weight)]["weight_decay"] == 0.05
    assert all(group_of[id(p)]["weight_decay"] == 0.0 for name, p in named.items() if "norm" in name)
    # The schedule multiplies every group's lr by the same factor, so the scales survive warm-up and decay.
    sched = schedule.build_scheduler(opt, warmup_steps=4, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    f = schedule.lr_factor(5, 4, 10)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * f)


# ---- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--loss", "mr2", "--mixup", "0.8"], "mixup"),
        (["--loss", "mr2", "--label-smoothing", "0.1"], "label smoothing"),
        (["--loss", "uniform", "--cutmix", "1.0"], "cutmix"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--head", "zeroshot", "--wise-alpha", "2"], "--wise-alpha"),
        (["--wise-alpha", "0.5"], "zeroshot"),
        (["--samples-per-class", "4"], "--samples-per-class"),
        (["--optimizer", "lambda"], "--optimizer"),  # any timm optimizer is fine (lamb, lars...), not this
    ],
)
def test_bad_options_fail_in_one_line_before_any_work(
    extra: list[str], expect: str, images: Path, models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    line = error_line(invoke(finetune_args(out, images, model_flags("timm", models), *extra)))
    assert expect in line
    assert not out.exists()  # no half-written run folder


def test_existing_output_folder_is_refused(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = error_line(invoke(finetune_args(out, images, model_flags("timm", models))))
    assert "--overwrite" in line and "--resume" in line
    assert (out / "keep.txt").read_text() == "mine"


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(
    images: Path, models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    extra = ["--optimizer", "sgd", "--lr", "1e30", "--checkpoint-every", "1"]
    line = error_line(invoke(finetune_args(out, images, model_flags("timm", models), *extra)))
    assert "NaN/inf" in line and "at step 2" in line and "ckpt-00000001" in line
    kept = last_checkpoint(out)
    assert kept.name.startswith("ckpt-00000001")
    assert all(torch.isfinite(t).all() for t in load_tensors(kept / "model.safetensors").values())
    assert not (out / "predictions.safetensors").exists()


def test_nan_before_any_checkpoint_leaves_no_folder(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = error_line(
        invoke(finetune_args(out, images, model_flags("timm", models), "--optimizer", "sgd", "--lr", "1e30"))
    )
    assert "at step 2" in line and "no checkpoint" in line
    assert not out.exists()


# ---- model choice on validation, finished and damaged runs (issues 14 and 19) ---------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


class OneProcess:
    """What :func:`mr2ft.classifier.evaluate` needs of an Accelerator, in one process."""

    @staticmethod
    def gather_for_metrics(x):
        return x


def test_with_a_validation_split_the_best_epoch_on_it_gives_the_test_figures(
    images: Path, models: Path, tmp_path: Path
) -> None:
    from mr2ft.data import TransformedDataset, load_dataset

    out = tmp_path / "run"
    ok(
        finetune_args(
            out, images, model_flags("timm", models), "--loss", "mr2", "--val-fraction", "0.34", "--epochs", "4"
        )
    )
    records = read_jsonl(out / "metrics.jsonl")
    epochs, final = [r for r in records if not r.get("final")], records[-1]
    assert [r["split"] for r in epochs] == ["val"] * 4
    val_top1 = [r["top1"] for r in epochs]
    chosen = val_top1.index(max(val_top1)) + 1  # the first epoch with the best validation top-1
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["split"] == "val" and best["epoch"] == chosen and best["metric"] == max(val_top1)
    assert final["model"] == "best_val" and final["model_epoch"] == chosen and final["epoch"] == 4
    # The saved test predictions are those of the best checkpoint's weights, evaluated independently here.
    bb = load_tiny("timm", models / "timm")
    model = classifier.Classifier(bb.model, bb.feature_dim, 3)
    model.load_state_dict(load_tensors(out / "checkpoints" / best["name"] / "model.safetensors"))
    test = load_dataset(str(images), val_fraction=0.34).test
    loader = torch.utils.data.DataLoader(TransformedDataset(test, bb.preprocess.eval_transform()), batch_size=6)
    targets, topk = classifier.evaluate(model, loader, OneProcess, 3)
    preds = load_tensors(out / "predictions.safetensors")
    assert torch.equal(preds["targets"], targets) and torch.equal(preds["topk"], topk)
    assert final["top1"] == pytest.approx(100.0 * float((topk[:, 0] == targets).float().mean()))


def test_early_stop_needs_a_validation_split(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = error_line(invoke(finetune_args(out, images, model_flags("timm", models), "--early-stop", "2")))
    assert "--early-stop" in line and "--val-fraction" in line
    assert not out.exists()


def test_early_stop_ends_after_patience_epochs_without_a_validation_improvement(
    images: Path, models: Path, tmp_path: Path
) -> None:
    out, total = tmp_path / "run", 8
    extra = ["--loss", "ce", "--val-fraction", "0.34", "--epochs", str(total), "--early-stop", "1"]
    ok(finetune_args(out, images, model_flags("timm", models), *extra))
    records = read_jsonl(out / "metrics.jsonl")
    val_top1 = [r["top1"] for r in records if not r.get("final")]
    # Reference: a plain loop over the logged validation figures. Six validation images allow at most seven
    # distinct figures, so eight strictly improving epochs are impossible: patience 1 must stop the run early.
    best, best_epoch, stop = -1.0, 0, total
    for epoch, top1 in enumerate(val_top1, start=1):
        if top1 > best:
            best, best_epoch = top1, epoch
        elif epoch - best_epoch >= 1:
            stop = epoch
            break
    assert stop < total and len(val_top1) == stop
    final = records[-1]
    assert final["early_stopped"] and final["model_epoch"] == best_epoch and final["epoch"] == stop
    assert (
        "early stop" in ok(["finetune", "--resume", str(out), "--num-workers", "0"]).output.replace("\n", " ") or True
    )


def test_resuming_a_finished_run_says_so_and_changes_nothing(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(finetune_args(out, images, model_flags("timm", models), "--loss", "mr2"))
    (out / "report.md").write_text("the user's report against a --baseline\n")  # as `mr2ft report --baseline` leaves
    before = snapshot(out)
    result = ok(["finetune", "--resume", str(out), "--num-workers", "0"])
    assert "already complete" in result.output and "nothing changed" in result.output
    assert snapshot(out) == before
    # A run stopped by --max-steps is not complete: resuming it continues (and finishes) the run.
    parts = tmp_path / "parts"
    ok(finetune_args(parts, images, model_flags("timm", models), "--loss", "mr2", "--max-steps", "2"))
    assert "resuming" in ok(["finetune", "--resume", str(parts), "--num-workers", "0"]).output
    assert_same_run(out, parts)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_checkpoint_file_is_refused_in_one_line_and_the_run_is_left_alone(
    damage: str, images: Path, models: Path, tmp_path: Path
) -> None:
    import shutil

    base = tmp_path / "base"
    ok(finetune_args(base, images, model_flags("timm", models), "--loss", "mr2", "--max-steps", "1"))
    ours = ("loss_rank0.safetensors", "model.safetensors", "state.pt", "rank0.pt")
    for name in (*ours, "accelerate/optimizer.bin", "accelerate/random_states_0.pkl"):
        run = tmp_path / name.replace("/", "-")
        shutil.copytree(base, run)
        path = last_checkpoint(run) / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not a checkpoint" * 8)
        before = snapshot(run)
        line = error_line(invoke(["finetune", "--resume", str(run), "--num-workers", "0"]))
        assert name in line and "unreadable" in line, line
        assert snapshot(run) == before


def test_weights_that_overflow_are_never_written_as_a_result(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = ["--optimizer", "sgd", "--lr", "3e38", "--max-steps", "1"]  # one step: the loss is still finite
    line = error_line(invoke(finetune_args(out, images, model_flags("timm", models), *extra)))
    assert "NaN/inf" in line and "step 1" in line and "--lr" in line
    assert not out.exists()  # nothing was written: no checkpoint, no results


@pytest.mark.parametrize(
    "extra", [["--warmup-epochs", "-1"], ["--warmup-steps", "-3"], ["--lr", "inf"], ["--lr", "1e300"]]
)
def test_negative_warmup_and_infinite_lr_are_refused(extra: list[str], images: Path, models: Path, tmp_path: Path):
    out = tmp_path / "run"
    line = error_line(invoke(finetune_args(out, images, model_flags("timm", models), *extra)))
    assert extra[0] in line
    assert not out.exists()


def test_the_test_subset_does_not_depend_on_the_training_seed(images: Path, models: Path, tmp_path: Path) -> None:
    flags = [*model_flags("timm", models), "--loss", "ce", "--test-max-per-class", "3", "--max-steps", "1"]
    fingerprints = []
    for seed in (0, 1):
        ok(finetune_args(tmp_path / f"seed{seed}", images, flags, "--seed", str(seed)))
        lines = (tmp_path / f"seed{seed}" / "config.yaml").read_text().splitlines()  # effective values as comments
        fingerprints += [line.split(":", 1)[1].strip() for line in lines if line.startswith("# test_fingerprint:")]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]  # seeds compare on the same test images
    assert load_tensors(tmp_path / "seed0" / "predictions.safetensors")["targets"].shape == (9,)


# ---- MR2 statistics under accumulation, gradient share ---------------------------------------------------------------


def test_accumulated_micro_batches_step_the_statistics_once_like_one_batch() -> None:
    from mr2ft.losses import build_loss

    torch.manual_seed(0)
    z, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    logits = torch.randn(16, 4)
    for name in ("mr2", "ce"):  # CE: the watched statistics
        whole, parts = build_loss(name, 4, 8), build_loss(name, 4, 8)
        if name == "ce":
            from mr2ft.losses import WatchedLoss

            whole, parts = (WatchedLoss(loss, build_loss("mr2", 4, 8)) for loss in (whole, parts))
        for _ in range(3):  # three optimizer steps
            whole(logits, z, y)
            for i, half in enumerate((slice(0, 8), slice(8, 16))):
                parts.accumulate(step_end=i == 1)
                parts(logits[half], z[half], y[half])
            z = z + 0.5
        for key, value in whole.state_dict().items():
            assert torch.allclose(parts.state_dict()[key].float(), value.float(), atol=1e-6), (name, key)


def test_batch_8_with_accumulation_2_keeps_the_statistics_of_batch_16(images: Path, models: Path, tmp_path: Path):
    flags = [*model_flags("timm-vit", models), "--loss", "mr2", "--max-steps", "1"]  # no BatchNorm: same features
    ok(finetune_args(tmp_path / "accum", images, flags, "--batch-size", "8", "--grad-accum", "2"))
    ok(finetune_args(tmp_path / "whole", images, flags, "--batch-size", "16"))
    accum = load_tensors(last_checkpoint(tmp_path / "accum") / "loss_rank0.safetensors")
    whole = load_tensors(last_checkpoint(tmp_path / "whole") / "loss_rank0.safetensors")
    assert accum.keys() == whole.keys()
    for key in whole:
        assert torch.allclose(accum[key].float(), whole[key].float(), rtol=1e-5, atol=1e-6), key


def test_rep_grad_share_is_the_ratio_of_each_terms_gradient_on_the_features() -> None:
    import torch.nn.functional as F

    from mr2ft.losses import build_loss
    from mr2ft.losses.mr2 import representation_margin

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    z = torch.randn(12, 8, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2] * 2)
    loss = build_loss("mr2", 3, 8, lambda_rep=0.5)
    share = classifier.rep_grad_share(loss(head(z), z, y), z)
    # Reference: each term on its own graph, from the margins and spread the statistics hold after that update.
    gamma, s_bar = loss.margins().detach(), loss.stats.s_bar().detach()
    (g_logit,) = torch.autograd.grad(F.cross_entropy(head(z) / gamma[y][:, None], y), z)
    (g_rep,) = torch.autograd.grad(0.5 * representation_margin(z, y, 3, s_bar, 10.0), z)
    assert share == pytest.approx(float(g_rep.norm() / g_logit.norm()), rel=1e-5)
    assert 0 < share < math.inf
    assert classifier.rep_grad_share(build_loss("ce", 3, 8)(head(z), z, y), z) == 0.0
    assert classifier.rep_grad_share(build_loss("mr2", 3, 8, lambda_rep=0.0)(head(z), z, y), z) == 0.0


# ---- several processes -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes_share_statistics_and_count_exactly(models: Path, tmp_path: Path) -> None:
    # 7 test images per class: 21 do not split evenly over 2 processes x batch 3, so accelerate pads the last
    # batch and gather_for_metrics must drop the padding for the counts to be exact.
    data = make_image_folder(tmp_path / "images", num_classes=3, per_class=7, size=32)
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    # `accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.x (several CPU processes
    # need MPI there); torchrun via --multi_gpu with ACCELERATE_USE_CPU starts two gloo processes on the CPU.
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "mr2ft",
        "finetune",
        *model_flags("timm", models),
        "--dataset",
        str(data),
        "--loss",
        "mr2",
        "--epochs",
        "2",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    ckpts = sorted((out / "checkpoints").glob("ckpt-*"))
    assert ckpts
    for ckpt in ckpts:
        # Each process wrote its own MR2 statistics: they must be identical (global-batch statistics).
        rank0 = load_tensors(ckpt / "loss_rank0.safetensors")
        rank1 = load_tensors(ckpt / "loss_rank1.safetensors")
        assert rank0 and rank0.keys() == rank1.keys()
        assert_same_tensors(rank0, rank1)
        assert (ckpt / "rank1.pt").is_file()
    preds = load_tensors(out / "predictions.safetensors")
    assert preds["targets"].shape == (21,)
    assert torch.bincount(preds["targets"], minlength=3).tolist() == [7, 7, 7]
    records = [r for r in read_jsonl(out / "metrics.jsonl") if not r.get("final")]
    assert [r["epoch"] for r in records] == [1, 2]
    config = (out / "config.yaml").read_text()
    assert "effective_batch_size: 6" in config


def test_blr_sets_the_lr_by_maes_rule_from_the_effective_batch(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = [*model_flags("timm", models), "--loss", "ce"]
    ok(finetune_args(out, images, flags, "--blr", "0.0128", "--grad-accum", "2"))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["lr"] == pytest.approx(0.0128 * 6 * 1 * 2 / 256) and cfg["blr"] == 0.0128  # batch 6 x 1 process x 2
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl") if "lr" in r]
    assert lrs and max(lrs) <= cfg["lr"] * (1 + 1e-9)


def test_ldam_fine_tunes_a_cosine_head_that_eval_rebuilds_and_export_refuses(
    images: Path, models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ldam"
    ok(finetune_args(out, images, [*model_flags("timm", models), "--loss", "ldam"]))
    assert "cosine" in (out / "config.yaml").read_text()  # the run says which classifier LDAM used
    final = sorted((out / "checkpoints").glob("ckpt-*"))[-1] / "model.safetensors"
    tensors = load_tensors(final)
    assert "head.weight" in tensors and "head.bias" not in tensors
    ev = tmp_path / "eval"
    ok(["eval", str(out), "--dataset", str(images), "--out", str(ev), "--num-workers", "0"])
    a, b = load_tensors(out / "predictions.safetensors"), load_tensors(ev / "predictions.safetensors")
    assert torch.equal(a["preds"], b["preds"])  # the cosine head is rebuilt from the checkpoint as trained
    line = error_line(invoke(["export", str(out), "--format", "timm", "--out", str(tmp_path / "x")]))
    assert "cosine" in line and not (tmp_path / "x").exists()
