"""Generated data sets: shapes on textured backgrounds with exact masks and boxes (dense tasks), and image folders of
digits and shapes drawn with PIL (classification).

No real detection or segmentation data can be downloaded where the tests run, so the dense-task tests and the dense
demo use this: each image has one to `max_objects` shapes (circle, square, triangle) of random size, position and
color over a textured background (smooth noise, stripes, a color gradient). Later shapes occlude earlier ones; the
masks and boxes describe what is visible (shapes are placed so that they hide at most a tenth of one another). A
small model can learn it: the classes differ in geometry, not color.

Columns: `image` (RGB), `semantic_mask` (L: 0 background, 1 + class index), `instance_mask` (L: 0 background,
instance ids 1..n), and `objects` with COCO-style `bbox` (`[x, y, width, height]` in pixels), `category` (0-based
class index), `area` and `id` (its value in `instance_mask`).
"""

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont


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


# --------------------------------------------------------------------------------------------------------------------
# Classification: image folders with real structure (digits and shapes drawn with PIL), for trying a recipe on data
# nobody tuned it for
# --------------------------------------------------------------------------------------------------------------------
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
SHAPE_KIND_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")


def _star(box: tuple[float, float, float, float], points: int = 5) -> list[tuple[float, float]]:
    left, top, right, bottom = box
    center_x, center_y, radius = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
    angles = np.linspace(-np.pi / 2, 3 * np.pi / 2, 2 * points, endpoint=False)
    radii = np.where(np.arange(2 * points) % 2 == 0, radius, radius * 0.45)
    return list(zip(center_x + radii * np.cos(angles), center_y + radii * np.sin(angles)))


def _draw_shape_kind(kind: str, canvas: ImageDraw.ImageDraw, box, color, width: int) -> None:
    left, top, right, bottom = box
    if kind in SHAPE_CLASSES:
        _draw(kind, canvas, box, color)
    elif kind == "cross":
        thick = (right - left) / 3
        canvas.rectangle((left, top + thick, right, bottom - thick), fill=color)
        canvas.rectangle((left + thick, top, right - thick, bottom), fill=color)
    elif kind == "ring":
        canvas.ellipse(box, outline=color, width=max(2, width))
    else:
        canvas.polygon(_star(box), fill=color)


def _class_names(kind: str, classes: Sequence[str] | None) -> tuple[str, ...]:
    known = {"digits": DIGIT_CLASSES, "shapes": SHAPE_KIND_CLASSES}
    if kind not in known:
        raise ValueError(f"Unknown generated classification set {kind!r}: choose one of {sorted(known)}.")
    if classes is None:
        return known[kind]
    unknown = sorted(set(classes) - set(known[kind]))
    if unknown or len(set(classes)) < 2 or len(set(classes)) != len(classes):
        raise ValueError(
            f"classes must be two or more distinct names of {known[kind]}, got {list(classes)}"
            + (f" ({unknown} unknown)." if unknown else ".")
        )
    return tuple(classes)


def make_classification_example(
    kind: str, index: int, image_size: int = 32, seed: int = 0, classes: Sequence[str] | None = None
) -> tuple[Image.Image, int]:
    """One labeled image of a generated classification set, a pure function of `(kind, index, seed)`.

    - `"digits"`: a digit 0-9 in PIL's default font at a random size (65-90% of the image), position near the center,
      rotation (+-15 degrees) and color, over a textured background; the label is the digit.
    - `"shapes"`: one of `SHAPE_KIND_CLASSES` at a random size (35-75%), position, rotation and color over a
      textured background; the label is the shape.

    `classes` picks some of the kind's classes (all by default); the label is the index in it. Classes follow
    `index % len(classes)`, so the first `n x len(classes)` indices are balanced.
    """
    names = _class_names(kind, classes)
    label = index % len(names)
    rng = np.random.default_rng([seed, index, len(kind)])
    texture = _texture(rng, image_size)
    # The texture at 40% contrast around its mean: a background that varies, under a figure that stays legible.
    texture = texture.mean(axis=(0, 1)) + 0.4 * (texture - texture.mean(axis=(0, 1)))
    background = Image.fromarray((texture * 255).astype(np.uint8))
    # Draw at 4x and shrink: smooth edges at any image size.
    scale = 4
    large = image_size * scale
    layer = Image.new("L", (large, large), 0)
    canvas = ImageDraw.Draw(layer)
    if kind == "digits":
        size = int(rng.uniform(0.65, 0.9) * large)
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = canvas.textbbox((0, 0), names[label], font=font, stroke_width=size // 14)
        # Near the center: the middle half of the free room on each side.
        x = rng.uniform(0.25, 0.75) * max(1, large - (right - left)) - left
        y = rng.uniform(0.25, 0.75) * max(1, large - (bottom - top)) - top
        canvas.text((x, y), names[label], fill=255, font=font, stroke_width=size // 14, stroke_fill=255)
    else:
        side = rng.uniform(0.35, 0.75) * large
        left, top = rng.uniform(0, large - side, size=2)
        _draw_shape_kind(names[label], canvas, (left, top, left + side, top + side), 255, int(side / 8))
    layer = layer.rotate(
        float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, center=(large / 2, large / 2)
    )
    mask = layer.resize((image_size, image_size), Image.Resampling.LANCZOS)
    # A color that stands out from the background: its complement, jittered.
    mean_color = np.asarray(background, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255
    color = np.clip(1 - mean_color + rng.normal(0, 0.15, size=3), 0, 1)
    foreground = Image.new("RGB", (image_size, image_size), tuple(int(value * 255) for value in color))
    return Image.composite(foreground, background, mask), label


def write_classification_folder(
    root: str | Path,
    kind: str,
    num_images: int,
    image_size: int = 32,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write `num_images` generated images (`make_classification_example`) as an image folder, one sub-folder per
    class (`root/<class>/<index>.png`), the layout `--train_dir` / `--validation_dir` read. Refuses a folder that
    already holds files. Returns `root`.

    Example:

    ```python
    >>> write_classification_folder("digits/train", "digits", 1000, image_size=32, seed=0)
    >>> write_classification_folder("digits/validation", "digits", 500, image_size=32, seed=1)
    ```
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: write the generated images into a new folder.")
    names = _class_names(kind, classes)
    for index in range(num_images):
        image, label = make_classification_example(kind, index, image_size, seed, classes)
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.png")
    return root


__all__ = [
    "DIGIT_CLASSES",
    "SHAPE_CLASSES",
    "SHAPE_KIND_CLASSES",
    "make_classification_example",
    "make_shape_example",
    "make_shapes_dataset",
    "write_classification_folder",
]
