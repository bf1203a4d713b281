#!/usr/bin/env python
"""The whole G2SD method on the embedded ELPV solar-cell images, on CPU, offline (`make demo`).

1. Pre-train a small MAE teacher on the ELPV training images (offline, so the teacher is made here; online, the same
   scripts take `facebook/vit-mae-base`).
2. Fine-tune that teacher as a classifier: the specific-distillation teacher.
3. Generic distillation: MAE teacher -> a smaller student.
4. Specific distillation: the student classifier with the fine-tuned teacher.
5. Baselines, same student, same fine-tuning budget: from scratch (supervised only), SD only (from scratch with the
   teacher), GD only (generic distillation, then plain fine-tuning).
6. Evaluate everything on the held-out 25% and write `results.md`, `results.json`, `results.png` and a
   pipeline-ready checkpoint of the G2SD student.

Each stage is one of the example scripts, called through its `main()`. Finished stages are reused on a second run
(`<output_dir>/stages/<stage>`, keyed by the stage's arguments).

    python examples/run_demo.py --output_dir demo_output
"""

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, pipeline


sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_finetune_teacher  # noqa: E402
import run_generic  # noqa: E402
import run_mae_pretraining  # noqa: E402
import run_specific  # noqa: E402

import g2sd_hf  # noqa: E402,F401  (registers the G2SD Auto classes)
from g2sd_hf.analysis import cka_matrix, occlusion_curve, plot_cka, plot_occlusion  # noqa: E402
from g2sd_hf.data import (  # noqa: E402
    ELPV_CLASS_NAMES,
    ImageTransform,
    collate_classification,
    evaluation_transform,
    load_elpv,
    open_rgb_image,
    resize_images,
)
from g2sd_hf.metrics import metric_name  # noqa: E402


logger = logging.getLogger("g2sd_demo")


@dataclass
class DemoScale:
    """Sizes and budgets of one demo run."""

    image_size: int
    patch_size: int
    teacher: str  # ViTMAEConfig overrides
    student: str  # G2SDConfig overrides
    target_layer: int
    batch_size: int
    mae_epochs: float
    teacher_epochs: float
    generic_epochs: float
    specific_epochs: float
    # Peak learning rates, used as is: at batch 64 the linear scaling rule (x batch / 256) would give too little.
    pretraining_learning_rate: float = 1e-3
    fine_tuning_learning_rate: float = 5e-4
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_image_side: int | None = None
    throughput_batch: int = 64


SCALES = {
    # About 15 minutes on 2 CPU cores: 128x128 images in 8x8 patches of 16 pixels.
    "demo": DemoScale(
        image_size=96,
        patch_size=16,
        teacher="hidden_size=192,num_hidden_layers=6,num_attention_heads=3,intermediate_size=768,"
        "decoder_hidden_size=128,decoder_num_hidden_layers=4,decoder_num_attention_heads=4,decoder_intermediate_size=512",
        student="hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384,"
        "decoder_hidden_size=64,decoder_num_hidden_layers=2,decoder_num_attention_heads=2,decoder_intermediate_size=256",
        target_layer=2,
        batch_size=64,
        mae_epochs=16,
        teacher_epochs=10,
        generic_epochs=16,
        specific_epochs=10,
        max_image_side=128,
    ),
    # Seconds, for the tests: tiny models, a few steps on a few images.
    "smoke": DemoScale(
        image_size=32,
        patch_size=8,
        teacher="hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
        "decoder_hidden_size=24,decoder_num_hidden_layers=2,decoder_num_attention_heads=2,decoder_intermediate_size=48",
        student="hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,"
        "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32",
        target_layer=1,
        batch_size=16,
        mae_epochs=1,
        teacher_epochs=1,
        generic_epochs=1,
        specific_epochs=1,
        max_train_samples=48,
        max_eval_samples=32,
        throughput_batch=8,
    ),
}

STUDENTS = {
    "g2sd": "G2SD (GD + SD)",
    "gd_only": "GD only (GD + fine-tuning)",
    "sd_only": "SD only (scratch + SD)",
    "scratch": "Scratch (supervised only)",
}


