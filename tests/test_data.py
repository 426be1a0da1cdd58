"""Dataset specs -> splits: each local form, class names, RGB, bad images, subsets, fingerprints, sampler."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from _images import (
    class_names_for,
    corrupt_file,
    make_csv,
    make_hf_disk,
    make_idx_folder,
    make_image_folder,
    truncate_file,
    write_idx,
)
from PIL import Image
from typer.testing import CliRunner

from mr2ft import hub
from mr2ft.cli import user_errors
from mr2ft.data import (
    FASHION_MNIST_CLASSES,
    BadImageError,
    ClassBalancedBatchSampler,
    DatasetSplits,
    ImageDataset,
    TransformedDataset,
    load_dataset,
    read_idx,
    to_rgb,
)
from mr2ft.errors import UserError


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255


def file_set(ds: ImageDataset) -> set[str]:
    return {ds.where(i) for i in range(len(ds))}


# ---- image folders --------------------------------------------------------------------------------------------


def test_train_test_folder_loads_with_sorted_class_names_without_decoding(tmp_path, monkeypatch):
    names = ["zebra", "ant", "Moth"]
    root = make_image_folder(tmp_path / "images", per_class=4, class_names=names)

    def no_decoding(*args, **kwargs):
        raise AssertionError("load_dataset decoded an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    splits = load_dataset(str(root))
    monkeypatch.undo()

    assert isinstance(splits, DatasetSplits)
    assert splits.class_names == sorted(names) == ["Moth", "ant", "zebra"]
    assert splits.num_classes == 3 and splits.name == "images" and splits.val is None
    assert splits.train.class_names == splits.test.class_names == splits.class_names
    assert len(splits.train) == len(splits.test) == 12
    assert splits.train.targets.dtype == np.int64
    for i in range(len(splits.train)):
        image, label = splits.train[i]
        folder = Path(splits.train.where(i)).parent.name
        assert label == splits.train.targets[i] == splits.class_names.index(folder)
        assert image.mode == "RGB" and image.size == (32, 32)


def test_train_and_val_only_reports_on_val_and_all_three_are_kept(tmp_path):
    root = make_image_folder(tmp_path / "tv", per_class=3, splits=("train", "val"))
    splits = load_dataset(str(root))
    assert splits.val is None and len(splits.test) == 9
    assert all("/val/" in splits.test.where(i) for i in range(len(splits.test)))

    root = make_image_folder(tmp_path / "tvt", per_class=3, splits=("train", "val", "test"))
    splits = load_dataset(str(root))
    assert all("/val/" in splits.val.where(i) for i in range(len(splits.val)))
    assert all("/test/" in splits.test.where(i) for i in range(len(splits.test)))
    assert set(splits._split_fingerprints) == {"train", "val", "test"}


def test_single_folder_needs_val_fraction_and_splits_stratified(tmp_path):
    root = make_image_folder(tmp_path / "flat", num_classes=4, per_class=10, splits=None)
    with pytest.raises(UserError, match="--val-fraction"):
        load_dataset(str(root))
    a = load_dataset(str(root), val_fraction=0.3, seed=1)
    b = load_dataset(str(root), val_fraction=0.3, seed=1)
    c = load_dataset(str(root), val_fraction=0.3, seed=2)
    assert np.bincount(a.test.targets).tolist() == [3, 3, 3, 3]
    assert np.bincount(a.train.targets).tolist() == [7, 7, 7, 7]
    assert not file_set(a.train) & file_set(a.test)
    assert len(file_set(a.train) | file_set(a.test)) == 40
    # The test images never depend on the training seed (runs with different seeds must share one test set).
    assert file_set(a.test) == file_set(b.test) == file_set(c.test)


def test_val_fraction_carves_val_from_train_and_leaves_test(tmp_path):
    root = make_image_folder(tmp_path / "images", num_classes=3, per_class=10)
    plain = load_dataset(str(root))
    splits = load_dataset(str(root), val_fraction=0.2)
    assert np.bincount(splits.val.targets).tolist() == [2, 2, 2]
    assert not file_set(splits.val) & file_set(splits.train)
    assert file_set(splits.val) | file_set(splits.train) == file_set(plain.train)
    assert file_set(splits.test) == file_set(plain.test)


def test_test_classes_must_be_in_train(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    make_image_folder(tmp_path / "extra", num_classes=1, per_class=2, splits=("test",), class_names=["unicorn"])
    (tmp_path / "extra" / "test" / "unicorn").rename(root / "test" / "unicorn")
    with pytest.raises(UserError, match="unicorn"):
        load_dataset(str(root))


def test_empty_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    (root / "train" / "class_09").mkdir()
    (root / "train" / "class_09" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="class_09"):
        load_dataset(str(root))


def test_folder_without_class_folders_and_unknown_name(tmp_path):
    flat = tmp_path / "loose"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    with pytest.raises(UserError, match="class folders"):
        load_dataset(str(flat), val_fraction=0.5)
    with pytest.raises(UserError, match="did you mean cifar100"):
        load_dataset("cifar-100")


# ---- image modes ----------------------------------------------------------------------------------------------


def test_greyscale_palette_alpha_and_16bit_become_rgb(tmp_path):
    root = tmp_path / "modes"
    make_image_folder(root, num_classes=2, per_class=1, class_names=["a", "b"])
    folder = root / "train" / "a"
    Image.new("L", (4, 4), 77).save(folder / "grey.png")
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (200, 0, 0, 0))  # fully transparent: should show the white background
    rgba.save(folder / "rgba.png")
    Image.new("LA", (4, 4), (50, 255)).save(folder / "la.png")
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(folder / "cmyk.jpg")
    splits = load_dataset(str(root))
    images = {Path(splits.train.where(i)).stem: splits.train[i][0] for i in range(len(splits.train))}
    assert all(im.mode == "RGB" for im in images.values())
    assert images["grey"].getpixel((1, 1)) == (77, 77, 77)
    assert images["palette"].getpixel((1, 1)) == (10, 200, 30)
    assert images["rgba"].getpixel((0, 0)) == (255, 255, 255)
    assert images["rgba"].getpixel((1, 1)) == (200, 0, 0)
    assert images["la"].getpixel((1, 1)) == (50, 50, 50)
    assert images["deep"].getpixel((1, 1)) == (255, 255, 255)
    assert all(abs(v - 255) <= 2 for v in images["cmyk"].getpixel((1, 1)))


def test_to_rgb_composites_partial_alpha_on_white():
    image = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    value = to_rgb(image).getpixel((0, 0))
    assert all(abs(v - 127) <= 1 for v in value)


# ---- bad images -----------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_images_name_their_path_or_are_skipped(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=4, ext="jpg")
    bad = [
        corrupt_file(root / "train" / "class_01" / "0002.jpg"),
        truncate_file(root / "test" / "class_00" / "0001.jpg"),
    ]
    splits = load_dataset(str(root))
    for split, path in zip((splits.train, splits.test), bad, strict=True):
        i = next(i for i in range(len(split)) if split.where(i) == str(path))
        with pytest.raises(BadImageError, match=str(path)) as info:
            split[i]
        assert "--skip-bad-images" in str(info.value) and "\n" not in str(info.value)

    skipping = load_dataset(str(root), skip_bad_images=True)
    assert sorted(skipping.skipped) == sorted(str(p) for p in bad)
    assert len(skipping.train) == len(splits.train) - 1 and len(skipping.test) == len(splits.test) - 1
    assert str(bad[0]) not in file_set(skipping.train)
    for split in (skipping.train, skipping.test):
        assert all(split[i][0].mode == "RGB" for i in range(len(split)))
    assert skipping.fingerprint != splits.fingerprint


def test_bad_image_in_dataloader_worker_stays_one_line_through_the_cli(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    bad = corrupt_file(root / "train" / "class_00" / "0001.png")
    splits = load_dataset(str(root))
    loader = torch.utils.data.DataLoader(TransformedDataset(splits.train, to_tensor), batch_size=2, num_workers=1)
    with pytest.raises(BadImageError) as info:
        list(loader)
    assert isinstance(info.value, UserError)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert "DataLoader worker" in info.value.worker_traceback

    app = typer.Typer()

    @app.command()
    @user_errors
    def run() -> None:
        list(torch.utils.data.DataLoader(TransformedDataset(splits.train, to_tensor), batch_size=2, num_workers=1))

    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image") and str(bad) in lines[0]


def test_transformed_dataset_pickles_for_workers(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    hf_root, _ = make_hf_disk(tmp_path / "hf", per_class=2)
    idx_root, _ = make_idx_folder(tmp_path / "idx", n_train=10, n_test=10)
    for spec in (root, hf_root, idx_root):
        ds = TransformedDataset(load_dataset(str(spec)).train, to_tensor)
        clone = pickle.loads(pickle.dumps(ds))
        x, y = clone[1]
        assert torch.equal(x, ds[1][0]) and y == ds[1][1] and x.shape[0] == 3


# ---- subsets --------------------------------------------------------------------------------------------------


def test_shots_are_exact_balanced_and_deterministic(tmp_path):
    root = make_image_folder(tmp_path / "images", num_classes=3, per_class=8)
    a = load_dataset(str(root), shots=3, seed=0)
    b = load_dataset(str(root), shots=3, seed=0)
    c = load_dataset(str(root), shots=3, seed=5)
    assert np.bincount(a.train.targets).tolist() == [3, 3, 3]
    assert file_set(a.train) == file_set(b.train) and file_set(a.train) != file_set(c.train)
    assert len(a.test) == 24  # the test split is not subsetted by --shots
    with pytest.raises(UserError, match="class_00"):
        load_dataset(str(root), shots=9)


def test_max_per_class_caps_train_and_val_and_test_max_caps_test(tmp_path):
    root = make_image_folder(tmp_path / "images", num_classes=3, per_class=6, splits=("train", "val", "test"))
    for f in sorted((root / "train" / "class_02").iterdir())[2:]:
        f.unlink()  # class_02 keeps 2 images: fewer than the cap
    splits = load_dataset(str(root), max_per_class=4, test_max_per_class=1)
    assert np.bincount(splits.train.targets).tolist() == [4, 4, 2]
    assert np.bincount(splits.val.targets).tolist() == [4, 4, 4]
    assert np.bincount(splits.test.targets).tolist() == [1, 1, 1]
    with pytest.raises(UserError):
        load_dataset(str(root), shots=2, max_per_class=2)


# ---- fingerprints ---------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_follows_file_changes(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=3)
    first = load_dataset(str(root))
    assert load_dataset(str(root)).fingerprint == first.fingerprint
    assert len(first.fingerprint) == 16 and int(first.fingerprint, 16) >= 0

    target = root / "train" / "class_01" / "0001.png"
    stat = target.stat()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    modified = load_dataset(str(root))
    assert modified.fingerprint != first.fingerprint
    assert modified.split_fingerprint("train") != first.split_fingerprint("train")
    assert modified.split_fingerprint("test") == first.split_fingerprint("test")

    Image.new("RGB", (32, 32)).save(root / "test" / "class_00" / "new.png")
    added = load_dataset(str(root))
    assert added.split_fingerprint("test") != modified.split_fingerprint("test")
    (root / "test" / "class_00" / "new.png").unlink()
    assert load_dataset(str(root)).fingerprint == modified.fingerprint

    (root / "train" / "class_02" / "0000.png").unlink()
    assert load_dataset(str(root)).fingerprint != modified.fingerprint


def test_fingerprint_follows_selection_options(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=6)
    base = load_dataset(str(root))
    shots = load_dataset(str(root), shots=2)
    other_seed = load_dataset(str(root), shots=2, seed=3)
    assert len({base.fingerprint, shots.fingerprint, other_seed.fingerprint}) == 3
    assert shots.split_fingerprint("test") == base.split_fingerprint("test")
    assert load_dataset(str(root), val_fraction=0.5).fingerprint != base.fingerprint
    with pytest.raises(KeyError):
        base.split_fingerprint("val")


# ---- CSV ------------------------------------------------------------------------------------------------------


def test_csv_with_header_and_split_column(tmp_path):
    path = make_csv(tmp_path / "csv", per_class=4)
    splits = load_dataset(str(path))
    assert splits.class_names == class_names_for(3) and splits.name == "labels"
    assert np.bincount(splits.train.targets).tolist() == [4, 4, 4]
    assert np.bincount(splits.test.targets).tolist() == [2, 2, 2]
    image, label = splits.test[0]
    assert image.mode == "RGB" and label == 0


def test_csv_without_header_int_labels_and_val_fraction(tmp_path):
    path = make_csv(tmp_path / "csv", per_class=4, with_split=False, header=False, int_labels=True)
    with pytest.raises(UserError, match="--val-fraction"):
        load_dataset(str(path))
    splits = load_dataset(str(path), val_fraction=0.25)
    assert splits.class_names == ["0", "1", "2"]
    assert np.bincount(splits.test.targets).tolist() == [1, 1, 1]
    assert len(splits.train) == 9


def test_csv_errors_name_the_problem(tmp_path):
    path = make_csv(tmp_path / "csv", per_class=2)
    text = path.read_text()
    path.write_text(text + "img/ghost.png,class_00,train\n")
    with pytest.raises(UserError, match="ghost.png"):
        load_dataset(str(path))
    path.write_text(text + "img/train_0_0.png,dragon,test\n")
    with pytest.raises(UserError, match="dragon"):
        load_dataset(str(path))
    path.write_text(text + "img/train_0_0.png,class_00,holdout\n")
    with pytest.raises(UserError, match="holdout"):
        load_dataset(str(path))


# ---- Hugging Face save_to_disk --------------------------------------------------------------------------------


def test_hf_save_to_disk_detects_image_and_classlabel_columns(tmp_path):
    root, names = make_hf_disk(tmp_path / "hfdisk", per_class=3)
    for spec in (str(root), f"hf:{root}"):
        splits = load_dataset(spec)
        assert splits.class_names == names and splits.name == "hfdisk"
        assert splits.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        image, label = splits.train[4]
        assert image.mode == "RGB" and image.size == (16, 16) and label == 1
    explicit = load_dataset(str(root), image_column="img", label_column="fine_label")
    assert explicit.fingerprint == splits.fingerprint
    with pytest.raises(UserError, match="extra"):  # the error lists the columns there are
        load_dataset(str(root), label_column="nope")
    with pytest.raises(UserError, match="not an Image column"):
        load_dataset(str(root), image_column="extra")


def test_hf_disk_validation_split_and_single_dataset(tmp_path):
    import datasets

    root, _ = make_hf_disk(tmp_path / "tv", splits=("train", "validation"), image_column="image", label_column="label")
    splits = load_dataset(str(root))
    assert splits.val is None and len(splits.test) == 12

    single = datasets.load_from_disk(str(root))["train"]
    single.save_to_disk(str(tmp_path / "single"))
    splits = load_dataset(str(tmp_path / "single"), val_fraction=0.25, shots=2)
    assert np.bincount(splits.test.targets).tolist() == [1, 1, 1]
    assert np.bincount(splits.train.targets).tolist() == [2, 2, 2]


def test_hf_corrupt_image_is_named(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    good = Image.new("RGB", (4, 4))
    rows = {"image": [good, {"bytes": b"garbage", "path": "broken.png"}, good], "label": [0, 1, 1]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hfbad"))
    splits = load_dataset(str(tmp_path / "hfbad"), val_fraction=0.34)
    i = next(i for i in range(len(splits.train)) if "broken.png" in splits.train.where(i))
    with pytest.raises(BadImageError, match="broken.png"):
        splits.train[i]
    skipped = load_dataset(str(tmp_path / "hfbad"), val_fraction=0.34, skip_bad_images=True)
    assert len(skipped.skipped) == 1 and "broken.png" in skipped.skipped[0]


# ---- hub, offline ---------------------------------------------------------------------------------------------


def test_hub_offline_fails_fast_with_a_way_out(monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.TIMEOUT_S: False)
    start = time.monotonic()
    with pytest.raises(UserError, match="uoft-cs/cifar100") as info:
        load_dataset("cifar100")
    assert time.monotonic() - start < 15
    assert "save_to_disk" in str(info.value) and "\n" not in str(info.value)

    import datasets.config

    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.TIMEOUT_S: pytest.fail("probed a switched-off hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"mr2ft-no-such/dataset.*HF_HUB_OFFLINE"):
        load_dataset("hf:mr2ft-no-such/dataset:cfg")


# ---- IDX ------------------------------------------------------------------------------------------------------


def test_read_idx_round_trip_and_truncation(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        assert np.array_equal(read_idx(write_idx(tmp_path / name, array)), array)
    raw = (tmp_path / "a-idx3-ubyte").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-4])
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "cut")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an IDX"):
        read_idx(tmp_path / "junk")


def test_fashion_mnist_reads_idx_files_with_its_class_names(tmp_path, monkeypatch):
    folder, written = make_idx_folder(tmp_path / "fm", n_train=30, n_test=20)
    monkeypatch.setenv("MR2FT_FASHION_MNIST_DIR", str(folder))
    splits = load_dataset("fashion-mnist", max_per_class=2)
    assert splits.class_names == FASHION_MNIST_CLASSES and splits.name == "fashion-mnist"
    assert len(splits.train) == 20 and len(splits.test) == 20
    images, labels = written["test"]
    for i in (0, 7, 19):
        image, label = splits.test[i]
        pixels = np.asarray(image)
        assert image.mode == "RGB" and label == labels[i]
        assert all(np.array_equal(pixels[..., ch], images[i]) for ch in range(3))
    generic = load_dataset(str(folder))
    assert generic.class_names == [str(i) for i in range(10)] and len(generic.train) == 30


# ---- class-balanced sampler -----------------------------------------------------------------------------------


def test_sampler_batches_hold_m_of_each_of_distinct_classes_and_cover_the_data():
    targets = np.repeat(np.arange(6), 8)  # 6 classes x 8 samples
    rng = np.random.default_rng(0)
    rng.shuffle(targets)
    sampler = ClassBalancedBatchSampler(targets, samples_per_class=4, batch_size=12, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 48 // 12
    for batch in batches:
        labels, counts = np.unique(targets[batch], return_counts=True)
        assert len(labels) == 3 and counts.tolist() == [4, 4, 4]
    assert sorted(i for b in batches for i in b) == list(range(48))


def test_sampler_is_deterministic_and_reshuffles_per_epoch():
    targets = np.repeat(np.arange(5), 6)
    a = ClassBalancedBatchSampler(targets, 2, 4, seed=3)
    b = ClassBalancedBatchSampler(targets, 2, 4, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ClassBalancedBatchSampler(targets, 2, 4, seed=4)) != first


def test_sampler_unbalanced_classes_and_small_classes():
    targets = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 5)
    for drop_last in (True, False):
        sampler = ClassBalancedBatchSampler(torch.as_tensor(targets), 2, 4, seed=0, drop_last=drop_last)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches[: len(batches) if drop_last else -1]:
            labels, counts = np.unique(targets[batch], return_counts=True)
            assert len(labels) == 2 and counts.tolist() == [2, 2]
        seen = {i for b in batches for i in b}
        if not drop_last:
            assert seen == set(range(len(targets)))  # class 2's single sample is repeated to make a pair
    with pytest.raises(UserError, match="multiple"):
        ClassBalancedBatchSampler(targets, 3, 4)
    with pytest.raises(UserError, match="classes"):
        ClassBalancedBatchSampler(targets, 2, 10)


def test_hub_dataset_in_the_local_cache_loads_without_network(tmp_path, monkeypatch):
    import datasets
    import datasets.config

    # Fill a private cache the way a hub download does: datasets keeps hub data under <namespace>___<name>.
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    rows = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 4, "label": [0, 1, 0, 1]}, features)
    (tmp_path / "tiny" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        rows.to_parquet(str(tmp_path / "tiny" / "data" / f"{split}-00000.parquet"))
    datasets.load_dataset(str(tmp_path / "tiny"), cache_dir=str(cache))
    (cache / "tiny").rename(cache / "someone___tiny")

    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.TIMEOUT_S: False)
    splits = load_dataset("hf:someone/tiny")
    assert splits.class_names == ["cat", "dog"] and splits.name == "tiny"
    assert len(splits.train) == len(splits.test) == 4 and splits.train[1][1] == 1


# ---- symbolic links, odd names and odd files (issue 19) -------------------------------------------------------


def labelled_files(ds: ImageDataset) -> set[tuple[str, str]]:
    """(file's real path, class name) of every item, so a file counted under another class shows."""
    return {(os.path.realpath(ds.where(i)), ds.class_names[int(ds.targets[i])]) for i in range(len(ds))}


def test_directory_links_that_loop_or_lead_into_a_class_are_not_followed(tmp_path, caplog):
    root = make_image_folder(tmp_path / "links", num_classes=2, per_class=3, class_names=["a", "b"])
    plain = load_dataset(str(root))
    train = root / "train"
    (train / "a" / "self").symlink_to(".", target_is_directory=True)  # loops onto its own folder
    (train / "a" / "up").symlink_to("..", target_is_directory=True)  # the split folder: every class again
    (train / "a" / "other").symlink_to("../b", target_is_directory=True)  # b's images under label a
    (train / "b_again").symlink_to("b", target_is_directory=True)  # a self-link must not duplicate class b
    with caplog.at_level("WARNING"):
        linked = load_dataset(str(root))
    assert linked.class_names == ["a", "b"]
    assert labelled_files(linked.train) == labelled_files(plain.train) and len(linked.train) == 6
    warnings = [r.getMessage() for r in caplog.records if "directory link" in r.getMessage()]
    assert len(warnings) == 1 and "4 directory link(s)" in warnings[0] and "\n" not in warnings[0]
    assert "loop or repeat" in warnings[0] and "into a class folder" in warnings[0]


def test_links_leaving_the_dataset_root_need_follow_links_and_never_loop(tmp_path, caplog):
    root = make_image_folder(tmp_path / "root", num_classes=2, per_class=2, class_names=["a", "b"])
    outside = make_image_folder(tmp_path / "outside", num_classes=1, per_class=3, splits=None, class_names=["x"])
    (outside / "x" / "again").symlink_to(outside / "x", target_is_directory=True)  # a loop out there
    (root / "train" / "a" / "extra").symlink_to(outside / "x", target_is_directory=True)
    with caplog.at_level("WARNING"):
        default = load_dataset(str(root))
    assert len(default.train) == 4
    assert any(
        "outside the dataset root" in r.getMessage() and "--follow-links" in r.getMessage() for r in caplog.records
    )
    followed = load_dataset(str(root), follow_links=True)
    extra = {f for f, label in labelled_files(followed.train) if label == "a"} - {
        f for f, _ in labelled_files(default.train)
    }
    assert len(followed.train) == 7 and len(extra) == 3  # the outside images once each, despite the loop
    assert followed.fingerprint != default.fingerprint


def test_class_folders_may_be_links_to_anywhere(tmp_path):
    store = make_image_folder(tmp_path / "store", num_classes=2, per_class=2, splits=None, class_names=["a", "b"])
    root = tmp_path / "assembled"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / name).symlink_to(store / name, target_is_directory=True)
    splits = load_dataset(str(root))
    assert splits.class_names == ["a", "b"] and len(splits.train) == len(splits.test) == 4


