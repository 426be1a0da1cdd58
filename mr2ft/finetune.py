"""End-to-end fine-tuning on Accelerate: one readable loop that resumes to the exact step.

Per micro-batch: forward (accelerate's autocast) -> loss (MR2 keeps its class statistics in float32 and gathers
the global batch itself, so it is called on every process with the local batch) -> a finite check agreed by all
processes -> backward -> at each optimizer step: clip, step, warm-up/cosine schedule. Every ``eval_every``
epochs: evaluation with exact per-class counts (``gather_for_metrics``), a ``metrics.jsonl`` record and a
checkpoint (the best and the latest are kept). At the end: WiSE-FT interpolation if asked, the test predictions,
class statistics and the per-class report, in the same run folder ``mr2ft probe`` writes (:mod:`mr2ft.runs`).

Determinism and exact resume. Augmentation is a pure function of (seed, epoch, sample index)
(:class:`SeededTransform`), the batch order a pure function of (seed, epoch) (:class:`EpochShuffle`, or the
class-balanced sampler of :mod:`mr2ft.data`), and every DataLoader draws its worker seeds from its own generator.
The global RNGs therefore feed only the model (drop-path) and mixup, and their states go into each checkpoint,
with the optimizer, scheduler, scaler and loss states and the data position. A resumed run skips the batches
already done and ends bit-identical to an uninterrupted one on CPU, whatever the number of DataLoader workers.

Checkpoints (``RUN/checkpoints/``)::

    ckpt-<step>-<epoch>-<batch>/    one complete training state, written under a temporary name and renamed
        model.safetensors           when complete: a kill at any moment leaves the old state or the new one
        optimizer.pt, state.pt      (``torch.save``; read back with ``weights_only=True``)
        rank<r>.pt                  each process's RNG states and running epoch sums
        loss_rank<r>.safetensors    each process's loss state (MR2 class statistics; identical on all ranks)
        meta.json                   the position and metric, for people
    best.json                       {"name", "metric", "split", "epoch", "step"} of the best checkpoint

The latest checkpoint is the one with the largest name (``<epoch>-<batch>`` is the position the next batch
starts from); only it and the best one are kept. Under several processes every process writes its own files into
the same folder, so the run folder must be on a file system they all see (one node, or a shared disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mr2ft import runs
from mr2ft.config import FinetuneConfig, build_config, dump_config
from mr2ft.errors import UserError
from mr2ft.io import append_jsonl, atomic_path, load_tensors, read_jsonl, save_tensors, write_json, write_text
from mr2ft.perf import keep_freed_memory

CHECKPOINTS = "checkpoints"
BEST = "best.json"
CKPT_PREFIX = "ckpt-"
LOG_EVERY = 100  # optimizer steps between progress lines

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
    }
)
# The losses that may train on soft targets (mixup, cutmix, label smoothing); the others, MR2 above all, are
# defined on hard labels, so the combination is refused rather than silently mixed.
SOFT_TARGET_LOSSES = ("ce",)


@dataclass
class FinetuneResult:
    """What a fine-tune returns to Python callers (the CLI prints it; the benchmark reads the timings).

    Attributes:
        run_dir: the run folder.
        summary: :func:`mr2ft.metrics.summarize` of the final model on the test split.
        step: optimizer steps done.
        stopped_early: ``--max-steps`` ended the run before its last epoch.
        train_images: images the training loop consumed in this process call (all processes).
        train_seconds: wall time of the training loop in this call, without evaluation and checkpoint writes.
        images_per_step: images in one optimizer step (batch x processes x accumulation).
        step_seconds: wall time of each optimizer step in this call (this process), from the end of the previous
            step to the end of this one, so waiting for data counts; the first step of an epoch also carries
            the loader's start. Their median is the steady-state step time.
    """

    run_dir: Path
    summary: dict
    step: int
    stopped_early: bool
    train_images: int = 0
    train_seconds: float = 0.0
    images_per_step: int = 0
    step_seconds: list[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Steady-state training throughput (all processes): images per optimizer step over the median step."""
        if not self.step_seconds:
            return float("nan")
        return self.images_per_step / statistics.median(self.step_seconds)


# ---- validation --------------------------------------------------------------------------------------------------


