"""G2SD student configuration and the table of named student architectures.

This file imports only `transformers` so that `save_pretrained` can ship it beside the weights for
`trust_remote_code` loading.
"""

from transformers import PretrainedConfig


try:  # transformers >= 5.x moved the backbone utilities to the top level
    from transformers.backbone_utils import BackboneConfigMixin
except ImportError:
    from transformers.utils.backbone_utils import BackboneConfigMixin


# The student architectures of the G2SD release (`models_mae.py` of the authors' code), named timm-style:
# encoder width / depth / heads, then the light MAE-style decoder used during generic distillation.
# Every preset uses MLP ratio 4, qkv bias, LayerNorm eps 1e-6 and fixed 2-D sin-cos position embeddings.
def _preset(
    hidden_size,
    num_attention_heads,
    decoder_hidden_size,
    decoder_num_hidden_layers,
    decoder_num_attention_heads,
    num_hidden_layers=12,
    patch_size=16,
):
    return {
        "patch_size": patch_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": 4 * hidden_size,
        "decoder_hidden_size": decoder_hidden_size,
        "decoder_num_hidden_layers": decoder_num_hidden_layers,
        "decoder_num_attention_heads": decoder_num_attention_heads,
        "decoder_intermediate_size": 4 * decoder_hidden_size,
    }


G2SD_PRESETS = {
    "vit_tiny_patch16_dec128d4b": _preset(192, 3, 128, 4, 4),
    "vit_tiny_patch16_dec64d4b": _preset(192, 3, 64, 4, 4),
    "vit_small_patch16_dec256d4b": _preset(384, 6, 256, 4, 8),
    "vit_small_patch16_dec128d4b": _preset(384, 6, 128, 4, 4),
    "vit_small_patch16_dec128d2b": _preset(384, 6, 128, 2, 4),
    "vit_small_patch16_dec256d2b": _preset(384, 6, 256, 2, 8),
    "vit_small_patch16_dec512d4b": _preset(384, 6, 512, 4, 16),
    "vit_base_patch16_dec512d8b": _preset(768, 12, 512, 8, 16),
    "vit_base_patch16_dec256d4b": _preset(768, 12, 256, 4, 8),
}

# The recommended architectures (the paper's students, and ViT-Base with MAE's own decoder).
G2SD_PRESET_ALIASES = {
    "vit_tiny_patch16": "vit_tiny_patch16_dec128d4b",
    "vit_small_patch16": "vit_small_patch16_dec256d4b",
    "vit_base_patch16": "vit_base_patch16_dec512d8b",
    "g2sd-tiny": "vit_tiny_patch16_dec128d4b",
    "g2sd-small": "vit_small_patch16_dec256d4b",
    "g2sd-base": "vit_base_patch16_dec512d8b",
}

FEATURE_LOSS_TOKENS = ("all", "masked", "visible")


def resolve_preset_name(name: str) -> str:
    """Return the canonical preset name for `name` (a preset or one of its aliases)."""
    canonical = G2SD_PRESET_ALIASES.get(name, name)
    if canonical not in G2SD_PRESETS:
        choices = ", ".join(sorted(G2SD_PRESETS) + sorted(G2SD_PRESET_ALIASES))
        raise ValueError(f"Unknown G2SD preset {name!r}. Choose one of: {choices}.")
    return canonical


