"""Training throughput of ``mr2ft finetune`` against a minimal hand-written PyTorch loop, and MR2 against CE.

In one process, on the same model, data, batch, optimizer and augmentation:

- ``hand``: the smallest honest loop -- DataLoader(shuffle) -> forward -> F.cross_entropy -> backward -> AdamW.
- ``ce``:   ``mr2ft.finetune.run`` with ``--loss ce`` (Accelerate, seeded per-sample augmentation, warm-up/cosine
            schedule, the per-step finite-loss check, progress bookkeeping).
- ``mr2``:  the same with ``--loss mr2`` (class statistics + representation margin every step).

Each variant trains ``--epochs`` epochs from a fresh model; the time counted is the training loop only (data
loading included; evaluation and checkpoint writes excluded, as ``FinetuneResult.train_seconds`` reports).
Variants are interleaved over ``--repeats`` rounds and the medians compared, which tames a noisy shared machine.
Targets (issue 5): ce/hand images/s >= 0.95; mr2 step time <= 1.03 x ce.

    python benchmarks/finetune_throughput.py [--model resnet18] [--image-size 64] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _images import make_image_folder  # noqa: E402

from mr2ft import finetune  # noqa: E402
from mr2ft.backbones import load_backbone  # noqa: E402
from mr2ft.config import FinetuneConfig, build_config  # noqa: E402
from mr2ft.data import TransformedDataset, load_dataset  # noqa: E402


def hand_loop(args: argparse.Namespace, data: Path, steps: int | None = None) -> tuple[int, float]:
    """The minimal loop; returns (images, seconds) of ``args.epochs`` epochs (or of ``steps`` steps)."""
    torch.manual_seed(args.seed)
    splits = load_dataset(str(data))
    bb = load_backbone("timm", args.model, "none", image_size=args.image_size)
    model = finetune.Classifier(bb.model, bb.feature_dim, splits.num_classes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    loader = DataLoader(
        TransformedDataset(splits.train, bb.preprocess.train_transform()),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
    )
    images, done = 0, 0
    start = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in loader:
            logits, _ = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images += x.shape[0]
            done += 1
            if steps is not None and done >= steps:
                return images, time.perf_counter() - start
    return images, time.perf_counter() - start


def our_loop(args: argparse.Namespace, data: Path, loss: str, out: Path) -> tuple[int, float]:
    """``mr2ft.finetune.run`` with the same settings; returns (images, seconds) of its training loop."""
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
        mixed_precision="no",
        image_size=args.image_size,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        result = finetune.run(cfg)
    return result.train_images, result.train_seconds


def loss_ms(name: str, batch: int, dim: int, classes: int, repeats: int = 200) -> float:
    """Median forward+backward time of one loss alone (ms) on a batch like the loop's, statistics warmed up."""
    from mr2ft.losses import build_loss

    loss = build_loss(name, classes, dim).train()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=g, requires_grad=True)
    features = torch.randn(batch, dim, generator=g, requires_grad=True)
    targets = torch.arange(batch) % classes
    times = []
    for i in range(repeats + 10):
        start = time.perf_counter()
        loss(logits, features, targets)["loss"].backward()
        if i >= 10:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=32, help="training images per class")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_image_folder(data, args.classes, args.per_class, size=args.image_size, splits=("train",))
        # A small test split: evaluation is not timed, so it only needs to exist.
        make_image_folder(data, args.classes, 2, size=args.image_size, splits=("test",), seed=1)
        hand_loop(args, data, steps=3)  # warm-up: allocator, thread pool, first-call overheads
        rates: dict[str, list[float]] = {"hand": [], "ce": [], "mr2": []}
        for _ in range(args.repeats):
            for name in rates:
                if name == "hand":
                    n, s = hand_loop(args, data)
                else:
                    n, s = our_loop(args, data, name, Path(tmp) / f"run-{name}")
                rates[name].append(n / s)

    med = {k: statistics.median(v) for k, v in rates.items()}
    # Paired per round (the three runs of a round are adjacent in time and share the machine's load).
    ce_vs_hand = statistics.median(c / h for c, h in zip(rates["ce"], rates["hand"], strict=True))
    mr2_extra = statistics.median(c / m - 1 for c, m in zip(rates["ce"], rates["mr2"], strict=True))
    bb = load_backbone("timm", args.model, "none", image_size=args.image_size)
    ce_ms = loss_ms("ce", args.batch_size, bb.feature_dim, args.classes)
    mr2_ms = loss_ms("mr2", args.batch_size, bb.feature_dim, args.classes)
    step_ms = 1000 * args.batch_size / med["ce"]
    steps = (args.classes * args.per_class) // args.batch_size
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"load average at the end {load} on {os.cpu_count()} cores; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, timm {args.model} at {args.image_size} px, "
        f"batch {args.batch_size}, {args.classes} classes, {steps} steps/epoch x {args.epochs} epochs, "
        f"{args.repeats} rounds, device cpu"
    )
    print(f"{'variant':>8} {'images/s':>10}   runs (images/s)")
    for name, values in rates.items():
        print(f"{name:>8} {med[name]:>10.1f}   {'  '.join(f'{v:.1f}' for v in values)}")
    verdict = "met" if ce_vs_hand >= 0.95 else "MISSED"
    print(
        f"finetune --loss ce / hand loop, images/s (median of per-round ratios): {ce_vs_hand:.3f} "
        f"(target >= 0.95): {verdict}"
    )
    verdict = "met" if mr2_extra <= 0.03 else "MISSED"
    print(
        f"MR2 step time vs CE, end to end (median of per-round ratios): {100 * mr2_extra:+.1f}% "
        f"(target <= +3%): {verdict}"
    )
    print(
        f"the losses alone (forward+backward, B={args.batch_size}, d={bb.feature_dim}, K={args.classes}): "
        f"CE {ce_ms:.2f} ms, MR2 {mr2_ms:.2f} ms: MR2 adds {mr2_ms - ce_ms:.2f} ms = "
        f"{100 * (mr2_ms - ce_ms) / step_ms:.2f}% of the {step_ms:.0f} ms CE step"
    )


if __name__ == "__main__":
    main()
