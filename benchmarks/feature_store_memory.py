"""Peak memory and head-training throughput of the probe's own code when it streams the chunked feature store.

1. Memory: 500,000 synthetic 768-d float32 features of 100 classes (1.5 GB) and 10,000 test features are generated
   chunk by chunk straight into stores (never whole in memory). A fresh process builds the ProbeData that
   ``--feature-memory stream`` gives the probe (:class:`mr2ft.featrows.StoredRows` over each store) and runs the
   probe's fit, :func:`mr2ft.probe.fit_probe` with MR2: class statistics from the store, a weight-decay sweep on a
   stratified 20% validation share, the refit on train+val, predictions on validation and test. It reports its peak
   RSS above the RSS it had with the code imported and warmed up by a small in-memory fit, before any feature was
   read (target: under 1 GB). To keep the run short the budget is fixed: ``--epochs 1`` per fit, two weight decays.
2. Throughput: on 100,000 features that fit, the same fit (:func:`mr2ft.headfit.fit_head`, cross-entropy, a fixed
   ``--epochs`` budget) runs on in-memory tensors (a global random order) and on the store (chunk-blocked order,
   standardised per batch), interleaved, in alternating order; rows per second of each, and the ratio of the best
   of each (target: streaming within 10%, ratio >= 0.90).

    .venv/bin/python benchmarks/feature_store_memory.py [--rows 500000] [--fit-rows 100000] [--fit-epochs 2]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from mr2ft.config import ProbeConfig
from mr2ft.featrows import StoredRows
from mr2ft.featstore import CHUNK_ROWS, ChunkWriter, StoredFeatures
from mr2ft.headfit import Features, fit_head
from mr2ft.losses import build_loss

DIM, CLASSES, BATCH, TEST_ROWS = 768, 100, 1024, 10_000


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
    """Synthetic class-structured features (class means shared by every store), written one chunk at a time."""
    means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    writer = ChunkWriter(index, {"key": "bench"}, CHUNK_ROWS)
    for start in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - start)
        y = torch.randint(0, CLASSES, (n,), generator=g)
        writer.append(means[y] + 8.0 * torch.randn(n, DIM, generator=g), y)
    writer.close()


def probe_data(train: Features, test: Features):
    """The ProbeData of synthetic features: no backbone to run, features not L2-normalised."""
    from mr2ft.probe import ProbeData

    where = "memory" if isinstance(train.x, torch.Tensor) else "stream"
    return ProbeData(
        SimpleNamespace(normalize=False), SimpleNamespace(num_classes=CLASSES), train, None, test, None, where
    )


def memory_phase(folder: Path, epochs: int) -> dict:
    """Run in a fresh process: the probe's fit on the stores, streamed; report RSS."""
    from mr2ft.probe import fit_probe

    cfg = ProbeConfig(dataset="synthetic", loss="mr2", epochs=epochs, batch_size=BATCH, wd_grid=(1e-3, 1e-2))
    g = torch.Generator().manual_seed(1)
    small = Features(torch.randn(2 * BATCH, DIM, generator=g), torch.arange(2 * BATCH) % CLASSES)
    fit_probe(cfg, probe_data(small, small), None)  # warm-up: code paths, kernels and thread pools, on 6 MiB
    base = rss_mb()
    train = StoredFeatures.open(folder / "train.safetensors", "bench")
    test = StoredFeatures.open(folder / "test.safetensors", "bench")
    data = probe_data(Features(StoredRows.of(train), train.targets), Features(StoredRows.of(test), test.targets))
    t0 = time.perf_counter()
    result = fit_probe(cfg, data, None)
    return {
        "rows": len(train),
        "store_gb": train.nbytes / 1e9,
        "seconds": time.perf_counter() - t0,
        "weight_decay": result.weight_decay,
        "test_top1": 100.0 * float((result.logits.argmax(1) == test.targets).float().mean()),
        "fits": f"{result.stopped.steps} steps in the refit",
        "rss_base_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "targets_mb": (train.targets.numel() + test.targets.numel()) * 8 / 2**20,
    }


