"""PyTorch G2SD students: the ViT encoder, the generic-distillation model and the image classifier.

Layout follows facebookresearch/mae `models_mae.py` (encoder on visible patches, light decoder on all tokens) and the
G2SD release (a feature head predicting the teacher's decoder features; a DeiT-style distillation token for the
classifier). The transformer layers are our own rather than transformers' `ViTLayer`, whose submodule names change
between transformers 5.x releases: a G2SD checkpoint must load the same way under every release. They still go
through transformers' attention interface, so `sdpa` (default), `eager`, flash and flex attention all work.

This file imports only torch, transformers and the package's other shippable files (`configuration_g2sd.py`,
`losses.py`), so that `save_pretrained` can ship it for `trust_remote_code` loading.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_g2sd import G2SDBackboneConfig, G2SDConfig, to_pair


try:  # transformers >= 5.x moved the backbone utilities to the top level
    from transformers.backbone_utils import BackboneMixin
except ImportError:
    from transformers.utils.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from .losses import generic_distillation_loss, smooth_targets, soft_target_cross_entropy


logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class G2SDModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, num_prefix_tokens + num_tokens, hidden)`):
            The encoder's output sequence (after the final LayerNorm unless mean pooling is used). With masking,
            only the visible patches are in it.
        pooler_output (`torch.FloatTensor` of shape `(batch, hidden)`):
            The normalized cls token, or the normalized mean of the patch tokens with `use_mean_pooling`.
        mask (`torch.FloatTensor` of shape `(batch, num_patches)`): 1 for masked patches, 0 for visible ones.
        ids_restore (`torch.LongTensor` of shape `(batch, num_patches)`): Indices that undo the masking shuffle.
        hidden_states (`tuple(torch.FloatTensor)`): The embeddings and each layer's output.
        attentions (`tuple(torch.FloatTensor)`): Each layer's attention probabilities (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class G2SDGenericDistillationOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): L_GD, when `teacher_targets` were given.
        predicted_features (`torch.FloatTensor` of shape `(batch, 1 + num_patches, target_hidden_size)`):
            The student's prediction of the teacher's normalized decoder features, for the cls token and every
            patch in image order.
        mask (`torch.FloatTensor` of shape `(batch, num_patches)`): 1 for masked patches, 0 for visible ones.
        ids_restore (`torch.LongTensor` of shape `(batch, num_patches)`): Indices that undo the masking shuffle.
        hidden_states (`tuple(torch.FloatTensor)`): The encoder's embeddings and layer outputs.
        attentions (`tuple(torch.FloatTensor)`): The encoder's attention probabilities (eager attention only).
        masked_token_loss (`torch.FloatTensor` of shape `()`): L_GD over the masked patches only (detached, logged).
        visible_token_loss (`torch.FloatTensor` of shape `()`): L_GD over the visible patches only (detached, logged).
    """

    loss: torch.FloatTensor | None = None
    predicted_features: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    masked_token_loss: torch.FloatTensor | None = None
    visible_token_loss: torch.FloatTensor | None = None


@dataclass
class G2SDImageClassifierOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): Cross-entropy of `logits`, when `labels` were given.
        logits (`torch.FloatTensor` of shape `(batch, num_labels)`):
            The prediction: with a distillation token, the average of the two heads' logits.
        cls_logits (`torch.FloatTensor` of shape `(batch, num_labels)`): The classification head's logits.
        distillation_logits (`torch.FloatTensor` of shape `(batch, num_labels)`):
            The distillation head's logits (models with a distillation token).
        hidden_states (`tuple(torch.FloatTensor)`): The encoder's embeddings and layer outputs.
        attentions (`tuple(torch.FloatTensor)`): The encoder's attention probabilities (eager attention only).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cls_logits: torch.FloatTensor | None = None
    distillation_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# --------------------------------------------------------------------------------------------------------------------
