"""`mr2ft eval`, `predict`, `export` and `zeroshot` end to end through the CLI, with tiny 32 px models.

Each export is loaded in a fresh interpreter that refuses to import mr2ft and must give the logits `mr2ft predict`
gives on the same image files, through the target library's own preprocessing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _images import make_image_folder
from _models import write_tiny_checkpoint
from typer.testing import CliRunner

from mr2ft import evaluate, featrows, featstore, features
from mr2ft.cli import app
from mr2ft.evaluate import load_trained
from mr2ft.io import load_tensors, read_json

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
FAST = ["--num-workers", "0", "--image-size", "32"]
TOLERANCE = 1e-4


# ---- helpers and fixtures --------------------------------------------------------------------------------------


def ok(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def error_line(args: list[str], env: dict | None = None) -> str:
    """The CLI's one error line: exit code 2, no traceback."""
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def flags(family: str, models: Path) -> list[str]:
    spec = write_tiny_checkpoint(family, models / family)
    return [
        "--backbone",
        spec["family"],
        *(["--model", spec["model"]] if spec["model"] else []),
        "--weights",
        spec["weights"],
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("after")


@pytest.fixture(scope="module")
def cache(work) -> Path:
    return work / "cache"


@pytest.fixture(scope="module")
def probe_run(images, work, cache) -> Path:
    """A timm ResNet probe with a BatchNorm head (its standardisation must survive export)."""
    out = work / "probe"
    ok(["probe", "--backbone", "timm", "--model", "test_resnet", "--weights", "none", "--dataset", images,
        "--head", "bn_linear", "--epochs", "3", "--batch-size", "9", "--extract-batch-size", "16",
        "--cache-dir", cache, "--out", out, *FAST])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def vit_run(images, work) -> Path:
    """A one-epoch fine-tune of an MAE timm ViT (checkpoint weights, not the pretrained ones)."""
    out = work / "ft-vit"
    ok(["finetune", *flags("mae", work / "models"), "--dataset", images, "--epochs", "1", "--batch-size", "6",
        "--lr", "1e-3", "--out", out, *FAST])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def vitmae_run(images, work, cache) -> Path:
    """A probe on a Hugging Face ViTMAE."""
    out = work / "probe-vitmae"
    ok(["probe", *flags("mae-hf", work / "models"), "--dataset", images, "--epochs", "2", "--batch-size", "9",
        "--cache-dir", cache, "--out", out, *FAST])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def zeroshot_run(images, work, cache) -> Path:
    templates = work / "templates.txt"
    templates.write_text("a photo of a {}.\nart of the {}.\n", encoding="utf-8")
    names = work / "names.json"
    names.write_text(json.dumps({"class_00": "cat", "class_01": "dog", "class_02": "car"}), encoding="utf-8")
    out = work / "zeroshot"
    ok(["zeroshot", *flags("clip", work / "models"), "--dataset", images, "--templates", templates,
        "--class-names", names, "--cache-dir", cache, "--out", out, *FAST])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def new_images(work) -> Path:
    """Unlabelled images to predict: a folder, a CSV listing two of them, and a corrupt file."""
    root = make_image_folder(work / "new", num_classes=3, per_class=2, size=40, splits=None, seed=9)
    (root / "class_01" / "broken.png").write_bytes(b"not a png")
    return root


def predict_logits(run: Path, inputs: list[Path], out: Path) -> tuple[list[dict], torch.Tensor]:
    """``mr2ft predict`` rows, and the reference: the loaded run's logits of each image opened with PIL and its
    eval transform, one at a time (NaN for an image PIL cannot open)."""
    from PIL import Image

    from mr2ft.predict import gather_inputs

    ok(["predict", run, *inputs, "--out", out, "--top-k", "2", "--num-workers", "0"])
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    model = load_trained(run)
    transform = model.backbone.preprocess.eval_transform()
    reference = []
    for path in gather_inputs([str(p) for p in inputs]):
        try:
            image = transform(Image.open(path).convert("RGB"))
        except OSError:
            reference.append(torch.full((model.num_classes,), float("nan")))
            continue
        reference.append(model.logits(image[None])[0])
    return rows, torch.stack(reference)


def fresh_interpreter(jobs: list[tuple[str, str, list[str]]]) -> list[torch.Tensor]:
    """Run each (loader, folder, image paths) in one new Python that cannot import mr2ft; their logits, in order."""
    guard = (
        "import sys, json\n"
        "class Guard:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mr2ft':\n"
        "            raise ImportError('mr2ft must not be imported')\n"
        "sys.meta_path.insert(0, Guard())\n"
    )
    tail = (
        "out = [LOADERS[kind](folder, paths).tolist() for kind, folder, paths in json.loads(sys.argv[1])]\n"
        "assert 'mr2ft' not in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", guard + LOADERS + tail, json.dumps(jobs)],
        capture_output=True, text=True, cwd="/", env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.tensor(x) for x in json.loads(done.stdout.strip().splitlines()[-1])]


