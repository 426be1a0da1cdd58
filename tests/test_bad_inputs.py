"""The bad-input matrix (issue 9): every mistake a user can make, through the CLI.

Each case must end in exit code 2 with exactly one ``error:`` line that names the problem and the fix, no traceback,
and no half-written run folder (the ``--out`` folder does not exist afterwards; a folder that existed is untouched).
With ``--debug`` the same error propagates as an exception instead, so Python prints its traceback.

Inputs are made once per module and only when a case needs them (tiny 32 px models, a 3-class image folder, one
feature cache), so the whole file stays well under a minute and a half on two cores.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from _images import corrupt_file, make_image_folder, truncate_file
from _models import write_tiny_checkpoint
from typer.testing import CliRunner

from mr2ft import runs
from mr2ft.cli import app
from mr2ft.errors import UserError
from mr2ft.io import load_tensors, read_json

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

TIMM = ["--backbone", "timm", "--model", "test_resnet", "--weights", "none"]
PROBE_FAST = ["--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--extract-batch-size", "16"]
FINETUNE_FAST = ["--image-size", "32", "--epochs", "1", "--batch-size", "6", "--lr", "1e-3", "--num-workers", "0"]


def has_command(name: str) -> bool:
    """Whether the CLI registers ``name`` (finetune cases are skipped until it does)."""
    return name in typer.main.get_command(app).commands


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- the inputs, each made on first use ----------------------------------------------------------------------------


class World:
    """Everything the cases point at, under one module-scoped folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"

    @functools.cached_property
    def images(self) -> Path:
        """3 classes x 4 images, in train/ and test/."""
        return make_image_folder(self.root / "images", num_classes=3, per_class=4, size=32)

    def _variant(self, name: str, change: Callable[[Path], object]) -> Path:
        folder = self.root / name
        shutil.copytree(self.images, folder)
        change(folder)
        return folder

    @functools.cached_property
    def empty_class(self) -> Path:
        return self._variant("empty-class", lambda d: [p.unlink() for p in (d / "train" / "class_01").iterdir()])

    @functools.cached_property
    def corrupt(self) -> Path:
        return self._variant("corrupt", lambda d: corrupt_file(d / "train" / "class_01" / "0002.png"))

    @functools.cached_property
    def truncated(self) -> Path:
        return self._variant("truncated", lambda d: truncate_file(d / "test" / "class_02" / "0001.png"))

    @functools.cached_property
    def corrupt_and_truncated(self) -> Path:
        def change(d: Path) -> None:
            corrupt_file(d / "train" / "class_01" / "0002.png")
            truncate_file(d / "test" / "class_02" / "0001.png")

        return self._variant("corrupt-and-truncated", change)

    @functools.cached_property
    def extra_test_class(self) -> Path:
        return self._variant(
            "extra-test-class", lambda d: shutil.copytree(d / "test" / "class_00", d / "test" / "zebra")
        )

    @functools.cached_property
    def models(self) -> dict[str, dict]:
        return {f: write_tiny_checkpoint(f, self.root / "models" / f) for f in ("clip", "mocov2", "timm")}

    @functools.cached_property
    def wrong_shape(self) -> Path:
        """test_resnet weights whose stem convolution takes 2 input channels instead of 3."""
        sd = torch.load(self.models["timm"]["weights"], map_location="cpu", weights_only=True)
        sd["conv1.0.weight"] = sd["conv1.0.weight"][:, :2].clone()
        path = self.root / "models" / "test_resnet_2ch.pth"
        torch.save(sd, path)
        return path

    @functools.cached_property
    def truncated_checkpoint(self) -> Path:
        data = Path(self.models["timm"]["weights"]).read_bytes()
        path = self.root / "models" / "test_resnet_cut.pth"
        path.write_bytes(data[: len(data) // 2])
        return path

    @functools.cached_property
    def recipe_with_typo(self) -> Path:
        path = self.root / "typo.yaml"
        path.write_text("loss: mr2\nepoch: 3\n", encoding="utf-8")
        return path

    @functools.cached_property
    def other_baseline(self) -> Path:
        """A finished probe run on another dataset (4 classes with other names)."""
        other = make_image_folder(self.root / "other", num_classes=4, per_class=2, class_names=["a", "b", "c", "d"])
        out = self.root / "runs" / "other-ce"
        result = runner.invoke(app, probe_args(self, out, dataset=other))
        assert result.exit_code == 0, result.output
        return out

    @functools.cached_property
    def finetune_run(self) -> Path:
        """A fine-tune with MR2 stopped after one step: a resumable run folder."""
        out = self.root / "runs" / "finetune-mr2"
        result = runner.invoke(app, finetune_args(out, self.images, "--loss", "mr2", "--max-steps", "1"))
        assert result.exit_code == 0, result.output
        return out

    def recipe(self, name: str, text: str) -> Path:
        path = self.root / "recipes" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    @functools.cached_property
    def binary(self) -> Path:
        """A binary file (a PNG) named like a recipe."""
        path = self.root / "files" / "binary.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        return path

    @functools.cached_property
    def a_file(self) -> Path:
        path = self.root / "files" / "a-file.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text("not a folder", encoding="utf-8")
        return path

    @functools.cached_property
    def read_only(self) -> Path:
        """A folder nobody may write (for root, whom permissions do not stop, see ``read_only_mount``)."""
        folder = self.root / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder

    @functools.cached_property
    def no_checkpoint(self) -> Path:
        folder = self.root / "runs" / "not-started"
        folder.mkdir(parents=True)
        return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("bad-inputs"))


def probe_args(w: World, out: Path, *extra: str, dataset: Path | None = None, backbone: list[str] = TIMM) -> list[str]:
    data = str(dataset if dataset is not None else w.images)
    return ["probe", *backbone, *PROBE_FAST, "--cache-dir", str(w.cache), "--dataset", data, "--out", str(out), *extra]


def finetune_args(out: Path, dataset: Path, *extra: str, backbone: list[str] = TIMM) -> list[str]:
    return ["finetune", *backbone, *FINETUNE_FAST, "--dataset", str(dataset), "--out", str(out), *extra]


def tiny(w: World, family: str) -> list[str]:
    spec = w.models[family]
    return ["--backbone", spec["family"], "--model", str(spec["model"]), "--weights", str(spec["weights"])]


# ---- the matrix ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (given the inputs and a fresh ``--out``), what the error line must say about
    the problem, and the words of its fix."""

    id: str
    args: Callable[[World, Path], list[str]]
    problem: tuple[str, ...]
    fix: str
    command: str = "probe"
    existing_out: bool = False  # --out already holds someone's files
    guarded: Callable[[World], list[Path]] = lambda w: []  # folders that must come out untouched
    offline_hub: bool = False  # HF_HUB_OFFLINE=1 and an empty hub cache
    read_only_mount: bool = False  # World.read_only is on a read-only file system (as root would see one)


CASES = [
    # data
    Case(
        "missing-dataset-path",
        lambda w, out: probe_args(w, out, dataset=w.root / "no-such-folder"),
        ("no-such-folder", "neither an existing folder"),
        "give a path",
    ),
    Case(
        "empty-class-folder",
        lambda w, out: probe_args(w, out, dataset=w.empty_class),
        ("class_01", "holds no images"),
        "add some or remove it",
    ),
    Case(
        "corrupt-image",
        lambda w, out: probe_args(w, out, dataset=w.corrupt),
        ("cannot read image", "class_01/0002.png", "not a format PIL can read"),
        "--skip-bad-images",
    ),
    Case(
        "truncated-image-read-in-a-worker",
        lambda w, out: probe_args(w, out, "--num-workers", "1", dataset=w.truncated),
        ("cannot read image", "class_02/0001.png", "truncated"),
        "--skip-bad-images",
    ),
    Case(
        "test-class-missing-from-train",
        lambda w, out: probe_args(w, out, dataset=w.extra_test_class),
        ("has classes that", "zebra"),
        "add them to train/",
    ),
    # backbones and weights
    Case(
        "unknown-backbone-family",
        lambda w, out: probe_args(w, out, backbone=["--backbone", "resnet", "--weights", "none"]),
        ("unknown backbone family 'resnet'", "clip, mae, mocov2, timm"),
        "valid families are",
    ),
    Case(
        "unknown-model-name",
        lambda w, out: probe_args(
            w, out, backbone=["--backbone", "timm", "--model", "resnet_9000", "--weights", "none"]
        ),
        ("unknown timm model 'resnet_9000'",),
        "did you mean resnet",
    ),
    Case(
        "unknown-clip-pretrained-tag",
        lambda w, out: probe_args(w, out, backbone=["--backbone", "clip", "--model", "ViT-B-16", "--weights", "lion9"]),
        ("unknown pretrained tag 'lion9'", "openai", "laion2b_s34b_b88k"),
        "valid tags",
    ),
    Case(
        "unknown-timm-pretrained-tag",
        lambda w, out: probe_args(w, out, backbone=["--backbone", "timm", "--model", "resnet18.lion9"]),
        ("no pretrained tag 'lion9'", "a1_in1k"),
        "its tags are",
    ),
    Case(
        "mocov2-checkpoint-given-to-mae",
        lambda w, out: probe_args(
            w, out, backbone=["--backbone", "mae", "--model", "test_vit", "--weights", w.models["mocov2"]["weights"]]
        ),
        ("moco_v2_test_resnet.pth.tar", "does not hold a MAE ViT", "encoder_q."),
        "pass a checkpoint of this family",
    ),
    Case(
        "checkpoint-of-the-wrong-shape",
        lambda w, out: probe_args(
            w, out, backbone=["--backbone", "timm", "--model", "test_resnet", "--weights", str(w.wrong_shape)]
        ),
        ("wrong shape", "conv1.0.weight (16, 2, 3, 3)"),
        "check --model",
    ),
    Case(
        "truncated-checkpoint-file",
        lambda w, out: probe_args(
            w, out, backbone=["--backbone", "timm", "--model", "test_resnet", "--weights", str(w.truncated_checkpoint)]
        ),
        ("test_resnet_cut.pth", "cannot be read"),
        "is it complete",
    ),
    Case(
        "hub-weights-with-no-network-timm",
        lambda w, out: probe_args(w, out, backbone=["--backbone", "timm", "--model", "resnet18.a1_in1k"]),
        ("found no copy", "timm/resnet18.a1_in1k", "HF_HUB_OFFLINE is set"),
        "pass a local file with --weights",
        offline_hub=True,
    ),
    Case(
        "hub-weights-with-no-network-clip",
        lambda w, out: probe_args(
            w, out, backbone=["--backbone", "clip", "--model", "ViT-B-16", "--weights", "openai"]
        ),
        ("found no copy", "ViT-B-16", "HF_HUB_OFFLINE is set"),
        "pass a local file with --weights",
        offline_hub=True,
    ),
    # option combinations and values
    Case(
        "normalize-with-p2-and-mr2-on-clip",
        lambda w, out: probe_args(w, out, "--loss", "mr2", "--normalize", "--p", "2", backbone=tiny(w, "clip")),
        ("p=2", "same margin"),
        "--p 5",
    ),
    Case(
        "mixup-with-mr2",
        lambda w, out: finetune_args(out, w.images, "--loss", "mr2", "--mixup", "0.4"),
        ("mixup", "soft targets", "hard labels"),
        "use --loss ce",
        command="finetune",
    ),
    Case(
        "label-smoothing-with-mr2",
        lambda w, out: finetune_args(out, w.images, "--loss", "mr2", "--label-smoothing", "0.1"),
        ("label smoothing", "hard labels"),
        "drop --label-smoothing",
        command="finetune",
    ),
    Case("probe-lr-zero", lambda w, out: probe_args(w, out, "--lr", "0"), ("--lr must be positive",), "above 0"),
    Case(
        "probe-epochs-zero",
        lambda w, out: probe_args(w, out, "--epochs", "0"),
        ("--epochs must be positive",),
        "above 0",
    ),
    Case(
        "probe-batch-size-negative",
        lambda w, out: probe_args(w, out, "--batch-size", "-8"),
        ("--batch-size must be positive", "-8"),
        "above 0",
    ),
    Case(
        "finetune-lr-negative",
        lambda w, out: finetune_args(out, w.images, "--lr", "-1e-3"),
        ("--lr must be positive",),
        "above 0",
        command="finetune",
    ),
    Case(
        "finetune-epochs-zero",
        lambda w, out: finetune_args(out, w.images, "--epochs", "0"),
        ("--epochs must be positive",),
        "above 0",
        command="finetune",
    ),
    Case(
        "finetune-batch-size-zero",
        lambda w, out: finetune_args(out, w.images, "--batch-size", "0"),
        ("--batch-size must be positive",),
        "above 0",
        command="finetune",
    ),
    # output folders, recipes, resuming, baselines, reports
    Case(
        "existing-output-folder-probe",
        lambda w, out: probe_args(w, out),
        ("already exists",),
        "pass --overwrite to replace it, or choose another --out",  # a probe cannot be resumed
        existing_out=True,
    ),
    Case(
        "existing-output-folder-finetune",
        lambda w, out: finetune_args(out, w.images),
        ("already exists",),
        "pass --overwrite to replace it, --resume to continue it",
        command="finetune",
        existing_out=True,
    ),
    Case(
        "recipe-with-an-unknown-key",
        lambda w, out: probe_args(w, out, "--recipe", str(w.recipe_with_typo)),
        ("typo.yaml", "unknown setting 'epoch'", "did you mean 'epochs'"),
        "remove or rename it",
    ),
    Case(
        "probe-recipe-given-to-finetune",
        lambda w, out: finetune_args(out, w.images, "--recipe", "clip-vitb16-probe"),
        ("clip-vitb16-probe is a probe recipe",),
        "pass a finetune recipe",
        command="finetune",
    ),
    Case(
        "recipe-file-that-does-not-exist",
        lambda w, out: probe_args(w, out, "--recipe", str(w.root / "missing.yaml")),
        ("missing.yaml does not exist",),
        "give a YAML path",
    ),
    Case(
        "unknown-recipe-name",
        lambda w, out: probe_args(w, out, "--recipe", "clip-vitb16-prob"),
        ("unknown recipe 'clip-vitb16-prob'",),
        "did you mean clip-vitb16-probe",
    ),
    Case(
        "resume-with-incompatible-settings",
        lambda w, out: ["finetune", "--resume", str(w.finetune_run), "--loss", "ce", "--num-workers", "0"],
        ("cannot resume", "loss was 'mr2' and is now 'ce'"),
        "omit --loss",
        command="finetune",
        guarded=lambda w: [w.finetune_run],
    ),
    Case(
        "resume-a-folder-without-checkpoints",
        lambda w, out: ["finetune", "--resume", str(w.no_checkpoint), "--num-workers", "0"],
        ("holds no checkpoint",),
        "--overwrite",
        command="finetune",
        guarded=lambda w: [w.no_checkpoint],
    ),
    Case(
        "baseline-run-that-does-not-exist",
        lambda w, out: probe_args(w, out, "--baseline", str(w.root / "runs" / "never-ran")),
        ("never-ran does not exist",),
        "pass the folder a probe or finetune wrote",
    ),
    Case(
        "baseline-run-of-another-dataset",
        lambda w, out: probe_args(w, out, "--baseline", str(w.other_baseline)),
        ("other classes", "4: a, b, c", "3: class_00"),
        "pass a baseline run on the same dataset",
        guarded=lambda w: [w.other_baseline],
    ),
    Case(
        "report-on-a-folder-that-is-not-a-run",
        lambda w, out: ["report", str(w.images)],
        ("holds no classes.json", "not a finished mr2ft run"),
        "run it again",
        command="report",
        guarded=lambda w: [w.images],
    ),
    Case(
        "report-on-a-missing-folder",
        lambda w, out: ["report", str(w.root / "runs" / "nowhere")],
        ("nowhere does not exist",),
        "pass the folder a probe or finetune wrote",
        command="report",
    ),
]


def study_args(w: World, out: Path, *extra: str) -> list[str]:
    return ["study", *TIMM, *PROBE_FAST, "--cache-dir", str(w.cache), "--dataset", str(w.images), "--out", str(out)]


LONG_NAME = "x" * 300  # longer than any common file system's 255 bytes

# Numbers: every option is checked once, in mr2ft.config, before anything is loaded (issue 19).
CASES += [
    Case(
        "infinite-lr",
        lambda w, out: probe_args(w, out, "--lr", "inf"),
        ("--lr must be positive", "got inf"),
        "a finite number above 0",
    ),
    Case(
        "infinite-lr-finetune",
        lambda w, out: finetune_args(out, w.images, "--lr", "inf"),
        ("--lr must be positive", "got inf"),
        "a finite number above 0",
        command="finetune",
    ),
    Case(
        "infinite-c-bar",
        lambda w, out: probe_args(w, out, "--loss", "mr2", "--c-bar", "inf"),
        ("--c-bar must be positive", "got inf"),
        "a finite number above 0",
    ),
    Case(
        "nan-p",
        lambda w, out: probe_args(w, out, "--loss", "mr2", "--p", "nan"),
        ("--p must be at least 1", "got nan"),
        "give a finite number at least 1",
    ),
    Case(
        "negative-warm-up",
        lambda w, out: probe_args(w, out, "--warmup-epochs", "-1"),
        ("--warmup-epochs must be non-negative", "-1.0"),
        "give a finite number at least 0",
    ),
    Case(
        "negative-warm-up-steps",
        lambda w, out: finetune_args(out, w.images, "--warmup-steps", "-5"),
        ("--warmup-steps must be non-negative", "-5"),
        "give a whole number at least 0",
        command="finetune",
    ),
    Case(
        "seed-above-2-to-the-32",
        lambda w, out: probe_args(w, out, "--seed", str(2**32)),
        ("--seed must be between 0 and 4294967295", "4294967296"),
        "give a whole number",
    ),
    Case(
        "seed-negative",
        lambda w, out: probe_args(w, out, "--seed", "-1"),
        ("--seed must be between 0 and 4294967295", "got -1"),
        "give a whole number",
    ),
    Case(
        "val-fraction-of-one",
        lambda w, out: probe_args(w, out, "--val-fraction", "1"),
        ("--val-fraction must be between 0 and 1", "1.0"),
        "below 1",
    ),
    Case(
        "grid-with-a-negative-weight-decay",
        lambda w, out: probe_args(w, out, "--sweep-wd", "--wd-grid", "0,-1e-4"),
        ("--wd-grid must hold numbers, each non-negative", "-0.0001"),
        "give a finite number at least 0",
    ),
    Case(
        "grid-with-nan",
        lambda w, out: probe_args(w, out, "--loss", "mr2", "--sweep-cbar", "--cbar-grid", "1,nan"),
        ("--cbar-grid must hold numbers, each positive", "nan"),
        "a finite number above 0",
    ),
    Case(
        "grid-that-is-not-numbers",
        lambda w, out: probe_args(w, out, "--sweep-wd", "--wd-grid", "1e-4,lots"),
        ("--wd-grid must be comma-separated numbers", "lots"),
        "such as 0.5,1,2",
    ),
    Case(
        "study-grid-with-inf",
        lambda w, out: [*study_args(w, out), "--wd-grid", "0,inf"],
        ("--wd-grid must hold numbers, each non-negative", "inf"),
        "give a finite number",
        command="study",
    ),
    Case(
        "study-n-boot-out-of-range",
        lambda w, out: [*study_args(w, out), "--n-boot", "1000000"],
        ("--n-boot must be between 1 and 100000", "1000000"),
        "give a whole number",
        command="study",
    ),
    Case(
        "study-unknown-tracker",
        lambda w, out: [*study_args(w, out), "--report-to", "tensorbord"],
        ("unknown --report-to tracker 'tensorbord'",),
        "choose from",
        command="study",
    ),
    Case(
        "recipe-value-of-the-wrong-type",
        lambda w, out: probe_args(w, out, "--recipe", str(w.recipe("text-lr.yaml", "lr: fast\n"))),
        ("--lr must be a number", "'fast'", "in recipe", "text-lr.yaml"),
        "give a finite number above 0",
    ),
    Case(
        "recipe-fractional-count",
        lambda w, out: probe_args(w, out, "--recipe", str(w.recipe("half-image.yaml", "max_per_class: 2.5\n"))),
        ("--max-per-class must be a whole number", "2.5", "in recipe"),
        "give a whole number above 0",
    ),
    Case(
        "recipe-list-for-a-number",
        lambda w, out: finetune_args(
            out, w.images, "--recipe", str(w.recipe("list-wd.yaml", "weight_decay: [0.1, 0.2]\n"))
        ),
        ("--weight-decay must be a number", "(0.1, 0.2)", "in recipe"),
        "give a finite number at least 0",
        command="finetune",
    ),
    Case(
        "recipe-text-for-a-name",
        lambda w, out: probe_args(w, out, "--recipe", str(w.recipe("numeric-loss.yaml", "loss: 3\n"))),
        ("--loss must be text", "got 3", "in recipe"),
        "numeric-loss.yaml",
    ),
    # files and folders
    Case(
        "recipe-that-is-a-binary-file",
        lambda w, out: probe_args(w, out, "--recipe", str(w.binary)),
        ("binary.yaml is not a text file",),
        "give a YAML recipe",
    ),
    Case(
        "recipes-show-a-binary-file",
        lambda w, out: ["recipes", "show", str(w.binary)],
        ("binary.yaml is not a text file",),
        "give a YAML recipe",
        command="recipes",
    ),
    Case(
        "out-is-a-file",
        lambda w, out: probe_args(w, w.a_file),
        ("a-file.txt exists and is not a folder",),
        "choose another --out",
        guarded=lambda w: [w.a_file.parent],
    ),
    Case(
        "out-inside-a-file",
        lambda w, out: probe_args(w, w.a_file / "run"),
        ("lies inside", "a-file.txt, which is a file"),
        "choose another --out",
        guarded=lambda w: [w.a_file.parent],
    ),
    Case(
        "out-name-too-long",
        lambda w, out: probe_args(w, out.parent / LONG_NAME),
        ("has a name longer than this file system allows",),
        "choose a shorter one",
    ),
    Case(
        "out-read-only",
        lambda w, out: probe_args(w, w.read_only / "run"),
        ("cannot be written", "read-only"),
        "choose another --out",
        guarded=lambda w: [w.read_only],
        read_only_mount=True,
    ),
    Case(
        "finetune-out-read-only",
        lambda w, out: finetune_args(w.read_only / "run", w.images),
        ("cannot be written", "read-only"),
        "choose another --out",
        command="finetune",
        guarded=lambda w: [w.read_only],
        read_only_mount=True,
    ),
    Case(
        "cache-dir-is-a-file",
        lambda w, out: [*probe_args(w, out), "--cache-dir", str(w.a_file)],
        ("--cache-dir", "a-file.txt exists and is not a folder"),
        "choose another --cache-dir",
        guarded=lambda w: [w.a_file.parent],
    ),
    Case(
        "cache-dir-name-too-long",
        lambda w, out: [*probe_args(w, out), "--cache-dir", str(out.parent / LONG_NAME)],
        ("--cache-dir", "longer than this file system allows"),
        "choose a shorter one",
    ),
    Case(
        "cache-dir-read-only",
        lambda w, out: [*probe_args(w, out), "--cache-dir", str(w.read_only / "cache")],
        ("--cache-dir", "cannot be written", "read-only"),
        "choose another --cache-dir",
        guarded=lambda w: [w.read_only],
        read_only_mount=True,
    ),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes: equal snapshots mean untouched content."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def error_line(result) -> str:
    """The single ``error:`` line of a failed invocation (exit code 2, no traceback)."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_the_matrix_has_sixty_distinct_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_line_and_leaves_no_run_folder(
    case: Case, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not has_command(case.command):
        pytest.skip(f"`mr2ft {case.command}` is not registered in the CLI yet")
    if case.offline_hub:
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    if case.read_only_mount and os.access(world.read_only, os.W_OK):  # root: simulate a read-only file system
        monkeypatch.setattr(runs, "_read_only", lambda folder: Path(folder) == world.read_only)
    out = tmp_path / "run"
    if case.existing_out:
        out.mkdir()
        (out / "keep.txt").write_text("mine", encoding="utf-8")
    args = case.args(world, out)
    guarded = ([out] if case.existing_out else []) + case.guarded(world)
    before = {p: snapshot(p) for p in guarded}

    line = error_line(runner.invoke(app, args))
    for fragment in case.problem:
        assert fragment in line, line
    assert case.fix in line, line
    if not case.existing_out:
        assert not out.exists(), "a failed run left a folder behind"
    for p in guarded:
        assert snapshot(p) == before[p], f"{p} was changed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a lock or a moved run was left behind"

    # --debug: the same error, raised (so Python prints the whole traceback), and still no folder left behind
    debug = runner.invoke(app, ["--debug", *args])
    assert isinstance(debug.exception, UserError), (debug.output, debug.exception)
    assert f"error: {debug.exception.message}" == line
    assert "error:" not in debug.output
    if not case.existing_out:
        assert not out.exists()
    for p in guarded:
        assert snapshot(p) == before[p]


# ---- the other side of some cases -----------------------------------------------------------------------------------


def test_skip_bad_images_runs_and_records_how_many_were_skipped(world: World, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, probe_args(world, out, "--skip-bad-images", dataset=world.corrupt_and_truncated))
    assert result.exit_code == 0, result.output
    classes = read_json(out / "classes.json")
    assert classes["skipped_images"] == 2  # one corrupt train image, one truncated test image
    preds = load_tensors(out / "predictions.safetensors")
    assert torch.bincount(preds["targets"], minlength=3).tolist() == [4, 4, 3]
    assert read_json(out / "report.json")["summary"]["num_images"] == 11


def test_overwrite_replaces_an_existing_output_folder(world: World, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    result = runner.invoke(app, probe_args(world, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists()
    assert (out / "classes.json").is_file() and (out / "head.safetensors").is_file()


@pytest.mark.skipif(not has_command("finetune"), reason="`mr2ft finetune` is not registered in the CLI yet")
def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(world: World, tmp_path: Path) -> None:
    from mr2ft.finetune import find_checkpoint

    out = tmp_path / "run"
    args = finetune_args(out, world.images, "--loss", "mr2", "--optimizer", "sgd", "--lr", "1e30")
    line = error_line(runner.invoke(app, [*args, "--checkpoint-every", "1"]))
    assert "NaN/inf" in line and "at step 2" in line and "ckpt-00000001" in line and "lower --lr" in line
    kept = find_checkpoint(out)[1]
    assert kept.name.startswith("ckpt-00000001")
    assert all(torch.isfinite(t).all() for t in load_tensors(kept / "model.safetensors").values())
    assert not (out / "predictions.safetensors").exists()  # no result from a diverged run


def test_the_real_command_line_prints_one_line_and_a_traceback_only_with_debug(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MR2FT_DEBUG", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mr2ft", *debug, "report", missing],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for debug in ([], ["--debug"])
    ]
    (plain_out, plain_err), (debug_out, debug_err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 2
    assert plain_out == ""
    assert plain_err.strip().splitlines() == [
        f"error: run folder {missing} does not exist; pass the folder a probe or finetune wrote"
    ]
    assert procs[1].returncode != 0
    assert "Traceback (most recent call last)" in debug_err and "mr2ft.errors.UserError" in debug_err


# ---- usage errors, cheap checks, full disks (issue 19) --------------------------------------------------------------

USAGE_ERRORS = {
    "missing-argument": (["report"], "error: missing argument 'run' (see `mr2ft report --help`)"),
    "unknown-option": (["probe", "--bogus"], "error: no such option: --bogus"),
    "bad-value": (["probe", "--epochs", "x"], "error: invalid value for '--epochs'"),
    "out-of-range-n-boot": (["compare", "a", "--n-boot", "0"], "error: invalid value for '--n-boot'"),
    "unbounded-n-boot": (["compare", "a", "--n-boot", "1000000000"], "error: invalid value for '--n-boot'"),
    "unknown-command": (["probes"], "error: no such command 'probes'"),
    "missing-sub-argument": (["recipes", "show"], "error: missing argument 'name'"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS), ids=list(USAGE_ERRORS))
def test_a_usage_error_is_one_line_not_a_box(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args, start = USAGE_ERRORS[case]
    result = runner.invoke(app, args)
    line = error_line(result)
    assert line.startswith(start) and "--help" in line, line
    assert result.output.strip() == line  # no usage lines, no box
    assert list(tmp_path.iterdir()) == []


def test_help_groups_the_options_into_panels_and_shows_the_defaults() -> None:
    from mr2ft.config import FinetuneConfig, ProbeConfig, StudyConfig

    for command, cls in (("probe", ProbeConfig), ("finetune", FinetuneConfig), ("study", StudyConfig)):
        lr = f"{cls.lr:g}"  # each command shows its own config's default (probe's lr is not finetune's)
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for panel in ("Model", "Data", "Training", "Output"):
            assert f"─ {panel} " in result.output, (command, panel)
        lr_line = next(line for line in result.output.splitlines() if "--lr " in line)
        assert f"[default: ({lr})]" in lr_line or f"[default: {lr}]" in lr_line, lr_line
    assert "─ MR2 " in runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "--install-completion" in top.output  # shell completion is on


def test_full_disk_during_overwrite_puts_the_old_run_back_and_says_so_in_one_line(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from mr2ft import probe

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")

    def full_disk(run_dir: Path, *args: object) -> None:
        (run_dir / "predictions.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "predictions.safetensors"))

    monkeypatch.setattr(probe, "save_predictions", full_disk)
    line = error_line(runner.invoke(app, probe_args(world, out, "--overwrite")))
    assert line == (
        f"error: no space left on the device ({out / 'predictions.safetensors'}); free some space or choose another "
        "--out / --cache-dir (a run folder is left as it was before)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert snapshot(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


def run_cli_and_report_torch(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """``mr2ft ARGS`` in a fresh interpreter; stdout's last line says whether torch was imported."""
    code = (
        "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
        f"sys.argv = ['mr2ft', *{args!r}]; from mr2ft.cli import run; run()"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MR2FT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "args, start",
    [
        (["probe", "--dataset", "no-such-folder/", "--out", "run"], "error: dataset 'no-such-folder/' is neither"),
        (["finetune", "--dataset", "./missing.csv", "--out", "run"], "error: dataset './missing.csv' is neither"),
        (["probe", "--dataset", ".", "--out", "x" * 300], "error: --out xxx"),
        (["probe", "--dataset", ".", "--lr", "nan"], "error: --lr must be positive, got nan"),
        (["probe", "--bogus"], "error: no such option: --bogus"),
        (["report"], "error: missing argument 'run'"),
    ],
    ids=["missing-dataset", "missing-csv", "out-too-long", "nan-lr", "unknown-option", "missing-argument"],
)
def test_cheap_mistakes_are_reported_before_torch_is_imported(args: list[str], start: str, tmp_path: Path) -> None:
    code, stdout, stderr = run_cli_and_report_torch(args, tmp_path)
    assert code == 2, stderr
    assert stdout.strip() == "torch imported: False"
    (line,) = stderr.strip().splitlines()
    assert line.startswith(start), line
    assert list(tmp_path.iterdir()) == []
