"""The training arguments of the G2SD trainers (`g2sd_hf.trainer`), beside them as transformers keeps
`TrainingArguments` in `training_args.py` beside `trainer.py`: the recipes' shared settings (`RecipeArguments`), and
those of generic distillation, MAE pre-training, specific distillation and fine-tuning, each with the release's
defaults (tests/test_release_recipe.py pins them) and `--recipe` presets (`g2sd_hf.recipes`).
"""

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .recipes import DEFAULT_RECIPE, RECIPES


DISTILLATION_TYPES = ("hard", "soft", "nkd", "none")


def _value(option) -> str:
    return str(getattr(option, "value", option))


def default_dataloader_workers() -> int:
    """Data-loader workers per training process: the CPUs this process may use, shared among the processes of this
    machine (`LOCAL_WORLD_SIZE`, set by `accelerate launch` / torchrun), at most 8; none on a single CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return 0 if cpus < 2 else min(8, max(1, cpus // local_processes))


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RecipeArguments(TrainingArguments):
    """`TrainingArguments` with what the MAE/G2SD recipes share: AdamW with weight decay 0.05, a cosine schedule down
    to `min_learning_rate`, no gradient clipping, and the linear scaling rule of the learning rate."""

    scale_lr_with_batch_size: bool = field(
        default=True,
        metadata={
            "help": "Use learning_rate * total_train_batch_size / 256 as the peak learning rate (the MAE/G2SD "
            "linear scaling rule). Set False to use learning_rate as is."
        },
    )
    weight_decay: float = field(
        default=0.05, metadata={"help": "AdamW weight decay (none on biases and 1-D weights)."}
    )
    lr_scheduler_type: str = field(
        default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule (cosine down to min_learning_rate)."}
    )
    min_learning_rate: float = field(
        default=0.0,
        metadata={
            "help": "Where the cosine schedule ends (lr_scheduler_type cosine_with_min_lr); layer-decayed groups "
            "end at this times their scale, as in the release."
        },
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Clip the gradient norm to this; 0 disables clipping (the release never clips)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the raw image column: the data transforms turn it into pixel_values."}
    )
    recipe: str = field(
        default=DEFAULT_RECIPE,
        metadata={
            "help": "Named defaults for the arguments not given explicitly: 'release' (the authors' ImageNet "
            "recipe) or 'small-data' (a few thousand images: plain augmentation, unscaled lr 1e-3). See "
            "g2sd_hf.recipes.",
            "choices": sorted(RECIPES),
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds another run's checkpoints or finished model (its "
            "checkpoints are not resumed; same-named files are replaced, nothing else is removed). Without it, "
            "the example scripts resume only a run started with the same arguments and refuse anything else."
        },
    )
    dataloader_num_workers: int = field(
        default_factory=default_dataloader_workers,
        metadata={
            "help": "Data-loader worker processes per training process (default: the CPUs available to each "
            "local process, at most 8). Decoding and augmenting images in the main process starves the model."
        },
    )
    dataloader_persistent_workers: bool = field(
        default=True, metadata={"help": "Keep the data-loader workers between epochs (ignored without workers)."}
    )
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available,
        metadata={"help": "Pin the batches' memory for faster copies to the GPU (default: when CUDA is available)."},
    )

    def __post_init__(self):
        self._check_counts()
        if self.min_learning_rate < 0:
            raise ValueError(f"min_learning_rate must be >= 0, got {self.min_learning_rate}.")
        if self.recipe not in RECIPES:
            raise ValueError(f"Unknown recipe {self.recipe!r}: choose one of {sorted(RECIPES)}.")
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers = False  # nothing to keep: torch refuses the flag without workers
        super().__post_init__()
        kwargs = self.lr_scheduler_kwargs
        if _value(self.lr_scheduler_type) == "cosine_with_min_lr" and not (
            isinstance(kwargs, dict) and {"min_lr", "min_lr_rate"} & kwargs.keys()
        ):
            self.lr_scheduler_kwargs = {
                **(kwargs if isinstance(kwargs, dict) else {}),
                "min_lr": self.min_learning_rate,
            }

    def _check_counts(self) -> None:
        """Refuse, before any work, counts that would train nothing or fail late: batch sizes and accumulation steps
        below 1, negative workers, and a run with neither steps nor epochs (it would save its initial weights as a
        finished model)."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(
                f"--dataloader_num_workers must be >= 0 (0: load in the main process), got {self.dataloader_num_workers}."
            )
        if self.num_train_epochs < 0:
            raise ValueError(f"--num_train_epochs must be positive, got {self.num_train_epochs}.")
        if self.do_train and self.max_steps <= 0 and self.num_train_epochs == 0:
            raise ValueError(
                "--num_train_epochs 0 without --max_steps trains nothing: the initial weights would be saved as a "
                "finished model. Give a positive --num_train_epochs or --max_steps."
            )


