#!/usr/bin/env python
"""Pre-train an MAE teacher (`ViTMAEForPreTraining`) from scratch, for when no pre-trained MAE can be downloaded.

G2SD normally starts from a released MAE such as `facebook/vit-mae-base`; the demo, which runs offline, makes its own:

    python examples/run_mae_pretraining.py --dataset_name elpv --output_dir mae-teacher \\
        --config_overrides "image_size=128,hidden_size=192" --num_train_epochs 20 --do_train

MAE's recipe: 75% masking, normalized-pixel loss, RandomResizedCrop(scale 0.2-1) + flip, AdamW (0.9, 0.95) with weight
decay 0.05, base learning rate 1.5e-4 x batch / 256, cosine schedule with warm-up. The saved folder (model + image
processor) is what `MAETeacher.from_pretrained` and `run_generic.py --teacher_name_or_path` take.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import ViTMAEConfig, ViTMAEForPreTraining, set_seed

from g2sd_hf import MAEPretrainingArguments, initialize_mae_from_scratch
from g2sd_hf.data import image_processor
from g2sd_hf.scripts.arguments import DataArguments, MaskedImageAugmentationArguments, label_free_datasets
from g2sd_hf.scripts.run import (
    checkpoint_to_resume,
    parse_arguments,
    parse_overrides,
    setup_logging,
    train_and_evaluate,
)
from g2sd_hf.streaming import StreamingArguments, check_streaming_arguments, collate_stream
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from g2sd_hf.trainer import RecipeTrainer


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "ViTMAEConfig overrides of MAE ViT-Base, e.g. 'image_size=128,hidden_size=192,...'."},
    )
    norm_pix_loss: bool = field(default=True, metadata={"help": "MAE's per-patch normalized pixel targets."})
    mask_ratio: float = field(default=0.75, metadata={"help": "Fraction of patches masked."})


def main(args: list[str] | None = None) -> dict:
    model_args, data_args, augmentation_args, streaming_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, MaskedImageAugmentationArguments, StreamingArguments, MAEPretrainingArguments),
        args,
    )
    setup_logging(training_args, logger)
    check_streaming_arguments(streaming_args, training_args, data_args)
    last_checkpoint = checkpoint_to_resume(training_args, model_args, data_args, augmentation_args, streaming_args)
    set_seed(training_args.seed)

    config = ViTMAEConfig(
        layer_norm_eps=1e-6,
        norm_pix_loss=model_args.norm_pix_loss,
        mask_ratio=model_args.mask_ratio,
        **parse_overrides(model_args.config_overrides, ViTMAEConfig),
    )
    model = initialize_mae_from_scratch(ViTMAEForPreTraining(config))
    size = config.image_size
    processor = image_processor(size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, augmentation_args.eval_crop_ratio)
    train_dataset, eval_dataset, data_report = label_free_datasets(  # no labels: the unlabeled images too
        data_args,
        streaming_args,
        training_args,
        augmentation_args.train_transform(size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        augmentation_args.eval_transform(size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    )
    trainer = RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=processor,
        data_collator=collate_stream if streaming_args.streaming else None,
    )
    return train_and_evaluate(trainer, last_checkpoint, data_report)


if __name__ == "__main__":
    main(sys.argv[1:])
