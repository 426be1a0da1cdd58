"""The run folder: its layout, the name of every file in it, the header written once, and who may write it.

Layout (shared by ``mr2ft probe`` and ``mr2ft finetune``; read by ``mr2ft report``/``compare``/``study``)::

    config.yaml               resolved config (``--recipe RUN/config.yaml`` repeats the run)
    classes.json              {"class_names": [...], "dataset": ..., "backbone": ...}
    metrics.jsonl             one record per epoch (and per sweep point)
    predictions.safetensors   test "targets" (N,), "preds" (N,), "topk" (N, min(5, K)) as int64
    class_stats.safetensors   "M", "S", "S2", "gamma", "seen" (K,) when the loss keeps class statistics
    head.safetensors          the classifier head (probe) / checkpoints/ (finetune)
    report.json, per_class.csv, report.md, report.html

Beside the folder, while a job writes it: ``.NAME.lock`` (one writer at a time) and, during ``--overwrite``,
``.NAME.replaced-PID`` (the previous run, put back if the job fails; restored by the next job if it was killed).

torch is imported only by the functions that read or write tensors, so the CLI can check a folder before loading it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mr2ft.config import CONFIG_FILE, dump_config
from mr2ft.errors import UserError

if TYPE_CHECKING:
    import torch

CONFIG = CONFIG_FILE
CLASSES = "classes.json"
METRICS = "metrics.jsonl"
PREDICTIONS = "predictions.safetensors"
VAL_PREDICTIONS = "val_predictions.safetensors"  # the reported model on the validation split (same format)
CLASS_STATS = "class_stats.safetensors"
HEAD = "head.safetensors"
CHECKPOINTS = "checkpoints"
REPORT_JSON = "report.json"
PER_CLASS_CSV = "per_class.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
REPORT_FILES = {"json": REPORT_JSON, "csv": PER_CLASS_CSV, "md": REPORT_MD, "html": REPORT_HTML}


def default_run_dir(backbone: str, dataset: str, loss: str, root: str = "runs") -> Path:
    """``runs/<backbone>-<dataset>-<loss>-<time>``, with the dataset spec reduced to a safe short name."""
    name = Path(dataset.rstrip("/")).name if ("/" in dataset or "\\" in dataset) else dataset
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.replace("hf:", "")).strip("-") or "data"
    return Path(root) / f"{backbone}-{name}-{loss}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---- checking and claiming a folder ---------------------------------------------------------------------------


def check_folder_path(path: Path, option: str = "--out") -> None:
    """Refuse a folder path that cannot be written: a file, a name too long, a read-only or unwritable place.

    Cheap (no file is created), so the CLI runs it before loading anything.
    """
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"{option} {path} exists and is not a folder; choose another {option}")
        ancestor = path.absolute()
        while not ancestor.exists():
            ancestor = ancestor.parent
        name_max = os.pathconf(ancestor, "PC_NAME_MAX") if ancestor.is_dir() else 255
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise UserError(
                f"{option} {path} has a name longer than this file system allows; choose a shorter one"
            ) from None
        raise UserError(f"{option} {path} cannot be used ({e.strerror}); choose another {option}") from None
    if not ancestor.is_dir():
        raise UserError(f"{option} {path} lies inside {ancestor}, which is a file; choose another {option}")
    too_long = [part for part in path.absolute().parts if len(os.fsencode(part)) > name_max]
    if too_long:
        raise UserError(
            f"{option} {path} has a name longer than this file system allows ({name_max} bytes); choose a shorter one"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only(ancestor):
        raise UserError(f"{option} {path} cannot be written: {ancestor} is read-only; choose another {option}")


def _read_only(folder: Path) -> bool:
    """Whether ``folder`` sits on a file system mounted read-only (``os.access`` says so too, except for root)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_run_dir(path: Path, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> None:
    """Claim ``path`` for this job and refuse a folder that already holds a run, unless the user said so.

    Claiming takes the folder's lock (held until :func:`release`, at the end of :func:`run_folder` or of the
    command) and first puts back a previous run that a killed ``--overwrite`` left aside.

    Args:
        resumable: whether the command has ``--resume`` (only then does the message offer it).
    """
    check_folder_path(path)
    fresh = path.absolute() not in _HELD
    claim(path)
    try:
        if _main_process():  # the process that holds the lock repairs; the others of a launch only look
            restore_replaced(path)
        if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
            raise UserError(
                f"output folder {path} already exists and is not empty; pass --overwrite to replace it, "
                + ("--resume to continue it, " if resumable else "")
                + "or choose another --out"
            )
    except BaseException:
        if fresh:
            release(path)
        raise


# Locks this process holds, by absolute folder path (a second claim of the same folder is a no-op).
_HELD: dict[Path, Any] = {}


def lock_file(path: Path) -> Path:
    """The lock beside a run folder (not inside it: ``--overwrite`` moves the folder)."""
    path = path.absolute()
    return path.parent / f".{path.name}.lock"


def _main_process() -> bool:
    """Under ``accelerate launch``/``torchrun`` only rank 0 claims the folder; the others share its claim."""
    return os.environ.get("RANK", "0") in ("", "0")


def claim(path: Path) -> None:
    """Take ``path``'s lock for this process, or stop in one line if another job writes the same folder.

    Raises:
        UserError: another process holds the lock, or the lock cannot be created there.
    """
    from filelock import FileLock, Timeout

    key = path.absolute()
    if key in _HELD or not _main_process():
        return
    lock = FileLock(lock_file(key), timeout=0)
    made = [p for p in key.parents if not p.exists()]
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        _remove_empty(made)
        raise UserError(
            f"output folder {path} is being written by another mr2ft run (it holds {lock_file(key)}); wait for it "
            "to finish or choose another --out"
        ) from None
    except OSError as e:
        _remove_empty(made)
        raise UserError(f"cannot write beside {path} ({e.strerror}); choose another --out") from None
    _HELD[key] = (lock, made)


def release(path: Path | None = None) -> None:
    """Let go of ``path``'s lock (every lock this process holds when ``path`` is None).

    Parent folders the claim created are removed again when the run folder was never made.
    """
    keys = [path.absolute()] if path is not None else list(_HELD)
    for key in keys:
        held = _HELD.pop(key, None)
        if held is None:
            continue
        lock, made = held
        with contextlib.suppress(OSError):
            lock_file(key).unlink()  # while still holding it: a job that opened it now finds it gone and retries
        lock.release()
        if not key.exists():
            _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


# ---- a killed --overwrite ----------------------------------------------------------------------------------------


def replaced_copies(path: Path) -> list[Path]:
    """Previous runs that another job's ``--overwrite`` moved aside (``.NAME.replaced-PID``) and left there (this
    process's own copy is its run in progress: :func:`run_folder` puts it back or deletes it)."""
    path = path.absolute()
    found = glob.glob(str(path.parent / f".{glob.escape(path.name)}.replaced-*"))
    return sorted(Path(p) for p in found if not p.endswith(f".replaced-{os.getpid()}"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _has_checkpoint(path: Path) -> bool:
    ckpts = path / CHECKPOINTS
    return ckpts.is_dir() and any(ckpts.iterdir())


def restore_replaced(path: Path) -> None:
    """Put back the previous run that a killed ``--overwrite`` left aside, or name it in one line.

    The half-written folder of the killed job is deleted, unless it holds a checkpoint (then the user chooses).

    Raises:
        UserError: the job that moved it aside is still running, several copies are left, or the new folder
            holds a checkpoint.
    """
    copies = replaced_copies(path)
    if not copies:
        return
    backup = copies[-1]
    pid_text = backup.name.rsplit("-", 1)[-1]
    pid = int(pid_text) if pid_text.isdigit() else 0
    if len(copies) > 1 or (pid and _alive(pid)):
        who = f"process {pid} is replacing it" if len(copies) == 1 else "several replaced copies are left"
        raise UserError(
            f"{path} was being replaced with --overwrite ({who}); the previous run is kept in {backup}: if no mr2ft "
            f"job is running, move it back (rm -rf {path} && mv {backup} {path}) or delete it"
        )
    if path.exists() and _has_checkpoint(path):
        raise UserError(
            f"{path} holds a run that was killed while it replaced an earlier one, which is kept in {backup}; delete "
            f"{backup} to keep the new run (then --resume it), or rm -rf {path} && mv {backup} {path} to go back"
        )
    if path.exists():
        shutil.rmtree(path)
    os.replace(backup, path)
    print(f"note: restored {path} from {backup.name}: a --overwrite of it was killed before it ended", file=sys.stderr)


@contextlib.contextmanager
def run_folder(path: Path, overwrite: bool = False, resume: bool = False, resumable: bool = True) -> Iterator[Path]:
    """Create the run folder for the duration of a job, holding its lock.

    If the job fails, a folder this call created is removed again, unless it already holds a checkpoint
    (which the user can resume from): a failed run never leaves a half-written folder behind. With ``overwrite``
    the old folder is moved aside first and only deleted once the new run has finished; if the new run fails, the
    old folder is put back (and a kill -9 is repaired by the next job: :func:`restore_replaced`).
    """
    check_run_dir(path, overwrite, resume, resumable)
    try:
        backup = None
        if overwrite and not resume and path.exists():
            backup = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            yield path
        except BaseException:
            if created and not _has_checkpoint(path):
                shutil.rmtree(path, ignore_errors=True)
                if backup is not None:
                    os.replace(backup, path)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        release(path)


# ---- writing and reading the files -----------------------------------------------------------------------------


def write_header(
    run_dir: Path,
    cfg: Any,
    command: str,
    splits: Any,
    backbone: Any,
    extra: dict[str, Any] | None = None,
    **info: object,
) -> None:
    """Write the run's header once: ``config.yaml`` (the resolved config, plus ``extra`` facts resolved at run time,
    as comments) and ``classes.json`` (the class names, the loss, the mode, the dataset, the backbone, how many
    images were skipped, and ``info``).

    Args:
        splits: the run's data (a :class:`~mr2ft.data.DatasetSplits`: ``class_names``, ``name``, ``skipped``).
        backbone: the run's backbone (``family`` and ``name``).
    """
    dump_config(cfg, run_dir / CONFIG, command, extra=extra)
    facts = {
        "loss": getattr(cfg, "loss", None),
        "mode": command,
        "dataset": splits.name,
        "backbone": f"{backbone.family}:{backbone.name}",
        "skipped_images": len(getattr(splits, "skipped", None) or []),
    }
    save_classes(run_dir, splits.class_names, **facts, **info)


def save_predictions(
    run_dir: Path, targets: torch.Tensor, logits_or_topk: torch.Tensor, num_classes: int, name: str = PREDICTIONS
) -> None:
    """Save test targets, top-1 predictions and top-k (k = min(5, K)) predictions.

    Args:
        logits_or_topk: either logits (N, K) or already-ranked class indices (N, k) as an integer tensor.
        name: the file in ``run_dir`` (:data:`VAL_PREDICTIONS` for the validation split).
    """
    from mr2ft.io import save_tensors

    k = min(5, num_classes)
    if logits_or_topk.is_floating_point():
        topk = logits_or_topk.float().topk(k, dim=1).indices
    else:
        topk = logits_or_topk[:, :k]
    save_tensors(
        run_dir / name,
        {"targets": targets.long().cpu(), "preds": topk[:, 0].long().cpu(), "topk": topk.long().cpu()},
    )


def save_classes(run_dir: Path, class_names: Sequence[str], **info: object) -> None:
    """Write the class names (and a few facts about the run's data) that every report reads."""
    from mr2ft.io import write_json

    write_json(run_dir / CLASSES, {"class_names": list(class_names), **info})


def save_class_stats(run_dir: Path, stats: dict[str, torch.Tensor]) -> None:
    """Save per-class statistics (M, S, S2, gamma, seen) for the report's spread and margin columns."""
    import torch

    from mr2ft.io import save_tensors

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
    from mr2ft.io import load_tensors, read_json

    run_dir = Path(run_dir)
    if replaced_copies(run_dir):  # a killed --overwrite: put the previous run back (under the lock) or say so
        held = run_dir.absolute() in _HELD
        try:
            claim(run_dir)
            restore_replaced(run_dir)
        finally:
            if not held:
                release(run_dir)
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
