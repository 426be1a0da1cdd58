"""The ``mr2ft`` command line: parses options, resolves the config, calls the library. No training logic here.

Every mistake ends in one ``error:`` line and exit code 2, and cheap checks (numbers, paths, the run folder's lock)
run before torch or any job module is imported: the means for both live in :mod:`mr2ft.cli_kit`.
"""

from __future__ import annotations

import os
import sys

import typer

from mr2ft import __version__
from mr2ft import cli_options as opt
from mr2ft.cli_kit import DEBUG, OneLineErrors, check_paths, documented, settings, user_errors
from mr2ft.config import RANGES, SEED_MAX, FinetuneConfig, ProbeConfig, StudyConfig, build_config

app = typer.Typer(
    name="mr2ft",
    help="Fine-tune pretrained vision backbones with MR2 and see, class by class, what happened to the hard classes.",
    cls=OneLineErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


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


# ---- commands -------------------------------------------------------------------------------------------------


# Options that mean the same in every command that takes them have one definition (and one help text) in
# mr2ft.cli_options (``opt.*``).
@app.command("probe")
@user_errors
@documented(ProbeConfig)
def probe_command(
    ctx: typer.Context,
    backbone: str | None = opt.BACKBONE_OPT,
    model: str | None = opt.MODEL_OPT,
    weights: str | None = opt.WEIGHTS_OPT,
    dataset: str | None = opt.DATASET_OPT,
    image_column: str | None = opt.IMAGE_COLUMN_OPT,
    label_column: str | None = opt.LABEL_COLUMN_OPT,
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Share of train held out for choices."),
    shots: int | None = opt.SHOTS_OPT,
    max_per_class: int | None = opt.MAX_PER_CLASS_OPT,
    test_max_per_class: int | None = opt.TEST_MAX_PER_CLASS_OPT,
    skip_bad_images: bool | None = opt.SKIP_BAD_IMAGES_OPT,
    follow_links: bool | None = opt.FOLLOW_LINKS_OPT,
    normalize: bool | None = opt.NORMALIZE_OPT,
    pool: str | None = opt.POOL_OPT,
    image_size: int | None = opt.IMAGE_SIZE_OPT,
    loss: str | None = typer.Option(None, "--loss", help="ce, mr2, uniform, focal, ldam, la, dro, jtt or lff."),
    c_bar: float | None = opt.C_BAR_OPT,
    p: float | None = opt.P_OPT,
    margin_mode: str | None = opt.MARGIN_MODE_OPT,
    head: str | None = typer.Option(None, "--head", help="linear, bn_linear (MAE), zeroshot (CLIP), cosine (LDAM)."),
    optimizer: str | None = opt.OPTIMIZER_OPT,
    lr: float | None = opt.LR_OPT,
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="Weight decay."),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Epochs over the cached features (default: train until the loss stops improving)."
    ),
    schedule: str | None = typer.Option(
        None, "--schedule", help="plateau (lr x0.1 per plateau, stop when converged), cosine or step (needs --epochs)."
    ),
    lr_steps: str | None = typer.Option(None, "--lr-steps", help="--schedule step: epochs where lr x0.1, e.g. 60,80."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Cap on optimizer steps without --epochs."),
    converge_tol: float | None = typer.Option(
        None, "--converge-tol", help="Converged when the training objective improves by less than this (relative)."
    ),
    standardize: bool | None = typer.Option(
        None, "--standardize/--no-standardize", help="Fit linear heads on standardised features (folded back)."
    ),
    blr: float | None = typer.Option(None, "--blr", help="Base lr: lr = blr x batch / 256 (MAE's rule)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size of the head's training."),
    warmup_epochs: float | None = opt.WARMUP_EPOCHS_OPT,
    seed: int | None = opt.SEED_OPT,
    num_workers: int | None = opt.NUM_WORKERS_OPT,
    extract_batch_size: int | None = opt.EXTRACT_BATCH_SIZE_OPT,
    cache_dir: str | None = opt.CACHE_DIR_OPT,
    feature_memory: str | None = typer.Option(None, "--feature-memory", help="memory, stream (the store) or auto."),
    streaming: bool | None = typer.Option(
        None, "--streaming/--no-streaming", help="Stream an hf: dataset (read in order, not downloaded up front)."
    ),
    sweep_wd: bool | None = typer.Option(None, "--sweep-wd/--no-sweep-wd", help="Choose weight decay on validation."),
    wd_grid: str | None = typer.Option(None, "--wd-grid", help="Comma-separated weight decays for --sweep-wd."),
    sweep_cbar: bool | None = typer.Option(None, "--sweep-cbar/--no-sweep-cbar", help="Choose c_bar on validation."),
    sweep_temperature: bool | None = typer.Option(
        None, "--sweep-temperature/--no-sweep-temperature", help="Choose CE's global temperature on validation."
    ),
    cbar_grid: str | None = typer.Option(None, "--cbar-grid", help="Comma-separated c_bar / temperature grid."),
    sweep_criterion: str | None = opt.SWEEP_CRITERION_OPT,
    jtt_upweight: float | None = typer.Option(None, "--jtt-upweight", help="JTT's upweight of ERM errors."),
    baseline: str | None = opt.BASELINE_OPT,
    out: str | None = opt.OUT_OPT,
    overwrite: bool | None = opt.OVERWRITE_OPT,
    report_to: str | None = opt.REPORT_TO_OPT,
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe name or YAML path; flags override it."),
) -> None:
    """Linear probe on cached features of a frozen backbone, with MR2 or any baseline loss."""
    values = settings(ctx, "wd_grid", "cbar_grid", "lr_steps")
    cfg = build_config(ProbeConfig, values.pop("recipe"), **values)
    check_paths(cfg.dataset, cfg.out, cfg.overwrite, cfg.cache_dir)
    from mr2ft import probe

    probe.run(cfg)


