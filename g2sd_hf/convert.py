"""Convert the authors' released checkpoints (PyTorch `.pth`, timm layout) into transformers folders.

Three kinds:

- `generic-student`: a generic-distillation student (`MaskedAutoencoderViT` of the G2SD release) ->
  `G2SDForGenericDistillation`. Its `decoder_norm`, `decoder_pred` (pixel head) and `encoderfeature_pred` (weight 0
  in the loss) are unused and left out.
- `classifier`: a specific-distillation student (timm `VisionTransformer`, plus `dist_token` and `head_dist` when
  distilled, `fc_norm` when trained with global pooling) -> `G2SDForImageClassification`.
- `mae-teacher`: a facebookresearch/mae pre-training checkpoint *with its decoder* (e.g.
  `mae_pretrain_vit_base_full.pth`) -> `ViTMAEForPreTraining`.

    python -m g2sd_hf.convert --checkpoint g2sd_small_sd.pth --kind classifier --preset vit_small_patch16 --output out

Files are read with `torch.load(weights_only=True)`, which unpickles tensors and plain containers only, plus the
`argparse.Namespace` the release stores under `args`. A checkpoint whose keys or shapes do not match the kind and
architecture is refused with the missing, unexpected and mismatched keys listed; nothing is written unless the whole
conversion succeeds. The number of attention heads cannot be read from weights: give a `--preset`, or the heads in
`--config_overrides`.
"""

import argparse
import math
import pickle
import re
from pathlib import Path

import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.utils import logging

from .configuration_g2sd import G2SD_PRESETS, G2SDConfig, resolve_preset_name
from .data import image_processor
from .hub import build_model_card
from .modeling_g2sd import G2SDForGenericDistillation, G2SDForImageClassification
from .output_folders import check_output_folder, staged_folder
from .scripts.run import parse_overrides
from .stock_model import fused_layer_tensors, load_by_parameter, stock_vit_layer_parameters
from .teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


logger = logging.get_logger(__name__)

KINDS = ("generic-student", "classifier", "mae-teacher")

MAE_PRESETS = {
    "mae_vit_base_patch16": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16
    ),
    "mae_vit_large_patch16": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=16
    ),
    "mae_vit_huge_patch14": dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, patch_size=14
    ),
}
# Every released MAE has the same decoder: 512-d, 8 blocks, 16 heads.
MAE_DECODER = dict(
    decoder_hidden_size=512,
    decoder_num_hidden_layers=8,
    decoder_num_attention_heads=16,
    decoder_intermediate_size=2048,
)

