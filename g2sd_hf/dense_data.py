"""Data for the dense tasks: loading (Hub, local folders, or the generated shapes), transforms and batch collation.

- Semantic segmentation: a Hub data set in the `scene_parse_150` layout (`image`, `annotation`), or a folder with
  `images/` and `masks/` holding files of the same names; labels are class indices (255 = ignored).
- Object detection: a Hub data set with COCO-style `objects` (`bbox` as `[x, y, width, height]` pixels and
  `category`), or a folder with `images/` and a COCO `annotations.json`.
- `--dataset_name synthetic-shapes`: the generated shapes of `g2sd_hf.synthetic` (the tests and the dense demo use
  them). Without a data set name or a folder, loading fails with the ways to give one.
"""

import io
import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .data import _to_normalized_tensor, open_rgb_image, require_data_source, to_rgb
from .synthetic import SHAPE_CLASSES, make_shapes_dataset


SYNTHETIC_NAME = "synthetic-shapes"
NAMED_DENSE_DATA_SETS = {
    SYNTHETIC_NAME: "generated shapes on noise, for segmentation and detection (g2sd_hf.synthetic)"
}
IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _rgb(value) -> Image.Image:
    """An RGB image from a decoded PIL image or an undecoded `datasets.Image` value."""
    return to_rgb(value, "A decoded image") if isinstance(value, Image.Image) else open_rgb_image(value)


MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "1")


def _describe(value) -> str:
    if isinstance(value, Image.Image):
        return "a decoded mask"
    return value.get("path") or "<in-memory mask bytes>"


def _mask(value) -> Image.Image:
    """A label mask as a 32-bit integer image: indices kept as they are (palette, 8- and 16-bit masks), never
    through RGB. Other modes are refused: the colors of an RGB mask are not class indices."""
    image = (
        value
        if isinstance(value, Image.Image)
        else Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    )
    if image.mode not in MASK_MODES:
        raise ValueError(
            f"Segmentation mask {_describe(value)} has mode {image.mode}; masks must hold one class index per pixel "
            f"(modes {', '.join(MASK_MODES)}): save them as 8-bit grayscale or palette PNGs, 255 for ignored pixels."
        )
    return Image.fromarray(np.asarray(image).astype(np.int32))


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size_of(value) -> tuple[int, int]:
    """`(height, width)` of a decoded or undecoded image, upright (EXIF orientation applied, as `datasets` decodes);
    an undecoded one is not decoded (its header is read)."""
    if not isinstance(value, Image.Image):
        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as image:
            height, width = image.height, image.width
            if image.getexif().get(0x0112) in _TRANSPOSED:
                height, width = width, height
            return height, width
    return value.height, value.width


def _synthetic_splits(sizes: tuple[int, int], image_size: int) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        train=make_shapes_dataset(sizes[0], image_size, seed=0),
        validation=make_shapes_dataset(sizes[1], image_size, seed=1),
    )


def load_segmentation_dataset(
    dataset_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    synthetic_sizes: tuple[int, int] = (512, 128),
    image_size: int = 64,
    cache_dir: str | None = None,
) -> tuple[datasets.DatasetDict, list[str]]:
    """`train`/`validation` splits with `image` and `mask` columns, and the class names (empty when the data set does
    not name them)."""
    require_data_source(dataset_name, train_dir, NAMED_DENSE_DATA_SETS)
    if dataset_name == SYNTHETIC_NAME:
        splits = _synthetic_splits(synthetic_sizes, image_size)
        splits = splits.rename_column("semantic_mask", "mask").remove_columns(["instance_mask", "objects"])
        return splits, ["background", *SHAPE_CLASSES]
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, cache_dir=cache_dir)
        if "annotation" in raw["train"].column_names:
            raw = raw.rename_column("annotation", "mask")
        validation = raw["validation"] if "validation" in raw else raw["test"]
        return datasets.DatasetDict(train=raw["train"], validation=validation), []
    splits = {}
    for split, folder in (("train", train_dir), ("validation", validation_dir or train_dir)):
        images = sorted(Path(folder, "images").iterdir())
        masks = {path.stem: path for path in Path(folder, "masks").iterdir()}
        missing = [path.name for path in images if path.stem not in masks]
        if missing:
            raise ValueError(
                f"No mask in {Path(folder, 'masks')} for {missing[:5]}: each image needs a mask of the same name."
            )
        splits[split] = datasets.Dataset.from_dict(
            {"image": [str(path) for path in images], "mask": [str(masks[path.stem]) for path in images]},
            features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image(decode=False)}),
        )
    return datasets.DatasetDict(splits), []


