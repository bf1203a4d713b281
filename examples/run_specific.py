#!/usr/bin/env python
"""G2SD specific distillation for image classification: a student (from generic distillation) + a fine-tuned teacher.

    accelerate launch examples/run_specific.py \\
        --student_name_or_path g2sd-vit-small-gd --teacher_name_or_path path/to/mae-vit-base-finetuned \\
        --dataset_name imagenet-1k --output_dir g2sd-vit-small-sd \\
        --per_device_train_batch_size 128 --bf16 --do_train --do_eval

The same script trains the baselines: `--distillation_type none` fine-tunes without a teacher, and without
`--student_name_or_path` the student starts from scratch (`--student_preset`). Data: `--dataset_name` (a Hub data set,
or `elpv`) or `--train_dir` (a local image folder). Arguments can also come from a single JSON or YAML file.

Few labels: `--label_fraction F` keeps a stratified fraction of the training labels, and `--unlabeled_train_dir` /
`--unlabeled_dataset_name` add unlabeled images; with a teacher, the student learns from the teacher on every image
and from the labels on the labeled ones (docs/few-labels.md).
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import set_seed

from g2sd_hf import (
    ClassificationTeacher,
    G2SDConfig,
    G2SDForImageClassification,
    SpecificDistillationArguments,
    SpecificDistillationTrainer,
)
from g2sd_hf.checkpoints import load_image_classifier
from g2sd_hf.data import ImageTransform, class_names, image_processor
from g2sd_hf.few_labels import check_unlabeled_sizes, with_unlabeled
from g2sd_hf.metrics import ClassificationMetrics
from g2sd_hf.scripts.arguments import (
    ClassificationAugmentationArguments,
    DataArguments,
    check_splits,
    check_unlabeled_arguments,
    load_splits,
)
from g2sd_hf.scripts.run import (
    checkpoint_normalization,
    checkpoint_to_resume,
    finish_training_run,
    parse_arguments,
    parse_overrides,
    setup_logging,
    train_and_evaluate,
)
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from g2sd_hf.trainer import check_specific_distillation_pair


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    student_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A generic-distillation checkpoint (its decoder is dropped) or a G2SD classifier. Without it "
            "the student starts from scratch (--student_preset)."
        },
    )
    student_preset: str = field(default="vit_small_patch16", metadata={"help": "Architecture of a new student."})
    student_config_name: str | None = field(default=None, metadata={"help": "A G2SDConfig file or folder instead."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Student config overrides, 'name=value,...'."}
    )
    use_distillation_token: bool = field(default=True, metadata={"help": "DeiT-style distillation token and head."})
    use_mean_pooling: bool = field(
        default=False, metadata={"help": "Classify the mean patch token (no distillation token)."}
    )
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth of the student."})
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "The task-fine-tuned teacher classifier (any transformers image classifier)."}
    )
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Re-initialize heads of another size."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})
    model_revision: str = field(default="main", metadata={"help": "Revision of the student / teacher checkpoints."})
    token: str | None = field(default=None, metadata={"help": "Hub token."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a teacher with custom code."})


def build_student(
    model_args: ModelArguments, labels: list[str], teacher: ClassificationTeacher | None
) -> G2SDForImageClassification:
    overrides = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
        "use_distillation_token": model_args.use_distillation_token,
        "use_mean_pooling": model_args.use_mean_pooling,
        "drop_path_rate": model_args.drop_path_rate,
        **parse_overrides(model_args.config_overrides, G2SDConfig),
    }
    if model_args.student_name_or_path is not None:
        # An MAE or other non-student checkpoint is refused; a generic-distillation checkpoint's new head is said.
        return load_image_classifier(
            model_args.student_name_or_path,
            G2SDForImageClassification,
            new_head="warn",
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **overrides,
        )
    if teacher is not None:  # a new student reads the teacher's images
        overrides = {"image_size": teacher.image_size[0], "num_channels": teacher.config.num_channels, **overrides}
    if model_args.student_config_name is not None:
        config = G2SDConfig.from_pretrained(model_args.student_config_name, **overrides)
    else:
        config = G2SDConfig.from_preset(model_args.student_preset, **overrides)
    return G2SDForImageClassification(config)


def student_normalization(model_args: ModelArguments, teacher: ClassificationTeacher | None) -> tuple[list, list]:
    """The student's pixel normalization: its checkpoint's processor, else the teacher's, else ImageNet's."""
    fallback = (teacher.image_mean, teacher.image_std) if teacher is not None else None
    if model_args.student_name_or_path is not None:
        found = checkpoint_normalization(model_args.student_name_or_path, cache_dir=model_args.cache_dir)
        if found is not None:
            return found
        logger.warning(
            f"No image processor in {model_args.student_name_or_path}: the student is normalized like "
            f"{'its teacher' if fallback else 'ImageNet'}."
        )
    if fallback is not None:
        return list(fallback[0]), list(fallback[1])
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def main(args: list[str] | None = None) -> dict:
    model_args, data_args, augmentation_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, ClassificationAugmentationArguments, SpecificDistillationArguments), args
    )
    setup_logging(training_args, logger)
    logger.info(f"Training arguments {training_args}")
    check_unlabeled_arguments(data_args, training_args, with_teacher=model_args.teacher_name_or_path is not None)
    last_checkpoint = checkpoint_to_resume(training_args, model_args, data_args, augmentation_args)
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="reading the data"):
        splits, data_report = load_splits(data_args, training_args.seed, model_args.cache_dir, model_args.token)
    labels = class_names(splits["train"])

    teacher = None
    if model_args.teacher_name_or_path is not None and training_args.distillation_type != "none":
        teacher = ClassificationTeacher.from_pretrained(
            model_args.teacher_name_or_path,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    student = build_student(model_args, labels, teacher)
    if teacher is not None:  # before the data pass, which decodes every image once
        check_specific_distillation_pair(student, teacher)

    with training_args.main_process_first(desc="checking the images"):
        splits = check_splits(splits, data_report, data_args, model_args.cache_dir, model_args.token)
    image_size = student.config.processor_size
    image_mean, image_std = student_normalization(model_args, teacher)
    processor = image_processor(image_size, image_mean, image_std, augmentation_args.eval_crop_ratio)

    train_transform = augmentation_args.train_transform(image_size, image_mean, image_std)
    # With a teacher, the unlabeled images join the labeled ones in one shuffled set (label masked out of the task
    # loss); without one, the labeled images alone (--label_fraction).
    unlabeled = splits.get("unlabeled") if teacher is not None else None
    if unlabeled is not None and training_args.do_train:
        check_unlabeled_sizes(splits["train"], unlabeled, image_size)
    train_images = with_unlabeled(splits["train"], unlabeled)
    train_dataset = train_images.with_transform(ImageTransform(train_transform, with_labels=True))
    eval_dataset = splits["validation"].with_transform(
        ImageTransform(augmentation_args.eval_transform(image_size, image_mean, image_std), with_labels=True)
    )

    trainer = SpecificDistillationTrainer(
        model=student,
        teacher=teacher,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=processor,
        compute_metrics=ClassificationMetrics(labels, augmentation_args.positive_class_indices(data_args, labels)),
    )

    metrics = train_and_evaluate(trainer, last_checkpoint, data_report)

    finish_training_run(trainer, model_args.teacher_name_or_path, data_args.source_name)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
