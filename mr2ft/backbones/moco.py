"""The ``mocov2`` family (alias ``moco``): a ResNet's query encoder from a MoCo v2 checkpoint.

``weights``:

- ``None`` / ``"pretrained"``: the official MoCo v2 800-epoch ResNet-50 checkpoint (downloaded once into the torch
  hub cache; offline it must already be there, or be passed as a file).
- the official checkpoint format (``.pth.tar`` holding ``{"state_dict": {"module.encoder_q.<resnet key>": ...}}``;
  the MLP projection ``fc.0``/``fc.2`` is dropped, ``encoder_k`` and the ``queue`` are ignored);
- an already converted plain ResNet state dict (torchvision / timm key names; a ``fc.*`` classifier is dropped);
- ``"none"``: random weights.

``model`` (default ``resnet50``) is the timm ResNet to build; torchvision and timm ResNet key names agree. Features
are the 2048-d global-average-pooled output of the last stage. The preprocessing is MoCo's linear-evaluation one:
resize 256, centre crop 224, bilinear, ImageNet mean/std.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mr2ft.backbones import timm as timm_family
from mr2ft.backbones.base import (
    Backbone,
    Preprocess,
    logger,
    parse_options,
)
from mr2ft.backbones.checkpoint import extract_state_dict, file_identity, load_checked, read_checkpoint
from mr2ft.errors import UserError
from mr2ft.hub import url_download

OPTIONS = ("normalize", "image_size", "drop_path_rate", "cache_dir")
DEFAULT_MODEL = "resnet50"
MOCO_V2_URL = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar"

_QUERY_PREFIXES = ("module.encoder_q.", "encoder_q.")
# Keys of the official checkpoint that are not the query encoder: the key encoder and the negatives queue.
_MOCO_EXTRA = re.compile(r"(module\.)?(encoder_k\.|queue$|queue_ptr$)")


def convert_moco_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The query encoder's ResNet weights from a MoCo checkpoint's state dict (or a plain ResNet state dict).

    Returns:
        ``(backbone_state_dict, dropped_keys)``: the projection head / classifier (``fc.*``) and the MoCo-only keys
        are dropped; everything else is returned under plain ResNet names, tensors untouched.
    """
    prefix = next((p for p in _QUERY_PREFIXES if any(k.startswith(p) for k in sd)), None)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in sd.items():
        if prefix is not None:
            if not key.startswith(prefix):
                if not _MOCO_EXTRA.match(key):
                    out[key] = value  # foreign key: kept so the exact-keys check reports it
                else:
                    dropped.append(key)
                continue
            key = key[len(prefix) :]
        elif key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith("fc."):
            dropped.append(key)
            continue
        out[key] = value
    return out, dropped


def load(model: str | None, weights: str | None, options: dict[str, Any]) -> Backbone:
    """Load a MoCo v2 ResNet; see the module docstring for ``model`` and ``weights``.

    Raises:
        UserError: unreadable file, a checkpoint of another family or shape, the default checkpoint unavailable.
    """
    opts = parse_options("mocov2", options, OPTIONS)
    name = model or DEFAULT_MODEL
    timm_family.check_arch(name)
    net = timm_family.create(name, num_classes=0, drop_path_rate=opts.drop_path_rate)
    if weights == "none":
        logger.warning("mocov2 %s: random weights, as asked (--weights none)", name)
        source, identity = "random", "random"
    else:
        if weights in (None, "pretrained"):
            if name != DEFAULT_MODEL:
                raise UserError(
                    f"the official MoCo v2 weights are a ResNet-50; for {name} pass --weights /path/to/checkpoint"
                )
            path = url_download(MOCO_V2_URL, opts.cache_dir, what="the MoCo v2 ResNet-50 checkpoint")
            source = f"{MOCO_V2_URL} ({path})"
        else:
            path = Path(weights).expanduser()
            source = str(path)
        sd = extract_state_dict(read_checkpoint(path), path, keys=("state_dict", "model"))
        sd, dropped = convert_moco_state_dict(sd)
        load_checked(net, sd, path=path, what=f"MoCo v2 {name} encoder")
        logger.info(
            "MoCo v2: loaded %d encoder tensors, dropped %d (projection head, key encoder, queue)",
            len(sd),
            len(dropped),
        )
        identity = file_identity(path)

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    # MoCo's linear-evaluation transform: Resize(256), CenterCrop(224), torchvision's default bilinear.
    preprocess = Preprocess.create(
        input_size=opts.image_size or 224,
        crop_pct=224 / 256,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        interpolation="bilinear",
    )
    return timm_family.net_backbone("mocov2", name, net, preprocess, source, identity, opts)


__all__ = ["DEFAULT_MODEL", "MOCO_V2_URL", "convert_moco_state_dict", "load"]
