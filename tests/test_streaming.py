"""WebDataset tar shards (mr2ft.data.streaming): reading, class names, and one-line errors for bad shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mr2ft.cli import app
from mr2ft.data import load_dataset
from mr2ft.data.streaming import class_names_for, iter_wds, load_wds, parse_wds_spec
from mr2ft.errors import UserError
from mr2ft.io import load_tensors

runner = CliRunner()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{path.stem}-{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """train-000000..000001.tar (3 samples each) and test-000000.tar (2), labels i % 3, grey value 10 * i."""
    for split, counts in (("train", (3, 3)), ("test", (2,))):
        i = 0
        for s, n in enumerate(counts):
            samples = []
            for _ in range(n):
                samples.append({"png": _png(10 * i), "cls": str(i % 3).encode()})
                i += 1
            write_shard(tmp_path / f"{split}-{s:06d}.tar", samples)
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog", "eel"]))
    return tmp_path


def test_folder_and_pattern_specs_find_the_same_shards(shards):
    by_folder = parse_wds_spec(f"wds:{shards}")
    by_pattern = parse_wds_spec(f"wds:train={shards}/train-{{000000..000001}}.tar,test={shards}/test-000000.tar")
    assert by_folder == by_pattern
    assert [Path(p).name for p in by_folder["train"]] == ["train-000000.tar", "train-000001.tar"]
    assert class_names_for(by_folder) == ["cat", "dog", "eel"]


def test_samples_are_read_in_order_with_labels_and_rgb_images(shards):
    got = list(iter_wds(parse_wds_spec(f"wds:{shards}")["train"], 3))
    assert [label for _, label in got] == [0, 1, 2, 0, 1, 2]
    assert all(img.mode == "RGB" and img.size == (4, 4) for img, _ in got)
    assert [img.getpixel((0, 0))[0] for img, _ in got] == [0, 10, 20, 30, 40, 50]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_shard_is_one_line(shards):
    with pytest.raises(UserError) as e:
        parse_wds_spec(f"wds:train={shards}/train-{{000000..000003}}.tar,test={shards}/test-000000.tar")
    assert "train-000002.tar and 1 more does not exist" in _one_line(e)


def test_no_test_split_is_one_line(shards):
    for p in shards.glob("test-*.tar"):
        p.unlink()
    with pytest.raises(UserError) as e:
        parse_wds_spec(f"wds:{shards}")
    assert "no test shards" in _one_line(e)


def test_shard_without_the_label_key_is_one_line(tmp_path, shards):
    write_shard(shards / "train-000001.tar", [{"png": _png(1), "label": b"1"}])
    with pytest.raises(UserError) as e:
        list(iter_wds(parse_wds_spec(f"wds:{shards}")["train"], 3))
    assert "no label key 'cls'" in _one_line(e) and "--wds-label-key" in str(e.value)
    assert [y for _, y in iter_wds(parse_wds_spec(f"wds:{shards}")["train"][1:], 3, label_key="label")] == [1]


def test_image_key_and_label_range_are_checked(shards):
    write_shard(shards / "train-000001.tar", [{"jpg": _png(1), "cls": b"7"}])
    paths = parse_wds_spec(f"wds:{shards}")["train"][1:]
    with pytest.raises(UserError) as e:
        list(iter_wds(paths, 3, image_keys=("png",)))
    assert "no image key png" in _one_line(e)
    with pytest.raises(UserError) as e:
        list(iter_wds(paths, 3))
    assert "label 7, outside the 3 classes" in _one_line(e)


def test_missing_or_bad_classes_json_is_one_line(shards):
    (shards / "classes.json").write_text('{"0": "cat"}')
    with pytest.raises(UserError) as e:
        class_names_for(parse_wds_spec(f"wds:{shards}"))
    assert "JSON list of class names" in _one_line(e)
    (shards / "classes.json").unlink()
    with pytest.raises(UserError) as e:
        class_names_for(parse_wds_spec(f"wds:{shards}"))
    assert "cannot read class names" in _one_line(e)


# ---- as a --dataset: indexed by offset, probed end to end ----------------------------------------------------------


def test_indexed_shards_give_the_same_samples_as_the_webdataset_pipeline(shards):
    raw = load_wds(f"wds:{shards}", None, None)
    train = raw.splits["train"]
    streamed = list(iter_wds(parse_wds_spec(f"wds:{shards}")["train"], 3))
    assert len(train) == 6 and train.targets.tolist() == [y for _, y in streamed]
    for i in (5, 0, 3):  # random access, any order
        assert train[i][0].tobytes() == streamed[i][0].tobytes() and train[i][1] == streamed[i][1]
    splits = load_dataset(f"wds:{shards}", max_per_class=1, seed=0)
    assert splits.class_names == ["cat", "dog", "eel"] and len(splits.train) == 3 and len(splits.test) == 2
    assert "train-00000" in splits.train.where(0)


def test_fingerprint_follows_the_shard_files(shards):
    a = load_dataset(f"wds:{shards}").split_fingerprint("train")
    assert load_dataset(f"wds:{shards}").split_fingerprint("train") == a
    write_shard(shards / "train-000001.tar", [{"png": _png(99), "cls": b"1"}])
    assert load_dataset(f"wds:{shards}").split_fingerprint("train") != a


PROBE = ["probe", "--backbone", "timm", "--model", "test_resnet", "--weights", "none", "--epochs", "2"]
PROBE += ["--batch-size", "4", "--num-workers", "0", "--extract-batch-size", "4"]


def test_probe_runs_on_webdataset_shards_with_custom_keys(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        samples = []
        for i in range(n):
            img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG")
            samples.append({"jpeg": buf.getvalue(), "label": str(i % 3).encode()})
        write_shard(tmp_path / f"{split}-000000.tar", samples)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    out = tmp_path / "run"
    args = [*PROBE, "--dataset", f"wds:{tmp_path}", "--image-column", "png;jpeg", "--label-column", "label"]
    result = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    preds = load_tensors(out / "predictions.safetensors")
    assert preds["targets"].tolist() == [0, 1, 2] * 2
    assert json.loads((out / "classes.json").read_text())["class_names"] == ["a", "b", "c"]


@pytest.mark.parametrize("bad", ["missing_shard", "no_label_key", "no_test"])
def test_bad_webdataset_input_is_one_error_line_and_exit_2(shards, tmp_path, bad):
    spec = f"wds:{shards}"
    if bad == "missing_shard":
        spec = f"wds:train={shards}/train-{{000000..000002}}.tar,test={shards}/test-000000.tar"
    elif bad == "no_label_key":
        write_shard(shards / "train-000001.tar", [{"png": _png(1), "label": b"1"}])
    else:
        (shards / "test-000000.tar").unlink()
    result = runner.invoke(app, [*PROBE, "--dataset", spec, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (tmp_path / "out").exists()


# ---- Hugging Face datasets in streaming mode ----------------------------------------------------------------------


def _parquet_dataset(folder: Path, splits=("train", "test")) -> Path:
    """Parquet files train-/test-*.parquet with an Image and a ClassLabel column, as the hub serves them."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    for split in splits:
        n = 9 if split == "train" else 6
        rows = {"image": [Image.fromarray(np.full((8, 8), 20 * i, np.uint8)) for i in range(n)]}
        rows["label"] = [i % 3 for i in range(n)]
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def test_streamed_hf_dataset_reads_the_same_images_as_the_loaded_one(tmp_path):
    folder = _parquet_dataset(tmp_path / "pq")
    streamed = load_dataset(f"hf:{folder}", streaming=True, max_per_class=2)
    whole = load_dataset(f"hf:{folder}", max_per_class=2)
    assert streamed.class_names == whole.class_names == ["x", "y", "z"]
    assert streamed.train.targets.tolist() == whole.train.targets.tolist() and len(streamed.test) == 6
    for i in (0, 1, 4, 2, 5):  # forward, then back (the cursor restarts), then forward again
        assert streamed.train[i][0].tobytes() == whole.train[i][0].tobytes()
    assert streamed.split_fingerprint("train") != whole.split_fingerprint("train")


def test_probe_on_a_streamed_hf_dataset_matches_the_loaded_one(tmp_path):
    folder = _parquet_dataset(tmp_path / "pq")
    for name, extra in (("whole", []), ("stream", ["--streaming"])):
        args = [*PROBE, "--dataset", f"hf:{folder}", *extra, "--cache-dir", str(tmp_path / "c"), "--out"]
        result = runner.invoke(app, [*args, str(tmp_path / name)])
        assert result.exit_code == 0, (result.output, result.exception)
    a, b = (load_tensors(tmp_path / n / "predictions.safetensors") for n in ("whole", "stream"))
    assert torch.equal(a["topk"], b["topk"]) and torch.equal(a["targets"], b["targets"])


@pytest.mark.parametrize("bad", ["no_test", "not_hf"])
def test_bad_streaming_input_is_one_error_line_and_exit_2(tmp_path, bad):
    folder = _parquet_dataset(tmp_path / "pq", splits=("train",))
    spec = f"hf:{folder}" if bad == "no_test" else str(folder)
    result = runner.invoke(app, [*PROBE, "--dataset", spec, "--streaming", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert ("no test split" if bad == "no_test" else "--streaming streams Hugging Face datasets") in lines[0]
