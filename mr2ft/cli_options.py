"""The command line's shared options (one definition each, used by several commands) and the options of
``mr2ft finetune`` that take more than one line, so that every command's signature keeps one line per option."""

from __future__ import annotations

import typer

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
REPORT_TO_OPT = typer.Option(None, "--report-to", help="Trackers, comma-separated: tensorboard, wandb, mlflow, ...")
SEED_OPT = typer.Option(None, "--seed", help="Seed of every random choice.")
SHOTS_OPT = typer.Option(None, "--shots", help="Exactly K training images per class.")
SKIP_BAD_IMAGES_OPT = typer.Option(
    None, "--skip-bad-images/--no-skip-bad-images", help="Skip (and count) corrupt images instead of stopping."
)
FOLLOW_LINKS_OPT = typer.Option(
    None, "--follow-links/--no-follow-links", help="Also follow folder links that leave the dataset root."
)
SWEEP_CRITERION_OPT = typer.Option(None, "--sweep-criterion", help="overall or hard (group accuracy).")
TEST_MAX_PER_CLASS_OPT = typer.Option(
    None, "--test-max-per-class", help="At most N test images per class (a quicker, balanced test)."
)
WARMUP_EPOCHS_OPT = typer.Option(None, "--warmup-epochs", help="Linear warm-up, then cosine.")
WEIGHTS_OPT = typer.Option(
    None, "--weights", help="Pretrained tag, hub id, local file or folder; 'none' for random weights."
)

# Options of finetune alone.
FT_VAL_FRACTION_OPT = typer.Option(
    None,
    "--val-fraction",
    help="Share of train held out for validation: the final test figures come from the best epoch on it "
    "(default: none; then the last epoch's weights are reported and nothing is chosen).",
)
FT_TEMPERATURE_FACTOR_OPT = typer.Option(
    None, "--temperature-factor", help="MR2's representation-margin temperature factor."
)
FT_BLR_OPT = typer.Option(
    None, "--blr", help="Base lr, MAE's rule: lr = blr x batch per process x processes x grad accum / 256."
)
FT_MIXED_PRECISION_OPT = typer.Option(
    None, "--mixed-precision", help="no, bf16 or fp16 (CUDA); default: accelerate's config."
)
FT_SAMPLES_PER_CLASS_OPT = typer.Option(
    None, "--samples-per-class", help="Class-balanced batches with M samples of each drawn class."
)
FT_WISE_ALPHA_OPT = typer.Option(
    None, "--wise-alpha", help="WiSE-FT: evaluate (1-A) zero-shot + A fine-tuned weights (needs --head zeroshot)."
)
FT_EARLY_STOP_OPT = typer.Option(
    None, "--early-stop", help="Stop after N epochs without a validation improvement (needs a validation split)."
)
FT_RESUME_OPT = typer.Option(
    None, "--resume", help="Continue a run: its folder (latest checkpoint) or one checkpoints/ckpt-* folder."
)
FT_RECIPE_OPT = typer.Option(
    None, "--recipe", help="Recipe name or YAML path; flags override it (with --resume: the run's config.yaml)."
)
FT_TEMPLATES_OPT = typer.Option(
    None, "--templates", help="--head zeroshot: prompt templates with {}, one per line or JSON."
)
FT_CLASS_NAMES_OPT = typer.Option(
    None, "--class-names", help="--head zeroshot: names for the prompts (one per line, or a JSON renaming)."
)
FT_MODEL_EMA_OPT = typer.Option(
    None,
    "--model-ema",
    help="Keep a weight EMA with this decay (e.g. 0.9998; about 1 - 5/steps), evaluated and saved beside the raw "
    "weights, which stay the reported model. 0 or unset: none.",
)
FT_GRAD_CHECKPOINTING_OPT = typer.Option(
    None,
    "--grad-checkpointing/--no-grad-checkpointing",
    help="Recompute activations in the backward pass: the same steps in less memory, each one slower.",
)
FT_CHANNELS_LAST_OPT = typer.Option(
    None,
    "--channels-last/--no-channels-last",
    help="channels_last memory format for the model and its inputs (faster convolutions on GPU; ViTs barely change).",
)
