"""The trainer of specific distillation for dense tasks (detection and segmentation heads on a G2SD backbone).

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

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from torch import nn
from transformers import (
    PreTrainedModel,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .dense_models import (
    _FeatureCapture,
    _HeadCapture,
    box_score_maps,
    detector_queries,
    find_backbone,
    head_task,
    query_class_probabilities,
    universal_pixel_probabilities,
)
from .losses import (
    channel_wise_distillation_loss,
    pixel_distillation_loss,
    probability_distillation_loss,
    release_feature_distillation_loss,
    release_score_distillation_loss,
    weighted_feature_distillation_loss,
    weighted_score_distillation_loss,
)
from .optimization import FINE_TUNING_NO_DECAY_NAMES
from .teacher import DenseTeacher
from .trainer import DistillationTrainer
from .training_args import DenseDistillationArguments


logger = logging.get_logger(__name__)


# The release's dense recipes, per kind of head; `None` fields of `DenseDistillationArguments` take these.
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


def resolve_dense_distillation(args: DenseDistillationArguments, task: str) -> DenseDistillationSettings:
    """Fill the `None` settings of `args` with the release's values for `task` ("detection", "segmentation" or
    "universal" for Mask2Former).

    Example:

    ```python
    >>> resolve_dense_distillation(DenseDistillationArguments("out"), "detection").feature_weight
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
        args (`DenseDistillationArguments`, *optional*): The training arguments.
        **kwargs: The Trainer's other arguments.

    Example:

    ```python
    >>> config = UperNetConfig(backbone_config=G2SDBackboneConfig.from_preset("g2sd-small"), num_labels=150)
    >>> student = UperNetForSemanticSegmentation(config)
    >>> student.backbone.load_state_dict(G2SDBackbone.from_pretrained("g2sd-small-gd").state_dict())
    >>> trainer = DenseDistillationTrainer(model=student, teacher=teacher, args=DenseDistillationArguments("out"), ...)
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
            args = DenseDistillationArguments(output_dir="g2sd-dense")
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


__all__ = [
    "DENSE_DISTILLATION_DEFAULTS",
    "DenseDistillationSettings",
    "DenseDistillationTrainer",
    "PyramidAdapter",
    "resolve_dense_distillation",
]
