"""The ``clip`` family: open_clip image towers as feature extractors, with the text tower kept for zero-shot heads.

``model`` (default ``ViT-B-16``) is an open_clip architecture name, a path to a model-config JSON (the format of
open_clip's ``model_configs/*.json``, or an ``open_clip_config.json`` with ``model_cfg``/``preprocess_cfg``), or
``hf-hub:org/repo`` / ``local-dir:/path``. ``weights`` is a pretrained tag of the architecture (default ``openai``
when it has one), a local weights file, ``hf-hub:org/repo``, ``local-dir:/path``, or ``none``.

Precedence follows open_clip: an ``hf-hub:``/``local-dir:`` source (in either argument) defines the architecture,
its weights and its preprocessing; otherwise the architecture comes from ``model`` and the preprocessing from the
pretrained tag (or open_clip's OpenAI defaults). Unlike ``open_clip.create_model``, a tag trained with QuickGELU
(``openai``, ``dfn2b``, MetaCLIP) turns QuickGELU on instead of only warning: the features would be silently wrong.

Features are ``encode_image`` (after the projection), L2-normalised unless ``normalize=False``.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from mr2ft.backbones import timm as timm_family
from mr2ft.backbones.base import (
    Backbone,
    FeatureModel,
    Preprocess,
    finish,
    is_hub_id,
    logger,
    parse_options,
)
from mr2ft.backbones.checkpoint import extract_state_dict, file_identity, load_checked, read_checkpoint
from mr2ft.errors import UserError
from mr2ft.hub import hub_download, url_download

OPTIONS = ("normalize", "image_size", "cache_dir")
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_TAG = "openai"

_CONFIG_NAME = "open_clip_config.json"
_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)
# Keys some checkpoint writers add that are not weights (OpenAI's JIT export, older HF text towers).
_NON_WEIGHT_KEYS = (
    r"input_resolution$",
    r"context_length$",
    r"vocab_size$",
    r"text\.transformer\.embeddings\.position_ids$",
)
_TEXT_BATCH = 256


@dataclass
class _Spec:
    """Everything resolved from (model, weights) before any tensor is built."""

    name: str
    model_cfg: dict
    preprocess_cfg: dict
    checkpoint: Path | None
    source: str
    identity: str
    tokenizer_dir: Path | None = None


# ---- resolving model + weights -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON file ({e.__class__.__name__}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object (an open_clip model config)")
    return data


def _split_config(data: dict, path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from a raw model config or an open_clip_config.json."""
    model_cfg = data.get("model_cfg", data)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise UserError(
            f"{path} is not an open_clip model config: it lacks {', '.join(missing)} (see open_clip's "
            "model_configs/*.json for the format)"
        )
    return copy.deepcopy(model_cfg), dict(data.get("preprocess_cfg", {}))


def _folder_spec(folder: Path, label: str, identity: str) -> _Spec:
    if not folder.is_dir():
        raise UserError(f"{label}: folder {folder} does not exist; pass an existing folder after 'local-dir:'")
    cfg_path = folder / _CONFIG_NAME
    if not cfg_path.is_file():
        raise UserError(
            f"{label}: {folder} has no {_CONFIG_NAME}; save the model with open_clip's push_to_hf_hub format"
        )
    model_cfg, pre = _split_config(_read_json(cfg_path), cfg_path)
    ckpt = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
    if ckpt is None:
        raise UserError(
            f"{label}: {folder} holds no weights file ({', '.join(_WEIGHT_FILES[:3])}, ...); add it, or pass "
            "--weights none for random weights"
        )
    return _Spec(folder.name, model_cfg, pre, ckpt, label, identity or file_identity(folder), tokenizer_dir=folder)


def _hub_spec(repo: str, cache_dir: str | None) -> _Spec:
    cfg = hub_download(repo, [_CONFIG_NAME], cache_dir=cache_dir, what=f"the open_clip config of {repo}")
    weights = hub_download(repo, list(_WEIGHT_FILES[:3]), cache_dir=cache_dir, what=f"the weights of {repo}")
    assert cfg is not None and weights is not None
    spec = _folder_spec(cfg.parent, f"hf-hub:{repo}", f"hf-hub:{repo}:{file_identity(weights)}")
    spec.checkpoint, spec.name, spec.tokenizer_dir = weights, repo, None
    return spec


def _tag_checkpoint(name: str, tag: str, pcfg: dict, cache_dir: str | None) -> tuple[Path, str]:
    what = f"open_clip {name} weights '{tag}'"
    if pcfg.get("file"):
        return Path(pcfg["file"]), pcfg["file"]
    if pcfg.get("hf_hub"):
        repo, filename = os.path.split(pcfg["hf_hub"])
        files = [filename] if filename else list(_WEIGHT_FILES[:3])
        if filename.endswith((".bin", ".pth")):
            files.insert(0, filename[:-4] + ".safetensors")
        path = hub_download(repo, files, cache_dir=cache_dir, what=what)
        assert path is not None
        return path, f"hf-hub:{repo}/{path.name}"
    if pcfg.get("url"):
        return url_download(pcfg["url"], cache_dir, what), pcfg["url"]
    raise UserError(f"open_clip lists no download for {name} '{tag}'; pass a local weights file with --weights")


