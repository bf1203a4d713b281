"""A G2SD classifier as an ONNX model for ONNX Runtime, optionally with int8 weights, checked against PyTorch.

Optimum's exporter (`optimum-onnx`, the Hugging Face way) supports transformers < 4.58 only; this package needs
transformers 5, so the export goes through `torch.onnx.export` (the dynamo exporter, opset 18) of the stock
transformers classifier `g2sd_hf.stock_model` makes (its logits are the G2SD model's: the two heads' average for a student
with a distillation token, as `pipeline` gives). The batch axis is dynamic. `--quantize int8` adds ONNX Runtime's
dynamic quantization (int8 weights of the matrix products, activations quantized per batch).

Every export is checked before it is written: ONNX Runtime's fp32 logits against PyTorch's on random images (largest
difference below `1e-4`), and the int8 model's against the fp32 model's (largest difference and top-1 agreement); the
card of the folder states both, and lists the files. With labeled images (`check_images`), both models' balanced
accuracy is measured too.

    pip install g2sd-hf[onnx]
    python -m g2sd_hf.export --model path/to/g2sd-student --output path/to/onnx --format onnx --quantize int8

`ORTImageClassifier` runs the exported file wherever a transformers image classifier goes, `pipeline` included:

```python
>>> classifier = pipeline("image-classification", model=ORTImageClassifier.from_onnx("path/to/onnx"),
...                       image_processor=AutoImageProcessor.from_pretrained("path/to/onnx"))
```
"""

import json
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoImageProcessor, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging

from .checkpoints import load_image_classifier
from .metrics import classification_metrics
from .modeling_g2sd import G2SDForImageClassification
from .output_folders import check_output_folder, staged_folder
from .stock_model import to_stock_model


logger = logging.get_logger(__name__)

ONNX_FILE, INT8_FILE = "model.onnx", "model_int8.onnx"
OPSET = 18
FP32_TOLERANCE = 1e-4
CHECK_RECORD = "onnx_checks.json"


def _require_onnx():
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"The ONNX export needs onnx, onnxscript and onnxruntime ({error.name} is missing): "
            "pip install g2sd-hf[onnx]"
        ) from error


