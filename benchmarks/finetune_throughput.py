"""Training throughput of ``mr2ft finetune`` against a minimal hand-written PyTorch loop, and MR2 against CE.

On the same model, data, batch, optimizer and augmentation:

- ``hand``: the smallest honest loop -- DataLoader(shuffle) -> forward -> F.cross_entropy -> backward -> AdamW.
- ``ce``:   ``mr2ft.finetune.run`` with ``--loss ce`` (Accelerate, seeded per-sample augmentation, warm-up/cosine
            schedule, the per-step finite-loss check, the class statistics the report shows, bookkeeping).
- ``mr2``:  the same with ``--loss mr2`` (class statistics + representation margin every step).
- ``hand_tuned``: the hand loop with the malloc settings that ``mr2ft finetune`` applies on CPU
            (``mr2ft.perf.keep_freed_memory``), to show what they are worth on their own.

A shared 2-core machine drifts by 10-30% within seconds, far more than the few percent being measured, so the
variants run in lockstep (``benchmarks/lockstep.py``): one process each, taking turns one optimizer step at a time,
so that step i of every variant runs within a second of the others and the paired per-step ratios cancel the
drift. The first step of each epoch (process start, evaluation and checkpoint, loader start) is left out; the
verdicts use the median of the paired ratios, with its spread (quartiles) beside it. Minor page faults per step are
printed for each variant: they are what the malloc settings remove.
Targets (issue 5): ce/hand images/s >= 0.95; mr2 step time <= 1.03 x ce.

    python benchmarks/finetune_throughput.py [--model resnet18] [--image-size 64] [--batch-size 32] [--repeats 4]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from lockstep import loss_ms, make_data, quartiles, quiet_finetune, run_rounds
from torch.utils.data import DataLoader

from mr2ft.backbones import load_backbone
from mr2ft.classifier import Classifier
from mr2ft.data import TransformedDataset, load_dataset
from mr2ft.perf import keep_freed_memory


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


def one_variant(args: argparse.Namespace, data: Path, tmp: Path, name: str) -> None:
    """Train variant ``name`` (in its own lockstep process): a hand loop, or ``mr2ft finetune`` with that loss."""
    if name.startswith("hand"):
        if name == "hand_tuned":
            keep_freed_memory()
        hand_loop(args, data)
        return
    common = {"lr": args.lr, "weight_decay": 0.05, "epochs": args.epochs, "batch_size": args.batch_size}
    common |= {"image_size": args.image_size, "num_workers": args.num_workers, "seed": args.seed}
    quiet_finetune(
        tmp / f"run-{name}",
        model=args.model,
        dataset=str(data),
        loss=name,
        mixed_precision=args.mixed_precision,
        **common,
    )


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
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.classes, args.per_class, args.image_size)
        job = functools.partial(one_variant, args, data, Path(tmp))
        # Each epoch's first step (process start, evaluation, checkpoints, loader start) is left out.
        rounds = run_rounds(job, names, comparisons, args.repeats, steps, args.epochs, skip=1, threads=args.threads)
    medians, faults = rounds.medians, rounds.faults
    pairs = {key: rounds.pooled(key) for key in comparisons}

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