def common_arguments(scale: DemoScale, output_dir: Path, epochs: float, seed: int) -> list[str]:
    arguments = [
        "--output_dir", str(output_dir),
        "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", str(scale.batch_size),
        "--per_device_eval_batch_size", str(2 * scale.batch_size),
        "--logging_steps", "5",
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", str(seed),
        "--disable_tqdm", "true",
        "--scale_lr_with_batch_size", "false",
        "--do_train",
    ]
    for flag, value in (("--max_train_samples", scale.max_train_samples), ("--max_eval_samples", scale.max_eval_samples),
                        ("--max_image_side", scale.max_image_side)):
        if value is not None:
            arguments += [flag, str(value)]
    return arguments


def stage_arguments(scale: DemoScale, stages: Path, seed: int) -> dict[str, tuple]:
    """Each stage: (script module, arguments). Small-data recipe: mixup/cutmix and random erasing off."""
    classify = ["--do_eval", "--mixup_alpha", "0", "--cutmix_alpha", "0", "--random_erasing", "0", "--rand_augment_magnitude", "5",
                "--min_crop_scale", "0.5", "--warmup_steps", "0.1"]
    student_shape = f"image_size={scale.image_size},patch_size={scale.patch_size},{scale.student}"
    fine_tuning_lr = str(scale.fine_tuning_learning_rate)
    return {
        "mae_teacher": (run_mae_pretraining, common_arguments(scale, stages / "mae_teacher", scale.mae_epochs, seed) + [
            "--config_overrides", f"image_size={scale.image_size},patch_size={scale.patch_size},{scale.teacher}",
            "--learning_rate", str(scale.pretraining_learning_rate), "--warmup_steps", "0.1"]),
        "teacher_classifier": (run_finetune_teacher, common_arguments(scale, stages / "teacher_classifier", scale.teacher_epochs, seed) + classify + [
            "--mae_name_or_path", str(stages / "mae_teacher"), "--learning_rate", fine_tuning_lr, "--layer_decay", "0.75"]),
        "generic": (run_generic, common_arguments(scale, stages / "generic", scale.generic_epochs, seed) + [
            "--teacher_name_or_path", str(stages / "mae_teacher"), "--target_layer", str(scale.target_layer),
            "--config_overrides", scale.student, "--learning_rate", str(scale.pretraining_learning_rate), "--warmup_steps", "0.1",
            "--do_eval"]),
        "g2sd": (run_specific, common_arguments(scale, stages / "g2sd", scale.specific_epochs, seed) + classify + [
            "--student_name_or_path", str(stages / "generic"), "--teacher_name_or_path", str(stages / "teacher_classifier"),
            "--distillation_type", "hard", "--learning_rate", fine_tuning_lr, "--layer_decay", "0.75"]),
        "gd_only": (run_specific, common_arguments(scale, stages / "gd_only", scale.specific_epochs, seed) + classify + [
            "--student_name_or_path", str(stages / "generic"), "--distillation_type", "none",
            "--learning_rate", fine_tuning_lr, "--layer_decay", "0.75"]),
        "sd_only": (run_specific, common_arguments(scale, stages / "sd_only", scale.specific_epochs, seed) + classify + [
            "--config_overrides", student_shape, "--teacher_name_or_path", str(stages / "teacher_classifier"),
            "--distillation_type", "hard", "--learning_rate", fine_tuning_lr, "--layer_decay", "1.0"]),
        "scratch": (run_specific, common_arguments(scale, stages / "scratch", scale.specific_epochs, seed) + classify + [
            "--config_overrides", student_shape, "--distillation_type", "none", "--learning_rate", fine_tuning_lr,
            "--layer_decay", "1.0"]),
    }


def start_demo(description: str, default_output_dir: str, scales, args: list[str] | None) -> tuple[argparse.Namespace, Path, Path]:
    """The demos' command line (`--output_dir`, `--scale`, `--seed`) and logging; returns the options, the output
    folder and its `stages/` folder (created)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=default_output_dir)
    parser.add_argument("--scale", choices=sorted(scales), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    output_dir = Path(options.output_dir).resolve()
    (output_dir / "stages").mkdir(parents=True, exist_ok=True)
    return options, output_dir, output_dir / "stages"


def run_stage(name: str, module, arguments: list[str], folder: Path) -> dict:
    """Run a stage's script unless the same stage already finished in `folder`; return its timing and metrics."""
    marker = folder / "g2sd_demo_stage.json"
    if marker.exists():
        record = json.loads(marker.read_text())
        if record["arguments"] == arguments:
            logger.warning(f"[{name}] reusing the finished stage in {folder}")
            return {**record, "reused": True}
    if folder.exists():
        shutil.rmtree(folder)
    logger.warning(f"[{name}] {module.__name__}.py {' '.join(arguments)}")
    start = time.perf_counter()
    metrics = module.main(arguments)
    record = {"arguments": arguments, "seconds": time.perf_counter() - start, "metrics": metrics}
    marker.write_text(json.dumps(record, indent=2))
    return {**record, "reused": False}


