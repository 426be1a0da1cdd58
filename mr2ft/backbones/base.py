"""What every backbone family returns, and the checks every family's loader shares.

A family module (``timm.py``, ``clip.py``, ``mae.py``, ``moco.py``) turns ``(model, weights, options)`` into a
:class:`Backbone`. This module holds what they have in common: the resolved :class:`Preprocess`, option parsing,
reading checkpoint files safely, loading a state dict with the MAE/MoCo habit of refusing any load whose missing or
unexpected keys are not exactly the expected ones, the Hugging Face hub access that fails fast offline, parameter
groups for layer-wise lr decay, and the fingerprint used as the feature-cache key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mr2ft.errors import UserError

logger = logging.getLogger("mr2ft")

#: Seconds a connection probe or an HTTP request to a weights hub may take before we call the hub unreachable.
HUB_TIMEOUT_S = 5.0

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


def file_identity(path: str | os.PathLike) -> str:
    """``resolved-path:size:mtime_ns`` of a file, or of every file under a folder (sorted)."""
    p = Path(path).resolve()
    if p.is_dir():
        parts = []
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            parts.append(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}")
        return f"{p}/[{';'.join(parts)}]"
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def make_fingerprint(**parts: Any) -> str:
    """A stable 16-hex-digit hash of JSON-serialisable parts (order of keyword arguments does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---- checkpoints -----------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file safely: ``.safetensors`` or ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        UserError: the file is missing, truncated, not a checkpoint, or holds pickled Python objects.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"weights file {p} does not exist; pass an existing file with --weights")
    if p.is_dir():
        raise UserError(f"{p} is a folder, not a weights file; pass the checkpoint file inside it")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError on truncated or foreign files
            raise UserError(f"weights file {p} is not a readable safetensors file ({e}); is it complete?") from None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UserError(
            f"weights file {p} holds Python objects that a safe load (weights_only=True) refuses ({first[:200]}); "
            "save just the state dict (torch.save(model.state_dict(), path)) or use safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        # torch's reasons run to several sentences and lines; the error must stay one line
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise UserError(
            f"weights file {p} cannot be read as a PyTorch checkpoint ({e.__class__.__name__}: {reason}); "
            "is it complete and a .pth/.pt/.bin/.safetensors file?"
        ) from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj: Any, path: str | os.PathLike, keys: Sequence[str] = ("state_dict", "model")) -> dict:
    """The tensor dict inside a checkpoint: the object itself, or the first of ``keys`` that holds one.

    Raises:
        UserError: no state dict of tensors is found.
    """
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in keys:
            if key in obj and _is_tensor_dict(obj[key]):
                return dict(obj[key])
        top = ", ".join(str(k) for k in list(obj)[:8]) or "nothing"
        raise UserError(
            f"checkpoint {path} holds no state dict of tensors (top-level keys: {top}; looked in: "
            f"{', '.join(keys)}); pass a checkpoint of this backbone family"
        )
    raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; pass a weights file")


def _sample(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.match(p, name) for p in patterns)


def map_by_position(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], path: Any) -> dict:
    """Rename a checkpoint's tensors onto ``target``'s names by position, checking count and every shape.

    Raises:
        UserError: the counts differ or any shape differs.
    """
    src = list(state_dict.items())
    dst = list(target.items())
    if len(src) != len(dst):
        raise UserError(
            f"checkpoint {path}: no key matches the model and its {len(src)} tensors cannot map one-to-one by "
            f"position onto the model's {len(dst)} (checkpoint keys look like {_sample(k for k, _ in src)}; model "
            f"keys like {_sample(k for k, _ in dst)}); pass weights for this architecture"
        )
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst, strict=True)):
        if tuple(sv.shape) != tuple(dv.shape):
            raise UserError(
                f"checkpoint {path}: no key matches the model and mapping by position fails at tensor {i} "
                f"({sk} {tuple(sv.shape)} vs {dk} {tuple(dv.shape)}); pass weights for this architecture"
            )
    return {dk: sv for (_, sv), (dk, _) in zip(src, dst, strict=True)}


