"""The ``mr2ft`` command line: parses options, resolves the config, calls the library. No training logic here."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer

from mr2ft import __version__
from mr2ft.errors import UserError

app = typer.Typer(
    name="mr2ft",
    help="Fine-tune pretrained vision backbones with MR2 and see, class by class, what happened to the hard classes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEBUG = {"on": bool(os.environ.get("MR2FT_DEBUG"))}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mr2ft {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """mr2ft: MR2 margin regularization for fine-tuning and probing vision backbones."""
    # Set on every invocation: an earlier --debug call in the same process (tests, notebooks) must not stick.
    DEBUG["on"] = bool(os.environ.get("MR2FT_DEBUG")) or debug


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`UserError` into one line on stderr and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if DEBUG["on"]:
                raise
            typer.echo(f"error: {e.message}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


# ---- commands -------------------------------------------------------------------------------------------------


def _grid(text: str | None) -> tuple[float, ...] | None:
    """Parse a comma-separated grid of numbers."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"a grid must be comma-separated numbers, got {text!r}") from None


# Options that mean the same in every command that takes them (one definition, one help text).
BACKBONE_OPT = typer.Option(None, "--backbone", help="Backbone family: clip, mae, mocov2 or timm.")
BASELINE_OPT = typer.Option(None, "--baseline", help="A run whose per-class accuracy fixes the groups.")
C_BAR_OPT = typer.Option(None, "--c-bar", help="MR2's average margin.")
CACHE_DIR_OPT = typer.Option(None, "--cache-dir", help="Feature cache folder (default ~/.cache/mr2ft).")
DATASET_OPT = typer.Option(None, "--dataset", help="Folder, CSV, hf:NAME[:CONFIG], or a known name.")
EXTRACT_BATCH_SIZE_OPT = typer.Option(None, "--extract-batch-size", help="Batch of the feature pass.")
IMAGE_COLUMN_OPT = typer.Option(None, "--image-column", help="Image column of an hf: dataset.")
IMAGE_SIZE_OPT = typer.Option(None, "--image-size", help="Input size (default: the weights' own).")
LABEL_COLUMN_OPT = typer.Option(None, "--label-column", help="Label column of an hf: dataset.")
LR_OPT = typer.Option(None, "--lr", help="Learning rate.")
MARGIN_MODE_OPT = typer.Option(None, "--margin-mode", help="scale (default) or additive.")
MAX_PER_CLASS_OPT = typer.Option(None, "--max-per-class", help="At most N training images per class.")
MODEL_OPT = typer.Option(None, "--model", help="Architecture (e.g. ViT-B-16, vit_base_patch16_224).")
NORMALIZE_OPT = typer.Option(None, "--normalize/--no-normalize", help="L2-normalise features (CLIP's default is on).")
NUM_WORKERS_OPT = typer.Option(None, "--num-workers", help="Image decoding workers.")
OPTIMIZER_OPT = typer.Option(None, "--optimizer", help="adamw or sgd.")
OUT_OPT = typer.Option(None, "--out", help="Run folder (default runs/<backbone>-<dataset>-<loss>-<time>).")
OVERWRITE_OPT = typer.Option(None, "--overwrite", help="Replace an existing run folder.")
P_OPT = typer.Option(None, "--p", help="Norm of MR2's class statistics (default 2; 5 when normalised).")
POOL_OPT = typer.Option(None, "--pool", help="ViT pooling: cls or mean.")
SEED_OPT = typer.Option(None, "--seed", help="Seed of every random choice.")
SHOTS_OPT = typer.Option(None, "--shots", help="Exactly K training images per class.")
SKIP_BAD_IMAGES_OPT = typer.Option(
    None, "--skip-bad-images/--no-skip-bad-images", help="Skip (and count) corrupt images instead of stopping."
)
SWEEP_CRITERION_OPT = typer.Option(None, "--sweep-criterion", help="overall or hard (group accuracy).")
TEST_MAX_PER_CLASS_OPT = typer.Option(
    None, "--test-max-per-class", help="At most N test images per class (a quicker, balanced test)."
)
WARMUP_EPOCHS_OPT = typer.Option(None, "--warmup-epochs", help="Linear warm-up, then cosine.")
WEIGHTS_OPT = typer.Option(
    None, "--weights", help="Pretrained tag, hub id, local file or folder; 'none' for random weights."
)


