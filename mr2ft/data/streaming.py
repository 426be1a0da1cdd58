"""WebDataset tar shards as a dataset: ``--dataset wds:...``.

Spec: ``wds:DIR`` (a folder holding ``train-*.tar`` and ``test-*.tar``, optionally ``val-*.tar``) or
``wds:train=PATTERN,test=PATTERN[,val=PATTERN]`` with brace patterns such as ``DIR/train-{000000..000127}.tar``.
Class names come from ``classes.json`` (a JSON list of names, index = label) beside the train shards. Each sample's
image is the first of the image keys it has (``--image-column``, ``;``-separated; default ``jpg;jpeg;png;webp``) and
its label the integer under the label key (``--label-column``; default ``cls``). Samples are grouped by key as
``webdataset`` groups them (its ``base_plus_ext``).

Opening a split reads only the tar headers and the small label members (uncompressed tar lets ``tarfile`` seek over
the images), recording where each image lies; an image is then read by offset when the split is indexed, so data
loader workers, subsets and the processes of a launch each read only their own images. :func:`iter_wds` streams the
same samples through ``webdataset``'s own pipeline.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mr2ft.data.base import ImageDataset, RawData, file_stat, open_rgb, to_rgb
from mr2ft.errors import UserError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SPLITS = ("train", "val", "test")


def parse_wds_spec(spec: str) -> dict[str, list[str]]:
    """Shard paths of each split from a ``wds:`` spec, every shard checked to exist.

    Raises:
        UserError: a malformed spec, no train or test split, or a missing shard.
    """
    import braceexpand

    body = spec.removeprefix("wds:")
    patterns: dict[str, str] = {}
    if "=" in body:
        for part in body.split(","):
            name, _, pattern = part.partition("=")
            if name.strip() not in SPLITS or not pattern:
                raise UserError(
                    f"bad WebDataset spec part {part!r}; write wds:train=PATTERN,test=PATTERN[,val=PATTERN]"
                )
            patterns[name.strip()] = pattern
        shards = {s: list(braceexpand.braceexpand(p)) for s, p in patterns.items()}
    else:
        folder = Path(body)
        if not folder.is_dir():
            raise UserError(f"WebDataset folder {folder} does not exist; pass wds:DIR with train-*.tar and test-*.tar")
        shards = {s: [str(p) for p in sorted(folder.glob(f"{s}-*.tar"))] for s in SPLITS}
        shards = {s: v for s, v in shards.items() if v}
    for split in ("train", "test"):
        if not shards.get(split):
            raise UserError(
                f"WebDataset spec {spec} has no {split} shards; give {split}=PATTERN or {split}-*.tar files"
            )
    for split, paths in shards.items():
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UserError(f"{split} shard {missing[0]}{more} does not exist; check the pattern in --dataset {spec}")
    return shards


def class_names_for(shards: dict[str, list[str]]) -> list[str]:
    """The names in ``classes.json`` beside the first train shard.

    Raises:
        UserError: the file is missing or not a JSON list of strings.
    """
    path = Path(shards["train"][0]).parent / "classes.json"
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"cannot read class names from {path} ({e.__class__.__name__}); write a JSON list of names"
        ) from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path} must be a JSON list of class names (index = label)")
    return names


def iter_wds(
    paths: list[str], num_classes: int, image_keys: tuple[str, ...] = IMAGE_KEYS, label_key: str = "cls"
) -> Iterator[tuple[object, int]]:
    """``(RGB PIL image, label)`` of every sample of the shards, in shard order.

    Raises:
        UserError: a sample without an image key or the label key, or a label outside the classes.
    """
    import webdataset as wds

    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil"):
        where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
        key = next((k for k in image_keys if k in sample), None)
        if key is None:
            keys = ", ".join(k for k in sample if not k.startswith("__"))
            raise UserError(f"{where} has no image key {';'.join(image_keys)} (keys: {keys}); pass --wds-image-key")
        if label_key not in sample:
            keys = ", ".join(k for k in sample if not k.startswith("__"))
            raise UserError(f"{where} has no label key {label_key!r} (keys: {keys}); pass --wds-label-key")
        raw = sample[label_key]
        label = int(raw.decode() if isinstance(raw, bytes) else raw)
        if not 0 <= label < num_classes:
            raise UserError(f"{where} has label {label}, outside the {num_classes} classes of classes.json")
        yield to_rgb(sample[key]), label


def _scan_shard(path: str, image_keys: tuple[str, ...], label_key: str) -> list[tuple[str, str, int, int, int]]:
    """(key, image extension, image offset, image size, label) of each sample of one shard, images unread."""
    from webdataset.tariterators import base_plus_ext

    samples: list[dict] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                ext = ext.lower()
                if ext == label_key:
                    samples[-1][ext] = tar.extractfile(member).read()
                elif ext in image_keys:
                    samples[-1][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read shard {path} as a tar file ({e}); check the file is a complete .tar") from None
    out = []
    for sample in samples:
        where = f"sample {sample['__key__']} of {path}"
        keys = ", ".join(k for k in sample if k != "__key__")
        if label_key not in sample:
            raise UserError(f"{where} has no label key {label_key!r} (keys: {keys}); pass --label-column")
        ext = next((k for k in image_keys if k in sample), None)
        if ext is None:
            raise UserError(f"{where} has no image key {';'.join(image_keys)} (keys: {keys}); pass --image-column")
        try:
            label = int(sample[label_key].decode().strip())
        except ValueError:
            raise UserError(f"{where} has label {sample[label_key][:20]!r}, not an integer class index") from None
        out.append((sample["__key__"], ext, *sample[ext], label))
    return out


class WdsImageDataset(ImageDataset):
    """The samples of some tar shards, each image read by its offset in its shard."""

    def __init__(self, shards: list[str], records: list[tuple], class_names: list[str], keys: str) -> None:
        super().__init__(np.asarray([r[5] for r in records], dtype=np.int64), class_names)
        self.shards = shards
        self._shard = np.asarray([r[0] for r in records], dtype=np.int64)
        self._keys = [r[1] for r in records]
        self._span = np.asarray([(r[3], r[4]) for r in records], dtype=np.int64).reshape(-1, 2)
        stats = [f"{p}\t{file_stat(Path(p).stat())}" for p in shards]
        self._ident = hashlib.sha256("\n".join([keys, *stats]).encode()).digest()

    def _load(self, j: int) -> Image.Image:
        offset, size = (int(v) for v in self._span[j])
        with open(self.shards[self._shard[j]], "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        return open_rgb(lambda: Image.open(io.BytesIO(data)), self._where(j))

    def _where(self, j: int) -> str:
        return f"{self.shards[self._shard[j]]}:{self._keys[j]}"

    def _source_identity(self) -> bytes:
        return self._ident


def load_wds(spec: str, image_column: str | None, label_column: str | None) -> RawData:
    """The splits of a ``wds:`` spec (see the module docstring).

    Raises:
        UserError: a missing shard, a sample without the label or an image key, a label outside ``classes.json``.
    """
    shards = parse_wds_spec(spec)
    names = class_names_for(shards)
    image_keys = tuple(k.strip().lower() for k in (image_column or ";".join(IMAGE_KEYS)).split(";") if k.strip())
    label_key = (label_column or "cls").strip().lower()
    splits = {}
    for split, paths in shards.items():
        records = [(i, *r) for i, p in enumerate(paths) for r in _scan_shard(p, image_keys, label_key)]
        bad = [r for r in records if not 0 <= r[5] < len(names)]
        if bad:
            raise UserError(
                f"{split} sample {bad[0][1]} has label {bad[0][5]}, outside the {len(names)} classes of classes.json"
            )
        keys = f"image={';'.join(image_keys)} label={label_key}"
        splits[split] = WdsImageDataset(paths, records, names, keys)
    name = Path(shards["train"][0]).parent.name or "wds"
    return RawData(splits, names, name, f"WebDataset shards {spec[4:]}")