@app.command("finetune")
@user_errors
@documented(FinetuneConfig)
def finetune_command(
    ctx: typer.Context,
    backbone: str | None = opt.BACKBONE_OPT,
    model: str | None = opt.MODEL_OPT,
    weights: str | None = opt.WEIGHTS_OPT,
    dataset: str | None = opt.DATASET_OPT,
    image_column: str | None = opt.IMAGE_COLUMN_OPT,
    label_column: str | None = opt.LABEL_COLUMN_OPT,
    val_fraction: float | None = opt.FT_VAL_FRACTION_OPT,
    shots: int | None = opt.SHOTS_OPT,
    max_per_class: int | None = opt.MAX_PER_CLASS_OPT,
    test_max_per_class: int | None = opt.TEST_MAX_PER_CLASS_OPT,
    skip_bad_images: bool | None = opt.SKIP_BAD_IMAGES_OPT,
    follow_links: bool | None = opt.FOLLOW_LINKS_OPT,
    normalize: bool | None = opt.NORMALIZE_OPT,
    pool: str | None = opt.POOL_OPT,
    loss: str | None = typer.Option(None, "--loss", help="ce, mr2, uniform, focal, ldam, la or dro."),
    c_bar: float | None = opt.C_BAR_OPT,
    lambda_rep: float | None = typer.Option(None, "--lambda-rep", help="Weight of MR2's representation margin."),
    p: float | None = opt.P_OPT,
    momentum: float | None = typer.Option(None, "--momentum", help="EMA momentum of MR2's class statistics."),
    margin_mode: str | None = opt.MARGIN_MODE_OPT,
    temperature_factor: float | None = opt.FT_TEMPERATURE_FACTOR_OPT,
    head: str | None = typer.Option(None, "--head", help="linear, or zeroshot (CLIP: head from text prompts)."),
    optimizer: str | None = typer.Option(
        None, "--optimizer", help="Any timm optimizer: adamw, sgd (momentum 0.9), lamb, lars, lion, nadamw, ..."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (not scaled by batch size)."),
    blr: float | None = opt.FT_BLR_OPT,
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="Weight decay (never on norms, biases)."),
    layer_decay: float | None = typer.Option(None, "--layer-decay", help="Layer-wise lr decay for ViTs (e.g. 0.65)."),
    drop_path: float | None = typer.Option(None, "--drop-path", help="Stochastic depth rate."),
    image_size: int | None = opt.IMAGE_SIZE_OPT,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs over the training split."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size per process."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    grad_clip: float | None = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this value."),
    warmup_epochs: float | None = opt.WARMUP_EPOCHS_OPT,
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Warm-up in steps (overrides epochs)."),
    mixed_precision: str | None = opt.FT_MIXED_PRECISION_OPT,
    randaugment: str | None = typer.Option(None, "--randaugment", help="timm RandAugment, e.g. rand-m9-mstd0.5."),
    mixup: float | None = typer.Option(None, "--mixup", help="Mixup alpha (ce only)."),
    cutmix: float | None = typer.Option(None, "--cutmix", help="CutMix alpha (ce only)."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="Label smoothing (ce only)."),
    samples_per_class: int | None = opt.FT_SAMPLES_PER_CLASS_OPT,
    wise_alpha: float | None = opt.FT_WISE_ALPHA_OPT,
    templates: str | None = opt.FT_TEMPLATES_OPT,
    class_names: str | None = opt.FT_CLASS_NAMES_OPT,
    min_lr: float | None = typer.Option(
        None, "--min-lr", help="Floor of the cosine schedule (absolute lr; layer decay scales it like --lr)."
    ),
    model_ema: float | None = opt.FT_MODEL_EMA_OPT,
    grad_checkpointing: bool | None = opt.FT_GRAD_CHECKPOINTING_OPT,
    compile: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the backbone in place (the first steps compile it)."
    ),
    channels_last: bool | None = opt.FT_CHANNELS_LAST_OPT,
    report_to: str | None = opt.REPORT_TO_OPT,
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps."),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Evaluate (and checkpoint) every N epochs."),
    early_stop: int | None = opt.FT_EARLY_STOP_OPT,
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimizer steps (same schedule)."),
    resume: str | None = opt.FT_RESUME_OPT,
    seed: int | None = opt.SEED_OPT,
    num_workers: int | None = typer.Option(None, "--num-workers", help="Image decoding workers per process."),
    baseline: str | None = opt.BASELINE_OPT,
    out: str | None = opt.OUT_OPT,
    overwrite: bool | None = opt.OVERWRITE_OPT,
    recipe: str | None = opt.FT_RECIPE_OPT,
) -> None:
    """Fine-tune a backbone end to end (one process, or many under `accelerate launch -m mr2ft finetune`)."""
    values = settings(ctx)
    recipe = values.pop("recipe")
    if resume and recipe is None:
        from mr2ft.checkpoints import resume_settings

        # Resuming repeats the run's own settings; flags typed now override them (and are checked for conflicts).
        values = {**resume_settings(resume), **{k: v for k, v in values.items() if v is not None}}
    cfg = build_config(FinetuneConfig, recipe, **values)
    check_paths(cfg.dataset, None if cfg.resume else cfg.out, cfg.overwrite, resumable=True)
    from mr2ft import finetune

    finetune.run(cfg)


