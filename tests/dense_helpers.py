"""Tiny dense models and arguments shared by the dense tests: image 32, patch 8, widths 32-64, 2 layers."""

from pathlib import Path

import torch

from g2sd_hf import G2SDBackboneConfig
from g2sd_hf.dense_data import (
    SegmentationTransform,
    collate_segmentation,
)
from g2sd_hf.dense_models import (
    object_detection_model,
    semantic_segmentation_model,
    universal_segmentation_model,
)
from g2sd_hf.dense_trainer import (
    DenseDistillationArguments,
    DenseDistillationTrainer,
)
from g2sd_hf.synthetic import make_shapes_dataset


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NORMALIZATION = ([0.5] * 3, [0.5] * 3)


def tiny_backbone_config(hidden_size=32, **overrides):
    values = dict(
        image_size=32,
        patch_size=8,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        fpn_hidden_size=32,
    )
    values.update(overrides)
    return G2SDBackboneConfig(**values)


def dense_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    values.update(overrides)
    return DenseDistillationArguments(**values)


def shapes(size, transform, seed=0, image_size=32):
    return make_shapes_dataset(size, image_size, seed=seed).with_transform(transform)


def segmentation_pair(tmp_path, **overrides):
    torch.manual_seed(0)
    teacher = semantic_segmentation_model(tiny_backbone_config(hidden_size=64), 4, hidden_size=16).eval()
    student = semantic_segmentation_model(tiny_backbone_config(), 4, hidden_size=16)
    dataset = (
        make_shapes_dataset(8, 32)
        .rename_column("semantic_mask", "mask")
        .with_transform(SegmentationTransform(32, *NORMALIZATION, False))
    )
    trainer = DenseDistillationTrainer(model=student, teacher=teacher, args=dense_args(tmp_path, **overrides))
    batch = collate_segmentation([dataset[index] for index in range(4)])
    return trainer, student, teacher, batch


def mask2former(hidden=32):
    return universal_segmentation_model(
        tiny_backbone_config(hidden_size=hidden),
        3,
        hidden_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_queries=5,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        num_attention_heads=2,
    )


def detector(hidden=32):
    return object_detection_model(
        tiny_backbone_config(hidden_size=hidden),
        3,
        hidden_size=32,
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    )
