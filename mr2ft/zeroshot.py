"""``mr2ft zeroshot``: CLIP's zero-shot classifier scored on a dataset's test split, written as a normal run folder.

The head is the one ``probe --head zeroshot`` starts from (:func:`mr2ft.heads.build_head` with the backbone's
``text_classifier``): per class, the renormalised mean text embedding of its prompts, times CLIP's logit scale.
``templates`` and ``class_names`` files (one entry per line, or JSON) replace the default prompt templates and the
names put into them (folder names like ``n01440764`` make poor prompts); ``classes.json`` keeps the dataset's own
class names, so the run is a valid ``--baseline`` for a probe or fine-tune on the same data, and ``eval``,
``predict`` and ``export`` take it like a probe run (its ``head.safetensors`` is the zero-shot head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from mr2ft import runs
from mr2ft.classnames import prompt_names, read_templates
from mr2ft.errors import UserError
from mr2ft.evaluate import (
    EvalData,
    features_of,
    head_logits,
    load_backbone_of,
    load_eval_data,
    write_scored_run,
)
from mr2ft.heads import build_head
from mr2ft.io import save_tensors


@dataclass(frozen=True)
class ZeroShotSettings:
    """What ``mr2ft zeroshot`` takes; written as the run's ``config.yaml`` (``command: zeroshot``).

    ``val_fraction``, ``seed`` and ``test_max_per_class`` carve the test split as the probe does; without them the
    dataset's own test split is scored (val without one; all of a one-split folder such as ImageNet-R).
    """

    dataset: str | None = None
    backbone: str = "clip"
    model: str | None = None
    weights: str | None = None
    normalize: bool | None = None
    image_size: int | None = None
    image_column: str | None = None
    label_column: str | None = None
    val_fraction: float = 0.0
    seed: int = 0
    test_max_per_class: int | None = None
    templates: str | None = None
    class_names: str | None = None
    baseline: str | None = None
    cache_dir: str | None = None
    batch_size: int = 64
    num_workers: int = 2
    out: str | None = None
    overwrite: bool = False


def zeroshot_data(cfg: ZeroShotSettings) -> EvalData:
    """The split to score (see :class:`ZeroShotSettings`)."""
    from mr2ft.data import load_dataset_for

    if not (cfg.val_fraction or cfg.test_max_per_class):
        return load_eval_data(cfg.dataset or "", "test", cfg.image_column, cfg.label_column)[0]
    splits = load_dataset_for(cfg)
    return EvalData(splits.test, list(splits.class_names), splits.name, "test", splits.split_fingerprint("test"))


def run_zeroshot(cfg: ZeroShotSettings, console: Console | None = None) -> tuple[Path, dict | None]:
    """Score CLIP zero-shot on a dataset and write a normal run folder with its head and report.

    Returns:
        (the run folder, its report); the report is None on the other processes of an accelerate launch.

    Raises:
        UserError: no dataset, a backbone without a text tower, bad template or class-name files, an existing --out.
    """
    console = console or Console(stderr=True)
    if not cfg.dataset:
        raise UserError("no dataset given; pass --dataset (a folder, a CSV, hf:NAME or a name like cifar100)")
    prompts = read_templates(cfg.templates)
    if cfg.baseline is not None:
        runs.load_run(cfg.baseline)
    data = zeroshot_data(cfg)
    names = prompt_names(data.class_names, cfg.class_names)
    out_dir = Path(cfg.out) if cfg.out else runs.default_run_dir(cfg.backbone, cfg.dataset, "zeroshot")
    runs.check_run_dir(out_dir, overwrite=cfg.overwrite, resumable=False)
    settings = {"command": "zeroshot", **dataclasses.asdict(cfg)}
    bb = load_backbone_of(settings)
    text = bb.text_classifier(names, prompts).float().cpu()
    head = build_head("zeroshot", bb.feature_dim, len(names), zero_shot_weights=text, scale=float(bb.logit_scale))
    console.print(
        f"[bold]zeroshot[/bold] {bb.family}:{bb.name} ({bb.source}) on {data.name}/{data.split}: {len(names)} "
        f"classes, {len(data.dataset)} images, {len(prompts or []) or 'default'} templates"
    )
    got = features_of(bb, bb.fingerprint, data, cfg.cache_dir, cfg.batch_size, cfg.num_workers, console)
    if got is None:  # another process of an accelerate launch extracted its shard; the main one scores and writes
        return out_dir, None
    x, y = got
    with runs.run_folder(out_dir, overwrite=cfg.overwrite, resumable=False) as folder:
        save_tensors(folder / runs.HEAD, dict(head.state_dict()))
        report = write_scored_run(
            folder,
            settings,
            data.class_names,
            y,
            head_logits(head, x),
            cfg.baseline,
            dataset=data.name,
            backbone=f"{bb.family}:{bb.name}",
            loss="zeroshot",
            mode="zeroshot",
            margins_applied=False,
            prompt_names=names,
            templates=prompts,
        )
    return out_dir, report


__all__ = ["ZeroShotSettings", "prompt_names", "read_templates", "run_zeroshot", "zeroshot_data"]
