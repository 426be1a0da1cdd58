"""Tiny random-initialised backbones saved in each real checkpoint format, for tests that must run offline.

Every writer returns exactly the ``load_backbone`` arguments that load what it wrote at 32 px::

    spec = write_tiny_checkpoint("mocov2", tmp_path)
    bb = load_backbone(spec["family"], spec["model"], spec["weights"], **spec["options"])

Formats written (what the real files hold):

- ``clip``: an open_clip model-config JSON (vision width 32, 2 layers, patch 8, image 32; text width 32, 2 layers,
  context 16) and its ``state_dict`` saved with ``torch.save``.
- ``clip-dir``: the same as an open_clip ``local-dir:`` folder (``open_clip_config.json`` + safetensors).
- ``mae``: the official MAE pretrain ``.pth``: ``{"model": encoder + mask_token + decoder_*}`` of timm ``test_vit``.
- ``mae-hf``: a Hugging Face ``ViTMAEForPreTraining`` ``save_pretrained`` folder (as ``facebook/vit-mae-base``).
- ``mocov2``: the official MoCo v2 ``.pth.tar``: ``{"epoch", "arch", "state_dict": {"module.encoder_q.*",
  "module.encoder_q.fc.0/2.*" (MLP head), "module.encoder_k.*", "module.queue", "module.queue_ptr"},
  "optimizer"}`` of timm ``test_resnet``.
- ``timm``: a plain ``state_dict`` (with a 10-class head) of timm ``test_resnet``, as a ``.pth``.
- ``timm-vit``: the same for timm ``test_vit`` as ``.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
FEATURE_DIMS = {"clip": 16, "clip-dir": 16, "mae": 64, "mae-hf": 32, "mocov2": 96, "timm": 96, "timm-vit": 64}
FAMILIES = tuple(FEATURE_DIMS)


def tiny_clip(seed: int = 0, config: dict | None = None) -> torch.nn.Module:
    """The tiny open_clip CLIP (random weights, seeded)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**(config or TINY_CLIP_CONFIG)).eval()


def tiny_vit(seed: int = 0, num_classes: int = 0) -> torch.nn.Module:
    """timm ``test_vit`` (64-d, 6 blocks, patch 16) at 32 px."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_vit", img_size=32, num_classes=num_classes).eval()


def tiny_resnet(seed: int = 0, num_classes: int = 0) -> torch.nn.Module:
    """timm ``test_resnet`` (96-d features, 4 stages)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes).eval()