@torch.inference_mode()
def images_per_second(model, image_size: int, batch_size: int, repeats: int = 5) -> float:
    """Median inference throughput of `model` on random `batch_size` batches (after one warm-up batch)."""
    model.eval()
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    model(pixel_values=pixel_values)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(pixel_values=pixel_values)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def loss_curve(folder: Path) -> list[tuple[float, float]]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [(entry["epoch"], entry["loss"]) for entry in state["log_history"] if "loss" in entry and "epoch" in entry]


def write_figure(results: dict, stages: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for stage, label in [("mae_teacher", "MAE pre-training (teacher)"), ("teacher_classifier", "teacher fine-tuning"),
                         ("generic", "generic distillation (L_GD)"), *[(key, value) for key, value in STUDENTS.items()]]:
        points = loss_curve(stages / stage)
        if points:
            curves.plot(*zip(*points), label=label)
    curves.set_xlabel("epoch")
    curves.set_ylabel("training loss")
    curves.set_yscale("log")
    curves.set_title("Training losses")
    curves.legend(fontsize=7)

    names = ["teacher", *STUDENTS]
    labels = ["Teacher (MAE + FT)", *STUDENTS.values()]
    width = 0.38
    for offset, metric, title in ((-width / 2, "accuracy", "4-class accuracy"), (width / 2, "binary_accuracy", "binary accuracy")):
        values = [results["models"][name][metric] for name in names]
        positions = [index + offset for index in range(len(names))]
        drawn = bars.bar(positions, values, width, label=title)
        bars.bar_label(drawn, fmt="%.3f", fontsize=7)
    bars.axhline(results["majority_class_accuracy"], color="gray", linestyle="--", linewidth=1, label="majority class")
    bars.set_xticks(range(len(names)), [label.replace(" (", "\n(") for label in labels], fontsize=7)
    bars.set_ylim(0, 1)
    bars.set_title("ELPV held-out 25%")
    bars.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_markdown(results: dict, path: Path) -> None:
    models = results["models"]
    lines = [
        "# G2SD on ELPV: results of `make demo`",
        "",
        f"Held-out split: {results['eval_images']} of 2,624 ELPV cells (stratified 25%, seed 42); "
        f"trained on {results['train_images']}. Majority-class accuracy: {results['majority_class_accuracy']:.3f}. "
        f"Scale `{results['scale']}`: {results['image_size']}x{results['image_size']} images; "
        f"{results['device']}. Stage time {sum(stage['seconds'] for stage in results['stages'].values()) / 60:.1f} min; "
        f"this run's wall time {results['total_seconds'] / 60:.1f} min.",
        "",
        "| Model | Initialization | Teacher signal | Params | Accuracy | Balanced acc. | Binary acc. | Images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    descriptions = {
        "teacher": ("MAE pre-training", "-"),
        "g2sd": ("generic distillation", "hard distillation"),
        "gd_only": ("generic distillation", "-"),
        "sd_only": ("random", "hard distillation"),
        "scratch": ("random", "-"),
    }
    for name, label in [("teacher", "Teacher (MAE ViT, fine-tuned)"), *STUDENTS.items()]:
        row = models[name]
        init, signal = descriptions[name]
        lines.append(
            f"| {label} | {init} | {signal} | {row['parameters'] / 1e6:.2f}M | {row['accuracy']:.3f} | "
            f"{row['balanced_accuracy']:.3f} | {row['binary_accuracy']:.3f} | {row['images_per_second']:.0f} |"
        )
    names = [("teacher", "Teacher"), *STUDENTS.items()]
    lines += ["", "Per-class accuracy (recall) on the held-out cells, by defect probability:", "",
              "| Model | " + " | ".join(ELPV_CLASS_NAMES) + " |", "|---|" + "---|" * len(ELPV_CLASS_NAMES)]
    for name, label in names:
        per_class = models[name]["per_class_accuracy"]
        cells = [f"{per_class[metric_name(class_name)]:.3f}" if metric_name(class_name) in per_class else "-"
                 for class_name in ELPV_CLASS_NAMES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    best_baseline = max(("gd_only", "sd_only", "scratch"), key=lambda name: models[name]["accuracy"])
    difference = models["g2sd"]["accuracy"] - models[best_baseline]["accuracy"]
    verdict = (
        f"G2SD beats the best baseline ({STUDENTS[best_baseline]}) by {difference * 100:+.1f} accuracy points."
        if difference > 0
        else f"G2SD does **not** beat the best baseline here ({STUDENTS[best_baseline]}: {difference * 100:+.1f} points)."
    )
    lines += [
        "",
        verdict + f" The student runs at {results['speedup']:.2f}x the teacher's images/s "
        f"({models['g2sd']['parameters'] / 1e6:.2f}M vs {models['teacher']['parameters'] / 1e6:.2f}M parameters).",
        "",
        "Every student has the same architecture and the same fine-tuning budget "
        f"({results['specific_epochs']} epochs); the G2SD and GD-only students also had {results['generic_epochs']} "
        "epochs of generic distillation. One seed: differences of a point or two are within run-to-run noise at this "
        "scale. The split is random per cell, so cells of one module can be on both sides.",
        "",
        "## Occlusion invariance",
        "",
        f"Accuracy with a random fraction of the {results['scale_settings']['patch_size']}-pixel patches dropped (set to the mean), per model "
        "([occlusion.png](occlusion.png)):",
        "",
        "| Model | " + " | ".join(f"{float(fraction) * 100:.0f}%" for fraction in next(iter(results["analysis"]["occlusion"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(results["analysis"]["occlusion"].values()))),
        *[f"| {name} | " + " | ".join(f"{value:.3f}" for value in curve.values()) + " |" for name, curve in results["analysis"]["occlusion"].items()],
        "",
        "## Representation similarity",
        "",
        "Linear CKA (minibatch estimator, mean-pooled tokens) between each student layer and each teacher layer on the "
        "held-out cells ([cka.png](cka.png), matrices in cka.json): the last layers', and the mean over student "
        "blocks of their best match among the teacher's layers.",
        "",
        "| Pair | Last layers | Mean best match |",
        "|---|---|---|",
        *[f"| {pair} | {row['last_layer']:.3f} | {row['mean_best_match']:.3f} |" for pair, row in results["analysis"]["cka"].items()],
        "",
        "## Stages",
        "",
        "| Stage | Seconds | Reused |",
        "|---|---|---|",
    ]
    for stage, record in results["stages"].items():
        lines.append(f"| {stage} | {record['seconds']:.0f} | {'yes' if record['reused'] else 'no'} |")
    lines += ["", "![results](results.png)", "", "![occlusion](occlusion.png)", "", "![cka](cka.png)", ""]
    path.write_text("\n".join(lines))


def evaluate_models(stages: Path, scale: DemoScale, records: dict) -> dict:
    models = {}
    for name, folder in [("teacher", "teacher_classifier"), *[(key, key) for key in STUDENTS]]:
        metrics = records[folder]["metrics"]
        model = AutoModelForImageClassification.from_pretrained(stages / folder)
        models[name] = {
            "accuracy": metrics["eval_accuracy"],
            "balanced_accuracy": metrics["eval_balanced_accuracy"],
            "binary_accuracy": metrics["eval_binary_accuracy"],
            "per_class_accuracy": {key.removeprefix("eval_accuracy_"): value for key, value in metrics.items()
                                   if key.startswith("eval_accuracy_")},
            "parameters": model.num_parameters(),
            "images_per_second": images_per_second(model, scale.image_size, scale.throughput_batch),
        }
    return models


OCCLUSION_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
ANALYZED = {"teacher": "teacher_classifier", "g2sd": "g2sd", "scratch": "scratch"}


def analyze(stages: Path, scale: DemoScale, test_split, output_dir: Path) -> dict:
    """Occlusion curves of the teacher, the G2SD student and the scratch student, and their CKA maps to the teacher."""
    from transformers import AutoImageProcessor

    models = {name: AutoModelForImageClassification.from_pretrained(stages / folder).eval() for name, folder in ANALYZED.items()}
    processors = {name: AutoImageProcessor.from_pretrained(stages / folder) for name, folder in ANALYZED.items()}
    normalizations = {(tuple(processor.image_mean), tuple(processor.image_std)) for processor in processors.values()}
    if len(normalizations) != 1:
        raise ValueError(f"The analyzed models normalize differently ({normalizations}): one loader cannot serve them all.")
    (mean, std), = normalizations
    images = resize_images(test_split, scale.max_image_side) if scale.max_image_side else test_split
    dataset = images.with_transform(ImageTransform(evaluation_transform(scale.image_size, mean, std), with_labels=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate_classification)
    curves = {name: occlusion_curve(model, loader, OCCLUSION_FRACTIONS, scale.patch_size, description=f"occlusion {name}")
              for name, model in models.items()}
    cka = {f"{name} vs teacher": cka_matrix(models[name], models["teacher"], loader, description=f"CKA {name}") for name in ("g2sd", "scratch")}
    plot_occlusion({name.replace("g2sd", "G2SD student").replace("scratch", "scratch student"): curve for name, curve in curves.items()},
                   output_dir / "occlusion.png", title="ELPV: accuracy with patches dropped")
    plot_cka(cka, output_dir / "cka.png")
    (output_dir / "cka.json").write_text(json.dumps({pair: matrix.tolist() for pair, matrix in cka.items()}, indent=2))
    return {"occlusion": {name: {str(fraction): value for fraction, value in curve.items()} for name, curve in curves.items()},
            "cka": {pair: {"last_layer": float(matrix[-1, -1]), "mean_best_match": float(matrix[1:].max(axis=1).mean()),
                           "matrix_file": "cka.json"} for pair, matrix in cka.items()}}


def main(args: list[str] | None = None) -> dict:
    options, output_dir, stages = start_demo(__doc__, "demo_output", SCALES, args)
    scale = SCALES[options.scale]
    start = time.perf_counter()

    records = {
        name: run_stage(name, module, arguments, stages / name)
        for name, (module, arguments) in stage_arguments(scale, stages, options.seed).items()
    }

    splits = load_elpv()
    train_images = scale.max_train_samples or len(splits["train"])
    eval_labels = splits["test"]["label"][: scale.max_eval_samples or len(splits["test"])]
    models = evaluate_models(stages, scale, records)
    results = {
        "scale": options.scale,
        "scale_settings": asdict(scale),
        "device": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "image_size": scale.image_size,
        "train_images": train_images,
        "eval_images": len(eval_labels),
        "majority_class_accuracy": max(eval_labels.count(label) for label in set(eval_labels)) / len(eval_labels),
        "generic_epochs": scale.generic_epochs,
        "specific_epochs": scale.specific_epochs,
        "models": models,
        "speedup": models["g2sd"]["images_per_second"] / models["teacher"]["images_per_second"],
        "stages": {name: {"seconds": record["seconds"], "reused": record["reused"]} for name, record in records.items()},
    }

    # The G2SD student as a pipeline-ready folder: weights, config, processor, model card; checked with a pipeline.
    checkpoint = output_dir / "g2sd-student"
    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    shutil.copytree(stages / "g2sd", checkpoint, ignore=shutil.ignore_patterns("checkpoint-*", "*.bin", "*_results.json",
                                                                                 "trainer_state.json", "g2sd_demo_stage.json", "runs"))
    classifier = pipeline("image-classification", model=str(checkpoint), device=-1)
    example = splits["test"][0]
    results["pipeline_check"] = {
        "image": example["image"]["path"],
        "label": splits["test"].features["label"].names[example["label"]],
        "prediction": classifier(open_rgb_image(example["image"]))[0],
    }

    test_split = splits["test"].select(range(len(eval_labels)))
    results["analysis"] = analyze(stages, scale, test_split, output_dir)

    results["total_seconds"] = time.perf_counter() - start
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, output_dir / "results.md")
    write_figure(results, stages, output_dir / "results.png")
    print(f"\nG2SD demo finished in {results['total_seconds'] / 60:.1f} min. Results: {output_dir / 'results.md'} "
          f"(+ results.json, results.png); pipeline-ready student: {checkpoint}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
