"""Datasets: a ``--dataset`` spec becomes train / val / test splits of (RGB PIL image, int label), with class names.

Spec forms, resolved in this order:

- ``hf:NAME[:CONFIG]``: :func:`datasets.load_dataset` (the image column is the ``Image`` feature, the label column
  the ``ClassLabel`` feature, unless ``image_column`` / ``label_column`` say otherwise). ``hf:PATH`` of a local
  folder reads it with ``datasets`` too (a ``save_to_disk`` folder, or data files it understands).
- an existing local path:

  - a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
  - a folder of MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` and ``t10k-``/``test-``);
  - a folder with ``train/`` and ``test/`` and/or ``val/`` subfolders of class folders (ImageFolder layout), or one
    folder of class folders;
  - a CSV of ``path,label[,split]`` (header optional; paths relative to the CSV's folder; label a name or an int).
- a short name: ``fashion-mnist`` (the Debian package's IDX files when present, else the hub) or one of
  :data:`KNOWN_DATASETS` (a hub id with its columns).

Splits. ``test`` is the split results are reported on. A dataset with ``train`` + ``val`` only uses ``val`` as its
test split. With ``train`` + ``test``, ``val_fraction`` carves a stratified ``val`` out of ``train``. With ``train``
alone (one folder, a CSV without a split column), ``val_fraction`` carves the ``test`` split out of ``train``, and is
required. ``shots`` / ``max_per_class`` then take a class-balanced subset of ``train`` (``max_per_class`` also of
``val``), ``test_max_per_class`` of ``test``; all deterministic by ``seed``.

Images. Every image comes back as RGB: greyscale and CMYK are converted, palette and alpha images are composited on
white, 16-bit greyscale is scaled to 8 bits, and the EXIF orientation is applied (as ``datasets`` does). A file that
cannot be decoded raises :class:`BadImageError` (a :class:`~mr2ft.errors.UserError`) naming it, when it is first read;
with ``skip_bad_images`` every image that will be used is decoded once up front, and the bad ones are dropped and
listed in :attr:`DatasetSplits.skipped`.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import copy
import csv
import difflib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import socket
import struct
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mr2ft.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass(frozen=True)
class HubDataset:
    """Where a named dataset lives on the Hugging Face hub, and which columns hold its images and labels."""

    repo: str
    config: str | None = None
    image_column: str | None = None
    label_column: str | None = None


# The paper's datasets by short name. Splits are found by name (train / validation / test); a test split without
# labels (imagenet-1k) falls back to validation, and food101, which has no test split, reports on validation.
KNOWN_DATASETS: dict[str, HubDataset] = {
    "cifar10": HubDataset("uoft-cs/cifar10", image_column="img", label_column="label"),
    "cifar100": HubDataset("uoft-cs/cifar100", image_column="img", label_column="fine_label"),
    "food101": HubDataset("ethz/food101", image_column="image", label_column="label"),
    "flowers102": HubDataset("dpdl-benchmark/oxford_flowers102", image_column="image", label_column="label"),
    "oxford-pets": HubDataset("timm/oxford-iiit-pet", image_column="image", label_column="label"),
    "stanford-cars": HubDataset("tanganke/stanford_cars", image_column="image", label_column="label"),
    "fgvc-aircraft": HubDataset("HuggingFaceM4/FGVC-Aircraft", image_column="image", label_column="variant"),
    "imagenet-1k": HubDataset("ILSVRC/imagenet-1k", image_column="image", label_column="label"),
    "fashion-mnist": HubDataset("zalando-datasets/fashion_mnist", image_column="image", label_column="label"),
}

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}

# What PIL raises on a missing, unreadable, truncated or malformed image file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


class BadImageError(UserError):
    """An image file that cannot be decoded; the message names it.

    torch's DataLoader re-raises an exception from a worker as ``type(e)(text)``, where ``text`` holds the worker's
    whole traceback. This class recovers its own one-line message from that text, so the CLI still prints one line
    (the traceback is kept in :attr:`worker_traceback`).
    """

    def __init__(self, message: str) -> None:
        self.worker_traceback: str | None = None
        if "\nOriginal Traceback" in message:
            self.worker_traceback = message
            lines = [line for line in message.strip().splitlines() if line.strip()]
            marker = f"{type(self).__name__}: "
            last = lines[-1] if lines else ""
            if marker in last:
                message = last.split(marker, 1)[1].strip()
        super().__init__(message)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: transparency composited on white, 16-bit greyscale scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if top > 255:
            arr = arr * (255.0 / top)
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _open_rgb(opener: Callable[[], Image.Image], where: str) -> Image.Image:
    try:
        image = opener()
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)
    except _DECODE_ERRORS as e:
        if isinstance(e, UnidentifiedImageError):
            reason = "not a format PIL can read"
        else:
            reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise BadImageError(
            f"cannot read image {where} ({reason}); replace or remove the file, or pass --skip-bad-images"
        ) from None


# ---- one split ------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset, abc.ABC):
    """One split: ``ds[i] -> (RGB PIL image, int label)``; labels without decoding any image in :attr:`targets`.

    Subclasses store all items of a source and read item ``j`` in :meth:`_load`; an ``ImageDataset`` is a view of
    some of them (``indices``), so subsets share the source and stay cheap to pickle into DataLoader workers.
    """

    def __init__(self, all_targets: np.ndarray, class_names: Sequence[str], indices: np.ndarray | None = None) -> None:
        self._all_targets = np.asarray(all_targets, dtype=np.int64)
        self.class_names = list(class_names)
        self._indices = (
            np.arange(len(self._all_targets), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        )
        self.targets = self._all_targets[self._indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        j = int(self._indices[i])
        return self._load(j), int(self._all_targets[j])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The items at positions ``indices`` of this dataset (positions, not source rows), as a new dataset."""
        out = copy.copy(self)
        out._indices = self._indices[np.asarray(indices, dtype=np.int64)]
        out.targets = out._all_targets[out._indices]
        return out

    def where(self, i: int) -> str:
        """A name for item ``i`` that a user can find (a file path, or the source and row)."""
        return self._where(int(self._indices[i]))

    def is_readable(self, i: int) -> bool:
        """Whether item ``i`` decodes (used by ``skip_bad_images``)."""
        try:
            self._load(int(self._indices[i]))
        except BadImageError:
            return False
        return True

    def identity(self) -> bytes:
        """Bytes that change whenever the items of this view, their files or labels change (no image is read)."""
        return self._source_identity() + self._indices.tobytes() + self.targets.tobytes()

    @abc.abstractmethod
    def _load(self, j: int) -> Image.Image:
        """Decode source item ``j`` as RGB (raises :class:`BadImageError`)."""

    @abc.abstractmethod
    def _where(self, j: int) -> str:
        """Name source item ``j`` for messages."""

    @abc.abstractmethod
    def _source_identity(self) -> bytes:
        """Bytes identifying the source items in view (file stats, hub name), read without decoding."""


