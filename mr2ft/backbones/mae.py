"""The ``mae`` family: ViTs pretrained with masked autoencoding, from timm, the official checkpoint, or Hugging Face.

``weights``:

- ``None`` / ``"pretrained"``: timm's ``.mae`` weights of ``model`` (default ``vit_base_patch16_224`` ->
  ``vit_base_patch16_224.mae``; also ``vit_large_patch16_224``, ``vit_huge_patch14_224``).
- a ``.pth`` in the official MAE format (``{"model": state_dict}``; pretrain checkpoints carry the decoder and
  ``mask_token``, which are dropped; fine-tuned ones carry ``fc_norm`` and ``head``, which are kept / dropped).
  ``model`` names the timm ViT to build (any timm ViT, e.g. ``vit_large_patch16_224`` or the tiny ``test_vit``).
- a Hugging Face ViTMAE: a hub id (``facebook/vit-mae-base``, or ``hf-hub:facebook/vit-mae-base``) or a
  ``save_pretrained`` folder. It runs with ``mask_ratio=0`` and patch order kept, so every patch is seen and
  features are deterministic.
- ``"none"``: random weights.

Features (option ``pool``): ``"cls"`` (default, the MAE linear-probe protocol) is the class token after the
final LayerNorm; ``"mean"`` is the mean of the patch tokens after the final LayerNorm. The preprocessing is MAE's:
ImageNet mean/std, bicubic, 224/256 centre crop (timm's ``.mae`` cfg where the architecture has one).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mr2ft.backbones import timm as timm_family
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
from mr2ft.backbones.checkpoint import extract_state_dict, file_identity, load_checked, read_checkpoint
from mr2ft.errors import UserError
from mr2ft.hub import hub_download

OPTIONS = ("normalize", "pool", "image_size", "drop_path_rate", "cache_dir")
DEFAULT_MODEL = "vit_base_patch16_224"

# What the official MAE pretrain checkpoint holds besides the encoder; a fine-tuned one adds the classifier.
_MAE_EXTRA = (r"decoder_", r"mask_token$")
_MAE_HEAD = (r"head\.",)
# MAE's evaluation protocol: resize 256, centre crop 224, bicubic, ImageNet statistics.
_MAE_CROP_PCT = 224 / 256
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


class ViTMAEFeatures(nn.Module):
    """A Hugging Face ``ViTMAEModel`` run without masking, pooled to (B, d)."""

    def __init__(self, vit: nn.Module, pool: str) -> None:
        super().__init__()
        self.vit = vit
        self.pool = pool
        self.patch_size = int(vit.config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        n = (h // self.patch_size) * (w // self.patch_size)
        # ViTMAE always shuffles patches by argsort(noise) before masking; increasing noise keeps their order,
        # so with mask_ratio 0 the encoder sees every patch in place and the output is deterministic.
        noise = torch.arange(n, device=images.device, dtype=torch.float32).expand(b, n)
        out = self.vit(pixel_values=images, noise=noise, interpolate_pos_encoding=True).last_hidden_state
        return out[:, 0] if self.pool == "cls" else out[:, 1:].mean(dim=1)


def _hf_layer_ids(num_layers: int):
    pattern = re.compile(r"vit\.(?:layers|encoder\.layer)\.(\d+)\.")

    def layer_id(name: str) -> int:
        m = pattern.match(name)
        if m:
            return int(m.group(1)) + 1
        return 0 if name.startswith("vit.embeddings.") else num_layers + 1

    return layer_id


def _is_hf_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "vit_mae"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _load_hf(folder: Path, label: str, identity: str, opts: Options) -> Backbone:
    from transformers import ViTMAEConfig, ViTMAEModel

    try:
        config = ViTMAEConfig.from_pretrained(str(folder), mask_ratio=0.0)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{label} has no usable ViTMAE config.json ({e.__class__.__name__}); check the folder"
        ) from None
    if opts.drop_path_rate:
        logger.warning("drop_path_rate does not apply to Hugging Face ViTMAE; ignored")
    try:
        with _quiet_transformers():
            vit, info = ViTMAEModel.from_pretrained(str(folder), config=config, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(
            f"{label} does not load as a ViTMAE model ({e.__class__.__name__}: {str(e)[:300]}); pass a "
            "save_pretrained folder of a ViTMAE model"
        ) from None
    bad_missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(("decoder.", "decoder_"))]
    if bad_missing or mismatched or unexpected:
        shown = ", ".join((bad_missing + mismatched + unexpected)[:5])
        raise UserError(
            f"{label} does not fit ViTMAE: {len(bad_missing)} keys missing, {len(mismatched)} with the wrong shape, "
            f"{len(unexpected)} unexpected ({shown}); pass the folder of a ViTMAE checkpoint"
        )
    pool = opts.pool or "cls"
    normalize = bool(opts.normalize)
    size = opts.image_size or int(config.image_size if isinstance(config.image_size, int) else config.image_size[0])
    mean, std = _hf_normalisation(folder)
    preprocess = Preprocess.create(input_size=size, crop_pct=_MAE_CROP_PCT, mean=mean, std=std, interpolation="bicubic")
    name = f"vit_mae(hidden={config.hidden_size}, layers={config.num_hidden_layers}, patch={config.patch_size})"
    n = int(config.num_hidden_layers)
    return finish(
        Backbone(
            family="mae",
            name=name,
            model=FeatureModel(ViTMAEFeatures(vit, pool), normalize=normalize),
            feature_dim=int(config.hidden_size),
            preprocess=preprocess,
            source=label,
            num_layers=n,
            normalize=normalize,
            layer_id=_hf_layer_ids(n),
        ),
        weights=identity,
        pool=pool,
        image_size=opts.image_size,
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own load report and progress bar: we check and report the keys ourselves."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _hf_normalisation(folder: Path) -> tuple[tuple, tuple]:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg_path = folder / "preprocessor_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s is unreadable; using ImageNet mean/std", cfg_path)
    return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _hf_from_hub(repo: str, opts: Options) -> Backbone:
    cfg = hub_download(repo, ["config.json"], cache_dir=opts.cache_dir, what=f"the ViTMAE config of {repo}")
    weights = hub_download(repo, list(_HF_FILES), cache_dir=opts.cache_dir, what=f"the ViTMAE weights of {repo}")
    hub_download(repo, ["preprocessor_config.json"], cache_dir=opts.cache_dir, what="", required=False)
    assert cfg is not None and weights is not None
    return _load_hf(cfg.parent, f"hf-hub:{repo}", f"hf-hub:{repo}:{file_identity(weights)}", opts)


def _mae_preprocess(net: nn.Module, arch: str, image_size: int | None) -> Preprocess:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    tagged = f"{arch}.mae"
    try:
        cfg = timm_family.pretrained_cfg(tagged)
    except UserError:
        cfg = None
    if cfg:
        return Preprocess.create(
            input_size=image_size or int(cfg["input_size"][-1]),
            crop_pct=float(cfg.get("crop_pct") or _MAE_CROP_PCT),
            mean=cfg["mean"],
            std=cfg["std"],
            interpolation=cfg.get("interpolation", "bicubic"),
        )
    size = image_size or int(net.patch_embed.img_size[-1])
    return Preprocess.create(
        input_size=size,
        crop_pct=_MAE_CROP_PCT,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        interpolation="bicubic",
    )


def load(model: str | None, weights: str | None, options: dict[str, Any]) -> Backbone:
    """Load an MAE ViT; see the module docstring for ``model``, ``weights`` and pooling.

    Raises:
        UserError: unknown model, wrong-format or wrong-shape checkpoint, hub weights unavailable offline.
    """
    opts = parse_options("mae", options, OPTIONS)
    if weights is not None and weights.startswith("hf-hub:"):
        return _hf_from_hub(weights[len("hf-hub:") :], opts)
    if weights not in (None, "pretrained", "none"):
        path = Path(weights).expanduser()
        if path.is_dir():
            if _is_hf_folder(path):
                return _load_hf(path, str(path), file_identity(path), opts)
            raise UserError(
                f"folder {path} is not a Hugging Face ViTMAE folder (no config.json with model_type 'vit_mae'); "
                "pass a save_pretrained folder or the MAE .pth file"
            )
        if not path.exists():
            if is_hub_id(weights):
                return _hf_from_hub(weights, opts)
            raise UserError(f"weights file {weights} does not exist; pass the MAE .pth, a ViTMAE folder or hub id")

    model = model or DEFAULT_MODEL
    arch, tag = timm_family.check_arch(model)
    if weights in (None, "pretrained"):
        name = model if tag else f"{arch}.mae"
        if tag and tag != "mae":
            logger.warning("mae family: %s is not an MAE tag; loading it anyway", model)
        built = timm_family.build_net(name, "pretrained", opts)
        _check_vit(built.net, name)
        return _assemble(built.net, arch, name, built.source, built.identity, opts)

    kwargs = dict(num_classes=0, img_size=opts.image_size, drop_path_rate=opts.drop_path_rate)
    if weights == "none":
        net = timm_family.create(arch, **kwargs)
        _check_vit(net, arch)
        logger.warning("mae %s: random weights, as asked (--weights none)", arch)
        source, identity = "random", "random"
    else:
        path = Path(weights).expanduser()
        sd = extract_state_dict(read_checkpoint(path), path, keys=("model", "state_dict"))
        if all(k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        dropped = [k for k in sd if re.match("|".join(_MAE_EXTRA + _MAE_HEAD), k)]
        sd = {k: v for k, v in sd.items() if k not in dropped}
        # A fine-tuned MAE checkpoint pools with fc_norm (and no final norm): build the ViT that way.
        if "fc_norm.weight" in sd and "norm.weight" not in sd:
            kwargs["global_pool"] = "avg"
        net = timm_family.create(arch, **kwargs)
        _check_vit(net, arch)
        timm_family.resample_pos_embed(sd, net)
        load_checked(net, sd, path=path, what=f"MAE ViT {arch}")
        if dropped:
            logger.info("dropped %d MAE-only keys from %s (decoder, mask_token, head)", len(dropped), path)
        source, identity = str(path), file_identity(path)
    return _assemble(net, arch, arch, source, identity, opts)


def _check_vit(net: nn.Module, name: str) -> None:
    if not hasattr(net, "blocks") or not hasattr(net, "pos_embed"):
        raise UserError(f"the mae family needs a ViT; {name} is a {type(net).__name__} (use the timm family for it)")


def _assemble(net: nn.Module, arch: str, name: str, source: str, identity: str, opts: Options) -> Backbone:
    pool = opts.pool or "cls"
    timm_family.set_pool(net, pool)
    preprocess = _mae_preprocess(net, arch, opts.image_size)
    return timm_family.net_backbone("mae", name, net, preprocess, source, identity, opts, pool=pool)


__all__ = ["DEFAULT_MODEL", "ViTMAEFeatures", "load"]
