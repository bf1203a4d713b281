"""Frozen teachers: the MAE teacher of generic distillation and the classifier teacher of specific distillation.

A teacher is loaded, validated (a teacher with untrained parts is refused), frozen (`requires_grad_(False)`,
`eval()`), and run under `torch.inference_mode()`. It owns the pixel normalization it was trained with and converts
the student's pixels to it, so a teacher is never fed silently wrong pixels.
"""

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEForPreTraining,
    ViTMAEModel,
)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
)  # every MAE checkpoint's normalization
from transformers.utils import logging

from .checkpoints import readable_weights
from .configuration_g2sd import VIT_ENCODER_FIELDS, to_pair
from .dense_models import _FeatureCapture, _HeadCapture, find_backbone
from .losses import normalize_teacher_features
from .modeling_g2sd import CLASSIFIER_INIT_STD, get_2d_sincos_position_embeddings, restore_with_mask_tokens


logger = logging.get_logger(__name__)


def _as_tuple(values: Sequence[float] | float, num_channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values) if isinstance(values, (list, tuple)) else (float(values),) * num_channels
    if len(values) != num_channels:
        raise ValueError(f"Expected {num_channels} per-channel values, got {values}.")
    return values


class _FrozenTeacher(nn.Module):
    """A frozen model plus the pixel normalization it expects, converting inputs normalized another way."""

    def __init__(self, model: PreTrainedModel, image_mean, image_std):
        super().__init__()
        self.model = model
        config = model.config
        # A detection / segmentation head keeps the channels in its backbone's config.
        num_channels = getattr(config, "num_channels", None) or getattr(
            getattr(config, "backbone_config", None), "num_channels", 3
        )
        self.image_mean = _as_tuple(image_mean, num_channels)
        self.image_std = _as_tuple(image_std, num_channels)
        self.input_mean, self.input_std = self.image_mean, self.image_std
        self.freeze()

    def freeze(self) -> "_FrozenTeacher":
        """Stop gradients and put the teacher in eval mode (call again after `from_pretrained` or `.train()`)."""
        self.model.requires_grad_(False)
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        # A teacher stays in eval mode (no dropout, no drop path), whatever its owner does.
        return super().train(False)

    @property
    def config(self):
        return self.model.config

    @property
    def image_size(self) -> tuple[int, int]:
        return to_pair(self.model.config.image_size)

    def accept_inputs_normalized_with(self, image_mean, image_std) -> None:
        """Declare how the pixels given to this teacher are normalized; they are converted to the teacher's own."""
        num_channels = len(self.image_mean)
        self.input_mean = _as_tuple(image_mean, num_channels)
        self.input_std = _as_tuple(image_std, num_channels)
        if self.needs_conversion:
            logger.info(
                f"Teacher inputs normalized with mean={self.input_mean}, std={self.input_std} are converted to the "
                f"teacher's mean={self.image_mean}, std={self.image_std}."
            )

    @property
    def needs_conversion(self) -> bool:
        return (self.input_mean, self.input_std) != (self.image_mean, self.image_std)

    def prepare_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Convert `pixel_values` from the input normalization to the teacher's, and to the teacher's dtype."""
        if pixel_values.shape[1] != len(self.image_mean):
            raise ValueError(
                f"The teacher expects {len(self.image_mean)} channels, got {pixel_values.shape[1]}: student and "
                "teacher must read the same images."
            )
        dtype = next(self.model.parameters()).dtype
        if not self.needs_conversion:
            return pixel_values.to(dtype)
        shape = (1, -1, 1, 1)
        device = pixel_values.device
        input_mean, input_std, mean, std = (
            torch.tensor(values, device=device).view(shape)
            for values in (self.input_mean, self.input_std, self.image_mean, self.image_std)
        )
        raw = pixel_values.float() * input_std + input_mean  # back to [0, 1] pixels
        return ((raw - mean) / std).to(dtype)

    @staticmethod
    def _load_normalization(name_or_path, image_mean, image_std, kwargs):
        if image_mean is not None and image_std is not None:
            return image_mean, image_std
        try:
            processor = AutoImageProcessor.from_pretrained(
                name_or_path,
                **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")},
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not read the image processor of {name_or_path} ({error}). Pass image_mean= and image_std= "
                "with the normalization the teacher was trained with."
            ) from error
        return image_mean or processor.image_mean, image_std or processor.image_std


@torch.no_grad()
def initialize_mae_from_scratch(model: ViTMAEForPreTraining) -> ViTMAEForPreTraining:
    """Give a newly built `ViTMAEForPreTraining` MAE's own initialization before pre-training it (`models_mae.py`).

    transformers 5.x leaves the encoder's and decoder's sin-cos position embeddings (and the mask token) at zero when
    the model is built from a config rather than loaded, which would pre-train an MAE blind to patch positions, and
    draws every linear layer from N(0, 0.02). This writes MAE's 2-D sin-cos tables (the layout of the released
    weights), draws the mask token from N(0, 0.02), and initializes every linear layer as MAE does: Xavier-uniform
    weights, zero biases, the patch projection Xavier-uniform over the flattened patch, the cls token from N(0, 0.02)
    (transformers leaves it at zero). On small data the
    N(0, 0.02) layers stalled pre-training: a 20-epoch MAE plateaued at a normalized-pixel loss near 0.55 and its
    fine-tuned classifier ended at half the accuracy of a scratch model (docs/recipes.md).

    Example:

    ```python
    >>> mae = initialize_mae_from_scratch(ViTMAEForPreTraining(ViTMAEConfig(image_size=64, patch_size=8)))
    ```
    """
    config = model.config
    (height, width), (patch_height, patch_width) = to_pair(config.image_size), to_pair(config.patch_size)
    grid = (height // patch_height, width // patch_width)
    model.vit.embeddings.position_embeddings.copy_(get_2d_sincos_position_embeddings(config.hidden_size, grid)[None])
    model.decoder.decoder_pos_embed.copy_(get_2d_sincos_position_embeddings(config.decoder_hidden_size, grid)[None])
    model.decoder.mask_token.normal_(std=config.initializer_range)
    model.vit.embeddings.cls_token.normal_(std=config.initializer_range)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = model.vit.embeddings.patch_embeddings.projection
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
    return model


def classifier_from_mae(
    mae: ViTMAEForPreTraining | ViTMAEModel, num_labels: int, id2label: dict[int, str] | None = None
) -> ViTForImageClassification:
    """A `ViTForImageClassification` whose encoder is the MAE's, to fine-tune into a specific-distillation teacher.

    The classification head is newly initialized as in MAE's fine-tuning (truncated normal, std 2e-5); the MAE's
    decoder (if any) is left out.

    Example:

    ```python
    >>> mae = ViTMAEForPreTraining.from_pretrained("facebook/vit-mae-base")
    >>> classifier = classifier_from_mae(mae, num_labels=1000)
    ```
    """
    encoder = mae.vit if isinstance(mae, ViTMAEForPreTraining) else mae
    config = ViTConfig(**{name: getattr(mae.config, name) for name in VIT_ENCODER_FIELDS}, num_labels=num_labels)
    if id2label is not None:
        config.id2label = dict(id2label)
        config.label2id = {label: index for index, label in config.id2label.items()}
    classifier = ViTForImageClassification(config)
    # MAE's fine-tuning initializes the new head from a truncated normal of std 2e-5 (`main_finetune.py`).
    with torch.no_grad():
        nn.init.trunc_normal_(classifier.classifier.weight, std=CLASSIFIER_INIT_STD)
        nn.init.zeros_(classifier.classifier.bias)
    missing, unexpected = classifier.vit.load_state_dict(encoder.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"The MAE encoder does not match ViTModel in this transformers version (missing {missing}, unexpected "
            f"{unexpected})."
        )
    return classifier


@contextmanager
def _masking_with(config, mask_ratio: float | None):
    """ViT-MAE reads its mask ratio from its config: set it for one call only, so the teacher's config keeps its own."""
    if mask_ratio is None or mask_ratio == config.mask_ratio:
        yield
        return
    saved, config.mask_ratio = config.mask_ratio, mask_ratio
    try:
        yield
    finally:
        config.mask_ratio = saved


