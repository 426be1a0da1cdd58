"""The fine-tune's checkpoint format and resume policy.

Owns: where training stands (:class:`TrainState`), the files of one checkpoint and how they are written (atomically,
one folder per state) and read back (``weights_only=True`` / safetensors, every damaged file one :class:`UserError`),
which checkpoints are kept, the RNG states, finding the checkpoint a ``--resume PATH`` names, and which settings a
resume may change. :class:`mr2ft.finetune.Trainer` calls these from short methods.

Checkpoints (``RUN/checkpoints/``)::

    ckpt-<step>-<epoch>-<batch>/    one complete training state, written under a temporary name and renamed
        model.safetensors           when complete: a kill at any moment leaves the old state or the new one.
                                    The full weights (gathered under FSDP), which eval and export read
        accelerate/                 ``accelerator.save_state``: the optimizer (``optimizer.bin``, or its shards),
                                    the scaler, Accelerate's RNG states and, under FSDP or DeepSpeed only, the
                                    model as they save it (unsharded, the model is model.safetensors alone)
        state.pt                    position, best, schedule, processes, sharding, fingerprints (``torch.save``)
        rank<r>.pt                  each process's RNG states, running epoch sums and gradient-share measurement
        loss_rank<r>.safetensors    each process's loss state (MR2 class statistics; identical on all ranks)
        ema.safetensors             the weight EMA (``--model-ema``)
        meta.json                   the position and metric, for people
    best.json                       {"name", "metric", "split", "epoch", "step"} of the best checkpoint on the
                                    validation split (only a run with a validation split has one)

The latest checkpoint is the one with the largest name (``<epoch>-<batch>`` is the position the next batch
starts from); only it and the best one are kept. Under several processes every process writes its own files into
the same folder, so the run folder must be on a file system they all see (one node, or a shared disk).

Nothing in a checkpoint is unpickled beyond tensors and plain values: ``accelerate/`` is read through
:func:`mr2ft.sharding.load_state`, which checks every file first. Checkpoints of mr2ft 0.1 (``optimizer.pt`` beside
``model.safetensors``, no ``accelerate/``) still resume, without FSDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mr2ft import runs
from mr2ft.config import FinetuneConfig, build_config
from mr2ft.errors import UserError
from mr2ft.io import atomic_path, load_tensors, read_jsonl, save_tensors, write_json, write_text
from mr2ft.sharding import load_state, sharding

CHECKPOINTS = "checkpoints"
BEST = "best.json"
CKPT_PREFIX = "ckpt-"
MODEL = "model.safetensors"
ACCELERATE = "accelerate"  # accelerator.save_state's folder
OPTIMIZER = "optimizer.pt"  # the optimizer in a checkpoint of mr2ft 0.1 (now in accelerate/)
STATE = "state.pt"
META = "meta.json"

# Settings that may differ between a run and its resumption: where/how often to write, when to stop, how to
# evaluate at the end. Everything else decides what is trained, and a change would make the result a hybrid.
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "overwrite",
        "resume",
        "max_steps",
        "checkpoint_every",
        "eval_every",
        "num_workers",
        "baseline",
        "wise_alpha",
        "mixed_precision",
        "report_to",
        "grad_checkpointing",
    }
)


@dataclass
class TrainState:
    """Where training stands: the optimizer step, the next batch, the best validation result so far."""

    step: int = 0
    epoch: int = 0  # the epoch the next batch belongs to
    batch: int = 0  # batches of that epoch already done
    best_metric: float | None = None  # on the validation split only: test figures never choose anything
    best_name: str | None = None
    best_split: str | None = None
    best_epoch: int | None = None  # 1-based epoch of the best checkpoint
    early_stopped: bool = False  # --early-stop ended training (the run is then complete)
    sums: dict[str, float] = field(default_factory=dict)  # this process's running loss sums in the epoch
    count: int = 0  # micro-batches in those sums
    grad_share: float | None = None  # this process's representation-margin gradient share, this epoch

    @property
    def name(self) -> str:
        return f"{CKPT_PREFIX}{self.step:08d}-{self.epoch:04d}-{self.batch:06d}"

    @property
    def epochs_done(self) -> int:
        return self.epoch

    def best_record(self) -> dict:
        """What ``best.json`` says (with the step of the best checkpoint, read from its name)."""
        step = int(self.best_name[len(CKPT_PREFIX) :].split("-")[0]) if self.best_name else None
        return {
            "name": self.best_name,
            "metric": self.best_metric,
            "split": self.best_split,
            "epoch": self.best_epoch,
            "step": step,
        }

    # The fields state.pt carries (the per-process ones go into rank<r>.pt).
    SAVED = ("step", "epoch", "batch", "best_metric", "best_name", "best_split", "best_epoch", "early_stopped")

    def saved(self) -> dict:
        return {k: getattr(self, k) for k in self.SAVED}

    def restore(self, state: dict, per_rank: dict) -> None:
        for k in self.SAVED:
            setattr(self, k, state.get(k, getattr(TrainState, k, None)))
        if self.best_split != "val":  # checkpoints written before best meant best-on-validation
            self.best_metric = self.best_name = self.best_split = self.best_epoch = None
        self.sums, self.count = dict(per_rank["sums"]), per_rank["count"]
        self.grad_share = per_rank.get("grad_share")


# ---- RNG states and files ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state on the CPU, cloned so that tensors sharing storage (tied weights) fit safetensors."""
    return _cpu_copy(model.state_dict())


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _write(path: Path, obj: Any) -> None:
    """One checkpoint file, atomically, in the format its suffix names."""
    if path.suffix == ".safetensors":
        save_tensors(path, obj)
    elif path.suffix == ".json":
        write_json(path, obj)
    else:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)