def _resolve(model: str | None, weights: str | None, cache_dir: str | None) -> _Spec:
    for arg in (model, weights):
        if arg and arg.startswith("hf-hub:"):
            return _hub_spec(arg[len("hf-hub:") :], cache_dir)
        if arg and arg.startswith("local-dir:"):
            folder = Path(arg[len("local-dir:") :]).expanduser()
            return _folder_spec(folder, arg, "")
    model = model or DEFAULT_MODEL
    if weights == "pretrained":
        weights = None
    custom = model.endswith(".json") or os.sep in model or Path(model).is_file()
    if custom:
        path = Path(model).expanduser()
        if not path.is_file():
            raise UserError(f"model config {path} does not exist; pass an open_clip architecture name or a JSON file")
        model_cfg, pre = _split_config(_read_json(path), path)
        name, tags, config_id = path.stem, [], file_identity(path)
    else:
        name = model.replace("/", "-")
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            names = open_clip.list_models()
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(
                f"unknown open_clip architecture {model!r}; {hint}valid names: {', '.join(names)} "
                "(or a path to a model-config JSON)"
            )
        pre, tags, config_id = {}, open_clip.list_pretrained_tags_by_model(name), name

    if weights is None:
        if not tags:
            raise UserError(
                f"{model} has no default pretrained weights; pass --weights /path/to/file, or --weights none for "
                "random weights"
            )
        weights = DEFAULT_TAG if DEFAULT_TAG in tags else tags[0]
    if weights == "none":
        return _Spec(name, model_cfg, pre, None, "random", f"random:{config_id}")
    if weights in tags:
        pcfg = open_clip.get_pretrained_cfg(name, weights)
        path, where = _tag_checkpoint(name, weights, pcfg, cache_dir)
        pre = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
        if pcfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
            logger.info("open_clip %s '%s' was trained with QuickGELU: turning it on", name, weights)
            model_cfg["quick_gelu"] = True
        return _Spec(
            name, model_cfg, pre, path, f"{name} '{weights}' ({where})", f"{name}:{weights}:{file_identity(path)}"
        )
    path = Path(weights).expanduser()
    if path.is_file():
        return _Spec(name, model_cfg, pre, path, str(path), f"{config_id}:{file_identity(path)}")
    if path.is_dir():
        return _folder_spec(path, f"local-dir:{path}", "")
    looks_like_path = os.sep in weights or Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors", ".tar")
    if is_hub_id(weights):
        raise UserError(f"{weights} looks like a Hugging Face repo; pass it as --weights hf-hub:{weights}")
    if looks_like_path:
        raise UserError(f"weights file {weights} does not exist; pass an existing file or a pretrained tag")
    raise UserError(
        f"unknown pretrained tag {weights!r} for open_clip {name}; valid tags: {', '.join(tags) or 'none'} "
        "(or a weights file, hf-hub:org/repo, local-dir:/path, none)"
    )


# ---- building and loading ------------------------------------------------------------------------------------------


def _build(spec: _Spec, image_size: int | None) -> nn.Module:
    cfg = copy.deepcopy(spec.model_cfg)
    vision_cfg, text_cfg = cfg["vision_cfg"], cfg["text_cfg"]
    if image_size is not None:
        vision_cfg["image_size"] = image_size
    # Full CLIP weights follow; the towers' own hub weights must not be fetched first.
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    cls = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return cls(**cfg)
    except (TypeError, KeyError, ValueError, AssertionError) as e:
        raise UserError(
            f"the open_clip config of {spec.name} cannot build a model ({e.__class__.__name__}: {e}); check the "
            "config's fields against open_clip's model_configs/*.json"
        ) from None


