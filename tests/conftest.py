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


# -- a generated folder with real structure, and a teacher fine-tuned on it (issues 17 and 18) --------------------------
SHAPE_CLASSES = ("circle", "cross", "ring")
NORMALIZATION = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
SHAPES_STUDENT = "hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32"


def run_arguments(data, output_dir, epochs: int, **extra) -> list[str]:
    """An example script's arguments on a `train` / `validation` folder with the README's `--recipe small-data`."""
    arguments = {
        "train_dir": data / "train",
        "validation_dir": data / "validation",
        "output_dir": output_dir,
        "recipe": "small-data",
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 16,
        "logging_steps": 4,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "seed": 0,
        "do_train": True,
        "do_eval": True,
        **extra,
    }
    return [f"--{name}={value}" for name, value in arguments.items()]


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """Circles, crosses and rings of random size, color and rotation on textured backgrounds, 32 px: 192 training
    images (64 per class) and 96 validation images."""
    from g2sd_hf.synthetic import write_classification_folder

    root = tmp_path_factory.mktemp("shapes")
    write_classification_folder(root / "train", "shapes", 192, image_size=32, seed=0, classes=SHAPE_CLASSES)
    write_classification_folder(root / "validation", "shapes", 96, image_size=32, seed=1, classes=SHAPE_CLASSES)
    return root


@pytest.fixture(scope="session")
def shapes_teacher(shapes_folder, tmp_path_factory):
    """`run_finetune_teacher.py` from a tiny MAE on the shapes: the classifier's folder and its metrics."""
    import sys
    from pathlib import Path

    from transformers import ViTImageProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import run_finetune_teacher

    root = tmp_path_factory.mktemp("teacher")
    tiny_mae_teacher().save_pretrained(root / "mae")
    ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION).save_pretrained(root / "mae")
    metrics = run_finetune_teacher.main(
        run_arguments(shapes_folder, root / "classifier", epochs=20, mae_name_or_path=root / "mae")
    )
    return root / "classifier", metrics