def read(path: Path) -> Any:
    """One checkpoint file, read back safely.

    Raises:
        UserError: the file is missing, truncated or foreign (one line, naming it).
    """
    try:
        if path.suffix == ".safetensors":
            return load_tensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, missing or foreign file
        raise UserError(
            f"checkpoint file {path} is unreadable ({e.__class__.__name__}); resume an earlier checkpoint "
            "(pass its checkpoints/ckpt-* folder to --resume) or start again with --overwrite"
        ) from None


def discard(path: Path) -> None:
    """Remove a folder so that no half-deleted copy keeps a checkpoint name (rename first, then delete)."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def listing(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and half-deleted folders have other names)."""
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name.startswith(CKPT_PREFIX))


# ---- writing and reading one checkpoint ----------------------------------------------------------------------------


def save(
    ckpt_dir: Path,
    name: str,
    accelerator: Any,
    rank_files: dict[str, Any],
    shared_files: Callable[[], dict[str, Any]],
    keep: set[str | None],
) -> Path:
    """Write checkpoint ``name`` in ``ckpt_dir`` from every process, atomically, and prune the others.

    Every process calls this: it writes ``rank_files``, then ``accelerator.save_state`` writes ``accelerate/`` (under
    FSDP each process its shards), then the main process writes ``shared_files()``; only then is the folder renamed.

    Args:
        rank_files: this process's files (file name -> object); every process calls with its own.
        shared_files: called on every process (gathering sharded weights takes them all), returning the files the
            main process writes (model, state); the other processes' results are ignored.
        keep: the checkpoint names to keep besides the new one.
    """
    final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    for file, obj in rank_files.items():
        _write(tmp / file, obj)
    accelerator.save_state(str(tmp / ACCELERATE), safe_serialization=True)
    files = shared_files()
    if main:
        for file, obj in files.items():
            _write(tmp / file, obj)
    accelerator.wait_for_everyone()
    if main:
        _fsync_tree(tmp / ACCELERATE)  # our own files are fsynced as they are written (mr2ft.io.atomic_path)
        discard(final)
        os.replace(tmp, final)
        for d in listing(ckpt_dir):
            if d.name not in keep | {name}:
                discard(d)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def read_state(ckpt: Path, num_processes: int, fingerprints: dict[str, str], sharded: str | None = None) -> dict:
    """``state.pt`` of ``ckpt``, checked against this run.

    Args:
        fingerprints: what -> this run's fingerprint (backbone weights, dataset) to compare with the saved ones.
        sharded: this run's :func:`sharding`.

    Raises:
        UserError: unreadable, or written by another number of processes, sharding, weights or dataset.
    """
    state = read(ckpt / STATE)
    if not isinstance(state, dict) or "scheduler" not in state:
        raise UserError(f"checkpoint file {ckpt / STATE} is not an mr2ft training state; resume another checkpoint")
    if state.get("num_processes") != num_processes:
        raise UserError(
            f"{ckpt} was written by {state['num_processes']} processes and this run has {num_processes}; "
            "resume with the same number of processes (the data order and statistics depend on it)"
        )
    if state.get("sharding") != sharded:
        raise UserError(
            f"{ckpt} was written {_under(state.get('sharding'))} and this run is {_under(sharded)}; resume with the "
            "same accelerate config (the saved model and optimizer states are laid out for it)"
        )
    for what, now in fingerprints.items():
        if state.get(f"{what}_fingerprint") != now:
            raise UserError(
                f"cannot resume {ckpt}: the {what.replace('_', ' ')} changed since it was written; resume with the "
                "same files or start a new run with another --out"
            )
    return state


