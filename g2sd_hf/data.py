"""Image data for G2SD: loading (Hub dataset, local image folder, or the embedded ELPV set) and the transforms.

Every loader returns a `datasets.DatasetDict` with an `image` column that is *not* decoded by `datasets`
(`Image(decode=False)`) and, for labeled data, a `label` `ClassLabel` column. Images are decoded by the transforms
here, which convert grayscale, palette, RGBA and 16-bit images to RGB and name the file of any image that cannot be
read. Unreadable files are found up front by `drop_unreadable_images` (on by default in the example scripts): each is
named in a warning, skipped, and counted.

The embedded default is ELPV (Deitsch et al., Solar Energy 2019; the `elpv-dataset` package): 2,624 real 300x300
grayscale electroluminescence images of solar cells, each labeled with a defect probability in {0, 1/3, 2/3, 1}.
"""

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, v2
from transformers import ViTImageProcessor


logger = logging.getLogger(__name__)

ELPV_NAME = "elpv"
ELPV_CLASS_NAMES = ("0", "1/3", "2/3", "1")  # the defect probability of a cell
ELPV_DEFECTIVE_CLASSES = (2, 3)  # defect probability >= 0.5
ELPV_TEST_SIZE = 0.25
ELPV_SPLIT_SEED = 42


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def elpv_directory() -> Path:
    """The folder of the installed `elpv-dataset` package's images and `labels.csv`."""
    try:
        import elpv_dataset
    except ImportError as error:
        raise ImportError(
            "The embedded ELPV data set needs the `elpv-dataset` package: `pip install elpv-dataset` (or "
            "`pip install g2sd-hf[demo]`)."
        ) from error
    return Path(elpv_dataset.__file__).parent / "data"


def load_elpv(test_size: float = ELPV_TEST_SIZE, seed: int = ELPV_SPLIT_SEED) -> datasets.DatasetDict:
    """The ELPV solar-cell images as `train`/`test` splits, stratified by class (75/25, seed 42 by default).

    Columns: `image` (file path, not decoded), `label` (`ClassLabel` with names "0", "1/3", "2/3", "1": the defect
    probability), `defect_probability` (float) and `cell_type` ("mono" or "poly").

    The split is random at the cell level: cells of one solar module can fall on both sides (the package does not
    record which module a cell comes from), which is easier than a split by module.

    The table is written once to `datasets`' cache folder, so that `map`/`filter` results on it are cached too.
    """
    from importlib.metadata import version

    folder = elpv_directory()
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "g2sd_hf" / f"elpv-{version('elpv-dataset')}"
    if not (cache / "dataset_info.json").exists():
        _elpv_table(folder).save_to_disk(str(cache))
    dataset = datasets.load_from_disk(str(cache))
    return dataset.train_test_split(test_size=test_size, stratify_by_column="label", seed=seed)


def _elpv_table(folder: Path) -> datasets.Dataset:
    rows = []
    with open(folder / "labels.csv") as handle:
        for line in csv.reader(handle, delimiter=" ", skipinitialspace=True):
            path, probability, cell_type = line
            rows.append((str(folder / path), float(probability), cell_type))
    levels = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "label": datasets.ClassLabel(names=list(ELPV_CLASS_NAMES)),
            "defect_probability": datasets.Value("float32"),
            "cell_type": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [{"path": path, "bytes": None} for path, _, _ in rows],
            "label": [int(np.abs(levels - probability).argmin()) for _, probability, _ in rows],
            "defect_probability": [probability for _, probability, _ in rows],
            "cell_type": [cell_type for _, _, cell_type in rows],
        },
        features=features,
    )


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    image_column_name: str = "image",
    label_column_name: str | None = "label",
    validation_split: float = 0.15,
    seed: int = ELPV_SPLIT_SEED,
    cache_dir: str | None = None,
    token: str | None = None,
) -> datasets.DatasetDict:
    """Load images from the Hub (`dataset_name`), local folders (`train_dir`, `validation_dir`) or ELPV (default).

    Returns `train` and `validation` splits (a Hub/folder set without a validation split is split `validation_split`
    of its training set, stratified when labeled; ELPV's held-out split is its 25% test split) with the image column
    renamed to `image` and not decoded, and the label column renamed to `label`.
    """
    if dataset_name in (None, ELPV_NAME) and train_dir is None:
        splits = load_elpv()  # the documented fixed split, whatever the training seed
        return datasets.DatasetDict(train=splits["train"], validation=splits["test"])
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
    else:
        data_files = {"train": os.path.join(train_dir, "**")}
        if validation_dir is not None:
            data_files["validation"] = os.path.join(validation_dir, "**")
        raw = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    raw = _standardize_columns(raw, image_column_name, label_column_name)
    if "validation" not in raw:
        for name in ("val", "test"):
            if name in raw:
                raw["validation"] = raw.pop(name)
                break
    if "validation" not in raw:
        stratify = "label" if "label" in raw["train"].column_names and isinstance(raw["train"].features["label"], datasets.ClassLabel) else None
        split = raw["train"].train_test_split(test_size=validation_split, stratify_by_column=stratify, seed=seed)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return datasets.DatasetDict(train=raw["train"], validation=raw["validation"])


