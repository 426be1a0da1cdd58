"""Fine-tune switches: validation records and predictions, zero-shot prompts, trackers, progress, speed and memory
switches, weight EMA, timm optimizers and the lr floor. CPU only, tiny random models at 32 px (tests/_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import load_tiny
from test_finetune import error_line, finetune_args, model_flags, ok

from mr2ft.io import load_tensors, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def per_class_accuracy(targets: torch.Tensor, preds: torch.Tensor, k: int) -> list[float | None]:
    """A plain loop: percent correct per class, None for a class without images."""
    out: list[float | None] = []
    for c in range(k):
        mine = [int(p) == c for p, t in zip(preds, targets, strict=True) if int(t) == c]
        out.append(100.0 * sum(mine) / len(mine) if mine else None)
    return out


# ---- validation records and predictions ------------------------------------------------------------------------------


def test_validation_records_hold_per_class_accuracy_and_the_reported_models_predictions(
    images: Path, models: Path, tmp_path: Path
) -> None:
    run, base = tmp_path / "run", tmp_path / "base"
    flags = model_flags("timm", models)
    ok(finetune_args(run, images, flags, "--loss", "mr2", "--val-fraction", "0.34", "--epochs", "3"))
    ok(finetune_args(base, images, flags, "--loss", "ce", "--val-fraction", "0.34", "--epochs", "1"))
    records = read_jsonl(run / "metrics.jsonl")
    val = [r for r in records if r.get("split") == "val"]
    assert len(val) == 3 and all(len(r["per_class_accuracy"]) == 3 for r in val)
    saved = load_tensors(run / "val_predictions.safetensors")
    assert set(saved) == {"targets", "preds", "topk"} and saved["targets"].shape == (6,)  # 2 per class held out
    final = records[-1]
    assert final["model"] == "best_val"
    chosen = next(r for r in val if r["epoch"] == final["model_epoch"])
    # The saved predictions are the reported (best-epoch) model's: their accuracy is that epoch's record.
    expected = per_class_accuracy(saved["targets"], saved["preds"], 3)
    assert chosen["per_class_accuracy"] == pytest.approx(expected)
    assert 100.0 * float((saved["preds"] == saved["targets"]).float().mean()) == pytest.approx(chosen["top1"])
    # report --baseline groups on the baseline's validation predictions.
    ok(["report", str(run), "--baseline", str(base), "--format", "json"])
    assert json.loads((run / "report.json").read_text())["grouping"]["method"] == "val"


def test_a_run_without_validation_writes_no_validation_predictions(images: Path, models: Path, tmp_path: Path) -> None:
    ok(finetune_args(tmp_path / "run", images, model_flags("timm", models), "--epochs", "1"))
    assert not (tmp_path / "run" / "val_predictions.safetensors").exists()
    assert all("per_class_accuracy" not in r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl"))


# ---- zero-shot head with the user's prompts ----------------------------------------------------------------------


def test_wise_ft_starts_from_a_zeroshot_head_with_custom_templates_and_names(
    images: Path, models: Path, tmp_path: Path
) -> None:
    templates, names = tmp_path / "templates.txt", tmp_path / "names.json"
    templates.write_text("a blurry photo of a {}.\nart of the {}.\n")
    names.write_text(json.dumps({"class_00": "cat", "class_02": "car"}))
    out = tmp_path / "run"
    extra = ["--loss", "ce", "--head", "zeroshot", "--wise-alpha", "0", "--epochs", "1"]
    ok(
        finetune_args(
            out, images, model_flags("clip", models), *extra, "--templates", str(templates), "--class-names", str(names)
        )
    )
    bb = load_tiny("clip", models / "clip-ref")
    prompts = ["a blurry photo of a {}.", "art of the {}."]
    expected = bb.logit_scale * bb.text_classifier(["cat", "class_01", "car"], prompts)
    head = load_tensors(out / "model_wise.safetensors")["head.weight"]  # alpha 0: exactly the zero-shot model
    assert torch.allclose(head, expected, atol=1e-5)
    assert not torch.allclose(head, bb.logit_scale * bb.text_classifier(["cat", "class_01", "car"]), atol=1e-3)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--templates", "t.txt"], "--head zeroshot"),
        (["--head", "zeroshot", "--templates", "missing.txt"], "missing.txt"),
        (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr"),
    ],
)
def test_prompt_and_floor_mistakes_are_one_line(
    extra: list[str], needle: str, images: Path, models: Path, tmp_path: Path
) -> None:
    from test_finetune import invoke

    line = error_line(invoke(finetune_args(tmp_path / "run", images, model_flags("clip", models), *extra)))
    assert needle in line
    assert not (tmp_path / "run").exists()


def test_min_lr_is_the_cosine_floor(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(finetune_args(out, images, model_flags("timm", models), "--epochs", "1", "--lr", "1e-3", "--min-lr", "1e-4"))
    record = read_jsonl(out / "metrics.jsonl")[0]
    assert record["lr"] == pytest.approx(1e-4)  # 3 steps of 3: the cosine ends at the floor, not at 0
    assert np.isfinite(record["train_loss"])


# ---- experiment trackers and progress --------------------------------------------------------------------------------


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_report_to_tensorboard_logs_training_and_evaluation_scalars(images: Path, models: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = ["--loss", "mr2", "--val-fraction", "0.34", "--report-to", "tensorboard"]
    ok(finetune_args(out, images, model_flags("timm", models), *extra))
    scalars = read_scalars(out)
    for tag in ("train/loss", "train/rep", "train/lr", "train/images_per_s"):
        assert [step for step, _ in scalars[tag]] == [2, 4], tag  # 12 train images, batch 6: 2 steps per epoch
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "val"]
    for name in ("top1", "easy", "medium", "hard", "worst_class"):
        logged = [value for _, value in scalars[f"val/{name}"]]
        assert logged == pytest.approx([r[name] for r in records], abs=1e-4), name
    assert [r["train_loss"] for r in records] == pytest.approx([v for _, v in scalars["train/loss"]], rel=1e-5)
    gamma = load_tensors(out / "class_stats.safetensors")["gamma"]
    step = read_jsonl(out / "metrics.jsonl")[-1]["model_step"]  # the class statistics saved are the reported model's
    assert dict(scalars["val/gamma_std"])[step] == pytest.approx(float(gamma.std()), rel=1e-4)


@pytest.mark.parametrize(("value", "needle"), [("tensorbord", "unknown --report-to"), ("aim", "pip install aim")])
def test_unknown_or_missing_trackers_are_one_line(value: str, needle: str, images: Path, models: Path, tmp_path: Path):
    from test_finetune import invoke

    args = finetune_args(tmp_path / "run", images, model_flags("timm", models), "--report-to", value)
    assert needle in error_line(invoke(args))


def test_live_progress_bar_on_a_terminal(images: Path, models: Path, tmp_path: Path, monkeypatch) -> None:
    """On a terminal the steps and evaluations show as a live bar (and the run ends the same)."""
    from mr2ft import tracking

    seen: list[str] = []
    init, update, wrap = tracking.StepProgress.__init__, tracking.StepProgress.update, tracking.StepProgress.wrap

    def live_init(self, console, total, every, live=None):
        init(self, console, total, every, live=console is not None)

    def live_update(self, step, *rest):
        seen.append(f"step {step} live" if self.bar is not None else f"step {step} plain")
        update(self, step, *rest)

    def live_wrap(self, loader, description):
        seen.append(f"{description} live" if self.bar is not None else description)
        return wrap(self, loader, description)

    monkeypatch.setattr(tracking.StepProgress, "__init__", live_init)
    monkeypatch.setattr(tracking.StepProgress, "update", live_update)
    monkeypatch.setattr(tracking.StepProgress, "wrap", live_wrap)
    result = ok(finetune_args(tmp_path / "run", images, model_flags("timm", models), "--epochs", "1"))
    assert seen == ["step 1 live", "step 2 live", "step 3 live", "evaluate on test live"]
    assert "step 3/3" not in result.output  # no plain lines on a terminal


# ---- speed and memory switches, weight EMA ---------------------------------------------------------------------------


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from test_finetune import last_checkpoint

    return load_tensors(last_checkpoint(run) / "model.safetensors")


def test_gradient_checkpointing_gives_the_same_run(images: Path, models: Path, tmp_path: Path) -> None:
    flags = [*model_flags("timm-vit", models), "--loss", "mr2", "--drop-path", "0.2", "--epochs", "1"]
    ok(finetune_args(tmp_path / "plain", images, flags))
    ok(finetune_args(tmp_path / "ckpt", images, flags, "--grad-checkpointing"))
    plain, ckpt = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")
    for key in plain:  # the activations are recomputed with the same RNG state: the same gradients
        assert torch.allclose(plain[key], ckpt[key], atol=1e-6), key


def test_models_without_gradient_checkpointing_are_refused_in_one_line() -> None:
    from mr2ft.classifier import enable_grad_checkpointing
    from mr2ft.errors import UserError

    with pytest.raises(UserError, match="drop --grad-checkpointing"):
        enable_grad_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), "tiny")


def test_compile_and_channels_last_train_the_same_model(images: Path, models: Path, tmp_path: Path) -> None:
    flags = [*model_flags("timm", models), "--loss", "ce", "--epochs", "1"]
    ok(finetune_args(tmp_path / "plain", images, flags))
    ok(finetune_args(tmp_path / "fast", images, flags, "--compile", "--channels-last"))
    plain, fast = final_weights(tmp_path / "plain"), final_weights(tmp_path / "fast")
    assert plain.keys() == fast.keys()  # compiled in place: the checkpoint keys are the plain model's
    for key in plain:
        assert torch.allclose(plain[key], fast[key], atol=1e-4, rtol=1e-3), key


def test_weight_ema_is_the_running_average_of_the_weights() -> None:
    from mr2ft.classifier import WeightEma

    model = torch.nn.Linear(3, 2)
    ema = WeightEma(model, 0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_model_ema_is_reported_saved_and_exact_on_resume(images: Path, models: Path, tmp_path: Path) -> None:
    from test_finetune import assert_same_run, last_checkpoint

    flags = [*model_flags("timm-vit", models), "--loss", "mr2", "--drop-path", "0.2", "--model-ema", "0.5"]
    ok(finetune_args(tmp_path / "whole", images, flags))
    ok(finetune_args(tmp_path / "parts", images, flags, "--max-steps", "4"))
    ok(["finetune", "--resume", str(tmp_path / "parts"), "--num-workers", "0"])
    assert_same_run(tmp_path / "whole", tmp_path / "parts")
    whole, parts = (load_tensors(last_checkpoint(tmp_path / r) / "ema.safetensors") for r in ("whole", "parts"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    assert not all(torch.equal(whole[k], v) for k, v in final_weights(tmp_path / "whole").items())  # not the raw
    records = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert all({"top1", "hard", "worst_class"} <= set(r["ema"]) for r in records)  # each evaluation and the final


# ---- optimizers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_timm_optimizers_keep_mr2fts_parameter_groups(name: str, images: Path, models: Path, tmp_path: Path) -> None:
    from mr2ft import optim
    from mr2ft.config import FinetuneConfig

    bb = load_tiny("timm-vit", models / "vit-opt")
    from mr2ft.classifier import Classifier

    model = Classifier(bb.model, bb.feature_dim, 3)
    cfg = FinetuneConfig(optimizer=name, lr=0.01, weight_decay=0.05, layer_decay=0.5)
    opt = optim.build_optimizer(model, bb, cfg)
    assert type(opt).__name__.lower() == name
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model.head.bias)]["weight_decay"] == 0.0 and by_id[id(model.head.weight)]["weight_decay"] == 0.05
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales[0] < scales[-1] == 1.0  # layer decay kept
    assert all(g["lr"] == pytest.approx(0.01 * g["lr_scale"]) for g in opt.param_groups)
    ok(finetune_args(tmp_path / "run", images, model_flags("timm", models), "--optimizer", name, "--epochs", "1"))


def test_an_unknown_optimizer_is_one_line_with_suggestions(images: Path, models: Path, tmp_path: Path) -> None:
    from test_finetune import invoke

    line = error_line(
        invoke(finetune_args(tmp_path / "run", images, model_flags("timm", models), "--optimizer", "lamm"))
    )
    assert "lamm" in line and "lamb" in line
