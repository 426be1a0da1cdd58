"""What a job shows while it runs: experiment trackers (``--report-to``) and the live progress display.

Owns: :func:`parse_trackers` (the ``--report-to`` names, checked against Accelerate's trackers and what is
installed), :func:`tracker_config` (the run's settings as tracker hyper-parameters), :func:`eval_scalars` (the
figures logged at each evaluation), :func:`record_trackers` and :class:`TrackedRecords` (a probe's trackers, fed
from its ``metrics.jsonl`` records) and :class:`StepProgress` (a live Rich bar on a terminal, plain lines elsewhere;
main process only). The trackers themselves are Accelerate's (``Accelerator(log_with=...)``, ``init_trackers``,
``accelerator.log``, ``end_training``); TensorBoard writes its event files under ``RUN/mr2ft/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mr2ft.errors import UserError

LIVE_EVERY = 10  # optimizer steps between loss readings on the live bar
PROJECT = "mr2ft"  # the trackers' project name (TensorBoard: the sub-folder of the run folder)


def parse_trackers(text: str | None) -> list[str]:
    """The tracker names of ``--report-to`` (comma-separated; ``none`` or empty: no tracker).

    Raises:
        UserError: an unknown name, or a tracker whose package is not installed.
    """
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    from accelerate.tracking import _available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    for name in names:
        if name not in known:
            raise UserError(f"unknown --report-to tracker {name!r}; choose from {', '.join(sorted(known))}")
        if name not in {str(getattr(t, "value", t)) for t in _available_trackers}:
            raise UserError(
                f"--report-to {name}: the {name} package is not installed; pip install {name.replace('_', '-')} "
                "(or drop it from --report-to)"
            )
    return list(dict.fromkeys(names))


def tracker_config(cfg: Any) -> dict[str, Any]:
    """The run's settings as hyper-parameters: plain values only (None as "none", tuples as text)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            value = "none"
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[f.name] = value
    return out


