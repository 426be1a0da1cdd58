"""Issue 9: a fine-tune killed at a random moment (SIGKILL), or stopped by Ctrl-C / SIGTERM, then resumed, ends
with the same weights, MR2 statistics and per-class results as a run that was never interrupted.

Every run is a real ``python -m mr2ft finetune`` subprocess with one thread, so the arithmetic is the same in all.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _images import make_image_folder
from _models import write_tiny_checkpoint

from mr2ft import checkpoints
from mr2ft.io import load_tensors, read_jsonl

# Seven fresh processes (each imports torch, timm and open_clip): minutes on a busy 2-core machine.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH = 4, 3  # 18 images, batch 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kill")
    images = make_image_folder(root / "images", num_classes=3, per_class=6, size=32)
    spec = write_tiny_checkpoint("timm-vit", root / "models")
    flags = ["--backbone", "timm", "--model", spec["model"], "--weights", spec["weights"], "--image-size", "32"]
    # drop-path and RandAugment make every RNG state matter; a checkpoint every step makes kills land anywhere.
    flags += ["--dataset", str(images), "--epochs", str(EPOCHS), "--batch-size", "6", "--lr", "1e-3"]
    flags += ["--loss", "mr2", "--drop-path", "0.2", "--randaugment", "rand-m9-mstd0.5", "--num-workers", "0"]
    flags += ["--checkpoint-every", "1"]
    reference = root / "reference"
    done = mr2ft(["finetune", *flags, "--out", str(reference)])
    assert done.returncode == 0, done.stdout + done.stderr
    return {"root": root, "flags": flags, "reference": reference}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def mr2ft(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mr2ft", *args], capture_output=True, text=True, env=_env(), timeout=300
    )


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "mr2ft", *args], stdout=fh, stderr=subprocess.STDOUT, env=_env())


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, min_step: int, timeout: float = 240.0) -> int:
    """Poll until a complete checkpoint of at least ``min_step`` exists; return its step."""
    deadline = time.monotonic() + timeout
    folder = run_dir / "checkpoints"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before step {min_step}"
        steps = [int(p.name.split("-")[1]) for p in folder.glob("ckpt-*")] if folder.is_dir() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint of step {min_step} within {timeout} s")


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    a, b = checkpoints.find_checkpoint(reference)[1], checkpoints.find_checkpoint(run_dir)[1]
    assert a.name == b.name
    for name in ("model.safetensors", "loss_rank0.safetensors"):
        wa, wb = load_tensors(a / name), load_tensors(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key}"
    for name in ("predictions.safetensors", "class_stats.safetensors"):
        pa, pb = load_tensors(reference / name), load_tensors(run_dir / name)
        for key in pa:
            assert torch.equal(pa[key], pb[key]), f"{name}:{key}"
    assert read_jsonl(reference / "metrics.jsonl") == read_jsonl(run_dir / "metrics.jsonl")


def kill_and_resume(flags: list[str], run_dir: Path, reference: Path) -> None:
    """kill -9 a run at a random point after a random checkpoint, resume it, and compare it with ``reference``."""
    rng = random.Random()  # a different kill point each session; the message names it
    kill_after = rng.randint(1, EPOCHS * STEPS_PER_EPOCH - 3)
    delay = rng.uniform(0.0, 0.05)  # land anywhere inside the next step, checkpoint writes included
    proc = start(["finetune", *flags, "--out", str(run_dir)], run_dir.with_name(f"{run_dir.name}.log"))
    wait_for_checkpoint(proc, run_dir, kill_after)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    where = f"killed after checkpoint {kill_after} + {delay:.3f} s"
    assert proc.returncode == -signal.SIGKILL, where
    assert not (run_dir / "predictions.safetensors").exists(), where
    resumed = mr2ft(["finetune", "--resume", str(run_dir)])
    assert resumed.returncode == 0, where + "\n" + resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout, where
    assert_same_as_reference(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a stale temporary checkpoint was left behind"


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(setup: dict) -> None:
    kill_and_resume(setup["flags"], setup["root"] / "killed", setup["reference"])


def test_sigkill_then_resume_stays_exact_with_weight_ema_and_compile(setup: dict) -> None:
    flags = [*setup["flags"], "--model-ema", "0.9", "--compile"]
    reference = setup["root"] / "reference-ema"
    done = mr2ft(["finetune", *flags, "--out", str(reference)])
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = setup["root"] / "killed-ema"
    kill_and_resume(flags, run_dir, reference)
    a, b = (checkpoints.find_checkpoint(r)[1] / "ema.safetensors" for r in (reference, run_dir))
    ea, eb = load_tensors(a), load_tensors(b)
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_a_checkpoint_and_resume_matches_uninterrupted(setup: dict, sig: signal.Signals) -> None:
    run_dir = setup["root"] / f"stopped-{sig.name}"
    log = setup["root"] / f"stop-{sig.name}.log"
    proc = start(["finetune", *setup["flags"], "--out", str(run_dir)], log)
    seen = wait_for_checkpoint(proc, run_dir, 2)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    output = log.read_text()
    assert proc.returncode == 130, output
    assert "stopped at step" in output and "--resume" in output
    assert "Traceback" not in output
    stopped = checkpoints.find_checkpoint(run_dir)[1]
    assert int(stopped.name.split("-")[1]) >= seen
    resumed = mr2ft(["finetune", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_as_reference(run_dir, setup["reference"])