GROUPS_OPT = typer.Option(
    None,
    "--groups",
    help="How the reference fixes easy/medium/hard: val (its validation accuracy), crossfit (chosen on one half of "
    "each class's test images, scored on the other) or test (paper's protocol, selection-biased). "
    "Default: val when the run saved validation predictions, else crossfit.",
)


@app.command("report")
@user_errors
def report_command(
    run: str = typer.Argument(..., help="A finished run folder (written by probe or finetune)."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="A baseline run on the same data: fixes the easy/medium/hard groups and the deltas."
    ),
    formats: str = typer.Option("json,csv,md,html", "--format", help="Comma-separated: json,csv,md,html."),
    groups: str | None = GROUPS_OPT,
) -> None:
    """Write the per-class report (report.json, per_class.csv, report.md, report.html) into RUN."""
    from mr2ft.report import headline, write_report

    result = write_report(run, baseline, formats, groups=groups)
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
    n_boot: int = typer.Option(
        1000, "--n-boot", min=1, max=RANGES["n_boot"].high, help="Paired bootstrap resamples for the intervals."
    ),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of the bootstrap resampling."),
    groups: str | None = GROUPS_OPT,
) -> None:
    """Put many runs into the paper's table (overall, easy, medium, hard, worst class, std) with bootstrap intervals."""
    from rich.console import Console

    from mr2ft.report import compare_runs, compare_table, write_compare

    result = compare_runs(runs, baseline, n_boot=n_boot, seed=seed, groups=groups)
    Console().print(compare_table(result))
    if out is not None:
        for path in write_compare(result, out):
            typer.echo(f"wrote {path}")


