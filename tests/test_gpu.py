"""CUDA path checks (bf16 autocast, multi-worker loading, the issue 16 switches, FSDP on one GPU). Skipped without a
GPU; CI never has one.

Run them with ``scripts/gpu_check.sh`` on a machine with a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import load_tiny, write_tiny_checkpoint
from typer.testing import CliRunner

from mr2ft.cli import app
from mr2ft.features import extract_features
from mr2ft.io import load_tensors
from tests._images import make_image_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
runner = CliRunner()


def test_bf16_feature_extraction_matches_fp32(tmp_path):
    from mr2ft.data import TransformedDataset, load_dataset

    bb = load_tiny("timm-vit", tmp_path / "w")
    splits = load_dataset(str(make_image_folder(tmp_path / "img", num_classes=3, per_class=8, size=32)))
    ds = TransformedDataset(splits.train, bb.preprocess.eval_transform())
    gpu, _ = extract_features(bb.model, ds, batch_size=8, num_workers=4, device=torch.device("cuda"), progress=False)
    cpu, _ = extract_features(bb.model, ds, batch_size=8, num_workers=0, device=torch.device("cpu"), progress=False)
    cos = torch.nn.functional.cosine_similarity(gpu, cpu, dim=1)
    assert cos.min() > 0.99, cos


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finetune_mixed_precision_with_workers(tmp_path, precision):
    tiny = write_tiny_checkpoint("timm-vit", tmp_path / "w")
    images = make_image_folder(tmp_path / "img", num_classes=3, per_class=8, size=32)
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--backbone",
            "timm",
            "--model",
            tiny["model"],
            "--weights",
            tiny["weights"],
            "--image-size",
            "32",
            "--dataset",
            str(images),
            "--loss",
            "mr2",
            "--batch-size",
            "6",
            "--max-steps",
            "3",
            "--num-workers",
            "4",
            "--mixed-precision",
            precision,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    stats = load_tensors(out / "class_stats.safetensors")
    assert stats["M"].dtype == torch.float32 and torch.isfinite(stats["M"]).all()
    assert json.loads((out / "report.json").read_text())["summary"]["num_images"] == 24


def test_bf16_finetune_with_compile_grad_checkpointing_ema_and_tensorboard(tmp_path):
    """The issue 16 switches together on the GPU: bf16, workers, compile, gradient checkpointing, channels_last,
    weight EMA and a TensorBoard tracker; then --resume from a --max-steps stop finishes the run."""
    tiny = write_tiny_checkpoint("timm-vit", tmp_path / "w")
    images = make_image_folder(tmp_path / "img", num_classes=3, per_class=8, size=32)
    out = tmp_path / "run"
    args = ["finetune", "--backbone", "timm", "--model", tiny["model"], "--weights", tiny["weights"]]
    args += ["--image-size", "32", "--dataset", str(images), "--loss", "mr2", "--batch-size", "6", "--epochs", "2"]
    args += ["--num-workers", "2", "--mixed-precision", "bf16", "--compile", "--grad-checkpointing", "--channels-last"]
    args += ["--model-ema", "0.9", "--report-to", "tensorboard", "--out", str(out)]
    result = runner.invoke(app, [*args, "--max-steps", "3"])
    assert result.exit_code == 0, (result.output, result.exception)
    result = runner.invoke(app, ["finetune", "--resume", str(out), "--num-workers", "2"])
    assert result.exit_code == 0, (result.output, result.exception)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["step"] == 8 and "top1" in final["ema"]
    assert list(out.rglob("events.out.tfevents.*"))


def test_fsdp_on_one_gpu_stops_and_resumes_through_save_state(tmp_path):
    """FSDP2 (accelerate launch --use_fsdp, one GPU, bf16, 2 workers): a --max-steps stop writes the model and
    optimizer shards through accelerator.save_state beside the gathered weights, and --resume finishes the run."""
    tiny = write_tiny_checkpoint("timm-vit", tmp_path / "w")
    images = make_image_folder(tmp_path / "img", num_classes=3, per_class=8, size=32)
    out = tmp_path / "run"
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--use_fsdp", "--fsdp_version", "2"]
    launch += ["--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    launch += ["--fsdp_transformer_layer_cls_to_wrap", "Block", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "mr2ft", "finetune"]
    args = ["--backbone", "timm", "--model", tiny["model"], "--weights", tiny["weights"], "--image-size", "32"]
    args += ["--dataset", str(images), "--loss", "mr2", "--batch-size", "6", "--epochs", "2", "--num-workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for run in ([*args, "--max-steps", "3", "--out", str(out)], ["--resume", str(out), "--num-workers", "2"]):
        proc = subprocess.run([*launch, *run], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "at step 3" in proc.stdout
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["step"] == 8
    ckpt = sorted((out / "checkpoints").glob("ckpt-*"))[-1]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["sharding"] == "FSDP2 SHARDED_STATE_DICT"
    assert (ckpt / "accelerate" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (ckpt / "accelerate" / "optimizer_0" / ".metadata").is_file()
    weights = load_tensors(ckpt / "model.safetensors")  # the gathered full weights, which eval and export read
    assert weights["head.weight"].shape == (3, 64) and all(torch.isfinite(v).all() for v in weights.values())
