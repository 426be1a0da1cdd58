"""Runs are deterministic on CPU for a fixed seed (issue 9): the same seed twice gives bit-identical results, another
seed gives other results. Between the two runs the process-wide RNGs are stirred, so a run that leaned on global random
state instead of its own seed would show up here."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from mr2ft.backbones import load_backbone
from mr2ft.cli import app
from mr2ft.io import load_tensors, read_jsonl

runner = CliRunner()

# --weights none on purpose: random weights are the case where determinism is easiest to lose.
TIMM = ["--backbone", "timm", "--model", "test_resnet", "--weights", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def stir_global_rngs(seed: int) -> None:
    """Move every process-wide RNG somewhere else, as other work in the same process would."""
    torch.manual_seed(seed)
    torch.rand(17)
    np.random.seed(seed)
    random.seed(seed)


def ok(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_random_weights_are_the_same_every_time_and_leave_the_callers_rng_alone() -> None:
    # "none" is fingerprinted as "random": its cached features are only valid if it is one fixed model
    stir_global_rngs(1)
    a = load_backbone("timm", "test_resnet", "none").model.state_dict()
    stir_global_rngs(2)
    expected_next = torch.rand(3)
    stir_global_rngs(2)
    b = load_backbone("timm", "test_resnet", "none").model.state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # loading drew nothing from the global generator
    assert_equal_tensors(a, b)


def test_probe_with_the_same_seed_is_bit_identical_and_another_seed_differs(images: Path, tmp_path: Path) -> None:
    common = [*TIMM, "--dataset", str(images), "--loss", "mr2", "--epochs", "4", "--batch-size", "5"]
    # a sweep on a seeded validation split, so the split and every fit depend on the seed
    common += ["--sweep-cbar", "--cbar-grid", "0.5,2", "--num-workers", "0", "--extract-batch-size", "8"]
    runs = {}
    for name, seed, stir in (("a", 0, 11), ("b", 0, 22), ("c", 1, 11)):
        stir_global_rngs(stir)
        # separate caches: the second run extracts its features again instead of reading the first one's
        out = tmp_path / name
        ok(["probe", *common, "--seed", str(seed), "--cache-dir", str(tmp_path / f"cache-{name}"), "--out", str(out)])
        runs[name] = out
    a, b, c = runs["a"], runs["b"], runs["c"]

    for name in ("head.safetensors", "predictions.safetensors", "class_stats.safetensors"):
        assert_equal_tensors(load_tensors(a / name), load_tensors(b / name))
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    cached = [
        sorted(p.relative_to(tmp_path / f"cache-{n}") for p in (tmp_path / f"cache-{n}").rglob("*.safetensors"))
        for n in "ab"
    ]
    assert cached[0] == cached[1] and cached[0]
    for rel in cached[0]:
        assert_equal_tensors(load_tensors(tmp_path / "cache-a" / rel), load_tensors(tmp_path / "cache-b" / rel))
    config_a, config_b = (yaml.safe_load((r / "config.yaml").read_text()) for r in (a, b))
    for cfg in (config_a, config_b):
        cfg.pop("out"), cfg.pop("cache_dir")
    assert config_a == config_b

    assert differs(load_tensors(a / "head.safetensors"), load_tensors(c / "head.safetensors"))


@pytest.mark.skipif(
    "finetune" not in typer.main.get_command(app).commands, reason="`mr2ft finetune` is not registered in the CLI yet"
)
def test_finetune_steps_with_the_same_seed_are_bit_identical_and_another_seed_differs(
    images: Path, tmp_path: Path
) -> None:
    from mr2ft.checkpoints import find_checkpoint

    common = [*TIMM, "--image-size", "32", "--dataset", str(images), "--loss", "mr2", "--epochs", "1"]
    # 18 images in batches of 6: three steps, with random augmentation drawing from the seeded generators
    common += ["--batch-size", "6", "--lr", "1e-3", "--num-workers", "0", "--randaugment", "rand-m9-mstd0.5"]
    runs = {}
    for name, seed, stir in (("a", 0, 11), ("b", 0, 22), ("c", 1, 11)):
        stir_global_rngs(stir)
        ok(["finetune", *common, "--seed", str(seed), "--out", str(tmp_path / name)])
        runs[name] = find_checkpoint(tmp_path / name)[1]
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.name == b.name
    for name in ("model.safetensors", "loss_rank0.safetensors"):
        assert_equal_tensors(load_tensors(a / name), load_tensors(b / name))
    for name in ("predictions.safetensors", "class_stats.safetensors"):
        assert_equal_tensors(load_tensors(tmp_path / "a" / name), load_tensors(tmp_path / "b" / name))
    assert differs(load_tensors(a / "model.safetensors"), load_tensors(c / "model.safetensors"))
