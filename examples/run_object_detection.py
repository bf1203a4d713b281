#!/usr/bin/env python
"""Object detection with a DETR-family head (Deformable DETR or RT-DETR) on a G2SD backbone, with specific
distillation from a teacher when given.

    accelerate launch examples/run_object_detection.py --backbone_name_or_path g2sd-vit-small-gd \\
        --dataset_name cppe-5 --image_size 640 --teacher_name_or_path detr-g2sd-base-cppe5 \\
        --output_dir detr-g2sd-small-cppe5 --bf16 --do_train --do_eval

Data: a Hub data set with COCO-style `objects` (`bbox` as [x, y, width, height], `category`), a folder with
`images/` and a COCO `annotations.json`, or (`--dataset_name synthetic-shapes`) generated shapes on textured backgrounds. Evaluation reports
COCO box AP through pycocotools.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

from transformers import AutoImageProcessor, AutoModelForObjectDetection, set_seed

import g2sd_hf  # noqa: F401  (registers the G2SD backbone with the Auto classes)
from g2sd_hf.data import dense_image_processor
from g2sd_hf.dense_data import DetectionTransform, collate_detection, load_detection_dataset
from g2sd_hf.dense_models import evaluate_detection, load_backbone_weights, object_detection_model
from g2sd_hf.dense_trainer import DenseDistillationTrainer
from g2sd_hf.scripts.arguments import DenseDataArguments, DenseModelArguments, dense_backbone_config
from g2sd_hf.scripts.run import checkpoint_to_resume, parse_arguments, setup_logging, train_and_evaluate
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DenseTeacher
from g2sd_hf.training_args import DenseDistillationArguments


logger = logging.getLogger(__name__)


@dataclass
class DetectorArguments:
    detector: str = field(default="deformable-detr", metadata={"help": "'deformable-detr' or 'rt-detr'."})
    num_queries: int = field(default=100, metadata={"help": "Object queries."})
    encoder_layers: int = field(default=6, metadata={"help": "Detector encoder layers."})
    decoder_layers: int = field(default=6, metadata={"help": "Detector decoder layers."})


def main(args: list[str] | None = None) -> dict:
    model_args, detector_args, data_args, training_args = parse_arguments(
        (DenseModelArguments, DetectorArguments, DenseDataArguments, DenseDistillationArguments), args
    )
    setup_logging(training_args, logger)
    last_checkpoint = checkpoint_to_resume(training_args, model_args, detector_args, data_args)
    set_seed(training_args.seed)

    splits, class_names = load_detection_dataset(
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
        raise ValueError("This data set does not name its classes: pass --num_labels (COCO: 80).")
    if training_args.eval_strategy != "no":
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy.value} is not supported: COCO AP is computed once after training "
            "(--do_eval); evaluate saved checkpoints with --model_name_or_path <checkpoint> --do_eval."
        )

    if model_args.model_name_or_path is not None:
        model = AutoModelForObjectDetection.from_pretrained(model_args.model_name_or_path)
    else:
        model = object_detection_model(
            dense_backbone_config(model_args, data_args.image_size),
            num_labels,
            detector_args.detector,
            hidden_size=model_args.head_hidden_size,
            num_queries=detector_args.num_queries,
            encoder_layers=detector_args.encoder_layers,
            decoder_layers=detector_args.decoder_layers,
        )
        if model_args.backbone_name_or_path is not None:
            load_backbone_weights(model, model_args.backbone_name_or_path)
    model.config.id2label = dict(enumerate(class_names)) if class_names else model.config.id2label
    model.config.label2id = {name: index for index, name in model.config.id2label.items()}
    image_mean, image_std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    processor = dense_image_processor(data_args.image_size, image_mean, image_std)

    teacher = None
    if model_args.teacher_name_or_path is not None:
        teacher_processor = AutoImageProcessor.from_pretrained(model_args.teacher_name_or_path)
        teacher = DenseTeacher(
            AutoModelForObjectDetection.from_pretrained(model_args.teacher_name_or_path),
            teacher_processor.image_mean,
            teacher_processor.image_std,
        )

    train_dataset = splits["train"].with_transform(
        DetectionTransform(data_args.image_size, image_mean, image_std, True)
    )
    eval_dataset = splits["validation"].with_transform(
        DetectionTransform(data_args.image_size, image_mean, image_std, False)
    )
    trainer = DenseDistillationTrainer(
        model=model,
        teacher=teacher,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        data_collator=collate_detection,
        processing_class=processor,
    )
    if training_args.do_eval and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError(
            "COCO evaluation runs on one process with the whole model, not on sharded FSDP / DeepSpeed parameters: "
            "train without --do_eval, then evaluate the saved model in a plain run (--model_name_or_path <output_dir> --do_eval)."
        )
    training_args.do_eval, do_eval = False, training_args.do_eval  # COCO AP below, not the Trainer's loss
    metrics = train_and_evaluate(trainer, last_checkpoint)
    if do_eval and trainer.is_world_process_zero():  # COCO AP on one process: the whole validation set
        coco = evaluate_detection(
            trainer.accelerator.unwrap_model(trainer.model),
            eval_dataset,
            splits["validation"],
            num_labels,
            collate_detection,
            batch_size=training_args.per_device_eval_batch_size,
        )
        metrics.update({f"eval_{name}": value for name, value in coco.items()})
        trainer.log_metrics("eval", coco)
        trainer.log(
            {f"eval_{name}": value for name, value in coco.items()}
        )  # into log_history: the model card reads it there
        with open(os.path.join(training_args.output_dir, "eval_results.json"), "w") as handle:
            json.dump(coco, handle, indent=2)
    trainer.accelerator.wait_for_everyone()
    if training_args.do_train:
        trainer.create_model_card(dataset=data_args.source_name, tasks="object-detection")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
