"""What the fine-tune's speed and memory switches buy: images/s of ``mr2ft finetune`` with and without ``--compile``,
``--channels-last`` and ``--grad-checkpointing``, MR2's share of a step with the switches on, and the peak memory
of a training step with and without ``--grad-checkpointing``.

Throughput. Each variant is ``mr2ft.finetune.run`` (timm ViT-Tiny, random weights, on generated images) in its own
process, all in lockstep (``benchmarks/lockstep.py``): they take turns one optimizer step at a time, so that step i
of every variant meets the same machine load and the paired per-step ratios cancel the drift of a shared machine.

- ``plain``: ``--loss ce``; ``channels_last``, ``compile``, ``grad_ckpt``: the same with that one switch;
- ``all_ce``: ``--loss ce`` with ``--compile --channels-last --grad-checkpointing --model-ema 0.9998``;
- ``all_mr2``: the same with ``--loss mr2``: MR2 against CE under the same switches (target: <= +3% step time).

The first ``--skip`` steps of each run (process start, compilation, loader start) are left out, and each run stops
after its last step (its evaluation would not be timed). Each ratio is the median of the paired per-step ratios
with their quartiles, and the median of each round (rounds rotate which variant goes first). A ratio counts as
settled only when every round's median lies on the same side of 1 (of +3% for MR2's share); otherwise it is within
this machine's noise.

Memory. Peak memory is measured in separate processes (each its own peak): a bare training step of the same model
(AdamW, cross-entropy) with and without ``enable_grad_checkpointing``, as ``mr2ft finetune`` applies it; the
growth of the peak RSS (CPU) or of ``torch.cuda.max_memory_allocated`` (GPU) from just before the first step.

On a GPU (Accelerate's device; pass ``--mixed-precision bf16``) the same script measures the same things.

    python benchmarks/finetune_switches.py [--model vit_tiny_patch16_224] [--image-size 224] [--batch-size 8]
        [--steps 12] [--repeats 4] [--memory-batch-size N] [--num-workers 0] [--mixed-precision no|bf16]
        [--raw steps.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lockstep import Rounds, loss_ms, make_data, quartiles, quiet_finetune, run_rounds

from mr2ft.backbones import load_backbone

EMA = 0.9998
ALL = {"compile": True, "channels_last": True, "grad_checkpointing": True, "model_ema": EMA}
VARIANTS = {
    "plain": {"loss": "ce"},
    "channels_last": {"loss": "ce", "channels_last": True},
    "compile": {"loss": "ce", "compile": True},
    "grad_ckpt": {"loss": "ce", "grad_checkpointing": True},
    "all_ce": {"loss": "ce", **ALL},
    "all_mr2": {"loss": "mr2", **ALL},
}
SPEEDUPS = {  # images/s of the second over the first: time(first) / time(second), step by step
    "--channels-last / plain": ("plain", "channels_last"),
    "--compile / plain": ("plain", "compile"),
    "--grad-checkpointing / plain": ("plain", "grad_ckpt"),
    "all switches / plain": ("plain", "all_ce"),
}
MR2_SHARE = "MR2 vs CE step time, all switches on, %"
MEMORY_VARIANTS = ("plain", "grad_checkpointing")


def one_variant(args: argparse.Namespace, data: Path, tmp: Path, name: str) -> None:
    """Fine-tune variant ``name`` (in its own lockstep process)."""
    quiet_finetune(
        tmp / f"run-{name}",
        model=args.model,
        dataset=str(data),
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=1,
        lr=1e-4,
        num_workers=args.num_workers,
        mixed_precision=args.mixed_precision,
        **VARIANTS[name],
    )


def peak_memory(args: argparse.Namespace, switch: str) -> dict:
    """Peak memory growth (MiB) over ``args.memory_steps`` bare training steps, with or without checkpointing."""
    import torch.nn.functional as F

    from mr2ft.classifier import Classifier, enable_grad_checkpointing

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bb = load_backbone("timm", args.model, "none", image_size=args.image_size)
    if switch == "grad_checkpointing":
        enable_grad_checkpointing(bb.model, args.model)
    model = Classifier(bb.model, bb.feature_dim, args.classes).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = args.memory_batch_size or args.batch_size
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/statm") as f:
            start = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    for _ in range(args.memory_steps):
        with autocast:
            logits, _ = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_growth_mib": peak - start}


def memory_table(args: argparse.Namespace) -> list[str]:
    """Run :func:`peak_memory` for each switch in a fresh process of this script; the table's lines."""
    growth = {}
    for name in MEMORY_VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--memory-variant", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(f"the {name} memory run failed:\n{out.stderr[-2000:]}")
        growth[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    where = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS"
    batch = args.memory_batch_size or args.batch_size
    lines = [f"peak memory of {args.memory_steps} bare training steps at batch {batch}, growth of the {where}:"]
    for name, mib in growth.items():
        lines.append(f"  {name:<20} {mib:>8.0f} MiB  {mib / growth['plain']:.2f}x plain")
    return lines


def side_of(values: list[float], line: float, above: str, below: str) -> str:
    """Whether every round's median lies on one side of ``line``."""
    if len(values) < 2:
        return "one round only: not settled"
    if all(v > line for v in values):
        return f"{above} in every round"
    if all(v < line for v in values):
        return f"{below} in every round"
    return "rounds on both sides: not settled (within noise)"


def throughput_lines(rounds: Rounds) -> list[str]:
    """The images/s ratios and MR2's share, each with its spread and verdict."""
    n = len(rounds.pooled(MR2_SHARE))
    lines = [f"paired per-step ratios ({n} pairs each): median [quartiles]; median of each round; verdict"]
    for key in SPEEDUPS:
        per_round = rounds.round_medians(key)
        verdict = side_of(per_round, 1.0, "faster", "slower")
        shown = " ".join(f"{v:.3f}" for v in per_round)
        lines.append(f"  {key}, images/s: {quartiles(rounds.pooled(key), '.3f')}; rounds {shown}; {verdict}")
    share = [100 * (v - 1) for v in rounds.pooled(MR2_SHARE)]
    per_round = [100 * (v - 1) for v in rounds.round_medians(MR2_SHARE)]
    target = "met" if statistics.median(share) <= 3.0 else "MISSED"
    verdict = side_of(per_round, 3.0, "above +3%", "below +3%")
    shown = " ".join(f"{v:+.1f}" for v in per_round)
    lines.append(f"  {MR2_SHARE}: {quartiles(share, '+.1f')}; rounds {shown}; target <= +3%: {target} ({verdict})")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per variant per round")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each run left out (compilation)")
    parser.add_argument("--repeats", type=int, default=4, help="lockstep rounds (each rotates the order)")
    parser.add_argument("--memory-steps", type=int, default=3, help="training steps of each memory run")
    parser.add_argument("--memory-batch-size", type=int, default=None, help="batch of the memory runs (--batch-size)")
    parser.add_argument("--num-workers", type=int, default=0, help="image loading workers per run (GPU: several)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="bf16 autocast (CUDA)")
    parser.add_argument("--raw", type=Path, help="also write every step's seconds, per round and variant, as JSON")
    parser.add_argument("--memory-variant", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)  # internal
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_variant is not None:
        print(json.dumps(peak_memory(args, args.memory_variant)))
        return
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    per_class = math.ceil(args.steps * args.batch_size / args.classes)
    steps = args.classes * per_class // args.batch_size
    names = list(VARIANTS)
    comparisons = {**SPEEDUPS, MR2_SHARE: ("all_mr2", "all_ce")}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.classes, per_class, args.image_size)
        job = functools.partial(one_variant, args, data, Path(tmp))
        rounds = run_rounds(
            job, names, comparisons, args.repeats, steps, skip=args.skip, threads=args.threads, stop_after_last=True
        )
    if args.raw:
        args.raw.write_text(json.dumps({"steps_left_out": args.skip, "rounds": rounds.times}, indent=1))
    memory = memory_table(args)
    feature_dim = load_backbone("timm", args.model, "none", image_size=args.image_size).feature_dim
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.classes} classes, device {device}, "
        f"precision {args.mixed_precision}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.num_workers} loader workers; "
        f"{steps} steps per variant per round ({args.skip} left out), {args.repeats} lockstep rounds; "
        f"load average at the end {load} on {os.cpu_count()} cores; {time.perf_counter() - started:.0f} s"
    )
    print(f"{'variant':>14} {'images/s':>9}   per round images/s (median step)")
    for name in names:
        rates = [args.batch_size / m for m in rounds.medians[name]]
        print(f"{name:>14} {statistics.median(rates):>9.2f}   {'  '.join(f'{v:.2f}' for v in rates)}")
    print("\n".join(throughput_lines(rounds)))
    ce_ms, mr2_ms = (loss_ms(n, args.batch_size, feature_dim, args.classes, device) for n in ("ce", "mr2"))
    step_ms = 1000 * statistics.median(rounds.medians["all_ce"])
    print(
        f"the losses alone (forward+backward, B={args.batch_size}, d={feature_dim}, K={args.classes}): MR2 adds "
        f"{mr2_ms - ce_ms:.2f} ms to CE's {ce_ms:.2f} ms = {100 * (mr2_ms - ce_ms) / step_ms:.2f}% of the "
        f"{step_ms:.0f} ms all-switches CE step"
    )
    print("\n".join(memory))


if __name__ == "__main__":
    main()
