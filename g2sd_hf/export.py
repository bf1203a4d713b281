"""Export a G2SD classifier to stock transformers classes, loadable with nothing but transformers installed.

A student without a distillation token becomes a `ViTForImageClassification`; one with a distillation token a
`DeiTForImageClassificationWithTeacher`, whose prediction is also the average of its two heads. The distillation
token has no position embedding in G2SD; DeiT adds one, which the export sets to zero. The fused query/key/value
projection is split. The export is checked before it is written: its logits must equal the G2SD model's.

    python -m g2sd_hf.export --model path/to/g2sd-student --output path/to/exported
    python -m g2sd_hf.export --model path/to/g2sd-student --output path/to/onnx --format onnx --quantize int8

`--format onnx` writes an ONNX model for ONNX Runtime instead (`g2sd_hf.onnx_export`; `pip install g2sd-hf[onnx]`).
"""

import argparse
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import AutoImageProcessor
from transformers.utils import logging

from .checkpoints import load_image_classifier
from .hub import build_model_card
from .modeling_g2sd import G2SDForImageClassification
from .onnx_export import export_onnx
from .output_folders import check_output_folder, staged_folder
from .stock_model import check_same_logits, to_stock_model


logger = logging.get_logger(__name__)


def export_to_transformers(
    model: G2SDForImageClassification | str,
    output_dir: str,
    processor=None,
    dataset: str | None = None,
    teacher: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a G2SD classifier as a stock transformers classifier folder (model, processor, model card).

    Args:
        model (`G2SDForImageClassification` or `str`): The student, or its checkpoint folder / Hub id.
        output_dir (`str`): Where to write, once the export is written and checked. A folder holding files this
            package did not write is refused (nothing is ever removed from it) unless `overwrite`.
        processor (image processor, *optional*): Defaults to the checkpoint's own.
        dataset (`str`, *optional*): For the model card; defaults to the checkpoint card's.
        teacher (`str`, *optional*): For the model card; defaults to the checkpoint card's.
        overwrite (`bool`): Write into a folder that holds other files, replacing those of the same names.

    Returns:
        `Path` of the exported folder.

    Example:

    ```python
    >>> export_to_transformers("g2sd-vit-small-sd", "g2sd-vit-small-sd-deit")
    >>> pipeline("image-classification", model="g2sd-vit-small-sd-deit")  # plain transformers
    ```
    """
    check_output_folder(output_dir, overwrite)
    source = None
    if isinstance(model, (str, Path)):
        source = str(model)
        model = load_image_classifier(source, G2SDForImageClassification)  # a random head is refused
    if processor is None and source is not None:
        processor = AutoImageProcessor.from_pretrained(source)
    if source is not None and Path(source, "README.md").exists():
        card_data = ModelCard.load(Path(source, "README.md")).data
        dataset = dataset or (card_data.datasets or [None])[0]
        teacher = teacher or card_data.base_model
    stock = to_stock_model(model)
    image_size = model.config.processor_size
    difference = check_same_logits(model, stock, image_size)
    output_dir = Path(output_dir)
    with staged_folder(output_dir, overwrite) as staging:
        stock.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        stage = "specific-distillation" if model.config.use_distillation_token else "fine-tuning"
        card = build_model_card(
            stock,
            stage=stage,
            dataset=dataset or "unknown",
            teacher=teacher,
            model_name=output_dir.name,
            tags=["exported"],
            stock=True,
        )
        card.save(staging / "README.md")
    logger.info(f"Exported {type(stock).__name__} to {output_dir} (largest logit difference {difference:.1e}).")
    return output_dir


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="G2SD classifier folder or Hub id")
    parser.add_argument("--output", required=True, help="Folder to write the exported model to")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Write into a folder that holds other files (same-named files are replaced, others kept)",
    )
    parser.add_argument(
        "--format",
        choices=["transformers", "onnx"],
        default="transformers",
        help="transformers: a stock ViT/DeiT classifier folder; onnx: model.onnx for ONNX Runtime (g2sd_hf.onnx_export)",
    )
    parser.add_argument("--quantize", choices=["int8"], default=None, help="With --format onnx: also model_int8.onnx")
    options = parser.parse_args(args)
    if options.format == "onnx":
        print(export_onnx(options.model, options.output, quantize=options.quantize, overwrite=options.overwrite))
    elif options.quantize is not None:
        parser.error("--quantize needs --format onnx.")
    else:
        print(export_to_transformers(options.model, options.output, overwrite=options.overwrite))


if __name__ == "__main__":
    main()


__all__ = ["export_to_transformers"]