class FileImageDataset(ImageDataset):
    """Images stored as files (an image folder or a CSV)."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: np.ndarray,
        class_names: Sequence[str],
        root: Path,
        stats: Sequence[tuple[int, int]],
    ) -> None:
        super().__init__(targets, class_names)
        self.paths = list(paths)  # relative to root, or absolute
        self.root = Path(root)
        self._stats = list(stats)  # (size, mtime_ns) per file
        self._source_key: bytes | None = None

    def _path(self, j: int) -> Path:
        return self.root / self.paths[j]

    def _load(self, j: int) -> Image.Image:
        path = self._path(j)
        return _open_rgb(lambda: Image.open(path), str(path))

    def _where(self, j: int) -> str:
        return str(self._path(j))

    def _source_identity(self) -> bytes:
        # Only the items in view count: a file added to another split must not change this split's fingerprint.
        h = hashlib.sha256()
        for j in self._indices:
            size, mtime = self._stats[j]
            h.update(f"{self.paths[j]}\t{size}\t{mtime}\n".encode())
        return h.digest()


class ArrayImageDataset(ImageDataset):
    """Images held in one uint8 array (N, H, W) or (N, H, W, C), such as IDX files."""

    def __init__(
        self, images: np.ndarray, targets: np.ndarray, class_names: Sequence[str], source: str, identity: bytes
    ) -> None:
        super().__init__(targets, class_names)
        self.images = images
        self.source = source
        self._identity = identity

    def _load(self, j: int) -> Image.Image:
        arr = self.images[j]
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode="L" if arr.ndim == 2 else None))

    def _where(self, j: int) -> str:
        return f"{self.source}[{j}]"

    def _source_identity(self) -> bytes:
        return self._identity


class HFImageDataset(ImageDataset):
    """A split of a Hugging Face ``datasets.Dataset``; images are decoded here, so a bad one is named."""

    def __init__(
        self,
        hf_dataset: Any,
        image_column: str,
        targets: np.ndarray,
        class_names: Sequence[str],
        source: str,
        identity: bytes,
    ) -> None:
        import datasets

        super().__init__(targets, class_names)
        # Undecoded rows give the file path or bytes, so a decode error can name the file.
        self.hf_dataset = hf_dataset.select_columns([image_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.image_column = image_column
        self.source = source
        self._identity = identity
        self._decoder = datasets.Image()

    def _load(self, j: int) -> Image.Image:
        value = self.hf_dataset[j][self.image_column]
        return _open_rgb(lambda: self._decoder.decode_example(value), self._where(j, value))

    def _where(self, j: int, value: Any = None) -> str:
        if value is None:
            value = self.hf_dataset[j][self.image_column]
        path = value.get("path") if isinstance(value, dict) else None
        return f"{self.source} row {j}" + (f" ({path})" if path else "")

    def _source_identity(self) -> bytes:
        return self._identity


class TransformedDataset(torch.utils.data.Dataset):
    """``(image, label) -> (transform(image), label)``; a plain picklable object, so DataLoader workers can use it."""

    def __init__(self, dataset: ImageDataset, transform: Callable[[Image.Image], Any] | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.dataset[i]
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> np.ndarray:
        return self.dataset.targets

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names


# ---- all splits -----------------------------------------------------------------------------------------------


@dataclass
class DatasetSplits:
    """The splits of one dataset, its class names and the fingerprint of exactly what was selected.

    Attributes:
        train, val, test: the splits (``val`` may be None).
        class_names: one name per class index, shared by every split.
        name: a short, file-name-safe name for run folders.
        fingerprint: a stable hex hash of the data identity (files, labels, selection options); it changes when a
            file is added, removed or modified. Part of the feature-cache key.
        skipped: the bad images dropped under ``skip_bad_images``.
        spec: the spec the user gave.
        source: where the data was read from, in words.
    """

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    class_names: list[str]
    name: str
    fingerprint: str
    skipped: list[str] = field(default_factory=list)
    spec: str = ""
    source: str = ""
    _split_fingerprints: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_fingerprint(self, split_name: str) -> str:
        """The fingerprint of one split (``train``, ``val`` or ``test``)."""
        if split_name not in self._split_fingerprints:
            raise KeyError(f"no split {split_name!r}; have {sorted(self._split_fingerprints)}")
        return self._split_fingerprints[split_name]

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary for logs and the run folder."""
        return {
            "dataset": self.name,
            "spec": self.spec,
            "source": self.source,
            "num_classes": self.num_classes,
            "train": len(self.train),
            "val": len(self.val) if self.val is not None else 0,
            "test": len(self.test),
            "skipped": len(self.skipped),
            "fingerprint": self.fingerprint,
        }


