"""Typed, frozen configuration for each job, recipe loading, flag overrides and the dump into the run folder.

Precedence, lowest to highest: the dataclass defaults, the recipe (``--recipe NAME_OR_PATH``), then the flags the
user typed. The fully resolved config is written into every run folder (``config.yaml``) so that a run can be
repeated from its folder alone (``--recipe runs/x/config.yaml``).

Every numeric setting is checked here, once, whenever a config is made (:func:`check_numbers`: NaN, inf, negative,
out of range, grids and seeds included), so a bad value stops in one line before any model or data is loaded. This
module imports neither torch nor the jobs: the CLI uses it before the heavy imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mr2ft.errors import UserError

T = TypeVar("T")

# The resolved config's file in a run folder (``mr2ft.runs.CONFIG``; a run folder given as --recipe reads it).
CONFIG_FILE = "config.yaml"
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric setting: ``low``/``high`` bounds, each inclusive or not."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def adjective(self) -> str:
        """``positive``, ``non-negative``, ``between 0 and 1``... (what the value must be)."""
        if self.low == 0 and self.high is None:
            return "positive" if self.low_open else "non-negative"
        if self.low is not None and self.high is not None:
            return f"between {_num(self.low)} and {_num(self.high)}"
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {_num(self.low)}"
        return "finite"

    def text(self, whole: bool) -> str:
        kind = "a whole number" if whole else "a finite number"
        if self.low == 0 and self.low_open and self.high is None:
            return f"{kind} above 0"
        if self.low is None and self.high is None:
            return kind
        lo = "" if self.low is None else f"{'above' if self.low_open else 'at least'} {_num(self.low)}"
        hi = "" if self.high is None else f"{'below' if self.high_open else 'at most'} {_num(self.high)}"
        return f"{kind} {' and '.join(t for t in (lo, hi) if t)}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(0, low_open=True)  # with whole numbers: 1, 2, ...
FRACTION = Range(0, 1, high_open=True)
UNIT = Range(0, 1)

# Every numeric setting of every config and its valid values (a grid's values each obey its range). A numeric
# setting missing here must at least be finite.
RANGES: dict[str, Range] = {
    "val_fraction": FRACTION,
    "shots": COUNT,
    "max_per_class": COUNT,
    "test_max_per_class": COUNT,
    "image_size": COUNT,
    "c_bar": POSITIVE,
    "lambda_rep": NON_NEGATIVE,
    "p": Range(1),
    "momentum": FRACTION,
    "temperature_factor": POSITIVE,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "epochs": COUNT,
    "batch_size": COUNT,
    "warmup_epochs": NON_NEGATIVE,
    "blr": POSITIVE,
    "lr_steps": POSITIVE,
    "converge_tol": Range(0, 1, low_open=True, high_open=True),
    "seed": Range(0, SEED_MAX),
    "num_workers": NON_NEGATIVE,
    "extract_batch_size": COUNT,
    "wd_grid": NON_NEGATIVE,
    "cbar_grid": POSITIVE,
    "jtt_upweight": Range(1),
    "jtt_epochs": COUNT,
    "lff_q": Range(0, 1, low_open=True),
    "layer_decay": Range(0, 1, low_open=True),
    "drop_path": FRACTION,
    "grad_accum": COUNT,
    "grad_clip": POSITIVE,
    "warmup_steps": NON_NEGATIVE,
    "mixup": NON_NEGATIVE,
    "cutmix": NON_NEGATIVE,
    "label_smoothing": FRACTION,
    "samples_per_class": COUNT,
    "wise_alpha": UNIT,
    "model_ema": Range(0, 1, high_open=True),  # 0: off (turns off a recipe's EMA)
    "min_lr": NON_NEGATIVE,
    "checkpoint_every": COUNT,
    "eval_every": COUNT,
    "early_stop": COUNT,
    "max_steps": COUNT,
    "seeds": COUNT,
    "n_boot": Range(1, 100_000),
}


def _types(f: dataclasses.Field) -> set[str]:
    """The plain type names of a field's annotation (``"int | None"`` -> {"int", "None"})."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {t.strip().split("[")[0] for t in text.split("|")}


