"""Small synthetic datasets for tests: image folders, CSVs, IDX files and ``save_to_disk`` folders.

Each class has its own colour and stripe pattern plus per-image noise, so a small model (or even a linear probe on
raw pixels) can learn the classes; everything is deterministic for a given ``seed``.

    root = make_image_folder(tmp_path / "images", num_classes=3, per_class=6)   # train/ and test/ of class folders
    splits = load_dataset(str(root))
"""

from __future__ import annotations

import colorsys
import csv
import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def class_names_for(num_classes: int) -> list[str]:
    """Default class folder names: ``class_00``, ``class_01``, ... (sorted order = class index)."""
    return [f"class_{k:02d}" for k in range(num_classes)]


def class_image(label: int, num_classes: int, size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """An RGB image whose class shows in its colour (hue) and its stripes (orientation and frequency), plus noise."""
    rng = rng if rng is not None else np.random.default_rng(label)
    r, g, b = colorsys.hsv_to_rgb(label / max(num_classes, 1), 0.8, 0.9)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = 1 + label % 3
    coord = xx if (label // 3) % 2 == 0 else yy
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * coord + rng.uniform(0, 2 * np.pi))
    base = np.stack([np.full_like(xx, r), np.full_like(xx, g), np.full_like(xx, b)], axis=-1)
    img = 255 * base * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def make_image_folder(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 6,
    size: int = 32,
    splits: Sequence[str] | None = ("train", "test"),
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    ext: str = "png",
) -> Path:
    """Write ``root/<split>/<class>/<i>.<ext>`` (or ``root/<class>/...`` when ``splits`` is empty or None).

    Args:
        per_class: images per class in each split.
        class_names: folder names (default :func:`class_names_for`); keep them sorted if the index order matters.

    Returns:
        ``root``.
    """
    root = Path(root)
    names = list(class_names) if class_names is not None else class_names_for(num_classes)
    for s, split in enumerate(list(splits or [None])):
        base = root / split if split else root
        for k, name in enumerate(names):
            folder = base / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, s, k, i])
                class_image(k, len(names), size, rng).save(folder / f"{i:04d}.{ext}")
    return root


def make_csv(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 4,
    size: int = 32,
    with_split: bool = True,
    header: bool = True,
    int_labels: bool = False,
    seed: int = 0,
) -> Path:
    """Write images under ``root/img/`` and ``root/labels.csv`` listing them (paths relative to the CSV).

    With ``with_split`` each class gets ``per_class`` train rows and ``per_class // 2`` (at least 1) test rows.

    Returns:
        the CSV path.
    """
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = class_names_for(num_classes)
    rows = []
    splits = [("train", per_class), ("test", max(per_class // 2, 1))] if with_split else [("train", per_class)]
    for s, (split, count) in enumerate(splits):
        for k, name in enumerate(names):
            for i in range(count):
                rel = f"img/{split}_{k}_{i}.png"
                class_image(k, num_classes, size, np.random.default_rng([seed, s, k, i])).save(root / rel)
                rows.append([rel, str(k) if int_labels else name] + ([split] if with_split else []))
    path = root / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(["path", "label"] + (["split"] if with_split else []))
        writer.writerows(rows)
    return path


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array in IDX format (gzipped when ``path`` ends in ``.gz``)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx_folder(
    root: str | Path, n_train: int = 40, n_test: int = 20, num_classes: int = 10, size: int = 28, seed: int = 0
) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Write a tiny Fashion-MNIST-layout folder of gzipped IDX files (greyscale, labels cycling over the classes).

    Returns:
        the folder and, per split, the (images, labels) arrays written.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        written["train" if prefix == "train" else "test"] = (images, labels)
    return root, written


def make_hf_disk(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 4,
    size: int = 16,
    splits: Sequence[str] = ("train", "test"),
    image_column: str = "img",
    label_column: str = "fine_label",
    seed: int = 0,
) -> tuple[Path, list[str]]:
    """Write a ``DatasetDict.save_to_disk`` folder with an ``Image`` column, a ``ClassLabel`` column and an extra one.

    Returns:
        the folder and the class names.
    """
    import datasets

    names = [f"kind {chr(ord('a') + k)}" for k in range(num_classes)]
    features = datasets.Features(
        {
            image_column: datasets.Image(),
            label_column: datasets.ClassLabel(names=names),
            "extra": datasets.Value("int32"),
        }
    )
    parts = {}
    for s, split in enumerate(splits):
        images, labels = [], []
        for k in range(num_classes):
            for i in range(per_class):
                images.append(class_image(k, num_classes, size, np.random.default_rng([seed, s, k, i])))
                labels.append(k)
        parts[split] = datasets.Dataset.from_dict(
            {image_column: images, label_column: labels, "extra": list(range(len(labels)))}, features=features
        )
    root = Path(root)
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return root, names


def corrupt_file(path: str | Path) -> Path:
    """Overwrite a file with bytes that no image decoder accepts."""
    Path(path).write_bytes(b"this is not an image\x00" * 8)
    return Path(path)


def truncate_file(path: str | Path, keep: float = 0.5) -> Path:
    """Cut an image file to ``keep`` of its length (its header still parses; decoding the pixels fails)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(int(len(data) * keep), 64)])
    return path
