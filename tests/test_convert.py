"""Converting the authors' checkpoints: state dicts built in the official (timm) layout, outputs checked against an
independent implementation (timm's modules and the release's forward written out here), and every refusal."""

import argparse
import subprocess
import sys
from functools import partial

import pytest
import timm
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from g2sd_hf import G2SDForGenericDistillation, G2SDForImageClassification, MAETeacher
from g2sd_hf.convert import convert_official_checkpoint, convert_state_dict, load_official_state_dict
from g2sd_hf.modeling_g2sd import get_2d_sincos_position_embeddings

from .conftest import IMAGE_SIZE, NUM_PATCHES, PATCH_SIZE


LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


def timm_vit(num_classes=5, global_pool="token", depth=2, width=32, heads=2, seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4,
        qkv_bias=True,
        num_classes=num_classes,
        global_pool=global_pool,
        fc_norm=global_pool == "avg",
        norm_layer=LAYER_NORM,
    )
    with torch.no_grad():  # no zero-initialized tensor may hide a mapping error
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def save_release_file(path, state_dict):
    """What the release's `misc.save_model` writes: model, optimizer, epoch, scaler and the argparse arguments."""
    torch.save(
        {
            "model": state_dict,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 199,
            "scaler": {},
            "args": argparse.Namespace(model="vit_tiny_patch16", blr=1e-3),
        },
        path,
    )
    return path


def test_distilled_classifier_matches_the_release_forward(tmp_path):
    vit = timm_vit()
    state_dict = dict(vit.state_dict())
    torch.manual_seed(1)
    head_dist = nn.Linear(32, 5)
    state_dict.update(
        {
            "dist_token": torch.randn(1, 1, 32) * 0.02,
            "head_dist.weight": head_dist.weight.detach(),
            "head_dist.bias": head_dist.bias.detach(),
        }
    )
    path = save_release_file(tmp_path / "checkpoint.pth", state_dict)

    model = convert_official_checkpoint(path, "classifier", tmp_path / "converted", num_attention_heads=2)
    assert model.config.use_distillation_token and model.config.num_labels == 5
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():  # the release's DistilledVisionTransformer: the token appended after the position embedding
        x = vit.patch_embed(images)
        x = torch.cat([vit.cls_token.expand(3, -1, -1), x], dim=1) + vit.pos_embed
        x = torch.cat([x, state_dict["dist_token"].expand(3, -1, -1)], dim=1)
        x = vit.norm(vit.blocks(x))
        expected = (vit.head(x[:, 0]) + head_dist(x[:, -1])) / 2
        reloaded = G2SDForImageClassification.from_pretrained(tmp_path / "converted").eval()
        torch.testing.assert_close(model(images).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(images).logits, expected, atol=1e-5, rtol=1e-5)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (tmp_path / "converted" / name).exists()


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_plain_classifier_matches_timm(tmp_path, global_pool):
    vit = timm_vit(global_pool=global_pool)
    path = save_release_file(tmp_path / "checkpoint.pth", vit.state_dict())
    model = convert_official_checkpoint(
        path,
        "classifier",
        tmp_path / "converted",
        preset="vit_tiny_patch16",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        patch_size=PATCH_SIZE,
    )
    assert model.config.use_mean_pooling == (global_pool == "avg")
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, vit(images), atol=1e-5, rtol=1e-5)


def release_student_state_dict(seed=0):
    """A generic-distillation student in the release's `MaskedAutoencoderViT` layout, from timm modules."""
    encoder = timm_vit(num_classes=0, seed=seed)
    torch.manual_seed(seed + 1)
    decoder = nn.ModuleDict(
        {
            "decoder_embed": nn.Linear(32, 16),
            "decoder_blocks": nn.ModuleList(Block(16, 2, 4, qkv_bias=True, norm_layer=LAYER_NORM) for _ in range(2)),
            "decoder_norm": nn.LayerNorm(16, eps=1e-6),
            "decoder_pred": nn.Linear(16, PATCH_SIZE**2 * 3),
            "decoderfeature_pred": Mlp(16, 24, 24),
            "encoderfeature_pred": Mlp(32, 48, 48),
        }
    )
    state_dict = {**encoder.state_dict(), **{key: value.detach() for key, value in decoder.state_dict().items()}}
    state_dict["mask_token"] = torch.randn(1, 1, 16) * 0.02
    state_dict["pos_embed"] = get_2d_sincos_position_embeddings(32, (4, 4))[None]
    state_dict["decoder_pos_embed"] = get_2d_sincos_position_embeddings(16, (4, 4))[None]
    return state_dict, encoder, decoder


def release_forward(state_dict, encoder, decoder, images, noise, mask_ratio=0.75, until="features"):
    """The release's MaskedAutoencoderViT.forward (student branch, or the MAE decoder's pixel head), written out."""
    x = encoder.patch_embed(images) + state_dict["pos_embed"][:, 1:]
    num_keep = int(NUM_PATCHES * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :num_keep, None].expand(-1, -1, x.shape[-1]))
    cls = state_dict["cls_token"] + state_dict["pos_embed"][:, :1]
    x = encoder.norm(encoder.blocks(torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)))
    x = decoder["decoder_embed"](x)
    masks = state_dict["mask_token"].expand(x.shape[0], NUM_PATCHES + 1 - x.shape[1], -1)
    patches = torch.cat([x[:, 1:], masks], dim=1)
    patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], patches], dim=1) + state_dict["decoder_pos_embed"]
    for block in decoder["decoder_blocks"]:
        x = block(x)
    if until == "features":
        return decoder["decoderfeature_pred"](x)
    return decoder["decoder_pred"](decoder["decoder_norm"](x))[:, 1:]