def check_numbers(cls: type, values: dict[str, Any], recipe: str | None = None, from_recipe: set[str] = frozenset()):
    """Refuse a setting of the wrong type or out of its range (NaN, inf, negative...), naming it and its valid values.

    Raises:
        UserError: one line naming the option, the value, the valid range, and the recipe it came from.
    """
    for f in fields(cls):
        if f.name not in values or values[f.name] is None:
            continue
        value, types = values[f.name], _types(f)
        where = f" (in recipe {recipe})" if recipe and f.name in from_recipe else ""
        flag = "--" + f.name.replace("_", "-")
        if "tuple" in types:
            items = value if isinstance(value, (tuple, list)) else (value,)
            if not items:
                raise UserError(f"{flag} is empty{where}; give at least one number")
            for item in items:
                _check_one(flag, item, f.name, whole=False, where=where, grid=True)
        elif "int" in types or "float" in types:
            _check_one(flag, value, f.name, whole="float" not in types, where=where)
        elif "str" in types and not isinstance(value, str):
            raise UserError(f"{flag} must be text, got {value!r}{where}")


def _check_one(flag: str, value: Any, name: str, whole: bool, where: str, grid: bool = False) -> None:
    rng = RANGES.get(name, Range())
    what = f"{flag} must hold numbers, each" if grid else f"{flag} must be"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not float(value).is_integer()):
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{what} {kind}, got {value!r}{where}; give {rng.text(whole)}")
    if not rng.holds(value):
        raise UserError(f"{what} {rng.adjective()}, got {value!r}{where}; give {rng.text(whole)}")


@dataclass(frozen=True)
class Checked:
    """Base of every config: its numeric settings are checked when it is made (also by ``dataclasses.replace``)."""

    def __post_init__(self) -> None:
        check_numbers(type(self), {f.name: getattr(self, f.name) for f in fields(self)})


# Shipped inside the package (so a wheel has them); the repository's top-level recipes/ links here.
RECIPE_DIRS = [Path(__file__).resolve().parent / "recipes"]


@dataclass(frozen=True)
class CommonConfig(Checked):
    """Settings every training job shares: what to load, what data, where to write."""

    backbone: str = "timm"
    model: str | None = None
    weights: str | None = None
    dataset: str = ""
    image_column: str | None = None
    label_column: str | None = None
    val_fraction: float = 0.0
    shots: int | None = None
    max_per_class: int | None = None
    test_max_per_class: int | None = None
    skip_bad_images: bool = False
    follow_links: bool = False  # inside class folders, also follow folder links that leave the dataset root
    normalize: bool | None = None  # None: the backbone family's default (CLIP: on)
    pool: str | None = None  # MAE: "cls" or "mean"
    image_size: int | None = None  # None: the weights' own input size
    loss: str = "ce"
    c_bar: float = 1.0
    lambda_rep: float = 0.1
    p: float | None = None  # None: 2, or 5 when features are L2-normalised
    momentum: float = 0.9
    margin_mode: str = "scale"
    temperature_factor: float = 10.0
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 256
    warmup_epochs: float = 0.0
    blr: float | None = None  # base lr (MAE's rule): lr = blr x effective batch / 256, see resolve_lr
    seed: int = 0
    num_workers: int = 2
    out: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class ProbeConfig(CommonConfig):
    """A linear probe on cached features of a frozen backbone."""

    head: str = "linear"  # linear | bn_linear | zeroshot | cosine (LDAM always gets a cosine classifier)
    cache_dir: str | None = None
    extract_batch_size: int = 64
    feature_memory: str = "auto"  # memory | stream (the head reads the chunked feature store) | auto: stream if large
    streaming: bool = False  # hf: datasets opened with load_dataset(..., streaming=True)
    # The head trains until its training loss stops improving unless epochs is set (mr2ft.probe, "Training a head").
    epochs: int | None = None
    schedule: str | None = None  # plateau | cosine | step; None: cosine with --epochs, else plateau
    lr_steps: tuple[float, ...] | None = None  # step schedule: lr x0.1 at each of these epochs (MoCo: 60, 80)
    max_steps: int | None = None  # cap without --epochs; None: max(10,000 steps, 100 epochs)
    converge_tol: float = 1e-3  # plateau: relative improvement of the training objective per window
    standardize: bool = True  # fit linear heads on per-dimension standardised features (folded back into the head)
    lr: float = 0.01  # AdamW on standardised features (see standardize)
    weight_decay: float = 0.01  # L2 penalty (wd / 2) * ||W||^2 added to the probe's objective
    sweep_wd: bool = True
    wd_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    sweep_cbar: bool = False
    sweep_temperature: bool = False
    cbar_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    sweep_criterion: str = "overall"  # overall | hard
    jtt_upweight: float = 20.0
    jtt_epochs: int | None = None
    lff_q: float = 0.7
    baseline: str | None = None
    templates: str = "default"
    report_to: str | None = None  # comma-separated Accelerate trackers: tensorboard, wandb, mlflow, ...


