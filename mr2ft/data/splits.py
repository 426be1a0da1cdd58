"""Splits: a ``--dataset`` spec becomes train / val / test of (RGB PIL image, int label), with class names.

This module owns :func:`load_dataset` and :class:`DatasetSplits`: the held-out splits, the class-balanced subsets and
the fingerprints that key the feature cache. Reading a source is :mod:`mr2ft.data.sources` / :mod:`mr2ft.data.hf`.

Splits. ``test`` is the split results are reported on. A dataset with ``train`` + ``val`` only uses ``val`` as its
test split. With ``train`` + ``test``, ``val_fraction`` carves a stratified ``val`` out of ``train``. With ``train``
alone (one folder, a CSV without a split column), ``val_fraction`` carves the ``test`` split out of ``train``, and is
required. ``shots`` / ``max_per_class`` then take a class-balanced subset of ``train`` (``max_per_class`` also of
``val``), ``test_max_per_class`` of ``test``; all deterministic by ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mr2ft.data.base import ImageDataset, RawData, class_indices
from mr2ft.data.sources import ReadOptions, resolve
from mr2ft.errors import UserError

log = logging.getLogger(__name__)


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


# The seed of every choice of test images (a test split carved from train, a --test-max-per-class subset): fixed,
# so that runs with different training seeds are scored on the same images and can be compared.
TEST_SPLIT_SEED = 0


# The data settings of a run's config that :func:`load_dataset` takes, by the same names.
DATA_SETTINGS = (
    "image_column",
    "label_column",
    "val_fraction",
    "seed",
    "shots",
    "max_per_class",
    "test_max_per_class",
    "skip_bad_images",
    "follow_links",
    "streaming",
)


def load_dataset_for(settings: Any, **overrides: Any) -> DatasetSplits:
    """:func:`load_dataset` with the data settings of a job's config (any object with ``dataset`` and some of
    :data:`DATA_SETTINGS` as attributes); ``overrides`` win. Every job loads its data through this one call."""
    kwargs = {name: getattr(settings, name) for name in DATA_SETTINGS if getattr(settings, name, None) is not None}
    kwargs.update(overrides)
    return load_dataset(getattr(settings, "dataset", None) or "", **kwargs)


def _check_options(
    spec: str, val_fraction: float, shots: int | None, max_per_class: int | None, test_max_per_class: int | None
) -> None:
    if not spec:
        raise UserError("no dataset given; pass --dataset with a folder, a CSV file, hf:NAME or a known name")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for flag, value in (
        ("--shots", shots),
        ("--max-per-class", max_per_class),
        ("--test-max-per-class", test_max_per_class),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if shots is not None and max_per_class is not None:
        raise UserError("--shots and --max-per-class both limit the training images per class; pass only one")


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
    follow_links: bool = False,
    streaming: bool = False,
) -> DatasetSplits:
    """Resolve a dataset spec into train / val / test splits with class names.

    Spec forms, resolved in this order: ``hf:NAME[:CONFIG]`` (or ``hf:PATH`` of a local folder); an existing local
    path (a ``save_to_disk`` folder, a folder of MNIST-style IDX files, an ImageFolder layout with ``train/`` and
    ``test/`` and/or ``val/`` or one folder of class folders, a CSV of ``path,label[,split]``); a short name
    (``fashion-mnist`` or one of :data:`~mr2ft.data.KNOWN_DATASETS`). Every image comes back as RGB (see
    :func:`~mr2ft.data.to_rgb`); a file that cannot be decoded raises :class:`~mr2ft.data.BadImageError` when first
    read, or, with ``skip_bad_images``, is dropped up front and listed in :attr:`DatasetSplits.skipped`.

    Args:
        spec: ``hf:NAME[:CONFIG]``, a folder, a CSV file, or a short name (``cifar100``, ``fashion-mnist``, ...).
        image_column, label_column: the columns of a hub / ``save_to_disk`` dataset (detected when None).
        val_fraction: the fraction of each class of ``train`` held out (stratified): as ``val`` when the data has a
            test split, else as ``test``.
        seed: seeds every random choice here except the test images (:data:`TEST_SPLIT_SEED`).
        shots: exactly this many training images per class (error if a class has fewer).
        max_per_class: at most this many images per class in ``train`` and ``val``.
        test_max_per_class: at most this many images per class in ``test`` (for quick evaluations).
        skip_bad_images: decode every image to be used now, and drop those that fail (and broken links).
        follow_links: inside class folders, also follow links to folders outside the dataset root.
        streaming: open an ``hf:`` dataset with ``streaming=True`` (read in order, nothing downloaded up front).

    Raises:
        UserError: an unreadable spec, an empty folder or class, fewer than two classes, test classes that train
            lacks, an option out of range, or an unreachable hub.
    """
    spec = str(spec).strip()
    _check_options(spec, val_fraction, shots, max_per_class, test_max_per_class)
    if streaming and skip_bad_images:
        raise UserError("--skip-bad-images decodes every image up front, which a stream cannot; drop one of them")
    raw = resolve(spec, image_column, label_column, ReadOptions(follow_links, skip_bad_images, streaming))
    train, val, test = _held_out(raw, spec, val_fraction, seed)
    skipped = list(raw.skipped)
    train = _select(train, "train", shots or max_per_class, shots is not None, seed, skip_bad_images, skipped)
    if val is not None:
        val = _select(val, "val", max_per_class, False, seed, skip_bad_images, skipped)
    test = _select(test, "test", test_max_per_class, False, TEST_SPLIT_SEED, skip_bad_images, skipped)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    _check_test_classes(test, raw.class_names)
    options = {
        "val_fraction": val_fraction,
        "seed": seed,
        "shots": shots,
        "max_per_class": max_per_class,
        "test_max_per_class": test_max_per_class,
        "skip_bad_images": skip_bad_images,
    }
    split_fps = {"train": split_fingerprint(train), "test": split_fingerprint(test)}
    if val is not None:
        split_fps["val"] = split_fingerprint(val)
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


def _held_out(
    raw: RawData, spec: str, val_fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset | None, ImageDataset]:
    """(train, val, test) from the source's splits, holding out ``val_fraction`` of train where needed."""
    train = raw.splits.get("train")
    if train is None or len(train) == 0:
        raise UserError(f"dataset {spec} has no training images; check the spec (found splits: {sorted(raw.splits)})")
    present = np.unique(train.targets)
    if len(present) < 2:
        only = f"only the class {raw.class_names[int(present[0])]!r}" if len(present) else "no class"
        raise UserError(
            f"dataset {spec} has training images of {only}; a classifier needs at least 2 classes (add the other "
            "classes' folders or rows)"
        )
    val, test = raw.splits.get("val"), raw.splits.get("test")
    if test is None and val is not None:
        test, val = val, None
    if test is None:
        if val_fraction <= 0:
            raise UserError(
                f"dataset {spec} has no test or val split; pass --val-fraction (e.g. 0.2) to hold out a stratified "
                "part of it for testing"
            )
        # The test images never depend on the training seed, so runs with different seeds are scored on one test set.
        keep, held = _stratified_split(train.targets, val_fraction, TEST_SPLIT_SEED)
        train, test = train.subset(keep), train.subset(held)
    elif val is None and val_fraction > 0:
        keep, held = _stratified_split(train.targets, val_fraction, seed)
        train, val = train.subset(keep), train.subset(held)
    elif val is not None and val_fraction > 0:
        log.warning("dataset %s has its own val split; --val-fraction %s is not used", spec, val_fraction)
    return train, val, test


