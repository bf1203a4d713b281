"""Streamed against map-style generic distillation on ELPV: the same student, teacher, recipe and steps, the training
cells once read as a table and once streamed from tar shards. What differs is only the order in which the images come
(and so the augmentations drawn); the two should end at about the same loss.

Run by hand (not a test; about 10 minutes on 2 CPU cores):

    python benchmarks/compare_streaming_gd.py --output_dir /tmp/streaming-vs-map

The demo's generic-distillation stage at the cpu scale: its shipped MAE teacher (target layer 2), its student, batch
64, `--recipe small-data`, 10 epochs' worth of steps (1,968 training cells: 307 steps), seed 0; evaluated on the 656
held-out cells. The map-style run reads the cells as an image folder (one sub-folder per class: the labels are not
used), the streamed run the same files written as shards of 64 by `g2sd_hf.shards`.
"""

import argparse
import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import run_demo  # noqa: E402
import run_generic  # noqa: E402

from g2sd_hf.data import load_elpv  # noqa: E402
from g2sd_hf.shards import write_shards  # noqa: E402


def write_split(split, folder: Path) -> None:
    names = split.features["label"].names
    for example in split:
        target = folder / names[example["label"]].replace("/", "_")
        target.mkdir(parents=True, exist_ok=True)
        image = example["image"]  # the table holds each cell's PNG bytes, under its file name
        (target / Path(image["path"]).name).write_bytes(image["bytes"] or Path(image["path"]).read_bytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--shuffle_buffer_size", type=int, default=2000)
    arguments = parser.parse_args()
    root = Path(arguments.output_dir)
    scale = run_demo.SCALES["cpu"]
    splits = load_elpv(task=run_demo.ELPV_TASK)
    if not (root / "cells").exists():
        write_split(splits["train"], root / "cells")
        write_split(splits["test"], root / "held-out")
        write_shards(str(root / "cells"), str(root / "shards"), images_per_shard=64)
    steps = int(arguments.epochs * len(splits["train"]) // scale.batch_size)
    common = [
        f"--teacher_name_or_path={ROOT / 'examples' / 'assets' / 'elpv-mae-teacher'}",
        f"--target_layer={scale.target_layer}",
        f"--config_overrides={scale.student}",
        "--recipe=small-data",
        f"--per_device_train_batch_size={scale.batch_size}",
        f"--max_steps={steps}",
        f"--validation_dir={root / 'held-out'}",
        "--seed=0",
        "--save_strategy=no",
        "--report_to=none",
        "--logging_steps=10",
        "--disable_tqdm=true",
        "--do_train",
        "--do_eval",
    ]
    runs = {
        "map-style (image folder)": [f"--train_dir={root / 'cells'}", f"--output_dir={root / 'map'}"],
        "streamed (tar shards)": [
            f"--train_dir={root / 'shards'}",
            f"--output_dir={root / 'streamed'}",
            "--streaming",
            f"--shuffle_buffer_size={arguments.shuffle_buffer_size}",
        ],
    }
    results = {}
    for name, specific in runs.items():
        metrics = run_generic.main(specific + common + ["--overwrite_output_dir=true"])
        results[name] = {key: metrics[key] for key in ("train_loss", "eval_loss", "train_runtime") if key in metrics}
    print(f"\n{steps} steps of {scale.batch_size} images, seed 0\n")
    print("| Run | train loss (mean over the steps) | eval loss (656 held-out cells) | training seconds |")
    print("|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {values['train_loss']:.4f} | {values['eval_loss']:.4f} | {values['train_runtime']:.0f} |")
    (root / "comparison.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