@app.command("probe")
@user_errors
def probe_command(
    backbone: str | None = BACKBONE_OPT,
    model: str | None = MODEL_OPT,
    weights: str | None = WEIGHTS_OPT,
    dataset: str | None = DATASET_OPT,
    image_column: str | None = IMAGE_COLUMN_OPT,
    label_column: str | None = LABEL_COLUMN_OPT,
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Share of train held out for choices."),
    shots: int | None = SHOTS_OPT,
    max_per_class: int | None = MAX_PER_CLASS_OPT,
    test_max_per_class: int | None = TEST_MAX_PER_CLASS_OPT,
    skip_bad_images: bool | None = SKIP_BAD_IMAGES_OPT,
    normalize: bool | None = NORMALIZE_OPT,
    pool: str | None = POOL_OPT,
    image_size: int | None = IMAGE_SIZE_OPT,
    loss: str | None = typer.Option(None, "--loss", help="ce, mr2, uniform, focal, ldam, la, dro, jtt or lff."),
    c_bar: float | None = C_BAR_OPT,
    p: float | None = P_OPT,
    margin_mode: str | None = MARGIN_MODE_OPT,
    head: str | None = typer.Option(None, "--head", help="linear, bn_linear (MAE protocol) or zeroshot (CLIP)."),
    optimizer: str | None = OPTIMIZER_OPT,
    lr: float | None = LR_OPT,
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="Weight decay."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs over the cached features."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size of the head's training."),
    warmup_epochs: float | None = WARMUP_EPOCHS_OPT,
    seed: int | None = SEED_OPT,
    num_workers: int | None = NUM_WORKERS_OPT,
    extract_batch_size: int | None = EXTRACT_BATCH_SIZE_OPT,
    cache_dir: str | None = CACHE_DIR_OPT,
    sweep_wd: bool | None = typer.Option(None, "--sweep-wd/--no-sweep-wd", help="Choose weight decay on validation."),
    wd_grid: str | None = typer.Option(None, "--wd-grid", help="Comma-separated weight decays for --sweep-wd."),
    sweep_cbar: bool | None = typer.Option(None, "--sweep-cbar/--no-sweep-cbar", help="Choose c_bar on validation."),
    sweep_temperature: bool | None = typer.Option(
        None, "--sweep-temperature/--no-sweep-temperature", help="Choose CE's global temperature on validation."
    ),
    cbar_grid: str | None = typer.Option(None, "--cbar-grid", help="Comma-separated c_bar / temperature grid."),
    sweep_criterion: str | None = SWEEP_CRITERION_OPT,
    jtt_upweight: float | None = typer.Option(None, "--jtt-upweight", help="JTT's upweight of ERM errors."),
    baseline: str | None = BASELINE_OPT,
    out: str | None = OUT_OPT,
    overwrite: bool | None = OVERWRITE_OPT,
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe name or YAML path; flags override it."),
) -> None:
    """Linear probe on cached features of a frozen backbone, with MR2 or any baseline loss."""
    from mr2ft import probe
    from mr2ft.config import ProbeConfig, build_config

    values = dict(locals())
    values.pop("recipe")
    values.pop("probe", None)
    values.pop("ProbeConfig", None)
    values.pop("build_config", None)
    values["wd_grid"] = _grid(wd_grid)
    values["cbar_grid"] = _grid(cbar_grid)
    cfg = build_config(ProbeConfig, recipe, **values)
    probe.run(cfg)