# Position embeddings and masking
# --------------------------------------------------------------------------------------------------------------------
def get_2d_sincos_position_embeddings(
    embed_dim: int, grid_size: tuple[int, int], add_cls_token: bool = True
) -> torch.Tensor:
    """The fixed 2-D sin-cos position embeddings of MAE, in its exact layout.

    The first half of the channels encodes the column of a patch and the second half its row (MAE's
    `get_2d_sincos_pos_embed`, whose released weights depend on this order); each half is `[sin | cos]` of the
    coordinate times `1 / 10000^(k / (embed_dim / 4))`. Patches are in row-major order.

    Args:
        embed_dim (`int`): Channels, divisible by 4.
        grid_size (`tuple[int, int]`): `(rows, columns)` of the patch grid.
        add_cls_token (`bool`): Prepend a zero row for the cls token.

    Returns:
        `torch.Tensor` of shape `(1 + rows * columns, embed_dim)` (without the cls row if `add_cls_token=False`),
        in float32.
    """
    rows, columns = grid_size
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    row_ids, column_ids = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(columns, dtype=torch.float64), indexing="ij"
    )

    def encode(coordinates):  # (rows * columns,) -> (rows * columns, embed_dim / 2)
        angles = coordinates.flatten()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    embeddings = torch.cat([encode(column_ids), encode(row_ids)], dim=1)
    if add_cls_token:
        embeddings = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), embeddings], dim=0)
    return embeddings.float()


def interpolate_position_embeddings(
    position_embeddings: torch.Tensor, grid_size: tuple[int, int], new_grid_size: tuple[int, int]
) -> torch.Tensor:
    """Resize `(1, 1 + rows * columns, dim)` position embeddings to another patch grid (bicubic, cls row kept)."""
    if tuple(grid_size) == tuple(new_grid_size):
        return position_embeddings
    cls_position, patch_positions = position_embeddings[:, :1], position_embeddings[:, 1:]
    dim = position_embeddings.shape[-1]
    patch_positions = patch_positions.reshape(1, *grid_size, dim).permute(0, 3, 1, 2)
    patch_positions = F.interpolate(
        patch_positions.float(), size=tuple(new_grid_size), mode="bicubic", align_corners=False
    )
    patch_positions = patch_positions.to(position_embeddings.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_position, patch_positions], dim=1)


