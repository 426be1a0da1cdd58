"""Typed, frozen configuration for each job, recipe loading, flag overrides and the dump into the run folder.

Precedence, lowest to highest: the dataclass defaults, the recipe (``--recipe NAME_OR_PATH``), then the flags the
user typed. The fully resolved config is written into every run folder (``config.yaml``) so that a run can be
repeated from its folder alone (``--recipe runs/x/config.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mr2ft.errors import UserError
from mr2ft.io import write_text

T = TypeVar("T")

# Shipped inside the package (so a wheel has them); the repository's top-level recipes/ links here.
RECIPE_DIRS = [Path(__file__).resolve().parent / "recipes"]


@dataclass(frozen=True)
class CommonConfig:
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
    seed: int = 0
    num_workers: int = 2
    out: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class ProbeConfig(CommonConfig):
    """A linear probe on cached features of a frozen backbone."""

    head: str = "linear"  # linear | bn_linear | zeroshot
    cache_dir: str | None = None
    extract_batch_size: int = 64
    sweep_wd: bool = False
    wd_grid: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    sweep_cbar: bool = False
    sweep_temperature: bool = False
    cbar_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    sweep_criterion: str = "overall"  # overall | hard
    jtt_upweight: float = 20.0
    jtt_epochs: int | None = None
    lff_q: float = 0.7
    baseline: str | None = None
    templates: str = "default"


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
    max_steps: int | None = None
    resume: str | None = None
    baseline: str | None = None


@dataclass(frozen=True)
class StudyConfig(ProbeConfig):
    """``mr2ft study``: ERM vs the matched uniform-margin control vs MR2, each over several seeds.

    Every probe setting applies to all three methods; the study itself always tunes weight decay (``wd_grid``) and
    the knob (``cbar_grid``: ERM's temperature, the control's and MR2's c_bar) on validation, so the ``loss`` and
    ``sweep_*`` settings are replaced per method.
    """

    mode: str = "probe"  # probe | finetune
    seeds: int = 3
    n_boot: int = 1000


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
    if p.is_dir() and (p / "config.yaml").is_file():
        return p / "config.yaml"
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


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe into a flat dict of settings (a top-level ``command:`` key is kept for checking)."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
    return cls(**values)


def _coerce(f: dataclasses.Field, value: Any, recipe: str | None) -> Any:
    if isinstance(value, list):
        value = tuple(value)
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UserError(
            f"setting {f.name!r} must be true or false, got {value!r}" + (f" in {recipe}" if recipe else "")
        )
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
        try:
            value = type(default)(value)
        except ValueError:
            raise UserError(f"setting {f.name!r} must be a number, got {value!r}") from None
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
    data = {"command": command, **to_dict(cfg)}
    text = yaml.safe_dump(data, sort_keys=False)
    if extra:
        text += "# resolved at run time (not read back as settings):\n"
        text += "\n".join("# " + line for line in yaml.safe_dump(extra, sort_keys=False).splitlines()) + "\n"
    write_text(path, text)


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
    "replace",
    "to_dict",
    "field",
]
