"""Data: the ELPV split, image decoding and conversion, unreadable files, transforms, metrics."""

import logging
from collections import Counter

import datasets
import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from g2sd_hf.data import (
    ELPV_CLASS_NAMES,
    ImageTransform,
    check_image_folder,
    classification_train_transform,
    drop_unreadable_images,
    evaluation_transform,
    generic_distillation_transform,
    load_elpv,
    load_image_dataset,
    open_rgb_image,
)
from g2sd_hf.scripts.arguments import ClassificationAugmentationArguments, DataArguments, prepare_splits

from .conftest import NORMALIZATION


@pytest.fixture(scope="module")
def elpv():
    return load_elpv()


def test_no_data_set_is_picked_for_the_user():
    """Without --dataset_name or --train_dir the scripts stop and list the ways to give data (ELPV only by name)."""
    from g2sd_hf.dense_data import load_segmentation_dataset
    from g2sd_hf.scripts.arguments import DenseDataArguments

    for make in (DataArguments, load_image_dataset):
        with pytest.raises(ValueError, match=r"No training data given(.|\n)*--train_dir(.|\n)*--dataset_name elpv"):
            make()
    for make in (DenseDataArguments, load_segmentation_dataset):
        with pytest.raises(ValueError, match=r"No training data given(.|\n)*--dataset_name synthetic-shapes"):
            make()
    # The binary accuracy's positive classes are ELPV's only when ELPV was named.
    augmentation = ClassificationAugmentationArguments()
    labels = ["0", "1/3", "2/3", "1"]
    assert augmentation.positive_class_indices(DataArguments(dataset_name="elpv"), labels) == [2, 3]
    assert augmentation.positive_class_indices(DataArguments(train_dir="somewhere"), labels) is None


def test_elpv_split_is_the_documented_stratified_75_25(elpv):
    assert len(elpv["train"]) == 1968 and len(elpv["test"]) == 656  # 2,624 cells
    assert elpv["train"].features["label"].names == list(ELPV_CLASS_NAMES)
    overall = Counter(elpv["train"]["label"]) + Counter(elpv["test"]["label"])
    assert overall == {0: 1508, 1: 295, 2: 106, 3: 715}  # the package's defect-probability levels
    test = Counter(elpv["test"]["label"])
    for label, count in overall.items():
        assert abs(test[label] - count * 0.25) <= 1  # stratified
    again = load_elpv()
    assert again["test"]["defect_probability"] == elpv["test"]["defect_probability"]
    assert [image["path"] for image in again["test"]["image"]] == [image["path"] for image in elpv["test"]["image"]]


def test_elpv_labels_match_defect_probabilities(elpv):
    levels = np.array([0, 1 / 3, 2 / 3, 1])
    probabilities = np.array(elpv["train"]["defect_probability"])
    np.testing.assert_allclose(levels[elpv["train"]["label"]], probabilities, atol=1e-6)
    assert set(elpv["train"]["cell_type"]) == {"mono", "poly"}


