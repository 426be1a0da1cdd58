"""Peak memory and head-training throughput of the chunked feature store (mr2ft.featstore) against in-memory features.

1. Memory: 500,000 synthetic 768-d float32 features (1.5 GB) are generated chunk by chunk straight into a store (never
   whole in memory); a fresh process then trains a linear head for one epoch by streaming the store and reports its
   peak RSS above the RSS it had with the model built and nothing read (target: under 1 GB).
2. Throughput: on 100,000 features that fit, the same head-training loop runs over (a) in-memory tensors with a global
   random permutation per epoch (the in-memory path) and (b) the store's shuffled chunk stream; the best of several
   interleaved epochs of each, and their ratio (target: streaming within 10%, ratio >= 0.90).

    .venv/bin/python benchmarks/feature_store_memory.py [--rows 500000] [--fit-rows 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mr2ft.featstore import CHUNK_ROWS, ChunkWriter, StoredFeatures

DIM, CLASSES, BATCH = 768, 100, 1024


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status in MiB (Linux)."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def rss_mb() -> float:
    """Current resident set size."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process image (VmHWM; unlike ru_maxrss, not inherited across exec)."""
    return _status_mb("VmHWM")


def write_store(index: Path, rows: int, seed: int = 0) -> None:
    """Synthetic class-structured features, generated and written one chunk at a time."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, DIM, generator=g)
    writer = ChunkWriter(index, {"key": "bench"}, CHUNK_ROWS)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        y = torch.randint(0, CLASSES, (n,), generator=g)
        writer.append(means[y] + 2.0 * torch.randn(n, DIM, generator=g), y)
    writer.close()


def make_head() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    head = torch.nn.Linear(DIM, CLASSES)
    return head, torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)


def train(batches, head: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, float]:
    """One epoch of the head over ``batches``; returns (rows seen, mean loss)."""
    rows, total = 0, 0.0
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows += len(y)
        total += float(loss.detach()) * len(y)
    return rows, total / max(rows, 1)


def in_memory_batches(x: torch.Tensor, y: torch.Tensor, epoch: int):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
    for b in range(0, len(y), BATCH):
        idx = perm[b : b + BATCH]
        yield x[idx], y[idx]


def stream_phase(index: Path) -> dict:
    """Run in a fresh process: stream one epoch over the store, report RSS."""
    head, opt = make_head()
    store = StoredFeatures.open(index, "bench")
    base = rss_mb()
    t0 = time.perf_counter()
    rows, loss = train(store.batches(BATCH, seed=0, epoch=0), head, opt)
    return {
        "rows": rows,
        "store_gb": store.nbytes / 1e9,
        "seconds": time.perf_counter() - t0,
        "loss": loss,
        "rss_base_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "targets_mb": store.targets.numel() * 8 / 2**20,
    }


def throughput(folder: Path, rows: int, repeats: int) -> dict:
    index = folder / "fit.safetensors"
    write_store(index, rows, seed=1)
    store = StoredFeatures.open(index, "bench")
    x, y = store.load()
    x = x.clone()  # truly in memory, not a view of the files
    mem, stream = [], []
    for r in range(repeats):
        for kind, times in (("memory", mem), ("stream", stream)):
            head, opt = make_head()
            batches = in_memory_batches(x, y, r) if kind == "memory" else store.batches(BATCH, seed=0, epoch=r)
            t0 = time.perf_counter()
            n, _ = train(batches, head, opt)
            times.append(n / (time.perf_counter() - t0))
    best_mem, best_stream = max(mem), max(stream)
    return {
        "rows": rows,
        "memory_rows_per_s": best_mem,
        "stream_rows_per_s": best_stream,
        "ratio": best_stream / best_mem,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--fit-rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same for both paths; a shared 2-core machine
    if args.stream_only:
        print(json.dumps(stream_phase(Path(args.stream_only))))
        return
    with tempfile.TemporaryDirectory(prefix="mr2ft-featstore-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        write_store(folder / "big.safetensors", args.rows)
        seconds, size = time.perf_counter() - t0, args.rows * DIM * 4 / 1e9
        print(
            f"wrote {args.rows} x {DIM} float32 features ({size:.2f} GB), chunks of {CHUNK_ROWS} rows: {seconds:.1f}s"
        )
        cmd = [sys.executable, __file__, "--stream-only", str(folder / "big.safetensors")]
        mem = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        beyond = mem["peak_rss_mb"] - mem["rss_base_mb"]
        print(
            f"memory: streamed {mem['rows']} rows ({mem['store_gb']:.2f} GB) through a linear head in "
            f"{mem['seconds']:.1f}s (loss {mem['loss']:.3f}); RSS with the model built {mem['rss_base_mb']:.0f} MiB, "
            f"peak {mem['peak_rss_mb']:.0f} MiB: {beyond:.0f} MiB beyond the model (targets {mem['targets_mb']:.0f} "
            f"MiB of it) -> {'PASS' if beyond < 1024 else 'FAIL'} (< 1024 MiB)"
        )
        tp = throughput(folder, args.fit_rows, args.repeats)
        print(
            f"throughput on {tp['rows']} rows that fit (best of {args.repeats}): in-memory "
            f"{tp['memory_rows_per_s']:.0f} rows/s, chunk stream {tp['stream_rows_per_s']:.0f} rows/s, ratio "
            f"{tp['ratio']:.3f} -> {'PASS' if tp['ratio'] >= 0.9 else 'FAIL'} (>= 0.90)"
        )


if __name__ == "__main__":
    main()