def eval_scalars(prefix: str, summary: dict, gamma: Any = None) -> dict[str, float]:
    """The figures logged at each evaluation: overall, easy, medium, hard and worst-class accuracy, and the spread
    (standard deviation) of the class margins ``gamma`` when the loss keeps them."""
    groups = summary["groups"]
    values = {"top1": summary["top1"], "balanced_accuracy": summary["balanced_accuracy"]}
    values.update({g: groups[g]["accuracy"] for g in ("easy", "medium", "hard") if g in groups})
    values["worst_class"] = summary["worst_class"]["accuracy"]
    if gamma is not None and gamma.numel() > 1:
        values["gamma_std"] = float(gamma.float().std())
    return {f"{prefix}/{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


class TrackedRecords:
    """Where a probe sends its metrics records (:func:`mr2ft.io.log_record`): each record is appended to
    ``metrics.jsonl`` and its numbers are logged to the trackers as ``probe/<stage>/<key>`` (``final:jtt`` becomes
    ``probe/final/jtt/...``).

    A head fit's records carry its optimizer ``step``; the fits of one stage are counted on one after another, so
    the steps of every tag only grow. A record without a step (``rep_grad_share``, a sweep point's validation
    figures) is about the fit that just ended and is logged at its stage's last step; where that step already holds
    one (a sweep logs its points, not its fits), at the next step. A fit's ``stopped`` record repeats its last
    reading: it goes to ``metrics.jsonl`` only.
    """

    SKIP = ("step", "epoch")  # the x axis, not figures

    def __init__(self, accelerator: Any, path: str | Path) -> None:
        self.accelerator, self.path = accelerator, Path(path)
        self.start: dict[str, int] = {}  # per stage: the step the stage's next fit counts on from
        self.last: dict[str, int] = {}  # per stage: the last step used
        self.taken: set[str] = set()  # stages whose last step holds a record without a step

    def __call__(self, record: dict) -> None:
        from mr2ft.io import append_jsonl

        append_jsonl(self.path, record)
        stage = str(record.get("stage", "run")).replace(":", "/")
        last = self.last.get(stage, 0)
        if isinstance(record.get("step"), int):  # a head fit's reading
            step = self.start.get(stage, 0) + record["step"]
            self.taken.discard(stage)
        elif record.get("event") == "stopped":  # the next fit of the stage counts on from here
            self.start[stage] = last
            return
        else:
            step = last + 1 if stage in self.taken else last
            self.taken.add(stage)
            self.start[stage] = step
        self.last[stage] = step
        values = {f"probe/{stage}/{k}": float(v) for k, v in record.items() if k not in self.SKIP and _is_figure(v)}
        if values:
            self.accelerator.log(values, step=step)

    def evaluation(self, prefix: str, summary: dict, gamma: Any = None, step: int = 0) -> None:
        """Log an evaluation's figures (:func:`eval_scalars`) at ``step``."""
        self.accelerator.log(eval_scalars(prefix, summary, gamma), step=step)


def _is_figure(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@contextlib.contextmanager
def record_trackers(cfg: Any, run_dir: Path, path: Path) -> Iterator[TrackedRecords | None]:
    """The trackers of ``cfg.report_to`` for a job whose training runs in this process alone (a probe's head fits,
    on the main process of a launch): a :class:`TrackedRecords` writing ``path`` and logging to an Accelerator's
    trackers under ``run_dir``, started with the run's settings; None when no tracker is asked for.

    The trackers are ended on the way out, errors included, and Accelerate's process-wide state (when this call
    created it) is released again, so that a later job in the same process starts afresh.
    """
    names = parse_trackers(cfg.report_to)
    if not names:
        yield None
        return
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    fresh = not AcceleratorState._shared_state
    accelerator = Accelerator(log_with=names, project_dir=str(run_dir))
    try:
        accelerator.init_trackers(PROJECT, config=tracker_config(cfg))
        yield TrackedRecords(accelerator, path)
    finally:
        accelerator.end_training()
        if fresh:
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()


class StepProgress:
    """Progress of the training steps: a live bar (images/s, loss, time left) when the console is a terminal, else
    a plain line every ``every`` steps. Only the main process builds one (others pass ``console=None``)."""

    def __init__(self, console: Any, total_steps: int, every: int, live: bool | None = None) -> None:
        self.console, self.total, self.every = console, total_steps, every
        self.live = bool(console is not None and (console.is_terminal if live is None else live))
        self.bar: Any = None
        self.task: Any = None
        self.shown = False  # the live bar shows a loss reading

    def start(self, step: int, description: str = "train") -> None:
        """Show the bar from ``step`` (a resumed run starts part-way)."""
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=self.total, completed=step, info="")

    def update(self, step: int, loss: Any, lr: float, images_per_s: float) -> None:
        """One optimizer step done (``loss`` is read only when shown, every ``LIVE_EVERY`` steps: it syncs the
        device)."""
        if self.bar is not None:
            info = {}
            if step % LIVE_EVERY == 0 or not self.shown:
                self.shown = True
                info["info"] = f"loss {float(loss):.4f}  lr {lr:.3g}  {images_per_s:.1f} images/s"
            self.bar.update(self.task, completed=step, **info)
        elif self.console is not None and step % self.every == 0:
            self.console.print(
                f"step {step}/{self.total}  loss {float(loss):.4f}  lr {lr:.3g}  {images_per_s:.1f} images/s",
                highlight=False,
                soft_wrap=True,
            )

    def wrap(self, loader: Any, description: str) -> Any:
        """Iterate ``loader`` (an evaluation) with its own transient bar when live."""
        if self.bar is None:
            yield from loader
            return
        task = self.bar.add_task(description, total=len(loader), info="")
        for batch in loader:
            yield batch
            self.bar.advance(task)
        self.bar.remove_task(task)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Throughput:
    """Images per second since the last reading (for the trackers' ``train/images_per_s``)."""

    def __init__(self) -> None:
        self.t, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.t, 1e-9)
        self.t, self.images = now, 0
        return rate


__all__ = [
    "PROJECT",
    "StepProgress",
    "Throughput",
    "TrackedRecords",
    "eval_scalars",
    "parse_trackers",
    "record_trackers",
    "tracker_config",
]