# How a user of each library loads an export: its own API and its own preprocessing, no mr2ft.
LOADERS = """
import torch, torch.nn.functional as F
from PIL import Image

def timm_logits(folder, paths):
    import timm
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.no_grad():
        return model(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))

def hf_logits(folder, paths):
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    processor = AutoImageProcessor.from_pretrained(folder, use_fast=False)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    x = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=x).logits

def open_clip_logits(folder, paths):
    import open_clip, safetensors.torch as st
    cfg = json.load(open(folder + "/open_clip_config.json"))
    model = open_clip.CLIP(**cfg["model_cfg"]).eval()
    result = model.load_state_dict(st.load_file(folder + "/open_clip_model.safetensors"), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if k.startswith("visual.")]
    head = st.load_file(folder + "/head.safetensors")
    p = cfg["preprocess_cfg"]
    transform = open_clip.image_transform(p["size"], is_train=False, mean=p["mean"], std=p["std"],
                                          interpolation=p["interpolation"], resize_mode=p["resize_mode"])
    with torch.no_grad():
        f = model.encode_image(torch.stack([transform(Image.open(q)) for q in paths]))
    return F.normalize(f, dim=-1) @ head["weight"].T + head["bias"]

LOADERS = {"timm": timm_logits, "hf": hf_logits, "open_clip": open_clip_logits}
"""


@pytest.fixture(scope="module")
def exports(probe_run, vit_run, vitmae_run, zeroshot_run, new_images, work) -> dict:
    """Every export through the CLI, loaded in one fresh interpreter: {(run name, format): (got, expected)}."""
    from mr2ft.predict import gather_inputs, predict_paths

    cases = [(probe_run, "timm"), (vit_run, "timm"), (vit_run, "hf"), (vitmae_run, "hf"), (zeroshot_run, "open_clip")]
    paths = gather_inputs([str(new_images)])
    jobs, expected = [], []
    for run, fmt in cases:
        folder = work / f"export-{run.name}-{fmt}"
        ok(["export", run, "--format", fmt, "--out", folder])
        pred = predict_paths(load_trained(run), paths, num_workers=0)
        good = [i for i, e in enumerate(pred.errors) if not e]
        jobs.append((fmt, str(folder), [str(paths[i]) for i in good]))
        expected.append(pred.logits[good])
    got = fresh_interpreter(jobs)
    return {(run.name, fmt): (g, e) for (run, fmt), g, e in zip(cases, got, expected, strict=True)}


def assert_same_logits(exports: dict, run: Path, fmt: str) -> None:
    got, expected = exports[(run.name, fmt)]
    assert got.shape == expected.shape and len(got) == 6
    assert (got - expected).abs().max().item() <= TOLERANCE