class G2SDConfig(PretrainedConfig):
    r"""
    Configuration of a G2SD student: a ViT encoder, plus the light MAE-style decoder and feature head used during
    generic distillation, plus the (optional) DeiT-style distillation token used during specific distillation.

    Args:
        image_size (`int`, *optional*, defaults to 224): Input resolution.
        patch_size (`int`, *optional*, defaults to 16): Patch size.
        num_channels (`int`, *optional*, defaults to 3): Number of input channels.
        hidden_size (`int`, *optional*, defaults to 384): Encoder width.
        num_hidden_layers (`int`, *optional*, defaults to 12): Encoder depth.
        num_attention_heads (`int`, *optional*, defaults to 6): Encoder attention heads.
        intermediate_size (`int`, *optional*, defaults to 1536): Encoder MLP width.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout after attention, MLP and embeddings.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): Dropout on attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth of the encoder, increasing linearly from 0 to this value over the layers.
        initializer_range (`float`, *optional*, defaults to 0.02): Std of the normal initializers.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): LayerNorm epsilon.
        qkv_bias (`bool`, *optional*, defaults to `True`): Bias in the query/key/value projection.
        decoder_hidden_size (`int`, *optional*, defaults to 256): Width of the generic-distillation decoder.
        decoder_num_hidden_layers (`int`, *optional*, defaults to 4): Depth of the decoder.
        decoder_num_attention_heads (`int`, *optional*, defaults to 8): Attention heads of the decoder.
        decoder_intermediate_size (`int`, *optional*, defaults to 1024): MLP width of the decoder.
        target_hidden_size (`int`, *optional*, defaults to 512):
            Width of the teacher features the student predicts: the teacher's MAE decoder width (512 for the
            released MAE ViT-B/L/H). The feature head maps `decoder_hidden_size` to this width.
        mask_ratio (`float`, *optional*, defaults to 0.75): Fraction of patches masked during generic distillation.
        feature_loss_tokens (`str`, *optional*, defaults to `"all"`):
            Tokens the generic-distillation loss averages over: `"all"` (cls, visible and masked tokens, the
            official setting), `"masked"` or `"visible"` (patch tokens only).
        feature_loss_beta (`float`, *optional*, defaults to 2.0): The Smooth-L1 `beta` of the generic loss.
        use_distillation_token (`bool`, *optional*, defaults to `False`):
            Add a DeiT-style distillation token and head to the classifier (specific distillation). As in the
            authors' classifier, the token carries no position embedding.
        use_mean_pooling (`bool`, *optional*, defaults to `False`):
            Classify the mean of the patch tokens (followed by `fc_norm`) instead of the cls token.
        freeze_position_embeddings (`bool`, *optional*):
            Keep the sin-cos position embeddings fixed. `None` lets the model decide: fixed for generic
            distillation (as in MAE), learned for classification (as in MAE fine-tuning).

    Example:

    ```python
    >>> from g2sd_hf import G2SDConfig, G2SDForGenericDistillation

    >>> config = G2SDConfig.from_preset("vit_small_patch16_dec256d4b")
    >>> config.hidden_size, config.decoder_hidden_size
    (384, 256)
    >>> model = G2SDForGenericDistillation(config)
    ```
    """

    model_type = "g2sd"
    # Evaluation predictions are `logits` alone (the heads' own logits stay out of `compute_metrics`).
    keys_to_ignore_at_inference = ["cls_logits", "distillation_logits"]

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        initializer_range=0.02,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        decoder_hidden_size=256,
        decoder_num_hidden_layers=4,
        decoder_num_attention_heads=8,
        decoder_intermediate_size=1024,
        target_hidden_size=512,
        mask_ratio=0.75,
        feature_loss_tokens="all",
        feature_loss_beta=2.0,
        use_distillation_token=False,
        use_mean_pooling=False,
        freeze_position_embeddings=None,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.target_hidden_size = target_hidden_size
        self.mask_ratio = mask_ratio
        self.feature_loss_tokens = feature_loss_tokens
        self.feature_loss_beta = feature_loss_beta
        self.use_distillation_token = use_distillation_token
        self.use_mean_pooling = use_mean_pooling
        self.freeze_position_embeddings = freeze_position_embeddings
        super().__init__(**kwargs)
        self._check_arguments()

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid `(rows, columns)` at `image_size`."""
        height, width = to_pair(self.image_size)
        patch_height, patch_width = to_pair(self.patch_size)
        return height // patch_height, width // patch_width

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns

    @property
    def processor_size(self) -> int:
        """The side image processors resize and crop to: the height of `image_size` (a multiple of `patch_size`)."""
        return to_pair(self.image_size)[0]

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "G2SDConfig":
        """Build the configuration of a named architecture, e.g. `"vit_tiny_patch16_dec128d4b"` or `"g2sd-small"`.

        Keyword arguments override the preset (for example `image_size`, `num_labels` or `target_hidden_size`).
        """
        return cls(**{**G2SD_PRESETS[resolve_preset_name(name)], **kwargs})

    def _check_arguments(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio must be in [0, 1), got {self.mask_ratio}: it is the fraction of patches hidden from the "
                "student (G2SD uses 0.75)."
            )
        if self.feature_loss_tokens not in FEATURE_LOSS_TOKENS:
            raise ValueError(
                f"feature_loss_tokens must be one of {FEATURE_LOSS_TOKENS}, got {self.feature_loss_tokens!r}."
            )
        for size, patch in zip(to_pair(self.image_size), to_pair(self.patch_size)):
            if size % patch != 0:
                raise ValueError(
                    f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; choose an "
                    "image size that is a multiple of the patch size."
                )
        if self.mask_ratio == 0.0 and self.feature_loss_tokens == "masked":
            raise ValueError(
                "mask_ratio 0 masks no patch, so feature_loss_tokens='masked' would be a loss that is always 0: set "
                "mask_ratio > 0 (G2SD uses 0.75) or feature_loss_tokens='all' / 'visible'."
            )
        (height, width), (patch_height, patch_width) = to_pair(self.image_size), to_pair(self.patch_size)
        num_patches = (height // patch_height) * (width // patch_width)
        if int(num_patches * (1 - self.mask_ratio)) < 1:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} leaves no visible patch of the {num_patches}: the student would see "
                f"nothing. Use a mask_ratio below {1 - 1 / num_patches:.4f} (G2SD uses 0.75), or more patches."
            )
        for prefix in ("", "decoder_"):
            width = getattr(self, f"{prefix}hidden_size")
            heads = getattr(self, f"{prefix}num_attention_heads")
            if width % heads != 0:
                raise ValueError(
                    f"{prefix}hidden_size ({width}) must be divisible by {prefix}num_attention_heads ({heads})."
                )
            if width % 4 != 0:
                raise ValueError(
                    f"{prefix}hidden_size ({width}) must be divisible by 4 for 2-D sin-cos position embeddings."
                )
        if self.use_distillation_token and self.use_mean_pooling:
            raise ValueError(
                "use_distillation_token and use_mean_pooling cannot both be set: the distillation head reads the "
                "distillation token, which mean pooling would average away (the authors' code has no such model). "
                "Use cls-token pooling with a distillation token, or mean pooling without one."
            )


class G2SDBackboneConfig(BackboneConfigMixin, G2SDConfig):
    r"""
    Configuration of `G2SDBackbone`: the G2SD encoder as a backbone for detection and segmentation heads, with
    ViTDet's simple feature pyramid (strides 4, 8, 16 and 32 from the last stride-16 map) and optional windowed
    attention. All `G2SDConfig` arguments apply; the backbone ignores the decoder and the distillation token.

    Args:
        fpn_hidden_size (`int`, *optional*, defaults to 256): Channels of every pyramid level.
        window_size (`int`, *optional*, defaults to 0):
            Side, in patches, of the attention windows of the windowed blocks (ViTDet uses 14); 0 means global
            attention in every block.
        global_attention_layers (`list[int]`, *optional*):
            Blocks that keep global attention when `window_size > 0` (ViTDet: evenly spaced, e.g. `[2, 5, 8, 11]`).
            Defaults to the last block of each quarter of the encoder.
        out_features (`list[str]`, *optional*): Among `"stem"` (the stride-16 patch embeddings) and `"stage1"`..
            `"stage4"` (strides 4, 8, 16, 32). Defaults to the four pyramid levels.
        out_indices (`list[int]`, *optional*): The same, by index.

    Example:

    ```python
    >>> from transformers import UperNetConfig, UperNetForSemanticSegmentation
    >>> backbone_config = G2SDBackboneConfig.from_preset("g2sd-small", window_size=14)
    >>> model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, num_labels=150))
    ```
    """

    model_type = "g2sd_backbone"

    def __init__(
        self,
        fpn_hidden_size=256,
        window_size=0,
        global_attention_layers=None,
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        self.fpn_hidden_size = fpn_hidden_size
        self.window_size = window_size
        kwargs["use_distillation_token"] = False
        kwargs["use_mean_pooling"] = False
        super().__init__(**kwargs)
        if global_attention_layers is None:
            quarter = max(1, self.num_hidden_layers // 4)
            global_attention_layers = sorted(
                {min(self.num_hidden_layers, quarter * (index + 1)) - 1 for index in range(4)}
            )
        self.global_attention_layers = list(global_attention_layers)
        if any(not 0 <= index < self.num_hidden_layers for index in self.global_attention_layers):
            raise ValueError(
                f"global_attention_layers {self.global_attention_layers} must be block indices in "
                f"[0, {self.num_hidden_layers})."
            )
        if self.window_size < 0:
            raise ValueError(f"window_size must be >= 0 (0 = global attention everywhere), got {self.window_size}.")
        self.stage_names = ["stem", "stage1", "stage2", "stage3", "stage4"]
        if out_features is None and out_indices is None:
            out_features = self.stage_names[1:]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)


# The settings a stock transformers `ViTConfig` shares, under the same names, with `G2SDConfig` and `ViTMAEConfig`: what
# a ViT built from either encoder copies (the exporter's stock classifier, the MAE teacher's fine-tuning classifier).
VIT_ENCODER_FIELDS = (
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
    "initializer_range",
)


def to_pair(value) -> tuple:
    """`224` -> `(224, 224)`; a pair stays a pair (image and patch sizes may be either)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


__all__ = ["G2SDBackboneConfig", "G2SDConfig", "G2SD_PRESETS", "G2SD_PRESET_ALIASES", "resolve_preset_name", "to_pair"]