def mae_pretrain_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of an MAE pretrain model around a ``test_vit`` encoder, decoder included."""
    enc = tiny_vit(seed).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    dec, width, patch_pixels = 32, 64, 16 * 16 * 3
    sd = dict(enc)
    sd["mask_token"] = torch.zeros(1, 1, dec)
    sd["decoder_embed.weight"] = torch.randn(dec, width, generator=g)
    sd["decoder_embed.bias"] = torch.zeros(dec)
    sd["decoder_pos_embed"] = torch.randn(1, 5, dec, generator=g)
    for name, shape in [
        ("norm1.weight", (dec,)),
        ("attn.qkv.weight", (3 * dec, dec)),
        ("attn.proj.weight", (dec, dec)),
        ("mlp.fc1.weight", (4 * dec, dec)),
        ("mlp.fc2.weight", (dec, 4 * dec)),
    ]:
        sd[f"decoder_blocks.0.{name}"] = torch.randn(*shape, generator=g)
    sd["decoder_norm.weight"] = torch.ones(dec)
    sd["decoder_norm.bias"] = torch.zeros(dec)
    sd["decoder_pred.weight"] = torch.randn(patch_pixels, dec, generator=g)
    sd["decoder_pred.bias"] = torch.zeros(patch_pixels)
    return sd


def moco_checkpoint(seed: int = 0) -> dict[str, Any]:
    """An official-format MoCo v2 checkpoint around a ``test_resnet`` query encoder."""
    enc = tiny_resnet(seed).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    hidden, out_dim, queue = 96, 16, 32
    sd: dict[str, torch.Tensor] = {}
    for prefix in ("module.encoder_q.", "module.encoder_k."):
        for k, v in enc.items():
            sd[prefix + k] = v.clone()
        sd[prefix + "fc.0.weight"] = torch.randn(hidden, 96, generator=g)
        sd[prefix + "fc.0.bias"] = torch.zeros(hidden)
        sd[prefix + "fc.2.weight"] = torch.randn(out_dim, hidden, generator=g)
        sd[prefix + "fc.2.bias"] = torch.zeros(out_dim)
    sd["module.queue"] = torch.nn.functional.normalize(torch.randn(out_dim, queue, generator=g), dim=0)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": [0, 1]}]}
    return {"epoch": 200, "arch": "test_resnet", "state_dict": sd, "optimizer": optimizer}


def write_tiny_checkpoint(family: str, tmp_path: Path | str, seed: int = 0) -> dict[str, Any]:
    """Write a tiny backbone of ``family`` (see the module docstring) under ``tmp_path``.

    Returns:
        ``dict(family=..., model=..., weights=..., options=..., feature_dim=...)``: pass ``family``, ``model``,
        ``weights`` and ``**options`` to ``load_backbone``.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"image_size": 32}
    if family == "clip":
        cfg = tmp_path / "tiny-clip.json"
        cfg.write_text(json.dumps(TINY_CLIP_CONFIG), encoding="utf-8")
        weights = tmp_path / "tiny-clip.pt"
        torch.save(tiny_clip(seed).state_dict(), weights)
        spec = dict(family="clip", model=str(cfg), weights=str(weights))
    elif family == "clip-dir":
        from safetensors.torch import save_file

        folder = tmp_path / "tiny-clip-dir"
        folder.mkdir(exist_ok=True)
        config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
        (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
        save_file(
            {k: v.contiguous() for k, v in tiny_clip(seed).state_dict().items()}, folder / "open_clip_model.safetensors"
        )
        spec = dict(family="clip", model=None, weights=f"local-dir:{folder}")
    elif family == "mae":
        weights = tmp_path / "mae_pretrain_test_vit.pth"
        torch.save({"model": mae_pretrain_state(seed)}, weights)
        spec = dict(family="mae", model="test_vit", weights=str(weights))
    elif family == "mae-hf":
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        torch.manual_seed(seed)
        config = ViTMAEConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
        )
        folder = tmp_path / "tiny-vit-mae"
        ViTMAEForPreTraining(config).save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}),
            encoding="utf-8",
        )
        spec = dict(family="mae", model=None, weights=str(folder))
    elif family == "mocov2":
        weights = tmp_path / "moco_v2_test_resnet.pth.tar"
        torch.save(moco_checkpoint(seed), weights)
        spec = dict(family="mocov2", model="test_resnet", weights=str(weights))
    elif family == "timm":
        weights = tmp_path / "test_resnet.pth"
        torch.save(tiny_resnet(seed, num_classes=10).state_dict(), weights)
        spec = dict(family="timm", model="test_resnet", weights=str(weights))
    elif family == "timm-vit":
        from safetensors.torch import save_file

        weights = tmp_path / "test_vit.safetensors"
        save_file({k: v.contiguous() for k, v in tiny_vit(seed, num_classes=10).state_dict().items()}, weights)
        spec = dict(family="timm", model="test_vit", weights=str(weights))
    else:
        raise ValueError(f"no tiny checkpoint for {family!r}; choose from {', '.join(FAMILIES)}")
    return {**spec, "options": options, "feature_dim": FEATURE_DIMS[family]}


def load_tiny(family: str, tmp_path: Path | str, seed: int = 0, **options: Any):
    """Write a tiny checkpoint of ``family`` and load it with ``load_backbone`` (extra options override)."""
    from mr2ft.backbones import load_backbone

    spec = write_tiny_checkpoint(family, tmp_path, seed=seed)
    return load_backbone(spec["family"], spec["model"], spec["weights"], **{**spec["options"], **options})
