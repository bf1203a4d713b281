"""The example scripts' arguments: where the data comes from and how it is augmented, and the dense scripts' models.

Dataclasses parsed by `HfArgumentParser` (`g2sd_hf.scripts.parse_arguments`), validated in `__post_init__` with a
message that says what to change, as in transformers' `examples/pytorch/*/run_*.py`.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import datasets

from ..configuration_g2sd import G2SDBackboneConfig
from ..data import (
    ELPV_DEFAULT_TASK,
    ELPV_DEFECTIVE_CLASSES,
    ELPV_NAME,
    NAMED_DATA_SETS,
    RELEASE_AUTO_AUGMENT,
    ImageTransform,
    classification_train_transform,
    drop_unreadable_images,
    evaluation_transform,
    generic_distillation_transform,
    load_image_dataset,
    require_data_source,
    resize_images,
)
from ..dense_data import NAMED_DENSE_DATA_SETS, SYNTHETIC_NAME
from ..few_labels import check_label_fraction, load_unlabeled_images, split_labels
from ..streaming import StreamingArguments, load_image_stream, training_stream
from .run import parse_overrides


class _DataSource:
    """What the classification and the dense data arguments share: one source, `dataset_name` (a Hub data set or a
    name in `named_sources`) or `train_dir`, never both and never none."""

    named_sources: ClassVar[dict[str, str]]

    @property
    def source_name(self) -> str:
        """The data set's name for the model card: `dataset_name`, or the training folder's name."""
        return self.dataset_name or Path(self.train_dir).resolve().name

    def __post_init__(self):
        if self.dataset_name is not None and self.train_dir is not None:
            raise ValueError("Give either --dataset_name or --train_dir, not both.")
        require_data_source(self.dataset_name, self.train_dir, self.named_sources)


@dataclass
class _EvaluationCrop:
    """The evaluation crop, shared by both augmentations (it also sets the saved image processor)."""

    eval_crop_ratio: float | None = field(
        default=None,
        kw_only=True,
        metadata={
            "help": "Evaluation and the saved image processor: resize the shorter side to image_size / ratio, "
            "then center-crop image_size. Default: the release's 224/256 up to 224 px, 1.0 above."
        },
    )

    def __post_init__(self):
        if self.eval_crop_ratio is not None and not 0 < self.eval_crop_ratio <= 1:
            raise ValueError(f"--eval_crop_ratio must be in (0, 1], got {self.eval_crop_ratio} (the release: 0.875).")

    def eval_transform(self, image_size: int, image_mean: Sequence[float], image_std: Sequence[float]):
        return evaluation_transform(image_size, image_mean, image_std, self.eval_crop_ratio)


# --------------------------------------------------------------------------------------------------------------------
# Classification: data and augmentation
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DataArguments(_DataSource):
    """Where the images come from and how they are prepared (shared by the example scripts)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub data set (e.g. 'imagenet-1k'), or 'elpv' (the ELPV solar-cell images of the "
            "elpv-dataset package, offline). Give it or --train_dir."
        },
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={
            "help": "The Hub data set's configuration; for 'elpv', the task: 'defect-probability' (4 classes, "
            "default) or 'defective' (functional vs defective)."
        },
    )
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
        metadata={
            "help": "Decode every image once and skip unreadable ones with a warning naming each file. With "
            "false, an unreadable image stops training with an error naming the file."
        },
    )
    max_image_side: int | None = field(
        default=None,
        metadata={
            "help": "Re-encode the images once (cached) so their longer side is at most this: faster decoding "
            "of large images at every epoch."
        },
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for the preparation."})
    label_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Keep the labels of this stratified fraction of the training images (drawn with "
            "--label_fraction_seed); the other training images become unlabeled images. For experiments with few "
            "labels: specific distillation learns from the teacher on them, fine-tuning leaves them out, generic "
            "distillation uses every image anyway."
        },
    )
    label_fraction_seed: int = field(
        default=0,
        metadata={
            "help": "The seed of --label_fraction's draw, apart from the training seed: give the teacher's fine-tuning "
            "and every student the same one, so that they share the labeled images."
        },
    )
    unlabeled_rest: bool = field(
        default=True,
        metadata={
            "help": "With --label_fraction below 1: the training images whose labels were left out are unlabeled "
            "images (for a teacher to teach from). false leaves them out (the paper's recipe on the few labels)."
        },
    )
    unlabeled_train_dir: str | None = field(
        default=None,
        metadata={"help": "A folder of unlabeled training images (any layout; sub-folder names are ignored)."},
    )
    unlabeled_dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set of unlabeled training images (its labels, if any, ignored)."}
    )
    unlabeled_dataset_config_name: str | None = field(
        default=None, metadata={"help": "The unlabeled data set's configuration."}
    )
    unlabeled_split: str = field(default="train", metadata={"help": "The unlabeled data set's split."})
    unlabeled_image_column_name: str = field(
        default="image", metadata={"help": "The unlabeled data set's image column."}
    )

    named_sources: ClassVar[dict[str, str]] = NAMED_DATA_SETS

    def __post_init__(self):
        super().__post_init__()
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("--validation_dir needs --train_dir.")
        check_label_fraction(self.label_fraction)
        if self.unlabeled_train_dir is not None and self.unlabeled_dataset_name is not None:
            raise ValueError("Give either --unlabeled_train_dir or --unlabeled_dataset_name, not both.")

    @property
    def has_unlabeled_images(self) -> bool:
        """Whether training has unlabeled images: a label fraction below 1, or an unlabeled folder or data set."""
        return (
            (self.label_fraction < 1 and self.unlabeled_rest)
            or self.unlabeled_train_dir is not None
            or self.unlabeled_dataset_name is not None
        )