def load_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    path: Any,
    what: str,
    allowed_missing: Sequence[str] = (),
    allowed_unexpected: Sequence[str] = (),
) -> dict[str, list[str]]:
    """Load ``state_dict`` into ``module`` only if it fits exactly.

    Every model key must be in the checkpoint (except those matching ``allowed_missing``, regexes), every
    checkpoint key must be in the model (except ``allowed_unexpected``), and every shape must agree. Otherwise a
    :class:`UserError` names up to five offending keys and the total count, so a mis-load never goes silent.

    Returns:
        ``{"missing": [...], "unexpected": [...]}``: the allowed keys that were missing or ignored.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_missing = [k for k in missing if not _matches(k, allowed_missing)]
    bad_unexpected = [k for k in unexpected if not _matches(k, allowed_unexpected)]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if len(bad_missing) == len(own):
        raise UserError(
            f"checkpoint {path} does not hold a {what}: none of the model's {len(own)} keys is in it (checkpoint "
            f"keys look like {_sample(state_dict)}; model keys like {_sample(own)}); pass a checkpoint of this "
            "family and architecture"
        )
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have the wrong shape ({_sample(mismatched)})")
    if bad_missing:
        problems.append(f"{len(bad_missing)} model keys are missing ({_sample(bad_missing)})")
    if bad_unexpected:
        problems.append(f"{len(bad_unexpected)} checkpoint keys are unexpected ({_sample(bad_unexpected)})")
    if problems:
        raise UserError(
            f"checkpoint {path} does not fit {what}: {'; '.join(problems)}; pass a checkpoint of this family and "
            "architecture (check --model)"
        )
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    if missing or unexpected:
        logger.info(
            "loaded %s from %s; left missing as expected: %s; ignored as expected: %d keys (%s)",
            what,
            path,
            _sample(missing) or "none",
            len(unexpected),
            _sample(unexpected) or "none",
        )
    return {"missing": missing, "unexpected": unexpected}


# ---- hubs ------------------------------------------------------------------------------------------------------


def hf_cache_dir(cache_dir: str | None = None) -> str:
    """The Hugging Face hub cache folder a download would use."""
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_offline_reason() -> str | None:
    """Why the hub must not be contacted (``HF_HUB_OFFLINE`` set, or no connection), or None when it may be."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if constants.HF_HUB_OFFLINE or env.strip().lower() in ("1", "on", "yes", "true"):
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if not url_reachable(endpoint):
        return f"{endpoint} cannot be reached"
    return None


def url_reachable(url: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or to the HTTPS proxy in the environment) opens in time.

    Hub clients retry a dead network for many seconds; this probe lets a load fail at once instead.
    """
    parsed = urlparse(url)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    if parsed.scheme == "http":
        proxy = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy") or proxy
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_download(
    repo_id: str,
    filenames: Sequence[str],
    *,
    cache_dir: str | None = None,
    what: str,
    required: bool = True,
) -> Path | None:
    """Fetch the first of ``filenames`` that ``repo_id`` (``org/name[@revision]``) has, from the cache or the hub.

    Offline (``HF_HUB_OFFLINE=1``) or without a connection, only the local cache is used, and a file that is not
    cached fails at once with where we looked and how to pass a local file.

    Raises:
        UserError: none of the files can be had (only when ``required``; otherwise None is returned).
    """
    from huggingface_hub import errors, hf_hub_download

    repo, _, revision = repo_id.partition("@")
    offline = hub_offline_reason()
    problems: list[str] = []
    for filename in filenames:
        try:
            path = hf_hub_download(
                repo,
                filename,
                revision=revision or None,
                cache_dir=cache_dir,
                local_files_only=offline is not None,
                etag_timeout=HUB_TIMEOUT_S,
            )
            return Path(path)
        except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
            raise UserError(
                f"the Hugging Face repository {repo} for {what} cannot be accessed ({e.__class__.__name__}); "
                "check the name (and `hf auth login` for gated repos), or pass a local file with --weights"
            ) from None
        except errors.RevisionNotFoundError:
            raise UserError(f"revision {revision!r} of {repo} does not exist; check the name after '@'") from None
        except (errors.EntryNotFoundError, errors.HfHubHTTPError, OSError, ValueError) as e:
            problems.append(f"{filename}: {e.__class__.__name__}")
    if not required:
        return None
    cache = hf_cache_dir(cache_dir)
    if offline is not None:
        raise UserError(
            f"found no copy of {what} ({repo}: {', '.join(filenames)}) in the Hugging Face cache {cache}, and "
            f"{offline}; download it where the hub is reachable, or pass a local file with --weights /path/to/file"
        )
    raise UserError(
        f"could not fetch {what} from the Hugging Face hub ({repo}: {'; '.join(problems)}; cache {cache}); "
        "pass a local file with --weights /path/to/file"
    )


def url_download(url: str, cache_dir: str | None, what: str) -> Path:
    """Fetch a plain URL into the torch hub cache (``<cache>/checkpoints``), failing fast without a network.

    Raises:
        UserError: the file is not cached and cannot be downloaded.
    """
    from torch.hub import download_url_to_file, get_dir

    folder = Path(cache_dir) if cache_dir else Path(get_dir()) / "checkpoints"
    target = folder / os.path.basename(urlparse(url).path)
    if target.is_file():
        return target
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true"):
        reason = "HF_HUB_OFFLINE is set"
    elif not url_reachable(url):
        reason = f"{urlparse(url).hostname} cannot be reached"
    else:
        reason = None
    if reason:
        raise UserError(
            f"{what} is not cached at {target} and {reason}; download {url} yourself and pass it with "
            "--weights /path/to/file"
        )
    folder.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30.0)  # urllib has no timeout of its own: a stalled server would hang forever
    try:
        download_url_to_file(url, str(target), progress=False)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        raise UserError(f"downloading {what} from {url} failed ({e}); pass a local file with --weights") from None
    finally:
        socket.setdefaulttimeout(old)
    return target


def is_hub_id(text: str) -> bool:
    """``org/name`` (not an existing path, not absolute or relative-looking): a Hugging Face hub repo id."""
    if text.startswith("hf-hub:"):
        return True
    if Path(text).exists() or text.startswith((".", "/", "~")) or os.sep == "\\" and "\\" in text:
        return False
    if text.endswith((".pth", ".pt", ".bin", ".safetensors", ".tar", ".json")):
        return False  # a checkpoint path that does not exist, not a repo
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", text) is not None