# The official student's unused heads: the pixel head and its norm, and the encoder-feature head (weight 0 in the loss).
_UNUSED_STUDENT_KEYS = re.compile(r"^(decoder_norm|decoder_pred|encoderfeature_pred)\.")
_BLOCK_PARTS = {
    "norm1": "norm1",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.projection",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------
def load_official_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The `model` state dict of a released `.pth` file, read with `weights_only=True`."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors, plain containers and argparse.Namespace, which are not "
            f"unpickled (weights_only=True; arbitrary pickles can run code): {error}"
        ) from error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        state_dict = checkpoint["model"]
    elif (
        isinstance(checkpoint, dict)
        and checkpoint
        and all(isinstance(value, torch.Tensor) for value in checkpoint.values())
    ):
        state_dict = checkpoint  # a bare state dict
    else:
        keys = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} has no `model` state dict (top-level keys: {keys}).")
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _count_blocks(state_dict: dict, prefix: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(rf"^{prefix}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _encoder_shape(state_dict: dict) -> dict:
    """Image/patch size, width and depth of the encoder, read from the tensors."""
    if "pos_embed" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        raise ValueError(
            "The checkpoint has no `pos_embed` / `patch_embed.proj.weight`: not a ViT checkpoint of the release."
        )
    hidden_size, num_channels, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    return {
        "hidden_size": hidden_size,
        "num_channels": num_channels,
        "patch_size": patch_size,
        "image_size": grid * patch_size,
        "num_hidden_layers": _count_blocks(state_dict, "blocks"),
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        if "blocks.0.mlp.fc1.weight" in state_dict
        else 4 * hidden_size,
    }


# --------------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------------
def _require_heads(preset: str | None, overrides: dict, names: tuple[str, ...], presets) -> None:
    missing = [name for name in names if name not in overrides]
    if preset is None and missing:
        raise ValueError(
            f"Attention heads cannot be read from the weights: pass a preset ({', '.join(sorted(presets))}) or "
            f"{', '.join(f'{name}=...' for name in missing)}."
        )


def _student_config(state_dict: dict, kind: str, preset: str | None, overrides: dict) -> G2SDConfig:
    inferred = _encoder_shape(state_dict)
    values = {**G2SD_PRESETS[resolve_preset_name(preset)]} if preset else {}
    values.update({key: value for key, value in inferred.items() if key in ("image_size", "num_channels")})
    heads = (
        ("num_attention_heads", "decoder_num_attention_heads")
        if kind == "generic-student"
        else ("num_attention_heads",)
    )
    _require_heads(preset, overrides, heads, G2SD_PRESETS)
    if not preset:  # widths and depths from the tensors, heads from the overrides
        values.update(inferred)
    if kind == "generic-student":
        if "decoder_embed.weight" in state_dict and not preset:
            decoder_width = state_dict["decoder_embed.weight"].shape[0]
            values.update(
                decoder_hidden_size=decoder_width,
                decoder_num_hidden_layers=_count_blocks(state_dict, "decoder_blocks"),
                decoder_intermediate_size=4 * decoder_width,
            )
        if "decoderfeature_pred.fc2.weight" in state_dict:
            values["target_hidden_size"] = state_dict["decoderfeature_pred.fc2.weight"].shape[0]
    else:
        values["use_distillation_token"] = "dist_token" in state_dict
        values["use_mean_pooling"] = "fc_norm.weight" in state_dict
        if "head.weight" in state_dict:
            values["num_labels"] = state_dict["head.weight"].shape[0]
    values.update(overrides)
    return G2SDConfig(**values)


def _mae_config(state_dict: dict, preset: str | None, overrides: dict) -> ViTMAEConfig:
    inferred = _encoder_shape(state_dict)
    if preset is not None and preset not in MAE_PRESETS:
        raise ValueError(f"Unknown MAE preset {preset!r}: choose one of {sorted(MAE_PRESETS)}.")
    _require_heads(preset, overrides, ("num_attention_heads",), MAE_PRESETS)
    values = {**MAE_PRESETS[preset]} if preset else dict(inferred)
    values.update(image_size=inferred["image_size"], num_channels=inferred["num_channels"], **MAE_DECODER)
    if "decoder_embed.weight" in state_dict and not preset:
        decoder_width = state_dict["decoder_embed.weight"].shape[0]
        values.update(
            decoder_hidden_size=decoder_width,
            decoder_intermediate_size=4 * decoder_width,
            decoder_num_hidden_layers=_count_blocks(state_dict, "decoder_blocks"),
        )
    values.update(overrides)
    return ViTMAEConfig(layer_norm_eps=1e-6, norm_pix_loss=True, **values)


# --------------------------------------------------------------------------------------------------------------------
# Name maps: official key -> parameter of the target model
# --------------------------------------------------------------------------------------------------------------------
def _g2sd_block_map(official_prefix: str, layer) -> dict:
    return {
        f"{official_prefix}.{part}.{kind}": getattr(layer.get_submodule(ours), kind)
        for part, ours in _BLOCK_PARTS.items()
        for kind in ("weight", "bias")
    }


def _g2sd_targets(model, kind: str) -> dict:
    encoder = model.g2sd
    targets = {
        "cls_token": encoder.embeddings.cls_token,
        "pos_embed": encoder.embeddings.position_embeddings,
        "patch_embed.proj.weight": encoder.embeddings.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": encoder.embeddings.patch_embeddings.projection.bias,
    }
    for index, layer in enumerate(encoder.layers):
        targets.update(_g2sd_block_map(f"blocks.{index}", layer))
    norm, norm_name = (encoder.fc_norm, "fc_norm") if model.config.use_mean_pooling else (encoder.layernorm, "norm")
    targets.update({f"{norm_name}.weight": norm.weight, f"{norm_name}.bias": norm.bias})
    if kind == "generic-student":
        decoder = model.decoder
        targets.update(
            {
                "decoder_embed.weight": decoder.decoder_embed.weight,
                "decoder_embed.bias": decoder.decoder_embed.bias,
                "mask_token": decoder.mask_token,
                "decoder_pos_embed": decoder.position_embeddings,
                "decoderfeature_pred.fc1.weight": model.feature_head.fc1.weight,
                "decoderfeature_pred.fc1.bias": model.feature_head.fc1.bias,
                "decoderfeature_pred.fc2.weight": model.feature_head.fc2.weight,
                "decoderfeature_pred.fc2.bias": model.feature_head.fc2.bias,
            }
        )
        for index, layer in enumerate(decoder.layers):
            targets.update(_g2sd_block_map(f"decoder_blocks.{index}", layer))
    else:
        targets.update({"head.weight": model.classifier.weight, "head.bias": model.classifier.bias})
        if model.config.use_distillation_token:
            targets.update(
                {
                    "dist_token": encoder.embeddings.distillation_token,
                    "head_dist.weight": model.distillation_classifier.weight,
                    "head_dist.bias": model.distillation_classifier.bias,
                }
            )
    return targets


def _mae_values(model: ViTMAEForPreTraining, state_dict: dict) -> tuple[dict, set]:
    """{parameter: tensor} for a ViTMAEForPreTraining, and the official keys it reads (fused qkv split here)."""
    vit, decoder = model.vit, model.decoder
    simple = {
        "cls_token": vit.embeddings.cls_token,
        "pos_embed": vit.embeddings.position_embeddings,
        "patch_embed.proj.weight": vit.embeddings.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": vit.embeddings.patch_embeddings.projection.bias,
        "norm.weight": vit.layernorm.weight,
        "norm.bias": vit.layernorm.bias,
        "decoder_embed.weight": decoder.decoder_embed.weight,
        "decoder_embed.bias": decoder.decoder_embed.bias,
        "mask_token": decoder.mask_token,
        "decoder_pos_embed": decoder.decoder_pos_embed,
        "decoder_norm.weight": decoder.decoder_norm.weight,
        "decoder_norm.bias": decoder.decoder_norm.bias,
        "decoder_pred.weight": decoder.decoder_pred.weight,
        "decoder_pred.bias": decoder.decoder_pred.bias,
    }
    values = {parameter: state_dict[key] for key, parameter in simple.items() if key in state_dict}
    used = set(simple)
    encoder_layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    for prefix, layers in (("blocks", encoder_layers), ("decoder_blocks", decoder.decoder_layers)):
        for index, layer in enumerate(layers):
            keys = {f"{prefix}.{index}.{part}.{kind}" for part in _BLOCK_PARTS for kind in ("weight", "bias")}
            used |= keys
            if not keys <= state_dict.keys():
                continue

            def pair(part, block=f"{prefix}.{index}"):
                return state_dict[f"{block}.{part}.weight"], state_dict[f"{block}.{part}.bias"]

            sources = fused_layer_tensors(
                *pair("attn.qkv"), *pair("attn.proj"), pair("mlp.fc1"), pair("mlp.fc2"), pair("norm1"), pair("norm2")
            )
            targets = stock_vit_layer_parameters(layer)
            values.update({targets[name]: sources[name] for name in targets})
    return values, used


def _refuse_mismatch(path, kind, expected: set, present: set, ignored: set, mismatched: list) -> None:
    missing, unexpected = sorted(expected - present), sorted(present - expected - ignored)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)}: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        if mismatched:
            parts.append(f"shape mismatches {len(mismatched)}: {'; '.join(mismatched[:10])}")
        hint = (
            " An MAE teacher needs its decoder: use the *_full.pth pre-training checkpoints, not the encoder-only ones."
            if kind == "mae-teacher" and any(key.startswith("decoder") for key in missing)
            else " Check --kind, and --preset (or overrides) against the checkpoint's architecture."
        )
        raise ValueError(f"{path} does not match kind {kind!r}: {'; '.join(parts)}.{hint} Nothing was written.")


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------
def convert_state_dict(state_dict: dict, kind: str, preset: str | None = None, path: str = "checkpoint", **overrides):
    """Build the transformers model of `kind` from an official state dict (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if kind == "mae-teacher":
        model = ViTMAEForPreTraining(_mae_config(state_dict, preset, overrides))
        values, expected = _mae_values(model, state_dict)
        ignored, mismatched = set(), []  # shapes are checked by load_state_dict below
    else:
        config = _student_config(state_dict, kind, preset, overrides)
        model = (G2SDForGenericDistillation if kind == "generic-student" else G2SDForImageClassification)(config)
        targets = _g2sd_targets(model, kind)
        expected = set(targets)
        ignored = (
            {key for key in state_dict if _UNUSED_STUDENT_KEYS.match(key)} if kind == "generic-student" else set()
        )
        mismatched = [
            f"{key} {tuple(state_dict[key].shape)} vs {tuple(parameter.shape)}"
            for key, parameter in targets.items()
            if key in state_dict and state_dict[key].shape != parameter.shape
        ]
        values = {parameter: state_dict[key] for key, parameter in targets.items() if key in state_dict}
    _refuse_mismatch(path, kind, expected, set(state_dict), ignored, mismatched)
    try:
        load_by_parameter(model, values)
    except RuntimeError as error:  # a shape the checks above could not see (e.g. a block of the wrong width)
        raise ValueError(f"{path} does not match kind {kind!r}: {error}. Nothing was written.") from error
    if ignored:
        logger.info(f"Left out the release's unused heads: {sorted({key.split('.')[0] for key in ignored})}.")
    if kind != "mae-teacher":
        model._freeze_fixed_parameters()
    return model.eval()


def convert_official_checkpoint(
    path: str, kind: str, output_dir: str, preset: str | None = None, overwrite: bool = False, **overrides
):
    """Convert a released `.pth` checkpoint into a transformers folder (model, image processor, model card).

    Args:
        path (`str`): The `.pth` file.
        kind (`str`): `"generic-student"`, `"classifier"` or `"mae-teacher"`.
        output_dir (`str`): The folder to write; written only when the whole conversion succeeded. A folder holding
            files this package did not write is refused (nothing is ever removed from it) unless `overwrite`.
        preset (`str`, *optional*): A G2SD preset (students) or an MAE preset (`mae_vit_base_patch16`, ...); without
            it, widths and depths are read from the tensors and the attention heads must be given as overrides
            (`num_attention_heads`, and `decoder_num_attention_heads` for a generic student).
        overwrite (`bool`): Write into a folder that holds other files, replacing those of the same names.
        overrides: Configuration values to set, e.g. `num_labels=1000` or `image_size=384`.

    Returns:
        The converted model.

    Example:

    ```python
    >>> convert_official_checkpoint("mae_pretrain_vit_base_full.pth", "mae-teacher", "mae-vit-base", "mae_vit_base_patch16")
    >>> teacher = MAETeacher.from_pretrained("mae-vit-base")
    ```
    """
    check_output_folder(output_dir, overwrite)
    model = convert_state_dict(load_official_state_dict(path), kind, preset, path=str(path), **overrides)
    size = model.config.image_size
    processor = image_processor(size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    with staged_folder(output_dir, overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if kind != "mae-teacher":
            stage = "generic-distillation" if kind == "generic-student" else "specific-distillation"
            card = build_model_card(
                model, stage, dataset="imagenet-1k", model_name=Path(output_dir).name, tags=["converted"]
            )
            card.save(staging / "README.md")
    logger.info(f"Converted {path} ({kind}) to {output_dir}.")
    return model


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="The released .pth file")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--preset", help=f"G2SD presets {sorted(G2SD_PRESETS)} or MAE presets {sorted(MAE_PRESETS)}")
    parser.add_argument("--output", required=True, help="Folder to write")
    parser.add_argument(
        "--config_overrides", help="Configuration overrides, e.g. 'num_attention_heads=6,image_size=384'"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Write into a folder that holds other files (same-named files are replaced, others kept)",
    )
    options = parser.parse_args(args)
    overrides = parse_overrides(
        options.config_overrides, ViTMAEConfig if options.kind == "mae-teacher" else G2SDConfig
    )
    convert_official_checkpoint(
        options.checkpoint, options.kind, options.output, options.preset, overwrite=options.overwrite, **overrides
    )
    print(f"Converted {options.checkpoint} ({options.kind}) -> {options.output}")


if __name__ == "__main__":
    main()


__all__ = ["MAE_PRESETS", "convert_official_checkpoint", "convert_state_dict", "load_official_state_dict"]