def test_broken_image_link_is_one_line_or_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "broken", num_classes=2, per_class=2, class_names=["a", "b"])
    (root / "train" / "a" / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(UserError, match="gone.png is a broken symbolic link") as err:
        load_dataset(str(root))
    assert "--skip-bad-images" in str(err.value) and "\n" not in str(err.value)
    splits = load_dataset(str(root), skip_bad_images=True)
    assert len(splits.train) == 4 and len(splits.skipped) == 1 and "gone.png" in splits.skipped[0]


def test_class_folder_name_that_is_not_utf8_is_one_printable_line(tmp_path):
    root = make_image_folder(tmp_path / "names", num_classes=2, per_class=1, class_names=["a", "b"])
    bad = os.path.join(os.fsencode(root / "train"), b"caf\xe9")
    try:
        os.mkdir(bad)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with open(os.path.join(bad, b"0.png"), "wb") as fh:
        Image.new("RGB", (4, 4)).save(fh, format="PNG")
    with pytest.raises(UserError, match="not valid UTF-8; rename it") as err:
        load_dataset(str(root))
    str(err.value).encode("utf-8")  # printable: no lone surrogates
    assert "\n" not in str(err.value)
    # An image file name that is not UTF-8 is read like any other, and named printably when it is bad.
    os.rename(bad, os.path.join(os.fsencode(root), b"kept"))
    with open(os.path.join(os.fsencode(root / "train" / "a"), b"j\xfcnk.png"), "wb") as fh:
        fh.write(b"not an image")
    with pytest.raises(BadImageError) as err:
        splits = load_dataset(str(root))
        [splits.train[i] for i in range(len(splits.train))]
    assert "nk.png" in str(err.value) and str(err.value).encode("utf-8")
    splits = load_dataset(str(root), skip_bad_images=True)
    assert len(splits.train) == 2 and splits.skipped[0].encode("utf-8") and splits.fingerprint


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (bytes(range(256)) * 8, "is not UTF-8 text"),
        (b"img/a.png,cat\n\x00\x00\x00,dog\n", "cannot be parsed"),
        (b"path,label\nimg/a.png,cat\nimg/b.png,\n", "line 3 has an empty label"),
        (b"path,label\nimg/a.png,0\nimg/b.png,200000\n", r"must be 0\.\.K-1 with every value used"),
        (b"path,label\nimg/a.png,cat\nimg/b.png,cat\n", "at least 2 classes"),
    ],
)
def test_csv_that_is_binary_or_has_bad_labels_is_one_line(tmp_path, content, match):
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (4, 4)).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "data.csv").write_bytes(content)
    start = time.monotonic()
    with pytest.raises(UserError, match=match) as err:
        load_dataset(str(tmp_path / "data.csv"), val_fraction=0.5)
    assert "\n" not in str(err.value) and time.monotonic() - start < 10  # no 200,001-class allocation


