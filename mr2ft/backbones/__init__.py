"""Backbone registry: one entry point, :func:`load_backbone`, for every supported family.

    from mr2ft.backbones import load_backbone
    bb = load_backbone("clip", "ViT-B-16", "openai")        # open_clip architecture + pretrained tag
    bb = load_backbone("mae", weights="mae_pretrain_vit_base.pth")
    bb = load_backbone("mocov2", weights="moco_v2_800ep_pretrain.pth.tar")
    bb = load_backbone("timm", "tf_efficientnet_lite0", weights=efficientnet_lite0_weights())
    features = bb.model(images)                              # (B, bb.feature_dim)

Adding a family is one new module with a ``load(model, weights, options) -> Backbone`` function and one line in
``FAMILIES``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any

import torch

from mr2ft.backbones.base import DEFAULT_TEMPLATES, Backbone, Preprocess
from mr2ft.backbones.timm import efficientnet_lite0_weights
from mr2ft.errors import UserError

# Family name -> module with ``load(model, weights, options) -> Backbone``. Modules are imported on first use, so
# a timm probe never pays for importing open_clip or transformers.
FAMILIES: dict[str, str] = {
    "clip": "mr2ft.backbones.clip",
    "mae": "mr2ft.backbones.mae",
    "mocov2": "mr2ft.backbones.moco",
    "timm": "mr2ft.backbones.timm",
}


def _loader(family: str) -> Callable[[str | None, str | None, dict[str, Any]], Backbone]:
    return importlib.import_module(FAMILIES[family]).load


RANDOM_INIT_SEED = 0  # the seed of ``weights="none"``: one fixed random model per architecture
ALIASES = {"moco": "mocov2", "moco_v2": "mocov2", "moco-v2": "mocov2", "openclip": "clip", "open_clip": "clip"}


def list_backbones() -> list[str]:
    """The backbone families ``load_backbone`` accepts (aliases such as ``moco`` not included)."""
    return sorted(FAMILIES)


def load_backbone(family: str, model: str | None = None, weights: str | None = None, **options: Any) -> Backbone:
    """Load a pretrained backbone as a feature extractor.

    Args:
        family: "clip", "mae", "mocov2" (alias "moco") or "timm".
        model: the architecture; family default when None (clip: ViT-B-16, mae: vit_base_patch16_224,
            mocov2: resnet50; timm requires one).
        weights: None for the family's default pretrained source, a pretrained tag/hub id, a local file or
            folder, or "none" for random weights (always the same ones: the init is seeded).
        **options: ``normalize`` (bool), ``pool`` ("cls"/"mean"), ``image_size`` (int), ``drop_path_rate``
            (float), ``cache_dir`` (str); options set to None are ignored.

    Returns:
        the loaded :class:`Backbone`, its model in eval mode on the CPU.

    Raises:
        UserError: unknown family, model, tag or option; unreadable or mismatching weights; weights not available
            offline.
    """
    key = ALIASES.get(family.lower(), family.lower()) if isinstance(family, str) else family
    if key not in FAMILIES:
        close = difflib.get_close_matches(str(family), list(FAMILIES) + list(ALIASES), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserError(f"unknown backbone family {family!r}{hint}; valid families are: {', '.join(list_backbones())}")
    if weights is not None:
        weights = str(weights)
    if weights == "none":
        # Random weights are fingerprinted as "random", so they must be the same weights every time (a cached
        # feature file or a rerun would otherwise silently belong to another model); the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return _loader(key)(model, weights, options)
    return _loader(key)(model, weights, options)


__all__ = [
    "ALIASES",
    "Backbone",
    "DEFAULT_TEMPLATES",
    "FAMILIES",
    "Preprocess",
    "efficientnet_lite0_weights",
    "list_backbones",
    "load_backbone",
]
