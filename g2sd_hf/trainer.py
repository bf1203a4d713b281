"""Trainers for G2SD's two stages, as `transformers.Trainer` subclasses.

Each trainer adds what distillation needs and nothing else: the teacher is a constructor argument, frozen, placed by
accelerate on every process without a gradient wrapper, and never saved with the student; each loss term is logged;
a non-finite loss stops training before the step's update, so the last checkpoint on disk stays good. Everything
else (gradient accumulation, mixed precision, gradient checkpointing, checkpoints and resuming, the Hub, multi-process
runs under `accelerate launch`) is the Trainer's own.
"""

import copy
import dataclasses
import os
import platform
import shutil
import tempfile
from collections import defaultdict

import datasets
import numpy as np
import torch
from transformers import (
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    ViTMAEForPreTraining,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .checkpoints import checkpoint_problem, reporting_full_disk
from .configuration_g2sd import to_pair
from .few_labels import UNLABELED, count_unlabeled, labeled_rows
from .hub import build_model_card
from .learning_check import (
    classification_evaluation_warnings,
    classification_training_warnings,
    fine_tuning_warnings,
    headline_accuracy,
    no_step_warning,
    regression_training_warnings,
    scratch_baseline_warnings,
    skill,
    skill_phrase,
    teacher_warnings,
    weak_teacher_warnings,
)
from .losses import (
    hard_distillation_loss,
    labeled_cross_entropy,
    nkd_loss,
    smooth_targets,
    soft_distillation_loss,
    soft_target_cross_entropy,
    specific_distillation_loss,
)
from .modeling_g2sd import G2SDForGenericDistillation
from .optimization import FINE_TUNING_NO_DECAY_NAMES, parameter_groups
from .recipes import SMALL_RUN_STEPS
from .streaming import STREAM_IMAGE_IDS, STREAM_SKIPPED_IMAGES
from .teacher import ClassificationTeacher, MAETeacher
from .training_args import (
    FineTuningArguments,
    GenericDistillationArguments,
    SpecificDistillationArguments,
    _value,
)


logger = logging.get_logger(__name__)


def hardware_description(num_processes: int, device: torch.device) -> str:
    """What a run ran on, for the model card: `"8 x NVIDIA H100 80GB HBM3"`, `"1 x CPU (AMD EPYC 9B14, 2 cores)"`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        lines = []
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as handle:
                lines = handle.read().splitlines()
        model = next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
            platform.processor() or platform.machine(),
        )
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        name = f"{device.type.upper()} ({model}, {cores} cores)" if device.type == "cpu" else device.type
    return f"{num_processes} x {name}"


# --------------------------------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------------------------------
class RecipeTrainer(Trainer):
    """A Trainer with the MAE/G2SD optimizer recipe: timm's weight-decay groups, optional layer-wise lr decay, and
    the learning rate scaled by the total batch size (`scale_lr_with_batch_size`).

    It also says when a run learned nothing: after `train()` (and `evaluate()`), `learning_warnings` lists what the
    checks of `g2sd_hf.learning_check` found (no step at all; a loss that never left chance or never decreased), and
    each is logged as a warning and written into the model card. Before training, a run of the release's recipe with
    few steps is advised to use the small-data recipe."""

    _no_decay_names: tuple[str, ...] = ()
    # The logged loss that must decrease for a run to have learned something (`None`: no such check).
    _progress_loss_key: str | None = "loss"
    _progress_loss_name = "The training loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._chain_warnings: list[str] = []
        # Files of the data left out (hidden, not images, unreadable), path -> reason: named on the model card.
        self.left_out_files: dict[str, str] = {}
        self._training_warnings: list[str] = []
        self._evaluation_warnings: list[str] = []
        self._evaluation_chain_warnings: list[str] = []
        # A streamed batch (streaming.collate_stream) names its images and counts those skipped before it.
        self.batch_image_ids: list[str] | None = None
        self._skipped_streamed_images = 0

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = dict(inputs)
        self.batch_image_ids = inputs.pop(STREAM_IMAGE_IDS, None)
        skipped = inputs.pop(STREAM_SKIPPED_IMAGES, None)
        if skipped is not None and self.model.training:
            self._skipped_streamed_images += int(skipped)
        return super()._prepare_inputs(inputs)

    @property
    def learning_warnings(self) -> list[str]:
        """What the checks found in the last training and evaluation (empty when the run learned): the learning checks,
        and the chain's (a teacher too weak to teach, a fine-tuned classifier too weak to be one)."""
        return (
            self._chain_warnings
            + self._training_warnings
            + self._evaluation_warnings
            + self._evaluation_chain_warnings
        )

    @property
    def total_train_batch_size(self) -> int:
        """Images per optimizer step, over every process and accumulation step."""
        return self._train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    @property
    def peak_learning_rate(self) -> float:
        """The learning rate after the linear scaling rule (`learning_rate * total batch / 256`) when enabled."""
        if not getattr(self.args, "scale_lr_with_batch_size", False):
            return self.args.learning_rate
        return self.args.learning_rate * self.total_train_batch_size / 256

    def _layer_decay(self) -> float | None:
        return None

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
            self.args, model
        )
        if {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys():
            # Optimizers that build their own parameter groups (GaLore, LOMO, ...): the Trainer's way, no recipe groups.
            logger.warning(
                f"{self.args.optim} builds its own parameter groups: the recipe's weight-decay and "
                "layer-decay groups are not applied."
            )
            return super().create_optimizer(model)
        groups = parameter_groups(
            model, self.peak_learning_rate, self.args.weight_decay, self._layer_decay(), self._no_decay_names
        )
        self.optimizer = optimizer_cls(groups, **{**optimizer_kwargs, "lr": self.peak_learning_rate})
        logger.info(f"Peak learning rate {self.peak_learning_rate:.3g} over {len(groups)} parameter groups.")
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        min_learning_rate = (
            (self.args.lr_scheduler_kwargs or {}).get("min_lr")
            if isinstance(self.args.lr_scheduler_kwargs, dict)
            else None
        )
        if min_learning_rate is not None and min_learning_rate >= self.peak_learning_rate:
            raise ValueError(
                f"The schedule would end at min_learning_rate={min_learning_rate:g}, above the peak learning rate "
                f"{self.peak_learning_rate:.3g} (learning_rate x total batch / 256 with scale_lr_with_batch_size): "
                "raise learning_rate, set scale_lr_with_batch_size false, or lower min_learning_rate."
            )
        if getattr(self.args, "recipe", None) == "release" and num_training_steps < SMALL_RUN_STEPS:
            logger.warning(
                f"{num_training_steps} optimizer steps with the release's recipe, which is made for 200-300 epochs of "
                f"ImageNet (hundreds of thousands of steps, peak learning rate here {self.peak_learning_rate:.3g} after "
                "the batch / 256 scaling, mixup/cutmix, RandAugment and random erasing when fine-tuning): on a small "
                "data set it may learn nothing. Use --recipe small-data (g2sd_hf.recipes) unless you mean it."
            )
        return super().create_scheduler(num_training_steps, optimizer)

    # -- did the run learn? -------------------------------------------------------------------------------------------
    def _learning_causes(self) -> str:
        causes = []
        if getattr(self.args, "recipe", None) == "release":
            causes.append(
                "a recipe too regularized for this many steps (the release's mixup/cutmix, RandAugment, random "
                "erasing and label smoothing are made for hundreds of epochs; --recipe small-data turns them off)"
            )
        scaled = (
            " after the batch-size scaling (learning_rate x total batch / 256)"
            if getattr(self.args, "scale_lr_with_batch_size", False)
            else ""
        )
        causes.append(f"a learning rate too low or too high{scaled}: peak {self.peak_learning_rate:.3g}")
        causes.append(f"too few steps ({self.state.global_step})")
        return "Likely causes: " + "; ".join(causes) + "."

    def _check_training(self) -> list[str]:
        warnings = no_step_warning(self.state.global_step)
        if not warnings and self._progress_loss_key is not None:
            warnings = regression_training_warnings(
                self.state.log_history, self._progress_loss_key, self._progress_loss_name
            )
        return warnings

    def _check_evaluation(self, metrics: dict, metric_key_prefix: str) -> list[str]:
        return []

    def _check_chain(self, metrics: dict, metric_key_prefix: str) -> list[str]:
        """After an evaluation of the evaluation set: is this stage too weak for the next one?"""
        return []

    def _report(self, warnings: list[str], label: str = "LEARNED NOTHING?") -> None:
        for warning in warnings:
            logger.warning(f"{label} {warning}")

    def score_classifier(self, predict, dataset=None) -> dict[str, float]:
        """Score `predict` (pixel values -> logits, e.g. the teacher, or the student before training) on `dataset`
        (the evaluation set by default) with `compute_metrics` (top-1 accuracy without it), over every process.
        Keys have no prefix."""
        dataloader = self.get_eval_dataloader(dataset)
        logits, labels = [], []
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with torch.no_grad(), self.autocast_smart_context_manager():
                batch_logits = predict(batch["pixel_values"]).float()
            batch_logits, batch_labels = self.accelerator.gather_for_metrics((batch_logits, batch["labels"]))
            logits.append(batch_logits.cpu().numpy())
            labels.append(batch_labels.cpu().numpy())
        logits, labels = np.concatenate(logits), np.concatenate(labels)
        if self.compute_metrics is None:
            return {"accuracy": float((logits.argmax(axis=-1) == labels).mean())}
        return dict(self.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels)))

    @property
    def _single_eval_dataset(self) -> bool:
        """One evaluation set (not none, not a dict of several): what the chain checks score on."""
        return self.eval_dataset is not None and not isinstance(self.eval_dataset, dict)

    def _score_model(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return self.score_classifier(lambda pixel_values: model(pixel_values=pixel_values).logits)
        finally:
            model.train(was_training)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, complete or absent: a save that fails (a full disk, an interrupt) removes the
        checkpoint folder it was writing, unless that folder is complete; one a killed process left is skipped by
        automatic resume (`checkpoints.last_complete_checkpoint`)."""
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        existed = os.path.exists(folder)
        try:
            with reporting_full_disk(folder):
                super()._save_checkpoint(model, trial)
        except BaseException as error:
            if not existed and self.args.should_save and os.path.isdir(folder) and checkpoint_problem(folder):
                shutil.rmtree(folder, ignore_errors=True)
                logger.warning(f"Removed the incomplete checkpoint {folder}: its save failed ({error}).")
            raise

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with reporting_full_disk(output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume the model's weights through `from_pretrained`, and refuse a checkpoint that does not fill the model.

        transformers 5 saves checkpoints under the models' original key names (`vit.encoder.layer.0.attention...`)
        and renames them when `from_pretrained` loads them; `Trainer._load_from_checkpoint` loads the file with a
        non-strict `load_state_dict` that skips the renaming, so a resumed ViT/ViT-MAE went on from random
        transformer blocks with only a logged warning. Loading through the model class applies the renaming.
        """
        model = self.model if model is None else model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if (
            not isinstance(model, PreTrainedModel)
            or not os.path.isfile(weights)
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded, info = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype, output_loading_info=True)
        problems = {
            kind: keys for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if (keys := info.get(kind))
        }
        if problems:
            raise ValueError(
                f"The checkpoint {resume_from_checkpoint} does not hold this model's weights ({problems}). Resume from a "
                "checkpoint of the same run (same model and configuration), or start a new run in another output_dir."
            )
        model.load_state_dict(loaded.state_dict(), strict=True)

    def _get_dataloader(
        self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None
    ):
        # `dataloader_drop_last` is for training (every step a full batch); evaluation scores every image.
        drop_last = self.args.dataloader_drop_last
        if not is_training:
            self.args.dataloader_drop_last = False
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.args.dataloader_drop_last = drop_last

    def _check_one_batch(self) -> None:
        """Refuse a run whose training set holds no full batch: with `dataloader_drop_last` it would run no step."""
        dataset = self.train_dataset
        if dataset is None or not self.args.dataloader_drop_last or not hasattr(dataset, "__len__"):
            return
        batch = self._train_batch_size * self.args.world_size
        if len(dataset) < batch:
            raise ValueError(
                f"The training set holds {len(dataset)} images, fewer than one batch ({self._train_batch_size} per "
                f"process x {self.args.world_size} processes = {batch}): with dataloader_drop_last every batch is "
                "dropped and the run would train nothing. Lower --per_device_train_batch_size, add images, or set "
                "--dataloader_drop_last false."
            )

    def train(self, *args, **kwargs):
        self._check_one_batch()
        result = super().train(*args, **kwargs)
        if isinstance(self.train_dataset, datasets.IterableDataset):
            # The images a stream skipped (unreadable), over every process, as the folder path counts them.
            skipped = torch.tensor(self._skipped_streamed_images, device=self.args.device)
            result.metrics["skipped_train_images"] = int(self.accelerator.reduce(skipped, reduction="sum"))
            if result.metrics["skipped_train_images"]:
                logger.warning(
                    f"{result.metrics['skipped_train_images']} streamed training image(s) could not be read and were "
                    "skipped, each named in a warning above."
                )
        self._training_warnings = self._check_training()
        self._report(self._training_warnings)
        return result

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        self._evaluation_warnings = self._check_evaluation(metrics, metric_key_prefix)
        self._report(self._evaluation_warnings)
        # The chain's scores before training were taken on the evaluation set: compare only with an evaluation of it.
        same_set = eval_dataset is None or eval_dataset is self.eval_dataset
        self._evaluation_chain_warnings = self._check_chain(metrics, metric_key_prefix) if same_set else []
        self._report(self._evaluation_chain_warnings, "WEAK STAGE?")
        return metrics


class DistillationTrainer(RecipeTrainer):
    """What both G2SD trainers share: the teacher's placement, term logging, the loss guard, the model card."""

    # compute_loss returns a per-batch mean: the Trainer divides it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False
    model_card_stage = "specific-distillation"

    def __init__(self, model, teacher, args, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_name_or_path = getattr(getattr(teacher, "model", None), "name_or_path", None) or None
        if teacher is not None and self.args.bf16:
            # A frozen teacher in bf16 weights runs faster and in half the memory. (With fp16 it keeps float32
            # weights under autocast: large ViTs overflow in pure fp16.)
            teacher = teacher.to(torch.bfloat16)
        self.teacher = teacher
        self._teacher_placed = False
        self._term_history: dict[str, list[torch.Tensor]] = defaultdict(list)

    # -- teacher ------------------------------------------------------------------------------------------------------
    def _run_teacher(self, *args) -> torch.Tensor:
        """The teacher's output, placed by accelerate on this process's device the first time it is needed."""
        if not self._teacher_placed:
            # Placed after the student, so that the Trainer still prepares the student itself for a standalone
            # evaluate(); evaluation_mode: never wrapped for gradients (no DDP). FSDP leaves evaluation models
            # where they are, hence the explicit move.
            self.teacher = self.accelerator.prepare_model(self.teacher, evaluation_mode=True).to(self.args.device)
            self._teacher_placed = True
        return self.teacher(*args)

    @staticmethod
    def _accept_student_normalization(teacher, processing_class) -> None:
        mean = getattr(processing_class, "image_mean", None)
        std = getattr(processing_class, "image_std", None)
        if processing_class is None or mean is None or std is None:
            logger.info(
                "No image processor given: the student's pixels are taken to be normalized like the teacher's "
                f"(mean={teacher.image_mean}, std={teacher.image_std})."
            )
            return
        if getattr(processing_class, "do_normalize", True) is False:
            raise ValueError(
                "The image processor does not normalize (do_normalize=False) but the teacher expects normalized "
                "pixels: enable normalization in the processor."
            )
        teacher.accept_inputs_normalized_with(mean, std)

    # -- loss terms ---------------------------------------------------------------------------------------------------
    def _check_and_record(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Average the loss and its terms over processes, stop on a non-finite one, and keep the terms for the log."""
        names = ["loss", *terms]
        values = torch.stack([value.detach().float().reshape(()) for value in (loss, *terms.values())])
        values = self.accelerator.gather(values[None]).reshape(-1, len(names))  # (processes, terms)
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = [f"{name}={values[:, i].tolist()}" for i, name in enumerate(names) if not bool(finite[:, i].all())]
            raise FloatingPointError(
                f"Non-finite loss at training step {self.state.global_step + 1}: {'; '.join(bad)} (one value per "
                f"process). Training stopped before this step's update, so the last checkpoint in "
                f"{self.args.output_dir} is intact. Lower the learning rate, set max_grad_norm, or use bf16 instead "
                "of fp16, then resume with resume_from_checkpoint."
            )
        for i, name in enumerate(names[1:], start=1):
            self._term_history[name].append(values[:, i].mean())

    # -- model card ---------------------------------------------------------------------------------------------------
    def _card_hyperparameters(self) -> dict:
        args = self.args
        values = {
            "peak learning rate": self.peak_learning_rate,
            "total batch size": self.total_train_batch_size,
            "epochs" if args.max_steps <= 0 else "steps": args.num_train_epochs
            if args.max_steps <= 0
            else args.max_steps,
            "optimizer": f"{_value(args.optim)} (betas {args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
            "schedule": f"{_value(args.lr_scheduler_type)}, warm-up {args.warmup_steps:.3g}"
            + (" of the steps" if 0 < args.warmup_steps < 1 else " steps")
            + (
                f", down to {args.lr_scheduler_kwargs['min_lr']:g}"
                if isinstance(args.lr_scheduler_kwargs, dict) and "min_lr" in args.lr_scheduler_kwargs
                else ""
            ),
            "gradient clipping": f"max norm {args.max_grad_norm:g}"
            if args.max_grad_norm and args.max_grad_norm > 0
            else "none",
            "recipe": getattr(args, "recipe", None) or "-",
            "mixed precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            "seed": args.seed,
        }
        for split, dataset in (("training", self.train_dataset), ("validation", self.eval_dataset)):
            if dataset is not None and hasattr(dataset, "__len__"):
                values[f"{split} images"] = len(dataset)
        if self.left_out_files:
            names = [os.path.basename(path) for path in self.left_out_files]
            values["files left out"] = (
                f"{len(names)} (each with the reason in left_out.json): {', '.join(names[:5])}"
                + (", ..." if len(names) > 5 else "")
            )
        values["hardware"] = hardware_description(self.accelerator.num_processes, self.args.device)
        return values

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
    ) -> None:
        """Write the G2SD model card (`README.md`) into `output_dir`; `push_to_hub` calls this before uploading."""
        if not self.is_world_process_zero():
            return
        metrics = {}
        for entry in self.state.log_history:
            metrics.update({key: value for key, value in entry.items() if key.startswith("eval_")})
        card = build_model_card(
            self.accelerator.unwrap_model(self.model),
            stage=self.model_card_stage,
            dataset=dataset if isinstance(dataset, str) else (dataset or ["unknown"])[0],
            teacher=finetuned_from or self.teacher_name_or_path,
            metrics=metrics,
            hyperparameters=self._card_hyperparameters(),
            repo_id=self.args.hub_model_id,
            model_name=model_name,
            trainer_class=type(self).__name__,
            license=license or "apache-2.0",
            tags=[tags] if isinstance(tags, str) else tags,
            warnings=self.learning_warnings,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        is_eval = any(key.startswith("eval_") for key in logs)
        if not is_eval and self._term_history:
            for name, values in self._term_history.items():
                logs[name] = round(torch.stack(values).mean().item(), 6)
            self._term_history.clear()
        super().log(logs, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Generic distillation
# --------------------------------------------------------------------------------------------------------------------
class GenericDistillationTrainer(DistillationTrainer):
    r"""
    Trainer for G2SD's generic distillation: a `G2SDForGenericDistillation` student learns to predict the normalized
    decoder features of a frozen MAE teacher on masked images (Smooth-L1, paper's L_GD).

    The masking noise of each sample is drawn from a generator seeded with `(seed, step)`, so the masks, and hence the
    losses, are the same whether a global batch runs on one process or several, with or without gradient
    accumulation, and after resuming. Teacher and student get the same noise, hence the same mask.

    Logged terms: `masked_token_loss` and `visible_token_loss` (the loss restricted to those patches).

    Args:
        model (`G2SDForGenericDistillation`): The student.
        teacher (`MAETeacher` or `ViTMAEForPreTraining`): The teacher (a model is wrapped with target layer 4).
        args (`GenericDistillationArguments` or `TrainingArguments`, *optional*): The training arguments.
        **kwargs: The Trainer's other arguments. `processing_class` (an image processor) says how the student's
            pixels are normalized; when it differs from the teacher's normalization, the teacher's inputs are
            converted.

    Example:

    ```python
    >>> teacher = MAETeacher.from_pretrained("facebook/vit-mae-base", target_layer=4)
    >>> student = G2SDForGenericDistillation(G2SDConfig.from_preset("vit_small_patch16"))
    >>> trainer = GenericDistillationTrainer(
    ...     model=student, teacher=teacher, args=GenericDistillationArguments("g2sd-small-gd"), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```
    """

    model_card_stage = "generic-distillation"
    _progress_loss_name = "L_GD, the generic-distillation loss,"

    def __init__(
        self, model: G2SDForGenericDistillation, teacher: MAETeacher | ViTMAEForPreTraining, args=None, **kwargs
    ):
        if not isinstance(model, G2SDForGenericDistillation):
            raise TypeError(f"The student must be a G2SDForGenericDistillation, got {type(model).__name__}.")
        if isinstance(teacher, PreTrainedModel):
            teacher = MAETeacher(teacher)
        if not isinstance(teacher, MAETeacher):
            raise TypeError(
                f"The teacher must be an MAETeacher or a ViTMAEForPreTraining, got {type(teacher).__name__}."
            )
        check_generic_distillation_pair(model, teacher)
        self._accept_student_normalization(teacher, kwargs.get("processing_class"))
        if args is None:
            args = GenericDistillationArguments(output_dir="g2sd-generic-distillation")
        super().__init__(model, teacher, args, **kwargs)
        self._noise_step, self._noise_micro_step, self._eval_batches_seen = -1, 0, 0

    def _masking_noise(self, batch_size: int, device: torch.device, training: bool) -> torch.Tensor:
        """Noise `(batch, num_patches)` for this process's share of the global batch, seeded by `(seed, step)`."""
        world_size, rank = self.accelerator.num_processes, self.accelerator.process_index
        if training:
            micro_steps = self.args.gradient_accumulation_steps
            if self.state.global_step != self._noise_step:
                self._noise_step, self._noise_micro_step = self.state.global_step, 0
            index, micro_step = 2 * self.state.global_step, self._noise_micro_step % micro_steps
            self._noise_micro_step += 1
            per_device = self._train_batch_size
        else:
            index, micro_step, micro_steps = 2 * self._eval_batches_seen + 1, 0, 1
            self._eval_batches_seen += 1
            per_device = self.args.eval_batch_size
        generator = torch.Generator().manual_seed((self.args.seed * 1_000_003 + index) % 2**63)
        num_patches = self.accelerator.unwrap_model(self.model).config.num_patches
        # Rows in global-batch order: micro-step-major, then process, as accelerate shards the batches.
        global_noise = torch.rand(micro_steps * world_size * per_device, num_patches, generator=generator)
        start = (micro_step * world_size + rank) * per_device
        return global_noise[start : start + batch_size].to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixel_values = inputs["pixel_values"]
        noise = inputs.get("noise")
        if noise is None:
            noise = self._masking_noise(pixel_values.shape[0], pixel_values.device, model.training)
        # The student's config holds the mask ratio; the teacher masks with it, from the same noise: the same patches.
        mask_ratio = self.accelerator.unwrap_model(model).config.mask_ratio
        teacher_targets = self._run_teacher(pixel_values, noise, mask_ratio)  # (batch, 1 + num_patches, teacher width)
        # L_GD and its logged terms come from the model (losses.generic_distillation_loss), the one place it is computed.
        outputs = model(pixel_values=pixel_values, noise=noise, teacher_targets=teacher_targets)
        # One value per GPU under nn.DataParallel (several GPUs without `accelerate launch`): their mean.
        loss = outputs.loss.mean()
        if model.training:
            self._check_and_record(
                loss,
                {
                    "masked_token_loss": outputs.masked_token_loss.mean(),
                    "visible_token_loss": outputs.visible_token_loss.mean(),
                },
            )
        return (loss, outputs) if return_outputs else loss

    def _card_hyperparameters(self) -> dict:
        config = self.accelerator.unwrap_model(self.model).config
        return {
            **super()._card_hyperparameters(),
            "mask ratio": config.mask_ratio,
            "teacher decoder block distilled": self.teacher.target_layer,
            "feature loss": f"Smooth-L1 (beta {config.feature_loss_beta}) on {config.feature_loss_tokens} tokens",
        }

    def evaluate(self, *args, **kwargs):
        self._eval_batches_seen = 0  # the same masks at every evaluation
        return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def check_generic_distillation_pair(student: G2SDForGenericDistillation, teacher: MAETeacher) -> None:
    """Refuse a student/teacher pair that cannot be distilled, with the fix in the message."""
    student_config, teacher_config = student.config, teacher.config
    if (to_pair(student_config.image_size), to_pair(student_config.patch_size)) != (
        to_pair(teacher_config.image_size),
        to_pair(teacher_config.patch_size),
    ):
        raise ValueError(
            f"Student and teacher see different patch grids: student image_size={student_config.image_size}, "
            f"patch_size={student_config.patch_size}; teacher image_size={teacher_config.image_size}, "
            f"patch_size={teacher_config.patch_size}. Both read the same pixels and share one mask: build the student "
            "with the teacher's image_size and patch_size."
        )
    if student_config.num_channels != teacher_config.num_channels:
        raise ValueError(
            f"Student has {student_config.num_channels} input channels, the teacher {teacher_config.num_channels}: "
            "set num_channels in the student config to the teacher's."
        )
    if student_config.target_hidden_size != teacher.target_hidden_size:
        raise ValueError(
            f"The student's feature head predicts {student_config.target_hidden_size}-d features but the teacher's "
            f"decoder is {teacher.target_hidden_size}-d: build the student with "
            f"target_hidden_size={teacher.target_hidden_size}."
        )


# --------------------------------------------------------------------------------------------------------------------
# Specific distillation
# --------------------------------------------------------------------------------------------------------------------
class SpecificDistillationTrainer(DistillationTrainer):
    r"""
    Trainer for G2SD's specific distillation on image classification: the student classifier (usually a
    `G2SDForImageClassification` initialized from a generic-distillation checkpoint) learns the task from the labels
    and from a frozen task-fine-tuned teacher: `L_SD = (L_task + beta * L_KD) / (1 + beta)`.

    - `L_task`: soft-target cross-entropy of the classification head (`cls_logits`) with label smoothing, on
      mixup/cutmix batches when enabled.
    - `L_KD`: on the distillation head (`distillation_logits`) when the student has a distillation token, else on the
      classification head: `hard`, `soft` or `nkd` (see `SpecificDistillationArguments`). The teacher sees the same
      (mixed) images. Without a teacher (`distillation_type="none"`), both heads learn the task loss.
    - Layer-wise learning-rate decay over the encoder; no weight decay on biases, norms, position embeddings and tokens.
    - Unlabeled images (`label == few_labels.UNLABELED` in the training set, e.g. from `few_labels.with_unlabeled`):
      `L_KD` on every image, `L_task` averaged over the labeled images of each batch only
      (`losses.labeled_cross_entropy`; zero for a batch without any). Needs a teacher, and no mixup/cutmix.

    Logged terms: `task_loss` and `distillation_loss`, and `labeled_share` (the labeled fraction of the batches) with
    unlabeled images. Evaluation reports the cross-entropy of `logits` (the average of
    the two heads); pass `compute_metrics` for accuracy.

    Args:
        model (`G2SDForImageClassification`, or any image classifier returning `logits`): The student.
        teacher (`ClassificationTeacher` or an image-classification `PreTrainedModel`, *optional*): Required unless
            `distillation_type="none"`.
        args (`SpecificDistillationArguments`, *optional*): The training arguments.
        **kwargs: The Trainer's other arguments. `processing_class` (an image processor) says how the student's
            pixels are normalized.

    Example:

    ```python
    >>> student = G2SDForImageClassification.from_pretrained("g2sd-small-gd", num_labels=1000, use_distillation_token=True)
    >>> teacher = ClassificationTeacher.from_pretrained("path/to/fine-tuned-mae-vit-base")
    >>> trainer = SpecificDistillationTrainer(
    ...     model=student, teacher=teacher, args=SpecificDistillationArguments("g2sd-small-sd"), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```
    """

    _no_decay_names = FINE_TUNING_NO_DECAY_NAMES
    _progress_loss_key = None  # the task loss is checked against the chance level instead

    def __init__(
        self,
        model: PreTrainedModel,
        teacher: ClassificationTeacher | PreTrainedModel | None = None,
        args=None,
        **kwargs,
    ):
        if args is None:
            args = SpecificDistillationArguments(output_dir="g2sd-specific-distillation")
        distillation_type = getattr(args, "distillation_type", "none")
        if isinstance(teacher, PreTrainedModel):
            teacher = ClassificationTeacher(teacher)
        if teacher is None and distillation_type != "none":
            raise ValueError(
                f"distillation_type={distillation_type!r} needs a teacher: pass teacher=..., or set "
                "distillation_type='none' for plain fine-tuning."
            )
        if teacher is not None:
            if not isinstance(teacher, ClassificationTeacher):
                raise TypeError(
                    f"The teacher must be a ClassificationTeacher or a PreTrainedModel, got {type(teacher).__name__}."
                )
            check_specific_distillation_pair(model, teacher)
            self._accept_student_normalization(teacher, kwargs.get("processing_class"))
        # Unlabeled images (`label == few_labels.UNLABELED`) learn from the teacher alone: refused without one, and
        # with mixup/cutmix, which would mix an unlabeled image's missing label into a labeled one's.
        self.num_unlabeled_images = count_unlabeled(kwargs.get("train_dataset"))
        if self.num_unlabeled_images and (teacher is None or distillation_type == "none"):
            raise ValueError(
                f"The training set holds {self.num_unlabeled_images} unlabeled images, and only the teacher can teach "
                "from them: give a teacher (--teacher_name_or_path, with a distillation_type other than 'none'), or "
                "train on the labeled images alone (no --unlabeled_train_dir / --unlabeled_dataset_name; a "
                "--label_fraction below 1 then simply leaves the other images out of fine-tuning)."
            )
        super().__init__(model, teacher if distillation_type != "none" else None, args, **kwargs)
        self._batch_mix = self._make_batch_mix(model.config.num_labels)
        if self.num_unlabeled_images and self._batch_mix is not None:
            raise ValueError(
                f"mixup/cutmix (alpha {getattr(args, 'mixup_alpha', 0)} / {getattr(args, 'cutmix_alpha', 0)}) cannot "
                "mix unlabeled images with labeled ones: set --mixup_alpha 0 --cutmix_alpha 0 (as --recipe "
                "small-data does) when training with unlabeled images."
            )
        # The teacher's and the student's starting scores on the validation split (`_check_teacher`), and the scratch
        # baseline's (`train_scratch_baseline`).
        self.teacher_metrics: dict[str, float] = {}
        self.scratch_metrics: dict[str, float] = {}

    @property
    def model_card_stage(self) -> str:
        return "specific-distillation" if self.teacher is not None else "fine-tuning"

    def _layer_decay(self) -> float | None:
        return getattr(self.args, "layer_decay", None)

    @property
    def _num_labels(self) -> int:
        return self.accelerator.unwrap_model(self.model).config.num_labels

    def _check_training(self) -> list[str]:
        warnings = super()._check_training()
        if not warnings:
            warnings = classification_training_warnings(
                self.state.log_history, self._num_labels, "task_loss", self._learning_causes()
            )
        return warnings

    def _check_evaluation(self, metrics: dict, metric_key_prefix: str) -> list[str]:
        return classification_evaluation_warnings(
            metrics, self._num_labels, f"{metric_key_prefix}_", self._learning_causes()
        )

    def _check_chain(self, metrics: dict, metric_key_prefix: str) -> list[str]:
        prefix = f"{metric_key_prefix}_"
        warnings = weak_teacher_warnings(metrics, self.teacher_metrics, prefix)
        if self.scratch_metrics:
            student_checkpoint = self.accelerator.unwrap_model(self.model).name_or_path or None  # "": built new
            warnings += scratch_baseline_warnings(
                metrics, self.teacher_metrics, self.scratch_metrics, len(self.eval_dataset), student_checkpoint, prefix
            )
        return warnings

    # -- the chain's checks -------------------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        chain = self.teacher is not None and self._single_eval_dataset
        if chain and getattr(self.args, "chain_checks", True):
            self._check_teacher()
        result = super().train(*args, **kwargs)
        if chain and getattr(self.args, "scratch_baseline", False) and self.state.global_step > 0:
            self.scratch_metrics = self.train_scratch_baseline()
        result.metrics.update({**self.teacher_metrics, **self.scratch_metrics})
        if self.num_unlabeled_images:
            result.metrics["train_unlabeled_images"] = self.num_unlabeled_images
        return result

    def _check_teacher(self) -> None:
        """Score the teacher and the student as it starts on the validation split (`teacher_metrics`, logged, and in
        the training metrics), and warn when the teacher is too weak to teach (`learning_check.teacher_warnings`)."""
        teacher = self.score_classifier(self._run_teacher)
        initial = self._score_model(self.model)
        self.teacher_metrics = {
            **{f"teacher_eval_{key}": value for key, value in teacher.items()},
            **{f"initial_eval_{key}": value for key, value in initial.items()},
        }
        shown = [
            f"{who} {skill_phrase(*found, self._num_labels)}"
            for who, prefix in (("teacher", "teacher_eval_"), ("student before training", "initial_eval_"))
            if (found := headline_accuracy(self.teacher_metrics, prefix)) is not None
        ]
        logger.info(f"On the validation split before distilling: {'; '.join(shown)}.")
        self._chain_warnings = teacher_warnings(self.teacher_metrics, self._num_labels)
        self._report(self._chain_warnings, "WEAK STAGE?")

    def train_scratch_baseline(self) -> dict[str, float]:
        """Train the same student from a random initialization (seeded with `args.seed`) with the same recipe and
        epochs on the labeled training images, without a teacher and without layer-wise lr decay (nothing pre-trained
        to keep), and score it on the validation split. Returns its scores as `scratch_eval_*`, which evaluation compares the distilled student with
        (`learning_check.scratch_baseline_warnings`). Nothing of the baseline is saved."""
        student = self.accelerator.unwrap_model(self.model)
        logger.info(
            "Scratch baseline: the same student from a random initialization, the same recipe on the labeled images, "
            "without a teacher."
        )
        # The Trainer makes its output_dir at once: the baseline's is a temporary one, outside the run's folder.
        with tempfile.TemporaryDirectory(prefix="g2sd-scratch-baseline-") as output_dir:
            args = dataclasses.replace(
                self.args,
                output_dir=output_dir,
                distillation_type="none",
                layer_decay=1.0,
                scratch_baseline=False,
                chain_checks=False,
                eval_strategy="no",
                save_strategy="no",
                load_best_model_at_end=False,
                push_to_hub=False,
                report_to="none",
            )
            set_seed(args.seed)
            baseline = SpecificDistillationTrainer(
                model=type(student)(copy.deepcopy(student.config)),
                args=args,
                train_dataset=labeled_rows(self.train_dataset) if self.num_unlabeled_images else self.train_dataset,
                eval_dataset=self.eval_dataset,
                data_collator=self.data_collator,
                processing_class=self.processing_class,
                compute_metrics=self.compute_metrics,
            )
            baseline.train()
        scores = {f"scratch_eval_{key}": value for key, value in baseline._score_model(baseline.model).items()}
        if (found := headline_accuracy(scores, "scratch_eval_")) is not None:
            logger.info(
                f"Scratch baseline after {baseline.state.global_step} steps, on the validation split: "
                f"{skill_phrase(*found, self._num_labels)}."
            )
        return scores

    def _card_hyperparameters(self) -> dict:
        args = self.args
        values = {**super()._card_hyperparameters(), "layer-wise lr decay": getattr(args, "layer_decay", None)}
        if self.teacher is not None:
            values["distillation"] = (
                f"{args.distillation_type}, beta {args.distillation_beta}, temperature {args.distillation_temperature}"
            )
        if self.num_unlabeled_images:
            labeled = len(self.train_dataset) - self.num_unlabeled_images
            values["labeled / unlabeled training images"] = (
                f"{labeled} / {self.num_unlabeled_images} (task loss on the labeled, distillation on all)"
            )
        values["label smoothing"] = args.label_smoothing_factor
        values["mixup / cutmix alpha"] = f"{getattr(args, 'mixup_alpha', 0)} / {getattr(args, 'cutmix_alpha', 0)}"
        for row, scores, prefix in (
            ("teacher on the validation split", self.teacher_metrics, "teacher_eval_"),
            ("scratch baseline on the validation split", self.scratch_metrics, "scratch_eval_"),
        ):
            if (found := headline_accuracy(scores, prefix)) is not None:
                values[row] = skill_phrase(*found, self._num_labels)
        return values

    def _make_batch_mix(self, num_labels: int):
        from torchvision.transforms import v2

        mixes = []
        if getattr(self.args, "mixup_alpha", 0) > 0:
            mixes.append(v2.MixUp(alpha=self.args.mixup_alpha, num_classes=num_labels))
        if getattr(self.args, "cutmix_alpha", 0) > 0:
            mixes.append(v2.CutMix(alpha=self.args.cutmix_alpha, num_classes=num_labels))
        if not mixes:
            return None
        return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)  # timm's default: either, with p = 0.5

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            # Evaluation: the cross-entropy of the prediction (the two heads' average).
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        # With unlabeled images in the training set (no mixing then): which rows have a label.
        labeled = labels != UNLABELED if self.num_unlabeled_images else None
        if self._batch_mix is not None and labels.ndim == 1:
            pixel_values, labels = self._batch_mix(pixel_values, labels)  # labels: (batch, num_labels) probabilities
        outputs = model(pixel_values=pixel_values)
        num_labels = outputs.logits.shape[-1]
        cls_logits = getattr(outputs, "cls_logits", None)
        cls_logits = outputs.logits if cls_logits is None else cls_logits
        smoothing = self.args.label_smoothing_factor
        if labeled is None:
            targets = smooth_targets(labels, num_labels, smoothing)
            task_loss = soft_target_cross_entropy(cls_logits, targets)
        else:
            task_loss = labeled_cross_entropy(cls_logits, labels, labeled, smoothing)
        distillation_logits = getattr(outputs, "distillation_logits", None)
        terms = {"task_loss": task_loss}
        loss = task_loss
        if self.teacher is not None:
            teacher_logits = self._run_teacher(pixel_values)
            student_logits = cls_logits if distillation_logits is None else distillation_logits
            if labeled is not None:
                # NKD's target class: the label where there is one, the teacher's class elsewhere.
                labels = torch.where(labeled, labels, teacher_logits.argmax(dim=-1))
            distillation_loss = self._distillation_loss(student_logits, teacher_logits, labels)
            terms["distillation_loss"] = distillation_loss
            if labeled is not None:
                terms["labeled_share"] = labeled.float().mean()
            loss = specific_distillation_loss(task_loss, distillation_loss, self.args.distillation_beta)
        elif distillation_logits is not None:
            # Without a teacher both heads learn the task: the prediction averages them.
            loss = (task_loss + soft_target_cross_entropy(distillation_logits, targets)) / 2
        self._check_and_record(loss, terms)
        return (loss, outputs) if return_outputs else loss

    def _distillation_loss(self, student_logits, teacher_logits, labels):
        kind = self.args.distillation_type
        if kind == "hard":
            return hard_distillation_loss(student_logits, teacher_logits)
        if kind == "soft":
            return soft_distillation_loss(student_logits, teacher_logits, self.args.distillation_temperature)
        return nkd_loss(
            student_logits, teacher_logits, labels, self.args.distillation_temperature, self.args.nkd_gamma
        )


class FineTuningTrainer(SpecificDistillationTrainer):
    r"""
    Plain fine-tuning of an image classifier with the release's fine-tuning recipe and no teacher: the task loss
    (soft-target cross-entropy with label smoothing, on mixup/cutmix batches), layer-wise learning-rate decay; a
    student with a distillation token trains both heads on the task. How G2SD's task teacher is made from an MAE.

    Example:

    ```python
    >>> model = classifier_from_mae(ViTMAEModel.from_pretrained("facebook/vit-mae-base"), num_labels=10)
    >>> trainer = FineTuningTrainer(model=model, args=FineTuningArguments("mae-base-ft"), train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    def __init__(self, model: PreTrainedModel, args=None, **kwargs):
        if args is None:
            args = FineTuningArguments(output_dir="fine-tuning")
        super().__init__(model, teacher=None, args=args, **kwargs)
        # The validation scores after the first epoch (`_FirstEpochScore`), for `learning_check.fine_tuning_warnings`.
        self.first_epoch_metrics: dict[str, float] = {}
        if self._single_eval_dataset and getattr(self.args, "chain_checks", True):
            self.add_callback(_FirstEpochScore(self))

    def _check_chain(self, metrics: dict, metric_key_prefix: str) -> list[str]:
        """How far above chance the classifier got (`{prefix}_skill`, logged) and, after training, whether it learned
        less than its first epoch suggests (`learning_check.fine_tuning_warnings`)."""
        prefix = f"{metric_key_prefix}_"
        found = headline_accuracy(metrics, prefix)
        if found is None:
            return []
        metrics[f"{prefix}skill"] = skill(found[1], self._num_labels)
        logger.info(f"The classifier's {skill_phrase(*found, self._num_labels)}.")
        trained = self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps
        # A classifier at chance has been told so (`_check_evaluation`); "too weak to teach" would only repeat it.
        if not trained or self._evaluation_warnings or not getattr(self.args, "chain_checks", True):
            return []
        first = {f"{prefix}{key}": value for key, value in self.first_epoch_metrics.items()}
        return fine_tuning_warnings(metrics, first, self._num_labels, prefix)


class _FirstEpochScore(TrainerCallback):
    """Scores the model on the validation split at the end of the first epoch of a longer run (every process takes
    part; nothing is logged to the Trainer's history)."""

    def __init__(self, trainer: FineTuningTrainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.trainer.first_epoch_metrics and state.num_train_epochs > 1 and state.global_step < state.max_steps:
            self.trainer.first_epoch_metrics = self.trainer._score_model(self.trainer.model_wrapped)
            found = headline_accuracy(self.trainer.first_epoch_metrics, "")
            if found is not None:
                logger.info(f"After the first epoch: validation {found[0]} {found[1]:.3f}.")


def check_specific_distillation_pair(student: PreTrainedModel, teacher: ClassificationTeacher) -> None:
    """Refuse a student/teacher pair that cannot be distilled, with the fix in the message; put the teacher's classes
    in the student's order (matched by name)."""
    teacher.align_labels(student.config.id2label)
    student_size = to_pair(student.config.image_size)
    if student_size != teacher.image_size:
        raise ValueError(
            f"Student image_size {student_size} differs from the teacher's {teacher.image_size}: both read the same "
            "pixels. Use one input resolution for both."
        )


__all__ = [
    "DistillationTrainer",
    "FineTuningTrainer",
    "GenericDistillationTrainer",
    "RecipeTrainer",
    "SpecificDistillationTrainer",
    "check_generic_distillation_pair",
    "check_specific_distillation_pair",
]