# ---- eval ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed-from-the-store"])
def test_eval_on_the_runs_own_test_split_repeats_its_predictions_from_the_cache(
    stream, probe_run, images, cache, work, monkeypatch
):
    def no_extraction(*args, **kwargs):
        raise AssertionError("the probe's cached features should have been used")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    if stream:  # features too large for memory: read from the chunked store in blocks, never loaded whole
        monkeypatch.setattr(featrows, "fits_in_memory", lambda *a, **k: False)
        monkeypatch.setattr(featstore.StoredFeatures, "load", no_extraction)
    out = work / f"eval-same-{stream}"
    ok(["eval", probe_run, "--dataset", images, "--cache-dir", cache, "--out", out, "--num-workers", "0"])
    a, b = load_tensors(probe_run / "predictions.safetensors"), load_tensors(out / "predictions.safetensors")
    for key in ("targets", "preds", "topk"):
        assert torch.equal(a[key], b[key]), key
    report = read_json(out / "report.json")
    assert report["baseline"]["path"] == str(probe_run)  # groups fixed by the run's own in-distribution accuracy
    assert report["deltas"]["top1"] == pytest.approx(0.0)


def test_eval_on_a_renamed_class_subset_restricts_the_logits(probe_run, work, cache):
    shifted = make_image_folder(work / "shifted", num_classes=2, per_class=4, size=36, splits=None, seed=5,
                                class_names=["n0001", "n0003"])  # fmt: skip
    mapping = work / "wnids.json"
    mapping.write_text(json.dumps({"n0001": "class_01", "n0003": "class_02"}), encoding="utf-8")
    out = work / "eval-subset"
    ok(["eval", probe_run, "--dataset", shifted, "--class-names", mapping, "--cache-dir", cache, "--out", out,
        "--num-workers", "0"])  # fmt: skip
    info = read_json(out / "classes.json")
    assert info["class_names"] == ["class_00", "class_01", "class_02"] and info["evaluated_classes"] == [1, 2]
    saved = load_tensors(out / "predictions.safetensors")
    assert saved["targets"].tolist() == [1] * 4 + [2] * 4
    # reference: the run's logits over the two classes only, by a plain argmax
    model = load_trained(probe_run)
    from mr2ft.predict import gather_inputs, predict_paths

    logits = predict_paths(model, gather_inputs([str(shifted)]), num_workers=0).logits
    expected = torch.tensor([1, 2])[logits[:, [1, 2]].argmax(1)]
    assert torch.equal(saved["preds"], expected)
    report = read_json(out / "report.json")
    assert report["summary"]["classes_without_support"] == 1 and report["summary"]["num_images"] == 8


def test_named_robustness_sets_read_their_local_layout(probe_run, work, cache):
    wnids = make_image_folder(work / "imagenet-r", num_classes=2, per_class=2, size=32, splits=None,
                              class_names=["n01443537", "n01484850"])  # fmt: skip
    mapping = work / "r.json"
    mapping.write_text(json.dumps({"n01443537": "class_00", "n01484850": "class_02"}), encoding="utf-8")
    ok(["eval", probe_run, "--dataset", f"imagenet-r:{wnids}", "--class-names", mapping, "--cache-dir", cache,
        "--out", work / "eval-r", "--num-workers", "0"])  # fmt: skip
    assert read_json(work / "eval-r" / "classes.json")["dataset"] == "imagenet-r"
    assert sorted(set(load_tensors(work / "eval-r" / "predictions.safetensors")["targets"].tolist())) == [0, 2]
    # ImageNetV2's folders are class indices; a names file gives each index its name
    v2 = make_image_folder(
        work / "imagenet-v2", num_classes=2, per_class=2, size=32, splits=None, class_names=["0", "2"]
    )
    names = work / "names.txt"
    names.write_text("class_00\nclass_01\nclass_02\n", encoding="utf-8")
    ok(["eval", probe_run, "--dataset", f"imagenet-v2:{v2}", "--class-names", names, "--cache-dir", cache,
        "--out", work / "eval-v2", "--num-workers", "0"])  # fmt: skip
    assert load_tensors(work / "eval-v2" / "predictions.safetensors")["targets"].tolist() == [0, 0, 2, 2]


