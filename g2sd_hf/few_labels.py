"""Few labels, many images: a labeled fraction of a training set, unlabeled images beside it, and one training set
that holds both.

Specific distillation's distillation term needs no label: the teacher's output on an image is the target. So the
student can learn from the teacher on every image, and from the labels on the labeled ones (SimCLRv2's
big-teacher-then-distill recipe, with G2SD's loss). Labeled and unlabeled images share one shuffled training set; an
unlabeled row's label is `UNLABELED` (-1, what `datasets.ClassLabel` stores for a missing label), which the trainer
masks out of the task loss (`losses.labeled_cross_entropy`).

- `split_labels`: keep a stratified, seeded fraction of a labeled set's labels; the rest become unlabeled images.
- `load_unlabeled_images`: a folder or a data set whose labels, if any, are ignored.
- `with_unlabeled`: one training set of labeled rows and unlabeled rows (`label = UNLABELED`).
- `count_unlabeled`, `labeled_rows`: how many rows of a training set are unlabeled; its labeled rows.
- `check_unlabeled_sizes`: refuses unlabeled images at another size than the labeled ones.
"""

import logging
import statistics

import datasets
import numpy as np

from .data import check_image_folder, open_rgb_image


logger = logging.getLogger(__name__)

# The label of an unlabeled image: `datasets.ClassLabel`'s value for a missing label.
UNLABELED = -1
# Unlabeled images whose typical shorter side differs from the labeled images' by more than this factor are refused:
# the same random crops would show objects at another scale than the labels were learned at.
MAX_SIZE_RATIO = 2.0
# Images read (sizes only) to compare the two sets.
SIZE_SAMPLE = 32


def check_label_fraction(fraction: float) -> None:
    """Refuse a label fraction outside (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--label_fraction must be in (0, 1], got {fraction} (1 keeps every label).")


def split_labels(dataset: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Keep the labels of a stratified fraction of `dataset`: `round(fraction * n_c)` images of each class `c`, drawn
    with `seed`; the other images are returned without their labels.

    Args:
        dataset (`datasets.Dataset`): A labeled set (an `image` column and a `ClassLabel` `label` column).
        fraction (`float`): In (0, 1]; 1 keeps every label.
        seed (`int`): The draw's seed: the same seed and data give the same labeled images (fine-tune the teacher
            and distill the students with the same one).

    Returns:
        `(labeled, unlabeled)`: the labeled rows, in their original order, and the other rows' images only.

    Raises:
        ValueError: for a fraction outside (0, 1], or one that leaves a class without a labeled image (naming the
            class and the smallest fraction that keeps one).

    Example:

    ```python
    >>> labeled, unlabeled = split_labels(elpv_train, fraction=0.1, seed=0)  # 1,968 cells -> 197 labeled
    ```
    """
    check_label_fraction(fraction)
    if fraction == 1:
        return dataset, dataset.select([]).select_columns(["image"])
    labels = np.asarray(dataset.with_format("numpy")["label"])
    names = dataset.features["label"].names
    generator = np.random.default_rng(seed)
    keep = []
    for index, name in enumerate(names):
        rows = np.flatnonzero(labels == index)
        count = round(fraction * len(rows))
        if len(rows) and count == 0:
            raise ValueError(
                f"--label_fraction {fraction} leaves class {name!r} ({len(rows)} training images) without a labeled "
                f"image. Use a fraction of at least {1 / len(rows):.3g}, or label more images of that class."
            )
        keep.extend(generator.permutation(rows)[:count].tolist())
    keep = sorted(keep)
    kept = set(keep)
    rest = [row for row in range(len(dataset)) if row not in kept]
    return dataset.select(keep), dataset.select(rest).select_columns(["image"])


