"""Write a local image folder as WebDataset tar shards, the format `--streaming` reads from a folder of `.tar` files
(`datasets.load_dataset("webdataset", ...)`).

Each image is stored as it is (its bytes, not re-encoded) under a key made of its path inside the folder, so that a
sample names its file: `cracked/cell_0007.png` becomes the sample `cracked/cell_0007` with the field `png`. Hidden files
and files that are not images are left out, each named in a warning (`data.check_image_folder`). Every shard is written
under a temporary name and renamed when complete; a destination that holds anything is refused, so nothing is ever
overwritten.

```bash
python -m g2sd_hf.shards path/to/images path/to/shards --images_per_shard 1000
```
"""

import argparse
import logging
import os
import tarfile
from pathlib import Path

from .data import check_image_folder


logger = logging.getLogger(__name__)

SHARD_NAME = "shard-{index:06d}.tar"


def sample_key(relative_path: str) -> tuple[str, str]:
    """`(key, field)` of an image in a shard: WebDataset splits a member's name at the first dot of its file name
    (`dir/stem.ext` -> key `dir/stem`, field `ext`), so the dots of a stem become underscores."""
    folder, name = os.path.split(relative_path)
    stem, _, suffix = name.rpartition(".")
    key = os.path.join(folder, stem.replace(".", "_")) if folder else stem.replace(".", "_")
    return key, suffix.lower()


def write_shards(source: str, destination: str, images_per_shard: int = 1000) -> list[str]:
    """Write the images of `source` (any layout) as tar shards of `images_per_shard` images into `destination`.

    Returns:
        `list[str]`: the shards written, in order.

    Raises:
        ValueError: a destination that is not empty, a count below 1, two images with one key, or what
            `check_image_folder` refuses.

    Example:

    ```python
    >>> write_shards("cells", "cells-shards", images_per_shard=500)
    ['cells-shards/shard-000000.tar', 'cells-shards/shard-000001.tar']
    ```
    """
    if images_per_shard < 1:
        raise ValueError(f"--images_per_shard must be at least 1, got {images_per_shard}.")
    target = Path(destination)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(
            f"{destination} already exists and is not an empty folder: shards are written only into a new or empty "
            "folder, so that nothing is overwritten. Choose another destination."
        )
    images = check_image_folder("the source folder", source)
    keys = {}
    for path in images:
        key = sample_key(os.path.relpath(path, source))[0]
        if key in keys:
            raise ValueError(f"{keys[key]} and {path} would be one sample ({key!r}) in a shard: rename one of them.")
        keys[key] = path
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(images), images_per_shard):
        shard = target / SHARD_NAME.format(index=len(written))
        partial = shard.with_name(shard.name + ".partial")
        with tarfile.open(partial, "w") as archive:
            for path in images[start : start + images_per_shard]:
                key, field = sample_key(os.path.relpath(path, source))
                archive.add(path, arcname=f"{key}.{field}", recursive=False)
        os.replace(partial, shard)
        written.append(str(shard))
    logger.info(f"Wrote {len(images)} images into {len(written)} shard(s) in {destination}.")
    return written


def main(args: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="A folder of images (any layout).")
    parser.add_argument("destination", help="A new or empty folder for the shards.")
    parser.add_argument(
        "--images_per_shard", type=int, default=1000, help="Images in each shard (the last one: the rest)."
    )
    arguments = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return write_shards(arguments.source, arguments.destination, arguments.images_per_shard)


if __name__ == "__main__":
    main()
