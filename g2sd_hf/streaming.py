"""Streamed training images for the label-free stages (generic distillation, MAE pre-training): data that one process
should not scan and decode before training, or that does not fit on a node's disk.

The images are read as a `datasets.IterableDataset` (`load_image_stream`): a Hub data set (`load_dataset(...,
streaming=True)`), a folder of WebDataset tar shards (`load_dataset("webdataset", ...)`; `python -m g2sd_hf.shards`
writes them) or an image folder. `training_stream` makes it endless (`repeat`), shuffles it with a seeded buffer and
decodes and transforms each image lazily, in the data loader's workers.

Processes read their own shards: accelerate's data loader gives each process `IterableDataset.shard(num_processes,
index)` (what `datasets.distributed.split_dataset_by_node` does) when there are at least as many shards as processes;
with fewer, every process reads the whole stream and keeps its part of each global batch (accelerate's
`IterableDatasetShard`). The stream is the same at every run with the same seed, so a resumed run skips the batches
already trained on (the Trainer's `skip_first_batches`) and continues with the next images: nothing repeated, nothing
skipped. The skipped batches are read and decoded again, at the loader's speed.

Why an endless stream: the Trainer counts an iterable data set's epoch as `max_steps` steps; a stream that ended and
started again would be resumed from its first pass, and processes whose shards end at different times would reach
the end of an epoch apart (a collective operation then waits forever). `repeat()` then `shuffle()` makes one endless
stream in which each next image comes from a shard drawn at random among the process's shards (the shards' order,
then the buffer, mix them), as WebDataset's resampled shards do: in expectation every image comes equally often when
the shards hold equally many images (`g2sd_hf.shards` writes them so, but for the last one), and there are no passes
in which each image comes exactly once.
"""

import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from .data import IMAGE_SUFFIXES, check_image_folder, open_rgb_image


logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
# The keys of a streamed batch that are not model inputs (`collate_stream`; the trainers take them out).
STREAM_IMAGE_IDS, STREAM_SKIPPED_IMAGES = "image_ids", "skipped_images"
# The image fields of a WebDataset sample (its file's extension), as `datasets`' WebDataset loader decodes them.
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")


@dataclass
class StreamingArguments:
    """How the label-free stages stream their training images (`--streaming`)."""

    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training images (a Hub data set, a --train_dir of WebDataset .tar shards, or an "
            "image folder) instead of scanning and decoding them first. Needs --max_steps."
        },
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "Images held in the seeded shuffle buffer of the stream (more: better mixed, more memory)."},
    )

    def __post_init__(self):
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be at least 1, got {self.shuffle_buffer_size}.")


def check_streaming_arguments(streaming_args: StreamingArguments, training_args, data_args) -> None:
    """Refuse, before any work, what a streamed run cannot do; and let each process read its own shards."""
    if not streaming_args.streaming:
        return
    if training_args.do_train and training_args.max_steps <= 0:
        raise ValueError(
            "--streaming reads an endless stream of images, so epochs are not counted: give the length of the run as "
            "--max_steps (e.g. epochs x images / global batch size)."
        )
    if data_args.max_train_samples is not None or data_args.label_fraction < 1:
        raise ValueError(
            "--max_train_samples and --label_fraction need a data set that is read whole: not with --streaming."
        )
    if data_args.unlabeled_train_dir is not None or data_args.unlabeled_dataset_name is not None:
        raise ValueError(
            "With --streaming, the stream is every training image (no labels are used): put the unlabeled images in "
            "the --train_dir shards (or folder) instead of --unlabeled_train_dir / --unlabeled_dataset_name."
        )
    if data_args.max_image_side is not None:
        raise ValueError(
            "--max_image_side re-encodes a table of images once; a stream is decoded as it comes. Drop it, or write "
            "smaller images into the shards."
        )
    if training_args.do_eval and data_args.validation_dir is None:
        raise ValueError(
            "With --streaming, --do_eval scores a --validation_dir (an image folder, read whole): give one, or drop "
            "--do_eval."
        )
    # accelerate would otherwise read the stream in the main process only and send each process its batches.
    training_args.accelerator_config.dispatch_batches = False


def shard_files(folder: str) -> list[str]:
    """The `.tar` shards in `folder` and its sub-folders, sorted (an empty list when it holds none)."""
    return sorted(str(path) for path in Path(folder).rglob(f"*{SHARD_SUFFIX}") if not path.name.startswith("."))


def check_shards(shards: list[str]) -> None:
    """Refuse, naming it, a shard that cannot be read as a tar file or whose first sample holds no image."""
    for shard in shards:
        try:
            with tarfile.open(shard) as archive:
                first = archive.next()
                names = []
                while first is not None and len(names) < 8:
                    names.append(first.name)
                    first = archive.next()
        except (OSError, tarfile.TarError) as error:
            raise ValueError(
                f"The shard {shard} cannot be read as a tar file ({error}): replace it (copy it again, or write the "
                "shards again with python -m g2sd_hf.shards), or move it out of the folder."
            ) from error
        if not any(name.rpartition(".")[2].lower() in IMAGE_FIELDS for name in names):
            raise ValueError(
                f"The shard {shard} holds no image among its first files ({names[:4] or 'none'}): a WebDataset shard "
                f"stores each image as <key>.<{'|'.join(IMAGE_FIELDS[:4])}|...>. Write the shards with "
                "python -m g2sd_hf.shards, or move this one out of the folder."
            )