@dataclass
class _Raw:
    """What a loader found, before splitting and subsetting."""

    splits: dict[str, ImageDataset]
    class_names: list[str]
    name: str
    source: str


def load_dataset(
    spec: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    shots: int | None = None,
    max_per_class: int | None = None,
    test_max_per_class: int | None = None,
    skip_bad_images: bool = False,
) -> DatasetSplits:
    """Resolve a dataset spec into train / val / test splits with class names (see the module docstring).

    Args:
        spec: ``hf:NAME[:CONFIG]``, a folder, a CSV file, or a short name (``cifar100``, ``fashion-mnist``, ...).
        image_column, label_column: the columns of a hub / ``save_to_disk`` dataset (detected when None).
        val_fraction: the fraction of each class of ``train`` held out (stratified): as ``val`` when the data has a
            test split, else as ``test``.
        seed: seeds every random choice here (held-out split, subsets).
        shots: exactly this many training images per class (error if a class has fewer).
        max_per_class: at most this many images per class in ``train`` and ``val``.
        test_max_per_class: at most this many images per class in ``test`` (for quick evaluations).
        skip_bad_images: decode every image that will be used once now, and drop the ones that fail.

    Raises:
        UserError: the spec cannot be read, a folder or class is empty, the test split has classes that train does
            not, an option is out of range, or the hub is needed but cannot be reached.
    """
    spec = str(spec).strip()
    if not spec:
        raise UserError("no dataset given; pass --dataset with a folder, a CSV file, hf:NAME or a known name")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for flag, value in (
        ("--shots", shots),
        ("--max-per-class", max_per_class),
        ("test_max_per_class", test_max_per_class),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if shots is not None and max_per_class is not None:
        raise UserError("--shots and --max-per-class both limit the training images per class; pass only one")

    raw = _resolve(spec, image_column, label_column)
    train = raw.splits.get("train")
    if train is None or len(train) == 0:
        raise UserError(f"dataset {spec} has no training images; check the spec (found splits: {sorted(raw.splits)})")
    val, test = raw.splits.get("val"), raw.splits.get("test")
    if test is None and val is not None:
        test, val = val, None
    if test is None:
        if val_fraction <= 0:
            raise UserError(
                f"dataset {spec} has no test or val split; pass --val-fraction (e.g. 0.2) to hold out a stratified "
                "part of it for testing"
            )
        keep, held = _stratified_split(train.targets, val_fraction, seed)
        train, test = train.subset(keep), train.subset(held)
    elif val is None and val_fraction > 0:
        keep, held = _stratified_split(train.targets, val_fraction, seed)
        train, val = train.subset(keep), train.subset(held)
    elif val is not None and val_fraction > 0:
        log.warning("dataset %s has its own val split; --val-fraction %s is not used", spec, val_fraction)

    skipped: list[str] = []
    train = _select(train, "train", shots or max_per_class, shots is not None, seed, skip_bad_images, skipped)
    if val is not None:
        val = _select(val, "val", max_per_class, False, seed, skip_bad_images, skipped)
    test = _select(test, "test", test_max_per_class, False, seed, skip_bad_images, skipped)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])

    options = {
        "val_fraction": val_fraction,
        "seed": seed,
        "shots": shots,
        "max_per_class": max_per_class,
        "test_max_per_class": test_max_per_class,
        "skip_bad_images": skip_bad_images,
    }
    split_fps = {"train": _fingerprint(train), "test": _fingerprint(test)}
    if val is not None:
        split_fps["val"] = _fingerprint(val)
    overall = hashlib.sha256(
        json.dumps({"classes": raw.class_names, "splits": split_fps, "options": options}, sort_keys=True).encode()
    ).hexdigest()[:16]
    return DatasetSplits(
        train=train,
        val=val,
        test=test,
        class_names=raw.class_names,
        name=raw.name,
        fingerprint=overall,
        skipped=skipped,
        spec=spec,
        source=raw.source,
        _split_fingerprints=split_fps,
    )