def random_masking(
    sequence: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking: keep the patches with the smallest noise.

    Teacher and student mask identically when given the same `noise` and `mask_ratio`.

    Args:
        sequence (`torch.Tensor` of shape `(batch, num_patches, dim)`): Patch embeddings.
        mask_ratio (`float`): Fraction of patches to drop, in [0, 1).
        noise (`torch.Tensor` of shape `(batch, num_patches)`, *optional*): Uniform noise; drawn if not given.

    Returns:
        `(visible, mask, ids_restore)`: the kept patches `(batch, num_visible, dim)`; the mask `(batch, num_patches)`
        with 1 for dropped patches; the permutation that restores image order `(batch, num_patches)`.
    """
    batch_size, num_patches, dim = sequence.shape
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=sequence.device)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(
            f"noise must have shape (batch, num_patches) = {(batch_size, num_patches)}, got {tuple(noise.shape)}."
        )
    num_visible = int(num_patches * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise.to(sequence.device), dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_visible]
    visible = torch.gather(sequence, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # (batch, num_visible, dim)
    mask = torch.ones(batch_size, num_patches, device=sequence.device)
    mask[:, :num_visible] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


def restore_with_mask_tokens(
    tokens: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """Append mask tokens for the dropped patches and put every patch back in image order (MAE's decoder input).

    Args:
        tokens (`torch.Tensor` of shape `(batch, 1 + num_visible, dim)`): The cls token then the visible patches.
        mask_token (`torch.Tensor` of shape `(1, 1, dim)`): The learned mask token.
        ids_restore (`torch.LongTensor` of shape `(batch, num_patches)`): From `random_masking`.

    Returns:
        `torch.Tensor` of shape `(batch, 1 + num_patches, dim)`.
    """
    batch_size, num_tokens, dim = tokens.shape
    num_masked = ids_restore.shape[1] + 1 - num_tokens
    dtype = torch.promote_types(tokens.dtype, mask_token.dtype)
    tokens = tokens.to(dtype)
    patches = torch.cat([tokens[:, 1:], mask_token.to(dtype).expand(batch_size, num_masked, -1)], dim=1)
    patches = torch.gather(patches, 1, ids_restore.to(tokens.device).unsqueeze(-1).expand(-1, -1, dim))
    return torch.cat([tokens[:, :1], patches], dim=1)  # (batch, 1 + num_patches, dim)


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------
class G2SDPatchEmbeddings(nn.Module):
    """`(batch, channels, height, width)` pixels to `(batch, num_patches, hidden)` patch embeddings."""

    def __init__(self, config: G2SDConfig):
        super().__init__()
        patch_size = to_pair(config.patch_size)
        self.patch_size = patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected {self.num_channels} image channels, got {pixel_values.shape[1]}: convert the images "
                "(e.g. `image.convert('RGB')`) or set num_channels in the config."
            )
        return self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)


class G2SDEmbeddings(nn.Module):
    """Patch embeddings + position embeddings, optional masking, then the cls (and distillation) token."""

    def __init__(self, config: G2SDConfig, freeze_position_embeddings: bool):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        )
        self.patch_embeddings = G2SDPatchEmbeddings(config)
        self.freeze_position_embeddings = freeze_position_embeddings
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, config.num_patches + 1, config.hidden_size), requires_grad=not freeze_position_embeddings
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.distillation_token is None else 2

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        batch_size, _, height, width = pixel_values.shape
        patch_height, patch_width = self.patch_embeddings.patch_size
        grid_size = (height // patch_height, width // patch_width)
        if grid_size != self.config.grid_size and not interpolate_pos_encoding:
            raise ValueError(
                f"Input image size ({height}x{width}) does not match the model's image_size {self.config.image_size}: "
                "resize the images, or pass interpolate_pos_encoding=True."
            )
        embeddings = self.patch_embeddings(pixel_values)  # (batch, num_patches, hidden)

        position_embeddings = interpolate_position_embeddings(
            self.position_embeddings, self.config.grid_size, grid_size
        )
        # The float32 position embeddings promote the residual stream to float32 under autocast, as in MAE and timm.
        embeddings = embeddings + position_embeddings[:, 1:]

        mask = ids_restore = None
        if mask_ratio is not None:
            embeddings, mask, ids_restore = random_masking(embeddings, mask_ratio, noise)

        prefix = [(self.cls_token + position_embeddings[:, :1]).to(embeddings.dtype).expand(batch_size, -1, -1)]
        if self.distillation_token is not None:
            # No position embedding for the distillation token, as in the authors' classifier.
            prefix.append(self.distillation_token.to(embeddings.dtype).expand(batch_size, -1, -1))
        embeddings = torch.cat([*prefix, embeddings], dim=1)  # (batch, num_prefix_tokens + num_tokens, hidden)
        return self.dropout(embeddings), mask, ids_restore


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attention_scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (batch, heads, tokens, tokens)
    if attention_mask is not None:
        attention_scores = attention_scores + attention_mask
    attention_probs = F.softmax(attention_scores, dim=-1, dtype=torch.float32).to(query.dtype)
    attention_probs = F.dropout(attention_probs, p=dropout, training=module.training)
    attention_output = (
        torch.matmul(attention_probs, value).transpose(1, 2).contiguous()
    )  # (batch, tokens, heads, head_dim)
    return attention_output, attention_probs


class G2SDAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection (timm's and the authors' layout)."""

    def __init__(self, config: G2SDConfig, hidden_size: int, num_attention_heads: int):
        super().__init__()
        self.config = config
        self.num_attention_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        self.projection = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, num_tokens, 3, self.num_attention_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attention_output, attention_probs = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
        )
        attention_output = attention_output.reshape(batch_size, num_tokens, -1)
        return self.projection(attention_output), attention_probs


class G2SDMLP(nn.Module):
    def __init__(self, config: G2SDConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.activation(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability `drop_prob`."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = torch.empty(shape, dtype=hidden_states.dtype, device=hidden_states.device).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


class G2SDLayer(GradientCheckpointingLayer):
    """A pre-norm transformer block: `x + attention(norm1(x))`, then `x + mlp(norm2(x))`, with stochastic depth."""

    def __init__(
        self,
        config: G2SDConfig,
        hidden_size: int,
        num_attention_heads: int,
        intermediate_size: int,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = G2SDAttention(config, hidden_size, num_attention_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = G2SDMLP(config, hidden_size, intermediate_size)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        window: tuple[int, tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`window=(size, (rows, columns))`: attention within `size x size` windows of the patch grid (ViTDet); the
        norms, the MLP and stochastic depth still act on whole images."""
        normed = self.norm1(hidden_states)
        if window is None:
            attention_output, attention_probs = self.attention(normed, attention_mask)
        else:
            size, grid = window
            batch_size, _, dim = normed.shape
            windows, padded = window_partition(normed.view(batch_size, *grid, dim), size)
            attention_output, attention_probs = self.attention(windows, attention_mask)
            attention_output = window_unpartition(attention_output, size, padded, grid).view(batch_size, -1, dim)
        hidden_states = hidden_states + drop_path(attention_output, self.drop_path_rate, self.training)
        hidden_states = hidden_states + drop_path(
            self.mlp(self.norm2(hidden_states)), self.drop_path_rate, self.training
        )
        return hidden_states, attention_probs


def _run_layers(layers, hidden_states, output_hidden_states: bool, output_attentions: bool):
    all_hidden_states = (hidden_states,) if output_hidden_states else None
    all_attentions = () if output_attentions else None
    for layer in layers:
        hidden_states, attention_probs = layer(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if output_attentions:
            all_attentions += (attention_probs,)
    return hidden_states, all_hidden_states, all_attentions


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------
class G2SDPreTrainedModel(PreTrainedModel):
    """Weight initialization, loading and the attention-interface flags shared by every G2SD model."""

    config: G2SDConfig
    config_class = G2SDConfig
    base_model_prefix = "g2sd"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["G2SDEmbeddings", "G2SDLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    # Optimizer groups, declared by the model as timm's VisionTransformer does (`no_weight_decay()`,
    # `group_matcher()`); `optimization.parameter_groups` reads them.
    def no_weight_decay(self) -> set[str]:
        """Parameters that fine-tuning exempts from weight decay besides biases and norms (MAE's and DeiT's
        `no_weight_decay()`): the position embeddings and the cls and distillation tokens."""
        exempt = ("position_embeddings", "cls_token", "distillation_token")
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in exempt}

    def group_matcher(self) -> dict[str, str]:
        """Name patterns of MAE's layer-wise learning-rate decay: `stem` (the embeddings: layer 0, except a
        distillation token, which learns at the full rate as in the release) and `blocks` (encoder block `i`: layer
        `i + 1`); every other parameter (final norm, heads, decoder, pyramid) is the top layer."""
        prefix = "" if getattr(self, self.base_model_prefix, None) is None else re.escape(f"{self.base_model_prefix}.")
        return {"stem": rf"^{prefix}embeddings\.(?!distillation_token$)", "blocks": rf"^{prefix}layers\.(\d+)\."}

    def _init_weights(self, module):
        """MAE's initialization; also (re)computes the fixed sin-cos tables, which are not learned weights."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # The feature pyramid's convolutions (detectron2's c2_msra_fill); the patch projection is set below.
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, G2SDPatchEmbeddings):
            # Initialize the projection like an nn.Linear over the flattened patch (MAE).
            weight = module.projection.weight
            if not getattr(weight, "_is_hf_initialized", False):
                init.xavier_uniform_(weight.view(weight.shape[0], -1))
            init.zeros_(module.projection.bias)
        elif isinstance(module, G2SDEmbeddings):
            init.normal_(module.cls_token, std=self.config.initializer_range)
            if module.distillation_token is not None:
                init.trunc_normal_(module.distillation_token, std=self.config.initializer_range)
            init.copy_(module.position_embeddings, self._sincos(self.config.hidden_size))
        elif isinstance(module, G2SDDecoder):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            init.copy_(module.position_embeddings, self._sincos(self.config.decoder_hidden_size))

    def _sincos(self, dim: int) -> torch.Tensor:
        return get_2d_sincos_position_embeddings(dim, self.config.grid_size).unsqueeze(0)

    def _freeze_fixed_parameters(self):
        # Transformers' loading recreates parameters with requires_grad=True; restore the fixed ones.
        for module in self.modules():
            if isinstance(module, G2SDEmbeddings) and module.freeze_position_embeddings:
                module.position_embeddings.requires_grad_(False)
            elif isinstance(module, G2SDDecoder):
                module.position_embeddings.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._freeze_fixed_parameters()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; when the code ships with the weights (`import g2sd_hf` registers it),
        `config.json` maps every Auto class to it, so that any G2SD checkpoint loads with `trust_remote_code=True`
        as a base model, a classifier or a generic-distillation student."""
        if self.is_remote_code():
            config_class = f"configuration_g2sd.{type(self.config).__name__}"
            auto_map = {**G2SD_AUTO_MAP, "AutoConfig": config_class}
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        return super().save_pretrained(save_directory, *args, **kwargs)


# The Auto classes of a G2SD checkpoint whose code ships with it (`trust_remote_code=True`).
G2SD_AUTO_MAP = {
    "AutoConfig": "configuration_g2sd.G2SDConfig",
    "AutoModel": "modeling_g2sd.G2SDModel",
    "AutoModelForImageClassification": "modeling_g2sd.G2SDForImageClassification",
    "AutoModelForPreTraining": "modeling_g2sd.G2SDForGenericDistillation",
    "AutoBackbone": "modeling_g2sd.G2SDBackbone",
}


class G2SDModel(G2SDPreTrainedModel):
    r"""
    The G2SD ViT encoder. With `mask_ratio` it runs on the visible patches only, as in MAE.

    Example:

    ```python
    >>> import torch
    >>> from g2sd_hf import G2SDConfig, G2SDModel

    >>> model = G2SDModel(G2SDConfig.from_preset("vit_tiny_patch16"))
    >>> outputs = model(torch.randn(1, 3, 224, 224))
    >>> outputs.last_hidden_state.shape
    torch.Size([1, 197, 192])
    ```
    """

    def __init__(self, config: G2SDConfig, freeze_position_embeddings: bool | None = None):
        super().__init__(config)
        if freeze_position_embeddings is None:
            freeze_position_embeddings = bool(config.freeze_position_embeddings)
        self.embeddings = G2SDEmbeddings(config, freeze_position_embeddings)
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.layers = nn.ModuleList(
            G2SDLayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size, rate)
            for rate in rates
        )
        if config.use_mean_pooling:
            self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> G2SDPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> G2SDModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): Normalized images.
            mask_ratio (`float`, *optional*): Fraction of patches dropped before the encoder (MAE masking); `None`
                keeps every patch in image order.
            noise (`torch.FloatTensor` of shape `(batch, num_patches)`, *optional*): The masking noise.
            interpolate_pos_encoding (`bool`): Resize the position embeddings to the input resolution.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        embeddings, mask, ids_restore = self.embeddings(pixel_values, mask_ratio, noise, interpolate_pos_encoding)
        sequence, hidden_states, attentions = _run_layers(
            self.layers, embeddings, output_hidden_states, output_attentions
        )

        if self.config.use_mean_pooling:
            pooled = self.fc_norm(sequence[:, self.embeddings.num_prefix_tokens :].mean(dim=1))
        else:
            sequence = self.layernorm(sequence)
            pooled = sequence[:, 0]
        output = G2SDModelOutput(
            last_hidden_state=sequence,
            pooler_output=pooled,
            mask=mask,
            ids_restore=ids_restore,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return output if return_dict is not False else output.to_tuple()


class G2SDDecoder(nn.Module):
    """MAE-style decoder: embed the visible tokens, add mask tokens, unshuffle, add position embeddings, run blocks."""

    def __init__(self, config: G2SDConfig):
        super().__init__()
        self.config = config
        self.decoder_embed = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, config.num_patches + 1, config.decoder_hidden_size), requires_grad=False
        )
        self.layers = nn.ModuleList(
            G2SDLayer(
                config,
                config.decoder_hidden_size,
                config.decoder_num_attention_heads,
                config.decoder_intermediate_size,
            )
            for _ in range(config.decoder_num_hidden_layers)
        )

    def forward(
        self, encoder_output: torch.Tensor, ids_restore: torch.Tensor, grid_size: tuple[int, int]
    ) -> torch.Tensor:
        hidden_states = self.decoder_embed(encoder_output)  # (batch, 1 + num_visible, decoder_hidden)
        hidden_states = restore_with_mask_tokens(hidden_states, self.mask_token, ids_restore)
        position_embeddings = interpolate_position_embeddings(
            self.position_embeddings, self.config.grid_size, grid_size
        )
        hidden_states = hidden_states + position_embeddings  # (batch, 1 + num_patches, decoder_hidden)
        hidden_states, _, _ = _run_layers(self.layers, hidden_states, False, False)
        return hidden_states


class G2SDFeatureHead(nn.Module):
    """Two-layer MLP from the student decoder width to the teacher's decoder width (the authors' `decoderfeature_pred`)."""

    def __init__(self, config: G2SDConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.decoder_hidden_size, config.target_hidden_size)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(config.target_hidden_size, config.target_hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class G2SDForGenericDistillation(G2SDPreTrainedModel):
    r"""
    The student of G2SD's generic distillation: the encoder sees the visible patches of a masked image; a light decoder
    and a feature head predict the teacher's normalized MAE-decoder features for every token (cls, visible, masked).

    Example:

    ```python
    >>> import torch
    >>> from g2sd_hf import G2SDConfig, G2SDForGenericDistillation

    >>> model = G2SDForGenericDistillation(G2SDConfig.from_preset("vit_tiny_patch16"))
    >>> pixel_values = torch.randn(2, 3, 224, 224)
    >>> targets = torch.randn(2, 197, 512)  # normally `MAETeacher(pixel_values, noise)`
    >>> outputs = model(pixel_values, noise=torch.rand(2, 196), teacher_targets=targets)
    >>> outputs.predicted_features.shape, outputs.loss.shape
    (torch.Size([2, 197, 512]), torch.Size([]))
    ```
    """

    def __init__(self, config: G2SDConfig):
        if config.use_distillation_token or config.use_mean_pooling:
            raise ValueError(
                "Generic distillation uses the plain MAE encoder: set use_distillation_token=False and "
                "use_mean_pooling=False (G2SDForImageClassification adds them when fine-tuning)."
            )
        super().__init__(config)
        freeze = True if config.freeze_position_embeddings is None else config.freeze_position_embeddings
        self.g2sd = G2SDModel(config, freeze_position_embeddings=freeze)
        self.decoder = G2SDDecoder(config)
        self.feature_head = G2SDFeatureHead(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        teacher_targets: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> G2SDGenericDistillationOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): Normalized images.
            noise (`torch.FloatTensor` of shape `(batch, num_patches)`, *optional*):
                The masking noise; pass the teacher's so both see the same mask.
            teacher_targets (`torch.FloatTensor` of shape `(batch, 1 + num_patches, target_hidden_size)`, *optional*):
                The teacher's normalized decoder features (`MAETeacher`); the loss is returned when given.
        """
        encoder_outputs = self.g2sd(
            pixel_values,
            mask_ratio=self.config.mask_ratio,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        grid_size = tuple(
            size // patch
            for size, patch in zip(pixel_values.shape[-2:], self.g2sd.embeddings.patch_embeddings.patch_size)
        )
        decoded = self.decoder(encoder_outputs.last_hidden_state, encoder_outputs.ids_restore, grid_size)
        predicted_features = self.feature_head(decoded)  # (batch, 1 + num_patches, target_hidden)

        losses = {}
        if teacher_targets is not None:
            losses = generic_distillation_loss(
                predicted_features,
                teacher_targets,
                encoder_outputs.mask,
                tokens=self.config.feature_loss_tokens,
                beta=self.config.feature_loss_beta,
                return_terms=True,
            )
        output = G2SDGenericDistillationOutput(
            predicted_features=predicted_features,
            mask=encoder_outputs.mask,
            ids_restore=encoder_outputs.ids_restore,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            **losses,
        )
        return output if return_dict is not False else output.to_tuple()


# Standard deviation of the classification head's initial weights in the release's (MAE's) fine-tuning.
CLASSIFIER_INIT_STD = 2e-5


class G2SDForImageClassification(G2SDPreTrainedModel):
    r"""
    A G2SD student classifier: the encoder plus a classification head on the cls token (or the mean of the patch
    tokens), and optionally a DeiT-style distillation token and head. With a distillation token, `logits` is the
    average of the two heads, and `cls_logits` / `distillation_logits` are the heads' own logits, which specific
    distillation trains with the task loss and the distillation loss respectively.

    Initialize it from a generic-distillation checkpoint with `from_pretrained`: the decoder and feature head are
    dropped and the heads are initialized.

    Example:

    ```python
    >>> import torch
    >>> from g2sd_hf import G2SDConfig, G2SDForImageClassification

    >>> config = G2SDConfig.from_preset("vit_tiny_patch16", num_labels=1000, use_distillation_token=True)
    >>> model = G2SDForImageClassification(config)
    >>> round(model.num_parameters() / 1e6, 2)
    5.91
    >>> outputs = model(torch.randn(2, 3, 224, 224))
    >>> torch.allclose(outputs.logits, (outputs.cls_logits + outputs.distillation_logits) / 2)
    True
    ```
    """

    def __init__(self, config: G2SDConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.g2sd = G2SDModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.distillation_classifier = None
        if config.use_distillation_token:
            self.distillation_classifier = (
                nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
            )
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        # The release's fine-tuning: the classification head from a truncated normal of std 2e-5 (MAE's
        # `trunc_normal_(head.weight, std=2e-5)`), the distillation head of std 0.02 (timm's init of `head_dist`).
        if isinstance(module, nn.Linear) and module is self.classifier:
            init.trunc_normal_(module.weight, std=CLASSIFIER_INIT_STD)
        elif isinstance(module, nn.Linear) and module is self.distillation_classifier:
            init.trunc_normal_(module.weight, std=self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if "G2SDForGenericDistillation" in (model.config.architectures or []):
            logger.warning(
                "Initialized G2SDForImageClassification from a generic-distillation checkpoint: its encoder is kept, "
                "its decoder and feature head are dropped, and the classification head(s) are newly initialized. "
                "Fine-tune the model (specific distillation) before using it."
            )
        return loaded

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> G2SDImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): Normalized images.
            labels (`torch.LongTensor` of shape `(batch,)` or `torch.FloatTensor` of shape `(batch, num_labels)`, *optional*):
                Class indices, or class probabilities (mixup/cutmix); the cross-entropy of `logits` is returned.
            mask_ratio (`float`, *optional*): Drop this fraction of the patches from the token sequence before the
                encoder (MAE-style; the occlusion analysis's protocol): the model sees only the others.
            noise (`torch.FloatTensor` of shape `(batch, num_patches)`, *optional*): With `mask_ratio`, which
                patches go: those with the highest noise (random when not given).
        """
        outputs = self.g2sd(
            pixel_values,
            mask_ratio=mask_ratio,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        cls_logits = self.classifier(outputs.pooler_output)
        distillation_logits = None
        logits = cls_logits
        if self.distillation_classifier is not None:
            distillation_logits = self.distillation_classifier(outputs.last_hidden_state[:, 1])
            logits = (cls_logits + distillation_logits) / 2

        loss = None
        if labels is not None:
            loss = soft_target_cross_entropy(logits, smooth_targets(labels, self.config.num_labels))
        output = G2SDImageClassifierOutput(
            loss=loss,
            logits=logits,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()


# --------------------------------------------------------------------------------------------------------------------
# Backbone for dense tasks
# --------------------------------------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `(batch, channels, height, width)` map (ViTDet's)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def window_partition(hidden_states: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """`(batch, height, width, dim)` -> `(batch * windows, window_size**2, dim)`, zero-padding to whole windows."""
    batch_size, height, width, dim = hidden_states.shape
    pad_height, pad_width = (-height) % window_size, (-width) % window_size
    hidden_states = F.pad(hidden_states, (0, 0, 0, pad_width, 0, pad_height))
    padded_height, padded_width = height + pad_height, width + pad_width
    windows = hidden_states.view(
        batch_size, padded_height // window_size, window_size, padded_width // window_size, window_size, dim
    )
    windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, dim)
    return windows, (padded_height, padded_width)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_size: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Undo `window_partition`: back to `(batch, height, width, dim)` without the padding."""
    padded_height, padded_width = padded_size
    dim = windows.shape[-1]
    batch_size = windows.shape[0] // ((padded_height // window_size) * (padded_width // window_size))
    hidden_states = windows.view(
        batch_size, padded_height // window_size, padded_width // window_size, window_size, window_size, dim
    )
    hidden_states = hidden_states.permute(0, 1, 3, 2, 4, 5).reshape(batch_size, padded_height, padded_width, dim)
    return hidden_states[:, : size[0], : size[1]].contiguous()


class G2SDSimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: strides 4, 8, 16 and 32 from one stride-16 map, each then 1x1 + 3x3 convs."""

    def __init__(self, config: G2SDBackboneConfig):
        super().__init__()
        width, out = config.hidden_size, config.fpn_hidden_size
        self.scale_layers = nn.ModuleList(
            [
                nn.Sequential(  # stride 4
                    nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2),
                    LayerNorm2d(width // 2, eps=1e-6),
                    nn.GELU(),
                    nn.ConvTranspose2d(width // 2, width // 4, kernel_size=2, stride=2),
                ),
                nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2),  # stride 8
                nn.Identity(),  # stride 16
                nn.MaxPool2d(kernel_size=2, stride=2),  # stride 32
            ]
        )
        self.output_layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, out, kernel_size=1, bias=False),
                LayerNorm2d(out, eps=1e-6),
                nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out, eps=1e-6),
            )
            for channels in (width // 4, width // 2, width, width)
        )

    def forward(self, feature_map: torch.Tensor) -> list[torch.Tensor]:
        return [output(scale(feature_map)) for scale, output in zip(self.scale_layers, self.output_layers)]


class G2SDBackbone(BackboneMixin, G2SDPreTrainedModel):
    r"""
    The G2SD encoder as a backbone for transformers' detection and segmentation heads (`UperNetForSemanticSegmentation`,
    Deformable DETR, RT-DETR, `Mask2FormerForUniversalSegmentation`, ...): ViTDet's recipe — the plain ViT on
    the patch grid of any input size (position embeddings interpolated), optionally with windowed attention and a few
    global blocks, then a simple feature pyramid at strides 4, 8, 16 and 32.

    Its weights load from a generic- or specific-distillation checkpoint (`from_pretrained`): the encoder is kept,
    the decoder, feature head, heads and distillation token are not used.

    Example:

    ```python
    >>> backbone = G2SDBackbone.from_pretrained("g2sd-vit-small-gd", fpn_hidden_size=256, window_size=14)
    >>> outputs = backbone(torch.randn(1, 3, 512, 512))
    >>> [tuple(feature_map.shape) for feature_map in outputs.feature_maps]
    [(1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 32, 32), (1, 256, 16, 16)]
    ```
    """

    config_class = G2SDBackboneConfig

    def __init__(self, config: G2SDBackboneConfig):
        super().__init__(config)
        self.g2sd = G2SDModel(config)
        self.pyramid = G2SDSimpleFeaturePyramid(config)
        self.num_features = [config.hidden_size] + [config.fpn_hidden_size] * 4
        self.post_init()

    def get_input_embeddings(self) -> G2SDPatchEmbeddings:
        return self.g2sd.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): Normalized images of any
                size; they are zero-padded at the bottom and right to a multiple of the patch size.
        """
        patch_height, patch_width = self.g2sd.embeddings.patch_embeddings.patch_size
        pad_height, pad_width = (-pixel_values.shape[-2]) % patch_height, (-pixel_values.shape[-1]) % patch_width
        pixel_values = F.pad(pixel_values, (0, pad_width, 0, pad_height))
        grid = (pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width)

        embeddings, _, _ = self.g2sd.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden_states = embeddings[:, 1:]  # (batch, height * width, hidden): the patch tokens, as in ViTDet
        batch_size, _, dim = hidden_states.shape
        stem = hidden_states.transpose(1, 2).reshape(batch_size, dim, *grid)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        window_size = self.config.window_size
        for index, layer in enumerate(self.g2sd.layers):
            windowed = window_size and index not in self.config.global_attention_layers
            hidden_states, attention = layer(hidden_states, None, (window_size, grid) if windowed else None)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attention,)
        hidden_states = self.g2sd.layernorm(hidden_states)
        feature_map = hidden_states.transpose(1, 2).reshape(batch_size, dim, *grid)  # (batch, hidden, height, width)

        maps = dict(zip(self.stage_names, [stem, *self.pyramid(feature_map)]))
        feature_maps = tuple(maps[stage] for stage in self.out_features)
        output = BackboneOutput(feature_maps=feature_maps, hidden_states=all_hidden_states, attentions=all_attentions)
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "G2SDBackbone",
    "G2SDForGenericDistillation",
    "G2SDForImageClassification",
    "G2SDModel",
    "G2SDPreTrainedModel",
    "get_2d_sincos_position_embeddings",
    "random_masking",
    "restore_with_mask_tokens",
]
