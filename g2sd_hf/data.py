"""Image data for G2SD: loading (a Hub data set, a local image folder, or the ELPV set by name) and the transforms.

Every loader returns a `datasets.DatasetDict` with an `image` column that is *not* decoded by `datasets`
(`Image(decode=False)`) and, for labeled data, a `label` `ClassLabel` column. Images are decoded by the transforms
here exactly as a saved checkpoint's `pipeline()` decodes them (`open_rgb_image`: transformers' `load_image`), and
the file of any image that cannot be read, or that this decoding would clip (high bit depth), is named. Such files
are found up front by `drop_unreadable_images` (on by default in the example scripts): each is named in a warning with
the reason, skipped, and counted.

The library never picks a data set: without a data set name or a folder, loading fails with the ways to give one.
`elpv` names the ELPV images (Deitsch et al., Solar Energy 2019; the `elpv-dataset` package, the demo's data): 2,624
real 300x300 grayscale electroluminescence images of solar cells, each labeled with a defect probability in
{0, 1/3, 2/3, 1}.
"""

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, v2
from transformers import BitImageProcessor, ViTImageProcessor
from transformers.image_utils import PILImageResampling, load_image

from .metrics import check_class_names


logger = logging.getLogger(__name__)

ELPV_NAME = "elpv"
ELPV_CLASS_NAMES = ("0", "1/3", "2/3", "1")  # the defect probability of a cell
ELPV_DEFECTIVE_CLASSES = (2, 3)  # defect probability >= 0.5
# ELPV's two tasks (Deitsch et al. report both), as the data set's configurations: the four defect probabilities, or
# functional vs defective cells (defect probability >= 0.5).
ELPV_TASKS = {"defect-probability": ELPV_CLASS_NAMES, "defective": ("functional", "defective")}
ELPV_DEFAULT_TASK = "defect-probability"
ELPV_TEST_SIZE = 0.25
ELPV_SPLIT_SEED = 42
# The release's fine-tuning RandAugment (timm policy string): 2 ops, magnitude 9 (std 0.5), increasing ops.
RELEASE_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def require_data_source(dataset_name: str | None, train_dir: str | None, named_sources: dict[str, str]) -> None:
    """Refuse to go on without data, listing the ways to give it (a library never picks a data set for the user).

    Args:
        dataset_name (`str`, *optional*): `--dataset_name`.
        train_dir (`str`, *optional*): `--train_dir`.
        named_sources (`dict[str, str]`): The data sets known by name (e.g. `{"elpv": "the ELPV solar cells ..."}`).
    """
    if dataset_name is None and train_dir is None:
        named = "".join(f"\n  --dataset_name {name}: {description}" for name, description in named_sources.items())
        raise ValueError(
            "No training data given. Give one of:\n  --dataset_name <a Hub data set, e.g. imagenet-1k>"
            "\n  --train_dir <a local folder> [--validation_dir <a local folder>]"
            f"{named}"
        )


ELPV_DESCRIPTION = (
    "the ELPV solar-cell images of the `elpv-dataset` package (offline; --dataset_config_name defective for the "
    "two-class task)"
)
NAMED_DATA_SETS = {ELPV_NAME: ELPV_DESCRIPTION}


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