@dataclass
class MaskedImageAugmentationArguments(_EvaluationCrop):
    """Augmentation of generic distillation and MAE pre-training (the paper's)."""

    min_crop_scale: float = field(default=0.2, metadata={"help": "RandomResizedCrop's smallest area fraction."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})

    def train_transform(self, image_size: int, image_mean: Sequence[float], image_std: Sequence[float]):
        return generic_distillation_transform(
            image_size, image_mean, image_std, self.min_crop_scale, self.horizontal_flip
        )


@dataclass
class ClassificationAugmentationArguments(_EvaluationCrop):
    """Augmentation of fine-tuning and specific distillation: the release's (DeiT/MAE's, through timm's
    `create_transform`); mixup/cutmix are training arguments. Also the evaluation crop."""

    min_crop_scale: float = field(default=0.08, metadata={"help": "RandomResizedCrop's smallest area fraction."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})
    auto_augment: str = field(
        default=RELEASE_AUTO_AUGMENT,
        metadata={
            "help": "timm's RandAugment / AutoAugment policy (the release's 'rand-m9-mstd0.5-inc1': 2 ops, "
            "magnitude 9 with std 0.5, increasing ops); 'none' disables it."
        },
    )
    random_erasing: float = field(default=0.25, metadata={"help": "Random-erasing probability (0 disables it)."})
    random_erasing_mode: str = field(
        default="pixel",
        metadata={
            "help": "What fills an erased box: 'pixel' (per-pixel Gaussian noise, the release's), 'rand' "
            "(one random color per channel) or 'const' (zeros).",
            "choices": ["pixel", "rand", "const"],
        },
    )
    positive_classes: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated class names counted as positive for a binary accuracy (with --dataset_name "
            "elpv: '2/3,1', the defective cells, by default; no binary accuracy otherwise)."
        },
    )

    def train_transform(self, image_size: int, image_mean: Sequence[float], image_std: Sequence[float]):
        return classification_train_transform(
            image_size,
            image_mean,
            image_std,
            min_crop_scale=self.min_crop_scale,
            horizontal_flip=self.horizontal_flip,
            auto_augment=self.auto_augment,
            random_erasing=self.random_erasing,
            random_erasing_mode=self.random_erasing_mode,
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
        is_elpv = data_args.dataset_name == ELPV_NAME
        four_classes = data_args.dataset_config_name in (None, ELPV_DEFAULT_TASK)
        return list(ELPV_DEFECTIVE_CLASSES) if is_elpv and four_classes else None


@dataclass
class DataReport:
    """What preparing the data set aside: the counts kept in the run's metrics (`skipped_train_images`, ...) and each
    file left out (hidden, not an image, unreadable, a high bit depth the served model would clip), path -> reason.
    The run writes the files to `left_out.json` and names the first ones on the model card."""

    counts: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)

    def metrics(self) -> dict[str, int]:
        return {**self.counts, "left_out_files": len(self.left_out)}

    def drop_unreadable(
        self, images: datasets.Dataset, name: str, num_proc: int | None = None
    ) -> tuple[datasets.Dataset, dict[str, str]]:
        """`drop_unreadable_images`, the skipped files counted (`skipped_<name>_images`) and recorded as left out."""
        images, skipped = drop_unreadable_images(images, num_proc=num_proc)
        self.counts[f"skipped_{name}_images"] = len(skipped)
        self.left_out.update(skipped)
        return images, skipped


