"""A finished run as a model, and ``mr2ft eval``: that model on another dataset, with the original run's groups.

:func:`load_trained` turns a run folder back into a model (``predict`` and ``export`` use it too):

- a probe (or ``zeroshot``) run: the backbone its ``config.yaml`` names, loaded as the probe loaded it, plus the
  head in ``head.safetensors`` (its BatchNorm, for ``--head bn_linear``, in eval mode, as the probe scored it);
- a fine-tune run: the same backbone with the final weights (``model_wise.safetensors`` after WiSE-FT, else the
  latest checkpoint's ``model.safetensors``, the weights the run's own test predictions came from).

:func:`run_eval` scores such a model on a dataset whose class names are the run's, or a subset of them (ImageNet-R
and -A have 200 of ImageNet's 1000): the logits are restricted to the dataset's classes. The new run folder keeps
the run's full class list (classes the dataset lacks have no images), so its report takes the original run as the
baseline: the easy/medium/hard groups are fixed by the run's own accuracy on its own data (:mod:`mr2ft.report`'s
rule), never on the images scored here, and every figure shows the change under the shift. Features go through the
probe's feature cache.
"""

from __future__ import annotations

import difflib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import nn

from mr2ft import featrows, runs
from mr2ft.classifier import make_head
from mr2ft.classnames import read_name_file, rename_classes
from mr2ft.data import split_fingerprint as data_split_fingerprint
from mr2ft.errors import UserError
from mr2ft.features import FeatureCache, cache_key, stored_features
from mr2ft.heads import LinearHead, head_from_state
from mr2ft.io import append_jsonl, load_tensors, read_json, save_tensors, write_text

SPLITS = ("test", "val", "train")
WISE_WEIGHTS = "model_wise.safetensors"
# How the class folders of each named robustness set are called (the sets are registered, with their hub ids, in
# mr2ft.data's KNOWN_DATASETS). A local copy in the original layout is passed as ``NAME:/path``: ImageNet-R, -A and
# -Sketch have WordNet-id folders (n01440764), ImageNetV2 has class-index folders (0 .. 999).
ROBUSTNESS_SETS: dict[str, str] = {
    "imagenet-v2": "index",
    "imagenet-r": "wnid",
    "imagenet-a": "wnid",
    "imagenet-sketch": "wnid",
}