def load_elpv(
    test_size: float = ELPV_TEST_SIZE, seed: int = ELPV_SPLIT_SEED, task: str = ELPV_DEFAULT_TASK
) -> datasets.DatasetDict:
    """The ELPV solar-cell images as `train`/`test` splits, stratified by defect probability (75/25, seed 42 by
    default). Both tasks share the split: the same cells are held out.

    Columns: `image` (file path, not decoded), `label`, `defect_probability` (float) and `cell_type` ("mono" or
    "poly"). `label` is a `ClassLabel`: with `task="defect-probability"`, the four defect probabilities "0", "1/3",
    "2/3", "1"; with `task="defective"`, "functional" (probability < 0.5) or "defective" (Deitsch et al.'s two-class
    task).

    The split is random at the cell level: cells of one solar module can fall on both sides (the package does not
    record which module a cell comes from), which is easier than a split by module.

    The table is written once to `datasets`' cache folder, so that `map`/`filter` results on it are cached too.
    """
    from importlib.metadata import version

    if task not in ELPV_TASKS:
        raise ValueError(f"Unknown ELPV task {task!r}: choose one of {sorted(ELPV_TASKS)} (--dataset_config_name).")
    folder = elpv_directory()
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "g2sd_hf" / f"elpv-{version('elpv-dataset')}"
    if not (cache / "dataset_info.json").exists():
        _elpv_table(folder).save_to_disk(str(cache))
    dataset = datasets.load_from_disk(str(cache))
    splits = dataset.train_test_split(test_size=test_size, stratify_by_column="label", seed=seed)
    if task == "defective":
        features = splits["train"].features.copy()
        features["label"] = datasets.ClassLabel(names=list(ELPV_TASKS[task]))
        splits = splits.map(
            lambda batch: {"label": [int(label in ELPV_DEFECTIVE_CLASSES) for label in batch["label"]]},
            batched=True,
            features=features,
            desc="ELPV: functional vs defective",
        )
    return splits


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
    left_out: dict[str, str] | None = None,
) -> datasets.DatasetDict:
    """Load images from the Hub (`dataset_name`), local folders (`train_dir`, `validation_dir`) or ELPV (`"elpv"`).

    Returns `train` and `validation` splits (a Hub/folder set without a validation split is split `validation_split`
    of its training set, stratified when labeled; ELPV's held-out split is its 25% test split) with the image column
    renamed to `image` and not decoded, and the label column renamed to `label`. No image is decoded. With
    `left_out`, the files of the folders that are not loaded are added to it, path -> reason (`check_image_folder`).
    """
    require_data_source(dataset_name, train_dir, NAMED_DATA_SETS)
    if dataset_name == ELPV_NAME:
        splits = load_elpv(task=dataset_config_name or ELPV_DEFAULT_TASK)  # the fixed split, whatever the seed
        return datasets.DatasetDict(train=splits["train"], validation=splits["test"])
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
    else:
        for flag, folder in (("--train_dir", train_dir), ("--validation_dir", validation_dir)):
            if folder is not None:
                check_image_folder(flag, folder, left_out)
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
    _check_class_sets(raw, train_dir, validation_dir)
    if "validation" not in raw:
        stratify = (
            "label"
            if "label" in raw["train"].column_names and isinstance(raw["train"].features["label"], datasets.ClassLabel)
            else None
        )
        split = raw["train"].train_test_split(test_size=validation_split, stratify_by_column=stratify, seed=seed)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    return datasets.DatasetDict(train=raw["train"], validation=raw["validation"])


IMAGE_SUFFIXES = frozenset(suffix.lower() for suffix in Image.registered_extensions())
# What the image-folder loader reads besides images (labels and other columns), so not left out.
IMAGE_FOLDER_METADATA_FILES = frozenset({"metadata.csv", "metadata.jsonl", "metadata.parquet"})


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # a name that is not UTF-8 on disk comes back with surrogate escapes, which do not encode
        return True
    except UnicodeEncodeError:
        return False


