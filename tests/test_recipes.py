"""Every shipped recipe loads, validates, and runs end to end with a tiny model in its family."""

from __future__ import annotations

import json

import pytest
import yaml
from _models import write_tiny_checkpoint
from typer.testing import CliRunner

from mr2ft import finetune, probe, study
from mr2ft.cli import app
from mr2ft.config import FinetuneConfig, ProbeConfig, StudyConfig, build_config, load_recipe, recipe_names
from tests._images import make_image_folder

runner = CliRunner()
CONFIGS = {"probe": ProbeConfig, "finetune": FinetuneConfig, "study": StudyConfig}
EXPECTED = {
    "clip-vitb16-probe",
    "clip-vitb16-finetune",
    "mae-vitb16-finetune",
    "mae-vitb16-probe",
    "mocov2-r50-probe",
    "demo",
}


def family_of(name: str) -> str:
    return {"clip": "clip", "mae": "mae", "mocov2": "mocov2", "demo": "timm"}[name.split("-")[0]]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", num_classes=3, per_class=8, size=32)


def test_every_paper_setting_has_a_recipe_and_the_cli_lists_and_shows_them():
    assert EXPECTED <= set(recipe_names())
    listed = runner.invoke(app, ["recipes", "list"])
    assert listed.exit_code == 0
    for name in EXPECTED:
        assert name in listed.output
    shown = runner.invoke(app, ["recipes", "show", "clip-vitb16-finetune"])
    assert shown.exit_code == 0
    assert yaml.safe_load(shown.output) == load_recipe("clip-vitb16-finetune")
    missing = runner.invoke(app, ["recipes", "show", "no-such-recipe"])
    assert missing.exit_code == 2 and "unknown recipe" in missing.output


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_and_validates(name, images):
    data = load_recipe(name)
    cls = CONFIGS[data["command"]]
    cfg = build_config(cls, name, dataset=str(images))
    for key, value in data.items():
        if key in ("command", "description", "dataset") or value is None:
            continue
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    {"probe": probe.validate, "finetune": finetune.validate, "study": study.validate_study}[data["command"]](cfg)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tiny_model_run_of_each_recipe(name, images, tmp_path):
    command = load_recipe(name)["command"]
    tiny = write_tiny_checkpoint(family_of(name), tmp_path / "weights")
    out = tmp_path / "run"
    args = [command, "--recipe", name, "--dataset", str(images), "--weights", tiny["weights"], "--image-size", "32"]
    args += ["--model", tiny["model"], "--out", str(out), "--epochs", "1", "--batch-size", "6", "--num-workers", "0"]
    if command in ("probe", "study"):
        args += ["--cache-dir", str(tmp_path / "cache")]
    if command == "finetune":
        args += ["--max-steps", "2", "--mixed-precision", "no"]
    if command == "study":
        args += ["--seeds", "1", "--n-boot", "50"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    written = out / ("study.json" if command == "study" else "report.json")
    assert json.loads(written.read_text())
    if command != "study":
        assert_recipe_reached_the_run(load_recipe(name), yaml.safe_load((out / "config.yaml").read_text()))


# Settings the tiny runs above type as flags over the recipe's.
OVERRIDDEN = {"command", "description", "dataset", "weights", "model", "image_size", "out", "epochs", "batch_size"}
OVERRIDDEN |= {"num_workers", "max_steps", "mixed_precision", "cache_dir"}


def assert_recipe_reached_the_run(recipe: dict, cfg: dict) -> None:
    """Every setting of the recipe that no flag overrode is the run's (its config.yaml)."""
    for key, want in recipe.items():
        if key in OVERRIDDEN or want is None:
            continue
        if key == "lr" and recipe.get("blr") is not None and recipe["command"] == "finetune":
            # with a base lr (MAE's rule) the run records the lr it resolved from blr x effective batch / 256
            want = recipe["blr"] * cfg["batch_size"] * cfg.get("grad_accum", 1) / 256
        got = cfg[key]
        assert got == (pytest.approx(want) if isinstance(want, float) else want), key


def test_switches_a_recipe_turns_on_can_be_turned_off_by_flags(images, tmp_path):
    """clip-vitb16-finetune turns on gradient checkpointing and a weight EMA; --no-grad-checkpointing and
    --model-ema 0 turn them off (FSDP refuses an EMA)."""
    recipe = load_recipe("clip-vitb16-finetune")
    assert recipe["grad_checkpointing"] is True and recipe["model_ema"] > 0
    tiny = write_tiny_checkpoint("clip", tmp_path / "weights")
    out = tmp_path / "run"
    args = ["finetune", "--recipe", "clip-vitb16-finetune", "--dataset", str(images), "--weights", tiny["weights"]]
    args += ["--model", tiny["model"], "--image-size", "32", "--out", str(out), "--epochs", "1", "--batch-size", "6"]
    args += ["--num-workers", "0", "--max-steps", "2", "--mixed-precision", "no"]
    result = runner.invoke(app, [*args, "--no-grad-checkpointing", "--model-ema", "0"])
    assert result.exit_code == 0, (result.output, result.exception)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["grad_checkpointing"] is False and cfg["model_ema"] == 0
    assert not list(out.rglob("ema.safetensors"))
    assert all("ema" not in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