class _Logits(torch.nn.Module):
    """The classifier's logits as the exported graph's single output."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def inference_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session for `path` (`threads` intra-op threads; ONNX Runtime's default when `None`)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
    values = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
    return session.run(None, {"pixel_values": values.astype(np.float32)})[0]


class ORTImageClassifier(PreTrainedModel):
    """An exported ONNX classifier run by ONNX Runtime behind transformers' model interface: `forward(pixel_values)`
    returns an `ImageClassifierOutput`, so that `pipeline("image-classification", model=...)` and other users of an
    image classifier take it. Its config (labels) is the exported folder's `config.json`.

    Example:

    ```python
    >>> model = ORTImageClassifier.from_onnx("g2sd-student-onnx", file_name="model_int8.onnx")
    >>> model(pixel_values=torch.randn(1, 3, 224, 224)).logits.shape
    torch.Size([1, 1000])
    ```
    """

    config_class = PretrainedConfig
    main_input_name = "pixel_values"
    base_model_prefix = "onnx"

    def __init__(self, config: PretrainedConfig, session=None):
        super().__init__(config)
        self.session = session

    # No parameters (the weights are in the session): where the inputs go, for pipelines.
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @classmethod
    def from_onnx(cls, folder: str | Path, file_name: str = ONNX_FILE, threads: int | None = None):
        path = Path(folder) / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"No {file_name} in {folder}: export one with python -m g2sd_hf.export --format onnx."
            )
        return cls(AutoConfig.from_pretrained(folder), inference_session(path, threads)).eval()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> ImageClassifierOutput:
        logits = onnx_logits(self.session, pixel_values.detach().float().cpu())
        return ImageClassifierOutput(logits=torch.from_numpy(logits))


def export_onnx_graph(stock: PreTrainedModel, path: Path, image_size: int, num_channels: int) -> None:
    """`torch.onnx.export` (dynamo, opset 18) of an image classifier's logits, with a dynamic batch axis."""
    example = torch.randn(2, num_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.onnx.export(
            _Logits(stock).eval(),
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantization: int8 weights of the matrix products, activations quantized per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def _balanced_accuracy(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    return float(
        classification_metrics(logits, labels, [str(index) for index in range(num_labels)])["balanced_accuracy"]
    )


@torch.no_grad()
def check_onnx(
    model: PreTrainedModel,
    folder: Path,
    image_size: int,
    with_int8: bool,
    check_images: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch_size: int = 64,
) -> dict:
    """Compare ONNX Runtime with PyTorch: fp32 logits on random images (refused above `FP32_TOLERANCE`), int8 against
    fp32 (largest difference, top-1 agreement), and, on `check_images` = `(pixel_values, labels)`, every model's
    balanced accuracy."""
    generator = torch.Generator().manual_seed(0)
    random_images = torch.randn(8, model.config.num_channels, image_size, image_size, generator=generator)
    reference = model.eval()(pixel_values=random_images).logits.numpy()
    fp32 = inference_session(folder / ONNX_FILE)
    checks = {"fp32_max_abs_difference": float(np.abs(onnx_logits(fp32, random_images) - reference).max())}
    if checks["fp32_max_abs_difference"] > FP32_TOLERANCE:
        raise RuntimeError(
            f"ONNX Runtime's logits differ from PyTorch's by {checks['fp32_max_abs_difference']:.2e} "
            f"(> {FP32_TOLERANCE}): the export is not written."
        )
    sessions = {"fp32": fp32}
    if with_int8:
        sessions["int8"] = inference_session(folder / INT8_FILE)
        int8 = onnx_logits(sessions["int8"], random_images)
        fp32_logits = onnx_logits(fp32, random_images)
        checks["int8_max_abs_difference"] = float(np.abs(int8 - fp32_logits).max())
        checks["int8_top1_agreement"] = float((int8.argmax(-1) == fp32_logits.argmax(-1)).mean())
    if check_images is not None:
        pixel_values, labels = check_images
        labels = labels.numpy()
        num_labels = model.config.num_labels
        pytorch = np.concatenate(
            [model(pixel_values=batch).logits.numpy() for batch in pixel_values.split(batch_size)]
        )
        checks["pytorch_balanced_accuracy"] = _balanced_accuracy(pytorch, labels, num_labels)
        for name, session in sessions.items():
            logits = np.concatenate([onnx_logits(session, batch) for batch in pixel_values.split(batch_size)])
            checks[f"{name}_balanced_accuracy"] = _balanced_accuracy(logits, labels, num_labels)
            checks[f"{name}_max_abs_difference_on_images"] = float(np.abs(logits - pytorch).max())
        if with_int8:
            checks["int8_minus_fp32_balanced_accuracy"] = (
                checks["int8_balanced_accuracy"] - checks["fp32_balanced_accuracy"]
            )
        checks["checked_images"] = len(labels)
    return checks


def _card(folder_name: str, model: PreTrainedModel, checks: dict, files: list[str], source: str | None) -> ModelCard:
    labels = list(model.config.id2label.values())
    shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
    rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in checks.items())
    files_list = "\n".join(f"- `{name}`" for name in files)
    int8 = INT8_FILE in files
    return ModelCard(
        f"""---
library_name: onnx
pipeline_tag: image-classification
tags:
- g2sd
- onnx
- image-classification
{"- int8" if int8 else ""}
---

# {folder_name}

A G2SD student classifier ({type(model).__name__}, {model.config.num_labels} classes: {shown}) exported to
ONNX{f" from `{source}`" if source else ""} with `torch.onnx.export`
(dynamo exporter, opset {OPSET}, dynamic batch axis): the logits of the stock transformers classifier, which are the
G2SD model's (the average of the two heads for a student with a distillation token).
{"`model_int8.onnx` holds ONNX Runtime's dynamic int8 quantization of it (int8 weights; activations quantized per batch)." if int8 else ""}

## Checked before it was written

| Check | Value |
|---|---|
{rows}

fp32: ONNX Runtime against PyTorch on 8 random images (the export is refused above {FP32_TOLERANCE:g}){"; int8 against fp32 on the same images" if int8 else ""}.
Balanced accuracies, where listed, are on the labeled images given to the export.

## Files

{files_list}

## Use

```python
from transformers import AutoImageProcessor, pipeline
from g2sd_hf.onnx_export import ORTImageClassifier

classifier = pipeline(
    "image-classification",
    model=ORTImageClassifier.from_onnx("{folder_name}"{', file_name="model_int8.onnx"' if int8 else ""}),
    image_processor=AutoImageProcessor.from_pretrained("{folder_name}"),
)
```

Or with ONNX Runtime alone: `onnxruntime.InferenceSession("{folder_name}/model.onnx").run(None, {{"pixel_values": x}})`,
with `x` normalized as `preprocessor_config.json` says.
"""
    )


def export_onnx(
    model: G2SDForImageClassification | str,
    output_dir: str,
    quantize: str | None = None,
    processor=None,
    check_images: tuple[torch.Tensor, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a G2SD classifier as `model.onnx` (and `model_int8.onnx` with `quantize="int8"`) with its config,
    processor, checks (`onnx_checks.json`) and model card, once every check passed.

    Returns:
        `dict`: the checks (`check_onnx`) and `files`, the files written.

    Example:

    ```python
    >>> export_onnx("g2sd-vit-small-sd", "g2sd-vit-small-sd-onnx", quantize="int8")["fp32_max_abs_difference"]
    3.1e-06
    ```
    """
    _require_onnx()
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize}: only int8 (ONNX Runtime's dynamic quantization) is supported.")
    check_output_folder(output_dir, overwrite)
    source = None
    if isinstance(model, (str, Path)):
        source = str(model)
        model = load_image_classifier(source, G2SDForImageClassification)  # a random head is refused
        if processor is None:
            processor = AutoImageProcessor.from_pretrained(source)
    stock = to_stock_model(model)
    image_size = model.config.processor_size
    output_dir = Path(output_dir)
    with staged_folder(output_dir, overwrite) as staging:
        export_onnx_graph(stock, staging / ONNX_FILE, image_size, model.config.num_channels)
        if quantize == "int8":
            quantize_int8(staging / ONNX_FILE, staging / INT8_FILE)
        checks = check_onnx(stock, staging, image_size, quantize == "int8", check_images)
        stock.config.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        (staging / CHECK_RECORD).write_text(json.dumps(checks, indent=2) + "\n")
        files = sorted(path.name for path in staging.iterdir() if not path.name.startswith("."))
        _card(output_dir.name, stock, checks, [*files, "README.md"], source).save(staging / "README.md")
    logger.info(f"Exported ONNX to {output_dir}: {checks}")
    return {**checks, "files": sorted([*files, "README.md"])}


__all__ = [
    "ORTImageClassifier",
    "check_onnx",
    "export_onnx",
    "export_onnx_graph",
    "inference_session",
    "quantize_int8",
]
