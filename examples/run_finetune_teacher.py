#!/usr/bin/env python
"""Fine-tune an MAE encoder into the task teacher of specific distillation (a stock `ViTForImageClassification`).

    accelerate launch examples/run_finetune_teacher.py --mae_name_or_path facebook/vit-mae-base \\
        --dataset_name imagenet-1k --output_dir mae-vit-base-finetuned --bf16 --do_train --do_eval

MAE's fine-tuning recipe (AdamW, weight decay 0.05, layer-wise lr decay, label smoothing, mixup/cutmix, RandAugment)
through `FineTuningTrainer` (specific distillation's recipe, no teacher). The saved folder (model + image processor) is what
`ClassificationTeacher.from_pretrained` and `run_specific.py --teacher_name_or_path` take.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import ViTMAEModel, set_seed

from g2sd_hf import FineTuningArguments, FineTuningTrainer
from g2sd_hf.data import ImageTransform, class_names, image_processor
from g2sd_hf.metrics import ClassificationMetrics
from g2sd_hf.scripts.arguments import (
    ClassificationAugmentationArguments,
    DataArguments,
    check_unlabeled_arguments,
    prepare_splits,
)
from g2sd_hf.scripts.run import (
    checkpoint_normalization,
    checkpoint_to_resume,
    parse_arguments,
    setup_logging,
    train_and_evaluate,
)
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, classifier_from_mae


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    mae_name_or_path: str = field(
        default="facebook/vit-mae-base",
        metadata={"help": "MAE checkpoint whose encoder is fine-tuned (Hub id or folder)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})
    model_revision: str = field(default="main", metadata={"help": "Revision of the MAE checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token."})


def main(args: list[str] | None = None) -> dict:
    model_args, data_args, augmentation_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, ClassificationAugmentationArguments, FineTuningArguments), args
    )
    setup_logging(training_args, logger)
    check_unlabeled_arguments(data_args, training_args, with_teacher=False)  # --label_fraction: the labeled alone
    last_checkpoint = checkpoint_to_resume(training_args, model_args, data_args, augmentation_args)
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="preparing the data"):
        splits, data_report = prepare_splits(data_args, training_args.seed, model_args.cache_dir, model_args.token)
    labels = class_names(splits["train"])

    load = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    encoder = ViTMAEModel.from_pretrained(model_args.mae_name_or_path, **load)
    model = classifier_from_mae(encoder, num_labels=len(labels), id2label=dict(enumerate(labels)))
    found = checkpoint_normalization(model_args.mae_name_or_path, **load)
    if found is None:
        logger.warning(f"No image processor in {model_args.mae_name_or_path}: using ImageNet's normalization, MAE's.")
    image_mean, image_std = found or (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
    size = model.config.image_size
    processor = image_processor(size, image_mean, image_std, augmentation_args.eval_crop_ratio)

    train_dataset = splits["train"].with_transform(
        ImageTransform(augmentation_args.train_transform(size, image_mean, image_std), with_labels=True)
    )
    eval_dataset = splits["validation"].with_transform(
        ImageTransform(augmentation_args.eval_transform(size, image_mean, image_std), with_labels=True)
    )
    trainer = FineTuningTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=processor,
        compute_metrics=ClassificationMetrics(labels, augmentation_args.positive_class_indices(data_args, labels)),
    )
    return train_and_evaluate(trainer, last_checkpoint, data_report)


if __name__ == "__main__":
    main(sys.argv[1:])
