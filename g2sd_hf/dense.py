"""Specific distillation for dense tasks: transformers' detection and segmentation heads on a G2SD backbone.

The teacher is the same head on a larger backbone, fine-tuned on the task. On top of the task loss the student gets
the authors' recipes by default (`DENSE_DISTILLATION_DEFAULTS`):

- **detection** (the release's `tools/plain_distill_net.py` with its ViTDet distillation configs): the student's
  pyramid features pass through an adapter (one 3x3 convolution per level); on every level, the squared error to the
  teacher's features and the binary cross-entropy between the student's and the teacher's scores are weighted per
  location by the teacher's highest score there, summed over channels (classes) and locations and divided by the sum
  of the weights, then summed over levels; weights 0.001 (features) and 0.1 (scores), both warmed up linearly over
  500 steps.
- **segmentation** (the release's `distill_cwd.py`): channel-wise distillation of the decode head's logits (each
  class channel's spatial map softmax-normalized with temperature 1.0, KL teacher -> student), weight 10, no feature
  distillation and no warm-up. The per-pixel KL over classes (`segmentation_distillation="pixel-kl"`) stays as a
  variant.
- **Mask2Former** has no release recipe: its per-pixel class distributions (from its queries) are distilled with a KL,
  and the pyramid features with the per-location weighted mean squared error (`feature_loss_reduction="mean"`).

Query-based detectors (Deformable DETR, RT-DETR, DETR) have no per-location scores, so their queries' class scores
are projected onto the locations their boxes cover (the best-scoring covering query per class), on each pyramid
level's grid, for both models: an adaptation of the release's objectness distillation (Mask R-CNN's RPN), documented
as such; locations no student box covers are left out of the score term.
"""

import copy
import os
from dataclasses import dataclass, field

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from transformers import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    PreTrainedModel,
    RTDetrConfig,
    RTDetrForObjectDetection,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .cli import parse_overrides
from .configuration_g2sd import G2SDBackboneConfig
from .losses import (
    channel_wise_distillation_loss,
    pixel_distillation_loss,
    probability_distillation_loss,
    release_feature_distillation_loss,
    release_score_distillation_loss,
    weighted_feature_distillation_loss,
    weighted_score_distillation_loss,
)
from .modeling_g2sd import BackboneMixin, G2SDBackbone
from .optimization import FINE_TUNING_NO_DECAY_NAMES
from .teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, _FrozenTeacher
from .trainer import DistillationTrainer, RecipeConfig


logger = logging.get_logger(__name__)


# The release's dense recipes, per kind of head; `None` fields of `DenseDistillationConfig` take these.
DENSE_DISTILLATION_DEFAULTS = {
    # tools/plain_distill_net.py + projects/ViTDet/configs/COCO/distillation/mask_rcnn_vitdet_b2s_100ep.py
    "detection": {
        "feature_distillation_weight": 0.001,
        "score_distillation_weight": 0.1,
        "distillation_warmup_steps": 500,
        "feature_adapter": True,
    },
    # G2SD_seg_dis/src/configs/distill/distill_cwd.py: CWD on decode_head.conv_seg, tau 1.0, weight 10.
    "segmentation": {
        "feature_distillation_weight": 0.0,
        "score_distillation_weight": 10.0,
        "distillation_warmup_steps": 0,
        "feature_adapter": False,
    },
    # No release recipe (Mask2Former): the package's adaptation.
    "universal": {
        "feature_distillation_weight": 1.0,
        "score_distillation_weight": 1.0,
        "distillation_warmup_steps": 0.1,
        "feature_adapter": False,
    },
}