def test_eval_refuses_bad_input_in_one_line(probe_run, images, work):
    assert "does not exist" in error_line(["eval", work / "no-run", "--dataset", images])
    other = make_image_folder(work / "other", num_classes=2, per_class=2, splits=None, class_names=["x", "y"])
    line = error_line(["eval", probe_run, "--dataset", other, "--out", work / "never"])
    assert "'x', 'y'" in line and "--class-names" in line
    assert not (work / "never").exists()
    assert "--split" in error_line(["eval", probe_run, "--dataset", images, "--split", "dev"])


# ---- predict ---------------------------------------------------------------------------------------------------


def test_predict_writes_top_k_rows_and_reports_unreadable_images_per_row(probe_run, new_images, work):
    listing = work / "list.csv"
    listing.write_text(f"path\n{new_images}/class_00/0000.png\n{new_images}/class_02/0001.png\n", encoding="utf-8")
    rows, logits = predict_logits(probe_run, [new_images / "class_01", listing], work / "pred.csv")
    assert [Path(r["path"]).name for r in rows] == ["0000.png", "0001.png", "broken.png", "0000.png", "0001.png"]
    names = load_trained(probe_run).class_names
    broken = rows[2]
    assert broken["error"] and broken["class_1"] == "" and torch.isnan(logits[2]).all()
    for row, lg in zip(rows[:2] + rows[3:], torch.cat([logits[:2], logits[3:]]), strict=True):
        probs = torch.softmax(lg.double(), 0)
        top = probs.argsort(descending=True)[:2].tolist()
        assert [row["class_1"], row["class_2"]] == [names[i] for i in top]
        assert float(row["prob_1"]) == pytest.approx(float(probs[top[0]]), abs=1e-6) and not row["error"]
    assert "does not exist" in error_line(["predict", probe_run, work / "missing.png"])


def test_predict_reuses_the_extraction_cache_and_extracts_again_when_a_file_changes(
    probe_run, new_images, work, monkeypatch
):
    folder = work / "to-predict"
    shutil.copytree(new_images, folder)
    args = ["predict", probe_run, folder, "--top-k", "2", "--num-workers", "0", "--cache-dir", work / "pcache"]
    ok([*args, "--out", work / "first.csv"])
    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    ok([*args, "--out", work / "again.csv"])  # the same files: every feature from the cache
    assert not calls and (work / "again.csv").read_text() == (work / "first.csv").read_text()
    shutil.copy(folder / "class_00" / "0000.png", folder / "class_02" / "0000.png")  # one file's content changes
    ok([*args, "--out", work / "changed.csv"])
    assert calls  # extracted again, and that row now reads as its new content
    rows = {r["path"]: r for r in csv.DictReader(open(work / "changed.csv", newline=""))}
    same = [rows[str(folder / c / "0000.png")] for c in ("class_00", "class_02")]
    assert same[0]["class_1"] == same[1]["class_1"] and same[0]["prob_1"] == same[1]["prob_1"]
    assert rows[str(folder / "class_01" / "broken.png")]["error"]  # the message survives the cache


# ---- export ----------------------------------------------------------------------------------------------------


def test_timm_export_of_a_probe_folds_its_batchnorm_and_loads_without_mr2ft(exports, probe_run, work):
    assert_same_logits(exports, probe_run, "timm")
    config = read_json(work / f"export-{probe_run.name}-timm" / "config.json")
    assert config["label_names"] == ["class_00", "class_01", "class_02"] and config["num_classes"] == 3
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_timm_and_hf_exports_of_vits_load_without_mr2ft(exports, vit_run, vitmae_run, work):
    assert_same_logits(exports, vit_run, "timm")
    assert_same_logits(exports, vit_run, "hf")
    assert_same_logits(exports, vitmae_run, "hf")
    config = read_json(work / f"export-{vit_run.name}-hf" / "config.json")
    assert config["id2label"] == {"0": "class_00", "1": "class_01", "2": "class_02"}


