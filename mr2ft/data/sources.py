"""Where images come from: a spec string resolved to a source, and the local sources read here.

This module owns the named datasets (:data:`KNOWN_DATASETS`, Fashion-MNIST), image folders (ImageFolder layout, with
the symbolic-link policy below), CSV files of ``path,label[,split]``, and MNIST-style IDX files; ``hf:`` specs and
``save_to_disk`` folders are read by :mod:`mr2ft.data.hf`.

Symbolic links. Split folders and class folders may be links to anywhere (a common way to assemble a dataset). Inside
a class folder, a link to a folder is followed only when it leads somewhere new inside the dataset root, or anywhere
with ``follow_links``; never into a folder already scanned (a loop, a self-link), into another class folder (its
images would get the wrong label), or up to a folder holding class folders. A class folder that links to another
class folder is not a class of its own. Whatever is not followed is counted in one warning. A link to an image file
is read as that file; a broken one is a bad image (an error naming it, or skipped and counted with
``skip_bad_images``).
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import logging
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mr2ft.data import hf
from mr2ft.data.base import (
    IMAGE_EXTENSIONS,
    SPLIT_ALIASES,
    ArrayImageDataset,
    FileImageDataset,
    RawData,
    file_stat,
    integer_class_names,
    printable,
)
from mr2ft.errors import UserError

log = logging.getLogger(__name__)

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
    # Robustness test sets on ImageNet's classes (all 1000, or 200 for -r/-a), scored with `mr2ft eval` / `zeroshot`
    # (which also read a local copy in the original layout as NAME:/path; see mr2ft.evaluate).
    "imagenet-v2": HubDataset("vaishaal/ImageNetV2"),
    "imagenet-r": HubDataset("axiong/imagenet-r"),
    "imagenet-a": HubDataset("axiong/imagenet-a"),
    "imagenet-sketch": HubDataset("songweig/imagenet_sketch", image_column="image", label_column="label"),
}


@dataclass
class ReadOptions:
    """How local sources are read: ``follow_links`` (see the module docstring) and ``skip_bad`` (broken links)."""

    follow_links: bool = False
    skip_bad: bool = False
    streaming: bool = False  # hf: datasets only, opened with streaming=True


def safe_name(text: str) -> str:
    """A file-name-safe short name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "data"


def resolve(spec: str, image_column: str | None, label_column: str | None, opts: ReadOptions) -> RawData:
    """Read the source a spec names (see :func:`mr2ft.data.load_dataset` for the forms)."""
    if spec.startswith("wds:"):
        from mr2ft.data.streaming import load_wds

        return load_wds(spec, image_column, label_column)
    if opts.streaming and not spec.startswith("hf:"):
        raise UserError(f"--streaming streams Hugging Face datasets; give hf:NAME or hf:PATH, not {spec!r}")
    if spec.startswith("hf:"):
        rest = spec[3:]
        if Path(rest).exists():
            short = safe_name(Path(rest).resolve().name)
            return hf.load_hf_local(Path(rest), image_column, label_column, short, opts.streaming)
        name, _, config = rest.partition(":")
        if not name:
            raise UserError("hf: needs a dataset name, e.g. hf:uoft-cs/cifar100 or hf:ylecun/mnist:mnist")
        if opts.streaming:
            return hf.load_streaming(name, config or None, image_column, label_column, safe_name(name.split("/")[-1]))
        return hf.load_hub(name, config or None, image_column, label_column, safe_name(name.split("/")[-1]))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() in (".csv", ".tsv", ".txt"):
                return load_csv(path, opts)
            raise UserError(f"dataset file {path} is not a CSV; give a folder, a .csv of path,label or hf:NAME")
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return hf.load_hf_local(path, image_column, label_column, safe_name(path.resolve().name))
        if idx_files(path) is not None:
            return load_idx_folder(path, None, safe_name(path.resolve().name))
        return load_folder(path, opts)
    key = spec.lower()
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return load_fashion_mnist(image_column, label_column)
    if key in KNOWN_DATASETS:
        entry = KNOWN_DATASETS[key]
        return hf.load_hub(
            entry.repo, entry.config, image_column or entry.image_column, label_column or entry.label_column, key
        )
    close = difflib.get_close_matches(key, list(KNOWN_DATASETS), n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(
        f"dataset {spec!r} is neither an existing folder or CSV file nor a known name{hint}; give a path, "
        f"hf:NAME[:CONFIG], or one of: {', '.join(KNOWN_DATASETS)}"
    )


# ---- image folders --------------------------------------------------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise UserError(
            f"cannot list the folder {printable(folder)} ({e.strerror}); check that it is readable"
        ) from None


