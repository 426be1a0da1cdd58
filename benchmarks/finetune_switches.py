"""What the fine-tune's speed and memory switches buy on this machine: images/s with and without ``--compile`` and
``--channels-last``, and the peak memory of a training step with and without ``--grad-checkpointing``.

Each variant runs in its own process (a fresh compile cache, its own peak RSS) on the same model, data and seed:
timm ViT-Tiny (random weights) at 224 px inside mr2ft's :class:`~mr2ft.classifier.Classifier`, trained with
AdamW on random images, the switches applied exactly as ``mr2ft finetune`` applies them (``enable_grad_checkpointing``,
``model.to(memory_format=channels_last)`` plus channels_last inputs, in-place ``backbone.compile()``). A few warm-up
steps (where compilation happens) are left out; images/s is the batch over the median step time. Peak memory is
the growth of the process's peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU) from just before the first
step. Ratios are against the plain variant of the same run.

    python benchmarks/finetune_switches.py [--model vit_tiny_patch16_224] [--batch-size 8] [--steps 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "plain": [],
    "channels_last": ["channels_last"],
    "compile": ["compile"],
    "compile+channels_last": ["compile", "channels_last"],
    "grad_checkpointing": ["grad_checkpointing"],
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_variant(args: argparse.Namespace, switches: list[str]) -> dict:
    """Train ``args.warmup + args.steps`` steps with ``switches``; the timings and the peak memory growth."""
    import timm
    import torch
    import torch.nn.functional as F

    from mr2ft.classifier import Classifier, enable_grad_checkpointing

    torch.manual_seed(0)
    device = torch.device(args.device)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0)
    if "grad_checkpointing" in switches:
        enable_grad_checkpointing(backbone, args.model)
    model = Classifier(backbone, backbone.num_features, 10)
    if "channels_last" in switches:
        model = model.to(memory_format=torch.channels_last)
    model.to(device).train()
    if "compile" in switches:
        model.backbone.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    if "channels_last" in switches:
        x = x.contiguous(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    times, start_mem = [], None
    for i in range(args.warmup + args.steps):
        if i == 0:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                start_mem = torch.cuda.memory_allocated() / 2**20
            else:
                start_mem = _rss_mib()
        t = time.perf_counter()
        logits, _ = model(x)
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    step = statistics.median(times)
    return {"images_per_s": args.batch_size / step, "step_s": step, "peak_growth_mib": peak - start_mem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant and print JSON
    args = parser.parse_args()
    if args.variant is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(one_variant(args, VARIANTS[args.variant])))
        return
    passed = [a for a in sys.argv[1:]]
    results = {}
    for name in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, *passed, "--variant", name], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            results[name] = None
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    plain = results["plain"]
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.device}, {args.threads} threads, "
          f"median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'variant':<24}{'images/s':>10}{'x plain':>9}{'peak +MiB':>11}{'x plain':>9}")
    for name, r in results.items():
        if r is None:
            print(f"{name:<24}{'failed':>10}")
            continue
        speed = r["images_per_s"] / plain["images_per_s"] if plain else float("nan")
        mem = (
            r["peak_growth_mib"] / plain["peak_growth_mib"] if plain and plain["peak_growth_mib"] > 0 else float("nan")
        )
        print(f"{name:<24}{r['images_per_s']:>10.2f}{speed:>9.2f}{r['peak_growth_mib']:>11.0f}{mem:>9.2f}")


if __name__ == "__main__":
    main()
