"""Training throughput of ``mr2ft finetune`` against a minimal hand-written PyTorch loop, and MR2 against CE.

On the same model, data, batch, optimizer and augmentation:

- ``hand``: the smallest honest loop -- DataLoader(shuffle) -> forward -> F.cross_entropy -> backward -> AdamW.
- ``ce``:   ``mr2ft.finetune.run`` with ``--loss ce`` (Accelerate, seeded per-sample augmentation, warm-up/cosine
            schedule, the per-step finite-loss check, the class statistics the report shows, bookkeeping).
- ``mr2``:  the same with ``--loss mr2`` (class statistics + representation margin every step).
- ``hand_tuned``: the hand loop with the malloc settings that ``mr2ft finetune`` applies on CPU
            (``mr2ft.perf.keep_freed_memory``), to show what they are worth on their own.

A shared 2-core machine drifts by 10-30% within seconds, far more than the few percent being measured, so the
three variants run in lockstep: one process each, taking turns one optimizer step at a time (a baton passed
through semaphores from a global optimizer step hook; the waiting processes sleep). Step i of every variant thus
runs within a second of the others, and the paired per-step ratios cancel the drift. A step is timed from taking
the baton to the end of its optimizer step, so loading its batch counts. The first step of each epoch (process
start, evaluation and checkpoint, loader start) is left out; the verdicts use the median of the paired ratios,
with its spread (quartiles) beside it. Rounds rotate which variant goes first. Minor page faults per step are
printed for each variant: they are what the malloc settings remove.
Targets (issue 5): ce/hand images/s >= 0.95; mr2 step time <= 1.03 x ce.

    python benchmarks/finetune_throughput.py [--model resnet18] [--image-size 64] [--batch-size 32] [--repeats 4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _images import make_image_folder  # noqa: E402

from mr2ft import finetune  # noqa: E402
from mr2ft.backbones import load_backbone  # noqa: E402
from mr2ft.classifier import Classifier  # noqa: E402
from mr2ft.config import FinetuneConfig, build_config  # noqa: E402
from mr2ft.data import TransformedDataset, load_dataset  # noqa: E402
from mr2ft.perf import keep_freed_memory  # noqa: E402


def hand_loop(args: argparse.Namespace, data: Path) -> None:
    """The minimal loop for ``args.epochs`` epochs."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    splits = load_dataset(str(data))
    bb = load_backbone("timm", args.model, "none", image_size=args.image_size)
    model = Classifier(bb.model, bb.feature_dim, splits.num_classes).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = DataLoader(
        TransformedDataset(splits.train, bb.preprocess.train_transform()),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    for _ in range(args.epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                logits, _ = model(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def our_loop(args: argparse.Namespace, data: Path, loss: str, out: Path) -> None:
    """``mr2ft.finetune.run`` with the same settings (Accelerate picks the device: the GPU when there is one)."""
    cfg = build_config(
        FinetuneConfig,
        backbone="timm",
        model=args.model,
        weights="none",
        dataset=str(data),
        loss=loss,
        lr=args.lr,
        weight_decay=0.05,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        out=str(out),
        overwrite=True,
        mixed_precision=args.mixed_precision,
        image_size=args.image_size,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        finetune.run(cfg)


class Baton:
    """Round-robin turns between processes: one runs, the others wait on their semaphore."""

    def __init__(self, me: int, semaphores: list, done: Any) -> None:
        self.me, self.semaphores, self.done = me, semaphores, done

    def _next(self) -> int | None:
        n = len(self.semaphores)
        for k in range(1, n + 1):
            j = (self.me + k) % n
            if not self.done[j]:
                return j
        return None

    def wait(self) -> None:
        self.semaphores[self.me].acquire()

    def pass_on(self) -> None:
        """Give the turn to the next unfinished process and wait for it to come back."""
        j = self._next()
        if j is not None and j != self.me:
            self.semaphores[j].release()
            self.wait()

    def leave(self) -> None:
        self.done[self.me] = 1
        j = self._next()
        if j is not None:
            self.semaphores[j].release()


def variant(
    name: str, me: int, args: argparse.Namespace, data: Path, out: Path, semaphores: list, done: Any, queue: Any
) -> None:
    """One variant in its own process: run it, timing each optimizer step between turns."""
    if args.threads:
        torch.set_num_threads(args.threads)
    baton = Baton(me, semaphores, done)
    times: list[float] = []
    faults: list[int] = []
    clock = {"start": 0.0, "faults": 0}

    def after_step(*_: Any) -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()  # the step is done when the GPU is, not when its kernels are queued
        times.append(time.perf_counter() - clock["start"])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - clock["faults"])
        baton.pass_on()
        clock["start"] = time.perf_counter()
        clock["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    baton.wait()
    handle = register_optimizer_step_post_hook(after_step)
    clock["start"] = time.perf_counter()
    clock["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        if name.startswith("hand"):
            if name == "hand_tuned":
                keep_freed_memory()
            hand_loop(args, data)
        else:
            our_loop(args, data, name, out)
    finally:
        handle.remove()
        baton.leave()
        queue.put((name, (times, faults)))


def lockstep(
    args: argparse.Namespace, data: Path, order: list[str], tmp: Path
) -> dict[str, tuple[list[float], list[int]]]:
    """Run the variants in ``order`` step by step; returns each one's step times and page faults per step."""
    ctx = mp.get_context("spawn")
    semaphores = [ctx.Semaphore(0) for _ in order]
    done = ctx.Array("b", len(order))
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=variant, args=(name, i, args, data, tmp / f"run-{name}", semaphores, done, queue))
        for i, name in enumerate(order)
    ]
    for proc in procs:
        proc.start()
    semaphores[0].release()
    results = dict(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"a benchmark process failed (exit code {proc.exitcode})")
    return results


def quartiles(values: list[float], fmt: str) -> str:
    """``median [q1, q3]``."""
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{format(q2, fmt)} [{format(q1, fmt)}, {format(q3, fmt)}]"


def loss_ms(name: str, batch: int, dim: int, classes: int, device: str, repeats: int = 200) -> float:
    """Median forward+backward time of one loss alone (ms) on a batch like the loop's, statistics warmed up."""
    from mr2ft.losses import build_loss

    loss = build_loss(name, classes, dim).to(device).train()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=g).to(device).requires_grad_(True)
    features = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    targets = (torch.arange(batch) % classes).to(device)
    times = []
    for i in range(repeats + 10):
        start = time.perf_counter()
        loss(logits, features, targets)["loss"].backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 10:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=64, help="training images per class")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4, help="lockstep rounds (each rotates the order)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="bf16 autocast (CUDA)")
    args = parser.parse_args()
    # mr2ft runs where Accelerate puts it, the GPU when there is one; the hand loop goes to the same device.
    args.device = "cuda" if torch.cuda.is_available() else "cpu"

    names = ["hand", "hand_tuned", "ce", "mr2"]
    comparisons = {  # (numerator, denominator) of a step-time ratio, and how it is shown
        "finetune --loss ce / hand loop, images/s": ("hand", "ce"),
        "finetune --loss ce / hand loop with the same malloc settings, images/s": ("hand_tuned", "ce"),
        "MR2 step time vs CE, %": ("mr2", "ce"),
    }
    steps = (args.classes * args.per_class) // args.batch_size
    pairs: dict[str, list[float]] = {key: [] for key in comparisons}
    medians: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_image_folder(data, args.classes, args.per_class, size=args.image_size, splits=("train",))
        # A small test split: evaluation is not timed, so it only needs to exist.
        make_image_folder(data, args.classes, 2, size=args.image_size, splits=("test",), seed=1)
        for r in range(args.repeats):
            k = r % len(names)
            results = lockstep(args, data, names[k:] + names[:k], Path(tmp))
            times = {name: t for name, (t, _) in results.items()}
            counts = {name: len(t) for name, t in times.items()}
            if set(counts.values()) != {steps * args.epochs}:
                raise SystemExit(f"expected {steps * args.epochs} steps per variant, got {counts}")
            # Leave out each epoch's first step: it carries process start, evaluation, checkpoints, loader start.
            kept = [i for i in range(steps * args.epochs) if i % steps != 0]
            for key, (a, b) in comparisons.items():
                pairs[key] += [times[a][i] / times[b][i] for i in kept]
            for name in names:
                medians[name].append(statistics.median(times[name][i] for i in kept))
                faults[name] += [results[name][1][i] for i in kept]

    torch.set_num_threads(args.threads or torch.get_num_threads())
    bb = load_backbone("timm", args.model, "none", image_size=args.image_size)
    ce_ms = loss_ms("ce", args.batch_size, bb.feature_dim, args.classes, args.device)
    mr2_ms = loss_ms("mr2", args.batch_size, bb.feature_dim, args.classes, args.device)
    ce_step_ms = 1000 * statistics.median(medians["ce"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"load average at the end {load} on {os.cpu_count()} cores; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, timm {args.model} at {args.image_size} px, "
        f"batch {args.batch_size}, {args.classes} classes, {steps} steps/epoch x {args.epochs} epochs, "
        f"{args.repeats} lockstep rounds, {args.num_workers} loader workers, device {args.device}, "
        f"precision {args.mixed_precision}"
    )
    print(f"{'variant':>10} {'images/s':>9} {'faults/step':>12}   per round images/s (median step)")
    for name in names:
        rates = [args.batch_size / m for m in medians[name]]
        print(
            f"{name:>10} {statistics.median(rates):>9.1f} {statistics.median(faults[name]):>12.0f}   "
            f"{'  '.join(f'{v:.1f}' for v in rates)}"
        )
    n = len(pairs["MR2 step time vs CE, %"])
    print(f"paired per-step ratios ({n} pairs each), median [quartiles]:")
    for key, values in pairs.items():
        if key.endswith("%"):
            values = [100 * (v - 1) for v in values]
            verdict = "met" if statistics.median(values) <= 3.0 else "MISSED"
            print(f"  {key}: {quartiles(values, '+.1f')} (target <= +3%): {verdict}")
        else:
            verdict = "met" if statistics.median(values) >= 0.95 else "MISSED"
            print(f"  {key}: {quartiles(values, '.3f')} (target >= 0.95): {verdict}")
    print(
        f"the losses alone (forward+backward, B={args.batch_size}, d={bb.feature_dim}, K={args.classes}): "
        f"CE {ce_ms:.2f} ms, MR2 {mr2_ms:.2f} ms: MR2 adds {mr2_ms - ce_ms:.2f} ms = "
        f"{100 * (mr2_ms - ce_ms) / ce_step_ms:.2f}% of the {ce_step_ms:.0f} ms CE step"
    )


if __name__ == "__main__":
    main()