def _under(sharded: str | None) -> str:
    return f"under {sharded}" if sharded else "without FSDP"


def read_loss_state(ckpt: Path, rank: int, expected: set[str]) -> dict[str, torch.Tensor]:
    """This process's loss state (MR2 class statistics), checked against the keys this run's loss keeps.

    Raises:
        UserError: unreadable, or another loss's state.
    """
    path = ckpt / f"loss_rank{rank}.safetensors"
    state = read(path)
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(
            f"{path} does not hold the loss state this run keeps (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): another version of mr2ft wrote it; start a new run with another --out"
        )
    return state


# ---- the model and optimizer through Accelerate (FSDP) -------------------------------------------------------------


def restore_training(ckpt: Path, accelerator: Any, model: nn.Module, optimizer: Any, state: dict) -> None:
    """Load the model's weights and the optimizer and scaler states of ``ckpt``, every file read and checked first.

    A checkpoint of mr2ft 0.1 has no ``accelerate/``: its ``optimizer.pt`` and the scaler in ``state.pt`` are read
    instead (:func:`read_state` has refused it under FSDP, which it predates).

    Raises:
        UserError: a damaged, foreign or unsafe file, or Accelerate's states of another model.
        RuntimeError, KeyError, ValueError: weights or optimizer state of another model (the caller names them).
    """
    if (ckpt / ACCELERATE).is_dir():
        weights = None if sharding(accelerator) else read(ckpt / MODEL)
        load_state(accelerator, ckpt / ACCELERATE)  # under FSDP, with the model's shards
        if weights is not None:
            accelerator.unwrap_model(model).load_state_dict(weights, strict=True)
        return
    weights, old_optimizer = read(ckpt / MODEL), read(ckpt / OPTIMIZER)
    accelerator.unwrap_model(model).load_state_dict(weights, strict=True)
    optimizer.load_state_dict(old_optimizer)
    if accelerator.scaler is not None and state.get("scaler") is not None:
        accelerator.scaler.load_state_dict(state["scaler"])


def restore_weights(ckpt: Path, accelerator: Any, model: nn.Module) -> None:
    """Load the weights of ``ckpt`` into ``model`` (at the end of a run: the best checkpoint's). Under FSDP that
    is ``load_state`` on every process (the optimizer state comes along; it is not used again)."""
    if sharding(accelerator):
        load_state(accelerator, ckpt / ACCELERATE)
    else:
        accelerator.unwrap_model(model).load_state_dict(read(ckpt / MODEL), strict=True)


def forget_after(run_dir: Path, ckpt: Path, state: TrainState) -> None:
    """Resuming ``ckpt`` abandons the later checkpoints and the metrics they logged; a kill may also have left a
    temporary or half-deleted folder behind. ``best.json`` is rewritten to the restored state's best."""
    ckpt_dir = run_dir / CHECKPOINTS
    for pattern in (".tmp-*", ".trash-*"):
        for d in ckpt_dir.glob(pattern):
            shutil.rmtree(d, ignore_errors=True)
    for d in listing(ckpt_dir):
        if d.name > ckpt.name:
            discard(d)
    best = ckpt_dir / BEST
    if state.best_name and (ckpt_dir / state.best_name).is_dir():
        write_json(best, state.best_record())
    elif best.exists():
        best.unlink()
    metrics = run_dir / runs.METRICS
    kept = [r for r in read_jsonl(metrics) if not r.get("final") and r.get("epoch", 0) <= state.epochs_done]
    write_text(metrics, "".join(_jsonl_line(r) for r in kept))