@app.command("finetune")
@user_errors
def finetune_command(
    backbone: str | None = BACKBONE_OPT,
    model: str | None = MODEL_OPT,
    weights: str | None = WEIGHTS_OPT,
    dataset: str | None = DATASET_OPT,
    image_column: str | None = IMAGE_COLUMN_OPT,
    label_column: str | None = LABEL_COLUMN_OPT,
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="Share of train held out to pick the best epoch (default: none, use test)."
    ),
    shots: int | None = SHOTS_OPT,
    max_per_class: int | None = MAX_PER_CLASS_OPT,
    test_max_per_class: int | None = TEST_MAX_PER_CLASS_OPT,
    skip_bad_images: bool | None = SKIP_BAD_IMAGES_OPT,
    normalize: bool | None = NORMALIZE_OPT,
    pool: str | None = POOL_OPT,
    loss: str | None = typer.Option(None, "--loss", help="ce, mr2, uniform, focal, ldam, la or dro."),
    c_bar: float | None = C_BAR_OPT,
    lambda_rep: float | None = typer.Option(None, "--lambda-rep", help="Weight of MR2's representation margin."),
    p: float | None = P_OPT,
    momentum: float | None = typer.Option(None, "--momentum", help="EMA momentum of MR2's class statistics."),
    margin_mode: str | None = MARGIN_MODE_OPT,
    temperature_factor: float | None = typer.Option(
        None, "--temperature-factor", help="MR2's representation-margin temperature factor."
    ),
    head: str | None = typer.Option(None, "--head", help="linear, or zeroshot (CLIP: head from text prompts)."),
    optimizer: str | None = OPTIMIZER_OPT,
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (not scaled by batch size)."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="Weight decay (never on norms, biases)."),
    layer_decay: float | None = typer.Option(None, "--layer-decay", help="Layer-wise lr decay for ViTs (e.g. 0.65)."),
    drop_path: float | None = typer.Option(None, "--drop-path", help="Stochastic depth rate."),
    image_size: int | None = IMAGE_SIZE_OPT,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs over the training split."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size per process."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    grad_clip: float | None = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this value."),
    warmup_epochs: float | None = WARMUP_EPOCHS_OPT,
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Warm-up in steps (overrides epochs)."),
    mixed_precision: str | None = typer.Option(
        None, "--mixed-precision", help="no, bf16 or fp16 (CUDA); default: accelerate's config."
    ),
    randaugment: str | None = typer.Option(None, "--randaugment", help="timm RandAugment, e.g. rand-m9-mstd0.5."),
    mixup: float | None = typer.Option(None, "--mixup", help="Mixup alpha (ce only)."),
    cutmix: float | None = typer.Option(None, "--cutmix", help="CutMix alpha (ce only)."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="Label smoothing (ce only)."),
    samples_per_class: int | None = typer.Option(
        None, "--samples-per-class", help="Class-balanced batches with M samples of each drawn class."
    ),
    wise_alpha: float | None = typer.Option(
        None, "--wise-alpha", help="WiSE-FT: evaluate (1-A) zero-shot + A fine-tuned weights (needs --head zeroshot)."
    ),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps."),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Evaluate (and checkpoint) every N epochs."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimizer steps (same schedule)."),
    resume: str | None = typer.Option(
        None, "--resume", help="Continue a run: its folder (latest checkpoint) or one checkpoints/ckpt-* folder."
    ),
    seed: int | None = SEED_OPT,
    num_workers: int | None = typer.Option(None, "--num-workers", help="Image decoding workers per process."),
    baseline: str | None = BASELINE_OPT,
    out: str | None = OUT_OPT,
    overwrite: bool | None = OVERWRITE_OPT,
    recipe: str | None = typer.Option(
        None, "--recipe", help="Recipe name or YAML path; flags override it (with --resume: the run's config.yaml)."
    ),
) -> None:
    """Fine-tune a backbone end to end (one process, or many under `accelerate launch -m mr2ft finetune`)."""
    values = dict(locals())
    from mr2ft import finetune
    from mr2ft.config import FinetuneConfig, build_config

    recipe = values.pop("recipe")
    if resume and recipe is None:
        # Resuming repeats the run's own settings; flags typed now override them (and are checked for conflicts).
        values = {**finetune.resume_settings(resume), **{k: v for k, v in values.items() if v is not None}}
    cfg = build_config(FinetuneConfig, recipe, **values)
    finetune.run(cfg)


@app.command("report")
@user_errors
def report_command(
    run: str = typer.Argument(..., help="A finished run folder (written by probe or finetune)."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="A baseline run on the same data: fixes the easy/medium/hard groups and the deltas."
    ),
    formats: str = typer.Option("json,csv,md,html", "--format", help="Comma-separated: json,csv,md,html."),
) -> None:
    """Write the per-class report (report.json, per_class.csv, report.md, report.html) into RUN."""
    from mr2ft.report import headline, write_report

    result = write_report(run, baseline, formats)
    typer.echo(headline(result))
    typer.echo(result["grouping"]["rule"])
    for path in result["files"]:
        typer.echo(f"wrote {path}")