def check_image_folder(flag: str, folder: str, left_out: dict[str, str] | None = None) -> list[str]:
    """Refuse, naming it, what `datasets` would fail on obscurely or drop without a word: a folder that does not exist
    or holds no image file, a symlinked folder inside it (skipped by the image-folder loader: a class would vanish),
    and a file or folder whose name is not valid UTF-8; say what hidden (dot) files and folders, and files that are
    not images, are left out.

    Args:
        left_out (`dict`, *optional*): When given, each file or folder left out is added to it, path -> reason.

    Returns:
        `list[str]`: the paths of the image files it holds (hidden ones left out), sorted.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{flag} {folder}: no such folder. Give a folder of images, with one sub-folder per class.")
    images, hidden, others = [], [], []
    for root, folders, files in os.walk(path, followlinks=False):
        for name in folders + files:
            if not _is_utf8(name):
                shown = os.path.join(root, name).encode("utf-8", "surrogateescape")
                raise ValueError(
                    f"{flag} {folder}: the name {shown!r} is not valid UTF-8, which the data set cannot store. Rename it."
                )
        for name in folders:
            if os.path.islink(os.path.join(root, name)):
                raise ValueError(
                    f"{flag} {folder}: {os.path.join(root, name)} is a symbolic link to a folder, which the image-folder "
                    "loader skips (its images, a whole class if it is a class folder, would be left out). Replace the "
                    "link with the folder itself (copy it), then run again."
                )
        hidden += [os.path.join(root, name) for name in folders + files if name.startswith(".")]
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                images.append(os.path.join(root, name))
            elif name not in IMAGE_FOLDER_METADATA_FILES:
                others.append(os.path.join(root, name))
    for paths, reason in ((hidden, "hidden (its name starts with '.')"), (others, "not an image file")):
        if paths:
            logger.warning(
                f"{flag} {folder}: {len(paths)} file(s) or folder(s) left out, {reason}: "
                f"{', '.join(sorted(paths)[:5])}{', ...' if len(paths) > 5 else ''}."
            )
        if left_out is not None:
            left_out.update(dict.fromkeys(sorted(paths), reason))
    if not images:
        raise ValueError(
            f"{flag} {folder} holds no image file (looked for {', '.join(sorted(IMAGE_SUFFIXES)[:8])}, ... in it and its "
            "sub-folders). Put the images in it, one sub-folder per class."
        )
    return sorted(images)


def _check_class_sets(raw: datasets.DatasetDict, train_dir: str | None, validation_dir: str | None) -> None:
    """Refuse a validation split with a class the training split never shows (a class the model could not learn,
    scored 0), and, for local folders, a validation folder that lacks one of the training folder's classes."""
    if "validation" not in raw or "label" not in raw["train"].column_names:
        return
    feature = raw["train"].features["label"]
    if not isinstance(feature, datasets.ClassLabel):
        return
    present = {
        name: {feature.int2str(int(value)) for value in raw[name].unique("label")} for name in ("train", "validation")
    }
    unseen = sorted(present["validation"] - present["train"])
    missing = sorted(present["train"] - present["validation"]) if validation_dir is not None else []
    if unseen or missing:
        where = (
            f"--train_dir {train_dir} and --validation_dir {validation_dir}"
            if validation_dir is not None
            else "the training and validation splits"
        )
        raise ValueError(
            f"{where} hold different classes: "
            + "; ".join(
                text
                for text in (
                    f"{unseen} only in validation (never trained on)" if unseen else "",
                    f"{missing} only in training (never evaluated)" if missing else "",
                )
                if text
            )
            + ". Give both splits the same class folders (or move the images of those classes)."
        )


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
    if feature is None:
        raise ValueError(
            "Classification needs labels, and the data has no `label` column. An image folder gets labels from its "
            "sub-folders only when it has two or more (one per class): a folder with a single class sub-folder, or "
            "with the images directly in it, has none. Give one sub-folder per class (at least two), or, for a Hub "
            "data set, name its label column with --label_column_name."
        )
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"Classification needs a `label` column of class indices (a ClassLabel feature); found {feature!r}. Pass "
            "--label_column_name with the data set's class column, or use an image folder with one sub-folder per class."
        )
    if len(feature.names) < 2:
        raise ValueError(
            f"The data has a single class ({feature.names}): there is nothing to classify. Give at least two."
        )
    check_class_names(feature.names)
    return list(feature.names)


