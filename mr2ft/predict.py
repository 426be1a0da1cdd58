"""``mr2ft predict``: label new images with a finished run, top-k class names and probabilities per image.

Inputs are image files, folders (searched recursively) and CSV files of paths (the ``path``/``image``/``file``
column, or the first; paths relative to the CSV's folder). A missing input path is a user error before any work.

The backbone's features come from the probe's extraction path and feature cache (:func:`mr2ft.features
.stored_features`): decoded by DataLoader workers in batches, sharded over the processes of an ``accelerate launch``
(the main process assembles them, scores and writes the CSV), cached under a key of the run's weights and the files'
paths, sizes and modification times, so a killed or repeated prediction re-extracts only what is missing. An image
that cannot be read gets an ``error`` in its row instead of stopping the run (it travels through the extraction as a
flag in the target column; its message is read again on the main process).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import Dataset

from mr2ft.errors import UserError
from mr2ft.io import write_text

_PATH_COLUMNS = ("path", "image", "file", "filename", "filepath", "image_path", "img")


def _image_extensions() -> tuple[str, ...]:
    from mr2ft.data import IMAGE_EXTENSIONS

    return tuple(IMAGE_EXTENSIONS)


def _csv_paths(path: Path) -> list[Path]:
    text = path.read_text(encoding="utf-8-sig")
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    rows = [r for r in csv.reader(io.StringIO(text), dialect=dialect) if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"CSV {path} is empty; write one image path per row")
    header = [c.strip().lower() for c in rows[0]]
    column = next((i for i, c in enumerate(header) if c in _PATH_COLUMNS), None)
    if column is not None:
        rows = rows[1:]
    column = column or 0
    return [(path.parent / r[column].strip()) if len(r) > column else path.parent for r in rows]


def gather_inputs(inputs: list[str]) -> list[Path]:
    """Every image named by ``inputs`` (files, folders searched recursively, CSVs of paths), in order.

    Raises:
        UserError: no input, a path that does not exist, or a folder with no image.
    """
    if not inputs:
        raise UserError("no input given; pass image files, folders or a CSV of image paths")
    extensions = _image_extensions()
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise UserError(f"input {item} does not exist; pass image files, folders or a CSV of image paths")
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not images:
                raise UserError(f"folder {item} holds no images ({', '.join(extensions)})")
            found.extend(images)
        elif path.suffix.lower() in (".csv", ".tsv"):
            found.extend(_csv_paths(path))
        else:
            found.append(path)
    return found


class ImageFiles(Dataset):
    """Image files to ``(tensor, error)``: a file that cannot be read gives a zero image and its error message."""

    def __init__(self, paths: list[Path], transform: Any, size: int) -> None:
        self.paths = paths
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        from mr2ft.data.base import open_rgb

        path = self.paths[i]
        try:  # the data package's decoding policy: EXIF orientation, any mode to RGB
            return self.transform(open_rgb(lambda: Image.open(path), str(path))), ""
        except Exception as e:  # any failure is this row's error, not the run's
            message = getattr(e, "message", None) or f"{e.__class__.__name__}: {e}"
            return torch.zeros(3, self.size, self.size), message.split("; replace or remove")[0].splitlines()[0]


@dataclass
class Predictions:
    """What :func:`predict_paths` returns: the paths, logits (NaN rows for unreadable images) and errors."""

    paths: list[Path]
    logits: torch.Tensor
    errors: list[str]


class _FlaggedFiles(Dataset):
    """:class:`ImageFiles` as the extraction path reads a dataset: ``(image, 1 if unreadable else 0)``."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, error = self.files[i]
        return image, int(bool(error))


def files_fingerprint(paths: list[Path], preprocess: dict) -> str:
    """Identity of the inputs of a prediction: each file's resolved path, size and modification time, in order, and
    the preprocessing applied to them."""
    h = hashlib.sha256(json.dumps(preprocess, sort_keys=True, default=str).encode())
    for path in paths:
        try:
            st = path.stat()
            h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # vanished or unreadable: its row says so; the key still names it
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:32]


def predict_paths(
    model: Any,
    paths: list[Path],
    batch_size: int = 64,
    num_workers: int = 2,
    console: Console | None = None,
    cache_dir: str | Path | None = None,
) -> Predictions | None:
    """Logits of ``model`` (a :class:`mr2ft.evaluate.TrainedModel`) for each image through the extraction path (see
    the module docstring); ``None`` on processes other than the main one of an ``accelerate launch``."""
    from mr2ft import featrows
    from mr2ft.evaluate import head_logits
    from mr2ft.features import FeatureCache, cache_key, stored_features

    pre = model.backbone.preprocess
    files = ImageFiles(paths, pre.eval_transform(), pre.input_size)
    cache = FeatureCache(cache_dir)
    store = stored_features(
        cache,
        cache_key(model.fingerprint, files_fingerprint(paths, pre.to_dict())),
        model.backbone.model,
        _FlaggedFiles(files),
        batch_size=batch_size,
        num_workers=num_workers,
        description="predicting",
        info={"backbone": str(model.backbone.source), "split": "predict", "dataset": f"{len(paths)} images"},
    )
    if store is None:
        return None
    x, _ = featrows.open_rows(store)
    logits = head_logits(model.head, x) if len(paths) else torch.zeros(0, model.num_classes)
    bad = store.targets.bool()
    logits[bad] = float("nan")
    errors = [files[i][1] if flag else "" for i, flag in enumerate(bad.tolist())]  # only the bad ones are re-read
    return Predictions(paths, logits, errors)


def to_csv(pred: Predictions, class_names: list[str], top_k: int) -> str:
    """One row per image: ``path``, then ``class_i``/``prob_i`` for i = 1..k (softmax probabilities), ``error``."""
    k = min(top_k, len(class_names))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")), "error"])
    probs = torch.softmax(pred.logits.double(), dim=1)
    values, indices = probs.topk(k, dim=1) if len(probs) else (probs, probs.long())
    for row, path in enumerate(pred.paths):
        if pred.errors[row]:
            writer.writerow([str(path), *([""] * (2 * k)), pred.errors[row]])
            continue
        cells = [
            c
            for v, i in zip(values[row].tolist(), indices[row].tolist(), strict=True)
            for c in (class_names[i], f"{v:.6f}")
        ]
        writer.writerow([str(path), *cells, ""])
    return buf.getvalue()


def run_predict(
    run: str | Path,
    inputs: list[str],
    *,
    top_k: int = 5,
    out: str | Path = "predictions.csv",
    batch_size: int = 64,
    num_workers: int = 2,
    console: Console | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Path, Predictions | None]:
    """Label every input image with ``run``'s model and write the CSV (atomically) to ``out``; the predictions are
    ``None`` (and nothing is written) on processes other than the main one of an ``accelerate launch``.

    Raises:
        UserError: unknown run, a missing input, ``top_k`` below 1.
    """
    from mr2ft.evaluate import load_trained, read_settings

    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    read_settings(Path(run))  # an unknown run fails before the inputs are listed
    paths = gather_inputs(inputs)
    model = load_trained(run)
    pred = predict_paths(model, paths, batch_size, num_workers, console, cache_dir)
    out = Path(out)
    if pred is not None:
        write_text(out, to_csv(pred, model.class_names, top_k))
    return out, pred


__all__ = ["ImageFiles", "Predictions", "gather_inputs", "predict_paths", "run_predict", "to_csv"]