def load_unlabeled_images(
    train_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column_name: str = "image",
    cache_dir: str | None = None,
    token: str | None = None,
    left_out: dict[str, str] | None = None,
) -> datasets.Dataset:
    """Images without labels: a folder (any layout; sub-folder names are ignored) or a data set's `split` (its labels,
    if any, are ignored). Returns a data set with one `image` column, not decoded. With `left_out`, the folder's files
    that are not loaded are added to it, path -> reason (`check_image_folder`).

    Example:

    ```python
    >>> unlabeled = load_unlabeled_images(train_dir="path/to/more/cells")
    ```
    """
    if (train_dir is None) == (dataset_name is None):
        raise ValueError("Give the unlabeled images as --unlabeled_train_dir or --unlabeled_dataset_name (one).")
    if train_dir is not None:
        # Refuses links and undecodable names, says what hidden files are left out, and lists the images.
        files = check_image_folder("--unlabeled_train_dir", train_dir, left_out)
        table = datasets.Dataset.from_dict({"image": files})
    else:
        table = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir, token=token)
        if image_column_name not in table.column_names:
            raise ValueError(
                f"No image column {image_column_name!r} in --unlabeled_dataset_name {dataset_name} (columns: "
                f"{table.column_names}): pass --unlabeled_image_column_name."
            )
        table = table.select_columns([image_column_name]).rename_column(image_column_name, "image")
    return table.cast_column("image", datasets.Image(decode=False))


def with_unlabeled(labeled: datasets.Dataset, unlabeled: datasets.Dataset | None) -> datasets.Dataset:
    """One training set: the labeled rows, then the unlabeled images with `label = UNLABELED` (the trainer shuffles).

    Example:

    ```python
    >>> train = with_unlabeled(labeled, unlabeled)
    >>> count_unlabeled(train) == len(unlabeled)
    True
    ```
    """
    if unlabeled is None or not len(unlabeled):
        return labeled
    labeled = labeled.select_columns(["image", "label"])
    missing = unlabeled.select_columns(["image"]).add_column("label", [UNLABELED] * len(unlabeled))
    missing = missing.cast(labeled.features)
    return datasets.concatenate_datasets([labeled, missing])


def _labels(dataset) -> np.ndarray | None:
    """The raw label column (`label`, or `labels` in a pre-processed set), read without the set's transform."""
    if not isinstance(dataset, datasets.Dataset):
        return None
    column = next((name for name in ("label", "labels") if name in dataset.column_names), None)
    return None if column is None else np.asarray(dataset.with_format("numpy")[column])


def count_unlabeled(dataset) -> int:
    """How many rows of a training set are unlabeled (`label == UNLABELED`); 0 for any other kind of data set."""
    labels = _labels(dataset)
    return 0 if labels is None or labels.ndim != 1 else int(np.count_nonzero(labels == UNLABELED))


def labeled_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    """The labeled rows of a training set made by `with_unlabeled` (its format and transform kept)."""
    return dataset.select(np.flatnonzero(_labels(dataset) != UNLABELED).tolist())


def typical_shorter_side(dataset: datasets.Dataset, sample: int = SIZE_SAMPLE) -> int:
    """The median shorter side, in pixels, of up to `sample` images spread over `dataset`."""
    rows = np.linspace(0, len(dataset) - 1, num=min(sample, len(dataset))).round().astype(int)
    images = dataset.select_columns(["image"]).select(sorted(set(rows.tolist())))["image"]
    return int(statistics.median(min(open_rgb_image(image).size) for image in images))


def check_unlabeled_sizes(labeled: datasets.Dataset, unlabeled: datasets.Dataset, model_size: int) -> None:
    """Refuse unlabeled images at another size than the labeled ones (median shorter side more than
    `MAX_SIZE_RATIO` apart on a sample): both are cropped and resized to the teacher's input (`model_size` px) by
    the same transform, so objects would appear at another scale in the images only the teacher sees."""
    if not len(labeled) or not len(unlabeled):
        return
    labeled_side, unlabeled_side = typical_shorter_side(labeled), typical_shorter_side(unlabeled)
    ratio = max(labeled_side, unlabeled_side) / max(min(labeled_side, unlabeled_side), 1)
    if ratio > MAX_SIZE_RATIO:
        raise ValueError(
            f"The unlabeled images are at another size than the labeled ones: a typical shorter side of "
            f"{unlabeled_side} px against {labeled_side} px (both are cropped and resized to the teacher's "
            f"{model_size} px input by the same transform, so their objects would be {ratio:.1f}x larger or "
            "smaller). Resize the unlabeled images to the labeled images' size (or give both sets one size, e.g. "
            "with --max_image_side when both are larger), then run again."
        )
    logger.info(f"Labeled and unlabeled images: typical shorter side {labeled_side} px and {unlabeled_side} px.")


__all__ = [
    "UNLABELED",
    "check_label_fraction",
    "check_unlabeled_sizes",
    "count_unlabeled",
    "labeled_rows",
    "load_unlabeled_images",
    "split_labels",
    "with_unlabeled",
]