@dataclass
class _Walk:
    """One split's scan: the folders entered, the class folders, and what was not followed."""

    root: str  # the dataset root, resolved
    opts: ReadOptions
    classes: list[str] = field(default_factory=list)  # real paths of the split's class folders
    seen: set[str] = field(default_factory=set)
    not_followed: Counter = field(default_factory=Counter)
    example: str = ""
    broken: list[str] = field(default_factory=list)

    def refusal(self, link: Path, own_class: str) -> str | None:
        """Why the directory link ``link`` inside the class folder ``own_class`` is not followed, or None."""
        real = os.path.realpath(link)
        if real in self.seen or _inside(own_class, real):
            return "loop or repeat"
        if any(_inside(real, c) or _inside(c, real) for c in self.classes):
            return "into a class folder"
        if not self.opts.follow_links and not _inside(real, self.root):
            return "outside the dataset root"
        return None

    def skip(self, why: str, path: Path) -> None:
        self.not_followed[why] += 1
        self.example = self.example or printable(path)

    def warn(self, folder: Path) -> None:
        if not self.not_followed:
            return
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.not_followed.items()))
        hint = (
            "; pass --follow-links to follow links that leave the dataset root"
            if self.not_followed["outside the dataset root"]
            else ""
        )
        log.warning(
            "did not follow %d directory link(s) in %s (%s; e.g. %s)%s",
            sum(self.not_followed.values()),
            printable(folder),
            parts,
            self.example,
            hint,
        )


