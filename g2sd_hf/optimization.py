"""Parameter groups of the G2SD recipes: timm's weight-decay rule and MAE's layer-wise learning-rate decay.

G2SD models declare their groups themselves, as timm's VisionTransformer does (`no_weight_decay()` and
`group_matcher()` on `G2SDPreTrainedModel`), also when they sit inside a detection or segmentation head. Models that
declare nothing (transformers' ViT, a fine-tuned MAE teacher) are grouped by the same rule read from their names.

- Weight decay (timm `add_weight_decay`): none on biases and 1-D weights (norms); with the fine-tuning exemptions,
  none on what the model's `no_weight_decay()` names either (else on names containing one of `no_decay_names`).
- Layer-wise lr decay (MAE `param_groups_lrd`): the patch and position embeddings and the cls token are layer 0,
  encoder block `i` is layer `i + 1`, everything else (final norm, heads, decoder, and the distillation token, as in
  the G2SD release) is layer `num_layers + 1`; the learning rate of layer `l` is scaled by
  `layer_decay ** (num_layers + 1 - l)`.
"""

import re

from torch import nn

from .modeling_g2sd import G2SDPreTrainedModel


# Within the encoder (the model's `base_model_prefix` module): G2SD's `layers.N`, ViT/ViTMAE's `layers.N` or
# `encoder.layer.N`.
_LAYER_PATTERN = re.compile(r"^(?:encoder\.)?layers?\.(\d+)\.")
_WRAPPER_PREFIXES = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")

# Parameters that MAE fine-tuning exempts from weight decay (`no_weight_decay()` of timm's VisionTransformer).
FINE_TUNING_NO_DECAY_NAMES = ("position_embeddings", "cls_token", "distillation_token")


def layer_id(parameter_name: str, num_layers: int, encoder_prefix: str = "g2sd.") -> int:
    """MAE's layer id: 0 for the encoder's embeddings, `i + 1` for encoder block `i`, `num_layers + 1` otherwise.

    Args:
        parameter_name (`str`): e.g. `"g2sd.layers.3.mlp.fc1.weight"`.
        num_layers (`int`): Encoder depth.
        encoder_prefix (`str`): Where the encoder lives (`"g2sd."`, `"vit."`, or `""` for a bare encoder).
    """
    if not parameter_name.startswith(encoder_prefix):
        return num_layers + 1
    name = parameter_name[len(encoder_prefix) :]
    if name.startswith("embeddings."):
        # A new distillation token learns at the full rate (the release's `get_layer_id_for_vit`).
        return num_layers + 1 if name.endswith("distillation_token") else 0
    match = _LAYER_PATTERN.match(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def find_encoder(model: nn.Module) -> tuple[str, int]:
    """The name prefix and depth of the ViT encoder inside `model`: the first module with `embeddings` and `layers`
    (or `encoder.layer`) — `g2sd.` in a G2SD classifier, `vit.` in a ViT, `backbone.g2sd.` in UperNet with a
    `G2SDBackbone`, ... Returns `("", 0)` when there is none (then layer decay has nothing to decay)."""
    for name, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if layers is None and hasattr(getattr(module, "encoder", None), "layer"):
            layers = module.encoder.layer
        if hasattr(module, "embeddings") and isinstance(layers, nn.ModuleList):
            name = _WRAPPER_PREFIXES.sub("", name)
            return (f"{name}." if name else ""), len(layers)
    return "", 0


def declared_groups(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The G2SD model inside `model` that declares its optimizer groups (`no_weight_decay()` and `group_matcher()`:
    `model` itself, or the G2SD backbone inside a head) and its name prefix; `None` for other models."""
    # G2SD models only: timm models declare groups too, in timm's own format.
    for name, module in model.named_modules():
        if isinstance(module, G2SDPreTrainedModel):
            name = _WRAPPER_PREFIXES.sub("", name)
            return (f"{name}." if name else ""), module
    return None


def _declared_layer_id(name: str, matcher: dict[str, str], num_layers: int) -> int:
    if re.match(matcher["stem"], name):
        return 0
    block = re.match(matcher["blocks"], name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    layer_decay: float | None = None,
    no_decay_names: tuple[str, ...] = (),
) -> list[dict]:
    """Optimizer parameter groups with per-group `lr` and `weight_decay`.

    Args:
        model (`nn.Module`): A G2SD or ViT-family model, or a detection / segmentation model with such a backbone;
            its encoder is found with `find_encoder`.
        learning_rate (`float`): The peak learning rate of the last layer.
        weight_decay (`float`): Weight decay of the decayed parameters.
        layer_decay (`float`, *optional*): MAE's layer-wise decay factor (0.75 in G2SD's fine-tuning); `None` or 1
            gives every parameter the same learning rate.
        no_decay_names (`tuple[str, ...]`): The fine-tuning exemptions from weight decay besides biases and 1-D
            weights: when given, a model that declares `no_weight_decay()` exempts what it names, any other model the
            parameters whose names contain one of these fragments. Empty (generic distillation): none.

    Returns:
        `list[dict]`: groups with `params`, `lr`, `lr_scale` and `weight_decay`, the full-rate groups first (the
        Trainer logs the first group's learning rate).

    Example:

    ```python
    >>> groups = parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=0.75)
    >>> optimizer = torch.optim.AdamW(groups)
    ```
    """
    declared = declared_groups(model)
    if declared is not None:
        prefix, owner = declared
        num_layers = owner.config.num_hidden_layers
        matcher = owner.group_matcher()
        exempt = {prefix + name for name in owner.no_weight_decay()} if no_decay_names else set()

        def layer_of(name: str) -> int:
            return (
                _declared_layer_id(name[len(prefix) :], matcher, num_layers)
                if name.startswith(prefix)
                else num_layers + 1
            )

        def exempt_from_decay(name: str) -> bool:
            return name in exempt

    else:
        encoder_prefix, num_layers = find_encoder(model)

        def layer_of(name: str) -> int:
            return layer_id(name, num_layers, encoder_prefix)

        def exempt_from_decay(name: str) -> bool:
            return any(part in name for part in no_decay_names)

    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = _WRAPPER_PREFIXES.sub("", name)  # FSDP / activation-checkpointing wrappers
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or exempt_from_decay(name)
        layer = layer_of(name) if layer_decay not in (None, 1.0) else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay not in (None, 1.0) else 1.0
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "lr": learning_rate * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        group["params"].append(parameter)
    return sorted(groups.values(), key=lambda group: -group["lr_scale"])


__all__ = ["FINE_TUNING_NO_DECAY_NAMES", "declared_groups", "find_encoder", "layer_id", "parameter_groups"]