# --------------------------------------------------------------------------------------------------------------------
# Decoding and unreadable files
# --------------------------------------------------------------------------------------------------------------------
def describe_image(image: dict) -> str:
    return image.get("path") or "<in-memory image bytes>"


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def rescale_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image stretched min-to-max onto 0-255 (mode `L`).

    The package decodes images as transformers' `pipeline()` does (`open_rgb_image`), whose 8-bit conversion clips
    values above 255; it therefore refuses such images instead of training on inputs the served model would never
    see. Convert them once with this function, and do the same to each image you send to the served model.

    Example:

    ```python
    >>> for path in Path("scans").rglob("*.png"):
    ...     rescale_to_8bit(Image.open(path)).save(Path("scans-8bit") / path.relative_to("scans"))
    >>> classifier(rescale_to_8bit(Image.open("new-scan.png")))
    ```
    """
    array = np.asarray(image, dtype=np.float64)
    span = max(float(array.max() - array.min()), 1e-12)
    return Image.fromarray(np.round((array - array.min()) / span * 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, description: str) -> Image.Image:
    """An opened image as the served model receives it: transformers' `load_image` (EXIF orientation applied, then
    PIL's conversion to RGB), which `pipeline("image-classification")` applies to every file and PIL image.

    Raises:
        ValueError: for a 16-bit, 32-bit or float image with values outside 0-255, which PIL's conversion would clip
            (training on clipped images, or on images rescaled here but clipped when served, both mislead); the
            message names the file and `rescale_to_8bit`.
    """
    if image.mode in HIGH_BIT_DEPTH_MODES:
        low, high = image.getextrema()
        if low < 0 or high > 255:
            raise ValueError(
                f"{description} is a high-bit-depth image (mode {image.mode}, values {low}-{high}): the served "
                "model's pipeline() converts it to 8 bits by clipping at 255, so training on it would not match "
                "serving. Convert such images to 8 bits first, the same way for training and serving: "
                "g2sd_hf.data.rescale_to_8bit(image) (min-to-max), or your own fixed scale."
            )
    return load_image(image)


def open_rgb_image(image: dict) -> Image.Image:
    """Decode an `Image(decode=False)` value to an RGB PIL image exactly as `pipeline()` decodes the same file
    (`to_rgb`): upright by its EXIF orientation, converted by PIL (grayscale, palette, RGBA, CMYK, ...).

    Raises:
        ValueError: naming the file, when it cannot be read, or is a high-bit-depth image `pipeline()` would clip.
    """
    try:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with Image.open(source) as opened:
            opened.load()
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"Cannot read image {describe_image(image)}: {error} Pillow refuses images this large as a possible "
            "decompression bomb. Shrink the file, or, if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS before loading."
        ) from error
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ValueError(
            f"Cannot read image {describe_image(image)}: {error}. Remove or replace the file, or let the loader skip "
            "unreadable images (drop_unreadable_images / --drop_unreadable_images true)."
        ) from error
    return to_rgb(opened, f"Image {describe_image(image)}")


def unreadable_reason(image: dict) -> str | None:
    """Why `open_rgb_image` refuses `image` (its message), or `None` when it can be read."""
    try:
        open_rgb_image(image)
        return None
    except ValueError as error:
        return str(error)


def _is_readable(example: dict) -> bool:
    return unreadable_reason(example["image"]) is None


def drop_unreadable_images(
    dataset: datasets.Dataset, num_proc: int | None = None
) -> tuple[datasets.Dataset, dict[str, str]]:
    """Decode every image once and drop those that cannot be read, naming each in a warning with the reason.

    Returns:
        `(dataset, skipped)`: the readable rows, and the skipped files, path -> why `open_rgb_image` refused it.
    """
    readable = dataset.filter(_is_readable, num_proc=num_proc, desc="Checking images")
    skipped = {}
    if len(readable) != len(dataset):
        kept = {describe_image(image) for image in readable["image"]}
        for image in dataset["image"]:
            if describe_image(image) not in kept:
                skipped[describe_image(image)] = unreadable_reason(image)
                logger.warning(f"Skipping an image: {skipped[describe_image(image)]}")
        logger.warning(f"Skipped {len(skipped)} unreadable image(s) of {len(dataset)}.")
    return readable, skipped


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
    auto_augment: str | None = RELEASE_AUTO_AUGMENT,
    random_erasing: float = 0.25,
    random_erasing_mode: str = "pixel",
):
    """The release's fine-tuning augmentation, built by timm's `create_transform` as the release builds it:
    RandomResizedCrop (bicubic) + flip + RandAugment `rand-m9-mstd0.5-inc1` + normalize + random erasing of one box
    filled with per-pixel Gaussian noise. No color jitter (timm disables it when a RandAugment policy is given, and
    the release passes none).

    Mixup/cutmix act on whole batches and live in `SpecificDistillationTrainer`. Takes an RGB PIL image, returns a
    normalized `(3, image_size, image_size)` float tensor.
    """
    from timm.data import create_transform

    if auto_augment is not None and auto_augment.lower() in ("", "none"):
        auto_augment = None
    transform = create_transform(
        input_size=image_size,
        is_training=True,
        scale=(min_crop_scale, 1.0),
        hflip=0.5 if horizontal_flip else 0.0,
        color_jitter=None,
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=random_erasing,
        re_mode=random_erasing_mode,
        re_count=1,
        mean=tuple(image_mean),
        std=tuple(image_std),
    )
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize_keeping_any_bits
    return transform


def _posterize_keeping_any_bits(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, also for 0 bits: `rand-m9-mstd0.5-inc1`'s PosterizeIncreasing keeps 0 bits at the top
    magnitudes, which Pillow >= 13 refuses (`ValueError: bits must be between or equal to 1 and 8`) and older Pillow,
    the release's, turned into a black image."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def release_crop_ratio(image_size: int) -> float:
    """The release's evaluation crop ratio: 224/256 up to 224 pixels, 1.0 (no margin) above."""
    return 224 / 256 if image_size <= 224 else 1.0