def load_detection_dataset(
    dataset_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    synthetic_sizes: tuple[int, int] = (512, 128),
    image_size: int = 64,
    cache_dir: str | None = None,
) -> tuple[datasets.DatasetDict, list[str]]:
    """`train`/`validation` splits with `image` and COCO-style `objects` columns (`bbox`, `category`; `area` and
    `iscrowd` when the data has them), and the class names."""
    require_data_source(dataset_name, train_dir, NAMED_DENSE_DATA_SETS)
    if dataset_name == SYNTHETIC_NAME:
        return _synthetic_splits(synthetic_sizes, image_size), list(SHAPE_CLASSES)
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, cache_dir=cache_dir)
        validation = raw["validation"] if "validation" in raw else raw["test"]
        objects = raw["train"].features["objects"]
        category = objects["category"] if isinstance(objects, dict) else objects.feature["category"]
        names = list(getattr(getattr(category, "feature", category), "names", None) or [])
        return datasets.DatasetDict(train=raw["train"], validation=validation), names
    splits, names = {}, None
    for split, folder in (("train", train_dir), ("validation", validation_dir or train_dir)):
        coco = json.loads(Path(folder, "annotations.json").read_text())
        categories = sorted(coco["categories"], key=lambda category: category["id"])
        index_of = {category["id"]: index for index, category in enumerate(categories)}
        names = names or [category["name"] for category in categories]
        objects = {image["id"]: {"bbox": [], "category": [], "area": [], "iscrowd": []} for image in coco["images"]}
        for annotation in coco["annotations"]:
            entry = objects[annotation["image_id"]]
            entry["bbox"].append([float(value) for value in annotation["bbox"]])
            entry["category"].append(index_of[annotation["category_id"]])
            entry["area"].append(float(annotation.get("area", annotation["bbox"][2] * annotation["bbox"][3])))
            entry["iscrowd"].append(int(annotation.get("iscrowd", 0)))
        splits[split] = datasets.Dataset.from_dict(
            {
                "image": [str(Path(folder, "images", image["file_name"])) for image in coco["images"]],
                "objects": [objects[image["id"]] for image in coco["images"]],
            },
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "objects": {
                        "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                        "category": datasets.Sequence(datasets.Value("int64")),
                        "area": datasets.Sequence(datasets.Value("float32")),
                        "iscrowd": datasets.Sequence(datasets.Value("int64")),
                    },
                }
            ),
        )
    return datasets.DatasetDict(splits), names


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------
def _normalize(image_mean: Sequence[float], image_std: Sequence[float]) -> v2.Compose:
    return v2.Compose(_to_normalized_tensor(image_mean, image_std))  # the classification transforms' last steps


class SegmentationTransform:
    """Batch transform: image -> `pixel_values`, mask -> `labels` (class indices, 255 ignored), resized to a square;
    random horizontal flips when training. With `reduce_labels` (ADE20k / scene_parse_150), label 0 ("other") is
    ignored and the others shift down by one (transformers' rule: 0 -> 255, l -> l - 1, 255 stays 255). With
    `num_labels`, a label outside `[0, num_labels)` other than 255 raises a `ValueError` naming the mask."""

    def __init__(
        self,
        image_size: int,
        image_mean,
        image_std,
        train: bool,
        reduce_labels: bool = False,
        num_labels: int | None = None,
    ):
        self.image_size, self.train, self.reduce_labels, self.num_labels = image_size, train, reduce_labels, num_labels
        self.normalize = _normalize(image_mean, image_std)

    def __call__(self, batch: dict) -> dict:
        pixel_values, labels = [], []
        for image, mask in zip(batch["image"], batch["mask"]):
            image = _rgb(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            mask = np.asarray(
                _mask(mask).resize((self.image_size, self.image_size), Image.Resampling.NEAREST), dtype=np.int64
            )
            if self.reduce_labels:
                mask = np.where(mask == 0, IGNORE_INDEX + 1, mask) - 1
                mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX
            if self.num_labels is not None:
                outside = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_labels))
                if outside.any():
                    raise ValueError(
                        f"Mask {_describe(batch['mask'][len(labels)])} has labels {sorted(set(mask[outside].tolist()))[:5]} outside "
                        f"0..{self.num_labels - 1} (255 = ignored). If label 0 means 'other' (ADE20k / scene_parse_150), pass "
                        "--reduce_labels; otherwise check --num_labels."
                    )
            pixels = self.normalize(image)
            mask = torch.from_numpy(mask.copy())
            if self.train and torch.rand(()) < 0.5:
                pixels, mask = pixels.flip(-1), mask.flip(-1)
            pixel_values.append(pixels)
            labels.append(mask)
        return {"pixel_values": pixel_values, "labels": labels}