def test_zeroshot_is_clips_text_classifier_and_exports_to_open_clip(exports, zeroshot_run, probe_run):
    from mr2ft.evaluate import load_backbone_of

    bb = load_backbone_of(evaluate.read_settings(zeroshot_run))
    expected = bb.logit_scale * bb.text_classifier(["cat", "dog", "car"], ["a photo of a {}.", "art of the {}."])
    head = load_tensors(zeroshot_run / "head.safetensors")
    assert torch.allclose(head["fc.weight"], expected, atol=1e-6) and not head["fc.bias"].any()
    info = read_json(zeroshot_run / "classes.json")
    assert info["class_names"] == ["class_00", "class_01", "class_02"] and info["prompt_names"] == ["cat", "dog", "car"]
    ok(["report", probe_run, "--baseline", zeroshot_run])  # a normal run: the baseline of a probe on the same data
    assert_same_logits(exports, zeroshot_run, "open_clip")


def test_export_refuses_what_the_family_cannot_take_and_offline_pushes(probe_run, zeroshot_run, work):
    assert "open_clip" in error_line(["export", zeroshot_run, "--format", "timm", "--out", work / "x1"])
    assert "ViT" in error_line(["export", probe_run, "--format", "hf", "--out", work / "x2"])
    assert "CLIP" in error_line(["export", probe_run, "--format", "open_clip", "--out", work / "x3"])
    assert "timm, hf" in error_line(["export", probe_run, "--format", "onnx", "--out", work / "x4"])
    line = error_line(["export", probe_run, "--format", "timm", "--out", work / "x5", "--push-to-hub", "me/model"],
                      env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert "HF_HUB_OFFLINE" in line
    assert not any((work / f"x{i}").exists() for i in range(1, 6))


def test_class_name_files_and_index_folders(tmp_path):
    run_names = [f"class {i}" for i in range(1000)]
    # ImageNetV2's index folders map onto a 1000-class run by index
    assert evaluate.match_classes(["0", "999", "10"], run_names, tmp_path, "index") == [0, 999, 10]
    listing = tmp_path / "names.txt"
    listing.write_text("# ImageNet order\nzero\none\ntwo\n", encoding="utf-8")
    names = evaluate.read_name_file(listing, "--class-names")
    assert names == ["zero", "one", "two"]
    assert evaluate.rename_classes(["2", "0"], names, "names.txt") == ["two", "zero"]  # by index
    assert evaluate.rename_classes(["a", "b", "c"], names, "names.txt") == names  # in class order
    assert evaluate.rename_classes(["n1", "n2"], {"n1": "cat"}, "m.json") == ["cat", "n2"]
    with pytest.raises(evaluate.UserError, match="lists 3 names for 2 classes"):
        evaluate.rename_classes(["a", "b"], names, "names.txt")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(evaluate.UserError, match="JSON list of strings"):
        evaluate.read_name_file(bad, "--class-names")


def test_an_ldam_probe_with_a_cosine_head_evaluates_and_is_refused_by_export(images, work, cache, tmp_path):
    run = tmp_path / "ldam"
    ok(["probe", "--backbone", "timm", "--model", "test_resnet", "--weights", "none", "--dataset", images,
        "--loss", "ldam", "--epochs", "2", "--batch-size", "9", "--cache-dir", cache, "--out", run, *FAST])  # fmt: skip
    out = tmp_path / "eval"
    ok(["eval", run, "--dataset", images, "--cache-dir", cache, "--out", out, "--num-workers", "0"])
    a, b = load_tensors(run / "predictions.safetensors"), load_tensors(out / "predictions.safetensors")
    assert torch.equal(a["preds"], b["preds"])  # the cosine head is rebuilt as the probe saved it
    line = error_line(["export", run, "--format", "timm", "--out", tmp_path / "exported"])
    assert "cosine" in line
    assert not (tmp_path / "exported").exists()
