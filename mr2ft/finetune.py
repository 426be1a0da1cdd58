"""End-to-end fine-tuning on Accelerate: the job around the training loop.

Owns: the settings check (:func:`validate`), the run folder of a new or resumed run (a finished run is left as it
is), the console lines, and :func:`run`, which builds a :class:`mr2ft.trainer.Trainer` and runs it. The loop is
:mod:`mr2ft.trainer`, the checkpoint format and resume policy :mod:`mr2ft.checkpoints`, the schedule
:mod:`mr2ft.schedule`, the model :mod:`mr2ft.classifier`.

Model choice is on validation only. With a validation split (``--val-fraction``, or the dataset's own) the final
test figures come from the best epoch on validation (``--early-stop N`` ends training after N epochs without a
validation improvement); without one, from the last weights, and no checkpoint is called best. Test accuracy never
selects anything.

Determinism and exact resume. Augmentation is a pure function of (seed, epoch, sample index)
(:class:`SeededTransform`), the batch order a pure function of (seed, epoch) (:class:`EpochShuffle`, or the
class-balanced sampler of :mod:`mr2ft.data`), and every DataLoader draws its worker seeds from its own generator.
The global RNGs therefore feed only the model (drop-path) and mixup, and their states go into each checkpoint,
with the optimizer, scheduler, scaler and loss states and the data position. A resumed run skips the batches
already done and ends bit-identical to an uninterrupted one on CPU, whatever the number of DataLoader workers.

Sharding. Under an ``accelerate config`` with FSDP or DeepSpeed ZeRO-1/2 the model and optimizer are sharded over
the processes: each checkpoint saves them through ``accelerator.save_state`` and gathers the full weights for eval and
export (:mod:`mr2ft.sharding`). DeepSpeed's checkpoint files are read first with only tensors, plain values and four
plain DeepSpeed classes allowed; DeepSpeed clips gradients as ``--grad-clip`` says, and the representation margin's
gradient share is not measured under it. ZeRO-3 and Megatron-LM are refused, and so are ``--model-ema`` and
``--wise-alpha`` under FSDP or DeepSpeed (they need the whole weights on every process).
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mr2ft import checkpoints, runs
from mr2ft.checkpoints import RESUMABLE_CHANGES, check_resume_compatible, find_checkpoint, resume_settings
from mr2ft.classifier import Classifier, apply_wise, evaluate, init_zeroshot_head
from mr2ft.config import FinetuneConfig
from mr2ft.data.sampling import EpochShuffle, SeededTransform  # re-exported: they were defined here
from mr2ft.errors import UserError
from mr2ft.optim import check_optimizer
from mr2ft.perf import keep_freed_memory
from mr2ft.schedule import build_scheduler, lr_factor
from mr2ft.sharding import refuse_unsupported
from mr2ft.tracking import PROJECT, parse_trackers, tracker_config
from mr2ft.trainer import Trainer, build_optimizer

# The losses that may train on soft targets (mixup, cutmix, label smoothing); the others, MR2 above all, are
# defined on hard labels, so the combination is refused rather than silently mixed.
SOFT_TARGET_LOSSES = ("ce",)


@dataclass
class FinetuneResult:
    """What a fine-tune returns to Python callers (the CLI prints it; the benchmark reads the timings).

    Attributes:
        run_dir: the run folder.
        summary: :func:`mr2ft.metrics.summarize` of the reported model on the test split (for a run that was
            already complete, its final ``metrics.jsonl`` record).
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
    # Every number is range-checked (NaN, inf, negative...) when the config is made (mr2ft.config.check_numbers).
    if cfg.lr >= torch.finfo(torch.float32).max:
        raise UserError(f"--lr {cfg.lr:g} overflows the float32 weights; pass a learning rate below 1 (e.g. 1e-4)")
    check_optimizer(cfg.optimizer)
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
    if cfg.head == "zeroshot" and cfg.loss == "ldam":
        raise UserError("LDAM trains a cosine head, which CLIP's zero-shot head cannot start: drop --head zeroshot")
    if (cfg.templates or cfg.class_names) and cfg.head != "zeroshot":
        raise UserError("--templates and --class-names shape CLIP's zero-shot head: they need --head zeroshot")
    if cfg.min_lr > cfg.lr:
        raise UserError(f"--min-lr {cfg.min_lr:g} is above the peak --lr {cfg.lr:g}; pass a floor below the peak")
    parse_trackers(cfg.report_to)
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it; pass only one of them")
    if not cfg.dataset:
        raise UserError("no dataset given; pass --dataset PATH_OR_NAME")


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
    A run that already finished from that checkpoint is left exactly as it is (one line says so).

    Raises:
        UserError: bad settings, data or weights; an incompatible or damaged resume; a NaN/inf loss or weights.
        KeyboardInterrupt: Ctrl-C / SIGTERM, after a checkpoint was written.
    """
    from accelerate import Accelerator

    validate(cfg)
    ckpt = None
    if cfg.resume:
        run_dir, ckpt = find_checkpoint(cfg.resume)
        check_resume_compatible(cfg, run_dir)
        final = checkpoints.completed(run_dir, ckpt, cfg.max_steps)
        if final is not None:
            return _already_complete(run_dir, final)
    else:
        run_dir = Path(cfg.out) if cfg.out else runs.default_run_dir(cfg.backbone, cfg.dataset, cfg.loss)
        runs.check_run_dir(run_dir, overwrite=cfg.overwrite)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=parse_trackers(cfg.report_to) or None,
        project_dir=str(run_dir),
    )
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # fewer page faults per step (see mr2ft.perf)
    try:
        refuse_unsupported(accelerator, model_ema=bool(cfg.model_ema), wise=cfg.wise_alpha is not None)
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
            accelerator.init_trackers(PROJECT, config=tracker_config(cfg))  # before _start restores the RNGs
            _start(trainer, info, ckpt)
            try:
                with _stop_on_signals(trainer):
                    stopped_early, images, seconds = trainer.train()
                summary = trainer.finish(stopped_early)
            finally:
                accelerator.end_training()
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


def _start(trainer: Trainer, info: dict, ckpt: Path | None) -> None:
    """A new run writes its header and seeds the RNGs; a resumed one restores its checkpoint (RNGs last)."""
    cfg = trainer.cfg
    if ckpt is None:
        if trainer.main:
            runs.write_header(
                trainer.run_dir,
                cfg,
                "finetune",
                trainer.splits,
                trainer.bb,
                extra=info,
                margins_applied=trainer.margins_applied,
            )
        from accelerate.utils import set_seed

        set_seed(cfg.seed, device_specific=True)
    else:
        trainer.load_checkpoint(ckpt)
    if trainer.main:
        _print_start(trainer, info, ckpt)
    if ckpt is not None:
        checkpoints.set_rng_state(trainer.rng_to_restore)  # last: nothing may draw between this and the loop


def _already_complete(run_dir: Path, final: dict) -> FinetuneResult:
    from accelerate import PartialState

    if PartialState().is_main_process:
        from rich.console import Console

        which = "best on validation" if final.get("model") == "best_val" else "last"
        Console().print(
            f"{run_dir} is already complete (step {final['step']}, test top-1 {final['top1']:.2f} from the "
            f"{which} weights of epoch {final.get('model_epoch', final.get('epoch'))}); nothing to resume, nothing "
            "changed. Start another run with a new --out, or replace this one with --overwrite.",
            highlight=False,
            soft_wrap=True,
        )
    return FinetuneResult(run_dir, final, final["step"], bool(final.get("stopped_early")))


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
        + (f", sharded by {info['sharding']}" if info["sharding"] else "")
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
    chosen, epoch = trainer.final_model
    which = f"best on validation, epoch {epoch}" if chosen == "best_val" else f"last, epoch {epoch}"
    note = " (stopped by --max-steps)" if result.stopped_early else ""
    if trainer.state.early_stopped:
        note = f" (early stop on validation after epoch {trainer.state.epochs_done})"
    speed = ""
    if result.step_seconds:
        speed = f", {result.images_per_second:.1f} images/s (median of {len(result.step_seconds)} steps)"
    trainer._log(
        f"test figures from the {which} weights; {result.step} steps{note}{speed}; run folder {result.run_dir}"
    )


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