def _standardize_columns(raw: datasets.DatasetDict, image_column_name: str, label_column_name: str | None):
    columns = raw["train"].column_names
    if image_column_name not in columns:
        raise ValueError(
            f"No image column {image_column_name!r} in the data set (columns: {columns}): pass --image_column_name."
        )
    if image_column_name != "image":
        raw = raw.rename_column(image_column_name, "image")
    if label_column_name and label_column_name in columns and label_column_name != "label":
        raw = raw.rename_column(label_column_name, "label")
    return raw.cast_column("image", datasets.Image(decode=False))


def class_names(dataset: datasets.Dataset) -> list[str]:
    """The names of the `label` column's classes (refusing an unlabeled or non-`ClassLabel` column)."""
    feature = dataset.features.get("label")
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            "Classification needs a `label` column of class indices (a ClassLabel feature); found "
            f"{feature!r}. Pass --label_column_name, or use an image folder with one sub-folder per class."
        )
    return list(feature.names)


# --------------------------------------------------------------------------------------------------------------------
# Decoding and unreadable files
# --------------------------------------------------------------------------------------------------------------------
def describe_image(image: dict) -> str:
    return image.get("path") or "<in-memory image bytes>"


def open_rgb_image(image: dict) -> Image.Image:
    """Decode an `Image(decode=False)` value to an RGB PIL image (grayscale, palette, RGBA and 16-bit converted),
    turned upright by its EXIF orientation as `datasets` does when it decodes.

    Raises:
        ValueError: naming the file, when it cannot be read.
    """
    try:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with Image.open(source) as opened:
            opened.load()
            opened = ImageOps.exif_transpose(opened)
            if opened.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(opened, dtype=np.float32)
                span = max(float(array.max() - array.min()), 1e-6)
                opened = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ValueError(
            f"Cannot read image {describe_image(image)}: {error}. Remove or replace the file, or let the loader skip "
            "unreadable images (drop_unreadable_images / --drop_unreadable_images true)."
        ) from error


def _is_readable(example: dict) -> bool:
    try:
        open_rgb_image(example["image"])
        return True
    except ValueError:
        return False


def drop_unreadable_images(dataset: datasets.Dataset, num_proc: int | None = None) -> tuple[datasets.Dataset, list[str]]:
    """Decode every image once and drop those that cannot be read, naming each in a warning.

    Returns:
        `(dataset, skipped)`: the readable rows, and the paths of the skipped files.
    """
    readable = dataset.filter(_is_readable, num_proc=num_proc, desc="Checking images")
    skipped = []
    if len(readable) != len(dataset):
        kept = {describe_image(image) for image in readable["image"]}
        skipped = [describe_image(image) for image in dataset["image"] if describe_image(image) not in kept]
        for path in skipped:
            logger.warning(f"Skipping unreadable image {path}")
        logger.warning(f"Skipped {len(skipped)} unreadable image(s) of {len(dataset)}.")
    return readable, skipped


