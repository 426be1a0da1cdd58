"""Hugging Face datasets: ``hf:NAME[:CONFIG]`` from the hub (or its cache), and ``save_to_disk`` folders.

This module owns turning a ``datasets.Dataset`` / ``DatasetDict`` into :class:`~mr2ft.data.base.RawData`: finding
the splits, the image and label columns, and the class names. With ``--streaming`` the dataset is opened with
``load_dataset(..., streaming=True)`` (nothing downloaded up front): the label column is read once, and images are
read in order by a cursor over the stream (:class:`StreamingHFImageDataset`). Whether the hub may be contacted is
decided by :mod:`mr2ft.hub`, the same policy the backbones' weights follow.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mr2ft import hub
from mr2ft.data.base import SPLIT_ALIASES, HFImageDataset, RawData, file_stat, integer_class_names, open_rgb
from mr2ft.errors import UserError

log = logging.getLogger(__name__)


def load_hub(
    name: str,
    config: str | None,
    image_column: str | None,
    label_column: str | None,
    short_name: str,
    hint: str = "",
) -> RawData:
    """A dataset from the Hugging Face hub, or from its local cache when the hub is off or unreachable."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    label = f"{name}:{config}" if config else name
    offline = hub.offline_reason()
    local_copy = (
        f"on a machine with network run datasets.load_dataset({name!r}"
        + (f", {config!r}" if config else "")
        + ").save_to_disk(DIR) and pass --dataset DIR (an image folder or CSV works too)"
        + (f", {hint}" if hint else "")
    )
    try:
        with hub.cache_only() if offline else contextlib.nullcontext():
            loaded = datasets.load_dataset(name, config)
    except DatasetNotFoundError as e:
        if offline:
            raise UserError(
                f"dataset {label} is not in the Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) and "
                f"{offline}; {local_copy}"
            ) from None
        raise UserError(
            f"dataset {label} was not found on the Hugging Face hub ({str(e).splitlines()[0]}); check the name, or "
            "log in with `hf auth login` for a gated dataset"
        ) from None
    except (ConnectionError, FileNotFoundError) as e:
        why = offline or "the hub is unreachable or failing"
        raise UserError(
            f"cannot load dataset {label}: not in the Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) and "
            f"{why} ({e.__class__.__name__}); {local_copy}"
        ) from None
    except ValueError as e:
        raise UserError(f"cannot load dataset {label}: {str(e).splitlines()[0]}; check the config name") from None
    source = f"Hugging Face dataset {label}"
    return from_hf(loaded, image_column, label_column, short_name, source, identity={"hub": label})


def load_hf_local(
    path: Path, image_column: str | None, label_column: str | None, name: str, streaming: bool = False
) -> RawData:
    """A folder written by ``save_to_disk``, or data files ``datasets`` understands (streamed with ``streaming``)."""
    import datasets

    if streaming:
        return load_streaming(str(path), None, image_column, label_column, name, local=path)
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
    stats = [(p.relative_to(path).as_posix(), *file_stat(p.stat())) for p in files]
    return from_hf(loaded, image_column, label_column, name, f"Hugging Face dataset at {path}", stats)


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


def _named_splits(loaded: Any, source: str) -> dict[str, Any]:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    by_split: dict[str, Any] = {}
    for split_name, ds in loaded.items():
        split = SPLIT_ALIASES.get(split_name.lower())
        if split is not None and split not in by_split:
            by_split[split] = ds
    if "train" not in by_split:
        if len(loaded) == 1:
            return {"train": next(iter(loaded.values()))}
        raise UserError(f"{source} has splits {', '.join(loaded)} but none named train; rename one to train")
    return by_split


