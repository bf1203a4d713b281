"""Dense data: the generated shapes, segmentation masks and detection folders."""

import datasets
import numpy as np
import pytest
import torch

from g2sd_hf.dense_data import (
    DetectionTransform,
    SegmentationTransform,
)
from g2sd_hf.synthetic import make_shapes_dataset

from .dense_helpers import NORMALIZATION


def test_generated_shapes_have_exact_masks_and_boxes():
    example = make_shapes_dataset(3, 48, seed=5)[1]
    semantic, instance = np.asarray(example["semantic_mask"]), np.asarray(example["instance_mask"])
    for box, category, area, identity in zip(*(example["objects"][key] for key in ("bbox", "category", "area", "id"))):
        rows, columns = np.nonzero(instance == identity)
        assert [columns.min(), rows.min(), columns.max() - columns.min() + 1, rows.max() - rows.min() + 1] == box
        assert area == len(rows) and set(semantic[rows, columns]) == {category + 1}
    assert (semantic > 0).sum() == (instance > 0).sum()
    again = make_shapes_dataset(3, 48, seed=5)[1]
    assert np.array_equal(np.asarray(again["image"]), np.asarray(example["image"]))


def test_segmentation_masks_keep_indices_and_reduce_labels(tmp_path):
    from PIL import Image

    from g2sd_hf.dense_data import load_segmentation_dataset

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "images" / "a.jpg")
    labels = np.array([[0, 1, 2, 255]] * 4, dtype=np.uint8)
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette(
        [value for index in range(256) for value in (index * 7 % 256, 0, 0)]
    )  # colors are not the classes
    palette.save(tmp_path / "masks" / "a.png")
    splits, names = load_segmentation_dataset(train_dir=str(tmp_path))
    assert names == [] and len(splits["validation"]) == 1
    plain = SegmentationTransform(4, *NORMALIZATION, False)(splits["train"][:1])["labels"][0]
    reduced = SegmentationTransform(4, *NORMALIZATION, False, reduce_labels=True)(splits["train"][:1])["labels"][0]
    assert plain[0].tolist() == [0, 1, 2, 255] and reduced[0].tolist() == [255, 0, 1, 255]
    with pytest.raises(ValueError, match="--reduce_labels"):  # label 2 with 2 classes: a missing --reduce_labels, say
        SegmentationTransform(4, *NORMALIZATION, False, num_labels=2)(splits["train"][:1])
    assert (
        SegmentationTransform(4, *NORMALIZATION, False, True, num_labels=2)(splits["train"][:1])["labels"][0].max()
        == 255
    )
    for mode in ("RGB", "LA"):
        Image.new(mode, (4, 4)).save(tmp_path / "masks" / "a.png")
        with pytest.raises(ValueError, match=r"a\.png has mode " + mode):
            SegmentationTransform(4, *NORMALIZATION, False)(splits["train"][:1])
    (tmp_path / "masks" / "a.png").rename(tmp_path / "masks" / "b.png")
    with pytest.raises(ValueError, match="No mask"):
        load_segmentation_dataset(train_dir=str(tmp_path))


def test_detection_folder_keeps_area_and_crowds_and_images_are_upright(tmp_path):
    import json

    from PIL import Image

    from g2sd_hf.data import open_rgb_image
    from g2sd_hf.dense_data import image_size_of, load_detection_dataset

    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high, shown rotated: 20 wide x 40 high
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "images" / "a.jpg", exif=exif)
    (tmp_path / "annotations.json").write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 20}],
                "categories": [{"id": 3, "name": "cell"}],
                "annotations": [
                    {"image_id": 7, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 60.0, "iscrowd": 0},
                    {"image_id": 7, "category_id": 3, "bbox": [0, 20, 20, 20], "area": 400.0, "iscrowd": 1},
                ],
            }
        )
    )
    splits, names = load_detection_dataset(train_dir=str(tmp_path))
    objects = splits["train"][0]["objects"]
    assert names == ["cell"] and objects["area"] == [60.0, 400.0] and objects["iscrowd"] == [0, 1]
    raw = splits["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert (
        image_size_of(raw) == (40, 20)
        and open_rgb_image(raw).size == (20, 40)
        and splits["train"][0]["image"].size == (20, 40)
    )
    train = DetectionTransform(16, *NORMALIZATION, True)(splits["train"][:1])["labels"][0]
    evaluation = DetectionTransform(16, *NORMALIZATION, False)(splits["train"][:1])["labels"][0]
    assert train["class_labels"].tolist() == [0] and evaluation["class_labels"].tolist() == [
        0,
        0,
    ]  # crowds: not trained on
    torch.testing.assert_close(evaluation["boxes"][0], torch.tensor([0.25, 0.125, 0.5, 0.25]))  # normalized by 20 x 40