def test_elpv_images_are_real_300px_grayscale_converted_to_rgb(elpv):
    image = open_rgb_image(elpv["train"][0]["image"])
    assert image.mode == "RGB" and image.size == (300, 300)
    array = np.asarray(image)
    assert np.array_equal(array[..., 0], array[..., 2]) and array.std() > 5  # gray, and not blank


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_images_of_any_mode_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":  # 16-bit storage of 8-bit values: PIL's conversion keeps them
        image = Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "image.png"
    image.save(path)
    converted = open_rgb_image({"path": str(path), "bytes": None})
    assert converted.mode == "RGB" and converted.size == (30, 20)
    if mode == "I;16":
        assert np.array_equal(np.asarray(converted)[..., 1], np.asarray(image).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# One preprocessing for training, evaluation and pipeline()
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_classifier(tmp_path_factory):
    """A saved classifier with the processor the scripts save, loaded by `pipeline` as a user would."""
    from transformers import pipeline

    from g2sd_hf import G2SDForImageClassification
    from g2sd_hf.data import image_processor

    from .conftest import tiny_student_config

    folder = tmp_path_factory.mktemp("served")
    G2SDForImageClassification(tiny_student_config(num_labels=2)).save_pretrained(folder)
    image_processor(32, **NORMALIZATION).save_pretrained(folder)
    return pipeline("image-classification", model=str(folder))


def cell_in_mode(elpv, mode: str) -> Image.Image:
    """A real ELPV cell (made non-square and colored, so that orientation and channels matter) in `mode`."""
    gray = np.asarray(open_rgb_image(elpv["train"][3]["image"]).convert("L").resize((90, 60)))
    rgb = Image.fromarray(np.stack([gray, gray[::-1], 255 - gray], axis=-1))
    if mode in ("I;16", "I"):
        return Image.fromarray(gray.astype(np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) * 0.75)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
IMAGE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", IMAGE_MODES + ["JPEG rotated by EXIF"])
def test_training_evaluation_and_pipeline_see_the_same_image(elpv, served_classifier, tmp_path, mode):
    """The same file reaches the model identically when the scripts train or evaluate on it and when the saved
    checkpoint serves it through `pipeline()`: one decoding (transformers' load_image), then the processor."""
    from transformers.image_utils import load_image

    if mode == "JPEG rotated by EXIF":
        path = tmp_path / "cell.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
        cell_in_mode(elpv, "RGB").save(path, exif=exif, quality=95)
    else:
        path = tmp_path / ("cell.tiff" if mode in ("CMYK", "YCbCr", "I", "F") else "cell.png")
        cell_in_mode(elpv, mode).save(path)
        if mode == "YCbCr" and PILLOW_MAJOR < 13:
            # Pillow < 13 (trackio, in the testing extra, requires it) cannot decode the uncompressed YCbCr TIFF it
            # writes ("image file is truncated"; fixed in 13): pipeline() fails on it too, and the loader names it.
            with pytest.raises(OSError, match="truncated"):
                load_image(str(path))
            with pytest.raises(ValueError, match=r"Cannot read image .*cell\.tiff: image file is truncated"):
                open_rgb_image({"path": str(path), "bytes": None})
            return
        assert Image.open(path).mode == mode
    decoded = open_rgb_image({"path": str(path), "bytes": None})
    served = load_image(str(path))
    assert decoded.size == served.size and np.array_equal(np.asarray(decoded), np.asarray(served))
    if mode == "JPEG rotated by EXIF":
        assert decoded.size == (60, 90)  # upright

    training = ImageTransform(evaluation_transform(32, **NORMALIZATION))({"image": [{"path": str(path)}]})
    pixel_values = served_classifier.preprocess(str(path))["pixel_values"][0]
    torch.testing.assert_close(training["pixel_values"][0], pixel_values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode, values", [("I;16", (0, 4095)), ("I", (-20, 200)), ("F", (0.0, 1000.0))])
def test_high_bit_depth_images_that_pipeline_would_clip_are_refused_by_name(tmp_path, mode, values):
    from transformers.image_utils import load_image

    from g2sd_hf.data import rescale_to_8bit

    low, high = values
    array = np.linspace(low, high, 40 * 30).reshape(30, 40)
    image = Image.fromarray(array.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    path = tmp_path / ("scan.png" if mode == "I;16" else "scan.tiff")
    image.save(path)
    with pytest.raises(
        ValueError, match=rf"scan\.(png|tiff) is a high-bit-depth image \(mode {mode}.*rescale_to_8bit"
    ):
        open_rgb_image({"path": str(path), "bytes": None})
    # The documented fix: the same conversion before training and before serving gives the same image.
    converted = tmp_path / "scan-8bit.png"
    rescale_to_8bit(Image.open(path)).save(converted)
    assert np.array_equal(
        np.asarray(open_rgb_image({"path": str(converted)})), np.asarray(load_image(rescale_to_8bit(Image.open(path))))
    )
    assert np.asarray(Image.open(converted)).min() == 0 and np.asarray(Image.open(converted)).max() == 255


def make_image_folder(root, corrupt: bool = True):
    rng = np.random.default_rng(0)
    for label, mode in (("cat", "L"), ("dog", "RGBA")):
        folder = root / label
        folder.mkdir(parents=True)
        for index in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert(mode).save(
                folder / f"{index}.png"
            )
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_unreadable_images_are_skipped_named_and_counted(tmp_path, caplog):
    make_image_folder(tmp_path / "train")
    data_args = DataArguments(train_dir=str(tmp_path / "train"), validation_split=0.25)
    with caplog.at_level(logging.WARNING, logger="g2sd_hf.data"):
        splits, report = prepare_splits(data_args, seed=0)
    assert report.counts["skipped_train_images"] + report.counts["skipped_validation_images"] == 1
    assert list(report.left_out) == [str(tmp_path / "train" / "dog" / "broken.png")]
    assert report.left_out[str(tmp_path / "train" / "dog" / "broken.png")].startswith("Cannot read image")
    assert report.metrics()["left_out_files"] == 1
    assert "broken.png" in caplog.text and "Skipped 1 unreadable image" in caplog.text
    assert len(splits["train"]) + len(splits["validation"]) == 12
    assert splits["train"].features["label"].names == ["cat", "dog"]
    pixels = splits["train"].with_transform(
        ImageTransform(evaluation_transform(32, [0.5] * 3, [0.5] * 3), with_labels=True)
    )[0]
    assert pixels["pixel_values"].shape == (3, 32, 32)


def test_without_the_check_an_unreadable_image_is_an_error_naming_the_file(tmp_path):
    make_image_folder(tmp_path / "train")
    splits = load_image_dataset(train_dir=str(tmp_path / "train"), validation_split=0.25)
    dataset = datasets.concatenate_datasets([splits["train"], splits["validation"]])
    broken = next(index for index, image in enumerate(dataset["image"]) if image["path"].endswith("broken.png"))
    transformed = dataset.with_transform(ImageTransform(evaluation_transform(32, [0.5] * 3, [0.5] * 3)))
    with pytest.raises(ValueError, match=r"Cannot read image .*broken\.png.*drop_unreadable_images"):
        transformed[broken]
    readable, skipped = drop_unreadable_images(dataset)
    assert len(readable) == len(dataset) - 1 and list(skipped)[0].endswith("broken.png")
    assert "Cannot read image" in skipped[list(skipped)[0]]


def test_splits_with_different_classes_are_refused(tmp_path):
    """A validation folder with a class the training folder lacks (a class never trained, scored 0) or without one
    of its classes is refused, naming both folders and the classes."""
    make_image_folder(tmp_path / "train", corrupt=False)
    extra = make_image_folder(tmp_path / "extra", corrupt=False)
    (extra / "bird").mkdir()
    Image.new("RGB", (40, 40)).save(extra / "bird" / "0.png")
    with pytest.raises(
        ValueError,
        match=r"--train_dir .*train and --validation_dir .*extra hold different classes: \['bird'\] only in validation",
    ):
        load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(extra))
    fewer = tmp_path / "fewer" / "cat"
    fewer.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(fewer / "0.png")
    with pytest.raises(ValueError, match=r"\['dog'\] only in training \(never evaluated\)"):
        load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "fewer"))
    same = load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "train"))
    assert same["validation"].features["label"].names == ["cat", "dog"]