class DetectionTransform:
    """Batch transform: image -> `pixel_values` resized to a square; objects -> `labels`, one dict per image with
    `class_labels` and normalized `(center_x, center_y, width, height)` `boxes` (the DETR family's format); random
    horizontal flips when training. With `with_instance_masks`, `mask_labels` and `class_labels` for Mask2Former."""

    def __init__(self, image_size: int, image_mean, image_std, train: bool, with_instance_masks: bool = False):
        self.image_size, self.train, self.with_instance_masks = image_size, train, with_instance_masks
        self.normalize = _normalize(image_mean, image_std)

    def __call__(self, batch: dict) -> dict:
        output = {"pixel_values": [], "labels": [], "mask_labels": [], "class_labels": []}
        for index, (image, objects) in enumerate(zip(batch["image"], batch["objects"])):
            image = _rgb(image)
            width, height = image.size
            pixels = self.normalize(image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))
            boxes = torch.tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4)
            classes = torch.tensor(objects["category"], dtype=torch.int64)
            keep = [not (self.train and crowd) for crowd in objects.get("iscrowd") or [0] * len(classes)]
            selected = torch.tensor(keep, dtype=torch.bool)
            boxes, classes = (
                boxes[selected],
                classes[selected],
            )  # crowd regions are not objects to train on (COCO's rule)
            boxes = torch.stack(
                [
                    (boxes[:, 0] + boxes[:, 2] / 2) / width,
                    (boxes[:, 1] + boxes[:, 3] / 2) / height,
                    boxes[:, 2] / width,
                    boxes[:, 3] / height,
                ],
                dim=-1,
            )
            flip = self.train and bool(torch.rand(()) < 0.5)
            if flip:
                pixels, boxes[:, 0] = pixels.flip(-1), 1 - boxes[:, 0]
            output["pixel_values"].append(pixels)
            output["labels"].append({"class_labels": classes, "boxes": boxes})
            if self.with_instance_masks:
                instance = np.asarray(
                    _mask(batch["instance_mask"][index]).resize(
                        (self.image_size, self.image_size), Image.Resampling.NEAREST
                    )
                )
                identities = [identity for identity, kept in zip(objects["id"], keep) if kept]
                masks = (
                    torch.from_numpy(np.stack([instance == identity for identity in identities]).astype(np.float32))
                    if identities
                    else torch.zeros(0, self.image_size, self.image_size)
                )
                output["mask_labels"].append(masks.flip(-1) if flip else masks)
                output["class_labels"].append(classes)
        if not self.with_instance_masks:
            del output["mask_labels"], output["class_labels"]
        return output


def collate_segmentation(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.stack([example["labels"] for example in examples]),
    }


def collate_detection(examples: list[dict]) -> dict:
    """`pixel_values`, an all-ones `pixel_mask` (the images share one size) and the list of `labels`."""
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    return {
        "pixel_values": pixel_values,
        "pixel_mask": torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long),
        "labels": [example["labels"] for example in examples],
    }


def collate_instances(examples: list[dict]) -> dict:
    """Mask2Former's inputs: `pixel_values` and the lists of `mask_labels` and `class_labels`."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "mask_labels": [example["mask_labels"] for example in examples],
        "class_labels": [example["class_labels"] for example in examples],
    }


__all__ = [
    "DetectionTransform",
    "IGNORE_INDEX",
    "SYNTHETIC_NAME",
    "SegmentationTransform",
    "collate_detection",
    "collate_instances",
    "collate_segmentation",
    "image_size_of",
    "load_detection_dataset",
    "load_segmentation_dataset",
]