def _coalesce_webdataset_images(example: dict) -> dict:
    for name in IMAGE_FIELDS:
        if example.get(name) is not None:
            image = example[name]
            return {"image": image, "image_id": f"{os.path.basename(example['__url__'])}/{example['__key__']}"}
    raise ValueError(f"The sample {example['__key__']} of the shard {example['__url__']} holds no image.")


def load_image_stream(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    image_column_name: str = "image",
    split: str = "train",
    cache_dir: str | None = None,
    token: str | None = None,
) -> datasets.IterableDataset:
    """The training images as a stream with two columns: `image` (not decoded: `{"bytes", "path"}`) and `image_id`
    (the shard and key, the file's path, or the row's index in a Hub data set).

    Example:

    ```python
    >>> stream = load_image_stream(train_dir="imagenet-shards")  # a folder of .tar shards
    >>> stream.n_shards
    1024
    ```
    """
    if dataset_name is not None:
        stream = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=True, cache_dir=cache_dir, token=token
        )
        if image_column_name not in (stream.column_names or [image_column_name]):
            raise ValueError(f"No image column {image_column_name!r} in {dataset_name}: pass --image_column_name.")
        stream = stream.select_columns([image_column_name]).rename_column(image_column_name, "image")
        stream = stream.cast_column("image", datasets.Image(decode=False))
        return stream.map(lambda example, index: {"image_id": str(index)}, with_indices=True)
    shards = shard_files(train_dir)
    if shards:
        check_shards(shards)
        stream = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        present = [name for name in IMAGE_FIELDS if name in (stream.column_names or [])]
        for name in present:
            stream = stream.cast_column(name, datasets.Image(decode=False))
        return stream.map(_coalesce_webdataset_images, remove_columns=stream.column_names)
    # An image folder: its files listed once (checked as in the map-style path), read lazily.
    if not Path(train_dir).is_dir():
        raise ValueError(f"--train_dir {train_dir}: no such folder. Give a folder of .tar shards or of images.")
    if not any(path.suffix.lower() in IMAGE_SUFFIXES for path in Path(train_dir).rglob("*") if path.is_file()):
        raise ValueError(
            f"--train_dir {train_dir} holds no .tar shard and no image file: give the folder the shards were written "
            "to (python -m g2sd_hf.shards SRC DST), or a folder of images."
        )
    files = check_image_folder("--train_dir", train_dir)
    table = datasets.Dataset.from_dict({"image": files, "image_id": [os.path.relpath(f, train_dir) for f in files]})
    table = table.cast_column("image", datasets.Image(decode=False))
    return table.to_iterable_dataset(num_shards=min(len(files), 1024))


class StreamTransform:
    """A batched `IterableDataset.map` function: decode each image (`open_rgb_image`, as everywhere), apply
    `transform`; an image that cannot be read is skipped with a warning naming it, as in the folder path, and counted
    on the next image (`skipped_before`), so that the trainer can count them across workers and processes."""

    def __init__(self, transform, skip_unreadable: bool = True):
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self._pending_skips = 0  # per data loader worker: each holds its own copy

    def __call__(self, batch: dict) -> dict:
        pixel_values, image_ids, skipped_before = [], [], []
        for image, image_id in zip(batch["image"], batch["image_id"]):
            try:
                pixel_values.append(self.transform(open_rgb_image(image)))
            except ValueError as error:
                if not self.skip_unreadable:  # --drop_unreadable_images false: the first one stops the run
                    raise ValueError(f"The streamed image {image_id}: {error}") from error
                logger.warning(f"Skipping the streamed image {image_id}: {error}")
                self._pending_skips += 1
                continue
            image_ids.append(image_id)
            skipped_before.append(self._pending_skips)
            self._pending_skips = 0
        return {"pixel_values": pixel_values, "image_id": image_ids, "skipped_before": skipped_before}


def training_stream(
    images: datasets.IterableDataset,
    transform,
    seed: int,
    shuffle_buffer_size: int,
    skip_unreadable: bool = True,
) -> datasets.IterableDataset:
    """The endless, seeded, shuffled stream of transformed training images (see the module's docstring for why
    endless, and how it draws from the shards). Decoding and `transform` run lazily, in the data loader's workers;
    an unreadable image is skipped and counted, or, without `skip_unreadable`, stops the run naming it."""
    stream = images.repeat(None).shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return stream.map(
        StreamTransform(transform, skip_unreadable), batched=True, batch_size=64, remove_columns=["image"]
    )


def collate_stream(examples: list[dict]) -> dict:
    """Stack `pixel_values`; for streamed images, also the batch's `image_ids` and the number of unreadable images
    skipped before them (`skipped_images`), which the trainers take out of the inputs (`trainer.batch_image_ids`) and
    count (`skipped_train_images`)."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "image_id" in examples[0]:
        batch[STREAM_IMAGE_IDS] = [example["image_id"] for example in examples]
        batch[STREAM_SKIPPED_IMAGES] = sum(example["skipped_before"] for example in examples)
    return batch


__all__ = [
    "StreamingArguments",
    "check_shards",
    "check_streaming_arguments",
    "collate_stream",
    "load_image_stream",
    "shard_files",
    "training_stream",
]