def _first(images: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` images (all of them when `limit` is `None`)."""
    return images if limit is None else images.select(range(min(limit, len(images))))


def load_splits(
    data_args: DataArguments, seed: int, cache_dir: str | None = None, token: str | None = None
) -> tuple[datasets.DatasetDict, DataReport]:
    """The `train` and `validation` splits of `data_args`, subsampled, without decoding any image: enough for the
    class names, so that the checks of the models come before the long pass of `check_splits`.

    Returns:
        `(splits, report)`: the splits, and a `DataReport` holding the folders' files left out so far.
    """
    report = DataReport()
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
        left_out=report.left_out,
    )
    splits["train"] = _first(splits["train"], data_args.max_train_samples)
    splits["validation"] = _first(splits["validation"], data_args.max_eval_samples)
    return splits, report


def check_splits(
    splits: datasets.DatasetDict,
    report: DataReport,
    data_args: DataArguments,
    cache_dir: str | None = None,
    token: str | None = None,
) -> datasets.DatasetDict:
    """Decode every image of `load_splits`' splits once (unreadable ones skipped, counted and added to `report`, with
    `--drop_unreadable_images`), shrink them (`--max_image_side`) and add the unlabeled images (`splits["unlabeled"]`).
    """
    for name in ("train", "validation"):
        split = splits[name]
        if data_args.drop_unreadable_images:
            total = len(split)
            split, skipped = report.drop_unreadable(split, name, data_args.preprocessing_num_workers)
            if total and not len(split):
                source = data_args.train_dir if name == "train" else (data_args.validation_dir or data_args.train_dir)
                first, reason = next(iter(skipped.items()))
                raise ValueError(
                    f"None of the {total} images of the {name} split{f' ({source})' if source else ''} could be read "
                    f"(first: {first}: {reason}; each is named above). Check the files (are they images, complete, "
                    "not too large?) and the image column."
                )
        if data_args.max_image_side is not None:
            split = resize_images(split, data_args.max_image_side, num_proc=data_args.preprocessing_num_workers)
        splits[name] = split
    _prepare_unlabeled_images(splits, data_args, report, cache_dir, token)
    return splits


def prepare_splits(
    data_args: DataArguments, seed: int, cache_dir: str | None = None, token: str | None = None
) -> tuple[datasets.DatasetDict, DataReport]:
    """Load, subsample, check and (optionally) shrink the `train` and `validation` splits of `data_args`
    (`load_splits`, then `check_splits`).

    Returns:
        `(splits, report)`: the splits, and what was left out (`DataReport`).
    """
    splits, report = load_splits(data_args, seed, cache_dir, token)
    return check_splits(splits, report, data_args, cache_dir, token), report


def _prepare_unlabeled_images(
    splits: datasets.DatasetDict,
    data_args: DataArguments,
    report: DataReport,
    cache_dir: str | None,
    token: str | None,
) -> None:
    """`splits["unlabeled"]`, when there are unlabeled images: the training images whose labels `--label_fraction`
    left out, and those of `--unlabeled_train_dir` / `--unlabeled_dataset_name` (checked and shrunk like the others)."""
    parts = []
    if data_args.label_fraction < 1:
        splits["train"], rest = split_labels(splits["train"], data_args.label_fraction, data_args.label_fraction_seed)
        if data_args.unlabeled_rest:
            parts.append(rest)
    if data_args.unlabeled_train_dir is not None or data_args.unlabeled_dataset_name is not None:
        images = load_unlabeled_images(
            train_dir=data_args.unlabeled_train_dir,
            dataset_name=data_args.unlabeled_dataset_name,
            dataset_config_name=data_args.unlabeled_dataset_config_name,
            split=data_args.unlabeled_split,
            image_column_name=data_args.unlabeled_image_column_name,
            cache_dir=cache_dir,
            token=token,
            left_out=report.left_out,
        )
        if data_args.drop_unreadable_images:
            images, _ = report.drop_unreadable(images, "unlabeled", data_args.preprocessing_num_workers)
        if data_args.max_image_side is not None:
            images = resize_images(images, data_args.max_image_side, num_proc=data_args.preprocessing_num_workers)
        parts.append(images)
    parts = [part for part in parts if len(part)]
    if parts:
        splits["unlabeled"] = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def prepare_stream(
    data_args: DataArguments, cache_dir: str | None = None, token: str | None = None
) -> tuple[datasets.IterableDataset, datasets.Dataset | None, DataReport]:
    """`--streaming`: the training images as a stream (`streaming.load_image_stream`, nothing decoded), and the
    `--validation_dir` images read whole and checked like the map-style splits (or `None`).

    Returns:
        `(stream, validation, report)`.
    """
    stream = load_image_stream(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        image_column_name=data_args.image_column_name,
        cache_dir=cache_dir,
        token=token,
    )
    report, validation = DataReport(), None
    if data_args.validation_dir is not None:
        validation = load_unlabeled_images(train_dir=data_args.validation_dir, left_out=report.left_out)
        validation = _first(validation, data_args.max_eval_samples)
        if data_args.drop_unreadable_images:
            validation, _ = report.drop_unreadable(validation, "validation", data_args.preprocessing_num_workers)
    return stream, validation, report


def label_free_datasets(
    data_args: DataArguments,
    streaming_args: StreamingArguments,
    training_args,
    train_transform,
    eval_transform,
    cache_dir: str | None = None,
    token: str | None = None,
) -> tuple:
    """The training and evaluation sets of the label-free stages (MAE pre-training, generic distillation): every
    training image, the unlabeled ones included, read whole (`prepare_splits`) or streamed (`--streaming`:
    `prepare_stream`, `streaming.training_stream`, decoded in the loader's workers); the validation images (or `None`).

    Returns:
        `(train_dataset, eval_dataset, report)`, `report` the `DataReport` of what was left out.
    """
    with training_args.main_process_first(desc="preparing the data"):
        if streaming_args.streaming:
            stream, validation, report = prepare_stream(data_args, cache_dir, token)
        else:
            splits, report = prepare_splits(data_args, training_args.seed, cache_dir, token)
            validation = splits["validation"]
    if streaming_args.streaming:
        train_dataset = training_stream(
            stream,
            train_transform,
            training_args.seed,
            streaming_args.shuffle_buffer_size,
            skip_unreadable=data_args.drop_unreadable_images,
        )
    else:
        train_dataset = every_training_image(splits).with_transform(ImageTransform(train_transform))
    eval_dataset = None if validation is None else validation.with_transform(ImageTransform(eval_transform))
    return train_dataset, eval_dataset, report


def every_training_image(splits: datasets.DatasetDict) -> datasets.Dataset:
    """The training images with the unlabeled ones, labels dropped: what the label-free stages (MAE pre-training,
    generic distillation) train on."""
    images = splits["train"].select_columns(["image"])
    if "unlabeled" in splits:
        images = datasets.concatenate_datasets([images, splits["unlabeled"].select_columns(["image"])])
    return images


def check_unlabeled_arguments(data_args: DataArguments, training_args, with_teacher: bool) -> None:
    """Refuse, before any data is read, unlabeled images where they cannot be used: without a teacher (fine-tuning,
    `--distillation_type none`), or, in distillation, with mixup/cutmix. A `--label_fraction` without a teacher
    simply trains on the labeled images."""
    distilling = with_teacher and getattr(training_args, "distillation_type", "none") != "none"
    source = data_args.unlabeled_train_dir or data_args.unlabeled_dataset_name
    if source is not None and not distilling:
        raise ValueError(
            f"Unlabeled images ({source}) need a teacher to learn from: only specific distillation "
            "(run_specific.py with --teacher_name_or_path and a distillation_type other than 'none') uses them. "
            "Drop --unlabeled_train_dir / --unlabeled_dataset_name here, or give a teacher."
        )
    mixing = getattr(training_args, "mixup_alpha", 0) > 0 or getattr(training_args, "cutmix_alpha", 0) > 0
    if distilling and data_args.has_unlabeled_images and mixing:
        raise ValueError(
            f"mixup/cutmix (alpha {training_args.mixup_alpha} / {training_args.cutmix_alpha}) cannot mix unlabeled "
            "images with labeled ones: set --mixup_alpha 0 --cutmix_alpha 0 (as --recipe small-data does)."
        )


# --------------------------------------------------------------------------------------------------------------------
# Dense tasks: data and models
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DenseDataArguments(_DataSource):
    """Where the dense-task images come from (shared by the dense example scripts)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"A Hub data set (segmentation: the scene_parse_150 layout; detection: COCO-style `objects`). "
            f"Or {SYNTHETIC_NAME!r}: generated shapes (offline, the dense demo's data). Give it or --train_dir."
        },
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Folder: images/ + masks/ (segmentation) or images/ + annotations.json (detection)."},
    )
    validation_dir: str | None = field(default=None, metadata={"help": "The validation folder, same layout."})
    image_size: int = field(default=512, metadata={"help": "Images are resized to image_size x image_size."})
    reduce_labels: bool = field(
        default=False,
        metadata={
            "help": "Segmentation: label 0 means 'other' (ADE20k / scene_parse_150): ignore it, shift the rest down."
        },
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Classes, when the data set does not name them (ADE20k: 150)."}
    )
    synthetic_train_size: int = field(default=512, metadata={"help": "Generated training images."})
    synthetic_validation_size: int = field(default=128, metadata={"help": "Generated validation images."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})

    named_sources: ClassVar[dict[str, str]] = NAMED_DENSE_DATA_SETS

    def subsample(self, splits: datasets.DatasetDict) -> datasets.DatasetDict:
        for name, limit in (("train", self.max_train_samples), ("validation", self.max_eval_samples)):
            if limit is not None:
                splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
        return splits


@dataclass
class DenseModelArguments:
    """The student (a head on a G2SD backbone), its initialization, and the teacher (shared by the dense scripts)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved student (head + backbone)."}
    )
    backbone_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Initialize the backbone from a G2SD checkpoint (generic or specific distillation)."},
    )
    backbone_preset: str = field(
        default="g2sd-small", metadata={"help": "Backbone architecture without a checkpoint."}
    )
    backbone_overrides: str | None = field(
        default=None, metadata={"help": "Backbone config overrides, 'name=value,...'."}
    )
    fpn_hidden_size: int = field(default=256, metadata={"help": "Channels of the simple feature pyramid."})
    window_size: int = field(default=0, metadata={"help": "Windowed attention (ViTDet: 14); 0 = global everywhere."})
    head_hidden_size: int | None = field(default=None, metadata={"help": "Width of the head (its default if unset)."})
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher: the same head on a larger backbone."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})


def dense_backbone_config(arguments: DenseModelArguments, image_size: int) -> G2SDBackboneConfig:
    """The backbone config: from the checkpoint (weights loaded later) or a preset, plus the pyramid options."""
    options = {
        "fpn_hidden_size": arguments.fpn_hidden_size,
        "window_size": arguments.window_size,
        **parse_overrides(arguments.backbone_overrides, G2SDBackboneConfig),
    }
    if arguments.backbone_name_or_path is not None:
        return G2SDBackboneConfig.from_pretrained(arguments.backbone_name_or_path, **options)
    return G2SDBackboneConfig.from_preset(arguments.backbone_preset, **{"image_size": image_size, **options})


__all__ = [
    "ClassificationAugmentationArguments",
    "DataArguments",
    "DataReport",
    "DenseDataArguments",
    "DenseModelArguments",
    "MaskedImageAugmentationArguments",
    "check_splits",
    "dense_backbone_config",
    "label_free_datasets",
    "load_splits",
    "prepare_splits",
    "prepare_stream",
]