def _load_weights(clip_model: nn.Module, path: Path, name: str) -> None:
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = extract_state_dict(read_checkpoint(path), path, keys=("state_dict", "model"))
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    # The same normalisations open_clip.load_checkpoint applies, but with our exact-keys check at the end.
    sd = convert_state_dict(clip_model, sd)
    if "positional_embedding" in sd and not hasattr(clip_model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        target = getattr(clip_model, key, None)
        if key in sd and target is not None and sd[key].ndim != target.ndim:
            sd[key] = sd[key].reshape(target.shape)
    if getattr(clip_model, "logit_bias", None) is not None and "logit_bias" not in sd and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    try:
        resize_pos_embed(sd, clip_model)
        resize_text_pos_embed(sd, clip_model)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit open_clip {name} ({str(e)[:200]}); check --model") from None
    load_checked(clip_model, sd, path=path, what=f"open_clip {name}", allowed_unexpected=_NON_WEIGHT_KEYS)


# ---- layers for lr decay ---------------------------------------------------------------------------------------------


def _layer_ids(visual: nn.Module) -> tuple[Callable[[str], int], int]:
    kind = type(visual).__name__
    if kind == "VisionTransformer" and hasattr(visual, "transformer"):
        n = len(visual.transformer.resblocks)

        def vit_layer(name: str) -> int:
            if name.startswith("transformer.resblocks."):
                return int(name.split(".")[2]) + 1
            if name.startswith(("ln_post", "proj", "attn_pool", "head", "text_")):
                return n + 1
            return 0

        return vit_layer, n
    if kind == "ModifiedResNet":

        def resnet_layer(name: str) -> int:
            if name.startswith("layer") and name[5].isdigit():
                return int(name[5])
            return 5 if name.startswith("attnpool") else 0

        return resnet_layer, 4
    if kind == "TimmModel" and hasattr(visual, "trunk"):
        trunk_id, n = timm_family.layer_ids(visual.trunk)

        def timm_layer(name: str) -> int:
            return trunk_id(name[len("trunk.") :]) if name.startswith("trunk.") else n + 1

        return timm_layer, n
    return (lambda name: 1), 0


# ---- text ------------------------------------------------------------------------------------------------------------


def _tokenizer_factory(spec: _Spec) -> Callable[[], Any]:
    text_cfg = spec.model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    cache: dict[str, Any] = {}

    def get() -> Any:
        if "tok" in cache:
            return cache["tok"]
        try:
            if text_cfg.get("hf_tokenizer_name"):
                source = str(spec.tokenizer_dir) if spec.tokenizer_dir else text_cfg["hf_tokenizer_name"]
                tok = open_clip.tokenizer.HFTokenizer(
                    source, context_length=context_length, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs
                )
            elif "siglip" in spec.name.lower():
                tok = open_clip.get_tokenizer(spec.name)
            else:
                tok = open_clip.SimpleTokenizer(context_length=context_length, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            raise UserError(
                f"the tokenizer of {spec.name} cannot be loaded ({e.__class__.__name__}); it comes from the Hugging "
                "Face hub: run once where the hub is reachable so it is cached"
            ) from None
        cache["tok"] = tok
        return tok

    return get


def _text_encoder(text_model: nn.Module, tokenizer: Callable[[], Any]) -> Callable[..., torch.Tensor]:
    def encode_text(prompts: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        tok = tokenizer()
        text_model.to(device).eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), _TEXT_BATCH):
                tokens = tok(list(prompts[i : i + _TEXT_BATCH])).to(device)
                out.append(text_model.encode_text(tokens, normalize=True).float())
        return torch.cat(out)

    return encode_text


# ---- the family ------------------------------------------------------------------------------------------------------


def _preprocess(spec: _Spec, visual: nn.Module, image_size: int | None) -> Preprocess:
    size = image_size or getattr(visual, "image_size", None) or spec.model_cfg["vision_cfg"].get("image_size", 224)
    size = size[-1] if isinstance(size, (tuple, list)) else size
    pre = spec.preprocess_cfg
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        logger.warning("open_clip resize_mode %r is approximated by 'shortest' (resize + centre crop)", mode)
        mode = "shortest"
    return Preprocess.create(
        input_size=int(size),
        crop_pct=1.0,
        mean=pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=pre.get("std", open_clip.OPENAI_DATASET_STD),
        interpolation=pre.get("interpolation", "bicubic"),
        resize_mode=mode,
    )


def load(model: str | None, weights: str | None, options: dict[str, Any]) -> Backbone:
    """Load an open_clip image tower; see the module docstring for ``model`` and ``weights``.

    Raises:
        UserError: unknown architecture or tag, bad config, unreadable or mismatching weights, hub unavailable.
    """
    opts = parse_options("clip", options, OPTIONS)
    spec = _resolve(model, weights, opts.cache_dir)
    clip_model = _build(spec, opts.image_size)
    if spec.checkpoint is not None:
        _load_weights(clip_model, spec.checkpoint, spec.name)
    else:
        logger.warning("open_clip %s: random weights, as asked (--weights none)", spec.name)
    visual = clip_model.visual
    # Detach the image tower so that moving the text tower (for prompts) never moves the feature model.
    clip_model.visual = nn.Identity()
    clip_model.eval()
    normalize = True if opts.normalize is None else opts.normalize
    preprocess = _preprocess(spec, visual, opts.image_size)
    layer_id, num_layers = _layer_ids(visual)
    feature_dim = int(getattr(visual, "output_dim", 0) or spec.model_cfg["embed_dim"])
    return finish(
        Backbone(
            family="clip",
            name=spec.name,
            model=FeatureModel(visual, normalize=normalize),
            feature_dim=feature_dim,
            preprocess=preprocess,
            source=spec.source,
            num_layers=num_layers,
            normalize=normalize,
            logit_scale=float(clip_model.logit_scale.detach().exp().item()),
            layer_id=layer_id,
            encode_text=_text_encoder(clip_model, _tokenizer_factory(spec)),
        ),
        config=spec.model_cfg,
        weights=spec.identity,
        image_size=opts.image_size,
    )


__all__ = ["DEFAULT_MODEL", "DEFAULT_TAG", "load"]