def _check_test_classes(test: ImageDataset, class_names: list[str]) -> None:
    """Say (once) which classes the test split has no images of: their accuracy is reported as missing."""
    absent = sorted(set(range(len(class_names))) - {int(c) for c in np.unique(test.targets)})
    if absent:
        shown = ", ".join(repr(class_names[c]) for c in absent[:5]) + (" ..." if len(absent) > 5 else "")
        log.warning(
            "the test split has no images of %d class(es): %s; their test accuracy is undefined", len(absent), shown
        )


def split_fingerprint(ds: ImageDataset) -> str:
    """The fingerprint of one split view: its items' identity (files or rows, labels, positions) and class names."""
    # The identity covers exactly the items chosen (files or rows, labels, positions), so a split's fingerprint moves
    # only when its own data or selection does: --shots leaves the test split's feature cache valid.
    h = hashlib.sha256(ds.identity())
    h.update(json.dumps(ds.class_names).encode())
    return h.hexdigest()[:16]


def _rng(seed: int, purpose: int, cls: int) -> np.random.Generator:
    # One stream per class and purpose: a class's choice does not depend on the other classes or options.
    return np.random.default_rng([seed, purpose, cls])


def _stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (keep, held) with ``fraction`` of each class held out (at least one when a class has two or more)."""
    keep, held = [], []
    for c, idx in class_indices(targets).items():
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
    for c, idx in class_indices(ds.targets).items():
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