def validate(cfg: FinetuneConfig) -> None:
    """Refuse bad settings and combinations before any heavy work.

    Raises:
        UserError: naming the setting and how to fix it.
    """
    positive = {"lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    for name, value in positive.items():
        if value is None or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}; pass a value above 0")
    optional_positive = {
        "max_steps": cfg.max_steps,
        "checkpoint_every": cfg.checkpoint_every,
        "eval_every": cfg.eval_every,
        "samples_per_class": cfg.samples_per_class,
        "grad_clip": cfg.grad_clip,
    }
    for name, value in optional_positive.items():
        if value is not None and value <= 0:
            raise UserError(
                f"--{name.replace('_', '-')} must be positive, got {value}; pass a value above 0 or omit it"
            )
    non_negative = {
        "weight_decay": cfg.weight_decay,
        "warmup_epochs": cfg.warmup_epochs,
        "warmup_steps": cfg.warmup_steps,
        "mixup": cfg.mixup,
        "cutmix": cfg.cutmix,
        "num_workers": cfg.num_workers,
    }
    for name, value in non_negative.items():
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 <= cfg.drop_path < 1:
        raise UserError(f"--drop-path must be in [0, 1), got {cfg.drop_path}")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise UserError(f"--layer-decay must be in (0, 1], got {cfg.layer_decay}; 0.65-0.75 is usual for ViTs")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")
    if cfg.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise UserError(f"unknown --mixed-precision {cfg.mixed_precision!r}; choose no, fp16 or bf16")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs a CUDA GPU and none is visible; use bf16 or no on this machine")
    if cfg.head not in ("linear", "zeroshot"):
        raise UserError(f"unknown --head {cfg.head!r} for finetune; choose linear or zeroshot (CLIP)")
    soft = [n for n, v in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix), ("label smoothing", cfg.label_smoothing)) if v]
    if soft and cfg.loss not in SOFT_TARGET_LOSSES:
        raise UserError(
            f"{' and '.join(soft)} {'make' if len(soft) > 1 else 'makes'} soft targets, but --loss {cfg.loss} is "
            f"defined on hard labels only; drop --{soft[0].replace(' ', '-')} or use --loss ce"
        )
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise UserError(f"mixup/cutmix pair each image with another: --batch-size must be even, got {cfg.batch_size}")
    if cfg.samples_per_class is not None and cfg.batch_size % cfg.samples_per_class:
        raise UserError(
            f"--batch-size {cfg.batch_size} is not a multiple of --samples-per-class {cfg.samples_per_class}; "
            "a class-balanced batch holds whole groups of M samples per class"
        )
    if cfg.wise_alpha is not None:
        if not 0 <= cfg.wise_alpha <= 1:
            raise UserError(f"--wise-alpha must be in [0, 1] (0: zero-shot, 1: fine-tuned), got {cfg.wise_alpha}")
        if cfg.head != "zeroshot":
            raise UserError("--wise-alpha interpolates towards the zero-shot model: it needs --head zeroshot (CLIP)")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it; pass only one of them")
    if not cfg.dataset:
        raise UserError("no dataset given; pass --dataset PATH_OR_NAME")


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
    found = _checkpoints(p / CHECKPOINTS)
    if not found:
        raise UserError(
            f"--resume {p}: the folder holds no checkpoint to resume; start it again with --overwrite "
            "(use --checkpoint-every N to checkpoint within epochs)"
        )
    return p, found[-1]


def _checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and half-deleted folders have other names)."""
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name.startswith(CKPT_PREFIX))


def resume_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a ``--resume PATH`` continues with: the run's own ``config.yaml``, less its stop and output
    controls (``max_steps``, ``overwrite``, ``resume``), which belong to one invocation. Flags typed for the
    resumption go on top; :func:`check_resume_compatible` then refuses those that change what is trained.

    Raises:
        UserError: no resumable run at ``path``, or its config cannot be read.
    """
    from mr2ft.config import load_recipe

    run_dir, _ = find_checkpoint(path)
    config = run_dir / runs.CONFIG
    if not config.is_file():
        raise UserError(
            f"{run_dir} has no {runs.CONFIG}: it is not an mr2ft run folder; pass the folder finetune wrote"
        )
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
    path = run_dir / runs.CONFIG
    if not path.is_file():
        raise UserError(
            f"{run_dir} has no {runs.CONFIG}: it is not an mr2ft run folder; pass the folder finetune wrote"
        )
    saved = build_config(FinetuneConfig, str(path))
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in RESUMABLE_CHANGES:
            continue
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if old != new:
            raise UserError(
                f"cannot resume {run_dir}: {f.name} was {old!r} and is now {new!r}; resume with the run's own "
                f"settings (omit --{f.name.replace('_', '-')}) or start a new run with another --out"
            )


# ---- model, optimizer, schedule ------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A backbone plus a linear head; ``forward`` returns ``(logits, features)``.

    ``features`` is the head's input and what MR2 measures: the backbone's output, which the backbone already
    L2-normalises when ``bb.normalize`` is on (CLIP).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        return self.head(features), features


def init_zeroshot_head(model: Classifier, bb: Any, class_names: list[str]) -> None:
    """Set the head to CLIP's zero-shot classifier: ``logit_scale * text embedding`` per class, bias 0.

    Raises:
        UserError: the backbone has no text tower (from ``bb.text_classifier``).
    """
    with torch.no_grad():
        weights = bb.text_classifier(list(class_names)).float()
        model.head.weight.copy_(float(bb.logit_scale) * weights)
        model.head.bias.zero_()


