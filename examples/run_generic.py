#!/usr/bin/env python
"""G2SD generic distillation: a frozen MAE teacher (with its pre-training decoder) -> a small ViT student.

    accelerate launch examples/run_generic.py \\
        --teacher_name_or_path facebook/vit-mae-base --student_preset vit_small_patch16_dec256d4b \\
        --dataset_name imagenet-1k --output_dir g2sd-vit-small-gd \\
        --per_device_train_batch_size 256 --bf16 --do_train --do_eval

The paper's teacher is the MAE ViT-B pre-trained with the normalized-pixel loss, with its decoder
(`mae_pretrain_vit_base_full.pth` of the MAE release, converted with `python -m g2sd_hf.convert --kind mae-teacher`);
`facebook/vit-mae-base` is MAE's visualization checkpoint, trained without it, and a convenient default only.

Data: `--dataset_name` (a Hub data set, or `elpv`: the ELPV solar-cell images shipped in the `elpv-dataset` package) or
`--train_dir` (a local image folder). `--recipe small-data` suits a few thousand images. Arguments can also come from a single JSON or YAML file: `python examples/run_generic.py args.yaml`.

Data at scale: `--streaming --max_steps N` reads the training images as a stream (a Hub data set, a `--train_dir` of
WebDataset `.tar` shards written by `python -m g2sd_hf.shards`, or an image folder), each process its own shards,
resumable mid-stream; see docs/scale.md.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import set_seed

from g2sd_hf import (
    G2SDConfig,
    G2SDForGenericDistillation,
    GenericDistillationArguments,
    GenericDistillationTrainer,
    MAETeacher,
)
from g2sd_hf.data import image_processor
from g2sd_hf.scripts.arguments import DataArguments, MaskedImageAugmentationArguments, label_free_datasets
from g2sd_hf.scripts.run import (
    checkpoint_to_resume,
    finish_training_run,
    parse_arguments,
    parse_overrides,
    setup_logging,
    train_and_evaluate,
)
from g2sd_hf.streaming import StreamingArguments, check_streaming_arguments, collate_stream
from g2sd_hf.trainer import check_generic_distillation_pair


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    teacher_name_or_path: str = field(
        default="facebook/vit-mae-base",
        metadata={
            "help": "MAE teacher with its pre-training decoder (ViTMAEForPreTraining): Hub id or folder. The "
            "default, facebook/vit-mae-base, is MAE's visualization checkpoint (trained without the "
            "normalized-pixel loss); the release distills the norm_pix_loss MAE ViT-B, "
            "mae_pretrain_vit_base_full.pth, converted with `python -m g2sd_hf.convert --kind mae-teacher`."
        },
    )
    target_layer: int = field(default=4, metadata={"help": "Teacher decoder block whose features are distilled."})
    student_preset: str = field(
        default="vit_small_patch16_dec256d4b",
        metadata={"help": "Student architecture (see g2sd_hf.G2SD_PRESETS), unless --student_config_name is given."},
    )
    student_config_name: str | None = field(default=None, metadata={"help": "A G2SDConfig file or folder instead."})
    student_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this generic-distillation checkpoint instead of a new student."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Student config overrides, e.g. 'hidden_size=96,num_hidden_layers=6'."}
    )
    mask_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of patches masked: sets the student config's mask_ratio (default: its own, 0.75)."
        },
    )
    feature_loss_tokens: str | None = field(
        default=None,
        metadata={"help": "'all', 'masked' or 'visible': sets the student config's (default: its own, 'all')."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})
    model_revision: str = field(default="main", metadata={"help": "Teacher revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private teachers or data."})


def build_student(model_args: ModelArguments, teacher: MAETeacher) -> G2SDForGenericDistillation:
    """The student, made compatible with the teacher: same image and patch size, feature head to its width."""
    teacher_config = teacher.config
    compatible = {
        "image_size": teacher_config.image_size,
        "patch_size": teacher_config.patch_size,
        "num_channels": teacher_config.num_channels,
        "target_hidden_size": teacher.target_hidden_size,
    }
    # The student's config is the one home of the GD settings; the flags only set it when given.
    for name in ("mask_ratio", "feature_loss_tokens"):
        if getattr(model_args, name) is not None:
            compatible[name] = getattr(model_args, name)
    overrides = {**compatible, **parse_overrides(model_args.config_overrides, G2SDConfig)}
    if model_args.student_name_or_path is not None:
        return G2SDForGenericDistillation.from_pretrained(model_args.student_name_or_path, **overrides)
    if model_args.student_config_name is not None:
        config = G2SDConfig.from_pretrained(model_args.student_config_name, **overrides)
    else:
        config = G2SDConfig.from_preset(model_args.student_preset, **overrides)
    return G2SDForGenericDistillation(config)


def main(args: list[str] | None = None) -> dict:
    model_args, data_args, augmentation_args, streaming_args, training_args = parse_arguments(
        (
            ModelArguments,
            DataArguments,
            MaskedImageAugmentationArguments,
            StreamingArguments,
            GenericDistillationArguments,
        ),
        args,
    )
    setup_logging(training_args, logger)
    logger.info(f"Training arguments {training_args}")
    check_streaming_arguments(streaming_args, training_args, data_args)
    last_checkpoint = checkpoint_to_resume(training_args, model_args, data_args, augmentation_args, streaming_args)
    set_seed(training_args.seed)

    teacher = MAETeacher.from_pretrained(
        model_args.teacher_name_or_path,
        target_layer=model_args.target_layer,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
    )
    student = build_student(model_args, teacher)
    check_generic_distillation_pair(student, teacher)  # before the data pass, which decodes every image once

    image_size = student.config.processor_size
    # The student reads the teacher's pixels: its processor carries the teacher's normalization.
    processor = image_processor(image_size, teacher.image_mean, teacher.image_std, augmentation_args.eval_crop_ratio)
    train_dataset, eval_dataset, data_report = label_free_datasets(
        data_args,
        streaming_args,
        training_args,
        augmentation_args.train_transform(image_size, teacher.image_mean, teacher.image_std),
        augmentation_args.eval_transform(image_size, teacher.image_mean, teacher.image_std),
        model_args.cache_dir,
        model_args.token,
    )

    trainer = GenericDistillationTrainer(
        model=student,
        teacher=teacher,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=processor,
        data_collator=collate_stream if streaming_args.streaming else None,
    )

    metrics = train_and_evaluate(trainer, last_checkpoint, data_report)

    finish_training_run(trainer, model_args.teacher_name_or_path, data_args.source_name)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