def test_folders_without_images_are_named(tmp_path):
    with pytest.raises(ValueError, match=rf"--train_dir {tmp_path / 'nowhere'}: no such folder"):
        load_image_dataset(train_dir=str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=rf"--train_dir {tmp_path / 'empty'} holds no image file"):
        load_image_dataset(train_dir=str(tmp_path / "empty"))


def test_a_split_of_only_unreadable_images_is_an_error_naming_the_folder(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for index in range(3):
            (tmp_path / "train" / label / f"{index}.png").write_bytes(b"not a png")
    with pytest.raises(
        ValueError, match=rf"None of the \d+ images of the train split \({tmp_path / 'train'}\) could be read"
    ):
        prepare_splits(DataArguments(train_dir=str(tmp_path / "train"), validation_split=0.34), seed=0)


def test_one_class_folder_and_decompression_bomb_are_explained(tmp_path, monkeypatch):
    from g2sd_hf.data import class_names

    folder = tmp_path / "one" / "cat"
    folder.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (8, 8)).save(folder / f"{index}.png")
    splits = load_image_dataset(train_dir=str(tmp_path / "one"), validation_split=0.5)
    with pytest.raises(ValueError, match="two or more \\(one per class\\): a folder with a single class sub-folder"):
        class_names(splits["train"])

    Image.new("RGB", (64, 64)).save(tmp_path / "large.png")
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 1000
    )  # 64 x 64 is then more than twice the limit: refused by Pillow
    with pytest.raises(ValueError, match=r"large\.png: .*decompression bomb.*MAX_IMAGE_PIXELS"):
        open_rgb_image({"path": str(tmp_path / "large.png"), "bytes": None})