@dataclass
class DenseDistillationConfig(RecipeConfig):
    r"""
    `TrainingArguments` for dense-task fine-tuning with (or without) a teacher: ViTDet's AdamW recipe (learning rate
    1e-4, weight decay 0.1, layer-wise decay over the backbone) and the distillation settings. Settings left at
    `None` take the release's values for the head's task (`DENSE_DISTILLATION_DEFAULTS`).
    """

    feature_distillation_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the pyramid-feature loss (default: detection 0.001, segmentation 0, Mask2Former 1)."
        },
    )
    score_distillation_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the score loss (default: detection 0.1, segmentation's CWD 10, Mask2Former 1)."},
    )
    segmentation_distillation: str = field(
        default="channel-wise",
        metadata={
            "help": "Segmentation logits: 'channel-wise' (CWD of the decode head's logits, the release's) or "
            "'pixel-kl' (per-pixel KL over classes of the upsampled logits).",
            "choices": ["channel-wise", "pixel-kl"],
        },
    )
    feature_loss_reduction: str | None = field(
        default=None,
        metadata={
            "help": "'release' (per level: sum over channels and locations / sum of the weights; summed over "
            "levels) or 'mean' (per level: channel mean, weighted location mean; averaged over levels). Default: "
            "'release', 'mean' for Mask2Former.",
            "choices": ["release", "mean"],
        },
    )
    feature_adapter: bool | None = field(
        default=None,
        metadata={
            "help": "Pass the student's pyramid through a 3x3 convolution per level before the feature loss "
            "(trained with the student, not saved with it). Default: on for detection, as in the release."
        },
    )
    distillation_temperature: float = field(default=1.0, metadata={"help": "Temperature of CWD and of the pixel KL."})
    distillation_warmup_steps: float | None = field(
        default=None,
        metadata={
            "help": "Steps (or fraction of the steps, < 1) over which the distillation weights rise linearly "
            "from 0 (default: detection 500, as the release; segmentation 0)."
        },
    )
    detection_top_queries: int = field(
        default=50, metadata={"help": "Detection: the best queries (by score) projected onto the score maps."}
    )
    layer_decay: float = field(default=0.75, metadata={"help": "Layer-wise learning-rate decay over the backbone."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    scale_lr_with_batch_size: bool = field(default=False, metadata={"help": "Scale learning_rate by batch / 256."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps, or a fraction (< 1) of the steps."})

    def __post_init__(self):
        weights = (self.feature_distillation_weight, self.score_distillation_weight)
        if any(weight is not None and weight < 0 for weight in weights):
            raise ValueError("The distillation weights must be >= 0.")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}.")
        if self.distillation_temperature <= 0:
            raise ValueError(f"distillation_temperature must be > 0, got {self.distillation_temperature}.")
        super().__post_init__()


@dataclass(frozen=True)
class DenseDistillationSettings:
    """The distillation settings a `DenseDistillationTrainer` runs with, `None`s resolved for the head's task."""

    task: str
    feature_weight: float
    score_weight: float
    warmup_steps: float
    feature_adapter: bool
    feature_loss_reduction: str
    segmentation_distillation: str
    temperature: float


def resolve_dense_distillation(args: DenseDistillationConfig, task: str) -> DenseDistillationSettings:
    """Fill the `None` settings of `args` with the release's values for `task` ("detection", "segmentation" or
    "universal" for Mask2Former).

    Example:

    ```python
    >>> resolve_dense_distillation(DenseDistillationConfig("out"), "detection").feature_weight
    0.001
    ```
    """
    defaults = DENSE_DISTILLATION_DEFAULTS[task]

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    return DenseDistillationSettings(
        task=task,
        feature_weight=pick("feature_distillation_weight"),
        score_weight=pick("score_distillation_weight"),
        warmup_steps=pick("distillation_warmup_steps"),
        feature_adapter=pick("feature_adapter"),
        feature_loss_reduction=args.feature_loss_reduction or ("mean" if task == "universal" else "release"),
        segmentation_distillation=args.segmentation_distillation,
        temperature=args.distillation_temperature,
    )


def find_backbone(model: nn.Module) -> nn.Module:
    """The backbone module (a transformers `BackboneMixin`) inside a detection or segmentation model."""
    for module in model.modules():
        if isinstance(module, BackboneMixin):
            return module
    raise ValueError(
        f"{type(model).__name__} has no transformers backbone (BackboneMixin): dense distillation reads the backbone's "
        "feature pyramid. Build the head with backbone_config=G2SDBackboneConfig(...)."
    )


class _FeatureCapture:
    """Keeps the feature maps of the last forward of a backbone."""

    def __init__(self, backbone: nn.Module):
        self.maps = None
        backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.maps = list(output.feature_maps if hasattr(output, "feature_maps") else output[0])

    def pop(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, None
        if maps is None:
            raise RuntimeError("The backbone did not run in the last forward.")
        return maps


class _HeadCapture:
    """Keeps the output of the last forward of a semantic-segmentation decode head (UperNet's `decode_head`: the
    logits at its own resolution, before they are upsampled to the image; the release's `decode_head.conv_seg`)."""

    def __init__(self, model: nn.Module):
        self.logits = None
        head = getattr(model, "decode_head", None)
        self.available = head is not None
        if head is not None:
            head.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.logits = output

    def pop(self) -> torch.Tensor:
        logits, self.logits = self.logits, None
        if logits is None:
            raise RuntimeError("The decode head did not run in the last forward.")
        return logits


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


# --------------------------------------------------------------------------------------------------------------------
# Building the models
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DenseModelArguments:
    """The student (a head on a G2SD backbone), its initialization, and the teacher (shared by the dense scripts)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved student (head + backbone)."}
    )
    backbone_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Initialize the backbone from a G2SD checkpoint (generic or specific distillation)."},
    )
    backbone_preset: str = field(
        default="g2sd-small", metadata={"help": "Backbone architecture without a checkpoint."}
    )
    backbone_overrides: str | None = field(
        default=None, metadata={"help": "Backbone config overrides, 'name=value,...'."}
    )
    fpn_hidden_size: int = field(default=256, metadata={"help": "Channels of the simple feature pyramid."})
    window_size: int = field(default=0, metadata={"help": "Windowed attention (ViTDet: 14); 0 = global everywhere."})
    head_hidden_size: int | None = field(default=None, metadata={"help": "Width of the head (its default if unset)."})
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher: the same head on a larger backbone."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})


def dense_backbone_config(arguments: DenseModelArguments, image_size: int) -> G2SDBackboneConfig:
    """The backbone config: from the checkpoint (weights loaded later) or a preset, plus the pyramid options."""
    options = {
        "fpn_hidden_size": arguments.fpn_hidden_size,
        "window_size": arguments.window_size,
        **parse_overrides(arguments.backbone_overrides, G2SDBackboneConfig),
    }
    if arguments.backbone_name_or_path is not None:
        return G2SDBackboneConfig.from_pretrained(arguments.backbone_name_or_path, **options)
    return G2SDBackboneConfig.from_preset(arguments.backbone_preset, **{"image_size": image_size, **options})


def load_backbone_weights(model: PreTrainedModel, name_or_path: str) -> None:
    """Copy a G2SD checkpoint's encoder into `model`'s G2SD backbone (the pyramid keeps its initialization)."""
    backbone = find_backbone(model)
    source = G2SDBackbone.from_pretrained(
        name_or_path, **{key: getattr(backbone.config, key) for key in ("fpn_hidden_size", "window_size")}
    )
    backbone.g2sd.load_state_dict(source.g2sd.state_dict(), strict=True)


def semantic_segmentation_model(
    backbone_config: G2SDBackboneConfig, num_labels: int, hidden_size: int | None = None, **kwargs
) -> UperNetForSemanticSegmentation:
    """UperNet on a G2SD backbone (all four pyramid levels)."""
    extra = {"hidden_size": hidden_size} if hidden_size else {}
    return UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone_config, num_labels=num_labels, **extra, **kwargs)
    )


def object_detection_model(
    backbone_config: G2SDBackboneConfig,
    num_labels: int,
    detector: str = "deformable-detr",
    hidden_size: int | None = None,
    **kwargs,
) -> PreTrainedModel:
    """A DETR-family detector on a G2SD backbone (pyramid strides 8, 16 and 32): `"deformable-detr"` (which adds a
    stride-64 level) or `"rt-detr"`."""
    if detector == "deformable-detr":
        # Strides 8-32 from the backbone and a stride-64 level Deformable DETR adds itself, as standard: stride 4 would
        # give its encoder ~87k tokens at 1024 px.
        backbone_config = copy.deepcopy(backbone_config)  # the caller's config stays as it was
        backbone_config.out_features = ["stage2", "stage3", "stage4"]
        config = DeformableDetrConfig(
            backbone_config=backbone_config,
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            num_labels=num_labels,
            num_feature_levels=4,
            **({"d_model": hidden_size} if hidden_size else {}),
            **kwargs,
        )
        return DeformableDetrForObjectDetection(config)
    if detector == "rt-detr":
        backbone_config = copy.deepcopy(backbone_config)  # the caller's config stays as it was
        backbone_config.out_features = ["stage2", "stage3", "stage4"]
        config = RTDetrConfig(
            backbone_config=backbone_config,
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            num_labels=num_labels,
            encoder_in_channels=[backbone_config.fpn_hidden_size] * 3,
            feat_strides=[8, 16, 32],
            **(
                {"d_model": hidden_size, "encoder_hidden_dim": hidden_size, "decoder_in_channels": [hidden_size] * 3}
                if hidden_size
                else {}
            ),
            **kwargs,
        )
        return RTDetrForObjectDetection(config)
    raise ValueError(f"detector must be 'deformable-detr' or 'rt-detr', got {detector!r}.")


def universal_segmentation_model(
    backbone_config: G2SDBackboneConfig, num_labels: int, hidden_size: int = 256, **kwargs
) -> Mask2FormerForUniversalSegmentation:
    """Mask2Former (instance / panoptic / semantic masks) on a G2SD backbone."""
    config = Mask2FormerConfig(
        backbone_config=backbone_config,
        num_labels=num_labels,
        hidden_dim=hidden_size,
        mask_feature_size=hidden_size,
        feature_size=hidden_size,
        use_timm_backbone=False,
        **kwargs,
    )
    return Mask2FormerForUniversalSegmentation(config)


# --------------------------------------------------------------------------------------------------------------------
# Per-location scores of the different heads
# --------------------------------------------------------------------------------------------------------------------
def output_kind(outputs) -> str:
    """`"detection"` (DETR family), `"universal"` (Mask2Former) or `"semantic"` (per-pixel logits, e.g. UperNet)."""
    if getattr(outputs, "pred_boxes", None) is not None:
        return "detection"
    if getattr(outputs, "masks_queries_logits", None) is not None:
        return "universal"
    logits = getattr(outputs, "logits", None)
    if logits is not None and logits.ndim == 4:
        return "semantic"
    raise ValueError(
        f"Unsupported outputs {type(outputs).__name__}: expected per-pixel logits, Mask2Former or DETR outputs."
    )


def detector_queries(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits, pred_boxes)` of a DETR-family output without RT-DETR's training-time denoising queries."""
    logits, boxes = outputs.logits, outputs.pred_boxes
    meta = getattr(outputs, "denoising_meta_values", None)
    if meta is not None and logits.shape[1] == sum(meta["dn_num_split"]):
        logits, boxes = logits[:, meta["dn_num_split"][0] :], boxes[:, meta["dn_num_split"][0] :]
    return logits, boxes


def query_class_probabilities(logits: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Class probabilities of detector queries: sigmoid (Deformable DETR, RT-DETR) or softmax without the
    "no object" class (DETR), from the number of logits."""
    if logits.shape[-1] == num_labels + 1:
        return logits.float().softmax(dim=-1)[..., :-1]
    return logits.float().sigmoid()


def box_score_maps(
    probabilities: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], top_queries: int
) -> torch.Tensor:
    """Project query class scores onto a grid: at each location and class, the best score among the `top_queries`
    queries whose box covers the location.

    Args:
        probabilities (`torch.Tensor` of shape `(batch, queries, classes)`): Class scores.
        boxes (`torch.Tensor` of shape `(batch, queries, 4)`): Normalized `(center_x, center_y, width, height)`.
        size (`tuple[int, int]`): `(height, width)` of the grid.
        top_queries (`int`): Queries kept, by their best class score.

    Returns:
        `torch.Tensor` of shape `(batch, classes, height, width)`.
    """
    keep = min(top_queries, probabilities.shape[1])
    best = probabilities.max(dim=-1).values.topk(keep, dim=1).indices  # (batch, keep)
    probabilities = probabilities.gather(1, best[..., None].expand(-1, -1, probabilities.shape[-1]))
    boxes = boxes.detach().float().gather(1, best[..., None].expand(-1, -1, 4))
    height, width = size
    ys = (torch.arange(height, device=boxes.device) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device) + 0.5) / width
    center_x, center_y, box_width, box_height = boxes.unbind(-1)  # (batch, keep)
    inside_x = (xs[None, None] >= (center_x - box_width / 2)[..., None]) & (
        xs[None, None] <= (center_x + box_width / 2)[..., None]
    )
    inside_y = (ys[None, None] >= (center_y - box_height / 2)[..., None]) & (
        ys[None, None] <= (center_y + box_height / 2)[..., None]
    )
    covers = (inside_y[..., :, None] & inside_x[..., None, :]).to(probabilities.dtype)  # (batch, keep, height, width)
    scores = probabilities.new_zeros(probabilities.shape[0], probabilities.shape[-1], height, width)
    for start in range(0, keep, 16):  # a running maximum over query chunks bounds the memory
        chunk = probabilities[:, start : start + 16, :, None, None] * covers[:, start : start + 16, None]
        scores = torch.maximum(scores, chunk.max(dim=1).values)
    return scores


def universal_pixel_probabilities(outputs, size: tuple[int, int]) -> torch.Tensor:
    """Mask2Former's per-pixel class distribution `(batch, classes, height, width)` from its queries."""
    classes = outputs.class_queries_logits.float().softmax(dim=-1)[..., :-1]  # (batch, queries, classes)
    masks = F.interpolate(
        outputs.masks_queries_logits.float(), size=size, mode="bilinear", align_corners=False
    ).sigmoid()
    semantic = torch.einsum("bqc,bqhw->bchw", classes, masks)
    return semantic / semantic.sum(dim=1, keepdim=True).clamp(min=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------
class DenseDistillationTrainer(DistillationTrainer):
    r"""
    Trainer for detection and segmentation heads on a G2SD backbone, with specific distillation from a teacher (the
    same head on a larger backbone) when one is given:

        loss = L_task + ramp(step) * (feature_weight * L_feat + score_weight * L_score)

    `L_task` is the head's own loss (from the `labels` / `mask_labels` in the batch); `ramp` rises linearly from 0 to 1
    over the warm-up steps. `L_feat` and `L_score` follow the release's recipe for the head's task (see the module
    docstring and `DENSE_DISTILLATION_DEFAULTS`); `settings` holds what this trainer runs with. Logged terms:
    `task_loss`, `feature_distillation_loss` (when weighted), `score_distillation_loss`. The backbone gets layer-wise
    learning-rate decay. The detection feature adapter is trained with the student, saved in the checkpoints (to
    resume) but not with the model.

    Args:
        model (`PreTrainedModel`): A detection / segmentation model with a transformers backbone.
        teacher (`DenseTeacher` or `PreTrainedModel`, *optional*): The teacher; without it, plain fine-tuning.
        args (`DenseDistillationConfig`, *optional*): The training arguments.
        **kwargs: The Trainer's other arguments.

    Example:

    ```python
    >>> config = UperNetConfig(backbone_config=G2SDBackboneConfig.from_preset("g2sd-small"), num_labels=150)
    >>> student = UperNetForSemanticSegmentation(config)
    >>> student.backbone.load_state_dict(G2SDBackbone.from_pretrained("g2sd-small-gd").state_dict())
    >>> trainer = DenseDistillationTrainer(model=student, teacher=teacher, args=DenseDistillationConfig("out"), ...)
    >>> trainer.settings.score_weight  # channel-wise distillation of the decode head's logits
    10.0
    ```
    """

    _no_decay_names = FINE_TUNING_NO_DECAY_NAMES
    _progress_loss_key = "task_loss"  # the distillation terms rise with their warm-up: judge progress on the task
    _progress_loss_name = "The task loss"
    ADAPTER_FILE = "distillation_adapter.safetensors"

    def __init__(
        self, model: PreTrainedModel, teacher: DenseTeacher | PreTrainedModel | None = None, args=None, **kwargs
    ):
        if args is None:
            args = DenseDistillationConfig(output_dir="g2sd-dense")
        if isinstance(teacher, PreTrainedModel):
            teacher = DenseTeacher(teacher)
        student_backbone = find_backbone(model)
        if teacher is not None:
            if not isinstance(teacher, DenseTeacher):
                raise TypeError(
                    f"The teacher must be a DenseTeacher or a PreTrainedModel, got {type(teacher).__name__}."
                )
            if list(student_backbone.channels) != list(teacher.backbone.channels):
                raise ValueError(
                    f"Student pyramid channels {student_backbone.channels} differ from the teacher's "
                    f"{teacher.backbone.channels}: give both backbones the same fpn_hidden_size and out_features."
                )
            if model.config.num_labels != teacher.model.config.num_labels:
                raise ValueError(
                    f"The student has {model.config.num_labels} classes, the teacher {teacher.model.config.num_labels}."
                )
            self._accept_student_normalization(teacher, kwargs.get("processing_class"))
        super().__init__(model, teacher, args, **kwargs)
        self.settings = resolve_dense_distillation(self.args, head_task(model))
        self._student_features = _FeatureCapture(student_backbone)
        self._student_head = _HeadCapture(model)
        self.feature_adapter = None
        if teacher is not None and self.settings.feature_adapter and self.settings.feature_weight > 0:
            if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                raise ValueError(
                    "The detection feature adapter is trained beside the student and is not sharded: under FSDP or "
                    "DeepSpeed set feature_adapter=False (--feature_adapter false), or train with DDP."
                )
            self.feature_adapter = PyramidAdapter(list(student_backbone.channels))
        self._adapter_placed = False
        if teacher is not None:
            logger.info(f"Dense distillation settings: {self.settings}")

    def _layer_decay(self) -> float | None:
        return getattr(self.args, "layer_decay", None)

    @property
    def model_card_stage(self) -> str:
        task = "detection" if self.settings.task == "detection" else "segmentation"
        return f"{task}-distillation" if self.teacher is not None else f"{task}-fine-tuning"

    def _card_hyperparameters(self) -> dict:
        values = {**super()._card_hyperparameters(), "layer-wise lr decay": self.args.layer_decay}
        if self.teacher is not None:
            settings = self.settings
            score = {"detection": "box-projected score BCE", "universal": "per-pixel class KL"}.get(
                settings.task,
                "channel-wise (CWD)" if settings.segmentation_distillation == "channel-wise" else "per-pixel KL",
            )
            values["distillation"] = (
                f"features x {settings.feature_weight:g} ({settings.feature_loss_reduction} reduction"
                f"{', 3x3 adapter' if self.feature_adapter is not None else ''}), {score} x {settings.score_weight:g}, "
                f"temperature {settings.temperature:g}, warm-up {settings.warmup_steps:g}"
            )
        return values

    # -- the adapter: optimized with the student, saved with the checkpoints ------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.feature_adapter is not None and not any(
            group.get("feature_adapter") for group in optimizer.param_groups
        ):
            optimizer.add_param_group(
                {
                    "params": list(self.feature_adapter.parameters()),
                    "lr": self.peak_learning_rate,
                    "lr_scale": 1.0,
                    "weight_decay": self.args.weight_decay,
                    "feature_adapter": True,
                }
            )
        return optimizer

    def _adapter(self) -> nn.Module:
        if not self._adapter_placed:
            # Wrapped for gradients like the student (DDP), so every process applies the same update.
            self.feature_adapter = self.accelerator.prepare_model(self.feature_adapter)
            self._adapter_placed = True
        return self.feature_adapter

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.feature_adapter is not None and self.args.should_save:
            from safetensors.torch import save_file

            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            adapter = self.accelerator.unwrap_model(self.feature_adapter)
            save_file(
                {name: value.detach().cpu().contiguous() for name, value in adapter.state_dict().items()},
                os.path.join(folder, self.ADAPTER_FILE),
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, self.ADAPTER_FILE)
        if self.feature_adapter is not None:
            if not os.path.exists(path):
                raise ValueError(
                    f"{resume_from_checkpoint} has no {self.ADAPTER_FILE}: it was not saved by a detection distillation "
                    "run with a feature adapter. Resume from a checkpoint of this run, or start a new one."
                )
            from safetensors.torch import load_file

            self.accelerator.unwrap_model(self.feature_adapter).load_state_dict(load_file(path))

    # -- the loss ------------------------------------------------------------------------------------------------------
    def _ramp(self) -> float:
        """The release's linear warm-up of the distillation weights: `min(1, step / warm-up steps)` (0 at step 0)."""
        warmup = self.settings.warmup_steps
        if 0 < warmup < 1:
            warmup = warmup * max(self.state.max_steps, 1)
        return 1.0 if warmup <= 0 else min(1.0, self.state.global_step / warmup)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        task_loss = outputs.loss
        if not model.training:
            return (task_loss, outputs) if return_outputs else task_loss
        student_maps = self._student_features.pop()
        student_head_logits = self._student_head.pop() if self._student_head.available else None
        if self.teacher is None:
            self._check_and_record(task_loss, {"task_loss": task_loss})
            return (task_loss, outputs) if return_outputs else task_loss

        teacher_outputs, teacher_maps, teacher_head_logits = self._run_teacher(
            inputs["pixel_values"], inputs.get("pixel_mask")
        )
        settings = self.settings
        if settings.task == "detection":
            feature_loss, score_loss = self._detection_terms(
                model, outputs, teacher_outputs, student_maps, teacher_maps
            )
        elif settings.task == "universal":
            size = student_maps[0].shape[-2:]
            teacher_scores = universal_pixel_probabilities(teacher_outputs, size)
            score_loss = probability_distillation_loss(universal_pixel_probabilities(outputs, size), teacher_scores)
            feature_loss = self._feature_term(student_maps, teacher_maps, teacher_scores.max(dim=1).values)
        else:
            confidence = teacher_outputs.logits.float().softmax(dim=1).max(dim=1).values
            if settings.segmentation_distillation == "channel-wise":
                if student_head_logits is None:
                    raise ValueError(
                        f"Channel-wise distillation reads the decode head's logits, and {type(model).__name__} has no "
                        "`decode_head`: use segmentation_distillation='pixel-kl'."
                    )
                score_loss = channel_wise_distillation_loss(
                    student_head_logits, teacher_head_logits, settings.temperature
                )
            else:
                score_loss = pixel_distillation_loss(outputs.logits, teacher_outputs.logits, settings.temperature)
            feature_loss = self._feature_term(student_maps, teacher_maps, confidence)
        terms = {"task_loss": task_loss, "score_distillation_loss": score_loss}
        distillation = settings.score_weight * score_loss
        if feature_loss is not None:
            terms["feature_distillation_loss"] = feature_loss
            distillation = distillation + settings.feature_weight * feature_loss
        loss = task_loss + self._ramp() * distillation
        self._check_and_record(loss, terms)
        return (loss, outputs) if return_outputs else loss

    def _adapted(self, student_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.feature_adapter is None:
            return student_maps
        return self._adapter()(student_maps)  # through the DDP wrapper when distributed: gradients synchronized

    def _feature_term(self, student_maps, teacher_maps, confidence: torch.Tensor) -> torch.Tensor | None:
        """The feature loss with one confidence map for every level (resized to each), or `None` when unweighted."""
        if self.settings.feature_weight == 0:
            return None
        student_maps = self._adapted(student_maps)
        if self.settings.feature_loss_reduction == "mean":
            return weighted_feature_distillation_loss(student_maps, teacher_maps, confidence)
        weights = [_resize_weights(confidence, student.shape[-2:]) for student in student_maps]
        return release_feature_distillation_loss(student_maps, teacher_maps, weights)

    def _detection_terms(self, model, outputs, teacher_outputs, student_maps, teacher_maps):
        """Per pyramid level: box-projected score maps of both models, weighted by the teacher's best score."""
        num_labels = self.accelerator.unwrap_model(model).config.num_labels
        top = self.args.detection_top_queries
        (student_logits, student_boxes), (teacher_logits, teacher_boxes) = (
            detector_queries(outputs),
            detector_queries(teacher_outputs),
        )
        student_probabilities = query_class_probabilities(student_logits, num_labels)
        teacher_probabilities = query_class_probabilities(teacher_logits, num_labels)
        student_scores, teacher_scores, confidences, score_weights = [], [], [], []
        for level in student_maps:
            size = level.shape[-2:]
            student_level = box_score_maps(student_probabilities, student_boxes, size, top)
            teacher_level = box_score_maps(teacher_probabilities, teacher_boxes, size, top)
            confidence = teacher_level.max(dim=1).values
            # Cells no student box covers have score 0 whatever the logits: nothing to learn there from the scores.
            covered = (student_level.amax(dim=1) > 0).to(confidence.dtype)
            student_scores.append(student_level)
            teacher_scores.append(teacher_level)
            confidences.append(confidence)
            score_weights.append(confidence * covered)
        if self.settings.feature_loss_reduction == "mean":
            score_loss = torch.stack(
                [
                    weighted_score_distillation_loss(s, t, w)
                    for s, t, w in zip(student_scores, teacher_scores, score_weights)
                ]
            ).mean()
        else:
            score_loss = release_score_distillation_loss(student_scores, teacher_scores, score_weights)
        feature_loss = None
        if self.settings.feature_weight > 0:
            adapted = self._adapted(student_maps)
            if self.settings.feature_loss_reduction == "mean":
                feature_loss = torch.stack(
                    [
                        weighted_feature_distillation_loss([s], [t], w)
                        for s, t, w in zip(adapted, teacher_maps, confidences)
                    ]
                ).mean()
            else:
                feature_loss = release_feature_distillation_loss(adapted, teacher_maps, confidences)
        return feature_loss, score_loss


class PyramidAdapter(nn.Module):
    """The release's feature adapter (`ADAP` in `detectron2/modeling/distill/adap.py`): one 3x3 convolution per
    pyramid level, applied to the student's features before they are compared with the teacher's."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv2d(width, width, kernel_size=3, padding=1) for width in channels)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.layers):
            raise ValueError(f"The feature adapter has {len(self.layers)} levels, the student's pyramid {len(maps)}.")
        return [layer(level) for layer, level in zip(self.layers, maps)]


def _resize_weights(weights: torch.Tensor, size) -> torch.Tensor:
    """Per-location weights `(batch, height, width)` at another level's resolution (area mean when shrinking)."""
    if tuple(weights.shape[-2:]) == tuple(size):
        return weights
    if weights.shape[-2] >= size[0] and weights.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(weights[:, None].float(), size)[:, 0]
    return F.interpolate(weights[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def head_task(model: nn.Module) -> str:
    """`"detection"` (DETR family), `"universal"` (Mask2Former) or `"segmentation"` (per-pixel logits: UperNet)."""
    name = type(model).__name__
    if "ObjectDetection" in name:
        return "detection"
    if "Universal" in name or "Mask2Former" in name:
        return "universal"
    return "segmentation"


# --------------------------------------------------------------------------------------------------------------------
# Detection outputs -> boxes
# --------------------------------------------------------------------------------------------------------------------
def detections_from_outputs(
    outputs, image_sizes: list[tuple[int, int]], num_labels: int, top_k: int = 100
) -> list[dict]:
    """Boxes of a DETR-family output for COCO evaluation: the `top_k` (query, class) pairs by score, per image.

    Returns:
        `list[dict]`: per image, `boxes` (`[x, y, width, height]` in pixels), `labels` and `scores` (numpy arrays).
    """
    logits, pred_boxes = detector_queries(outputs)
    probabilities = query_class_probabilities(logits, num_labels)  # (batch, queries, classes)
    batch_size, num_queries, num_classes = probabilities.shape
    scores, flat = probabilities.reshape(batch_size, -1).topk(min(top_k, num_queries * num_classes), dim=1)
    queries, labels = flat // num_classes, flat % num_classes
    boxes = pred_boxes.float().gather(1, queries[..., None].expand(-1, -1, 4))
    results = []
    for index, (height, width) in enumerate(image_sizes):
        center_x, center_y, box_width, box_height = boxes[index].unbind(-1)
        xywh = torch.stack(
            [
                (center_x - box_width / 2) * width,
                (center_y - box_height / 2) * height,
                box_width * width,
                box_height * height,
            ],
            dim=-1,
        )
        results.append(
            {"boxes": xywh.cpu().numpy(), "labels": labels[index].cpu().numpy(), "scores": scores[index].cpu().numpy()}
        )
    return results


@torch.no_grad()
def evaluate_detection(
    model, dataset, raw_dataset, num_labels: int, collate_fn, batch_size: int = 16, top_k: int = 100
) -> dict:
    """COCO box AP of a DETR-family `model` on `dataset` (transformed) against the boxes of `raw_dataset` (one
    process: run it on the main one)."""
    from .dense_data import image_size_of
    from .metrics import coco_detection_metrics

    model.eval()
    device = next(model.parameters()).device
    predictions, truth = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    sizes = [image_size_of(image) for image in raw_dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    for start, batch in zip(range(0, len(sizes), batch_size), loader):
        outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
        predictions += detections_from_outputs(outputs, sizes[start : start + batch_size], num_labels, top_k)
    for size, objects in zip(sizes, raw_dataset["objects"]):
        annotation = {"boxes": objects["bbox"], "labels": objects["category"], "size": size}
        annotation.update({key: objects[key] for key in ("area", "iscrowd") if key in objects})
        truth.append(annotation)
    return coco_detection_metrics(truth, predictions, num_labels)


__all__ = [
    "DENSE_DISTILLATION_DEFAULTS",
    "DenseDistillationConfig",
    "DenseDistillationSettings",
    "DenseModelArguments",
    "DenseDistillationTrainer",
    "DenseTeacher",
    "box_score_maps",
    "dense_backbone_config",
    "detections_from_outputs",
    "detector_queries",
    "evaluate_detection",
    "find_backbone",
    "head_task",
    "load_backbone_weights",
    "object_detection_model",
    "output_kind",
    "PyramidAdapter",
    "resolve_dense_distillation",
    "semantic_segmentation_model",
    "universal_pixel_probabilities",
    "universal_segmentation_model",
]