@app.command("study")
@user_errors
@documented(StudyConfig)
def study_command(
    ctx: typer.Context,
    backbone: str | None = opt.BACKBONE_OPT,
    model: str | None = opt.MODEL_OPT,
    weights: str | None = opt.WEIGHTS_OPT,
    dataset: str | None = opt.DATASET_OPT,
    image_column: str | None = opt.IMAGE_COLUMN_OPT,
    label_column: str | None = opt.LABEL_COLUMN_OPT,
    mode: str | None = typer.Option(None, "--mode", help="probe (heads on cached features) or finetune (end to end)."),
    seeds: int | None = typer.Option(None, "--seeds", help="Training seeds per method (default 3)."),
    n_boot: int | None = typer.Option(None, "--n-boot", help="Paired bootstrap resamples for the intervals."),
    groups: str | None = typer.Option(
        None,
        "--groups",
        help="Where the easy/medium/hard groups come from: validation (ERM's validation accuracy, default), "
        "crossfit (one half of each class's test images ranks, the other half scores, and back) or test (the "
        "paper's protocol, subject to selection bias).",
    ),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="Share of train held out for the choices (probe: default 0.2)."
    ),
    shots: int | None = opt.SHOTS_OPT,
    max_per_class: int | None = opt.MAX_PER_CLASS_OPT,
    test_max_per_class: int | None = opt.TEST_MAX_PER_CLASS_OPT,
    skip_bad_images: bool | None = opt.SKIP_BAD_IMAGES_OPT,
    follow_links: bool | None = opt.FOLLOW_LINKS_OPT,
    normalize: bool | None = opt.NORMALIZE_OPT,
    pool: str | None = opt.POOL_OPT,
    image_size: int | None = opt.IMAGE_SIZE_OPT,
    c_bar: float | None = typer.Option(None, "--c-bar", help="finetune mode: the control's and MR2's c_bar."),
    p: float | None = opt.P_OPT,
    margin_mode: str | None = opt.MARGIN_MODE_OPT,
    head: str | None = typer.Option(None, "--head", help="linear, bn_linear (MAE probe protocol) or zeroshot (CLIP)."),
    optimizer: str | None = opt.OPTIMIZER_OPT,
    lr: float | None = opt.LR_OPT,
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs of each fit."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size of each fit."),
    warmup_epochs: float | None = opt.WARMUP_EPOCHS_OPT,
    seed: int | None = typer.Option(None, "--seed", help="First training seed, and the validation split's seed."),
    num_workers: int | None = opt.NUM_WORKERS_OPT,
    extract_batch_size: int | None = opt.EXTRACT_BATCH_SIZE_OPT,
    cache_dir: str | None = opt.CACHE_DIR_OPT,
    wd_grid: str | None = typer.Option(None, "--wd-grid", help="Comma-separated weight decays tried on validation."),
    cbar_grid: str | None = typer.Option(
        None, "--cbar-grid", help="Comma-separated grid of MR2's and the control's c_bar (and ERM's temperature)."
    ),
    sweep_criterion: str | None = opt.SWEEP_CRITERION_OPT,
    report_to: str | None = opt.REPORT_TO_OPT,
    out: str | None = typer.Option(None, "--out", help="Study folder (default runs/<backbone>-<dataset>-study-TIME)."),
    overwrite: bool | None = typer.Option(None, "--overwrite", help="Replace an existing study folder."),
    recipe: str | None = typer.Option(
        None, "--recipe", help="Recipe name or YAML path (probe settings; a fine-tune recipe with --mode finetune)."
    ),
) -> None:
    """ERM vs MR2 (and a matched control where it differs from tuned ERM) over seeds: groups fixed on validation,
    seed-paired bootstrap intervals and a verdict."""
    values = settings(ctx, "wd_grid", "cbar_grid")
    recipe = values.pop("recipe")
    check_paths(dataset, out, overwrite, cache_dir)
    from mr2ft.study import run_study, study_configs

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


