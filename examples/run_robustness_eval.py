#!/usr/bin/env python
"""Accuracy of an ImageNet-1k classifier on distribution shifts (ImageNet-A, -R, -Sketch, -V2, ...).

    accelerate launch examples/run_robustness_eval.py --model_name_or_path g2sd-vit-small-sd \\
        --datasets path/to/imagenet-a,path/to/imagenet-r,imagenet_sketch --output_dir robustness

Each data set is a Hub id or a local image folder. Classes named by WordNet id (the folders of ImageNet-A/-R/-V2/
-Sketch) are mapped to ImageNet-1k indices; integer class names are taken as ImageNet-1k indices, and names the model
uses (its `id2label`) through the model. For the 200-class
ImageNet-A and ImageNet-R, the logits are restricted to the subset's classes (`--subset auto` recognizes them from
their classes; the lists ship with g2sd-hf). Writes `robustness.md` and `robustness.json`.
"""

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser

import g2sd_hf  # noqa: F401
from g2sd_hf.analysis import evaluate_accuracy, imagenet_wnids, subset_indices
from g2sd_hf.data import ImageTransform, collate_classification, processor_transform


WNID = re.compile(r"^n\d{8}$")


@dataclass
class RobustnessArguments:
    model_name_or_path: str = field(metadata={"help": "An ImageNet-1k classifier (folder or Hub id)."})
    datasets: str = field(metadata={"help": "Comma-separated Hub ids or image folders."})
    subset: str = field(default="auto", metadata={"help": "'auto', 'imagenet-a', 'imagenet-r' or 'none'."})
    split: str = field(default="test", metadata={"help": "Split of Hub data sets ('validation' or 'test')."})
    output_dir: str = field(default="robustness", metadata={"help": "Where the table goes."})
    batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N images of each set."})
    imagenet_order: bool = field(
        default=False,
        metadata={
            "help": "The data set's 1000 classes are ImageNet-1k's, in its order (e.g. imagenet_sketch on the Hub), whatever their names."
        },
    )


def imagenet_labels(
    class_names: list[str], model_labels: dict[int, str] | None = None, imagenet_order: bool = False
) -> list[int]:
    """ImageNet-1k index of each class of a data set: WordNet ids (`n01440764`) through the ImageNet-1k list, names
    that are integers as the indices themselves, names the model itself uses (its `id2label`) through the model, and,
    with `imagenet_order`, 1000 classes as ImageNet-1k in its order. Anything else is refused: it could not be scored
    against an ImageNet-1k classifier."""
    if class_names and all(WNID.match(name) for name in class_names):
        index = {wnid: position for position, wnid in enumerate(imagenet_wnids())}
        unknown = [name for name in class_names if name not in index]
        if unknown:
            raise ValueError(f"WordNet ids outside ImageNet-1k: {unknown[:5]}")
        return [index[name] for name in class_names]
    if class_names and all(name.isdigit() for name in class_names):
        indices = [int(name) for name in class_names]
        if max(indices) >= 1000:
            raise ValueError(f"Integer class names must be ImageNet-1k indices (0-999), got {max(indices)}.")
        return indices
    by_name = {label: int(index) for index, label in (model_labels or {}).items()}
    if class_names and all(name in by_name for name in class_names):
        return [by_name[name] for name in class_names]
    if imagenet_order and len(class_names) == 1000:
        return list(range(1000))
    raise ValueError(
        f"Cannot map the {len(class_names)} classes {class_names[:5]}... to ImageNet-1k: name the class folders by WordNet id "
        "(n01440764, ...), by ImageNet-1k index (0-999), or by the model's own label names (its config's id2label); for "
        "1000 classes already in ImageNet-1k's order, pass --imagenet_order."
    )


def detect_subset(labels: list[int], requested: str) -> str | None:
    if requested != "auto":
        return None if requested == "none" else requested
    present = set(labels)
    for name in ("imagenet-a", "imagenet-r"):
        if present == set(subset_indices(name)):
            return name
    return None


def load_split(name: str, split: str) -> datasets.Dataset:
    """A whole image folder (one sub-folder per class), or one split of a Hub data set, images not decoded."""
    if Path(name).is_dir():
        raw = datasets.load_dataset("imagefolder", data_dir=name, split="train")
        return raw.cast_column("image", datasets.Image(decode=False))
    raw = datasets.load_dataset(name, split=split)
    image_column = "image" if "image" in raw.column_names else raw.column_names[0]
    return raw.rename_column(image_column, "image").cast_column("image", datasets.Image(decode=False))


def main(args: list[str] | None = None) -> dict:
    (arguments,) = HfArgumentParser(RobustnessArguments).parse_args_into_dataclasses(args=args)
    # Uneven shards: each image is scored once (the default pads the last batches with repeated images).
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    model = accelerator.prepare_model(
        AutoModelForImageClassification.from_pretrained(arguments.model_name_or_path), evaluation_mode=True
    )
    processor = AutoImageProcessor.from_pretrained(arguments.model_name_or_path)
    transform = ImageTransform(processor_transform(processor), with_labels=True)
    results = {}
    for name in filter(None, (item.strip() for item in arguments.datasets.split(","))):
        with accelerator.main_process_first():  # the main process downloads and caches, the others read the cache
            dataset = load_split(name, arguments.split)
            if arguments.max_samples is not None:
                dataset = dataset.select(range(min(arguments.max_samples, len(dataset))))
            class_names = getattr(dataset.features["label"], "names", None)
            if class_names is None:  # plain integer labels: the ImageNet-1k indices themselves
                classes = imagenet_labels([str(label) for label in sorted(set(dataset["label"]))])
            else:
                to_imagenet = imagenet_labels(
                    class_names, accelerator.unwrap_model(model).config.id2label, arguments.imagenet_order
                )
                dataset = dataset.map(
                    lambda example: {"label": to_imagenet[example["label"]]},
                    features=datasets.Features({**dataset.features, "label": datasets.Value("int64")}),
                )
                classes = to_imagenet
        subset = detect_subset(classes, arguments.subset)
        loader = accelerator.prepare_data_loader(
            torch.utils.data.DataLoader(
                dataset.with_transform(transform), batch_size=arguments.batch_size, collate_fn=collate_classification
            )
        )
        metrics = evaluate_accuracy(
            model, loader, subset_indices(subset) if subset else None, accelerator, description=name
        )
        results[name] = {**metrics, "restricted_to": subset or "imagenet-1k"}
    if accelerator.is_main_process:
        output = Path(arguments.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        lines = ["| Data set | Top-1 accuracy | Images | Classes scored |", "|---|---|---|---|"]
        lines += [
            f"| {name} | {row['accuracy'] * 100:.2f} | {row['samples']} | {row['restricted_to']} |"
            for name, row in results.items()
        ]
        (output / "robustness.md").write_text("\n".join(lines) + "\n")
        (output / "robustness.json").write_text(json.dumps(results, indent=2))
        print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