def test_generic_student_matches_the_release_forward(tmp_path, pixel_values, noise):
    state_dict, encoder, decoder = release_student_state_dict()
    path = save_release_file(tmp_path / "student.pth", state_dict)
    model = convert_official_checkpoint(
        path, "generic-student", tmp_path / "converted", num_attention_heads=2, decoder_num_attention_heads=2
    )
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.decoder_hidden_size, config.target_hidden_size) == (
        32,
        2,
        16,
        24,
    )
    with torch.no_grad():
        expected = release_forward(state_dict, encoder, decoder, pixel_values, noise)
        torch.testing.assert_close(model(pixel_values, noise=noise).predicted_features, expected, atol=1e-5, rtol=1e-5)
    reloaded = G2SDForGenericDistillation.from_pretrained(tmp_path / "converted")
    assert not reloaded.g2sd.embeddings.position_embeddings.requires_grad


def test_mae_teacher_matches_the_release_forward(tmp_path, pixel_values, noise):
    state_dict, encoder, decoder = release_student_state_dict(seed=3)
    for key in [key for key in state_dict if key.startswith(("decoderfeature_pred", "encoderfeature_pred"))]:
        del state_dict[key]
    path = save_release_file(tmp_path / "mae_pretrain_full.pth", state_dict)
    overrides = dict(
        decoder_num_attention_heads=2,
        decoder_hidden_size=16,
        decoder_intermediate_size=64,
        decoder_num_hidden_layers=2,
    )
    convert_official_checkpoint(path, "mae-teacher", tmp_path / "mae", num_attention_heads=2, **overrides)
    teacher = MAETeacher.from_pretrained(tmp_path / "mae", target_layer=2)  # its processor: ImageNet normalization
    with torch.no_grad():
        pixels = release_forward(state_dict, encoder, decoder, pixel_values, noise, until="pixels")
        torch.testing.assert_close(teacher.model(pixel_values, noise=noise).logits, pixels, atol=1e-5, rtol=1e-5)


def test_encoder_only_mae_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    state_dict, _, _ = release_student_state_dict()
    encoder_only = {
        key: value
        for key, value in state_dict.items()
        if not key.startswith(("decoder", "mask_token", "encoderfeature"))
    }
    path = save_release_file(tmp_path / "mae_pretrain_vit.pth", encoder_only)
    with pytest.raises(ValueError, match=r"missing \d+: decoder_blocks\.0\..*needs its decoder"):
        convert_official_checkpoint(path, "mae-teacher", tmp_path / "out", num_attention_heads=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*staging-*"))


def test_mismatched_keys_and_shapes_are_listed(tmp_path):
    state_dict = dict(timm_vit().state_dict())
    del state_dict["blocks.1.mlp.fc2.bias"]
    state_dict["pre_logits.fc.weight"] = torch.ones(32, 32)
    with pytest.raises(
        ValueError, match=r"missing 1: blocks\.1\.mlp\.fc2\.bias; unexpected 1: pre_logits\.fc\.weight"
    ):
        convert_state_dict(state_dict, "classifier", num_attention_heads=2)
    with pytest.raises(ValueError, match="Attention heads cannot be read from the weights: pass a preset"):
        convert_state_dict(dict(timm_vit().state_dict()), "classifier")
    with pytest.raises(
        ValueError, match=r"shape mismatches .*blocks\.0\.attn\.qkv\.weight \(96, 32\) vs \(576, 192\)"
    ):
        convert_state_dict(dict(timm_vit().state_dict()), "classifier", preset="vit_tiny_patch16")
    with pytest.raises(ValueError, match="kind must be one of"):
        convert_state_dict(state_dict, "detector")


class ArbitraryObject:
    """Unpickling this would import and construct it: weights_only refuses."""


def test_only_tensors_and_namespaces_are_unpickled(tmp_path):
    torch.save({"model": timm_vit().state_dict(), "extra": ArbitraryObject()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="not unpickled"):
        load_official_state_dict(tmp_path / "unsafe.pth")
    torch.save(timm_vit().state_dict(), tmp_path / "bare.pth")
    assert "cls_token" in load_official_state_dict(tmp_path / "bare.pth")


def test_command_line(tmp_path):
    path = save_release_file(tmp_path / "checkpoint.pth", timm_vit().state_dict())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "g2sd_hf.convert",
            "--checkpoint",
            str(path),
            "--kind",
            "classifier",
            "--output",
            str(tmp_path / "out"),
            "--config_overrides",
            "num_attention_heads=2",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert G2SDForImageClassification.from_pretrained(tmp_path / "out").config.num_labels == 5
    assert timm.__version__  # the independent implementation these tests compare against
