"""``mr2ft export``: a finished run as a folder that timm, transformers or open_clip loads without mr2ft.

- ``timm``: ``model.safetensors`` + ``config.json`` written by timm's own ``save_for_hf`` (architecture,
  ``num_classes``, ``label_names``, the run's resolved preprocessing, the model arguments); load it with
  ``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``hf-hub:REPO`` once pushed). For timm, MAE (timm ViT)
  and MoCo runs.
- ``hf``: ``ViTForImageClassification.save_pretrained`` output with ``id2label``/``label2id`` and an image processor
  (resize, centre crop, normalise as the run did). For ViT runs (a timm ViT pooled on the class token, or a Hugging
  Face ViTMAE); other families have no transformers class and are refused.
- ``open_clip``: the image tower's state dict in open_clip's key layout (``visual.*``) with ``open_clip_config.json``,
  plus ``head.safetensors`` and ``classes.json``: ``logits = normalize(encode_image(x)) @ weight.T + bias``.

The classifier is the run's head as one linear map: a probe's BatchNorm (``--head bn_linear``) is folded into it,
so the exported logits are the run's own. Features L2-normalised by the run (``--normalize``) cannot be folded into
a linear layer: timm and hf refuse them (open_clip says so in ``classes.json``). The folder is written under a
temporary name and renamed when complete. ``push_to_hub`` uploads it through ``huggingface_hub``; offline it fails
at once.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mr2ft.errors import UserError
from mr2ft.io import save_tensors, write_json, write_text

FORMATS = ("timm", "hf", "open_clip")


def _refuse_normalized(model: Any, fmt: str) -> None:
    if model.backbone.normalize:
        raise UserError(
            f"{model.run_dir} L2-normalises its features, which a {fmt} classifier cannot hold; export it with "
            "--format open_clip (CLIP runs), or train with --no-normalize"
        )


def _head_tensors(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = model.linear()
    return weight.contiguous(), bias.contiguous()


# ---- timm ------------------------------------------------------------------------------------------------------


def timm_data_config(preprocess: Any) -> dict[str, Any]:
    """The run's preprocessing in timm's data-config keys."""
    return {
        "input_size": (3, preprocess.input_size, preprocess.input_size),
        "interpolation": preprocess.interpolation,
        "mean": tuple(preprocess.mean),
        "std": tuple(preprocess.std),
        "crop_pct": preprocess.crop_pct,
        "crop_mode": "squash" if preprocess.resize_mode == "squash" else "center",
    }


def write_timm(model: Any, folder: Path) -> None:
    """timm's ``save_for_hf`` folder of the run's network with the run's classifier."""
    from timm.models import save_for_hf

    trunk = model.backbone.model.trunk
    if not (hasattr(trunk, "reset_classifier") and hasattr(trunk, "pretrained_cfg")):
        raise UserError(
            f"{model.run_dir} has a {model.backbone.family} backbone ({type(trunk).__name__}) with no timm class; "
            + ("use --format open_clip" if model.backbone.family == "clip" else "use --format hf")
        )
    _refuse_normalized(model, "timm")
    weight, bias = _head_tensors(model)
    net = copy.deepcopy(trunk).cpu().eval()
    net.reset_classifier(model.num_classes)
    classifier = net.get_classifier()
    if getattr(classifier, "weight", None) is None or tuple(classifier.weight.shape) != tuple(weight.shape):
        raise UserError(f"timm {model.backbone.name}'s classifier does not take the run's head; use --format hf")
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    save_for_hf(
        net,
        str(folder),
        model_config={"label_names": list(model.class_names)},
        model_args={"num_classes": model.num_classes},
        safe_serialization=True,
        data_config=timm_data_config(model.backbone.preprocess),
    )


# ---- Hugging Face transformers ---------------------------------------------------------------------------------