@app.command("compare")
@user_errors
def compare_command(
    runs: list[str] = typer.Argument(..., help="Run folders tested on the same test set."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="Reference run that fixes the groups and the deltas (default: the first run)."
    ),
    out: str | None = typer.Option(None, "--out", help="Also write compare.md and compare.csv into this folder."),
    n_boot: int = typer.Option(1000, "--n-boot", min=1, help="Paired bootstrap resamples for the intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
) -> None:
    """Put many runs into the paper's table (overall, easy, medium, hard, worst class, std) with bootstrap intervals."""
    from rich.console import Console

    from mr2ft.report import compare_runs, compare_table, write_compare

    result = compare_runs(runs, baseline, n_boot=n_boot, seed=seed)
    Console().print(compare_table(result))
    if out is not None:
        for path in write_compare(result, out):
            typer.echo(f"wrote {path}")


@app.command("study")
@user_errors
def study_command(
    backbone: str | None = BACKBONE_OPT,
    model: str | None = MODEL_OPT,
    weights: str | None = WEIGHTS_OPT,
    dataset: str | None = DATASET_OPT,
    image_column: str | None = IMAGE_COLUMN_OPT,
    label_column: str | None = LABEL_COLUMN_OPT,
    mode: str | None = typer.Option(None, "--mode", help="probe (heads on cached features) or finetune (end to end)."),
    seeds: int | None = typer.Option(None, "--seeds", help="Training seeds per method (default 3)."),
    n_boot: int | None = typer.Option(None, "--n-boot", help="Paired bootstrap resamples for the intervals."),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="Share of train held out for the choices (probe: default 0.2)."
    ),
    shots: int | None = SHOTS_OPT,
    max_per_class: int | None = MAX_PER_CLASS_OPT,
    test_max_per_class: int | None = TEST_MAX_PER_CLASS_OPT,
    skip_bad_images: bool | None = SKIP_BAD_IMAGES_OPT,
    normalize: bool | None = NORMALIZE_OPT,
    pool: str | None = POOL_OPT,
    image_size: int | None = IMAGE_SIZE_OPT,
    c_bar: float | None = typer.Option(None, "--c-bar", help="finetune mode: the control's and MR2's c_bar."),
    p: float | None = P_OPT,
    margin_mode: str | None = MARGIN_MODE_OPT,
    head: str | None = typer.Option(None, "--head", help="linear, bn_linear (MAE probe protocol) or zeroshot (CLIP)."),
    optimizer: str | None = OPTIMIZER_OPT,
    lr: float | None = LR_OPT,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs of each fit."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size of each fit."),
    warmup_epochs: float | None = WARMUP_EPOCHS_OPT,
    seed: int | None = typer.Option(None, "--seed", help="First training seed, and the validation split's seed."),
    num_workers: int | None = NUM_WORKERS_OPT,
    extract_batch_size: int | None = EXTRACT_BATCH_SIZE_OPT,
    cache_dir: str | None = CACHE_DIR_OPT,
    wd_grid: str | None = typer.Option(None, "--wd-grid", help="Comma-separated weight decays tried on validation."),
    cbar_grid: str | None = typer.Option(
        None, "--cbar-grid", help="Comma-separated grid of MR2's and the control's c_bar (and ERM's temperature)."
    ),
    sweep_criterion: str | None = SWEEP_CRITERION_OPT,
    out: str | None = typer.Option(None, "--out", help="Study folder (default runs/<backbone>-<dataset>-study-TIME)."),
    overwrite: bool | None = typer.Option(None, "--overwrite", help="Replace an existing study folder."),
    recipe: str | None = typer.Option(
        None, "--recipe", help="Recipe name or YAML path (probe settings; a fine-tune recipe with --mode finetune)."
    ),
) -> None:
    """ERM vs a matched uniform-margin control vs MR2 over seeds: the table, bootstrap intervals and a verdict."""
    values = dict(locals())
    from mr2ft.study import run_study, study_configs

    recipe = values.pop("recipe")
    values["wd_grid"] = _grid(wd_grid)
    values["cbar_grid"] = _grid(cbar_grid)
    cfg, finetune_cfg = study_configs(recipe, **values)
    run_study(cfg, finetune_cfg=finetune_cfg)


@app.command("demo")
@user_errors
def demo_command(
    out: str | None = typer.Option(None, "--out", help="Study folder (default runs/demo-<time>)."),
    seeds: int | None = typer.Option(None, "--seeds", help="Seeds per method (recipe: 3)."),
    max_per_class: int | None = typer.Option(None, "--max-per-class", help="Training images per class (recipe: 150)."),
    test_max_per_class: int | None = typer.Option(
        None, "--test-max-per-class", help="Test images per class (recipe: 150)."
    ),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Feature cache folder (default ~/.cache/mr2ft)."),
    num_workers: int | None = typer.Option(None, "--num-workers", help="Image decoding workers."),
    overwrite: bool | None = typer.Option(None, "--overwrite", help="Replace an existing --out folder."),
) -> None:
    """The whole story on real data that ships: EfficientNet-Lite0 on Fashion-MNIST, ERM vs control vs MR2."""
    from mr2ft.demo import run_demo

    run_demo(
        out=out,
        seeds=seeds,
        max_per_class=max_per_class,
        test_max_per_class=test_max_per_class,
        cache_dir=cache_dir,
        num_workers=num_workers,
        overwrite=overwrite,
    )


recipes_app = typer.Typer(help="List and show the recipes that ship with mr2ft.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
@user_errors
def recipes_list() -> None:
    """List the recipes (use one with --recipe NAME)."""
    from mr2ft.config import load_recipe, recipe_names

    for name in recipe_names():
        data = load_recipe(name)
        typer.echo(f"{name:24s} {data.get('command', '?'):9s} {data.get('description', '')}")


@recipes_app.command("show")
@user_errors
def recipes_show(name: str = typer.Argument(..., help="Recipe name or YAML path.")) -> None:
    """Print a recipe's YAML."""
    from mr2ft.config import recipe_path

    typer.echo(recipe_path(name).read_text(encoding="utf-8"), nl=False)


def run() -> None:  # pragma: no cover - console entry used by ``python -m mr2ft``
    app(prog_name="mr2ft")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