def _fingerprint(ds: ImageDataset) -> str:
    # The identity covers exactly the items chosen (files or rows, labels, positions), so a split's fingerprint moves
    # only when its own data or selection does: --shots leaves the test split's feature cache valid.
    h = hashlib.sha256(ds.identity())
    h.update(json.dumps(ds.class_names).encode())
    return h.hexdigest()[:16]


def _class_indices(targets: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(targets, kind="stable")
    classes, starts = np.unique(targets[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return {int(c): order[s:e] for c, s, e in zip(classes, starts, bounds, strict=True)}


def _rng(seed: int, purpose: int, cls: int) -> np.random.Generator:
    # One stream per class and purpose: a class's choice does not depend on the other classes or options.
    return np.random.default_rng([seed, purpose, cls])


def _stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (keep, held) with ``fraction`` of each class held out (at least one when a class has two or more)."""
    keep, held = [], []
    for c, idx in _class_indices(targets).items():
        n_held = int(round(fraction * len(idx)))
        n_held = min(max(n_held, 1), len(idx) - 1) if len(idx) >= 2 else 0
        perm = idx[_rng(seed, 1, c).permutation(len(idx))]
        held.append(perm[:n_held])
        keep.append(perm[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _select(
    ds: ImageDataset, split: str, per_class: int | None, exact: bool, seed: int, skip_bad: bool, skipped: list[str]
) -> ImageDataset:
    """A class-balanced subset of ``ds`` (at most / exactly ``per_class`` per class), dropping unreadable images."""
    if per_class is None and not skip_bad:
        return ds
    chosen, short = [], []
    for c, idx in _class_indices(ds.targets).items():
        order = idx[_rng(seed, 2, c).permutation(len(idx))] if per_class is not None else idx
        want = len(order) if per_class is None else per_class
        got = []
        for i in order:
            if len(got) == want:
                break
            if skip_bad and not ds.is_readable(int(i)):
                skipped.append(ds.where(int(i)))
                continue
            got.append(i)
        if exact and len(got) < want:
            short.append(f"{ds.class_names[c]!r} has {len(got)}")
        chosen.extend(got)
    if short:
        more = f" (and {len(short) - 3} more classes)" if len(short) > 3 else ""
        raise UserError(
            f"--shots {per_class} needs {per_class} {split} images per class, but {', '.join(short[:3])}{more}; "
            "lower --shots"
        )
    if not chosen:
        raise UserError(f"the {split} split has no readable images left")
    return ds.subset(np.sort(np.asarray(chosen, dtype=np.int64)))


# ---- resolving a spec -----------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "data"


def _resolve(spec: str, image_column: str | None, label_column: str | None) -> _Raw:
    if spec.startswith("hf:"):
        rest = spec[3:]
        if Path(rest).exists():
            return _load_hf_local(Path(rest), image_column, label_column)
        name, _, config = rest.partition(":")
        if not name:
            raise UserError("hf: needs a dataset name, e.g. hf:uoft-cs/cifar100 or hf:ylecun/mnist:mnist")
        return _load_hub(name, config or None, image_column, label_column, _safe_name(name.split("/")[-1]))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() in (".csv", ".tsv", ".txt"):
                return _load_csv(path)
            raise UserError(f"dataset file {path} is not a CSV; give a folder, a .csv of path,label or hf:NAME")
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _load_hf_local(path, image_column, label_column)
        if _idx_files(path) is not None:
            return _load_idx_folder(path, None, _safe_name(path.resolve().name))
        return _load_folder(path)
    key = spec.lower()
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _load_fashion_mnist(image_column, label_column)
    if key in KNOWN_DATASETS:
        entry = KNOWN_DATASETS[key]
        return _load_hub(
            entry.repo,
            entry.config,
            image_column or entry.image_column,
            label_column or entry.label_column,
            key,
        )
    close = difflib.get_close_matches(key, list(KNOWN_DATASETS), n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(
        f"dataset {spec!r} is neither an existing folder or CSV file nor a known name{hint}; give a path, "
        f"hf:NAME[:CONFIG], or one of: {', '.join(KNOWN_DATASETS)}"
    )


# ---- image folders --------------------------------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name))
    return found


def _class_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _scan_split(folder: Path, root: Path, class_names: list[str] | None) -> tuple[list[str], list[int], list, list]:
    classes = _class_folders(folder)
    if not classes:
        loose = _list_images(folder)
        what = f"holds {len(loose)} images but no class folders" if loose else "holds no class folders"
        raise UserError(
            f"{folder} {what}; put each class's images in a subfolder named after the class (ImageFolder layout)"
        )
    index = {n: i for i, n in enumerate(class_names or [p.name for p in classes])}
    paths, targets, stats = [], [], []
    for cls in classes:
        files = _list_images(cls)
        if not files:
            raise UserError(
                f"class folder {cls} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove it"
            )
        for f in files:
            st = f.stat()
            paths.append(f.relative_to(root).as_posix())
            targets.append(index[cls.name])
            stats.append((st.st_size, st.st_mtime_ns))
    return paths, targets, stats, [p.name for p in classes]


def _load_folder(root: Path) -> _Raw:
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    split_dirs = {}
    for dirname, split in _SPLIT_ALIASES.items():
        if dirname in subdirs and split not in split_dirs:
            split_dirs[split] = subdirs[dirname]
    name = _safe_name(root.resolve().name)
    if "train" not in split_dirs:
        if split_dirs:
            raise UserError(
                f"{root} has {', '.join(sorted(split_dirs))} folders but no train/ folder; add train/ (with class "
                "folders), or point --dataset at a single folder of class folders"
            )
        split_dirs = {"train": root}
    train_classes = [p.name for p in _class_folders(split_dirs["train"])]
    splits = {}
    for split, folder in split_dirs.items():
        if split != "train":
            extra = sorted(set(p.name for p in _class_folders(folder)) - set(train_classes))
            if extra:
                shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                raise UserError(
                    f"{folder} has classes that {split_dirs['train']} does not: {shown}; every {split} class needs "
                    "training images (add them to train/ or remove those folders)"
                )
        paths, targets, stats, _ = _scan_split(folder, root, train_classes)
        splits[split] = FileImageDataset(paths, np.asarray(targets), train_classes, root, stats)
    return _Raw(splits, train_classes, name, f"image folder {root}")


# ---- CSV ------------------------------------------------------------------------------------------------------

_PATH_HEADERS = {"path", "image", "file", "filename", "filepath", "image_path", "img"}
_LABEL_HEADERS = {"label", "class", "target", "category", "class_name", "labels"}


def _load_csv(csv_path: Path) -> _Raw:
    text = csv_path.read_text(encoding="utf-8-sig")
    dialect = "excel-tab" if csv_path.suffix.lower() == ".tsv" else "excel"
    rows = [r for r in csv.reader(io.StringIO(text), dialect=dialect) if r and any(cell.strip() for cell in r)]
    if not rows:
        raise UserError(f"CSV {csv_path} is empty; write one path,label row per image")
    header = [c.strip().lower() for c in rows[0]]
    col_path, col_label, col_split, first = 0, 1, 2 if len(rows[0]) >= 3 else None, 0
    if any(c in _PATH_HEADERS for c in header) and any(c in _LABEL_HEADERS for c in header):
        col_path = next(i for i, c in enumerate(header) if c in _PATH_HEADERS)
        col_label = next(i for i, c in enumerate(header) if c in _LABEL_HEADERS)
        col_split = header.index("split") if "split" in header else None
        first = 1
    width = max(col_path, col_label, col_split or 0) + 1
    base = csv_path.parent
    items: dict[str, list[tuple[str, str, tuple[int, int]]]] = {}
    missing = []
    for lineno, row in enumerate(rows[first:], start=first + 1):
        if len(row) < width:
            raise UserError(f"CSV {csv_path} line {lineno} has {len(row)} columns, expected path,label[,split]")
        rel, label = row[col_path].strip(), row[col_label].strip()
        split = _SPLIT_ALIASES.get(row[col_split].strip().lower(), None) if col_split is not None else "train"
        if split is None:
            raise UserError(
                f"CSV {csv_path} line {lineno}: split {row[col_split]!r} is not train, val or test; fix that cell"
            )
        try:
            st = (base / rel).stat()
        except OSError:
            missing.append(str(base / rel))
            st = None
        items.setdefault(split, []).append((rel, label, (st.st_size, st.st_mtime_ns) if st else (-1, -1)))
    if missing:
        raise UserError(
            f"CSV {csv_path} lists {len(missing)} missing file(s), e.g. {missing[0]}; paths are relative to the "
            "CSV's folder: fix them or remove those rows"
        )
    if "train" not in items:
        raise UserError(f"CSV {csv_path} has no train rows; mark training rows with split=train")
    as_ints = all(re.fullmatch(r"\d+", label) for rows_ in items.values() for _, label, _ in rows_)

    def key(label: str) -> str:
        return str(int(label)) if as_ints else label

    train_labels = {key(label) for _, label, _ in items["train"]}
    for split, rows_ in items.items():
        extra = sorted({key(label) for _, label, _ in rows_} - train_labels)
        if extra:
            raise UserError(
                f"CSV {csv_path}: the {split} rows have labels with no train rows: {', '.join(extra[:5])}; add "
                "training images for them or remove those rows"
            )
    if as_ints:
        class_names = [str(i) for i in range(max(int(label) for label in train_labels) + 1)]
    else:
        class_names = sorted(train_labels)
    index = {n: i for i, n in enumerate(class_names)}
    splits = {}
    for split, rows_ in items.items():
        targets = np.asarray([index[key(label)] for _, label, _ in rows_])
        splits[split] = FileImageDataset([r for r, _, _ in rows_], targets, class_names, base, [s for _, _, s in rows_])
    return _Raw(splits, class_names, _safe_name(csv_path.stem), f"CSV {csv_path}")


# ---- IDX (MNIST format) ---------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) into a numpy array without copying it per item.

    Raises:
        UserError: the file is not IDX or is truncated.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path} ({e}); download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); give the MNIST-format files")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(data) < offset + count * dtype.itemsize:
        raise UserError(f"IDX file {path} is truncated ({len(data)} bytes for shape {dims}); download it again")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)


def _idx_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """The (images, labels) IDX files of each split in an MNIST-layout folder, or None if it has no train pair."""

    def find(stem: str) -> Path | None:
        return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)

    out = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        for prefix in prefixes:
            images, labels = find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")
            if images is not None and labels is not None:
                out[split] = (images, labels)
                break
    return out if "train" in out else None


def _load_idx_folder(folder: Path, class_names: list[str] | None, name: str) -> _Raw:
    files = _idx_files(folder)
    if files is None:
        raise UserError(f"{folder} holds no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] pair")
    loaded = {}
    for split, (img_path, lab_path) in files.items():
        images, labels = read_idx(img_path), read_idx(lab_path).astype(np.int64)
        if images.ndim not in (3, 4) or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise UserError(
                f"{img_path} / {lab_path} do not hold N uint8 images and N labels "
                f"(shapes {images.shape}, {labels.shape}); give matching MNIST-format files"
            )
        loaded[split] = (images, labels, img_path, lab_path)
    k = int(max(labels.max() for _, labels, _, _ in loaded.values())) + 1
    class_names = class_names or [str(i) for i in range(k)]
    if k > len(class_names):
        raise UserError(f"{folder} has labels up to {k - 1} but {len(class_names)} class names")
    splits = {}
    for split, (images, labels, img_path, lab_path) in loaded.items():
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (img_path, lab_path)]
        splits[split] = ArrayImageDataset(images, labels, class_names, str(img_path), json.dumps(stats).encode())
    return _Raw(splits, class_names, name, f"IDX files in {folder}")


def _load_fashion_mnist(image_column: str | None, label_column: str | None) -> _Raw:
    folder = Path(os.environ.get("MR2FT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if _idx_files(folder) is not None:
        return _load_idx_folder(folder, FASHION_MNIST_CLASSES, "fashion-mnist")
    entry = KNOWN_DATASETS["fashion-mnist"]
    log.info("no Fashion-MNIST IDX files in %s (Debian package dataset-fashion-mnist); using the hub", folder)
    return _load_hub(
        entry.repo,
        entry.config,
        image_column or entry.image_column,
        label_column or entry.label_column,
        "fashion-mnist",
        hint="or install the Debian package dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist)",
    )


# ---- Hugging Face datasets ------------------------------------------------------------------------------------


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout`` seconds (DNS included)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot; let the library try
    from datasets import config

    url = urllib.parse.urlparse(config.HF_ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)

    def connect() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    # getaddrinfo has no timeout of its own: run it in a thread and stop waiting after ``timeout``.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout + 0.5)
    except concurrent.futures.TimeoutError:
        return False
    finally:
        pool.shutdown(wait=False)


def _hub_offline_env() -> bool:
    from datasets import config

    return bool(config.HF_HUB_OFFLINE) or any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@contextlib.contextmanager
def _cache_only() -> Iterator[None]:
    """Make ``datasets`` use its cache without trying the network (it would retry for ~25 s before giving up)."""
    import datasets.config
    import huggingface_hub.constants

    saved = (
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
            huggingface_hub.constants.HF_HUB_OFFLINE,
        ) = saved


def _load_hub(
    name: str,
    config: str | None,
    image_column: str | None,
    label_column: str | None,
    short_name: str,
    hint: str = "",
) -> _Raw:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    label = f"{name}:{config}" if config else name
    offline = _hub_offline_env()
    unreachable = not offline and not _hub_reachable()
    local_copy = (
        f"on a machine with network run datasets.load_dataset({name!r}"
        + (f", {config!r}" if config else "")
        + ").save_to_disk(DIR) and pass --dataset DIR (an image folder or CSV works too)"
        + (f", {hint}" if hint else "")
    )
    try:
        with _cache_only() if (offline or unreachable) else contextlib.nullcontext():
            loaded = datasets.load_dataset(name, config)
    except DatasetNotFoundError as e:
        if offline or unreachable:
            raise UserError(
                f"dataset {label} is not in the Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) and the hub "
                f"is {'switched off (HF_HUB_OFFLINE)' if offline else 'unreachable'}; {local_copy}"
            ) from None
        raise UserError(
            f"dataset {label} was not found on the Hugging Face hub ({str(e).splitlines()[0]}); check the name, or "
            "log in with `hf auth login` for a gated dataset"
        ) from None
    except (ConnectionError, FileNotFoundError) as e:
        why = "switched off (HF_HUB_OFFLINE)" if offline else "unreachable" if unreachable else "unreachable or failing"
        raise UserError(
            f"cannot load dataset {label}: not in the Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) and "
            f"the hub is {why} ({e.__class__.__name__}); {local_copy}"
        ) from None
    except ValueError as e:
        raise UserError(f"cannot load dataset {label}: {str(e).splitlines()[0]}; check the config name") from None
    source = f"Hugging Face dataset {label}"
    return _from_hf(loaded, image_column, label_column, short_name, source, identity={"hub": label})


def _load_hf_local(path: Path, image_column: str | None, label_column: str | None) -> _Raw:
    import datasets

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"cannot read {path} as a Hugging Face dataset ({e.__class__.__name__}: {str(e).splitlines()[0]}); give "
            "a folder written by save_to_disk"
        ) from None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return _from_hf(
        loaded, image_column, label_column, _safe_name(path.resolve().name), f"Hugging Face dataset at {path}", stats
    )


def _detect_columns(features: Any, image_column: str | None, label_column: str | None, what: str) -> tuple[str, str]:
    import datasets

    columns = list(features)
    for given, flag in ((image_column, "--image-column"), (label_column, "--label-column")):
        if given is not None and given not in features:
            raise UserError(f"{what} has no column {given!r} ({flag}); its columns: {', '.join(columns)}")
    if image_column is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if len(images) != 1:
            found = f"image columns {', '.join(images)}" if images else "no Image column"
            raise UserError(f"{what} has {found}; pass --image-column (columns: {', '.join(columns)})")
        image_column = images[0]
    elif not isinstance(features[image_column], datasets.Image):
        raise UserError(f"column {image_column!r} of {what} is not an Image column; pass --image-column")
    if label_column is None:
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if len(labels) > 1:
            labels = [c for c in labels if c == "label"] or labels
        if not labels:
            labels = [c for c in columns if c in ("label", "labels", "fine_label")]
        if len(labels) != 1:
            found = f"label columns {', '.join(labels)}" if labels else "no ClassLabel column"
            raise UserError(f"{what} has {found}; pass --label-column (columns: {', '.join(columns)})")
        label_column = labels[0]
    return image_column, label_column


def _from_hf(
    loaded: Any, image_column: str | None, label_column: str | None, name: str, source: str, identity: Any
) -> _Raw:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    by_split: dict[str, Any] = {}
    for split_name, ds in loaded.items():
        split = _SPLIT_ALIASES.get(split_name.lower())
        if split is not None and split not in by_split:
            by_split[split] = ds
    if "train" not in by_split:
        if len(loaded) == 1:
            by_split = {"train": next(iter(loaded.values()))}
        else:
            raise UserError(f"{source} has splits {', '.join(loaded)} but none named train; rename one to train")
    features = by_split["train"].features
    image_column, label_column = _detect_columns(features, image_column, label_column, source)
    label_feature = features[label_column]
    raw_labels = {
        s: np.asarray(ds.with_format("numpy", columns=[label_column])[label_column]) for s, ds in by_split.items()
    }
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
        targets = {s: v.astype(np.int64) for s, v in raw_labels.items()}
    elif all(np.issubdtype(v.dtype, np.integer) for v in raw_labels.values()):
        class_names = [str(i) for i in range(int(max(v.max() for v in raw_labels.values() if len(v))) + 1)]
        targets = {s: v.astype(np.int64) for s, v in raw_labels.items()}
    else:
        class_names = sorted({str(x) for x in raw_labels["train"]})
        index = {n: i for i, n in enumerate(class_names)}
        targets = {}
        for s, v in raw_labels.items():
            extra = sorted({str(x) for x in v} - set(index))
            if extra:
                raise UserError(f"the {s} split of {source} has labels with no training rows: {', '.join(extra[:5])}")
            targets[s] = np.asarray([index[str(x)] for x in v], dtype=np.int64)
    splits = {}
    for split, ds in by_split.items():
        t = targets[split]
        labelled = np.flatnonzero(t >= 0)  # ClassLabel uses -1 for "no label" (imagenet-1k's test split)
        if len(labelled) == 0:
            log.info("the %s split of %s has no labels; not used", split, source)
            continue
        ident = json.dumps({"source": identity, "split": split, "rows": len(ds), "column": label_column}).encode()
        view = HFImageDataset(ds, image_column, np.where(t >= 0, t, 0), class_names, f"{source} [{split}]", ident)
        splits[split] = view if len(labelled) == len(t) else view.subset(labelled)
    return _Raw(splits, class_names, name, source)


# ---- class-balanced batches -----------------------------------------------------------------------------------


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch_size // samples_per_class`` distinct classes, ``samples_per_class`` samples of each.

    MR2's representation margin needs several samples of a class in a batch; random batches over many classes give
    one or none. Each epoch, every class's samples are shuffled and cut into groups of ``samples_per_class`` (the
    last group topped up with other samples of the class), and each batch takes one group from each of the classes
    with the most groups left (ties broken at random), so an epoch visits every sample at least once unless
    ``drop_last`` drops the few groups that cannot fill a batch of distinct classes. Deterministic for a given
    ``seed`` and :meth:`set_epoch`.

    Args:
        targets: the label of every sample of the dataset.
        samples_per_class: samples of each class in a batch (m).
        batch_size: samples in a batch; must be a multiple of m.
        seed: base seed; the epoch is mixed in.
        drop_last: drop the groups that cannot fill a batch of distinct classes (else: a last, smaller batch).
    """

    def __init__(
        self,
        targets: Sequence[int] | np.ndarray | torch.Tensor,
        samples_per_class: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        if samples_per_class < 1:
            raise UserError(f"samples per class must be at least 1, got {samples_per_class}")
        if batch_size % samples_per_class != 0:
            raise UserError(
                f"batch size {batch_size} is not a multiple of samples per class {samples_per_class}; change one"
            )
        self.by_class = _class_indices(targets)
        self.samples_per_class = samples_per_class
        self.classes_per_batch = batch_size // samples_per_class
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        if self.classes_per_batch > len(self.by_class):
            raise UserError(
                f"a batch of {batch_size} with {samples_per_class} per class needs {self.classes_per_batch} classes "
                f"but the data has {len(self.by_class)}; lower the batch size or raise samples per class"
            )
        self._groups = np.array([-(-len(idx) // samples_per_class) for idx in self.by_class.values()], dtype=np.int64)
        self._len: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self._len is None:
            self._len = self._count_batches()
        return self._len

    def _count_batches(self) -> int:
        # The number of batches depends only on the group counts, not on how ties are broken.
        left = self._groups.copy()
        c = self.classes_per_batch
        n = 0
        while True:
            nonzero = np.count_nonzero(left)
            if nonzero == 0 or (nonzero < c and self.drop_last):
                return n
            top = np.argsort(-left, kind="stable")[: min(c, nonzero)]
            left[top] -= 1
            n += 1

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        m, c = self.samples_per_class, self.classes_per_batch
        queues = []
        for idx in self.by_class.values():
            perm = idx[rng.permutation(len(idx))]
            pad = (-len(perm)) % m
            if pad:
                perm = np.concatenate([perm, rng.choice(idx, size=pad, replace=len(idx) < pad)])
            queues.append(perm.reshape(-1, m))
        left = np.array([len(q) for q in queues], dtype=np.int64)
        used = np.zeros(len(queues), dtype=np.int64)
        while True:
            nonzero = np.count_nonzero(left)
            if nonzero == 0 or (nonzero < c and self.drop_last):
                return
            jitter = rng.random(len(left))
            top = np.argsort(-(left + jitter), kind="stable")[: min(c, nonzero)]
            batch = [int(i) for k in top for i in queues[k][used[k]]]
            left[top] -= 1
            used[top] += 1
            yield batch


__all__ = [
    "ArrayImageDataset",
    "BadImageError",
    "ClassBalancedBatchSampler",
    "DatasetSplits",
    "FASHION_MNIST_CLASSES",
    "FileImageDataset",
    "HFImageDataset",
    "HubDataset",
    "ImageDataset",
    "KNOWN_DATASETS",
    "TransformedDataset",
    "load_dataset",
    "read_idx",
    "to_rgb",
]