def test_missing_image_column_is_named(tmp_path):
    make_image_folder(tmp_path / "train", corrupt=False)
    with pytest.raises(ValueError, match="No image column 'picture'"):
        load_image_dataset(train_dir=str(tmp_path / "train"), image_column_name="picture")


def test_transforms_produce_normalized_tensors(elpv):
    image = open_rgb_image(elpv["train"][3]["image"])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    evaluated = evaluation_transform(64, mean, std, crop_ratio=1.0)
    expected = (
        torch.from_numpy(np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC))).permute(2, 0, 1) / 255.0
        - torch.tensor(mean).view(3, 1, 1)
    ) / torch.tensor(std).view(3, 1, 1)
    evaluated = evaluated(image)
    assert evaluated.shape == (3, 64, 64) and evaluated.dtype == torch.float32
    torch.testing.assert_close(evaluated, expected, atol=2 / 255 / 0.224, rtol=0)
    torch.manual_seed(0)
    for transform in (generic_distillation_transform(64, mean, std), classification_train_transform(64, mean, std)):
        first, second = transform(image), transform(image)
        assert first.shape == (3, 64, 64) and not torch.equal(first, second)  # random augmentation


def test_a_folder_whose_images_would_be_dropped_without_a_word_is_refused_or_said(tmp_path, caplog):
    """Issue 19: a symlinked class folder was skipped (the class vanished from the model), a name that is not UTF-8
    failed deep inside `datasets`, hidden folders were left out silently."""
    import os

    from PIL import Image

    def images(folder, count):
        folder.mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (40 * index, 0, 0)).save(folder / f"image{index}.png")

    images(tmp_path / "data" / "cracked", 4)
    images(tmp_path / "elsewhere" / "intact", 4)
    os.symlink(tmp_path / "elsewhere" / "intact", tmp_path / "data" / "intact")
    with pytest.raises(ValueError, match=r"data/intact is a symbolic link to a folder.*Replace the link"):
        load_image_dataset(train_dir=str(tmp_path / "data"))
    os.remove(tmp_path / "data" / "intact")
    images(tmp_path / "data" / "intact", 4)

    Image.new("RGB", (8, 8)).save(os.fsencode(tmp_path / "data" / "cracked") + b"/cell\xff.png")
    with pytest.raises(ValueError, match=r"cell\\xff.png' is not valid UTF-8.*Rename it"):
        load_image_dataset(train_dir=str(tmp_path / "data"))
    os.remove(os.fsencode(tmp_path / "data" / "cracked") + b"/cell\xff.png")

    images(tmp_path / "data" / ".thumbnails", 2)
    (tmp_path / "data" / "cracked" / "notes.txt").write_text("cell 3 looks odd")
    left_out = {}
    with caplog.at_level("WARNING"):
        splits = load_image_dataset(train_dir=str(tmp_path / "data"), validation_split=0.25, left_out=left_out)
    assert "1 file(s) or folder(s) left out, hidden" in caplog.text and ".thumbnails" in caplog.text
    assert "1 file(s) or folder(s) left out, not an image file" in caplog.text and "notes.txt" in caplog.text
    assert left_out == {
        str(tmp_path / "data" / ".thumbnails"): "hidden (its name starts with '.')",
        str(tmp_path / "data" / "cracked" / "notes.txt"): "not an image file",
    }
    (tmp_path / "data" / "metadata.csv").write_text("file_name,label\n")  # read by the loader: not left out
    check_image_folder("--train_dir", str(tmp_path / "data"), left_out := {})
    assert str(tmp_path / "data" / "cracked" / "notes.txt") in left_out
    assert str(tmp_path / "data" / "metadata.csv") not in left_out
    assert len(splits["train"]) + len(splits["validation"]) == 8
    assert splits["train"].features["label"].names == ["cracked", "intact"]
