"""The run folder: one place that holds everything needed to repeat or report a run.

Layout (shared by ``mr2ft probe`` and ``mr2ft finetune``; read by ``mr2ft report``/``compare``/``study``)::

    config.yaml               resolved config (``--recipe RUN/config.yaml`` repeats the run)
    classes.json              {"class_names": [...], "dataset": ..., "backbone": ...}
    metrics.jsonl             one record per epoch (and per sweep point)
    predictions.safetensors   test "targets" (N,), "preds" (N,), "topk" (N, min(5, K)) as int64
    class_stats.safetensors   "M", "S", "S2", "gamma", "seen" (K,) when the loss keeps class statistics
    head.safetensors          the classifier head (probe) / checkpoints/ (finetune)
    report.json, per_class.csv, report.md, report.html
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mr2ft.errors import UserError
from mr2ft.io import load_tensors, read_json, save_tensors, write_json

PREDICTIONS = "predictions.safetensors"
CLASS_STATS = "class_stats.safetensors"
CLASSES = "classes.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
HEAD = "head.safetensors"


def default_run_dir(backbone: str, dataset: str, loss: str, root: str = "runs") -> Path:
    """``runs/<backbone>-<dataset>-<loss>-<time>``, with the dataset spec reduced to a safe short name."""
    name = Path(dataset.rstrip("/")).name if ("/" in dataset or "\\" in dataset) else dataset
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.replace("hf:", "")).strip("-") or "data"
    return Path(root) / f"{backbone}-{name}-{loss}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(path: Path, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> None:
    """Refuse to write into a folder that already holds a run, unless the user said so.

    Args:
        resumable: whether the command has ``--resume`` (only then does the message offer it).
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} exists and is not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise UserError(
            f"output folder {path} already exists and is not empty; pass --overwrite to replace it, "
            + ("--resume to continue it, " if resumable else "")
            + "or choose another --out"
        )


@contextlib.contextmanager
def run_folder(path: Path, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> Iterator[Path]:
    """Create the run folder for the duration of a job.

    If the job fails, a folder this call created is removed again, unless it already holds a checkpoint
    (which the user can resume from): a failed run never leaves a half-written folder behind. With ``overwrite``
    the old folder is moved aside first and only deleted once the new run has finished; if the new run fails, the
    old folder is put back.
    """
    check_run_dir(path, overwrite, resume, resumable)
    backup = None
    if overwrite and not resume and path.exists():
        backup = path.with_name(f".{path.name}.replaced-{os.getpid()}")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(path, backup)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        ckpts = path / "checkpoints"
        has_checkpoint = ckpts.is_dir() and any(ckpts.iterdir())
        if created and not has_checkpoint:
            shutil.rmtree(path, ignore_errors=True)
            if backup is not None:
                os.replace(backup, path)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def save_predictions(run_dir: Path, targets: torch.Tensor, logits_or_topk: torch.Tensor, num_classes: int) -> None:
    """Save test targets, top-1 predictions and top-k (k = min(5, K)) predictions.

    Args:
        logits_or_topk: either logits (N, K) or already-ranked class indices (N, k) as an integer tensor.
    """
    k = min(5, num_classes)
    if logits_or_topk.is_floating_point():
        topk = logits_or_topk.float().topk(k, dim=1).indices
    else:
        topk = logits_or_topk[:, :k]
    save_tensors(
        run_dir / PREDICTIONS,
        {"targets": targets.long().cpu(), "preds": topk[:, 0].long().cpu(), "topk": topk.long().cpu()},
    )


def save_classes(run_dir: Path, class_names: Sequence[str], **info: object) -> None:
    """Write the class names (and a few facts about the run's data) that every report reads."""
    write_json(run_dir / CLASSES, {"class_names": list(class_names), **info})


def save_class_stats(run_dir: Path, stats: dict[str, torch.Tensor]) -> None:
    """Save per-class statistics (M, S, S2, gamma, seen) for the report's spread and margin columns."""
    # clone: safetensors refuses two keys that share memory (S and S2 are the same tensor when p = 2)
    tensors = {k: (v.float() if k != "seen" else v.to(torch.uint8)).clone() for k, v in stats.items()}
    save_tensors(run_dir / CLASS_STATS, tensors)


def load_run(run_dir: str | Path) -> dict:
    """Read what a report needs from a finished run folder.

    Returns:
        dict with ``class_names``, ``targets``, ``preds``, ``topk`` (tensors), ``stats`` (dict or None),
        ``info`` (the classes.json contents) and ``path``.

    Raises:
        UserError: the folder is missing or does not hold a finished run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass the folder a probe or finetune wrote")
    for name in (CLASSES, PREDICTIONS):
        if not (run_dir / name).is_file():
            raise UserError(
                f"{run_dir} holds no {name}: it is not a finished mr2ft run (was it interrupted? "
                "resume it or run it again)"
            )
    try:
        info = read_json(run_dir / CLASSES)
        preds = load_tensors(run_dir / PREDICTIONS)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{run_dir} has an unreadable result file ({e.__class__.__name__}); run it again") from None
    stats = None
    if (run_dir / CLASS_STATS).is_file():
        stats = load_tensors(run_dir / CLASS_STATS)
    return {
        "path": run_dir,
        "class_names": info["class_names"],
        "info": info,
        "targets": preds["targets"],
        "preds": preds["preds"],
        "topk": preds["topk"],
        "stats": stats,
    }
