"""What a probe costs beyond the backbone's forward pass, and what the feature cache saves.

In one run, on the same images: (1) a bare loop that decodes, transforms and forwards every image through the
backbone (what any probe must do at least), (2) the whole ``mr2ft probe`` with an empty cache, (3) the same probe
again with the cache filled. Reported as ratios: whole probe / bare forward (target <= 1.15x) and cached probe /
first probe (target <= 10%).

    python benchmarks/probe_cost.py [--model test_resnet] [--per-class 60] [--size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from mr2ft.backbones import load_backbone
from mr2ft.cli import app
from mr2ft.data import TransformedDataset, load_dataset


def make_images(root: Path, classes: int, per_class: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for k in range(classes):
            d = root / split / f"class_{k:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([k, i, split == "test"])
                arr = (rng.random((size, size, 3)) * 64 + k * 190 / classes).astype("uint8")
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def bare_forward(args, data: Path, channels_last: bool = False) -> float:
    """Load, decode, transform and forward every image: the least any probe must do."""
    t0 = time.perf_counter()
    bb = load_backbone("timm", model=args.model, weights="none", image_size=args.size)
    splits = load_dataset(str(data))
    tf = bb.preprocess.eval_transform()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bb.model.eval().to(memory_format=fmt)
    with torch.inference_mode():
        for ds in (splits.train, splits.test):
            loader = DataLoader(TransformedDataset(ds, tf), batch_size=args.batch, num_workers=args.workers)
            for x, _ in loader:
                bb.model(x.contiguous(memory_format=fmt))
    return time.perf_counter() - t0


def whole_probe(args, data: Path, cache: Path, out: Path) -> float:
    t0 = time.perf_counter()
    result = CliRunner().invoke(
        app,
        [
            "probe",
            "--backbone",
            "timm",
            "--model",
            args.model,
            "--weights",
            "none",
            "--image-size",
            str(args.size),
            "--dataset",
            str(data),
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
            "--epochs",
            str(args.epochs),
            "--no-sweep-wd",  # one head fit, as when this benchmark was recorded (the default now sweeps weight decay)
            "--extract-batch-size",
            str(args.batch),
            "--num-workers",
            str(args.workers),
        ],
    )
    if result.exit_code != 0:
        raise SystemExit(f"probe failed: {result.output}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_images(tmp / "images", args.classes, args.per_class, args.size)
        n = 2 * args.classes * args.per_class
        bare_forward(args, data)  # warm-up: imports, allocator, file cache
        bare = bare_forward(args, data)
        bare_cl = bare_forward(args, data, channels_last=True)
        first = whole_probe(args, data, tmp / "cache", tmp / "run1")
        cached = whole_probe(args, data, tmp / "cache", tmp / "run2")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; timm {args.model} at {args.size}px, "
        f"{n} images, {args.epochs} head epochs"
    )
    print(f"bare forward loop     {bare:8.2f} s   (plain layout, as one writes it)")
    print(f"bare, channels_last   {bare_cl:8.2f} s   (the layout mr2ft extracts with)")
    print(
        f"whole probe (first)   {first:8.2f} s   {first / bare:.2f}x the plain bare forward (target <= 1.15x), "
        f"{first / bare_cl:.2f}x the channels_last one"
    )
    print(f"whole probe (cached)  {cached:8.2f} s   {100 * cached / first:.1f}% of the first (target <= 10%)")


if __name__ == "__main__":
    main()
