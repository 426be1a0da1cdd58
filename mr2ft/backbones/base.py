"""What every backbone family returns, and what every family's loader shares.

A family module (``timm.py``, ``clip.py``, ``mae.py``, ``moco.py``) turns ``(model, weights, options)`` into a
:class:`Backbone`. This module holds what they have in common: the resolved :class:`Preprocess`, option parsing,
parameter groups for layer-wise lr decay, and the fingerprint used as the feature-cache key. Reading and strictly
loading checkpoint files is :mod:`mr2ft.backbones.checkpoint`; downloads go through :mod:`mr2ft.hub`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mr2ft.errors import UserError

logger = logging.getLogger("mr2ft")

#: A short list of OpenAI's ImageNet prompt templates (the "a photo of a {}." prompt plus the seven-template
#: ensemble from the CLIP repository's prompt-engineering notebook).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Parameters that are embeddings rather than weights: no weight decay, like biases and norms.
_NO_DECAY_NAMES = (
    "cls_token",
    "reg_token",
    "dist_token",
    "pos_embed",
    "mask_token",
    "class_embedding",
    "positional_embedding",
    "position_embeddings",
)

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


# ---- preprocessing ---------------------------------------------------------------------------------------------


class ToRGB:
    """Convert any PIL image (greyscale, palette, RGBA, CMYK) to RGB; picklable for DataLoader workers."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing a backbone's weights expect.

    Attributes:
        input_size: side of the square image the model sees.
        resize_size: side the shorter image edge is resized to before the centre crop (``resize_mode="shortest"``),
            ``floor(input_size / crop_pct)``; with ``resize_mode="squash"`` the image is resized to
            ``input_size x input_size`` without cropping.
        crop_pct: fraction of the resized image kept by the centre crop.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: resampling filter name ("bicubic", "bilinear", ...).
        resize_mode: "shortest" (resize shorter side, centre crop) or "squash" (resize to a square, no crop).
    """

    input_size: int
    resize_size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def create(
        cls,
        input_size: int,
        crop_pct: float,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ) -> Preprocess:
        """Build a Preprocess, deriving ``resize_size`` from ``input_size`` and ``crop_pct``."""
        if interpolation not in _INTERPOLATIONS:
            interpolation = "bicubic" if interpolation == "random" else "bilinear"
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
        if resize_mode == "squash":
            crop_pct = 1.0
        resize_size = int(math.floor(input_size / crop_pct))
        return cls(
            input_size=int(input_size),
            resize_size=resize_size,
            crop_pct=float(crop_pct),
            mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in std),  # type: ignore[arg-type]
            interpolation=interpolation,
            resize_mode=resize_mode,
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for logs and the run folder's config."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def eval_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Deterministic evaluation transform: RGB, resize, centre crop, to tensor, normalise."""
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        if self.resize_mode == "squash":
            resize = T.Resize((self.input_size, self.input_size), interpolation=mode)
        else:
            resize = T.Resize(self.resize_size, interpolation=mode)
        return T.Compose(
            [ToRGB(), resize, T.CenterCrop(self.input_size), T.ToTensor(), T.Normalize(self.mean, self.std)]
        )

    def train_transform(self, randaugment: str | None = None) -> Callable[[Image.Image], torch.Tensor]:
        """Training transform: random-resized crop and horizontal flip (timm's ImageNet recipe), optional RandAugment.

        Args:
            randaugment: a timm augmentation string such as ``"rand-m9-mstd0.5-inc1"``, or None.

        Raises:
            UserError: the augmentation string is not one timm understands.
        """
        from timm.data import create_transform
        from torchvision import transforms as T

        try:
            tf = create_transform(
                self.input_size,
                is_training=True,
                color_jitter=None,
                auto_augment=randaugment or None,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
            )
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            raise UserError(
                f"augmentation string {randaugment!r} is not valid for timm ({e.__class__.__name__}: {e}); "
                "use a RandAugment string such as 'rand-m9-mstd0.5-inc1'"
            ) from None
        return T.Compose([ToRGB(), *tf.transforms])


# ---- options ---------------------------------------------------------------------------------------------------

ALL_OPTIONS = ("normalize", "pool", "image_size", "drop_path_rate", "cache_dir")


@dataclass(frozen=True)
class Options:
    """The ``**options`` of :func:`mr2ft.backbones.load_backbone`, validated. ``None`` means "family default"."""

    normalize: bool | None = None
    pool: str | None = None
    image_size: int | None = None
    drop_path_rate: float | None = None
    cache_dir: str | None = None