# --------------------------------------------------------------------------------------------------------------------
# Arguments of the example scripts
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DataArguments:
    """Where the images come from and how they are prepared (shared by the example scripts)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub data set (e.g. 'imagenet-1k'), or 'elpv'. Without it and without --train_dir, the "
                  "embedded ELPV solar-cell images are used."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub data set's configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "A local image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A local validation image folder."})
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the class indices."})
    validation_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training set held out when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    drop_unreadable_images: bool = field(
        default=True,
        metadata={"help": "Decode every image once and skip unreadable ones with a warning naming each file. With "
                  "false, an unreadable image stops training with an error naming the file."},
    )
    max_image_side: int | None = field(
        default=None,
        metadata={"help": "Re-encode the images once (cached) so their longer side is at most this: faster decoding "
                  "of large images at every epoch."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for the preparation."})

    def __post_init__(self):
        if self.dataset_name not in (None, ELPV_NAME) and self.train_dir is not None:
            raise ValueError("Give either --dataset_name or --train_dir, not both.")
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("--validation_dir needs --train_dir.")


@dataclass
class MaskedImageAugmentationArguments:
    """Augmentation of generic distillation and MAE pre-training (the paper's)."""

    min_crop_scale: float = field(default=0.2, metadata={"help": "RandomResizedCrop's smallest area fraction."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})

    def train_transform(self, image_size: int, image_mean: Sequence[float], image_std: Sequence[float]):
        return generic_distillation_transform(image_size, image_mean, image_std, self.min_crop_scale, self.horizontal_flip)


@dataclass
class ClassificationAugmentationArguments:
    """Augmentation of fine-tuning and specific distillation (DeiT/MAE's; mixup/cutmix are training arguments)."""

    min_crop_scale: float = field(default=0.08, metadata={"help": "RandomResizedCrop's smallest area fraction."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment (2 ops)."})
    rand_augment_magnitude: int = field(default=9, metadata={"help": "RandAugment magnitude."})
    random_erasing: float = field(default=0.25, metadata={"help": "Random-erasing probability."})
    positive_classes: str | None = field(
        default=None,
        metadata={"help": "Comma-separated class names counted as positive for a binary accuracy (ELPV default: "
                  "'2/3,1', the defective cells)."},
    )

    def train_transform(self, image_size: int, image_mean: Sequence[float], image_std: Sequence[float]):
        return classification_train_transform(
            image_size,
            image_mean,
            image_std,
            min_crop_scale=self.min_crop_scale,
            horizontal_flip=self.horizontal_flip,
            rand_augment=self.rand_augment,
            rand_augment_magnitude=self.rand_augment_magnitude,
            random_erasing=self.random_erasing,
        )

    def positive_class_indices(self, data_args: DataArguments, labels: Sequence[str]) -> list[int] | None:
        """Indices of `positive_classes` (ELPV: the defective classes by default); `None` for no binary accuracy."""
        labels = list(labels)
        if self.positive_classes is not None:
            names = [name.strip() for name in self.positive_classes.split(",")]
            unknown = [name for name in names if name not in labels]
            if unknown:
                raise ValueError(f"--positive_classes {unknown} are not classes of the data set ({labels}).")
            return [labels.index(name) for name in names]
        is_elpv = data_args.dataset_name in (None, ELPV_NAME) and data_args.train_dir is None
        return list(ELPV_DEFECTIVE_CLASSES) if is_elpv else None


def prepare_splits(
    data_args: DataArguments, seed: int, cache_dir: str | None = None, token: str | None = None
) -> tuple[datasets.DatasetDict, dict[str, int]]:
    """Load, subsample, check and (optionally) shrink the `train` and `validation` splits of `data_args`.

    Returns:
        `(splits, counts)`: the splits, and the number of unreadable images skipped in each.
    """
    splits = load_image_dataset(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        image_column_name=data_args.image_column_name,
        label_column_name=data_args.label_column_name,
        validation_split=data_args.validation_split,
        seed=seed,
        cache_dir=cache_dir,
        token=token,
    )
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    counts = {}
    for name, limit in limits.items():
        split = splits[name]
        if limit is not None:
            split = split.select(range(min(limit, len(split))))
        if data_args.drop_unreadable_images:
            split, skipped = drop_unreadable_images(split, num_proc=data_args.preprocessing_num_workers)
            counts[f"skipped_{name}_images"] = len(skipped)
        if data_args.max_image_side is not None:
            split = resize_images(split, data_args.max_image_side, num_proc=data_args.preprocessing_num_workers)
        splits[name] = split
    return splits, counts


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------
def _to_normalized_tensor(image_mean: Sequence[float], image_std: Sequence[float]) -> list:
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(image_mean, image_std)]


def _random_resized_crop(image_size: int, min_crop_scale: float):
    return v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC)


def generic_distillation_transform(
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    min_crop_scale: float = 0.2,
    horizontal_flip: bool = True,
) -> v2.Compose:
    """The paper's generic-distillation augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip + normalize.

    Takes an RGB PIL image, returns a normalized `(3, image_size, image_size)` float tensor.
    """
    steps = [_random_resized_crop(image_size, min_crop_scale)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalized_tensor(image_mean, image_std))


def classification_train_transform(
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    min_crop_scale: float = 0.08,
    horizontal_flip: bool = True,
    rand_augment: bool = True,
    rand_augment_magnitude: int = 9,
    random_erasing: float = 0.25,
) -> v2.Compose:
    """DeiT/MAE fine-tuning augmentation: RandomResizedCrop + flip + RandAugment(2, 9) + normalize + random erasing.

    Mixup/cutmix act on whole batches and live in `SpecificDistillationTrainer`.
    """
    steps = [_random_resized_crop(image_size, min_crop_scale)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if rand_augment:
        steps.append(v2.RandAugment(num_ops=2, magnitude=rand_augment_magnitude, interpolation=InterpolationMode.BICUBIC))
    steps += _to_normalized_tensor(image_mean, image_std)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps)


def evaluation_transform(image_size: int, image_mean: Sequence[float], image_std: Sequence[float]) -> v2.Compose:
    """Resize to `image_size` x `image_size` (bicubic) and normalize: what the saved `ViTImageProcessor` does."""
    resize = v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    return v2.Compose([resize] + _to_normalized_tensor(image_mean, image_std))


def image_processor(image_size: int, image_mean: Sequence[float], image_std: Sequence[float]) -> ViTImageProcessor:
    """The `ViTImageProcessor` saved with a checkpoint: `evaluation_transform`'s square bicubic resize and
    normalization, for `pipeline(...)` and other users of the saved model."""
    return ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(image_mean),
                             image_std=list(image_std), resample=3)


