"""``mr2ft.perf``: the CPU malloc settings apply on glibc, and stand aside where the user chose otherwise."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mr2ft import perf


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(perf, "_applied", None)
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(perf.OPT_OUT, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("key", "value"),
    [(perf.OPT_OUT, "0"), ("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")],
)
def test_user_choices_win(fresh: pytest.MonkeyPatch, key: str, value: str) -> None:
    fresh.setenv(key, value)
    assert perf.keep_freed_memory() is False


def test_the_first_answer_is_kept(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv(perf.OPT_OUT, "0")
    assert perf.keep_freed_memory() is False
    fresh.delenv(perf.OPT_OUT)
    assert perf.keep_freed_memory() is False  # process-wide: decided once


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_training_steps_stop_faulting_in_fresh_pages() -> None:
    """The same CPU training step, in a fresh process each: page faults per step with and without the settings."""
    code = """
import resource, sys
import torch
from torch import nn
from mr2ft import perf
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    assert perf.keep_freed_memory()
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
    nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
)
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
def step():
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(3):
    step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10)
"""
    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        faults[mode] = float(out.stdout.split()[-1])
    # Each step's 8 MB activations: fresh pages from the kernel by default, reused memory once tuned.
    assert faults["default"] > 1000 and faults["tuned"] < faults["default"] / 4, faults