def test_one_class_folder_is_refused_and_a_class_without_test_images_loads(tmp_path, caplog):
    one = make_image_folder(tmp_path / "one", num_classes=1, per_class=2, class_names=["only"])
    with pytest.raises(UserError, match="only the class 'only'.*at least 2 classes"):
        load_dataset(str(one))
    root = make_image_folder(tmp_path / "gap", num_classes=3, per_class=2, class_names=["a", "b", "c"])
    for f in (root / "test" / "c").iterdir():
        f.unlink()
    (root / "test" / "c").rmdir()
    with caplog.at_level("WARNING"):
        splits = load_dataset(str(root))
    assert splits.num_classes == 3 and set(splits.test.targets.tolist()) == {0, 1}
    assert any("no images of 1 class(es): 'c'" in r.getMessage() for r in caplog.records)


def test_sparse_integer_labels_are_refused_in_idx_and_hf_sources_too(tmp_path):
    folder, _ = make_idx_folder(tmp_path / "idx", n_train=6, n_test=3, num_classes=3)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 0, 2, 2, 0, 2], dtype=np.uint8))
    with pytest.raises(UserError, match="0..K-1"):
        load_dataset(str(folder))


def test_image_rewritten_with_its_mtime_restored_changes_the_fingerprint(tmp_path):
    root = make_image_folder(tmp_path / "fp", num_classes=2, per_class=2, class_names=["a", "b"])
    target = root / "train" / "a" / "0000.png"
    before = load_dataset(str(root)).split_fingerprint("train")
    st = target.stat()
    replacement = tmp_path / "other.png"
    Image.open(root / "train" / "b" / "0000.png").save(replacement)
    data = replacement.read_bytes()
    data = data if len(data) == st.st_size else target.read_bytes()[::-1]  # same size either way
    target.write_bytes(data[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / rsync -a / tar -x do
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    assert load_dataset(str(root)).split_fingerprint("train") != before


# ---- class-balanced sampler: no repeats within a group, small classes spread (issue 14) -------------------------


def class_groups(batch: list[int], targets: np.ndarray) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i in batch:
        groups.setdefault(int(targets[i]), []).append(i)
    return groups


def test_sampler_pads_a_group_only_with_images_not_already_in_it():
    targets = np.repeat(np.arange(4), [5, 7, 9, 3])  # 4 per group: every class has a partial last group
    for seed in range(20):
        sampler = ClassBalancedBatchSampler(targets, samples_per_class=4, batch_size=8, seed=seed, drop_last=False)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            for cls, group in class_groups(batch, targets).items():
                assert len(group) == 4
                if cls != 3:  # class 3 has 3 images: one repeat is unavoidable, and only one
                    assert len(set(group)) == 4, (seed, cls, group)
                else:
                    assert set(group) == set(np.flatnonzero(targets == 3).tolist())


def test_sampler_spreads_small_classes_through_the_epoch():
    targets = np.repeat(np.arange(3), [200, 200, 20])  # class 2: 10 groups of 2 among 105 batches of 2 classes
    for seed in range(5):
        batches = list(ClassBalancedBatchSampler(targets, samples_per_class=2, batch_size=4, seed=seed))
        assert len(batches) == 105
        where = [b for b, batch in enumerate(batches) if 2 in class_groups(batch, targets)]
        assert len(where) == 10
        # Evenly spread: one group in each tenth of the epoch (the old sampler put all ten in the last 15 batches).
        assert [w * 10 // len(batches) for w in where] == list(range(10)), where


def test_sampler_length_and_batches_hold_for_random_imbalance():
    rng = np.random.default_rng(7)
    for _ in range(30):
        sizes = rng.integers(1, 40, size=rng.integers(2, 9))
        targets = np.repeat(np.arange(len(sizes)), sizes)
        m = int(rng.integers(1, 4))
        c = int(rng.integers(1, len(sizes) + 1))
        for drop_last in (True, False):
            sampler = ClassBalancedBatchSampler(targets, m, m * c, seed=int(rng.integers(100)), drop_last=drop_last)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            full = [b for b in batches if len(b) == m * c]
            for batch in full:
                groups = class_groups(batch, targets)
                assert len(groups) == c and all(len(g) == m for g in groups.values())
            # As many full batches as the group counts allow: taking from the largest classes first is optimal.
            groups_left = -(-sizes // m)
            best = 0
            while np.count_nonzero(groups_left) >= c:
                groups_left[np.argsort(-groups_left, kind="stable")[:c]] -= 1
                best += 1
            assert len(full) == best
            if not drop_last:
                assert {i for b in batches for i in b} == set(range(len(targets)))


# ---- feature cache: temporary files of killed writes, unusable folders (issue 19) ------------------------------


def test_feature_cache_removes_temp_files_of_killed_writers_on_open(tmp_path):
    from mr2ft.features import FeatureCache
    from mr2ft.io import atomic_path

    cache = FeatureCache(tmp_path / "cache")
    cache.save("ab" + "0" * 30, torch.zeros(3, 2), torch.zeros(3))
    folder = cache.path("ab" + "0" * 30).parent
    with pytest.raises(RuntimeError):  # a failed write cleans up after itself
        with atomic_path(folder / "x.safetensors"):
            raise RuntimeError
    ours = next(iter(folder.glob("*.safetensors"))).name
    # What a kill -9 leaves: a temp file named after its writer's host and pid.
    probe = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(probe.stdout)
    with atomic_path(folder / "y.safetensors") as tmp:
        name = tmp.name
    dead = folder / name.replace("y.safetensors", "z.safetensors").replace(f"-{os.getpid()}-", f"-{dead_pid}-")
    dead.write_bytes(b"partial")
    alive = folder / name.replace("y.safetensors", "w.safetensors")  # this process: a write in progress
    alive.write_bytes(b"partial")
    old = folder / name.replace("y.safetensors", "v.safetensors")
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    unrelated = folder / ".notes.tmp"
    unrelated.write_text("not ours")
    FeatureCache(tmp_path / "cache")
    left = {p.name for p in folder.iterdir()}
    assert dead.name not in left and old.name not in left
    assert {alive.name, unrelated.name, ours, "y.safetensors"} <= left


@pytest.mark.parametrize("kind", ["file", "too_long"])
def test_feature_cache_folder_that_cannot_be_used_is_one_line(tmp_path, kind):
    from mr2ft.features import FeatureCache

    if kind == "file":
        root = tmp_path / "a_file"
        root.write_text("x")
    else:
        root = tmp_path / ("n" * 300)
    with pytest.raises(UserError, match="cannot be used.*--cache-dir") as err:
        FeatureCache(root)
    assert "\n" not in str(err.value)


def test_feature_cache_write_failure_keeps_the_features(tmp_path, monkeypatch, caplog):
    import errno

    from mr2ft import features

    cache = features.FeatureCache(tmp_path / "cache")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features, "save_tensors", disk_full)
    with caplog.at_level("WARNING"):
        cache.save("cd" + "0" * 30, torch.zeros(2, 2), torch.zeros(2))
    assert any("No space left on device" in r.getMessage() for r in caplog.records)


# ---- one hub policy for data and weights (issue 18) ------------------------------------------------------------


def test_hub_policy_reads_every_offline_variable_and_the_proxy_requests_would_use(monkeypatch):
    import socket

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    for name in hub.OFFLINE_VARIABLES:
        with monkeypatch.context() as m:
            m.setenv(name, "1")
            assert hub.offline_reason("https://hub.invalid") == f"{name} is set"
    with socket.socket() as server:  # a "proxy" that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setenv("https_proxy", proxy)
        assert hub.reachable("https://hub.invalid", timeout=2)  # through the proxy, as requests would go
        monkeypatch.setenv("NO_PROXY", "hub.invalid")
        monkeypatch.setenv("no_proxy", "hub.invalid")
        assert not hub.reachable("https://hub.invalid", timeout=2)  # bypassed: straight to a name that does not resolve
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    closed = "http://127.0.0.1:9"
    monkeypatch.setenv("HTTPS_PROXY", closed)
    monkeypatch.setenv("https_proxy", closed)
    assert (
        hub.offline_reason("https://hub.invalid") == "hub.invalid cannot be reached (through the proxy " + closed + ")"
    )


def test_datasets_and_weights_follow_the_same_hub_policy(monkeypatch, tmp_path):
    from mr2ft.backbones import load_backbone

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=hub.TIMEOUT_S: False)
    with pytest.raises(UserError, match="cannot be reached.*save_to_disk"):
        load_dataset("cifar100")
    with pytest.raises(UserError, match="cannot be reached.*--weights"):
        load_backbone("timm", "test_vit", cache_dir=str(tmp_path))