# ---- a run as a model ------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A finished run as images -> logits: its backbone (final weights) and head, class names and settings.

    Attributes:
        kind: "probe", "zeroshot" or "finetune" (the command that wrote the run).
        settings: the run's ``config.yaml`` as a dict.
        head: features -> logits (a :class:`~mr2ft.heads.LinearHead` or an ``nn.Linear``), in eval mode.
        fingerprint: identity of the backbone weights used, the feature-cache key (a fine-tune's includes its
            checkpoint, so its features never mix with the pretrained backbone's).
    """

    run_dir: Path
    kind: str
    settings: dict
    class_names: list[str]
    backbone: Any
    head: nn.Module
    fingerprint: str
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head as one linear map of the backbone's features: (K, d) weight and (K,) bias, float32.

        A ``bn_linear`` probe head's BatchNorm (affine=False, eval mode) is folded in:
        ``W (x - mu) / sqrt(var + eps) + b = (W / s) x + (b - (W / s) mu)``.
        """
        if getattr(self.head, "cosine", False):
            raise UserError(
                "this run's head is a cosine classifier (LDAM: normalised features and weights), which is not one "
                "linear map of the features; export cannot fold it into a timm/hf/open_clip classifier (use "
                "mr2ft predict or eval with this run instead)"
            )
        fc = self.head.fc if isinstance(self.head, LinearHead) else self.head
        weight, bias = fc.weight.detach().double(), fc.bias.detach().double()
        norm = getattr(self.head, "norm", None)
        if isinstance(norm, nn.BatchNorm1d):
            scale = 1.0 / torch.sqrt(norm.running_var.double() + norm.eps)
            weight = weight * scale[None, :]
            bias = bias - weight @ norm.running_mean.double()
        return weight.float().contiguous(), bias.float().contiguous()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of preprocessed images (float32, on the images' device)."""
        self.backbone.model.eval().to(images.device)
        self.head.eval().to(images.device)
        return self.head(self.backbone.model(images).float())


def read_settings(run_dir: Path) -> dict:
    """The run's ``config.yaml`` as a dict (its commented resolved values are not settings).

    Raises:
        UserError: the folder does not exist or holds no finished run.
    """
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass a folder written by probe, finetune or zeroshot")
    for name in (runs.CONFIG, runs.CLASSES):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} holds no {name}: it is not a finished mr2ft run; pass a finished run folder")
    try:
        settings = yaml.safe_load((run_dir / runs.CONFIG).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UserError(f"{run_dir / runs.CONFIG} is not valid YAML; restore the run's config.yaml") from None
    if settings.get("command") not in ("probe", "zeroshot", "finetune"):
        raise UserError(
            f"{run_dir} was written by `mr2ft {settings.get('command')}`; pass a probe, finetune or zeroshot run"
        )
    return settings


def load_backbone_of(settings: dict) -> Any:
    """The backbone a run was trained on, loaded with the run's own options (so its preprocessing is the same)."""
    from mr2ft.backbones import load_backbone

    options = {key: settings.get(key) for key in ("normalize", "pool", "image_size")}
    return load_backbone(
        settings["backbone"],
        settings.get("model"),
        settings.get("weights"),
        **{k: v for k, v in options.items() if v is not None},
    )


def final_weights(run_dir: Path) -> Path:
    """The fine-tune's final weights: WiSE-FT's when it interpolated, else the latest checkpoint's."""
    if (run_dir / WISE_WEIGHTS).is_file():
        return run_dir / WISE_WEIGHTS
    from mr2ft.checkpoints import MODEL, find_checkpoint

    _, ckpt = find_checkpoint(run_dir)
    return ckpt / MODEL


def _checked_load(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"{where} does not fit the run's backbone and head ({str(e).splitlines()[0][:200]}); "
            "was the run folder edited? run it again"
        ) from None


def load_trained(run_dir: str | Path) -> TrainedModel:
    """Load a finished probe, zeroshot or fine-tune run as a model (see the module docstring).

    Raises:
        UserError: no such run, an unfinished run, weights that do not fit, the backbone's weights unavailable.
    """
    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
    info = read_json(run_dir / runs.CLASSES)
    names = list(info["class_names"])
    bb = load_backbone_of(settings)
    kind = settings["command"]
    if kind == "finetune":
        path = final_weights(run_dir)
        tensors = load_tensors(path)
        head = make_head(bb.feature_dim, len(names), cosine="head.bias" not in tensors)  # LDAM's head has no bias
        _checked_load(bb.model, {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}, path)
        _checked_load(head, {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, path)
        st = path.stat()
        weights_id = f"{bb.fingerprint}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        fingerprint = hashlib.sha256(weights_id.encode()).hexdigest()[:16]
    else:
        path = run_dir / runs.HEAD
        if not path.is_file():
            raise UserError(f"{run_dir} holds no {runs.HEAD}; run the probe again")
        tensors = load_tensors(path)
        head = head_from_state(bb.feature_dim, len(names), tensors)
        _checked_load(head, tensors, path)
        fingerprint = bb.fingerprint
    bb.model.eval()
    return TrainedModel(run_dir, kind, settings, names, bb, head.eval(), fingerprint, info)


# ---- datasets to evaluate on -----------------------------------------------------------------------------------


@dataclass
class EvalData:
    """One split of a dataset to score: its images, class names and fingerprint (the feature-cache key)."""

    dataset: Any
    class_names: list[str]
    name: str
    split: str
    fingerprint: str


def _resolve_raw(spec: str, image_column: str | None, label_column: str | None) -> Any:
    """Every split a dataset spec holds, before any held-out split is carved (a folder of class folders is whole)."""
    from mr2ft.data.sources import ReadOptions, resolve

    return resolve(spec, image_column, label_column, ReadOptions())


def load_eval_data(
    spec: str, split: str = "test", image_column: str | None = None, label_column: str | None = None
) -> tuple[EvalData, str]:
    """The split to score, and how its class folders are named ("wnid", "index" or "" for anything else).

    A named robustness set is ``imagenet-r`` (the hub) or ``imagenet-r:/path`` (a local copy in its layout). A
    dataset with one split only (a folder of class folders) is scored whole, whatever ``split`` says.

    Raises:
        UserError: unknown split, no such split in the dataset, or the data cannot be read.
    """
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    name, _, local = spec.partition(":")
    folders = ROBUSTNESS_SETS.get(name.lower(), "")
    if folders:
        spec = local or name.lower()
    raw = _resolve_raw(spec, image_column, label_column)
    available = {k: v for k, v in raw.splits.items() if v is not None and len(v)}
    if len(available) == 1:
        chosen = next(iter(available))
    elif split in available:
        chosen = split
    elif split == "test" and "val" in available:
        chosen = "val"  # as load_dataset does: a dataset without a test split reports on val
    else:
        raise UserError(f"dataset {spec} has no {split} split (it has {', '.join(sorted(available))}); pick --split")
    ds = available[chosen]
    chosen = chosen if len(available) > 1 else "all"
    label = name.lower() if folders else raw.name
    return EvalData(ds, list(raw.class_names), label, chosen, data_split_fingerprint(ds)), folders


def match_classes(names: list[str], run_names: list[str], run_dir: Path, folders: str = "") -> list[int]:
    """The run's class index of each dataset class (by name; the dataset may hold a subset of the run's classes).

    ImageNetV2's index folders map onto a 1000-class run by index when no file renames them.

    Raises:
        UserError: a dataset class the run does not have.
    """
    if folders == "index" and len(run_names) == 1000 and all(n.isdigit() for n in names):
        names = [run_names[int(n)] for n in names]
    position = {n: i for i, n in enumerate(run_names)}
    missing = [n for n in names if n not in position]
    if missing:
        close = difflib.get_close_matches(missing[0], run_names, n=1)
        hint = f" (closest: {close[0]!r})" if close else ""
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(repr(n) for n in missing[:3])
        raise UserError(
            f"the dataset's classes {shown}{more}{hint} are not among the {len(run_names)} classes of {run_dir}; "
            "pass --class-names FILE mapping the dataset's folder names to the run's class names"
        )
    return [position[n] for n in names]


# ---- features and scoring --------------------------------------------------------------------------------------


def features_of(
    backbone: Any,
    fingerprint: str,
    data: EvalData,
    cache_dir: str | None,
    batch_size: int,
    num_workers: int,
    console: Console,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Features and labels of one split, through the probe's feature cache and its extraction path (sharded over the
    processes of an accelerate launch); ``None`` on processes other than the main one. Features that would not fit
    in memory stay in the chunked store and are read in blocks (:mod:`mr2ft.featrows`)."""
    from mr2ft.data import TransformedDataset

    cache = FeatureCache(cache_dir)
    key = cache_key(fingerprint, data.fingerprint)
    t0 = time.perf_counter()
    store = stored_features(
        cache,
        key,
        backbone.model,
        TransformedDataset(data.dataset, backbone.preprocess.eval_transform()),
        batch_size=batch_size,
        num_workers=num_workers,
        description=f"extracting {data.name} {data.split} features",
        info={"backbone": str(backbone.source), "split": data.split, "dataset": data.name},
    )
    if store is None:  # another process of an accelerate launch: the main one scores
        return None
    x, where = featrows.open_rows(store)
    got = (x, store.targets)
    console.print(
        f"[dim]{data.name}/{data.split}: {len(store)} features ({time.perf_counter() - t0:.1f}s, {cache.path(key)})"
        + (", read from the store in blocks" if where == "stream" else "")
        + "[/dim]"
    )
    return got


@torch.no_grad()
def head_logits(head: nn.Module, x: featrows.Rows, batch: int = 8192) -> torch.Tensor:
    """Logits of a head over features (in memory or stored rows, read ``batch`` at a time), in eval mode."""
    head.eval()
    if not len(x):
        return torch.zeros(0, getattr(head, "out_features", 0) or head.fc.out_features)
    return torch.cat([head(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def restrict(logits: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    """Logits with every class outside ``allowed`` at -inf, so no prediction can fall outside the dataset."""
    mask = torch.full((logits.shape[1],), float("-inf"))
    mask[torch.as_tensor(sorted(set(allowed)))] = 0.0
    return logits + mask


def original_groups(run_dir: Path) -> list[str | None] | None:
    """Each class's group in the run's own report (None where it had none); None when it has no report."""
    path = run_dir / runs.REPORT_JSON
    if not path.is_file():
        return None
    try:
        return [row.get("group") for row in read_json(path)["classes"]]
    except (KeyError, TypeError, ValueError):
        return None


# ---- the job ---------------------------------------------------------------------------------------------------


def default_out(run_dir: Path, data_name: str) -> Path:
    """``runs/<run>-eval-<dataset>-<time>``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in data_name).strip("-") or "data"
    return Path("runs") / f"{run_dir.name}-eval-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_scored_run(
    out: Path,
    header: dict,
    class_names: list[str],
    targets: torch.Tensor,
    logits: torch.Tensor,
    baseline: str | Path | None,
    **info: Any,
) -> dict:
    """Write config.yaml (``header``), classes.json, predictions, one metrics record and the report into ``out``."""
    from mr2ft.metrics import headline_figures, summarize
    from mr2ft.report import write_report

    write_text(out / runs.CONFIG, yaml.safe_dump(header, sort_keys=False))
    runs.save_classes(out, class_names, **info)
    runs.save_predictions(out, targets, logits, len(class_names))
    summary = summarize(logits.argmax(1), targets, len(class_names))
    append_jsonl(out / runs.METRICS, {"stage": header["command"], "split": "test", **headline_figures(summary)})
    return write_report(out, baseline)


def run_eval(
    run: str | Path,
    dataset: str,
    *,
    split: str = "test",
    out: str | Path | None = None,
    class_names: str | None = None,
    baseline: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    overwrite: bool = False,
    console: Console | None = None,
) -> tuple[Path, dict | None]:
    """Score a finished run on ``dataset`` and write a new run folder with the full per-class report.

    Returns:
        (the new run folder, its report); the report is ``None`` on processes other than the main one of an
        ``accelerate launch``, which only extract their share of the features.

    Raises:
        UserError: unknown run, unreadable data, class names that do not match the run's, an existing --out.
    """
    console = console or Console(stderr=True)
    run_dir = Path(run)
    settings = read_settings(run_dir)
    run_names = list(read_json(run_dir / runs.CLASSES)["class_names"])
    if baseline is not None:
        runs.load_run(baseline)  # fail now, not after the work
    data, folders = load_eval_data(dataset, split, image_column, label_column)
    mapping = read_name_file(class_names, "--class-names") if class_names else None
    data.class_names = rename_classes(data.class_names, mapping, str(class_names))
    index = match_classes(data.class_names, run_names, run_dir, folders)
    out_dir = Path(out) if out else default_out(run_dir, data.name)
    runs.check_run_dir(out_dir, overwrite=overwrite, resumable=False)
    model = load_trained(run_dir)
    console.print(
        f"[bold]eval[/bold] {run_dir} ({model.kind}, {len(run_names)} classes) on {data.name}/{data.split}: "
        f"{len(data.dataset)} images of {len(set(index))} classes"
    )
    got = features_of(model.backbone, model.fingerprint, data, cache_dir, batch_size, num_workers, console)
    if got is None:  # not the main process of an accelerate launch: the main process scores and writes
        return out_dir, None
    x, y = got
    logits = restrict(head_logits(model.head, x), index)
    targets = torch.as_tensor(index, dtype=torch.long)[y]
    header = {
        "command": "eval",
        "run": str(run_dir),
        "dataset": dataset,
        "split": data.split,
        "class_names": class_names,
        "baseline": str(baseline or run_dir),
    }
    with runs.run_folder(out_dir, overwrite=overwrite, resumable=False) as folder:
        if (run_dir / runs.CLASS_STATS).is_file():  # the model's training statistics (the report's spread column)
            save_tensors(folder / runs.CLASS_STATS, load_tensors(run_dir / runs.CLASS_STATS))
        report = write_scored_run(
            folder,
            header,
            run_names,
            targets,
            logits,
            baseline or run_dir,
            dataset=data.name,
            backbone=model.info.get("backbone"),
            loss=settings.get("loss"),
            mode="eval",
            margins_applied=model.info.get("margins_applied"),
            source_run=str(run_dir),
            evaluated_classes=sorted(set(index)),
            source_groups=original_groups(run_dir),
        )
    return out_dir, report


__all__ = [
    "ROBUSTNESS_SETS",
    "EvalData",
    "TrainedModel",
    "features_of",
    "head_logits",
    "load_eval_data",
    "load_trained",
    "match_classes",
    "read_name_file",
    "rename_classes",
    "run_eval",
]