def parse_options(family: str, options: Mapping[str, Any], allowed: Sequence[str]) -> Options:
    """Validate options for one family; options set to None count as not given.

    Raises:
        UserError: an unknown option, an option this family does not take, or a bad value.
    """
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in ALL_OPTIONS:
            raise UserError(f"unknown backbone option {key!r}; valid options are: {', '.join(allowed)}")
        if key not in allowed:
            raise UserError(
                f"option {key!r} does not apply to the {family} family; its options are: {', '.join(allowed)}"
            )
    if "pool" in given and given["pool"] not in ("cls", "mean"):
        raise UserError(f"pool must be 'cls' or 'mean', got {given['pool']!r}")
    if "normalize" in given and not isinstance(given["normalize"], bool):
        raise UserError(f"normalize must be true or false, got {given['normalize']!r}")
    if "image_size" in given:
        size = given["image_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise UserError(f"image_size must be an integer of at least 8 pixels, got {size!r}")
    if "drop_path_rate" in given:
        rate = given["drop_path_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise UserError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")
        given["drop_path_rate"] = float(rate)
    if "cache_dir" in given:
        given["cache_dir"] = str(given["cache_dir"])
    return Options(**given)


# ---- the backbone ----------------------------------------------------------------------------------------------


class FeatureModel(nn.Module):
    """Images (B, 3, H, W), already normalised, to features (B, d); L2-normalised when ``normalize`` is on."""

    def __init__(self, trunk: nn.Module, normalize: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images)
        if features.ndim != 2:
            raise RuntimeError(f"backbone trunk returned shape {tuple(features.shape)}, expected (batch, dim)")
        return F.normalize(features, dim=-1) if self.normalize else features


def _no_layers(name: str) -> int:
    # With num_layers = 0 every parameter is "after the last block": scale layer_decay ** 0 = 1.
    return 1


@dataclass(eq=False)
class Backbone:
    """A loaded backbone: a feature extractor plus everything needed to feed, train and cache it.

    Attributes:
        family: "clip", "mae", "mocov2" or "timm".
        name: the architecture actually built.
        model: images (B, 3, H, W), normalised as ``preprocess`` says, to features (B, feature_dim); in eval mode.
        feature_dim: size of the features.
        preprocess: the preprocessing the weights expect.
        source: where the weights came from (tag, file, hub id, or "random").
        fingerprint: hex hash of everything that changes the features; the feature-cache key.
        num_layers: transformer blocks or network stages, for layer-wise lr decay.
        normalize: whether the features are L2-normalised.
        logit_scale: CLIP's learned logit scale (already exponentiated); 1.0 for other families.
        layer_id: maps a parameter name of ``model.trunk`` to its layer id (0 = embeddings/stem, i = block i-1,
            num_layers + 1 = after the last block).
        no_weight_decay: extra trunk parameter names that take no weight decay (besides tokens and ndim <= 1).
        encode_text: CLIP only: prompts to L2-normalised text embeddings (N, feature_dim).
    """

    family: str
    name: str
    model: FeatureModel
    feature_dim: int
    preprocess: Preprocess
    source: str
    fingerprint: str = ""  # set by finish() from the fields above, the weights' identity and the load options
    num_layers: int = 0
    normalize: bool = False
    logit_scale: float = 1.0
    layer_id: Callable[[str], int] = field(default=_no_layers, repr=False)
    no_weight_decay: frozenset[str] = field(default_factory=frozenset, repr=False)
    encode_text: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    def param_groups(self, lr: float, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
        """Optimizer parameter groups over ``model``'s trainable parameters.

        Norm weights, biases (ndim <= 1) and tokens/position embeddings take no weight decay. With
        ``layer_decay``, the lr of a parameter with layer id i is scaled by ``layer_decay ** (num_layers + 1 - i)``.
        The classifier head is not part of ``model``: the caller adds it at scale 1.

        Returns:
            a list of dicts with ``params``, ``lr``, ``lr_scale``, ``weight_decay`` and ``name``
            (``"layer_3_decay"``, ``"layer_0_no_decay"``; ``"decay"``/``"no_decay"`` without layer decay).
        """
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise UserError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if layer_decay is not None and layer_decay < 1.0 and self.num_layers == 0:
            logger.warning("layer-wise lr decay has no effect on %s: it has no known block structure", self.name)
        groups: dict[str, dict] = {}
        for full_name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            name = full_name.removeprefix("trunk.")
            decay = param.ndim > 1 and not _is_token(name) and name not in self.no_weight_decay
            kind = "decay" if decay else "no_decay"
            if layer_decay is None:
                group_name, scale = kind, 1.0
            else:
                layer = min(max(self.layer_id(name), 0), self.num_layers + 1)
                group_name, scale = f"layer_{layer}_{kind}", layer_decay ** (self.num_layers + 1 - layer)
            if group_name not in groups:
                groups[group_name] = {
                    "params": [],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": group_name,
                }
            groups[group_name]["params"].append(param)
        return list(groups.values())

    def text_classifier(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Zero-shot class embeddings (K, feature_dim): per class, the renormalised mean of its prompt embeddings.

        Args:
            class_names: one name per class, in label order.
            templates: prompt templates holding one ``{}``; default :data:`DEFAULT_TEMPLATES`.
            device: where to run the text tower; default the device of ``model``.

        Raises:
            UserError: the family has no text tower, or a template holds no ``{}``.
        """
        if self.encode_text is None:
            raise UserError(
                f"a zero-shot text classifier needs a CLIP backbone; the {self.family} family has no text tower "
                "(use --backbone clip or another head)"
            )
        templates = list(templates or DEFAULT_TEMPLATES)
        bad = [t for t in templates if "{}" not in t]
        if bad:
            raise UserError(
                f"prompt template {bad[0]!r} has no '{{}}' for the class name; write e.g. 'a photo of a {{}}.'"
            )
        if not class_names:
            raise UserError("no class names were given for the zero-shot classifier")
        if device is None:
            device = next(self.model.parameters()).device
        prompts = [t.format(name) for name in class_names for t in templates]
        emb = self.encode_text(prompts, device=device).float()
        emb = emb.reshape(len(class_names), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def describe(self) -> dict[str, Any]:
        """A plain dict of what was loaded, for logs and the run folder."""
        return {
            "family": self.family,
            "name": self.name,
            "source": self.source,
            "feature_dim": self.feature_dim,
            "normalize": self.normalize,
            "num_layers": self.num_layers,
            "fingerprint": self.fingerprint,
            "preprocess": self.preprocess.to_dict(),
        }


def _is_token(name: str) -> bool:
    return any(part in _NO_DECAY_NAMES for part in name.split("."))


def finish(bb: Backbone, weights: str, **details: Any) -> Backbone:
    """Fingerprint the backbone, put the model in eval mode and log what was loaded (source and preprocessing).

    The fingerprint (the feature-cache key) hashes the family, architecture, ``weights`` (the identity of the
    weights: a file's path, size and mtime, a hub id or tag), normalisation, preprocessing and any family-specific
    ``details`` that change the features (pooling, image size, model config). Random weights differ from one
    initialisation to the next, so their fingerprint also hashes the initialised tensors: two random models never
    share cached features.
    """
    bb.model.eval()
    bb.fingerprint = make_fingerprint(
        family=bb.family,
        arch=bb.name,
        weights=weights,
        normalize=bb.normalize,
        preprocess=bb.preprocess.to_dict(),
        **details,
    )
    if bb.source.startswith("random"):
        from mr2ft.io import state_checksum

        bb.fingerprint = make_fingerprint(base=bb.fingerprint, tensors=state_checksum(bb.model))
    p = bb.preprocess
    logger.info(
        "backbone %s %s: weights from %s; %d-d features%s; preprocess %d px (resize %d, crop %.3f, %s), "
        "mean %s, std %s",
        bb.family,
        bb.name,
        bb.source,
        bb.feature_dim,
        ", L2-normalised" if bb.normalize else "",
        p.input_size,
        p.resize_size,
        p.crop_pct,
        p.interpolation,
        tuple(round(m, 4) for m in p.mean),
        tuple(round(s, 4) for s in p.std),
    )
    return bb


# ---- fingerprints ----------------------------------------------------------------------------------------------


def make_fingerprint(**parts: Any) -> str:
    """A stable 16-hex-digit hash of JSON-serialisable parts (order of keyword arguments does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---- hubs ------------------------------------------------------------------------------------------------------


def is_hub_id(text: str) -> bool:
    """``org/name`` (not an existing path, not absolute or relative-looking): a Hugging Face hub repo id."""
    if text.startswith("hf-hub:"):
        return True
    if Path(text).exists() or text.startswith((".", "/", "~")) or os.sep == "\\" and "\\" in text:
        return False
    if text.endswith((".pth", ".pt", ".bin", ".safetensors", ".tar", ".json")):
        return False  # a checkpoint path that does not exist, not a repo
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", text) is not None