@dataclass(frozen=True)
class FinetuneConfig(CommonConfig):
    """End-to-end fine-tuning through Accelerate."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    batch_size: int = 64
    layer_decay: float | None = None
    drop_path: float = 0.0
    grad_accum: int = 1
    grad_clip: float | None = None
    mixed_precision: str | None = None  # no | fp16 | bf16; None: accelerate's config
    warmup_steps: int | None = None
    randaugment: str | None = None  # timm RandAugment string, e.g. "rand-m9-mstd0.5"
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    samples_per_class: int | None = None
    head: str = "linear"  # linear | zeroshot (CLIP)
    wise_alpha: float | None = None
    checkpoint_every: int | None = None
    eval_every: int = 1
    early_stop: int | None = None  # stop after this many epochs without a validation improvement
    max_steps: int | None = None
    resume: str | None = None
    baseline: str | None = None
    templates: str | None = None  # --head zeroshot: prompt templates file (one per line or JSON); None: defaults
    class_names: str | None = None  # --head zeroshot: names put into the prompts (a list or a JSON renaming)
    report_to: str | None = None  # comma-separated Accelerate trackers: tensorboard, wandb, mlflow, ...
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the backbone
    channels_last: bool = False
    model_ema: float | None = None  # decay of a weight EMA evaluated beside the raw weights; None or 0: none
    min_lr: float = 0.0  # floor of the cosine schedule


# Probe settings a study sets itself per method (loss, sweeps, baseline) or never uses (the JTT/LfF knobs).
STUDY_SETS_ITSELF = (
    "loss",
    "sweep_wd",
    "sweep_cbar",
    "sweep_temperature",
    "baseline",
    "jtt_upweight",
    "jtt_epochs",
    "lff_q",
)
_STUDY_OWN = (
    ("mode", str, "probe"),  # probe | finetune
    ("seeds", int, 3),
    ("n_boot", int, 1000),
    ("groups", str, "validation"),  # validation | crossfit | test: where the easy/medium/hard groups come from
)
StudyConfig = dataclasses.make_dataclass(
    "StudyConfig",
    [(f.name, f.type, field(default=f.default)) for f in fields(ProbeConfig) if f.name not in STUDY_SETS_ITSELF]
    + [(name, kind, field(default=default)) for name, kind, default in _STUDY_OWN],
    frozen=True,
)
StudyConfig.__module__ = __name__
StudyConfig.__doc__ = """``mr2ft study``: ERM vs MR2 (and, where it differs from ERM, a matched control), over seeds.

