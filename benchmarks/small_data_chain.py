#!/usr/bin/env python
"""The whole G2SD chain on a small generated data set, against the scratch student: the measurement behind
docs/recipes.md ("Teacher fine-tuning on a small data set"). Run by hand; one run takes 5-10 minutes on 2 CPU cores.

    python benchmarks/small_data_chain.py --output_dir /tmp/chain --kind shapes --image_size 48 --patch_size 6

Each stage is the example script with `--recipe small-data` and nothing else but sizes and step counts: an MAE
(96-d x 6, decoder 64-d x 2), its encoder fine-tuned into the teacher, generic distillation into a 48-d x 4 student,
specific distillation from the teacher, and, inside that run (the small-data recipe's `scratch_baseline`), the same
student from scratch. Prints the balanced accuracy of each and the chain's warnings.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from g2sd_hf.synthetic import write_classification_folder


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEACHER = "hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384"
MAE_DECODER = (
    "decoder_hidden_size=64,decoder_num_hidden_layers=2,decoder_num_attention_heads=2,decoder_intermediate_size=256"
)
STUDENT = "hidden_size=48,num_hidden_layers=4,num_attention_heads=3,intermediate_size=192"
GD_DECODER = "decoder_hidden_size=32,decoder_num_hidden_layers=2,decoder_num_attention_heads=2,decoder_intermediate_size=128,target_hidden_size=64"


def run(script: str, output_dir: Path, common: list[str], *arguments: str) -> tuple[dict, float]:
    """Run an example script in its own process; return its metrics (and warnings) and its wall time."""
    start = time.perf_counter()
    command = [sys.executable, str(EXAMPLES / script), "--output_dir", str(output_dir), *common, *arguments]
    log = output_dir.with_suffix(".log")
    with open(log, "w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    metrics = {}
    for name in ("train_results.json", "eval_results.json", "learning_warnings.json"):
        if (output_dir / name).exists():
            values = json.loads((output_dir / name).read_text())
            metrics.update(values if isinstance(values, dict) else {"warnings": values})
    return metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--kind", choices=["shapes", "digits"], default="shapes")
    parser.add_argument("--image_size", type=int, default=48)
    parser.add_argument("--patch_size", type=int, default=6)
    parser.add_argument("--train_images", type=int, default=1200)
    parser.add_argument("--validation_images", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--mae_epochs", type=float, default=100)
    parser.add_argument("--teacher_epochs", type=float, default=10)
    parser.add_argument("--generic_epochs", type=float, default=50)
    parser.add_argument("--specific_epochs", type=float, default=10)
    args = parser.parse_args()

    data = args.output_dir / "data"
    if not data.exists():
        write_classification_folder(data / "train", args.kind, args.train_images, args.image_size, seed=0)
        write_classification_folder(data / "validation", args.kind, args.validation_images, args.image_size, seed=1)
    common = [
        "--train_dir", str(data / "train"), "--validation_dir", str(data / "validation"), "--recipe", "small-data",
        "--per_device_train_batch_size", str(args.batch_size), "--save_strategy", "no", "--report_to", "none",
        "--seed", "0", "--overwrite_output_dir", "--disable_tqdm", "true", "--do_train",
    ]  # fmt: skip
    geometry = f"image_size={args.image_size},patch_size={args.patch_size}"
    runs = args.output_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    results = {}
    results["mae"] = run(
        "run_mae_pretraining.py", runs / "mae", common,
        "--config_overrides", f"{geometry},{TEACHER},{MAE_DECODER}", "--num_train_epochs", str(args.mae_epochs),
    )  # fmt: skip
    results["teacher"] = run(
        "run_finetune_teacher.py", runs / "teacher", common, "--do_eval",
        "--mae_name_or_path", str(runs / "mae"), "--num_train_epochs", str(args.teacher_epochs),
    )  # fmt: skip
    results["generic"] = run(
        "run_generic.py", runs / "generic", common, "--teacher_name_or_path", str(runs / "mae"), "--target_layer", "2",
        "--config_overrides", f"{geometry},{STUDENT},{GD_DECODER}", "--num_train_epochs", str(args.generic_epochs),
    )  # fmt: skip
    results["g2sd"] = run(
        "run_specific.py", runs / "g2sd", common, "--do_eval", "--student_name_or_path", str(runs / "generic"),
        "--teacher_name_or_path", str(runs / "teacher"), "--num_train_epochs", str(args.specific_epochs),
    )  # fmt: skip

    print(f"{args.kind}, {args.image_size} px, {args.train_images} training images, batch {args.batch_size}")
    print("| Stage | Balanced accuracy | Seconds | Warnings |")
    print("|---|---|---|---|")
    for name, (metrics, seconds) in results.items():
        accuracy = metrics.get("eval_balanced_accuracy")
        shown = f"{accuracy:.3f}" if accuracy is not None else "-"
        for key, label in (("teacher_eval_", "teacher before distilling"), ("scratch_eval_", "scratch baseline")):
            if f"{key}balanced_accuracy" in metrics:
                shown += f" ({label} {metrics[f'{key}balanced_accuracy']:.3f})"
        warnings = " / ".join(short_warning(warning) for warning in metrics.get("warnings", [])) or "-"
        print(f"| {name} | {shown} | {seconds:.0f} | {warnings} |")


def short_warning(warning: str) -> str:
    """The finding and, when the warning names one, the weak stage."""
    weak = warning.split("The weak stage is ")[1].split(":")[0] if "The weak stage is " in warning else None
    return warning.split(":")[0] + (f" (weak stage: {weak})" if weak else "")


if __name__ == "__main__":
    main()