@dataclass
class GenericDistillationArguments(RecipeArguments):
    r"""
    `TrainingArguments` with the defaults of G2SD's generic-distillation recipe (the release's `main_distill.py` and
    `GD.sh`): AdamW with betas (0.9, 0.95), weight decay 0.05 (none on biases and 1-D weights), base learning rate
    1.5e-4 scaled by total batch / 256, cosine schedule with 10 warm-up epochs out of 300 down to 2.5e-6, no gradient
    clipping.

    The student's mask ratio, feature-loss tokens and Smooth-L1 beta live in its `G2SDConfig`; the teacher's target
    layer in its `MAETeacher`.
    """

    learning_rate: float = field(
        default=1.5e-4, metadata={"help": "Base learning rate for a total batch of 256; see scale_lr_with_batch_size."}
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (0.95 in MAE and G2SD)."})
    min_learning_rate: float = field(
        default=2.5e-6, metadata={"help": "Where the cosine schedule ends (2.5e-6 in G2SD)."}
    )
    warmup_steps: float = field(
        default=10 / 300, metadata={"help": "Warm-up steps, or a fraction (< 1) of the steps."}
    )
    num_train_epochs: float = field(default=300.0, metadata={"help": "Training epochs (300 in G2SD)."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch."})


@dataclass
class MAEPretrainingArguments(GenericDistillationArguments):
    r"""
    `TrainingArguments` of MAE pre-training (of a teacher, `examples/run_mae_pretraining.py` with `RecipeTrainer`):
    the generic-distillation optimizer and schedule, which the release takes from MAE's pre-training (AdamW betas
    (0.9, 0.95), weight decay 0.05 on weights, base learning rate 1.5e-4 scaled by total batch / 256, cosine schedule
    with warm-up, no clipping). The model's mask ratio and `norm_pix_loss` live in its `ViTMAEConfig`.
    """


@dataclass
class SpecificDistillationArguments(RecipeArguments):
    r"""
    `TrainingArguments` with the defaults of G2SD's specific-distillation recipe for image classification (the
    release's `main_finetune_dis.py` and `SD.sh`): hard distillation with a distillation token, label smoothing 0.1,
    mixup 0.8 / cutmix 1.0, AdamW with weight decay 0.05, layer-wise learning-rate decay 0.75, base learning rate 1e-3
    scaled by total batch / 256, cosine schedule with 5 warm-up epochs out of 200 down to 1e-6, no gradient clipping.

    The loss is `L_SD = (L_task + beta * L_KD) / (1 + beta)`: with beta = 1 and hard distillation this is the
    official `(CE(cls_logits, y) + CE(distillation_logits, argmax teacher_logits)) / 2`.
    """

    distillation_type: str = field(
        default="hard",
        metadata={
            "help": "L_KD: 'hard' (CE to the teacher's arg-max, DeiT), 'soft' (T^2 KL at temperature T), 'nkd' "
            "(normalized KD), or 'none' (plain fine-tuning, no teacher).",
            "choices": list(DISTILLATION_TYPES),
        },
    )
    distillation_beta: float = field(default=1.0, metadata={"help": "beta, the weight of L_KD."})
    distillation_temperature: float = field(default=1.0, metadata={"help": "Temperature of 'soft' and 'nkd'."})
    nkd_gamma: float = field(default=1.0, metadata={"help": "gamma, the non-target weight of 'nkd'."})
    layer_decay: float = field(default=0.75, metadata={"help": "Layer-wise learning-rate decay (1.0 disables it)."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup alpha (0 disables mixup)."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix alpha (0 disables cutmix)."})
    label_smoothing_factor: float = field(default=0.1, metadata={"help": "Label smoothing of the task loss."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Base learning rate for a total batch of 256; see scale_lr_with_batch_size."}
    )
    warmup_steps: float = field(default=5 / 200, metadata={"help": "Warm-up steps, or a fraction (< 1) of the steps."})
    num_train_epochs: float = field(default=200.0, metadata={"help": "Training epochs (200 in G2SD)."})
    min_learning_rate: float = field(default=1e-6, metadata={"help": "Where the cosine schedule ends (1e-6 in G2SD)."})
    chain_checks: bool = field(
        default=True,
        metadata={
            "help": "Score the teacher and the student's starting point on the validation split before distilling (and "
            "a fine-tuning run after its first epoch), and warn when a stage is too weak for the next "
            "(g2sd_hf.learning_check). Costs one or two passes over the validation split."
        },
    )
    scratch_baseline: bool = field(
        default=False,
        metadata={
            "help": "After distilling, train the same student from a random initialization with the same recipe and "
            "epochs on the labeled images but no teacher (and no layer-wise lr decay), score it on the validation "
            "split (scratch_eval_*), "
            "and warn, naming the weak stage, when the distilled student ended below it. Doubles the training time "
            "of a small student; on by default in --recipe small-data. Needs a teacher and one evaluation set."
        },
    )

    def __post_init__(self):
        if self.distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, got {self.distillation_type!r}.")
        if self.distillation_beta < 0 or self.distillation_temperature <= 0:
            raise ValueError(
                "distillation_beta must be >= 0 and distillation_temperature > 0, got "
                f"{self.distillation_beta} and {self.distillation_temperature}."
            )
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay} (G2SD uses 0.75; 1 disables it).")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0 (0 disables them).")
        super().__post_init__()


@dataclass
class FineTuningArguments(SpecificDistillationArguments):
    r"""
    `TrainingArguments` of plain fine-tuning, without a teacher (`FineTuningTrainer`; the MAE teacher's own fine-tuning
    in `examples/run_finetune_teacher.py`): the specific-distillation recipe (the release's, MAE's fine-tuning) with
    the task loss only.
    """

    distillation_type: str = field(
        default="none", metadata={"help": "Always 'none': fine-tuning has no teacher (SpecificDistillationArguments)."}
    )

    def __post_init__(self):
        if self.distillation_type != "none":
            raise ValueError(
                f"Fine-tuning has no teacher, got distillation_type={self.distillation_type!r}: distill with "
                "SpecificDistillationArguments and SpecificDistillationTrainer (examples/run_specific.py)."
            )
        super().__post_init__()


@dataclass
class DenseDistillationArguments(RecipeArguments):
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


__all__ = [
    "DISTILLATION_TYPES",
    "DenseDistillationArguments",
    "FineTuningArguments",
    "GenericDistillationArguments",
    "MAEPretrainingArguments",
    "RecipeArguments",
    "SpecificDistillationArguments",
    "default_dataloader_workers",
]