def _images_in(cls: Path, walk: _Walk) -> list[Path]:
    """Image files under one class folder, in sorted depth-first order, following links as the policy allows."""
    own = os.path.realpath(cls)
    walk.seen.add(own)
    found, stack = [], [cls]
    while stack:
        subdirs = []
        for entry in _entries(stack.pop()):
            path = Path(entry.path)
            if entry.is_dir():
                why = walk.refusal(path, own) if entry.is_symlink() else None
                if why:
                    walk.skip(why, path)
                    continue
                walk.seen.add(os.path.realpath(path))
                subdirs.append(path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if entry.is_file():
                    found.append(path)
                elif entry.is_symlink():
                    walk.broken.append(str(path))
            elif entry.is_symlink() and not path.exists():
                walk.skip("broken link", path)
        stack.extend(reversed(subdirs))
    return found


def _class_folders(folder: Path, walk: _Walk | None = None) -> list[Path]:
    """The class folders of a split folder; a link to (or above) another class folder is not a class."""
    kept: list[Path] = []
    reals: list[str] = []
    dirs = [Path(e.path) for e in _entries(folder) if e.is_dir()]
    for path in sorted(dirs, key=lambda p: (p.is_symlink(), p.name)):  # real folders first: the link is dropped
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(
                f"the class folder {printable(path)!r} has a name that is not valid UTF-8; rename it (class names "
                "are written to reports and JSON files)"
            ) from None
        real = os.path.realpath(path)
        if any(_inside(real, r) or _inside(r, real) for r in reals):
            if walk is not None:
                walk.skip("loop or repeat", path)
            continue
        kept.append(path)
        reals.append(real)
    if walk is not None:
        walk.classes = reals
    return sorted(kept, key=lambda p: p.name)


def _scan_split(folder: Path, root: Path, class_names: list[str], walk: _Walk) -> FileImageDataset:
    try:
        classes = _class_folders(folder, walk)
        if not classes:
            loose = [e for e in _entries(folder) if e.name.lower().endswith(IMAGE_EXTENSIONS)]
            what = f"holds {len(loose)} images but no class folders" if loose else "holds no class folders"
            raise UserError(
                f"{printable(folder)} {what}; put each class's images in a subfolder named after the class "
                "(ImageFolder layout)"
            )
        index = {n: i for i, n in enumerate(class_names)}
        paths, targets, stats = [], [], []
        for cls in classes:
            files = _images_in(cls, walk)
            if not files:
                _broken_links([walk], walk.opts)  # a folder of broken links: name one of them
                raise UserError(
                    f"class folder {printable(cls)} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or "
                    "remove it"
                )
            for f in files:
                paths.append(f.relative_to(root).as_posix())
                targets.append(index[cls.name])
                stats.append(file_stat(f.stat()))
    finally:
        walk.warn(folder)
    return FileImageDataset(paths, np.asarray(targets), class_names, root, stats)


def _broken_links(walks: list[_Walk], opts: ReadOptions) -> list[str]:
    broken = [b for w in walks for b in w.broken]
    if broken and not opts.skip_bad:
        target = os.readlink(broken[0])
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise UserError(
            f"{printable(broken[0])} is a broken symbolic link (its target {printable(target)} does not exist){more}; "
            "fix or remove it, or pass --skip-bad-images"
        )
    return [printable(b) for b in broken]


def load_folder(root: Path, opts: ReadOptions) -> RawData:
    """A folder with train/ and test/ and/or val/ folders of class folders, or one folder of class folders."""
    subdirs = {e.name.lower(): Path(e.path) for e in _entries(root) if e.is_dir()}
    split_dirs = {}
    for dirname, split in SPLIT_ALIASES.items():
        if dirname in subdirs and split not in split_dirs:
            split_dirs[split] = subdirs[dirname]
    name = safe_name(root.resolve().name)
    if "train" not in split_dirs:
        if split_dirs:
            raise UserError(
                f"{root} has {', '.join(sorted(split_dirs))} folders but no train/ folder; add train/ (with class "
                "folders), or point --dataset at a single folder of class folders"
            )
        split_dirs = {"train": root}
    train_classes = [p.name for p in _class_folders(split_dirs["train"])]
    splits, walks = {}, []
    for split, folder in split_dirs.items():
        if split != "train":
            extra = sorted({p.name for p in _class_folders(folder)} - set(train_classes))
            if extra:
                shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                raise UserError(
                    f"{folder} has classes that {split_dirs['train']} does not: {shown}; every {split} class needs "
                    "training images (add them to train/ or remove those folders)"
                )
        walks.append(_Walk(os.path.realpath(root), opts))
        splits[split] = _scan_split(folder, root, train_classes, walks[-1])
    skipped = _broken_links(walks, opts)
    return RawData(splits, train_classes, name, f"image folder {root}", skipped=skipped)


# ---- CSV ------------------------------------------------------------------------------------------------------

_PATH_HEADERS = {"path", "image", "file", "filename", "filepath", "image_path", "img"}
_LABEL_HEADERS = {"label", "class", "target", "category", "class_name", "labels"}


def _csv_rows(csv_path: Path) -> list[list[str]]:
    """The non-blank rows of a CSV / TSV; one line of error for a file that is not UTF-8 text."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
        dialect = "excel-tab" if csv_path.suffix.lower() == ".tsv" else "excel"
        if "\0" in text:
            raise csv.Error("it contains NUL bytes")
        rows = [r for r in csv.reader(io.StringIO(text), dialect=dialect) if r and any(cell.strip() for cell in r)]
    except UnicodeDecodeError as e:
        raise UserError(
            f"CSV {csv_path} is not UTF-8 text (byte {e.start} cannot be decoded; a binary file?); give a text file "
            "of path,label rows"
        ) from None
    except csv.Error as e:
        raise UserError(f"CSV {csv_path} cannot be parsed ({e}); give a text file of path,label rows") from None
    except OSError as e:
        raise UserError(f"cannot read CSV {csv_path} ({e.strerror}); check that it is readable") from None
    if not rows:
        raise UserError(f"CSV {csv_path} is empty; write one path,label row per image")
    return rows


def _csv_columns(rows: list[list[str]]) -> tuple[int, int, int | None, int]:
    """(path column, label column, split column or None, first data row) from an optional header."""
    header = [c.strip().lower() for c in rows[0]]
    if any(c in _PATH_HEADERS for c in header) and any(c in _LABEL_HEADERS for c in header):
        col_path = next(i for i, c in enumerate(header) if c in _PATH_HEADERS)
        col_label = next(i for i, c in enumerate(header) if c in _LABEL_HEADERS)
        return col_path, col_label, header.index("split") if "split" in header else None, 1
    return 0, 1, 2 if len(rows[0]) >= 3 else None, 0


def _csv_items(csv_path: Path, opts: ReadOptions) -> tuple[dict[str, list[tuple[str, str, tuple]]], list[str]]:
    """Rows by split as (path, label, file stat), checked; and the missing files skipped under ``skip_bad``."""
    rows = _csv_rows(csv_path)
    col_path, col_label, col_split, first = _csv_columns(rows)
    width = max(col_path, col_label, col_split or 0) + 1
    items: dict[str, list[tuple[str, str, tuple]]] = {}
    missing = []
    for lineno, row in enumerate(rows[first:], start=first + 1):
        if len(row) < width:
            raise UserError(f"CSV {csv_path} line {lineno} has {len(row)} columns, expected path,label[,split]")
        rel, label = row[col_path].strip(), row[col_label].strip()
        if not rel or not label:
            raise UserError(
                f"CSV {csv_path} line {lineno} has an empty {'path' if not rel else 'label'}; fill it in or remove "
                "the row"
            )
        split = SPLIT_ALIASES.get(row[col_split].strip().lower(), None) if col_split is not None else "train"
        if split is None:
            raise UserError(
                f"CSV {csv_path} line {lineno}: split {row[col_split]!r} is not train, val or test; fix that cell"
            )
        try:
            stat = file_stat((csv_path.parent / rel).stat())
        except OSError:
            missing.append(str(csv_path.parent / rel))
            continue
        items.setdefault(split, []).append((rel, label, stat))
    if missing and not opts.skip_bad:
        raise UserError(
            f"CSV {csv_path} lists {len(missing)} missing file(s) (or broken links), e.g. {missing[0]}; paths are "
            "relative to the CSV's folder: fix them or remove those rows, or pass --skip-bad-images"
        )
    if "train" not in items:
        raise UserError(f"CSV {csv_path} has no train rows; mark training rows with split=train")
    return items, missing


def load_csv(csv_path: Path, opts: ReadOptions) -> RawData:
    """A CSV of ``path,label[,split]`` (header optional; paths relative to its folder; labels names or ints)."""
    items, missing = _csv_items(csv_path, opts)
    as_ints = all(re.fullmatch(r"\d+", label) for rows_ in items.values() for _, label, _ in rows_)

    def key(label: str) -> str:
        return str(int(label)) if as_ints else label

    train_labels = {key(label) for _, label, _ in items["train"]}
    if as_ints:
        others = {s: np.asarray([int(lb) for _, lb, _ in r]) for s, r in items.items() if s != "train"}
        class_names = integer_class_names(np.asarray([int(lb) for lb in train_labels]), others, f"CSV {csv_path}")
    else:
        for split, rows_ in items.items():
            extra = sorted({key(label) for _, label, _ in rows_} - train_labels)
            if extra:
                raise UserError(
                    f"CSV {csv_path}: the {split} rows have labels with no train rows: {', '.join(extra[:5])}; add "
                    "training images for them or remove those rows"
                )
        class_names = sorted(train_labels)
    index = {n: i for i, n in enumerate(class_names)}
    base = csv_path.parent
    splits = {}
    for split, rows_ in items.items():
        targets = np.asarray([index[key(label)] for _, label, _ in rows_])
        splits[split] = FileImageDataset([r for r, _, _ in rows_], targets, class_names, base, [s for _, _, s in rows_])
    return RawData(splits, class_names, safe_name(csv_path.stem), f"CSV {csv_path}", skipped=missing)


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
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"IDX file {path} is truncated (its header ends early); download it again")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(data) < offset + count * dtype.itemsize:
        raise UserError(f"IDX file {path} is truncated ({len(data)} bytes for shape {dims}); download it again")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)


def idx_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
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


def load_idx_folder(folder: Path, class_names: list[str] | None, name: str) -> RawData:
    """A folder of MNIST-style IDX files (``train-images-idx3-ubyte[.gz]`` and ``t10k-``/``test-``)."""
    files = idx_files(folder)
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
    if class_names is None:
        others = {s: v[1] for s, v in loaded.items() if s != "train"}
        class_names = integer_class_names(loaded["train"][1], others, f"IDX files in {folder}")
    k = int(max(labels.max() for _, labels, _, _ in loaded.values())) + 1
    if k > len(class_names):
        raise UserError(f"{folder} has labels up to {k - 1} but {len(class_names)} class names")
    splits = {}
    for split, (images, labels, img_path, lab_path) in loaded.items():
        stats = [(p.name, *file_stat(p.stat())) for p in (img_path, lab_path)]
        splits[split] = ArrayImageDataset(images, labels, class_names, str(img_path), json.dumps(stats).encode())
    return RawData(splits, class_names, name, f"IDX files in {folder}")


def load_fashion_mnist(image_column: str | None, label_column: str | None) -> RawData:
    """Fashion-MNIST: the Debian package's IDX files when present (``MR2FT_FASHION_MNIST_DIR``), else the hub."""
    folder = Path(os.environ.get("MR2FT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if idx_files(folder) is not None:
        return load_idx_folder(folder, FASHION_MNIST_CLASSES, "fashion-mnist")
    entry = KNOWN_DATASETS["fashion-mnist"]
    log.info("no Fashion-MNIST IDX files in %s (Debian package dataset-fashion-mnist); using the hub", folder)
    return hf.load_hub(
        entry.repo,
        entry.config,
        image_column or entry.image_column,
        label_column or entry.label_column,
        "fashion-mnist",
        hint="or install the Debian package dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist)",
    )