# (block prefix, timm part -> transformers part, q/k/v names) of ViTForImageClassification's keys, per version.
HF_VIT_LAYOUTS = {
    "v5": (
        "vit.layers.{}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
    "v4": (
        "vit.encoder.layer.{}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        },
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ),
}


def _timm_vit_to_hf(net: Any, layout: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(ViTConfig arguments, ViT state dict) of a standard timm ViT pooled on its class token."""
    from timm.models.vision_transformer import VisionTransformer

    standard = (
        isinstance(net, VisionTransformer)
        and net.global_pool == "token"
        and net.num_prefix_tokens == 1
        and not net.no_embed_class
        and isinstance(net.fc_norm, torch.nn.Identity)
        and isinstance(net.norm_pre, torch.nn.Identity)
        and all(
            isinstance(b.ls1, torch.nn.Identity) and isinstance(b.attn.q_norm, torch.nn.Identity) for b in net.blocks
        )
    )
    if not standard:
        raise UserError("the hf export takes a plain ViT pooled on its class token (--pool cls); use --format timm")
    width, blocks = net.embed_dim, net.blocks
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
    }
    # transformers 5 names the block's parts like timm; transformers 4 had encoder.layer.N.attention.attention.query.
    prefix, names, qkv = HF_VIT_LAYOUTS[layout]
    for i in range(len(blocks)):
        src, dst = f"blocks.{i}.", prefix.format(i)
        for part in ("weight", "bias"):
            for a, b in names.items():
                out[f"{dst}{b}.{part}"] = sd[f"{src}{a}.{part}"]
            for j, name in enumerate(qkv):
                out[f"{dst}{name}.{part}"] = sd[f"{src}attn.qkv.{part}"][j * width : (j + 1) * width]
    config = {
        "hidden_size": width,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].attn.num_heads,
        "intermediate_size": blocks[0].mlp.fc1.out_features,
        "image_size": int(net.patch_embed.img_size[0]),
        "patch_size": int(net.patch_embed.patch_size[0]),
        "layer_norm_eps": float(net.norm.eps),
        "qkv_bias": True,
        "hidden_act": "gelu",
    }
    return config, out


def _vitmae_to_hf(trunk: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(ViTConfig arguments, ViT state dict) of a Hugging Face ViTMAE encoder pooled on its class token."""
    if trunk.pool != "cls":
        raise UserError("the hf export takes a ViTMAE pooled on its class token (--pool cls); this run pools the mean")
    cfg = trunk.vit.config
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "image_size",
        "patch_size",
        "layer_norm_eps",
        "qkv_bias",
        "hidden_act",
    )
    sd = {f"vit.{k}": v.detach() for k, v in trunk.vit.state_dict().items()}
    return {k: getattr(cfg, k) for k in keys}, sd


def _image_processor(preprocess: Any) -> Any:
    """A transformers image processor that resizes, centre-crops and normalises as the run did."""
    from PIL import Image
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    resample = getattr(Image.Resampling, preprocess.interpolation.upper())
    common = {"image_mean": list(preprocess.mean), "image_std": list(preprocess.std), "resample": resample}
    if preprocess.resize_mode == "squash":
        return ViTImageProcessor(size={"height": preprocess.input_size, "width": preprocess.input_size}, **common)
    # ConvNeXt's processor resizes the shorter side to size / crop_pct, then centre-crops to size (below 384 px).
    return ConvNextImageProcessor(size={"shortest_edge": preprocess.input_size}, crop_pct=preprocess.crop_pct, **common)


def write_hf(model: Any, folder: Path) -> None:
    """``ViTForImageClassification.save_pretrained`` with the run's classifier, labels and image processor."""
    from transformers import ViTConfig, ViTForImageClassification

    from mr2ft.backbones.mae import ViTMAEFeatures

    trunk = model.backbone.model.trunk
    is_timm_vit = type(trunk).__name__ == "VisionTransformer" and hasattr(trunk, "blocks")
    if not (isinstance(trunk, ViTMAEFeatures) or is_timm_vit):
        raise UserError(
            f"the hf export is for ViT and ViTMAE runs; {model.backbone.family} {model.backbone.name} has no "
            "transformers class; use --format " + ("open_clip" if model.backbone.family == "clip" else "timm")
        )
    _refuse_normalized(model, "hf")
    if isinstance(trunk, ViTMAEFeatures):
        config_args, sd = _vitmae_to_hf(trunk)
    else:
        probe = ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1))
        layout = "v5" if "vit.layers.0.layernorm_before.weight" in probe.state_dict() else "v4"
        config_args, sd = _timm_vit_to_hf(trunk, layout)
    weight, bias = _head_tensors(model)
    sd.update({"classifier.weight": weight, "classifier.bias": bias})
    id2label = dict(enumerate(model.class_names))
    config = ViTConfig(**config_args, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    hf_model = ViTForImageClassification(config).eval()
    result = hf_model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"ViT conversion left keys out: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    hf_model.save_pretrained(str(folder), safe_serialization=True)
    _image_processor(model.backbone.preprocess).save_pretrained(str(folder))


# ---- open_clip -------------------------------------------------------------------------------------------------


def _open_clip_model_cfg(model: Any) -> dict:
    """The open_clip model config of a CLIP run, as its backbone resolved it (QuickGELU and image size included)."""
    from mr2ft.backbones import clip

    settings = model.settings
    spec = clip._resolve(settings.get("model"), settings.get("weights"), None)
    cfg = copy.deepcopy(spec.model_cfg)
    if settings.get("image_size"):
        cfg["vision_cfg"]["image_size"] = settings["image_size"]
    return cfg


def write_open_clip(model: Any, folder: Path) -> None:
    """The image tower in open_clip's key layout, its config and preprocessing, the head and the class names."""
    if model.backbone.family != "clip":
        raise UserError(
            f"the open_clip export is for CLIP runs; {model.run_dir} has a {model.backbone.family} backbone "
            "(use --format timm or hf)"
        )
    pre = model.backbone.preprocess
    visual = model.backbone.model.trunk
    save_tensors(
        folder / "open_clip_model.safetensors",
        {f"visual.{k}": v.detach().contiguous() for k, v in visual.state_dict().items()},
    )
    weight, bias = _head_tensors(model)
    save_tensors(folder / "head.safetensors", {"weight": weight, "bias": bias})
    preprocess_cfg = {
        "size": pre.input_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "resize_mode": "squash" if pre.resize_mode == "squash" else "shortest",
        "crop_pct": pre.crop_pct,
    }
    write_json(
        folder / "open_clip_config.json", {"model_cfg": _open_clip_model_cfg(model), "preprocess_cfg": preprocess_cfg}
    )
    write_json(
        folder / "classes.json",
        {
            "class_names": list(model.class_names),
            "normalize_features": bool(model.backbone.normalize),
            "logits": "normalize(encode_image(x)) @ weight.T + bias"
            if model.backbone.normalize
            else "encode_image(x) @ weight.T + bias",
        },
    )


# ---- the job ---------------------------------------------------------------------------------------------------

WRITERS: dict[str, Callable[[Any, Path], None]] = {"timm": write_timm, "hf": write_hf, "open_clip": write_open_clip}

USAGE = {
    "timm": 'import timm\nmodel = timm.create_model("local-dir:{dir}", pretrained=True).eval()\n'
    "cfg = timm.data.resolve_data_config(model=model)\ntransform = timm.data.create_transform(**cfg)\n"
    "labels = model.pretrained_cfg['label_names']",
    "hf": "from transformers import AutoImageProcessor, AutoModelForImageClassification\n"
    'processor = AutoImageProcessor.from_pretrained("{dir}")\n'
    'model = AutoModelForImageClassification.from_pretrained("{dir}").eval()',
    "open_clip": "import json, open_clip, safetensors.torch as st, torch.nn.functional as F\n"
    'cfg = json.load(open("{dir}/open_clip_config.json"))\nmodel = open_clip.CLIP(**cfg["model_cfg"]).eval()\n'
    'model.load_state_dict(st.load_file("{dir}/open_clip_model.safetensors"), strict=False)\n'
    'head = st.load_file("{dir}/head.safetensors")\n'
    'logits = F.normalize(model.encode_image(x), dim=-1) @ head["weight"].T + head["bias"]',
}


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used now (the project's one hub policy), or None."""
    from mr2ft.hub import offline_reason

    return offline_reason()


def push_folder(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the model repo ``repo`` (created when missing); returns its URL.

    Raises:
        UserError: offline, unreachable, or the hub refuses (no token, no permission).
    """
    reason = hub_offline_reason()
    if reason:
        raise UserError(
            f"cannot push to the Hugging Face hub: {reason}; upload {folder} later with `hf upload {repo} {folder}`"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Add model exported by mr2ft")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(
            f"the hub refused the upload to {repo} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
            "check `hf auth login` and the repository name"
        ) from None
    return f"https://huggingface.co/{repo}"


def run_export(
    run: str | Path, fmt: str, out: str | Path, *, push_to_hub: str | None = None, overwrite: bool = False
) -> Path:
    """Export a finished run as ``fmt`` into the folder ``out`` (and push it when asked).

    Raises:
        UserError: unknown format or run, a format the run's family cannot take, an existing non-empty ``out``,
            offline with ``push_to_hub``.
    """
    from mr2ft.evaluate import load_trained, read_settings

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    read_settings(Path(run))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(
            f"export folder {out} already exists and is not empty; pass --overwrite or choose another --out"
        )
    if push_to_hub:
        reason = hub_offline_reason()  # before the work, not after
        if reason:
            raise UserError(
                f"cannot push to the Hugging Face hub: {reason}; export without --push-to-hub and upload later"
            )
    model = load_trained(run)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        WRITERS[fmt](model, tmp)
        usage = USAGE[fmt].format(dir=out.resolve())
        title = f"Exported by mr2ft from run `{model.run_dir}` ({fmt}, {model.num_classes} classes)."
        write_text(tmp / "README.md", f"# {out.name}\n\n{title}\n\n```python\n{usage}\n```\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    if push_to_hub:
        push_folder(out, push_to_hub)
    return out


__all__ = ["FORMATS", "push_folder", "run_export", "timm_data_config", "write_hf", "write_open_clip", "write_timm"]
