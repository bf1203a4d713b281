#!/usr/bin/env python
"""Semantic segmentation with UperNet on a G2SD backbone, with specific distillation from a teacher when given.

    accelerate launch examples/run_semantic_segmentation.py --backbone_name_or_path g2sd-vit-small-gd \\
        --dataset_name scene_parse_150 --reduce_labels --num_labels 150 --image_size 512 --window_size 14 \\
        --teacher_name_or_path upernet-g2sd-base-ade --output_dir upernet-g2sd-small-ade --bf16 --do_train --do_eval

Data: a Hub data set in the `scene_parse_150` layout, a folder with `images/` and `masks/`, or (`--dataset_name synthetic-shapes`) generated
shapes on textured backgrounds. Evaluation reports mean IoU and pixel accuracy, computed locally.
"""

import logging
import sys

from transformers import AutoImageProcessor, UperNetForSemanticSegmentation, set_seed

import g2sd_hf  # noqa: F401  (registers the G2SD backbone with the Auto classes)
from g2sd_hf.data import dense_image_processor
from g2sd_hf.dense_data import SegmentationTransform, collate_segmentation, load_segmentation_dataset
from g2sd_hf.dense_models import load_backbone_weights, semantic_segmentation_model
from g2sd_hf.dense_trainer import DenseDistillationTrainer
from g2sd_hf.metrics import SegmentationMetrics, segmentation_predictions
from g2sd_hf.scripts.arguments import DenseDataArguments, DenseModelArguments, dense_backbone_config
from g2sd_hf.scripts.run import checkpoint_to_resume, parse_arguments, setup_logging, train_and_evaluate
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DenseTeacher
from g2sd_hf.training_args import DenseDistillationArguments


logger = logging.getLogger(__name__)


def main(args: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(
        (DenseModelArguments, DenseDataArguments, DenseDistillationArguments), args
    )
    setup_logging(training_args, logger)
    last_checkpoint = checkpoint_to_resume(training_args, model_args, data_args)
    set_seed(training_args.seed)

    splits, class_names = load_segmentation_dataset(
        data_args.dataset_name,
        data_args.train_dir,
        data_args.validation_dir,
        (data_args.synthetic_train_size, data_args.synthetic_validation_size),
        data_args.image_size,
        model_args.cache_dir,
    )
    splits = data_args.subsample(splits)
    num_labels = data_args.num_labels or len(class_names)
    if not num_labels:
        raise ValueError("This data set does not name its classes: pass --num_labels (ADE20k / scene_parse_150: 150).")
    # Scored batch by batch into a running confusion matrix: full-resolution label maps of a whole evaluation set
    # are never gathered in memory.
    training_args.batch_eval_metrics = True

    if model_args.model_name_or_path is not None:
        model = UperNetForSemanticSegmentation.from_pretrained(model_args.model_name_or_path)
    else:
        model = semantic_segmentation_model(
            dense_backbone_config(model_args, data_args.image_size), num_labels, model_args.head_hidden_size
        )
        if model_args.backbone_name_or_path is not None:
            load_backbone_weights(model, model_args.backbone_name_or_path)
    if class_names:
        model.config.id2label = dict(enumerate(class_names))
        model.config.label2id = {name: index for index, name in enumerate(class_names)}
    image_mean, image_std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    processor = dense_image_processor(data_args.image_size, image_mean, image_std)

    teacher = None
    if model_args.teacher_name_or_path is not None:
        teacher_model = UperNetForSemanticSegmentation.from_pretrained(model_args.teacher_name_or_path)
        teacher_processor = AutoImageProcessor.from_pretrained(model_args.teacher_name_or_path)
        teacher = DenseTeacher(teacher_model, teacher_processor.image_mean, teacher_processor.image_std)

    train_dataset = splits["train"].with_transform(
        SegmentationTransform(
            data_args.image_size, image_mean, image_std, True, data_args.reduce_labels, model.config.num_labels
        )
    )
    eval_dataset = splits["validation"].with_transform(
        SegmentationTransform(
            data_args.image_size, image_mean, image_std, False, data_args.reduce_labels, model.config.num_labels
        )
    )
    trainer = DenseDistillationTrainer(
        model=model,
        teacher=teacher,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        data_collator=collate_segmentation,
        processing_class=processor,
        compute_metrics=SegmentationMetrics(num_labels, class_names=class_names or None),
        preprocess_logits_for_metrics=segmentation_predictions,
    )
    metrics = train_and_evaluate(trainer, last_checkpoint)
    if training_args.do_train:
        trainer.create_model_card(dataset=data_args.source_name, tasks="image-segmentation")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
