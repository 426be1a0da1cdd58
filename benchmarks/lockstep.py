"""Lockstep timing of training variants, shared by ``finetune_throughput.py`` and ``finetune_switches.py``.

A shared 2-core machine drifts by 10-30% within seconds, far more than the few percent being measured, so timing
whole runs one after another cannot resolve them. Here the variants run in lockstep: one process each, taking turns
one optimizer step at a time (a baton passed through semaphores from a global optimizer step hook; the waiting
processes sleep). Step i of every variant thus runs within seconds of the others, and the paired per-step ratios
cancel the drift. A step is timed from taking the baton to the end of its optimizer step, so loading its batch
counts. The processes exit together, once the last one is done. Rounds rotate which variant goes first.

    rounds = run_rounds(job, ["plain", "fast"], {"fast / plain, images/s": ("plain", "fast")}, repeats=3, steps=20)

``job`` is a picklable callable (a module-level function, or ``functools.partial`` of one) that trains the named
variant in its own process; its optimizer steps are what is timed.
"""

from __future__ import annotations

import contextlib
import io
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _images import make_image_folder  # noqa: E402

Timings = tuple[list[float], list[int]]  # per optimizer step: seconds, minor page faults


class EnoughSteps(Exception):
    """Raised from the step hook once a variant has run the steps asked for: what follows is not timed."""


class Baton:
    """Round-robin turns between processes: one runs, the others wait on their semaphore."""

    def __init__(self, me: int, semaphores: list, done: Any, finished: Any) -> None:
        self.me, self.semaphores, self.done, self.finished = me, semaphores, done, finished

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
        """Give the turn away for good, then wait for the others to finish too: a process that exits (freeing its
        memory, stopping its threads) while another one steps would slow that step down."""
        self.done[self.me] = 1
        j = self._next()
        if j is None:
            self.finished.set()
        else:
            self.semaphores[j].release()
        self.finished.wait()


def _variant(
    job: Callable[[str], None],
    name: str,
    me: int,
    threads: int | None,
    stop_after: int | None,
    sync: tuple[list, Any, Any],
    queue: Any,
) -> None:
    """One variant in its own process: run it, timing each optimizer step between turns (``stop_after`` of them)."""
    if threads:
        torch.set_num_threads(threads)
    baton = Baton(me, *sync)
    times: list[float] = []
    faults: list[int] = []
    clock = {"start": 0.0, "faults": 0}
    cuda = torch.cuda.is_available()

    def after_step(*_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()  # the step is done when the GPU is, not when its kernels are queued
        times.append(time.perf_counter() - clock["start"])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - clock["faults"])
        if len(times) == stop_after:
            raise EnoughSteps  # the run's evaluation and report would only cost time
        baton.pass_on()
        clock["start"] = time.perf_counter()
        clock["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    baton.wait()
    handle = register_optimizer_step_post_hook(after_step)
    clock["start"] = time.perf_counter()
    clock["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        job(name)
    except EnoughSteps:
        pass
    finally:
        handle.remove()
        queue.put((name, (times, faults)))
        baton.leave()


def lockstep(
    job: Callable[[str], None], order: list[str], threads: int | None = None, stop_after: int | None = None
) -> dict[str, Timings]:
    """Run the variants in ``order`` step by step (each to its end, or for ``stop_after`` optimizer steps); each
    one's step times and page faults per step."""
    ctx = mp.get_context("spawn")
    sync = ([ctx.Semaphore(0) for _ in order], ctx.Array("b", len(order)), ctx.Event())
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_variant, args=(job, name, i, threads, stop_after, sync, queue))
        for i, name in enumerate(order)
    ]
    for proc in procs:
        proc.start()
    sync[0][0].release()
    results = dict(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"a benchmark process failed (exit code {proc.exitcode})")
    return results


@dataclass
class Rounds:
    """What :func:`run_rounds` measured, per round."""

    pairs: dict[str, list[list[float]]]  # comparison -> per round, the paired step-time ratios a / b
    medians: dict[str, list[float]] = field(default_factory=dict)  # variant -> per round, median step seconds
    faults: dict[str, list[int]] = field(default_factory=dict)  # variant -> page faults of every kept step
    times: list[dict[str, list[float]]] = field(default_factory=list)  # per round, variant -> every step's seconds

    def pooled(self, key: str) -> list[float]:
        return [v for round_ in self.pairs[key] for v in round_]

    def round_medians(self, key: str) -> list[float]:
        return [statistics.median(round_) for round_ in self.pairs[key]]


def run_rounds(
    job: Callable[[str], None],
    names: list[str],
    comparisons: dict[str, tuple[str, str]],
    repeats: int,
    steps: int,
    epochs: int = 1,
    skip: int = 1,
    threads: int | None = None,
    stop_after_last: bool = False,
) -> Rounds:
    """``repeats`` lockstep rounds of ``names``, each starting with the next variant.

    Args:
        comparisons: name -> (a, b): the per-step ratio time(a) / time(b); with a the reference, that is b's
            images/s over a's.
        steps: optimizer steps per epoch of every variant, over ``epochs`` epochs.
        skip: steps left out at the start of each epoch (process start, compilation, evaluation, loader start).
        stop_after_last: end each variant right after its last step (its final evaluation is not timed anyway).
    """
    out = Rounds({key: [] for key in comparisons}, {n: [] for n in names}, {n: [] for n in names})
    for r in range(repeats):
        k = r % len(names)
        stop_after = steps * epochs if stop_after_last else None
        results = lockstep(job, names[k:] + names[:k], threads, stop_after)
        counts = {name: len(t) for name, (t, _) in results.items()}
        if set(counts.values()) != {steps * epochs}:
            raise SystemExit(f"expected {steps * epochs} steps per variant, got {counts}")
        kept = [i for i in range(steps * epochs) if i % steps >= skip]
        times = {name: t for name, (t, _) in results.items()}
        out.times.append(times)
        for key, (a, b) in comparisons.items():
            out.pairs[key].append([times[a][i] / times[b][i] for i in kept])
        for name in names:
            out.medians[name].append(statistics.median(times[name][i] for i in kept))
            out.faults[name] += [results[name][1][i] for i in kept]
    return out


def quartiles(values: list[float], fmt: str) -> str:
    """``median [q1, q3]``."""
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{format(q2, fmt)} [{format(q1, fmt)}, {format(q3, fmt)}]"


def make_data(root: Path, classes: int, per_class: int, size: int) -> Path:
    """Generated training images, and a small test split (evaluation is not timed, so it only needs to exist)."""
    make_image_folder(root, classes, per_class, size=size, splits=("train",))
    make_image_folder(root, classes, 2, size=size, splits=("test",), seed=1)
    return root


def quiet_finetune(out: Path, **settings: Any) -> None:
    """``mr2ft.finetune.run`` with ``settings`` (Accelerate picks the device: the GPU when there is one), silenced."""
    from mr2ft import finetune
    from mr2ft.config import FinetuneConfig, build_config

    cfg = build_config(FinetuneConfig, **{"weights": "none", **settings}, out=str(out), overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        finetune.run(cfg)


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