def _targets(label_feature: Any, raw: dict[str, np.ndarray], source: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and int targets per split (-1: no label) from a label column's values."""
    import datasets

    if isinstance(label_feature, datasets.ClassLabel):
        return list(label_feature.names), {s: v.astype(np.int64) for s, v in raw.items()}
    if all(np.issubdtype(v.dtype, np.integer) for v in raw.values()):
        others = {s: v[v >= 0] for s, v in raw.items() if s != "train"}
        names = integer_class_names(raw["train"][raw["train"] >= 0], others, source)
        return names, {s: v.astype(np.int64) for s, v in raw.items()}
    class_names = sorted({str(x) for x in raw["train"]})
    index = {n: i for i, n in enumerate(class_names)}
    targets = {}
    for s, v in raw.items():
        extra = sorted({str(x) for x in v} - set(index))
        if extra:
            raise UserError(f"the {s} split of {source} has labels with no training rows: {', '.join(extra[:5])}")
        targets[s] = np.asarray([index[str(x)] for x in v], dtype=np.int64)
    return class_names, targets


def from_hf(
    loaded: Any, image_column: str | None, label_column: str | None, name: str, source: str, identity: Any
) -> RawData:
    """Splits, columns and class names of a loaded ``Dataset`` / ``DatasetDict``."""
    by_split = _named_splits(loaded, source)
    features = by_split["train"].features
    image_column, label_column = _detect_columns(features, image_column, label_column, source)
    raw_labels = {
        s: np.asarray(ds.with_format("numpy", columns=[label_column])[label_column]) for s, ds in by_split.items()
    }
    class_names, targets = _targets(features[label_column], raw_labels, source)
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
    return RawData(splits, class_names, name, source)


# ---- streaming ----------------------------------------------------------------------------------------------


class StreamingHFImageDataset(HFImageDataset):
    """A split of a streamed ``datasets.IterableDataset``: image ``j`` is read by advancing a cursor over the stream
    (undecoded rows are skipped cheaply; going back restarts it), so reading in order, as feature extraction does,
    streams the data once."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._it, self._pos = None, 0

    def __getstate__(self) -> dict:  # DataLoader workers and subsets start their own cursor
        return {**self.__dict__, "_it": None, "_pos": 0}

    def subset(self, indices):
        out = super().subset(indices)
        out._it, out._pos = None, 0
        return out

    def _row(self, j: int) -> Any:
        if self._it is None or j < self._pos:
            self._it, self._pos = iter(self.hf_dataset), 0
        for _ in range(j - self._pos):
            next(self._it)
        self._pos = j + 1
        return next(self._it)[self.image_column]

    def _load(self, j: int):
        value = self._row(j)
        return open_rgb(lambda: self._decoder.decode_example(value), self._where(j, value))

    def _where(self, j: int, value: Any = None) -> str:
        path = value.get("path") if isinstance(value, dict) else None
        return f"{self.source} row {j}" + (f" ({path})" if path else "")


def load_streaming(
    name: str,
    config: str | None,
    image_column: str | None,
    label_column: str | None,
    short: str,
    local: Path | None = None,
) -> RawData:
    """A dataset opened with ``datasets.load_dataset(..., streaming=True)``: a hub name or a local data folder.

    Raises:
        UserError: it cannot be opened, it has no test split (a stream cannot hold one out), or no column types.
    """
    import datasets

    label = f"{name}:{config}" if config else name
    offline = None if local is not None else hub.offline_reason()
    if offline:
        raise UserError(f"streaming dataset {label} needs the Hugging Face hub, but {offline}; drop --streaming")
    try:
        loaded = datasets.load_dataset(name, config, streaming=True)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(
            f"cannot stream dataset {label} ({e.__class__.__name__}: {str(e).splitlines()[0]}); check the name"
        ) from None
    source = f"streamed Hugging Face dataset {label}"
    by_split = _named_splits(loaded, source)
    if "test" not in by_split and "val" not in by_split:
        raise UserError(
            f"{source} has no test split (splits: {', '.join(loaded)}); a stream cannot hold part of train out, so "
            "give a dataset with a test split or drop --streaming"
        )
    features = by_split["train"].features
    if features is None:
        raise UserError(f"{source} does not declare its column types; drop --streaming to load it whole")
    image_column, label_column = _detect_columns(features, image_column, label_column, source)
    raw = {s: np.asarray([r[label_column] for r in ds.select_columns([label_column])]) for s, ds in by_split.items()}
    class_names, targets = _targets(features[label_column], raw, source)
    if local is not None:
        files = sorted(p for p in local.rglob("*") if p.is_file())
        identity: Any = [(p.relative_to(local).as_posix(), *file_stat(p.stat())) for p in files]
    else:
        identity = {"hub": label}
    splits = {}
    for split, ds in by_split.items():
        t = targets[split]
        ident = json.dumps({"source": identity, "split": split, "rows": len(t), "stream": label_column}).encode()
        view = StreamingHFImageDataset(
            ds, image_column, np.where(t >= 0, t, 0), class_names, f"{source} [{split}]", ident
        )
        labelled = np.flatnonzero(t >= 0)
        if len(labelled):
            splits[split] = view if len(labelled) == len(t) else view.subset(labelled)
    return RawData(splits, class_names, short, source)