# ---- after training: eval, predict, export, zeroshot (mr2ft.evaluate / predict / export / zeroshot) ----------

# Options that mean the same in eval, predict, export and zeroshot (one definition, one help text).
FEATURE_BATCH_OPT = typer.Option(64, "--batch-size", min=1, help="Images per batch of the feature pass.")
WORKERS_OPT = typer.Option(2, "--num-workers", min=0, help="Image decoding workers.")
OVERWRITE_OUT_OPT = typer.Option(False, "--overwrite", help="Replace an existing --out folder.")


@app.command("eval")
@user_errors
def eval_command(
    run: str = typer.Argument(..., help="A finished probe, finetune or zeroshot run folder."),
    dataset: str = typer.Option(..., "--dataset", help="Folder, CSV, hf:NAME, or imagenet-r|-a|-v2|-sketch[:PATH]."),
    split: str = typer.Option("test", "--split", help="test, val or train (a one-split folder is scored whole)."),
    class_names: str | None = typer.Option(
        None, "--class-names", help="Rename the dataset's classes: one name per line or JSON (list or object)."
    ),
    baseline: str | None = typer.Option(None, "--baseline", help="Run that fixes the groups (default: RUN itself)."),
    image_column: str | None = opt.IMAGE_COLUMN_OPT,
    label_column: str | None = opt.LABEL_COLUMN_OPT,
    cache_dir: str | None = opt.CACHE_DIR_OPT,
    batch_size: int = FEATURE_BATCH_OPT,
    num_workers: int = WORKERS_OPT,
    out: str | None = typer.Option(None, "--out", help="New run folder (default runs/<run>-eval-<dataset>-<time>)."),
    overwrite: bool = OVERWRITE_OUT_OPT,
) -> None:
    """Score a finished run on another dataset (same class names, or a subset); writes a run folder and report."""
    from mr2ft.evaluate import run_eval
    from mr2ft.report import headline

    out_dir, report = run_eval(
        run,
        dataset,
        split=split,
        out=out,
        class_names=class_names,
        baseline=baseline,
        image_column=image_column,
        label_column=label_column,
        cache_dir=cache_dir,
        batch_size=batch_size,
        num_workers=num_workers,
        overwrite=overwrite,
    )
    if report is not None:  # None on the other processes of an accelerate launch
        typer.echo(headline(report))
        typer.echo(f"wrote {out_dir}")


