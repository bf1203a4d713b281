"""How fast the streamed data loader feeds generic distillation: decode + the GD transform, images/s per worker.

Run by hand (not a test; about 2 minutes on 2 CPU cores), on an otherwise idle machine:

    python benchmarks/benchmark_streaming_loader.py
    python benchmarks/benchmark_streaming_loader.py --images 512 --repeats 5 --output loader.json

Two kinds of images, each written as tar shards with `g2sd_hf.shards` and read back as `--streaming` reads them
(`load_image_stream` + `training_stream`: shard draws, shuffle buffer, `open_rgb_image`, RandomResizedCrop 224 + flip
+ normalize):

- ELPV-sized: the first N cells of the ELPV package, 300x300 8-bit grayscale PNGs, as shipped;
- 500x375 JPEGs (ImageNet's typical size): the same cells resized to 500x375, given color, saved at quality 90.

For each: images/s of one worker (the stream iterated in the measuring process), split into decoding and the
transform, and the throughput of a `torch.utils.data.DataLoader` with 1 and 2 worker processes (batch 32). The
workers per GPU a target throughput needs is `target / images/s per worker`; `docs/scale.md` quotes it. Medians of
`--repeats` passes over the images, after one warm-up pass.
"""

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from g2sd_hf.data import elpv_directory, generic_distillation_transform, open_rgb_image
from g2sd_hf.shards import write_shards
from g2sd_hf.streaming import collate_stream, load_image_stream, training_stream
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def write_images(root: Path, count: int) -> dict[str, Path]:
    cells = sorted((elpv_directory() / "images").glob("*.png"))[:count]
    folders = {"ELPV 300x300 PNG": root / "elpv", "500x375 JPEG": root / "jpeg"}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for index, cell in enumerate(cells):
        (folders["ELPV 300x300 PNG"] / cell.name).write_bytes(cell.read_bytes())
        gray = np.asarray(Image.open(cell).convert("L").resize((500, 375), Image.Resampling.BICUBIC), dtype=np.float32)
        color = np.stack([gray, gray * 0.8 + 30, 255 - gray * 0.6], axis=-1).clip(0, 255).astype(np.uint8)
        Image.fromarray(color).save(folders["500x375 JPEG"] / f"{index:05d}.jpg", quality=90)
    return folders


def rate(count: int, seconds: float) -> float:
    return count / seconds


def measure(shards: str, count: int, repeats: int) -> dict:
    transform = generic_distillation_transform(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    raw = load_image_stream(train_dir=shards)
    images = [example["image"] for example in islice(iter(raw), count)]
    decoded = [open_rgb_image(image) for image in images]  # warm-up, and the inputs of the transform-only timing

    def timed(function) -> float:
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            rates.append(rate(count, time.perf_counter() - start))
        return statistics.median(rates)

    decode = timed(lambda: [open_rgb_image(image) for image in images])
    augment = timed(lambda: [transform(image) for image in decoded])
    stream = training_stream(raw, transform, seed=0, shuffle_buffer_size=256)
    list(islice(iter(stream), count))  # warm-up pass
    one_worker = timed(lambda: list(islice(iter(stream), count)))
    loaders = {}
    for workers in (1, 2):
        loader = DataLoader(stream, batch_size=32, num_workers=workers, collate_fn=collate_stream)
        batches = math.ceil(count / 32)

        def run(loader=loader, batches=batches):
            for _ in islice(iter(loader), batches):
                pass

        loaders[workers] = statistics.median(
            [rate(batches * 32, seconds) for seconds in [_time(run) for _ in range(repeats)]]
        )
    return {
        "decode images/s": decode,
        "transform images/s": augment,
        "stream images/s (one worker)": one_worker,
        "DataLoader images/s, 1 worker": loaders[1],
        "DataLoader images/s, 2 workers": loaders[2],
    }


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def cpu_name() -> str:
    for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=5000.0, help="images/s per GPU to feed")
    parser.add_argument("--output", default=None, help="also write the results as JSON")
    arguments = parser.parse_args()
    torch.set_num_threads(1)  # one worker = one core
    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "kinds": {}}
    with tempfile.TemporaryDirectory() as root:
        for kind, folder in write_images(Path(root), arguments.images).items():
            shards = Path(root) / f"{folder.name}-shards"
            write_shards(str(folder), str(shards), images_per_shard=32)
            results["kinds"][kind] = measure(str(shards), arguments.images, arguments.repeats)
    print(f"{results['cpu']}, {results['cores']} cores, torch {results['torch']}; {arguments.images} images each\n")
    names = list(next(iter(results["kinds"].values())))
    print("| Images | " + " | ".join(names) + f" | workers for {arguments.target:.0f} images/s |")
    print("|---" * (len(names) + 2) + "|")
    for kind, values in results["kinds"].items():
        workers = math.ceil(arguments.target / values["stream images/s (one worker)"])
        values["workers per GPU for the target"] = workers
        print(f"| {kind} | " + " | ".join(f"{values[name]:.0f}" for name in names) + f" | {workers} |")
    if arguments.output:
        Path(arguments.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