def throughput(folder: Path, rows: int, epochs: int, repeats: int) -> dict:
    """Rows per second of the same fit on in-memory tensors and streamed from the store, interleaved."""
    index = folder / "fit.safetensors"
    write_store(index, rows, seed=2)
    store = StoredFeatures.open(index, "bench")
    x, y = store.load()
    kinds = {"memory": Features(x.clone(), y), "stream": Features(StoredRows.of(store), y)}  # clone: not a file view
    cfg = ProbeConfig(dataset="synthetic", epochs=epochs, batch_size=BATCH)
    speed: dict[str, list[float]] = {k: [] for k in kinds}
    loss: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        for kind in ("memory", "stream") if r % 2 == 0 else ("stream", "memory"):
            t0 = time.perf_counter()
            _, stopped = fit_head(cfg, kinds[kind], CLASSES, build_loss("ce", CLASSES, DIM), weight_decay=1e-3, seed=r)
            speed[kind].append(stopped.steps * BATCH / (time.perf_counter() - t0))
            loss[kind].append(stopped.train_loss)
    return {
        "rows": rows,
        **{f"{k}_rows_per_s": max(v) for k, v in speed.items()},
        **{f"{k}_median": statistics.median(v) for k, v in speed.items()},
        **{f"{k}_loss": statistics.mean(v) for k, v in loss.items()},
        "ratio": max(speed["stream"]) / max(speed["memory"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per fit in the memory phase")
    ap.add_argument("--fit-rows", type=int, default=100_000)
    ap.add_argument("--fit-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the same for both paths; a shared 2-core machine
    if args.memory_phase:
        print(json.dumps(memory_phase(Path(args.memory_phase), args.epochs)))
        return
    with tempfile.TemporaryDirectory(prefix="mr2ft-featstore-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        write_store(folder / "train.safetensors", args.rows, seed=0)
        write_store(folder / "test.safetensors", TEST_ROWS, seed=1)
        seconds, size = time.perf_counter() - t0, args.rows * DIM * 4 / 1e9
        print(
            f"wrote {args.rows} x {DIM} float32 features ({size:.2f} GB, {CLASSES} classes) and {TEST_ROWS} test "
            f"features, chunks of {CHUNK_ROWS} rows: {seconds:.1f}s"
        )
        cmd = [sys.executable, __file__, "--memory-phase", str(folder), "--epochs", str(args.epochs)]
        mem = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        beyond = mem["peak_rss_mb"] - mem["rss_base_mb"]
        print(
            f"memory: probe.fit_probe streamed over {mem['rows']} rows ({mem['store_gb']:.2f} GB): MR2 statistics, "
            f"sweep of 2 weight decays on a 20% validation share, refit on train+val, --epochs {args.epochs} per fit, "
            f"{mem['seconds']:.1f}s; chose wd {mem['weight_decay']:g}, test top-1 {mem['test_top1']:.1f}%. RSS with "
            f"the code warmed up {mem['rss_base_mb']:.0f} MiB, peak {mem['peak_rss_mb']:.0f} MiB: {beyond:.0f} MiB "
            f"beyond (targets {mem['targets_mb']:.0f} MiB of it) -> {'PASS' if beyond < 1024 else 'FAIL'} (< 1024 MiB)"
        )
        tp = throughput(folder, args.fit_rows, args.fit_epochs, args.repeats)
        print(
            f"throughput: headfit.fit_head (ce, --epochs {args.fit_epochs}, batch {BATCH}) on {tp['rows']} rows that "
            f"fit, {args.repeats} interleaved repeats: in-memory best {tp['memory_rows_per_s']:.0f} rows/s (median "
            f"{tp['memory_median']:.0f}, loss {tp['memory_loss']:.4f}), streamed best {tp['stream_rows_per_s']:.0f} "
            f"rows/s (median {tp['stream_median']:.0f}, loss {tp['stream_loss']:.4f}); ratio {tp['ratio']:.3f} -> "
            f"{'PASS' if tp['ratio'] >= 0.9 else 'FAIL'} (>= 0.90)"
        )


if __name__ == "__main__":
    main()