def build_optimizer(model: Classifier, bb: Any, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the backbone's parameter groups (layer-wise lr scales, no decay on norms and biases)
    plus the head at lr scale 1. Each group's ``lr`` is ``cfg.lr * lr_scale``; the schedule multiplies it.

    Raises:
        RuntimeError: the groups miss or repeat a trainable parameter (a backbone bug, not a user error).
    """
    groups = [dict(g) for g in bb.param_groups(cfg.lr, cfg.weight_decay, layer_decay=cfg.layer_decay)]
    groups.append({"params": [model.head.weight], "weight_decay": cfg.weight_decay, "lr_scale": 1.0})
    groups.append({"params": [model.head.bias], "weight_decay": 0.0, "lr_scale": 1.0})
    for g in groups:
        g["params"] = list(g["params"])
        g.setdefault("lr_scale", 1.0)
        g["lr"] = cfg.lr * g["lr_scale"]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if len(grouped) != len(set(grouped)) or set(grouped) != trainable:
        raise RuntimeError("parameter groups do not cover each trainable parameter exactly once")
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps`` (``step`` counts from 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """A per-step LambdaLR of :func:`lr_factor`; it scales each group's own ``lr`` and so keeps its lr_scale."""
    fn = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ---- data ----------------------------------------------------------------------------------------------------------


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value and their order (SplitMix64 chained; ~1 µs per value, where
    numpy's SeedSequence takes ~25 µs: this runs once per training sample)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def _seed_all(seed: int) -> None:
    """Seed the CPU torch, Python and numpy RNGs that augmentations draw from."""
    # torch.default_generator, not torch.manual_seed: that would also reseed (and move) CUDA's RNG.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class SeededTransform(Dataset):
    """Apply ``transform`` with torch, numpy and Python RNGs seeded from (seed, epoch, index).

    Augmentation then no longer depends on worker count, process count or where a run was resumed; the
    callers' RNG states are left untouched. The DataLoader fetches a batch through :meth:`__getitems__`, so in the
    main process (``--num-workers 0``) the callers' states are saved and restored once per batch, not per image.
    """

    def __init__(self, dataset: Any, transform: Any, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _seeded(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        _seed_all(_mix_seed(self.seed, self.epoch, index))
        return self.transform(image), label

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        if torch.utils.data.get_worker_info() is not None:
            # A loader worker's RNGs serve nothing else: seeding is enough.
            return [self._seeded(i) for i in indices]
        py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            return [self._seeded(i) for i in indices]
        finally:
            torch.set_rng_state(cpu_state)
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]


class EpochShuffle(Sampler[int]):
    """A random permutation per epoch that depends only on (seed, epoch)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 0x5EED))
        return iter(torch.randperm(self.size, generator=g).tolist())


def _loader_kwargs(cfg: FinetuneConfig, pin_memory: bool, salt: int) -> dict:
    kwargs: dict[str, Any] = {
        "num_workers": cfg.num_workers,
        "pin_memory": pin_memory,
        # Worker seeds come from this generator, not from the global RNG, so iterating never moves it.
        "generator": torch.Generator().manual_seed(_mix_seed(cfg.seed, salt)),
    }
    if cfg.num_workers > 0:
        kwargs["persistent_workers"] = False  # workers must see each epoch's SeededTransform.epoch
    return kwargs


# ---- checkpoints ---------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where training stands: the optimizer step, the next batch, the best evaluation so far."""

    step: int = 0
    epoch: int = 0  # the epoch the next batch belongs to
    batch: int = 0  # batches of that epoch already done
    best_metric: float | None = None
    best_name: str | None = None
    best_split: str | None = None
    sums: dict[str, float] = field(default_factory=dict)  # this process's running loss sums in the epoch
    count: int = 0  # micro-batches in those sums

    @property
    def name(self) -> str:
        return f"{CKPT_PREFIX}{self.step:08d}-{self.epoch:04d}-{self.batch:06d}"

    @property
    def epochs_done(self) -> int:
        return self.epoch


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(
            f"checkpoint file {path} is unreadable ({e.__class__.__name__}); resume an earlier {what}"
        ) from None


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Cloned so that tensors sharing storage (tied weights) can go into safetensors.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _discard(path: Path) -> None:
    """Remove a folder so that no half-deleted copy keeps a checkpoint name (rename first, then delete)."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class Trainer:
    """One fine-tune's objects and the loop over them. Built by :func:`run`; not meant to be subclassed."""

    def __init__(self, cfg: FinetuneConfig, accelerator: Any, run_dir: Path) -> None:
        self.cfg = cfg
        self.acc = accelerator
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / CHECKPOINTS
        self.state = TrainState()
        self.main = accelerator.is_main_process
        self.console = _console() if self.main else None
        self.stop_requested = False

    # -- setup --

    def setup(self) -> None:
        """Load data and backbone, build model, loss, loaders, optimizer and schedule, and prepare them."""
        from accelerate.utils import set_seed

        from mr2ft.backbones import load_backbone
        from mr2ft.data import ClassBalancedBatchSampler, TransformedDataset, load_dataset
        from mr2ft.losses import WatchedLoss, build_loss

        cfg, acc = self.cfg, self.acc
        set_seed(cfg.seed)
        self.splits = splits = load_dataset(
            cfg.dataset,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            shots=cfg.shots,
            max_per_class=cfg.max_per_class,
            test_max_per_class=cfg.test_max_per_class,
            skip_bad_images=cfg.skip_bad_images,
        )
        self.num_classes = k = splits.num_classes
        global_batch = cfg.batch_size * acc.num_processes
        if len(splits.train) < global_batch:
            raise UserError(
                f"the training split has {len(splits.train)} images, fewer than one batch of {global_batch} "
                f"({cfg.batch_size} x {acc.num_processes} processes); lower --batch-size"
            )
        options = {
            "normalize": cfg.normalize,
            "pool": cfg.pool,
            "image_size": cfg.image_size,
            "drop_path_rate": cfg.drop_path or None,
        }
        self.bb = bb = load_backbone(
            cfg.backbone, cfg.model, cfg.weights, **{k_: v for k_, v in options.items() if v is not None}
        )
        model = Classifier(bb.model, bb.feature_dim, k)
        if cfg.head == "zeroshot":
            init_zeroshot_head(model, bb, splits.class_names)
        # The zero-shot end point of WiSE-FT: the loaded weights before any step (also on resume).
        self.zeroshot = _model_tensors(model) if cfg.wise_alpha is not None else None

        counts = np.bincount(np.asarray(splits.train.targets), minlength=k)
        self.loss_fn = build_loss(
            cfg.loss,
            k,
            bb.feature_dim,
            c_bar=cfg.c_bar,
            lambda_rep=cfg.lambda_rep,
            p=cfg.p,
            momentum=cfg.momentum,
            margin_mode=cfg.margin_mode,
            normalize_features=bool(bb.normalize),
            temperature_factor=cfg.temperature_factor,
            class_counts=torch.as_tensor(counts),
        ).to(acc.device)
        self.mixup = self._soft_targets(k)
        self.margins_applied = callable(getattr(self.loss_fn, "class_stats", None))
        if not self.margins_applied and self.mixup is None:
            # The report's spread column and the study's premise check read class statistics; a loss without
            # them gets MR2's, watched on the same features (mixed images have no class, so not with mixup).
            watch = build_loss(
                "mr2", k, bb.feature_dim, p=cfg.p, momentum=cfg.momentum, normalize_features=bool(bb.normalize)
            )
            self.loss_fn = WatchedLoss(self.loss_fn, watch).to(acc.device)

        pin = acc.device.type == "cuda"
        self.train_set = SeededTransform(
            splits.train, bb.preprocess.train_transform(randaugment=cfg.randaugment), cfg.seed
        )
        if cfg.samples_per_class:
            self.sampler = ClassBalancedBatchSampler(
                splits.train.targets, cfg.samples_per_class, cfg.batch_size, cfg.seed, drop_last=True
            )
            train_dl = DataLoader(self.train_set, batch_sampler=self.sampler, **_loader_kwargs(cfg, pin, 1))
        else:
            self.sampler = EpochShuffle(len(splits.train), cfg.seed)
            train_dl = DataLoader(
                self.train_set,
                batch_size=cfg.batch_size,
                sampler=self.sampler,
                drop_last=True,
                **_loader_kwargs(cfg, pin, 1),
            )
        eval_tf = bb.preprocess.eval_transform()
        has_val = splits.val is not None and len(splits.val) > 0
        self.eval_split = "val" if has_val else "test"
        test_dl = DataLoader(
            TransformedDataset(splits.test, eval_tf), batch_size=cfg.batch_size, **_loader_kwargs(cfg, pin, 2)
        )
        loaders = [train_dl, test_dl]
        if has_val:
            loaders.append(
                DataLoader(
                    TransformedDataset(splits.val, eval_tf), batch_size=cfg.batch_size, **_loader_kwargs(cfg, pin, 3)
                )
            )

        optimizer = build_optimizer(model, bb, cfg)
        self.trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        self.model, self.optimizer, *prepared = acc.prepare(model, optimizer, *loaders)
        self.train_dl, self.test_dl = prepared[0], prepared[1]
        self.eval_dl = prepared[2] if has_val else self.test_dl
        self.steps_per_epoch = math.ceil(len(self.train_dl) / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.warmup_steps is not None:
            self.warmup_steps = cfg.warmup_steps
        else:
            self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        # Our own scheduler, stepped once per optimizer step: accelerate's wrapper would step it once per
        # process, tying the schedule to the process count.
        self.scheduler = build_scheduler(self.optimizer, self.warmup_steps, self.total_steps)
        self.images_per_step = cfg.batch_size * acc.num_processes * cfg.grad_accum
        self.step_seconds: list[float] = []  # of this call's optimizer steps (see FinetuneResult)

    def _soft_targets(self, k: int) -> Any:
        cfg = self.cfg
        if cfg.mixup or cfg.cutmix:
            from timm.data import Mixup

            return Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=k
            )
        if cfg.label_smoothing:
            from timm.data.mixup import mixup_target

            return lambda x, y: (x, mixup_target(y, k, 1.0, cfg.label_smoothing))
        return None

    def describe(self) -> dict:
        """The effective values of this run, logged and written into config.yaml."""
        cfg, acc, bb = self.cfg, self.acc, self.bb
        return {
            "backbone_source": str(bb.source),
            "backbone_fingerprint": str(bb.fingerprint),
            "dataset_fingerprint": str(self.splits.fingerprint),
            "preprocessing": bb.preprocess.to_dict(),
            "num_processes": acc.num_processes,
            "effective_batch_size": cfg.batch_size * acc.num_processes * cfg.grad_accum,
            "peak_lr": cfg.lr,
            "lr_scales": sorted({round(g["lr_scale"], 6) for g in self.optimizer.param_groups}),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "trainable_params": self.trainable,
            "mixed_precision": acc.mixed_precision,
            "train_images": len(self.splits.train),
            "eval_split": self.eval_split,
        }

    # -- checkpoints --

    def save_checkpoint(self, metric: float | None = None) -> Path:
        """Write the full training state as ``checkpoints/<state.name>`` (atomically) and prune old ones."""
        acc, st = self.acc, self.state
        name = st.name
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".tmp-{name}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rank = acc.process_index
        _torch_save({"rng": _rng_state(), "sums": dict(st.sums), "count": st.count}, tmp / f"rank{rank}.pt")
        save_tensors(tmp / f"loss_rank{rank}.safetensors", self.loss_fn.state_dict())
        if self.main:
            save_tensors(tmp / "model.safetensors", _model_tensors(acc.unwrap_model(self.model)))
            _torch_save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            trainer_state = {
                "step": st.step,
                "epoch": st.epoch,
                "batch": st.batch,
                "best_metric": st.best_metric,
                "best_name": st.best_name,
                "best_split": st.best_split,
                "scheduler": self.scheduler.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "num_processes": acc.num_processes,
                "backbone_fingerprint": str(self.bb.fingerprint),
                "dataset_fingerprint": str(self.splits.fingerprint),
            }
            _torch_save(trainer_state, tmp / "state.pt")
            write_json(tmp / "meta.json", {"step": st.step, "epoch": st.epoch, "batch": st.batch, "metric": metric})
        acc.wait_for_everyone()
        if self.main:
            if final.exists():
                _discard(final)
            os.replace(tmp, final)
            self._prune(keep={name, st.best_name})
        acc.wait_for_everyone()
        self.last_saved = name
        return final

    def _prune(self, keep: set[str | None]) -> None:
        for d in _checkpoints(self.ckpt_dir):
            if d.name not in keep:
                _discard(d)

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore model, optimizer, schedule, scaler, loss state, RNGs and position from ``ckpt``."""
        acc = self.acc
        state = _torch_load(ckpt / "state.pt", "checkpoint")
        if state["num_processes"] != acc.num_processes:
            raise UserError(
                f"{ckpt} was written by {state['num_processes']} processes and this run has {acc.num_processes}; "
                "resume with the same number of processes (the data order and statistics depend on it)"
            )
        for what, saved, now in (
            ("backbone weights", state["backbone_fingerprint"], str(self.bb.fingerprint)),
            ("dataset", state["dataset_fingerprint"], str(self.splits.fingerprint)),
        ):
            if saved != now:
                raise UserError(
                    f"cannot resume {ckpt}: the {what} changed since it was written; resume with the same "
                    "files or start a new run with another --out"
                )
        try:
            weights = load_tensors(ckpt / "model.safetensors")
        except Exception as e:
            raise UserError(
                f"{ckpt}/model.safetensors is unreadable ({e.__class__.__name__}); resume an earlier checkpoint"
            ) from None
        acc.unwrap_model(self.model).load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(_torch_load(ckpt / "optimizer.pt", "checkpoint"))
        self.scheduler.load_state_dict(state["scheduler"])
        if acc.scaler is not None and state["scaler"] is not None:
            acc.scaler.load_state_dict(state["scaler"])
        rank_file = ckpt / f"rank{acc.process_index}.pt"
        loss_file = ckpt / f"loss_rank{acc.process_index}.safetensors"
        loss_state = load_tensors(loss_file)
        expected = set(self.loss_fn.state_dict())
        if set(loss_state) != expected:
            missing, unexpected = sorted(expected - set(loss_state)), sorted(set(loss_state) - expected)
            raise UserError(
                f"{loss_file} does not hold the loss state this run keeps (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}): another version of mr2ft wrote it; start a new run with another --out"
            )
        self.loss_fn.load_state_dict({k: v.to(acc.device) for k, v in loss_state.items()}, strict=True)
        per_rank = _torch_load(rank_file, "checkpoint")
        st = self.state
        st.step, st.epoch, st.batch = state["step"], state["epoch"], state["batch"]
        st.best_metric, st.best_name, st.best_split = state["best_metric"], state["best_name"], state["best_split"]
        st.sums, st.count = dict(per_rank["sums"]), per_rank["count"]
        self.last_saved = ckpt.name
        self.rng_to_restore = per_rank["rng"]
        if self.main:
            self._forget_after(ckpt)
        acc.wait_for_everyone()

    def _forget_after(self, ckpt: Path) -> None:
        """Resuming an older checkpoint abandons the later ones and the metrics they logged; a kill may also
        have left a temporary or half-deleted folder behind."""
        for d in self.ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(d, ignore_errors=True)
        for d in self.ckpt_dir.glob(".trash-*"):
            shutil.rmtree(d, ignore_errors=True)
        for d in _checkpoints(self.ckpt_dir):
            if d.name > ckpt.name:
                _discard(d)
        best = self.ckpt_dir / BEST
        if self.state.best_name and (self.ckpt_dir / self.state.best_name).is_dir():
            write_json(best, self._best_record())
        elif best.exists():
            best.unlink()
        metrics = self.run_dir / runs.METRICS
        kept = [r for r in read_jsonl(metrics) if not r.get("final") and r.get("epoch", 0) <= self.state.epochs_done]
        write_text(metrics, "".join(_jsonl_line(r) for r in kept))

    def _best_record(self) -> dict:
        st = self.state
        return {"name": st.best_name, "metric": st.best_metric, "split": st.best_split}

    # -- the loop --

    def train(self) -> tuple[bool, int, float]:
        """Run from the current position to the end (or ``max_steps``).

        Returns:
            (stopped early by max_steps, images consumed, seconds spent in training steps).
        """
        cfg, acc, st = self.cfg, self.acc, self.state
        images, seconds = 0, 0.0
        if self._reached_max_steps():
            return True, images, seconds
        for epoch in range(st.epoch, cfg.epochs):
            self.train_set.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            self.train_dl.set_epoch(epoch)
            loader = acc.skip_first_batches(self.train_dl, st.batch) if st.batch else self.train_dl
            self.model.train()
            self.loss_fn.train()
            sums = {k: torch.tensor(v, device=acc.device) for k, v in st.sums.items()}
            tick = last = time.perf_counter()
            for x, y in loader:
                logged = self._micro_step(x, y)
                for key, value in logged.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                st.count += 1
                st.batch += 1
                images += x.shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                st.step += 1
                now = time.perf_counter()
                self.step_seconds.append(now - last)
                last = now
                if self.main and st.step % LOG_EVERY == 0:
                    recent = statistics.median(self.step_seconds[-LOG_EVERY:])
                    self._log(
                        f"step {st.step}/{self.total_steps}  loss {logged['loss'].item():.4f}  lr {self._lr():.3g}  "
                        f"{self.images_per_step / recent:.1f} images/s"
                    )
                due = cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0
                if due or self.stop_requested or self._reached_max_steps():
                    seconds += time.perf_counter() - tick
                    st.sums = {k: float(v) for k, v in sums.items()}
                    path = self.save_checkpoint()
                    tick = last = time.perf_counter()
                    if self.stop_requested:
                        self._log(
                            f"stopped at step {st.step}; checkpoint {path}; continue with --resume {self.run_dir}"
                        )
                        raise KeyboardInterrupt
                    if self._reached_max_steps():
                        return True, images, seconds
            seconds += time.perf_counter() - tick
            train = {k: _mean_over_processes(acc, float(v), st.count) for k, v in sorted(sums.items())}
            st.epoch, st.batch, st.sums, st.count = epoch + 1, 0, {}, 0
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                self._end_of_epoch(epoch, train)
        return False, images, seconds

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        acc, cfg = self.acc, self.cfg
        with acc.accumulate(self.model):
            if self.mixup is not None:
                x, soft = self.mixup(x, y)
            logits, features = self.model(x)
            if self.mixup is not None:
                loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                out = {"loss": loss}
            else:
                out = self.loss_fn(logits, features, y)
            self._check_finite(out["loss"])
            acc.backward(out["loss"])
            if acc.sync_gradients and cfg.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if acc.sync_gradients and not self.optimizer.step_was_skipped:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss before it reaches the weights; all processes agree (one small all-reduce)."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_tensor(float(self.stop_requested))])
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(flags.float(), reduction="sum")
        bad, stop = flags.tolist()
        self.stop_requested = self.stop_requested or stop > 0  # a signal may have arrived meanwhile
        if bad:
            st = self.state
            kept = getattr(self, "last_saved", None)
            where = (
                f"the last good checkpoint {self.ckpt_dir / kept} is kept" if kept else "no checkpoint was written yet"
            )
            raise UserError(
                f"the loss became NaN/inf at step {st.step + 1} (epoch {st.epoch + 1}, batch {st.batch + 1}); "
                f"{where}; lower --lr or set --grad-clip and run again"
            )

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _end_of_epoch(self, epoch: int, train: dict[str, float]) -> None:
        """Evaluate, log a metrics.jsonl record, checkpoint (and mark it best when it is)."""
        from mr2ft.metrics import headline_figures, summarize

        st, acc = self.state, self.acc
        targets, topk = evaluate(self.model, self.eval_dl, acc, self.num_classes)
        self.last_eval = (st.step, self.eval_split, targets, topk)
        summary = summarize(topk[:, 0], targets, self.num_classes, topk=topk)
        metric = summary["top1"]
        improved = st.best_metric is None or metric > st.best_metric
        if improved:
            st.best_metric, st.best_name, st.best_split = metric, st.name, self.eval_split
        if self.main:
            record = {
                "epoch": epoch + 1,
                "step": st.step,
                "lr": self._lr(),
                **{f"train_{k}": v for k, v in train.items()},
                "split": self.eval_split,
                **headline_figures(summary),
                "top5": summary["top5"],
            }
            append_jsonl(self.run_dir / runs.METRICS, record)
            extra = "  (best)" if improved else ""
            hard = summary["groups"].get("hard", {}).get("accuracy", float("nan"))
            loss = train.get("loss", float("nan"))
            self._log(
                f"epoch {epoch + 1}/{self.cfg.epochs}  step {st.step}  train loss {loss:.4f}  "
                f"{self.eval_split} top-1 {metric:.2f}  hard {hard:.2f}{extra}"
            )
        self.save_checkpoint(metric)
        if improved and self.main:
            write_json(self.ckpt_dir / BEST, {**self._best_record(), "epoch": epoch + 1, "step": st.step})
        acc.wait_for_everyone()

    def finish(self, stopped_early: bool) -> dict:
        """Checkpoint the last state, apply WiSE-FT if asked, evaluate on test and write the run's results."""
        from mr2ft.metrics import summarize
        from mr2ft.report import write_report

        cfg, acc, st = self.cfg, self.acc, self.state
        if getattr(self, "last_saved", None) != st.name:
            self.save_checkpoint()
        finetuned = None
        if cfg.wise_alpha is not None:
            targets, topk = evaluate(self.model, self.test_dl, acc, self.num_classes)
            finetuned = summarize(topk[:, 0], targets, self.num_classes, topk=topk)["top1"]
            apply_wise(acc.unwrap_model(self.model), self.zeroshot, cfg.wise_alpha)
        last = getattr(self, "last_eval", None)
        if cfg.wise_alpha is None and last is not None and last[:2] == (st.step, "test"):
            targets, topk = last[2], last[3]  # the end-of-epoch evaluation of these very weights
        else:
            targets, topk = evaluate(self.model, self.test_dl, acc, self.num_classes)
        summary = summarize(topk[:, 0], targets, self.num_classes, topk=topk)
        if self.main:
            runs.save_predictions(self.run_dir, targets, topk, self.num_classes)
            class_stats = getattr(self.loss_fn, "class_stats", None)
            if callable(class_stats):
                runs.save_class_stats(self.run_dir, class_stats())
            if cfg.wise_alpha is not None:
                save_tensors(self.run_dir / "model_wise.safetensors", _model_tensors(acc.unwrap_model(self.model)))
            record = {"final": True, "epoch": st.epochs_done, "step": st.step, "split": "test", "top1": summary["top1"]}
            record.update({"stopped_early": stopped_early, "wise_alpha": cfg.wise_alpha, "finetuned_top1": finetuned})
            append_jsonl(self.run_dir / runs.METRICS, record)
            write_report(self.run_dir, cfg.baseline)
        acc.wait_for_everyone()
        return summary

    def _log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, soft_wrap=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranked top-k (k = min(5, K)) predictions and targets of a prepared loader, gathered from every process.

    ``gather_for_metrics`` drops the samples accelerate repeats to even out the last batch, so the counts per
    class are exact.
    """
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    all_targets, all_topk = [], []
    for x, y in loader:
        logits, _ = model(x)
        topk = logits.float().topk(k, dim=1).indices
        topk, y = accelerator.gather_for_metrics((topk, y))
        all_topk.append(topk.cpu())
        all_targets.append(y.cpu())
    model.train(was_training)
    if not all_targets:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(all_targets).long(), torch.cat(all_topk).long()


def apply_wise(model: nn.Module, zeroshot: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT: set every floating-point weight to ``(1 - alpha) * zero-shot + alpha * fine-tuned``, in place."""
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if value.is_floating_point():
                value.copy_(torch.lerp(zeroshot[key].to(value.device, value.dtype), value, alpha))


def _mean_over_processes(acc: Any, total: float, count: int) -> float:
    t = torch.tensor([total, float(count)], device=acc.device)
    if acc.num_processes > 1:
        t = acc.reduce(t, reduction="sum")
    return float(t[0] / t[1].clamp(min=1))


def _jsonl_line(record: dict) -> str:
    return json.dumps(record) + "\n"


def _console() -> Any:
    from rich.console import Console

    return Console()


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """Ctrl-C or SIGTERM: finish the current step, checkpoint, exit. A second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _release_accelerate_state() -> None:
    # Accelerate keeps its settings in process-wide singletons; reset them (not the process group) so that a
    # second run in the same Python process may pick another precision or accumulation.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# ---- entry point ---------------------------------------------------------------------------------------------------


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune a backbone end to end and write the run folder (see :mod:`mr2ft.runs`).

    Works the same in one process and under ``accelerate launch``. With ``cfg.resume`` (a run folder or one of
    its checkpoints) it continues that run where it stopped; the run folder is the one holding the checkpoint.

    Raises:
        UserError: bad settings, data or weights; an incompatible resume; a NaN/inf loss (naming the step).
        KeyboardInterrupt: Ctrl-C / SIGTERM, after a checkpoint was written.
    """
    from accelerate import Accelerator

    validate(cfg)
    ckpt = None
    if cfg.resume:
        run_dir, ckpt = find_checkpoint(cfg.resume)
        check_resume_compatible(cfg, run_dir)
    else:
        run_dir = Path(cfg.out) if cfg.out else runs.default_run_dir(cfg.backbone, cfg.dataset, cfg.loss)
        runs.check_run_dir(run_dir, overwrite=cfg.overwrite)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # fewer page faults per step (see mr2ft.perf)
    try:
        accelerator.wait_for_everyone()  # every process checked the folder before the first one creates it
        trainer = Trainer(cfg, accelerator, run_dir)
        trainer.setup()
        info = trainer.describe()
        folder = (
            runs.run_folder(run_dir, overwrite=cfg.overwrite, resume=ckpt is not None)
            if accelerator.is_main_process
            else contextlib.nullcontext(run_dir)
        )
        with folder:
            accelerator.wait_for_everyone()
            if ckpt is None:
                if trainer.main:
                    dump_config(cfg, run_dir / runs.CONFIG, "finetune", extra=info)
                    runs.save_classes(
                        run_dir,
                        trainer.splits.class_names,
                        dataset=trainer.splits.name,
                        backbone=f"{trainer.bb.family}:{trainer.bb.name}",
                        loss=cfg.loss,
                        mode="finetune",
                        margins_applied=trainer.margins_applied,
                        skipped_images=len(getattr(trainer.splits, "skipped", []) or []),
                    )
                from accelerate.utils import set_seed

                set_seed(cfg.seed, device_specific=True)
            else:
                trainer.load_checkpoint(ckpt)
            if trainer.main:
                _print_start(trainer, info, ckpt)
            if ckpt is not None:
                _set_rng_state(trainer.rng_to_restore)  # last: nothing may draw between this and the loop
            with _stop_on_signals(trainer):
                stopped_early, images, seconds = trainer.train()
            summary = trainer.finish(stopped_early)
        result = FinetuneResult(
            run_dir,
            summary,
            trainer.state.step,
            stopped_early,
            images,
            seconds,
            images_per_step=trainer.images_per_step,
            step_seconds=trainer.step_seconds,
        )
        if trainer.main:
            _print_summary(trainer, result)
        return result
    finally:
        _release_accelerate_state()


def _print_start(trainer: Trainer, info: dict, ckpt: Path | None) -> None:
    cfg = trainer.cfg
    if ckpt is not None:
        st = trainer.state
        trainer._log(f"resuming {ckpt} at step {st.step} (epoch {st.epoch + 1}, batch {st.batch})")
        if cfg.out and Path(cfg.out).resolve() != trainer.run_dir.resolve():
            trainer._log(f"note: --out {cfg.out} is ignored; a resumed run writes into {trainer.run_dir}")
    trainer._log(
        f"finetune {trainer.bb.family} {trainer.bb.name} (weights: {info['backbone_source']}) on "
        f"{trainer.splits.name}: {info['train_images']} train images, "
        f"{trainer.num_classes} classes, loss {cfg.loss}, {info['trainable_params']:,} trainable parameters"
    )
    trainer._log(
        f"effective batch {info['effective_batch_size']} ({cfg.batch_size} x {info['num_processes']} processes x "
        f"{cfg.grad_accum} accumulation), peak lr {cfg.lr:g} "
        f"(group scales {info['lr_scales'][0]:g}-{info['lr_scales'][-1]:g}), "
        f"{info['total_steps']} steps ({info['warmup_steps']} warm-up), precision {info['mixed_precision']}"
    )


def _print_summary(trainer: Trainer, result: FinetuneResult) -> None:
    from rich.table import Table

    s = result.summary
    table = Table(title=f"test split, {s['num_images']} images, {s['num_classes']} classes", show_header=True)
    for col in ("top-1", "balanced", "easy", "medium", "hard", "worst class"):
        table.add_column(col, justify="right")
    groups = s["groups"]
    values = [s["top1"], s["balanced_accuracy"]]
    values += [groups.get(g, {}).get("accuracy", float("nan")) for g in ("easy", "medium", "hard")]
    values.append(s["worst_class"]["accuracy"])
    table.add_row(*(f"{v:.2f}" for v in values))
    trainer.console.print(table)
    note = " (stopped by --max-steps)" if result.stopped_early else ""
    speed = ""
    if result.step_seconds:
        speed = f", {result.images_per_second:.1f} images/s (median of {len(result.step_seconds)} steps)"
    trainer._log(f"{result.step} steps{note}{speed}; run folder {result.run_dir}")


__all__ = [
    "Classifier",
    "EpochShuffle",
    "FinetuneResult",
    "RESUMABLE_CHANGES",
    "SeededTransform",
    "Trainer",
    "apply_wise",
    "build_optimizer",
    "build_scheduler",
    "check_resume_compatible",
    "evaluate",
    "find_checkpoint",
    "init_zeroshot_head",
    "lr_factor",
    "resume_settings",
    "run",
    "validate",
]