Holds what a study uses: the probe's data, backbone, head and training settings (shared by every method), the grids
tuned on validation (``wd_grid``, ``cbar_grid``: ERM's temperature, MR2's and the control's c_bar), and the study's
own ``mode``, ``seeds``, ``n_boot`` and ``groups``. It has no ``loss``, ``sweep_*`` or ``baseline``: the study sets
those per method (:data:`STUDY_SETS_ITSELF`).
"""


# The ``command:`` a recipe may carry, per config class (a study runs probes, so it takes probe recipes too).
RECIPE_COMMANDS = {"ProbeConfig": ("probe",), "FinetuneConfig": ("finetune",), "StudyConfig": ("study", "probe")}


def recipe_names() -> list[str]:
    """Names of the recipes that ship with mr2ft."""
    names = set()
    for d in RECIPE_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def recipe_path(name_or_path: str) -> Path:
    """Resolve a recipe name (``clip-vitb16-probe``) or a YAML path (including a run folder's ``config.yaml``)."""
    p = Path(name_or_path)
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        return p / CONFIG_FILE
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise UserError(f"recipe file {p} does not exist; give a YAML path or one of: {', '.join(recipe_names())}")
        return p
    for d in RECIPE_DIRS:
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    close = difflib.get_close_matches(name_or_path, recipe_names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(
        f"unknown recipe {name_or_path!r}{hint}; `mr2ft recipes list` shows them: {', '.join(recipe_names())}"
    )


def recipe_text(name_or_path: str) -> tuple[Path, str]:
    """A recipe's path and its text.

    Raises:
        UserError: no such recipe, or a file that is not UTF-8 text (a binary file) or cannot be read.
    """
    path = recipe_path(name_or_path)
    try:
        return path, path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not a text file (not UTF-8); give a YAML recipe") from None
    except OSError as e:
        raise UserError(f"recipe {path} cannot be read ({e.strerror}); check the path and its permissions") from None


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe into a flat dict of settings (a top-level ``command:`` key is kept for checking)."""
    path, text = recipe_text(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML ({e.__class__.__name__}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of setting: value")
    return data


def build_config(cls: type[T], recipe: str | None = None, **overrides: Any) -> T:
    """Build a frozen config: dataclass defaults <- recipe <- overrides (``None`` overrides are ignored).

    Raises:
        UserError: the recipe names a setting ``cls`` does not have, or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls)}
    if recipe:
        data = load_recipe(recipe)
        command = data.pop("command", None)
        data.pop("description", None)
        for key, value in data.items():
            key_ = key.replace("-", "_")
            if key_ not in known:
                wanted = RECIPE_COMMANDS.get(cls.__name__)
                if wanted and isinstance(command, str) and command not in wanted:
                    # a recipe for another job: "did you mean" a similar setting would mislead
                    raise UserError(
                        f"recipe {recipe} is a {command} recipe (its setting {key!r} means nothing here); pass a "
                        f"{wanted[0]} recipe (`mr2ft recipes list` shows each one's command)"
                    )
                close = difflib.get_close_matches(key_, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"recipe {recipe} has unknown setting {key!r}{hint}; remove or rename it")
            values[key_] = value
    for key, value in overrides.items():
        if key not in known:
            raise TypeError(f"{cls.__name__} has no setting {key!r}")
        if value is not None:
            values[key] = value
    for key, value in list(values.items()):
        values[key] = _coerce(known[key], value, recipe)
    from_recipe = {k for k in values if k not in overrides or overrides[k] is None}
    check_numbers(cls, values, recipe, from_recipe)
    return cls(**values)


def _coerce(f: dataclasses.Field, value: Any, recipe: str | None) -> Any:
    """A recipe's or flag's value as the field's type: lists as tuples, ints as floats, numbers written as text
    (YAML reads ``1e-3`` as a string) as numbers. Anything else is left for :func:`check_numbers` to refuse."""
    types = _types(f)
    if value is None:
        return None
    if isinstance(value, list):
        value = tuple(value)
    if "bool" in types and not isinstance(value, bool):
        raise UserError(
            f"setting {f.name!r} must be true or false, got {value!r}" + (f" in {recipe}" if recipe else "")
        )
    if "str" in types and "bool" not in types and isinstance(value, bool):
        return "yes" if value else "no"  # YAML reads a bare no/yes (--mixed-precision no) as false/true
    if "tuple" in types and isinstance(value, tuple):
        return tuple(_number(v, "float") for v in value)
    if "float" in types:
        return _number(value, "float")
    if "int" in types:
        return _number(value, "int")
    return value


def _number(value: Any, kind: str) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value) if kind == "float" else int(value)
    if kind == "float" and isinstance(value, int):
        return float(value)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # epochs: 3.0 is 3 (3.5 is refused by check_numbers)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config, tuples as lists, ready for YAML."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def dump_config(cfg: Any, path: str | os.PathLike, command: str, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config as YAML (atomically), with the command it belongs to and any resolved extras."""
    from mr2ft.io import write_text

    data = {"command": command, **to_dict(cfg)}
    text = yaml.safe_dump(data, sort_keys=False)
    if extra:
        text += "# resolved at run time (not read back as settings):\n"
        text += "\n".join("# " + line for line in yaml.safe_dump(extra, sort_keys=False).splitlines()) + "\n"
    write_text(path, text)


def resolve_lr(lr: float, blr: float | None, effective_batch: int) -> float:
    """The learning rate a run uses: ``lr``, or with a base lr ``blr`` MAE's rule ``blr * effective_batch / 256``,
    where the effective batch is the batch per process x processes x gradient-accumulation steps."""
    return lr if blr is None else blr * effective_batch / 256


def replace(cfg: T, **changes: Any) -> T:
    """A copy of a frozen config with some settings changed."""
    return dataclasses.replace(cfg, **changes)


__all__ = [
    "CommonConfig",
    "ProbeConfig",
    "FinetuneConfig",
    "StudyConfig",
    "build_config",
    "dump_config",
    "load_recipe",
    "recipe_names",
    "recipe_path",
    "recipe_text",
    "replace",
    "resolve_lr",
    "to_dict",
    "field",
]