class MAETeacher(_FrozenTeacher):
    r"""
    The generic-distillation teacher: an MAE ViT with its pre-training decoder (`ViTMAEForPreTraining`).

    Called with `pixel_values` and the masking `noise`, it runs its encoder on the visible patches (the same mask as
    the student's for the same noise), then decoder blocks 1..`target_layer` only, and returns the hidden states after
    block `target_layer` for every token, normalized by a LayerNorm without affine parameters: G2SD's targets.

    Args:
        model (`ViTMAEForPreTraining`): The teacher, with trained decoder weights.
        target_layer (`int`, *optional*, defaults to 4): Decoder block whose output is the target (1-based).
        image_mean (`Sequence[float]`, *optional*): The teacher's pixel mean; ImageNet's, which every MAE checkpoint
            uses, by default.
        image_std (`Sequence[float]`, *optional*): The teacher's pixel standard deviation (ImageNet's by default).
        target_eps (`float`, *optional*, defaults to 1e-6): Epsilon of the target LayerNorm.

    Example:

    ```python
    >>> teacher = MAETeacher.from_pretrained("facebook/vit-mae-base", target_layer=4)
    >>> noise = torch.rand(2, 196)
    >>> targets = teacher(pixel_values, noise)  # (2, 197, 512)
    ```
    """

    def __init__(
        self,
        model: ViTMAEForPreTraining,
        target_layer: int = 4,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        target_eps: float = 1e-6,
    ):
        if not isinstance(model, ViTMAEForPreTraining):
            raise TypeError(
                f"The generic-distillation teacher must be a ViTMAEForPreTraining with its pre-training decoder, got "
                f"{type(model).__name__}. An encoder-only MAE (ViTMAEModel) has no decoder features to distill: load "
                "the full pre-training checkpoint, e.g. ViTMAEForPreTraining.from_pretrained('facebook/vit-mae-base')."
            )
        depth = model.config.decoder_num_hidden_layers
        if not 1 <= target_layer <= depth:
            raise ValueError(
                f"target_layer must be between 1 and the teacher's decoder depth ({depth}), got {target_layer}. "
                "G2SD uses 4."
            )
        super().__init__(model, image_mean, image_std)
        self.target_layer = target_layer
        self.target_eps = target_eps
        if not getattr(model.config, "norm_pix_loss", False):
            logger.warning(
                f"The MAE teacher {model.config.name_or_path or ''} was pre-trained without the normalized-pixel loss "
                "(norm_pix_loss: false), like facebook/vit-mae-base, MAE's visualization checkpoint. The release "
                "distills the MAE ViT-B trained with norm_pix_loss (mae_pretrain_vit_base_full.pth, converted with "
                "`python -m g2sd_hf.convert --kind mae-teacher`): its decoder features are the paper's targets."
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        target_layer: int = 4,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ) -> "MAETeacher":
        """Load a `ViTMAEForPreTraining` checkpoint (Hub id or folder), refusing one without trained decoder weights.

        The normalization comes from the checkpoint's image processor unless `image_mean`/`image_std` are given.
        Other keyword arguments (`dtype`, `revision`, ...) go to `ViTMAEForPreTraining.from_pretrained`.
        """
        with readable_weights(name_or_path):
            model, loading_info = ViTMAEForPreTraining.from_pretrained(
                name_or_path, output_loading_info=True, **kwargs
            )
        missing = sorted(loading_info.get("missing_keys", []))
        if missing:
            decoder_missing = [key for key in missing if key.startswith("decoder.")]
            what = "its MAE pre-training decoder" if decoder_missing else "part of its weights"
            raise ValueError(
                f"{name_or_path} lacks {what}: {len(missing)} weights would be random "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). G2SD distills the decoder features "
                "of a fully pre-trained MAE: use a checkpoint saved from ViTMAEForPreTraining with its decoder "
                "(e.g. facebook/vit-mae-base, or the authors' mae_pretrain_vit_base_full.pth converted with "
                "`python -m g2sd_hf.convert --kind mae-teacher`), not an encoder-only one."
            )
        image_mean, image_std = cls._load_normalization(name_or_path, image_mean, image_std, kwargs)
        return cls(model, target_layer=target_layer, image_mean=image_mean, image_std=image_std)

    @property
    def target_hidden_size(self) -> int:
        return self.model.config.decoder_hidden_size

    def forward(
        self, pixel_values: torch.Tensor, noise: torch.Tensor, mask_ratio: float | None = None
    ) -> torch.Tensor:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`):
                Images, normalized as declared with `accept_inputs_normalized_with` (the teacher's own by default).
            noise (`torch.FloatTensor` of shape `(batch, num_patches)`): The masking noise shared with the student.
            mask_ratio (`float`, *optional*): The student's mask ratio (`G2SDConfig.mask_ratio`, the one home of the
                setting), so that both drop the same patches; the MAE config's own `mask_ratio` when not given.

        Returns:
            `torch.FloatTensor` of shape `(batch, 1 + num_patches, decoder_hidden_size)`: the targets, in float32.
        """
        with torch.inference_mode(), _masking_with(self.model.config, mask_ratio):
            encoder_outputs = self.model.vit(self.prepare_pixels(pixel_values), noise=noise)
            decoder = self.model.decoder
            hidden_states = decoder.decoder_embed(encoder_outputs.last_hidden_state)
            hidden_states = restore_with_mask_tokens(hidden_states, decoder.mask_token, encoder_outputs.ids_restore)
            hidden_states = hidden_states + decoder.decoder_pos_embed.to(hidden_states.dtype)
            for layer in decoder.decoder_layers[: self.target_layer]:
                hidden_states = layer(hidden_states)
                hidden_states = hidden_states[0] if isinstance(hidden_states, tuple) else hidden_states
            targets = normalize_teacher_features(hidden_states, eps=self.target_eps)
        # Inference tensors cannot be saved for backward: clone into a normal tensor for the student's loss.
        return targets.clone()


class ClassificationTeacher(_FrozenTeacher):
    r"""
    The specific-distillation teacher: any transformers image classifier (e.g. an MAE ViT-B fine-tuned on the task).

    Args:
        model (`PreTrainedModel`): An image-classification model returning `logits`.
        image_mean (`Sequence[float]`, *optional*): Its pixel mean (ImageNet's by default).
        image_std (`Sequence[float]`, *optional*): Its pixel standard deviation (ImageNet's by default).

    Example:

    ```python
    >>> teacher = ClassificationTeacher.from_pretrained("path/to/fine-tuned-mae-vit-base")
    >>> teacher_logits = teacher(pixel_values)
    ```
    """

    def __init__(
        self,
        model: PreTrainedModel,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        super().__init__(model, image_mean, image_std)
        self.label_order: list[int] | None = None  # the teacher's class of each student class (`align_labels`)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ) -> "ClassificationTeacher":
        """Load with `AutoModelForImageClassification`, refusing a checkpoint whose classifier was not trained."""
        with readable_weights(name_or_path):
            model, loading_info = AutoModelForImageClassification.from_pretrained(
                name_or_path, output_loading_info=True, **kwargs
            )
        missing = sorted(loading_info.get("missing_keys", []))
        if missing:
            raise ValueError(
                f"{name_or_path} is not a trained image classifier: {len(missing)} weights would be random "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). The specific-distillation teacher "
                "must be fine-tuned on the task first."
            )
        image_mean, image_std = cls._load_normalization(name_or_path, image_mean, image_std, kwargs)
        return cls(model, image_mean=image_mean, image_std=image_std)

    @property
    def num_labels(self) -> int:
        return self.model.config.num_labels

    def align_labels(self, id2label: dict[int, str]) -> None:
        """Put the teacher's logits in the order of `id2label` (the student's classes), matching classes by name.

        The same class names in another order are reordered; other names are refused, since every distillation
        target would point at the wrong class. A side whose names are transformers' placeholders (`LABEL_0`, ...)
        has no names to match: its classes are taken in index order, with a warning.
        """
        teacher = {int(index): str(name) for index, name in self.model.config.id2label.items()}
        student = {int(index): str(name) for index, name in id2label.items()}
        self.label_order = None
        if len(teacher) != len(student):
            raise ValueError(
                f"The student predicts {len(student)} classes, the teacher {len(teacher)}: fine-tune the teacher on "
                "the same label set, or build the student with the teacher's num_labels / id2label."
            )
        if any(_placeholder_labels(names) for names in (teacher, student)):
            logger.warning(
                "The teacher's or the student's classes have no names (LABEL_0, ...): they are matched by index."
            )
            return
        if sorted(teacher.values()) != sorted(student.values()):
            only_teacher = sorted(set(teacher.values()) - set(student.values()))
            only_student = sorted(set(student.values()) - set(teacher.values()))
            raise ValueError(
                f"The teacher's classes are not the student's: only the teacher has {only_teacher[:5]}, only the "
                f"student (the data) has {only_student[:5]}. Distill from a teacher fine-tuned on the same classes."
            )
        index_of = {name: index for index, name in teacher.items()}
        order = [index_of[student[index]] for index in range(len(student))]
        if order != list(range(len(order))):
            logger.warning(f"The teacher lists the same classes in another order: its logits are reordered {order}.")
            self.label_order = order

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return the teacher's logits `(batch, num_labels)` for `pixel_values` (normalized as declared), in the
        order of the classes given to `align_labels` (the teacher's own order before)."""
        with torch.inference_mode():
            logits = self.model(pixel_values=self.prepare_pixels(pixel_values)).logits
            if self.label_order is not None:
                logits = logits[:, self.label_order]
        return logits.clone()


def _placeholder_labels(id2label: dict[int, str]) -> bool:
    return all(name == f"LABEL_{index}" for index, name in id2label.items())


class DenseTeacher(_FrozenTeacher):
    r"""
    A frozen detection or segmentation model (the same head as the student's, on a larger backbone). Called with
    `pixel_values` (and `pixel_mask`), it returns its outputs, its backbone's feature maps and, for a model with a
    `decode_head` (UperNet), that head's logits before upsampling (else `None`).

    Example:

    ```python
    >>> teacher = DenseTeacher(UperNetForSemanticSegmentation.from_pretrained("upernet-g2sd-base"))
    >>> outputs, feature_maps, head_logits = teacher(pixel_values)
    ```
    """

    def __init__(self, model: PreTrainedModel, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD):
        super().__init__(model, image_mean, image_std)
        self.backbone = find_backbone(model)
        self._capture = _FeatureCapture(self.backbone)
        self._head = _HeadCapture(model)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
        inputs = {"pixel_values": self.prepare_pixels(pixel_values)}
        if pixel_mask is not None:
            inputs["pixel_mask"] = pixel_mask
        with torch.inference_mode():
            outputs = self.model(**inputs)
            maps = self._capture.pop()
            head_logits = self._head.pop() if self._head.available else None
        # Inference tensors cannot be saved for backward: clone into normal tensors.
        outputs = type(outputs)(
            **{key: value.clone() if torch.is_tensor(value) else value for key, value in outputs.items()}
        )
        return (
            outputs,
            [feature_map.clone() for feature_map in maps],
            None if head_logits is None else head_logits.clone(),
        )


__all__ = [
    "DenseTeacher",
    "ClassificationTeacher",
    "classifier_from_mae",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "MAETeacher",
    "initialize_mae_from_scratch",
]
