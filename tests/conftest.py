"""Tiny models and data shared by the tests: image 32, patch 8 (a 4x4 grid), widths 16-32, 2 layers."""

import os

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining

from g2sd_hf import G2SDConfig
from g2sd_hf.teacher import initialize_mae_from_scratch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

IMAGE_SIZE, PATCH_SIZE = 32, 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2


def tiny_student_config(**overrides) -> G2SDConfig:
    values = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        target_hidden_size=24,
    )
    values.update(overrides)
    return G2SDConfig(**values)


def tiny_mae_teacher(seed: int = 0, **overrides) -> ViTMAEForPreTraining:
    """A randomly initialized MAE with its sin-cos tables filled (transformers 5.x leaves them zero at init)."""
    values = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=3,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=48,
        layer_norm_eps=1e-6,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    return initialize_mae_from_scratch(ViTMAEForPreTraining(ViTMAEConfig(**values))).eval()


def tiny_classifier_teacher(num_labels: int = 4, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


HUB_METRIC_TYPES = {"accuracy", "recall", "mean_iou", "iou", "map", "loss"}


def assert_card_lists_every_metric(folder, metrics: dict, task_type: str, dataset: str) -> list:
    """The folder's model card parses with `huggingface_hub.ModelCard.load`, and its `eval_results` list every
    evaluation metric in `metrics` (task, dataset, validation split, a Hub metric type, the value)."""
    from pathlib import Path

    from huggingface_hub import ModelCard

    from g2sd_hf.hub import _is_quality_metric, describe_metric

    results = ModelCard.load(Path(folder) / "README.md").data.eval_results
    expected = {
        (describe_metric(key.removeprefix("eval_"))[0], round(float(value), 6))
        for key, value in metrics.items()
        if key.startswith("eval_") and isinstance(value, float) and _is_quality_metric(key.removeprefix("eval_"))
    }
    assert expected and {(result.metric_type, result.metric_value) for result in results} == expected
    for result in results:
        assert (result.task_type, result.dataset_name, result.dataset_split) == (task_type, dataset, "validation")
        assert result.metric_type in HUB_METRIC_TYPES and result.metric_name
    return results


def command_line(*switches: str, **values) -> list[str]:
    """`command_line("do_train", max_steps=2)` -> `["--do_train", "--max_steps", "2"]`: a script's arguments."""
    arguments = [f"--{name}" for name in switches]
    for name, value in values.items():
        arguments += [f"--{name}", str(value)]
    return arguments


@pytest.fixture
def pixel_values():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


@pytest.fixture
def noise():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, NUM_PATCHES, generator=generator)


def tiny_image_dataset(num_images: int = 16, num_labels: int | None = None, seed: int = 0):
    """A `datasets.Dataset` of normalized random images (and labels), in torch format."""
    import datasets

    generator = torch.Generator().manual_seed(seed)
    columns = {"pixel_values": torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).numpy()}
    if num_labels is not None:
        columns["labels"] = [index % num_labels for index in range(num_images)]
    return datasets.Dataset.from_dict(columns).with_format("torch")
