"""Image datasets: one split as (RGB PIL image, int label) items, the RGB conversion and the bad-image error.

This module owns what every source shares: :class:`ImageDataset` (a cheap, picklable view of some items of a
source), its file, array and Hugging Face forms, :func:`to_rgb`, :class:`BadImageError`, the file identity used in
fingerprints (:func:`file_stat`), and :class:`RawData`, what a source loader hands to :mod:`mr2ft.data.splits`.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mr2ft.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")

SPLIT_ALIASES = {
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


def open_rgb(opener: Callable[[], Image.Image], where: str) -> Image.Image:
    """Decode with ``opener`` as RGB, the EXIF orientation applied; :class:`BadImageError` naming ``where``."""
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


def printable(text: str | os.PathLike) -> str:
    """``text`` with bytes that are not UTF-8 (kept by Python as surrogates) shown as U+FFFD, safe to print."""
    return os.fspath(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def file_stat(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's content without reading it: size, mtime, inode and ctime (ns).

    The ctime cannot be set back by ``cp -p``, ``rsync -a`` or ``tar -x``, and a file replaced by another gets a new
    inode, so a rewritten file changes this even when its size and mtime were kept.
    """
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def class_indices(targets: np.ndarray) -> dict[int, np.ndarray]:
    """Positions of each class in ``targets``, in order, for the classes present."""
    order = np.argsort(targets, kind="stable")
    classes, starts = np.unique(targets[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    return {int(c): order[s:e] for c, s, e in zip(classes, starts, bounds, strict=True)}


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
        stats: Sequence[tuple[int, ...]],
    ) -> None:
        super().__init__(targets, class_names)
        self.paths = list(paths)  # relative to root, or absolute
        self.root = Path(root)
        self._stats = list(stats)  # file_stat() per file
        self._source_key: bytes | None = None

    def _path(self, j: int) -> Path:
        return self.root / self.paths[j]

    def _load(self, j: int) -> Image.Image:
        path = self._path(j)
        return open_rgb(lambda: Image.open(path), printable(path))

    def _where(self, j: int) -> str:
        return printable(self._path(j))

    def _source_identity(self) -> bytes:
        # Only the items in view count: a file added to another split must not change this split's fingerprint.
        h = hashlib.sha256()
        for j in self._indices:
            stat = "\t".join(str(v) for v in self._stats[j])
            h.update(os.fsencode(self.paths[j]) + f"\t{stat}\n".encode())
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
        return open_rgb(lambda: self._decoder.decode_example(value), self._where(j, value))

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


@dataclass
class RawData:
    """What a source loader found, before splitting and subsetting.

    Attributes:
        splits: the splits the source has, by canonical name (train / val / test).
        class_names: one name per class index.
        name: a short, file-name-safe name for run folders.
        source: where the data was read from, in words.
        skipped: files left out while scanning (broken links under ``skip_bad_images``).
    """

    splits: dict[str, ImageDataset]
    class_names: list[str]
    name: str
    source: str
    skipped: list[str] = field(default_factory=list)


def integer_class_names(train_labels: np.ndarray, other_labels: dict[str, np.ndarray], source: str) -> list[str]:
    """Class names ``"0" .. "K-1"`` for integer labels, which must use every value 0..K-1 in the train split.

    A sparse label (``7`` and ``200000`` only) would otherwise make 200,001 classes, almost all empty.

    Raises:
        UserError: the train labels are negative or skip a value, or another split has a label train does not.
    """
    values = np.unique(np.asarray(train_labels, dtype=np.int64))
    k = len(values)
    if k and (values[0] < 0 or values[-1] != k - 1):
        missing = k and int(values[-1]) + 1 - k
        raise UserError(
            f"{source}: integer labels must be 0..K-1 with every value used, but the train labels run from "
            f"{int(values[0])} to {int(values[-1])} with only {k} distinct values ({max(missing, 0)} unused); "
            "renumber them 0..K-1 or use class names as labels"
        )
    for split, labels in other_labels.items():
        extra = np.setdiff1d(np.asarray(labels, dtype=np.int64), values)
        if len(extra):
            shown = ", ".join(str(int(v)) for v in extra[:5])
            raise UserError(f"{source}: the {split} split has labels with no train images: {shown}; remove those rows")
    return [str(i) for i in range(k)]
