"""The fine-tune's training loop: :class:`Trainer` holds one run's objects (model, loss, loaders, optimizer
(:mod:`mr2ft.optim`), schedule, state) and runs them, step by step, with evaluation and checkpoints.

Per micro-batch: forward (accelerate's autocast) -> loss (MR2 keeps its class statistics in float32 and gathers
the global batch itself, so it is called on every process with the local batch; under gradient accumulation they
step once per optimizer step, from all of its micro-batches) -> a finite check agreed by all processes -> backward
-> at each optimizer step: clip, step, warm-up/cosine schedule (:mod:`mr2ft.schedule`). The first micro-batch of
each epoch also measures the representation margin's gradient share (:func:`mr2ft.classifier.rep_grad_share`).
Every ``eval_every`` epochs: evaluation with exact per-class counts, a ``metrics.jsonl`` record and a checkpoint
(:mod:`mr2ft.checkpoints`); only a validation split marks a best epoch. At the end: the reported model (best on
validation, else the last), WiSE-FT if asked, the test predictions, class statistics and the report.

Switches (issue 16): ``--grad-checkpointing``, ``--channels-last`` and ``--compile`` (in place, so checkpoints keep
the plain model's keys) are applied to the model before Accelerate prepares it; ``--model-ema`` keeps a
:class:`~mr2ft.classifier.WeightEma` stepped after each optimizer step, evaluated beside the raw weights (``"ema"`` in
each ``metrics.jsonl`` record) and saved in every checkpoint (``ema.safetensors``), so resume restores it exactly.
Trackers (``--report-to``) get the epoch's training means, lr and images/s, and each evaluation's figures
(:func:`mr2ft.tracking.eval_scalars`); the live progress is :class:`mr2ft.tracking.StepProgress`.

The job around it (settings, run folder, resume, console) is :mod:`mr2ft.finetune`.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mr2ft import checkpoints, runs
from mr2ft import sharding as shard
from mr2ft.checkpoints import BEST, CHECKPOINTS, TrainState, model_tensors
from mr2ft.classifier import (
    Classifier,
    WeightEma,
    apply_wise,
    enable_grad_checkpointing,
    evaluate,
    init_zeroshot_head,
    rep_grad_share,
)
from mr2ft.classnames import prompt_names, read_templates
from mr2ft.config import FinetuneConfig, replace, resolve_lr
from mr2ft.data.sampling import EpochShuffle, SeededTransform, _mix_seed
from mr2ft.errors import UserError
from mr2ft.io import append_jsonl, save_tensors, write_json
from mr2ft.optim import build_optimizer
from mr2ft.schedule import build_scheduler
from mr2ft.tracking import StepProgress, Throughput, eval_scalars

LOG_EVERY = 100  # optimizer steps between progress lines
EMA = "ema.safetensors"  # the weight EMA in a checkpoint (--model-ema)
# The config fields that set the loss (each loss takes those it uses).
LOSS_SETTINGS = ("c_bar", "lambda_rep", "p", "momentum", "margin_mode", "temperature_factor")


# ---- the trainer ---------------------------------------------------------------------------------------------------


class Trainer:
    """One fine-tune's objects and the loop over them. Built by :func:`run`; not meant to be subclassed."""

    def __init__(self, cfg: FinetuneConfig, accelerator: Any, run_dir: Path) -> None:
        if cfg.blr is not None:  # MAE's rule, now that the number of processes is known; the run's config records it
            effective = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
            cfg = replace(cfg, lr=resolve_lr(cfg.lr, cfg.blr, effective))
        self.cfg = cfg
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / CHECKPOINTS
        self.state = TrainState()
        self.main = accelerator.is_main_process
        self.console = _console() if self.main else None
        self.stop_requested = False
        self.last_saved: str | None = None
        self.last_eval: tuple | None = None

    # -- setup --

    def setup(self) -> None:
        """Load data and backbone, build model, loss, loaders, optimizer and schedule, and prepare them."""
        from accelerate.utils import set_seed

        from mr2ft.backbones import load_backbone
        from mr2ft.data import load_dataset_for

        cfg, accelerator = self.cfg, self.accelerator
        set_seed(cfg.seed)
        self.splits = splits = load_dataset_for(cfg)
        self.num_classes = k = splits.num_classes
        global_batch = cfg.batch_size * accelerator.num_processes
        if len(splits.train) < global_batch:
            raise UserError(
                f"the training split has {len(splits.train)} images, fewer than one batch of {global_batch} "
                f"({cfg.batch_size} x {accelerator.num_processes} processes); lower --batch-size"
            )
        has_val = splits.val is not None and len(splits.val) > 0
        if cfg.early_stop is not None and not has_val:
            raise UserError(
                "--early-stop watches the validation split and this run has none; add --val-fraction (e.g. 0.1) "
                "or drop --early-stop"
            )
        self.eval_split = "val" if has_val else "test"
        options = {
            "normalize": cfg.normalize,
            "pool": cfg.pool,
            "image_size": cfg.image_size,
            "drop_path_rate": cfg.drop_path or None,
        }
        self.bb = bb = load_backbone(
            cfg.backbone, cfg.model, cfg.weights, **{k_: v for k_, v in options.items() if v is not None}
        )
        model = Classifier(bb.model, bb.feature_dim, k, cosine=cfg.loss == "ldam")  # LDAM-DRW's normalised head
        if cfg.head == "zeroshot":
            names = prompt_names(splits.class_names, cfg.class_names)
            init_zeroshot_head(model, bb, names, templates=read_templates(cfg.templates))
        # The zero-shot end point of WiSE-FT: the loaded weights before any step (also on resume).
        self.zeroshot = model_tensors(model) if cfg.wise_alpha is not None else None
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(bb.model, f"{bb.family} {bb.name}")
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.ema = WeightEma(model, cfg.model_ema) if cfg.model_ema else None
        if self.ema is not None:
            self.ema.module.to(accelerator.device)
        if cfg.compile:
            model.backbone.compile()  # in place: the state_dict keys stay those of the plain model
        self.loss_fn = self._build_loss()
        # Under accumulation the loss's class statistics step once per optimizer step (see MR2Loss.accumulate).
        self.loss_step_end = getattr(self.loss_fn, "accumulate", lambda _step_end: None)
        loaders = self._loaders(has_val)
        optimizer = build_optimizer(model, bb, cfg)
        self.trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        shard.fit_deepspeed_config(accelerator, cfg.grad_clip)  # DeepSpeed clips itself: as --grad-clip says
        # DeepSpeed's hooks fire on any autograd pass through the outputs: no share measurement there (null).
        self.measure_share = not shard.under_deepspeed(accelerator)
        self.model, self.optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders)
        shard.keep_full_weights_ours(accelerator)  # model.safetensors holds them; save_state the rest (or the shards)
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
        self.scheduler = build_scheduler(self.optimizer, self.warmup_steps, self.total_steps, cfg.min_lr / cfg.lr)
        self.images_per_step = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
        self.step_seconds: list[float] = []  # of this call's optimizer steps (see FinetuneResult)
        self.progress = StepProgress(self.console, self.total_steps, LOG_EVERY)
        self.throughput = Throughput()

    def _build_loss(self) -> Any:
        from mr2ft.losses import WatchedLoss, build_loss, keeps_class_statistics

        cfg, bb, k = self.cfg, self.bb, self.num_classes
        counts = np.bincount(np.asarray(self.splits.train.targets), minlength=k)
        settings = {name: getattr(cfg, name) for name in LOSS_SETTINGS}
        normalize = bool(bb.normalize)
        loss_fn = build_loss(
            cfg.loss, k, bb.feature_dim, normalize_features=normalize, class_counts=torch.as_tensor(counts), **settings
        )
        self.mixup = self._soft_targets(k)
        self.margins_applied = keeps_class_statistics(cfg.loss)
        if not self.margins_applied and self.mixup is None:
            # The report's spread column and the study's premise check read class statistics; a loss without
            # them gets MR2's, watched on the same features (mixed images have no class, so not with mixup).
            watch = build_loss("mr2", k, bb.feature_dim, p=cfg.p, momentum=cfg.momentum, normalize_features=normalize)
            loss_fn = WatchedLoss(loss_fn, watch)
        return loss_fn.to(self.accelerator.device)

    def _loaders(self, has_val: bool) -> list[DataLoader]:
        """The training loader (seeded augmentation and order), the test loader and, with one, the val loader."""
        from mr2ft.data import ClassBalancedBatchSampler, TransformedDataset

        cfg, splits, bb = self.cfg, self.splits, self.bb
        pin = self.accelerator.device.type == "cuda"
        self.train_set = SeededTransform(
            splits.train, bb.preprocess.train_transform(randaugment=cfg.randaugment), cfg.seed
        )
        if cfg.samples_per_class:
            self.sampler = ClassBalancedBatchSampler(
                splits.train.targets, cfg.samples_per_class, cfg.batch_size, cfg.seed, drop_last=True
            )
            batching: dict[str, Any] = {"batch_sampler": self.sampler}
        else:
            self.sampler = EpochShuffle(len(splits.train), cfg.seed)
            batching = {"batch_size": cfg.batch_size, "sampler": self.sampler, "drop_last": True}
        loaders = [DataLoader(self.train_set, **batching, **_loader_kwargs(cfg, pin, 1))]
        eval_tf = bb.preprocess.eval_transform()
        for salt, split in ((2, splits.test), (3, splits.val if has_val else None)):
            if split is not None:
                loaders.append(
                    DataLoader(
                        TransformedDataset(split, eval_tf), batch_size=cfg.batch_size, **_loader_kwargs(cfg, pin, salt)
                    )
                )
        return loaders

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
        cfg, accelerator, bb = self.cfg, self.accelerator, self.bb
        return {
            "backbone_source": str(bb.source),
            "backbone_fingerprint": str(bb.fingerprint),
            "dataset_fingerprint": str(self.splits.fingerprint),
            "test_fingerprint": self.splits.split_fingerprint("test"),  # which test images: comparable runs share it
            "preprocessing": bb.preprocess.to_dict(),
            "num_processes": accelerator.num_processes,
            "sharding": shard.sharding(accelerator),  # None, or e.g. "FSDP2 FULL_STATE_DICT"
            "effective_batch_size": cfg.batch_size * accelerator.num_processes * cfg.grad_accum,
            "peak_lr": cfg.lr,
            "lr_scales": sorted({round(g["lr_scale"], 6) for g in self.optimizer.param_groups}),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "trainable_params": self.trainable,
            "mixed_precision": accelerator.mixed_precision,
            "train_images": len(self.splits.train),
            "eval_split": self.eval_split,
            "classifier": "cosine (normalised features and weights, no bias; LDAM's s scales cosine logits)"
            if cfg.loss == "ldam"
            else "linear",
        }

    # -- checkpoints (the format and policy live in mr2ft.checkpoints, FSDP's part in mr2ft.sharding) --

    def save_checkpoint(self, metric: float | None = None) -> Path:
        """Write the full training state as ``checkpoints/<state.name>`` and prune old ones (every process).

        Raises:
            UserError: the weights are no longer finite (a NaN/inf learning step): the last good checkpoint stays.
        """
        accelerator, st = self.accelerator, self.state
        if not shard.weights_finite(accelerator, self.model):
            raise UserError(f"the weights became NaN/inf by step {st.step}; {self._kept()}; lower --lr and run again")
        rank = accelerator.process_index
        per_rank = {"rng": checkpoints.rng_state(), "sums": dict(st.sums), "count": st.count}
        per_rank["grad_share"] = st.grad_share
        rank_files = {f"rank{rank}.pt": per_rank, f"loss_rank{rank}.safetensors": self.loss_fn.state_dict()}
        path = checkpoints.save(
            self.ckpt_dir, st.name, accelerator, rank_files, lambda: self._shared_files(metric), {st.best_name}
        )
        self.last_saved = st.name
        return path

    def _shared_files(self, metric: float | None) -> dict[str, Any]:
        accelerator, st = self.accelerator, self.state
        weights = shard.full_weights(accelerator, self.model)  # gathered under FSDP: every process takes part
        if not self.main:
            return {}
        trainer_state = {
            **st.saved(),
            "scheduler": self.scheduler.state_dict(),
            "num_processes": accelerator.num_processes,
            "sharding": shard.sharding(accelerator),
            "backbone_fingerprint": str(self.bb.fingerprint),
            "dataset_fingerprint": str(self.splits.fingerprint),
        }
        ema = {EMA: model_tensors(self.ema.module)} if self.ema is not None else {}
        return {
            **ema,
            checkpoints.MODEL: weights,
            checkpoints.STATE: trainer_state,
            checkpoints.META: {"step": st.step, "epoch": st.epoch, "batch": st.batch, "metric": metric},
        }

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore model, optimizer, schedule, scaler, loss state, RNGs and position from ``ckpt``.

        Every file is read and checked before anything changes on disk (the later checkpoints are forgotten last).
        """
        accelerator, rank = self.accelerator, self.accelerator.process_index
        fingerprints = {"backbone": str(self.bb.fingerprint), "dataset": str(self.splits.fingerprint)}
        state = checkpoints.read_state(ckpt, accelerator.num_processes, fingerprints, shard.sharding(accelerator))
        loss_state = checkpoints.read_loss_state(ckpt, rank, set(self.loss_fn.state_dict()))
        per_rank = checkpoints.read(ckpt / f"rank{rank}.pt")
        ema = checkpoints.read(ckpt / EMA) if self.ema is not None else None
        try:
            checkpoints.restore_training(ckpt, accelerator, self.model, self.optimizer, state)
            if ema is not None:
                self.ema.module.load_state_dict(ema, strict=True)
            self.scheduler.load_state_dict(state["scheduler"])
            self.loss_fn.load_state_dict({k: v.to(accelerator.device) for k, v in loss_state.items()}, strict=True)
            self.state.restore(state, per_rank)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(
                f"checkpoint {ckpt} does not fit this run ({e.__class__.__name__}: {str(e).splitlines()[0][:120]}); "
                "resume an earlier checkpoint or start a new run with another --out"
            ) from None
        self.last_saved = ckpt.name
        self.rng_to_restore = per_rank["rng"]
        if self.main:
            checkpoints.forget_after(self.run_dir, ckpt, self.state)
        accelerator.wait_for_everyone()

    def _kept(self) -> str:
        if self.last_saved:
            return f"the last good checkpoint {self.ckpt_dir / self.last_saved} is kept"
        return "no checkpoint was written yet"

    # -- the loop --

    def train(self) -> tuple[bool, int, float]:
        """Run from the current position to the end (or ``max_steps``, or an early stop on validation).

        Returns:
            (stopped early by max_steps, images consumed, seconds spent in training steps).
        """
        if self._reached_max_steps():
            return True, 0, 0.0
        self.progress.start(self.state.step)
        try:
            return self._epochs()
        finally:
            self.progress.stop()

    def _epochs(self) -> tuple[bool, int, float]:
        cfg, accelerator, st = self.cfg, self.accelerator, self.state
        images, seconds = 0, 0.0
        for epoch in range(st.epoch, cfg.epochs):
            if st.early_stopped:
                break
            self.train_set.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            self.train_dl.set_epoch(epoch)
            loader = accelerator.skip_first_batches(self.train_dl, st.batch) if st.batch else self.train_dl
            self.model.train()
            self.loss_fn.train()
            sums = {k: torch.tensor(v, device=accelerator.device) for k, v in st.sums.items()}
            tick = last = time.perf_counter()
            for x, y in loader:
                logged = self._micro_step(x, y)
                for key, value in logged.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                st.count += 1
                st.batch += 1
                images += x.shape[0] * accelerator.num_processes
                self.throughput.add(x.shape[0] * accelerator.num_processes)
                if not accelerator.sync_gradients:
                    continue
                st.step += 1
                if self.ema is not None:
                    self.ema.update(accelerator.unwrap_model(self.model))
                now = time.perf_counter()
                self.step_seconds.append(now - last)
                last = now
                recent = statistics.median(self.step_seconds[-LOG_EVERY:])
                self.progress.update(st.step, logged["loss"], self._lr(), self.images_per_step / recent)
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
            train = {k: _mean_over_processes(accelerator, float(v), st.count) for k, v in sorted(sums.items())}
            share = None if st.grad_share is None else _mean_over_processes(accelerator, st.grad_share, 1)
            st.epoch, st.batch, st.sums, st.count, st.grad_share = epoch + 1, 0, {}, 0, None
            scalars = {f"train/{k}": v for k, v in train.items()}
            accelerator.log({**scalars, "train/lr": self._lr(), "train/images_per_s": self.throughput.read()}, st.step)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                self._end_of_epoch(epoch, train, share)
        return False, images, seconds

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        accelerator, cfg = self.accelerator, self.cfg
        with accelerator.accumulate(self.model):
            self.loss_step_end(accelerator.sync_gradients)  # set on entering accumulate: last micro-batch or not
            if self.mixup is not None:
                x, soft = self.mixup(x, y)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits, features = self.model(x)
            if self.mixup is not None:
                loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                out = {"loss": loss}
            else:
                out = self.loss_fn(logits, features, y)
            self._check_finite(out["loss"])
            if self.state.grad_share is None and self.measure_share:  # the epoch's first micro-batch: measure
                self.state.grad_share = rep_grad_share(out, features)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and cfg.grad_clip:
                accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if accelerator.sync_gradients and not self.optimizer.step_was_skipped:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a NaN/inf loss before it reaches the weights; all processes agree (one small all-reduce)."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_tensor(float(self.stop_requested))])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags.float(), reduction="sum")
        bad, stop = flags.tolist()
        self.stop_requested = self.stop_requested or stop > 0  # a signal may have arrived meanwhile
        if bad:
            st = self.state
            raise UserError(
                f"the loss became NaN/inf at step {st.step + 1} (epoch {st.epoch + 1}, batch {st.batch + 1}); "
                f"{self._kept()}; lower --lr or set --grad-clip and run again"
            )

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _end_of_epoch(self, epoch: int, train: dict[str, float], share: float | None) -> None:
        """Evaluate, log a metrics.jsonl record, checkpoint; on validation, mark the best and maybe stop early."""
        from mr2ft.metrics import headline_figures, summarize

        st, cfg = self.state, self.cfg
        loader = self.progress.wrap(self.eval_dl, f"evaluate on {self.eval_split}")
        targets, topk = evaluate(self.model, loader, self.accelerator, self.num_classes)
        self.last_eval = (st.step, self.eval_split, targets, topk)
        summary = summarize(topk[:, 0], targets, self.num_classes, topk=topk)
        stats = getattr(self.loss_fn, "class_stats", None)
        gamma = stats().get("gamma") if callable(stats) else None
        self.accelerator.log(eval_scalars(self.eval_split, summary, gamma), st.step)
        ema = self._ema_figures(self.eval_dl, self.eval_split, st.step)
        metric = summary["top1"]
        improved = self.eval_split == "val" and (st.best_metric is None or metric > st.best_metric)
        if improved:  # test figures never choose: only a validation split has a best epoch
            st.best_metric, st.best_name, st.best_split, st.best_epoch = metric, st.name, "val", epoch + 1
        patience_out = cfg.early_stop is not None and st.best_epoch is not None
        st.early_stopped = patience_out and epoch + 1 < cfg.epochs and epoch + 1 - st.best_epoch >= cfg.early_stop
        if self.main:
            record = {
                "epoch": epoch + 1,
                "step": st.step,
                "lr": self._lr(),
                **{f"train_{k}": v for k, v in train.items()},
                "rep_grad_share": share,
                "split": self.eval_split,
                **headline_figures(summary),
                "top5": summary["top5"],
                **ema,
            }
            if self.eval_split == "val":  # the study's groups come from ERM's per-class validation accuracy
                record["per_class_accuracy"] = _none_for_nan(summary["per_class_accuracy"])
            append_jsonl(self.run_dir / runs.METRICS, record)
            self._log_epoch(epoch, train, summary, improved)
        self.save_checkpoint(metric)
        if improved and self.main:
            write_json(self.ckpt_dir / BEST, st.best_record())
        self.accelerator.wait_for_everyone()

    def _log_epoch(self, epoch: int, train: dict[str, float], summary: dict, improved: bool) -> None:
        extra = "  (best on val)" if improved else ""
        if self.state.early_stopped:
            extra += f"  early stop: {self.cfg.early_stop} epochs without a validation improvement"
        hard = summary["groups"].get("hard", {}).get("accuracy", float("nan"))
        loss = train.get("loss", float("nan"))
        self._log(
            f"epoch {epoch + 1}/{self.cfg.epochs}  step {self.state.step}  train loss {loss:.4f}  "
            f"{self.eval_split} top-1 {summary['top1']:.2f}  hard {hard:.2f}{extra}"
        )

    def _ema_figures(self, loader: Any, split: str, step: int | None) -> dict:
        """The weight EMA evaluated beside the raw weights: ``{"ema": headline figures}`` (``{}`` without one)."""
        from mr2ft.metrics import headline_figures, summarize

        if self.ema is None:
            return {}
        targets, topk = evaluate(self.ema.module, loader, self.accelerator, self.num_classes)
        summary = summarize(topk[:, 0], targets, self.num_classes, topk=topk)
        if step is not None:
            self.accelerator.log(eval_scalars(f"{split}_ema", summary), step)
        return {"ema": headline_figures(summary)}

    def _use_best_weights(self) -> tuple[str, int, int]:
        """Load the best-on-validation checkpoint's weights and loss state (when there is one and they are not the
        current ones): the model the run reports. Returns (which model, its epoch, its step)."""
        st, accelerator = self.state, self.accelerator
        if st.best_name is None:
            return "last", st.epochs_done, st.step
        best = st.best_record()
        if st.best_name != st.name:
            ckpt = self.ckpt_dir / st.best_name
            checkpoints.restore_weights(ckpt, accelerator, self.model)  # under FSDP, on every process
            loss_state = checkpoints.read_loss_state(ckpt, accelerator.process_index, set(self.loss_fn.state_dict()))
            self.loss_fn.load_state_dict({k: v.to(accelerator.device) for k, v in loss_state.items()}, strict=True)
        return "best_val", best["epoch"], best["step"]

    def finish(self, stopped_early: bool) -> dict:
        """Checkpoint the last state, take the reported model (best on validation, else the last), apply WiSE-FT
        if asked, evaluate it on test and write the run's results."""
        from mr2ft.metrics import summarize
        from mr2ft.report import write_report

        cfg, accelerator, st = self.cfg, self.accelerator, self.state
        if self.last_saved != st.name:
            self.save_checkpoint()
        chosen, chosen_epoch, chosen_step = self._use_best_weights()
        finetuned = None
        if cfg.wise_alpha is not None:
            targets, topk = evaluate(self.model, self.test_dl, accelerator, self.num_classes)
            finetuned = summarize(topk[:, 0], targets, self.num_classes, topk=topk)["top1"]
            apply_wise(accelerator.unwrap_model(self.model), self.zeroshot, cfg.wise_alpha)
        last = self.last_eval
        if cfg.wise_alpha is None and last is not None and last[:2] == (chosen_step, "test"):
            targets, topk = last[2], last[3]  # the end-of-epoch evaluation of these very weights
        else:
            targets, topk = evaluate(self.model, self.test_dl, accelerator, self.num_classes)
        summary = summarize(topk[:, 0], targets, self.num_classes, topk=topk)
        ema = self._ema_figures(self.test_dl, "test", None)  # the EMA of the last step, on the test split
        val = None
        if self.eval_split == "val":  # the reported model on validation: `report --groups val` fixes groups on it
            val = evaluate(self.model, self.eval_dl, accelerator, self.num_classes)
        if self.main:
            runs.save_predictions(self.run_dir, targets, topk, self.num_classes)
            if val is not None:
                runs.save_predictions(self.run_dir, *val, self.num_classes, name=runs.VAL_PREDICTIONS)
            class_stats = getattr(self.loss_fn, "class_stats", None)
            if callable(class_stats):
                runs.save_class_stats(self.run_dir, class_stats())
            if cfg.wise_alpha is not None:
                save_tensors(
                    self.run_dir / "model_wise.safetensors", model_tensors(accelerator.unwrap_model(self.model))
                )
            record = {"final": True, "epoch": st.epochs_done, "step": st.step, "split": "test", "top1": summary["top1"]}
            record.update({"stopped_early": stopped_early, "early_stopped": st.early_stopped})
            record.update({"model": chosen, "model_epoch": chosen_epoch, "model_step": chosen_step})
            record.update({"wise_alpha": cfg.wise_alpha, "finetuned_top1": finetuned, **ema})
            append_jsonl(self.run_dir / runs.METRICS, record)
            write_report(self.run_dir, cfg.baseline)
        self.final_model = (chosen, chosen_epoch)
        accelerator.wait_for_everyone()
        return summary

    def _log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, soft_wrap=True)


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


def _none_for_nan(values: list[float]) -> list[float | None]:
    """JSON has no NaN: a class without support gets None."""
    return [None if math.isnan(v) else v for v in values]


def _mean_over_processes(accelerator: Any, total: float, count: int) -> float:
    t = torch.tensor([total, float(count)], device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return float(t[0] / t[1].clamp(min=1))


def _console() -> Any:
    from rich.console import Console

    return Console()


__all__ = ["LOG_EVERY", "Trainer", "build_optimizer"]