def _jsonl_line(record: dict) -> str:
    return json.dumps(record) + "\n"


# ---- resume policy -------------------------------------------------------------------------------------------------


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """Resolve ``--resume PATH``: a run folder (its latest checkpoint) or one checkpoint folder inside it.

    Returns:
        (run folder, checkpoint folder).

    Raises:
        UserError: nothing resumable there.
    """
    p = Path(path)
    if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.parent.name == CHECKPOINTS:
        return p.parent.parent, p
    if not p.is_dir():
        raise UserError(f"--resume {p}: no such folder; pass a run folder or one of its checkpoints/ckpt-* folders")
    found = listing(p / CHECKPOINTS)
    if not found:
        raise UserError(
            f"--resume {p}: the folder holds no checkpoint to resume; start it again with --overwrite "
            "(use --checkpoint-every N to checkpoint within epochs)"
        )
    return p, found[-1]


def completed(run_dir: Path, ckpt: Path, max_steps: int | None) -> dict | None:
    """The final metrics record when the run already finished from ``ckpt`` (nothing is left to resume), else None.

    Finished: the run wrote its final results from this very checkpoint, at its last epoch or stopped early on
    validation, or stopped by ``--max-steps`` at or beyond the ``max_steps`` asked now.
    """
    step = int(ckpt.name[len(CKPT_PREFIX) :].split("-")[0])
    finals = [r for r in read_jsonl(run_dir / runs.METRICS) if r.get("final")]
    if not finals or finals[-1].get("step") != step:
        return None
    final = finals[-1]
    if final.get("stopped_early") and (max_steps is None or step < max_steps):
        return None  # stopped by --max-steps: a resume continues
    return final


def _saved_config(run_dir: Path) -> Path:
    path = run_dir / runs.CONFIG
    if not path.is_file():
        raise UserError(
            f"{run_dir} has no {runs.CONFIG}: it is not an mr2ft run folder; pass the folder finetune wrote"
        )
    return path


def resume_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a ``--resume PATH`` continues with: the run's own ``config.yaml``, less its stop and output
    controls (``max_steps``, ``overwrite``, ``resume``), which belong to one invocation. Flags typed for the
    resumption go on top; :func:`check_resume_compatible` then refuses those that change what is trained.

    Raises:
        UserError: no resumable run at ``path``, or its config cannot be read.
    """
    from mr2ft.config import load_recipe

    run_dir, _ = find_checkpoint(path)
    config = _saved_config(run_dir)
    settings = {k.replace("-", "_"): v for k, v in load_recipe(str(config)).items()}
    for key in ("command", "description", "max_steps", "overwrite", "resume"):
        settings.pop(key, None)
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"{config} has unknown settings ({', '.join(unknown)}): it was not written by finetune")
    return settings


def check_resume_compatible(cfg: FinetuneConfig, run_dir: Path) -> None:
    """Refuse to resume a run with settings that change what is trained (see :data:`RESUMABLE_CHANGES`).

    Raises:
        UserError: naming the first differing setting, its saved and its new value.
    """
    saved = build_config(FinetuneConfig, str(_saved_config(run_dir)))
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in RESUMABLE_CHANGES:
            continue
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if old != new:
            raise UserError(
                f"cannot resume {run_dir}: {f.name} was {old!r} and is now {new!r}; resume with the run's own "
                f"settings (omit --{f.name.replace('_', '-')}) or start a new run with another --out"
            )


__all__ = [
    "BEST",
    "CHECKPOINTS",
    "RESUMABLE_CHANGES",
    "TrainState",
    "check_resume_compatible",
    "completed",
    "find_checkpoint",
    "model_tensors",
    "read",
    "restore_training",
    "restore_weights",
    "resume_settings",
    "rng_state",
    "save",
    "set_rng_state",
]