def resized_shorter_side(image_size: int, crop_ratio: float | None = None) -> int:
    """The shorter side before the evaluation crop: `int(image_size / crop_ratio)` (the release's rounding down; a
    ratio read back from a saved processor gives its size again)."""
    crop_ratio = release_crop_ratio(image_size) if crop_ratio is None else crop_ratio
    return int(image_size / crop_ratio + 1e-6)


def evaluation_transform(
    image_size: int, image_mean: Sequence[float], image_std: Sequence[float], crop_ratio: float | None = None
) -> v2.Compose:
    """The release's evaluation transform (DeiT/MAE's): resize the shorter side to `int(image_size / crop_ratio)`
    (bicubic), center-crop `image_size`, normalize. `crop_ratio=None` is `release_crop_ratio(image_size)` (256 -> 224).
    The image processor saved with checkpoints (`image_processor`) does the same."""
    resize = v2.Resize(resized_shorter_side(image_size, crop_ratio), interpolation=InterpolationMode.BICUBIC)
    return v2.Compose([resize, v2.CenterCrop(image_size)] + _to_normalized_tensor(image_mean, image_std))


def image_processor(
    image_size: int, image_mean: Sequence[float], image_std: Sequence[float], crop_ratio: float | None = None
) -> BitImageProcessor:
    """The image processor saved with a classifier or encoder checkpoint, for `pipeline(...)` and other users: the
    shorter side resized to `int(image_size / crop_ratio)` (bicubic), center-cropped to `image_size`, normalized --
    `evaluation_transform`, as a transformers processor."""
    return BitImageProcessor(
        size={"shortest_edge": resized_shorter_side(image_size, crop_ratio)},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def processor_transform(processor) -> v2.Compose:
    """The torch transform that does what a saved image processor does, for scoring whole data sets fast: a
    shorter-side resize + center crop (`image_processor`'s) or a square resize (`ViTImageProcessor`'s), then the
    processor's normalization.

    Example:

    ```python
    >>> transform = processor_transform(AutoImageProcessor.from_pretrained("g2sd-student"))
    ```
    """
    size, mean, std = dict(processor.size), processor.image_mean, processor.image_std
    if getattr(processor, "do_center_crop", False) and size.get("shortest_edge"):
        crop = dict(processor.crop_size)["height"]
        return evaluation_transform(crop, mean, std, crop / size["shortest_edge"])
    if not size.get("height") or not size.get("width"):
        raise ValueError(
            f"Unsupported image processor size {size}: expected a square size, or a shorter-side resize with a "
            "center crop (g2sd_hf.data.image_processor)."
        )
    resize = v2.Resize((size["height"], size["width"]), interpolation=InterpolationMode.BICUBIC)
    return v2.Compose([resize] + _to_normalized_tensor(mean, std))


def dense_image_processor(
    image_size: int, image_mean: Sequence[float], image_std: Sequence[float]
) -> ViTImageProcessor:
    """The image processor of detection and segmentation checkpoints: the whole image resized to `image_size` x
    `image_size` (bicubic) and normalized -- nothing cropped away, since every pixel or box counts."""
    return ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(image_mean),
        image_std=list(image_std),
        resample=PILImageResampling.BICUBIC,
    )


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
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


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
    "ELPV_CLASS_NAMES",
    "ELPV_DEFECTIVE_CLASSES",
    "ELPV_TASKS",
    "ImageTransform",
    "check_image_folder",
    "class_names",
    "classification_train_transform",
    "collate_classification",
    "dense_image_processor",
    "drop_unreadable_images",
    "evaluation_transform",
    "generic_distillation_transform",
    "image_processor",
    "load_elpv",
    "load_image_dataset",
    "open_rgb_image",
    "processor_transform",
    "rescale_to_8bit",
    "release_crop_ratio",
    "resize_images",
    "to_rgb",
]
