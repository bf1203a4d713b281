"""A G2SD classifier as the stock transformers classifier that computes the same logits: `ViTForImageClassification`,
or `DeiTForImageClassificationWithTeacher` for a student with a distillation token (DeiT also averages its two heads).
The distillation token has no position embedding in G2SD; DeiT adds one, which is set to zero. The fused
query/key/value projection is split. `export` writes it as a folder, `onnx_export` as an ONNX model, and `convert`
reuses the layer mapping for the authors' checkpoints.
"""

import torch
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from .configuration_g2sd import VIT_ENCODER_FIELDS
from .modeling_g2sd import G2SDForImageClassification


def stock_vit_layer_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a transformers ViT-family layer (ViT, DeiT, ViTMAE) under layout-independent names.

    transformers 5.x releases name these submodules differently (`attention.q_proj` or `attention.attention.query`,
    `mlp.fc1` or `intermediate.dense`, ...); this finds them in either layout.

    Returns:
        `dict` with keys `{query,key,value,output,fc1,fc2,norm1,norm2}.{weight,bias}`.
    """
    attention = layer.attention
    if hasattr(attention, "q_proj"):
        projections = {
            "query": attention.q_proj,
            "key": attention.k_proj,
            "value": attention.v_proj,
            "output": attention.o_proj,
        }
    else:
        inner = attention.attention
        projections = {"query": inner.query, "key": inner.key, "value": inner.value, "output": attention.output.dense}
    if hasattr(layer, "mlp"):
        mlp = {"fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}
    else:
        mlp = {"fc1": layer.intermediate.dense, "fc2": layer.output.dense}
    modules = {**projections, **mlp, "norm1": layer.layernorm_before, "norm2": layer.layernorm_after}
    return {f"{name}.{kind}": getattr(module, kind) for name, module in modules.items() for kind in ("weight", "bias")}


def fused_layer_tensors(qkv_weight, qkv_bias, projection_weight, projection_bias, fc1, fc2, norm1, norm2) -> dict:
    """Map a timm-layout block (fused qkv) onto the names of `stock_vit_layer_parameters`."""
    query_weight, key_weight, value_weight = qkv_weight.chunk(3, dim=0)
    query_bias, key_bias, value_bias = qkv_bias.chunk(3, dim=0)
    return {
        "query.weight": query_weight,
        "query.bias": query_bias,
        "key.weight": key_weight,
        "key.bias": key_bias,
        "value.weight": value_weight,
        "value.bias": value_bias,
        "output.weight": projection_weight,
        "output.bias": projection_bias,
        "fc1.weight": fc1[0],
        "fc1.bias": fc1[1],
        "fc2.weight": fc2[0],
        "fc2.bias": fc2[1],
        "norm1.weight": norm1[0],
        "norm1.bias": norm1[1],
        "norm2.weight": norm2[0],
        "norm2.bias": norm2[1],
    }


def load_by_parameter(model: nn.Module, values: dict[nn.Parameter, torch.Tensor]) -> None:
    """`model.load_state_dict(strict=True)` from a {parameter object: value} mapping covering every parameter."""
    name_of = {id(parameter): name for name, parameter in model.named_parameters()}
    state = {name_of[id(parameter)]: value.detach().clone() for parameter, value in values.items()}
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise RuntimeError(f"The export does not cover {missing}.")
    model.load_state_dict(state, strict=True)


def _stock_config(model: G2SDForImageClassification):
    config = model.config
    shared = {name: getattr(config, name) for name in VIT_ENCODER_FIELDS}
    labels = {"id2label": dict(config.id2label), "label2id": dict(config.label2id)} if config.id2label else {}
    config_class = DeiTConfig if config.use_distillation_token else ViTConfig
    return config_class(**shared, num_labels=config.num_labels, **labels)


def to_stock_model(model: G2SDForImageClassification) -> PreTrainedModel:
    """The stock transformers classifier computing the same logits as `model`.

    Raises:
        ValueError: for a mean-pooling student (stock ViT/DeiT classify the cls token).
    """
    config = model.config
    if config.use_mean_pooling:
        raise ValueError(
            "A mean-pooling G2SD classifier (fc_norm over the patch tokens) has no stock transformers equivalent: "
            "ViTForImageClassification and DeiT classify the cls token. Load it with trust_remote_code instead."
        )
    distilled = config.use_distillation_token
    stock = (DeiTForImageClassificationWithTeacher if distilled else ViTForImageClassification)(_stock_config(model))
    encoder, ours = (stock.deit if distilled else stock.vit), model.g2sd
    embeddings = ours.embeddings
    values = {
        encoder.embeddings.cls_token: embeddings.cls_token,
        encoder.embeddings.patch_embeddings.projection.weight: embeddings.patch_embeddings.projection.weight,
        encoder.embeddings.patch_embeddings.projection.bias: embeddings.patch_embeddings.projection.bias,
        encoder.layernorm.weight: ours.layernorm.weight,
        encoder.layernorm.bias: ours.layernorm.bias,
    }
    position_embeddings = embeddings.position_embeddings
    if distilled:
        # DeiT: [cls, distillation, patches], every token with a position embedding; G2SD's distillation token has none.
        zero = torch.zeros_like(position_embeddings[:, :1])
        position_embeddings = torch.cat([position_embeddings[:, :1], zero, position_embeddings[:, 1:]], dim=1)
        values[encoder.embeddings.distillation_token] = embeddings.distillation_token
        values.update(
            {
                stock.cls_classifier.weight: model.classifier.weight,
                stock.cls_classifier.bias: model.classifier.bias,
                stock.distillation_classifier.weight: model.distillation_classifier.weight,
                stock.distillation_classifier.bias: model.distillation_classifier.bias,
            }
        )
    else:
        values.update({stock.classifier.weight: model.classifier.weight, stock.classifier.bias: model.classifier.bias})
    values[encoder.embeddings.position_embeddings] = position_embeddings
    stock_layers = encoder.layers if hasattr(encoder, "layers") else encoder.encoder.layer
    for stock_layer, layer in zip(stock_layers, ours.layers):
        targets = stock_vit_layer_parameters(stock_layer)
        sources = fused_layer_tensors(
            layer.attention.qkv.weight,
            layer.attention.qkv.bias,
            layer.attention.projection.weight,
            layer.attention.projection.bias,
            (layer.mlp.fc1.weight, layer.mlp.fc1.bias),
            (layer.mlp.fc2.weight, layer.mlp.fc2.bias),
            (layer.norm1.weight, layer.norm1.bias),
            (layer.norm2.weight, layer.norm2.bias),
        )
        values.update({targets[name]: sources[name] for name in targets})
    load_by_parameter(stock, values)
    return stock.eval()


@torch.no_grad()
def check_same_logits(reference: nn.Module, exported: nn.Module, image_size: int, tolerance: float = 1e-5) -> float:
    """The largest logit difference on random images; raises when it exceeds `tolerance`."""
    pixel_values = torch.randn(
        2, reference.config.num_channels, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )
    difference = (reference.eval()(pixel_values).logits - exported.eval()(pixel_values).logits).abs().max().item()
    if difference > tolerance:
        raise RuntimeError(
            f"The exported model's logits differ from the G2SD model's by {difference:.2e} (> {tolerance})."
        )
    return difference


__all__ = [
    "check_same_logits",
    "fused_layer_tensors",
    "load_by_parameter",
    "stock_vit_layer_parameters",
    "to_stock_model",
]
