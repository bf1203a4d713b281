"""A generated data set for dense tasks: shapes on textured backgrounds, with exact masks and boxes.

No real detection or segmentation data can be downloaded where the tests run, so the dense-task tests and the dense
demo use this: each image has one to `max_objects` shapes (circle, square, triangle) of random size, position and
color over a textured background (smooth noise, stripes, a color gradient). Later shapes occlude earlier ones; the
masks and boxes describe what is visible (shapes are placed so that they hide at most a tenth of one another). A
small model can learn it: the classes differ in geometry, not color.

Columns: `image` (RGB), `semantic_mask` (L: 0 background, 1 + class index), `instance_mask` (L: 0 background,
instance ids 1..n), and `objects` with COCO-style `bbox` (`[x, y, width, height]` in pixels), `category` (0-based
class index), `area` and `id` (its value in `instance_mask`).
"""

import datasets
import numpy as np
from PIL import Image, ImageDraw


SHAPE_CLASSES = ("circle", "square", "triangle")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured RGB background: smooth noise + stripes + a gradient, in a random palette."""
    coarse = rng.random((size // 8 + 2, size // 8 + 2, 3))
    noise = (
        np.asarray(
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
            dtype=np.float32,
        )
        / 255
    )
    y, x = np.mgrid[0:size, 0:size] / size
    angle, frequency = rng.uniform(0, np.pi), rng.uniform(3, 10)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)))
    gradient = x if rng.random() < 0.5 else y
    palette = rng.random((3, 3))
    texture = 0.5 * noise + 0.25 * stripes[..., None] * palette[0] + 0.25 * gradient[..., None] * palette[1]
    return np.clip(texture * rng.uniform(0.6, 1.0) + palette[2] * 0.2, 0, 1)


def _draw(shape: str, canvas: ImageDraw.ImageDraw, box: tuple[int, int, int, int], value) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        canvas.ellipse(box, fill=value)
    elif shape == "square":
        canvas.rectangle(box, fill=value)
    else:
        canvas.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=value)


def _overlap(first, second) -> int:
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    return max(width, 0) * max(height, 0)


def make_shape_example(index: int, image_size: int = 64, max_objects: int = 3, seed: int = 0) -> dict:
    """One image with its masks and boxes, a pure function of `(index, seed)`."""
    rng = np.random.default_rng([seed, index])
    pixels = _texture(rng, image_size)
    instance = Image.new("L", (image_size, image_size), 0)
    instance_canvas = ImageDraw.Draw(instance)
    categories, boxes = {}, []
    for instance_id in range(1, int(rng.integers(1, max_objects + 1)) + 1):
        category = int(rng.integers(len(SHAPE_CLASSES)))
        for _ in range(20):  # place it where it hides at most a tenth of another shape's box, or drop it
            side = int(rng.uniform(0.2, 0.45) * image_size)
            left, top = (int(value) for value in rng.integers(0, image_size - side, size=2))
            box = (left, top, left + side, top + side)
            if all(_overlap(box, other) <= 0.1 * (other[2] - other[0]) ** 2 for other in boxes):
                break
        else:
            continue
        boxes.append(box)
        shape_mask = Image.new("L", (image_size, image_size), 0)
        _draw(SHAPE_CLASSES[category], ImageDraw.Draw(shape_mask), box, 255)
        inside = np.asarray(shape_mask) > 0
        color = rng.random(3)
        pixels[inside] = color * 0.8 + 0.1 + rng.normal(0, 0.03, size=(int(inside.sum()), 3))
        _draw(SHAPE_CLASSES[category], instance_canvas, box, instance_id)
        categories[instance_id] = category
    instance_ids = np.asarray(instance)
    semantic = np.zeros_like(instance_ids)
    objects = {"bbox": [], "category": [], "area": [], "id": []}
    for instance_id, category in categories.items():
        visible = instance_ids == instance_id
        if visible.sum() < 4:  # hidden behind later shapes
            continue
        semantic[visible] = category + 1
        rows, columns = np.nonzero(visible)
        objects["bbox"].append(
            [
                float(columns.min()),
                float(rows.min()),
                float(columns.max() - columns.min() + 1),
                float(rows.max() - rows.min() + 1),
            ]
        )
        objects["category"].append(category)
        objects["area"].append(float(visible.sum()))
        objects["id"].append(instance_id)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return {"image": image, "semantic_mask": Image.fromarray(semantic), "instance_mask": instance, "objects": objects}


def make_shapes_dataset(
    num_images: int, image_size: int = 64, max_objects: int = 3, seed: int = 0
) -> datasets.Dataset:
    """`num_images` generated images (see the module docstring), as a `datasets.Dataset`.

    Example:

    ```python
    >>> train = make_shapes_dataset(512, image_size=64, seed=0)
    >>> validation = make_shapes_dataset(128, image_size=64, seed=1)
    ```
    """
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "semantic_mask": datasets.Image(),
            "instance_mask": datasets.Image(),
            "objects": {
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                "category": datasets.Sequence(datasets.ClassLabel(names=list(SHAPE_CLASSES))),
                "area": datasets.Sequence(datasets.Value("float32")),
                "id": datasets.Sequence(datasets.Value("int64")),
            },
        }
    )
    examples = [make_shape_example(index, image_size, max_objects, seed) for index in range(num_images)]
    columns = {name: [example[name] for example in examples] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


__all__ = ["SHAPE_CLASSES", "make_shape_example", "make_shapes_dataset"]