@app.command("predict")
@user_errors
def predict_command(
    run: str = typer.Argument(..., help="A finished probe, finetune or zeroshot run folder."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (recursive) or CSV files of image paths."),
    top_k: int = typer.Option(5, "--top-k", help="Classes (with probabilities) per image."),
    out: str = typer.Option("predictions.csv", "--out", help="The CSV to write."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per batch."),
    num_workers: int = WORKERS_OPT,
    cache_dir: str | None = opt.CACHE_DIR_OPT,
) -> None:
    """Label images with a finished run: one CSV row per image, top-k classes and probabilities, errors per row."""
    from mr2ft.predict import run_predict

    path, pred = run_predict(run, inputs, top_k=top_k, out=out, batch_size=batch_size, num_workers=num_workers,
                             cache_dir=cache_dir)  # fmt: skip
    if pred is None:  # another process of an accelerate launch: the main one writes
        return
    failed = sum(1 for e in pred.errors if e)
    note = f", {failed} unreadable (see the error column)" if failed else ""
    typer.echo(f"wrote {path}: {len(pred.paths)} images{note}")


@app.command("export")
@user_errors
def export_command(
    run: str = typer.Argument(..., help="A finished probe, finetune or zeroshot run folder."),
    format: str = typer.Option(..., "--format", help="timm, hf (ViT/ViTMAE) or open_clip (CLIP)."),
    out: str = typer.Option(..., "--out", help="Folder to write (loads without mr2ft)."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", help="Also upload to this Hugging Face model repo."),
    overwrite: bool = OVERWRITE_OUT_OPT,
) -> None:
    """Export a run's model for timm, transformers or open_clip (classifier, labels and preprocessing included)."""
    from mr2ft.export import run_export

    typer.echo(f"wrote {run_export(run, format, out, push_to_hub=push_to_hub, overwrite=overwrite)}")
    if push_to_hub:
        typer.echo(f"pushed to https://huggingface.co/{push_to_hub}")


@app.command("zeroshot")
@user_errors
def zeroshot_command(
    backbone: str = typer.Option("clip", "--backbone", help="A family with a text tower: clip."),
    model: str | None = opt.MODEL_OPT,
    weights: str | None = opt.WEIGHTS_OPT,
    dataset: str | None = opt.DATASET_OPT,
    image_column: str | None = opt.IMAGE_COLUMN_OPT,
    label_column: str | None = opt.LABEL_COLUMN_OPT,
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="As the probe's: the same test split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split, as the probe's."),
    test_max_per_class: int | None = opt.TEST_MAX_PER_CLASS_OPT,
    normalize: bool | None = opt.NORMALIZE_OPT,
    image_size: int | None = opt.IMAGE_SIZE_OPT,
    templates: str | None = typer.Option(None, "--templates", help="Prompt templates with {}: one per line or JSON."),
    class_names: str | None = typer.Option(
        None, "--class-names", help="Names for the prompts: one per line, or JSON (list, or object folder: name)."
    ),
    baseline: str | None = opt.BASELINE_OPT,
    cache_dir: str | None = opt.CACHE_DIR_OPT,
    batch_size: int = FEATURE_BATCH_OPT,
    num_workers: int = WORKERS_OPT,
    out: str | None = typer.Option(None, "--out", help="Run folder (default runs/clip-<dataset>-zeroshot-<time>)."),
    overwrite: bool = OVERWRITE_OUT_OPT,
) -> None:
    """CLIP zero-shot on a dataset's test split, written as a normal run folder (usable as --baseline)."""
    from mr2ft.report import headline
    from mr2ft.zeroshot import ZeroShotSettings, run_zeroshot

    cfg = ZeroShotSettings(
        dataset=dataset, backbone=backbone, model=model, weights=weights, normalize=normalize, image_size=image_size,
        image_column=image_column, label_column=label_column, val_fraction=val_fraction, seed=seed,
        test_max_per_class=test_max_per_class, templates=templates, class_names=class_names, baseline=baseline,
        cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, out=out, overwrite=overwrite,
    )  # fmt: skip
    out_dir, report = run_zeroshot(cfg)
    if report is not None:  # None on the other processes of an accelerate launch
        typer.echo(headline(report))
        typer.echo(f"wrote {out_dir}")


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
    from mr2ft.config import recipe_text

    typer.echo(recipe_text(name)[1], nl=False)


def run() -> None:  # pragma: no cover - console entry used by ``python -m mr2ft``
    app(prog_name="mr2ft")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