class ImageTransform:
    """A `datasets` batch transform: decode each image to RGB, apply `transform`, keep the labels.

    Example:

    ```python
    >>> train = dataset.with_transform(ImageTransform(generic_distillation_transform(224, mean, std)))
    >>> train[0]["pixel_values"].shape
    torch.Size([3, 224, 224])
    ```
    """

    def __init__(self, transform, with_labels: bool = False):
        self.transform = transform
        self.with_labels = with_labels

    def __call__(self, batch: dict) -> dict:
        output = {"pixel_values": [self.transform(open_rgb_image(image)) for image in batch["image"]]}
        if self.with_labels:
            output["labels"] = batch["label"]
        return output


def collate_classification(examples: list[dict]) -> dict:
    """Stack `pixel_values` and `labels` of `ImageTransform(..., with_labels=True)` examples into a batch."""
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples])}


def resize_images(dataset: datasets.Dataset, max_side: int, num_proc: int | None = None) -> datasets.Dataset:
    """Re-encode every image so that its longer side is at most `max_side` (PNG), once, in `datasets`' cache.

    Decoding small images is much cheaper than decoding large ones at every epoch; the random crops of the
    transforms then start from these.
    """

    def shrink(example):
        image = open_rgb_image(example["image"])
        if max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"image": {"bytes": buffer.getvalue(), "path": example["image"].get("path")}}

    return dataset.map(shrink, num_proc=num_proc, desc=f"Resizing images to <= {max_side}px")


__all__ = [
    "ClassificationAugmentationArguments",
    "DataArguments",
    "MaskedImageAugmentationArguments",
    "ELPV_CLASS_NAMES",
    "ELPV_DEFECTIVE_CLASSES",
    "ImageTransform",
    "class_names",
    "classification_train_transform",
    "collate_classification",
    "drop_unreadable_images",
    "evaluation_transform",
    "generic_distillation_transform",
    "image_processor",
    "load_elpv",
    "load_image_dataset",
    "open_rgb_image",
    "prepare_splits",
    "resize_images",
]
