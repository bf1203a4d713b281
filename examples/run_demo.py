#!/usr/bin/env python
"""The whole G2SD method on the embedded ELPV solar-cell images (the `elpv-dataset` package), offline (`make demo`).

The task: ELPV's functional vs defective cells (defect probability >= 0.5), Deitsch et al.'s two-class task.

1. The MAE teacher: pre-trained on the ELPV training cells by `run_mae_pretraining.py`.
2. The teacher fine-tuned as a classifier (`run_finetune_teacher.py`): the specific-distillation teacher.
   At the `cpu` scale both teachers ship with the demo (`examples/assets/`, each with the command that made it and
   its record): in real use the teacher is a given, pre-trained once for long. `--rebuild_teacher` makes them again
   (hours on a CPU); other scales always make them.
3. For each seed, the student stages: generic distillation (`run_generic.py`), then specific distillation
   (`run_specific.py`), and three baselines with the same student and fine-tuning budget: from scratch (supervised
   only), SD only (from scratch with the teacher) and GD only (generic distillation, then plain fine-tuning).
4. Results over the seeds (mean +- std) in `results.md`, `results.json`, `results.png`; occlusion curves (patches
   dropped from the token sequence, the paper's protocol) and CKA maps; a pipeline-ready checkpoint of the G2SD
   student (`g2sd-student/`), and its ONNX export with int8 weights, checked on the held-out cells
   (`g2sd-student-onnx/`).

Every stage runs with `--recipe small-data`. Finished stages are reused on a second run
(`<output_dir>/stages/<stage>`, keyed by the stage's arguments).

    python examples/run_demo.py --output_dir demo_output            # --scale cpu (gpu when CUDA is available)
"""

import json
import logging
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline


sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_finetune_teacher  # noqa: E402
import run_generic  # noqa: E402
import run_mae_pretraining  # noqa: E402
import run_specific  # noqa: E402

import g2sd_hf  # noqa: E402,F401  (registers the G2SD Auto classes)
from g2sd_hf.analysis import cka_matrix, occlusion_curve, plot_cka, plot_occlusion  # noqa: E402
from g2sd_hf.data import (
    ImageTransform,
    collate_classification,
    load_elpv,
    open_rgb_image,
    processor_transform,
    resize_images,
)  # noqa: E402
from g2sd_hf.metrics import load_metric  # noqa: E402
from g2sd_hf.onnx_export import export_onnx  # noqa: E402
from g2sd_hf.output_folders import WRITTEN_FILES, staged_folder  # noqa: E402
from g2sd_hf.scripts.run import logging_to_file  # noqa: E402
from g2sd_hf.scripts.stages import STAGE_LOG, STAGE_MARKER, format_seconds, run_stage, run_stages, start_demo  # noqa: E402


logger = logging.getLogger("g2sd_demo")

ASSETS = Path(__file__).resolve().parent / "assets"
MAE_TEACHER_ASSET = "elpv-mae-teacher"
CLASSIFIER_ASSET = "elpv-teacher-classifier"
ELPV_TASK = "defective"


@dataclass
class DemoScale:
    """Sizes and budgets of one demo run."""

    image_size: int
    patch_size: int
    teacher: str  # ViTMAEConfig overrides of the MAE teacher
    student: str  # G2SDConfig overrides of the student (with its generic-distillation decoder)
    target_layer: int  # the teacher's decoder block distilled
    batch_size: int
    mae_epochs: float
    teacher_epochs: float
    generic_epochs: float
    specific_epochs: float
    seeds: tuple[int, ...] = (0, 1, 2)
    pretraining_batch_size: int = 128
    pretraining_learning_rate: float = 1e-3
    shipped_teachers: bool = False  # the MAE teacher and its fine-tuned classifier ship in examples/assets
    # Fine-tuning crops keep most of the cell: a defect at its edge must stay in the crop (the label depends on it).
    min_crop_scale: float = 0.9
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_image_side: int | None = None
    throughput_batch: int = 64
    analysis_batch: int = 64
    bf16: bool = False  # mixed precision (on a GPU)
    # The few-labels track: this stratified fraction of the training labels (None: no such track).
    low_label_fraction: float | None = 0.1
    # What each kind of stage took in a measured run of this scale (results.json, "stages"), and the evaluation and
    # analysis after them: the progress line's time-left estimate (StageClock) scales them by this machine's speed.
    stage_seconds: dict[str, float] | None = None
    results_seconds: float = 0.0


TEACHER_192x6 = (
    "hidden_size=192,num_hidden_layers=6,num_attention_heads=3,intermediate_size=768,decoder_hidden_size=128,"
    "decoder_num_hidden_layers=4,decoder_num_attention_heads=4,decoder_intermediate_size=512"
)

SCALES = {
    # 2 CPU cores, about 20 minutes: 96x96 cells (a 6x6 grid of 16-pixel patches); the teacher ships pre-trained.
    "cpu": DemoScale(
        image_size=96,
        patch_size=16,
        teacher=TEACHER_192x6,
        student="hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384,"
        "decoder_hidden_size=64,decoder_num_hidden_layers=2,decoder_num_attention_heads=2,decoder_intermediate_size=256",
        target_layer=2,
        batch_size=64,
        mae_epochs=400,
        teacher_epochs=30,
        generic_epochs=10,
        specific_epochs=5,
        shipped_teachers=True,
        max_image_side=128,
        # Measured by `make demo` on 2 cores of an Intel Xeon (results.json of 2026-12-03, 15.4 min in all).
        stage_seconds={
            "low_label_teacher": 25,
            "generic": 52,
            "g2sd": 34,
            "gd_only": 23,
            "sd_only": 34,
            "scratch": 24,
            "low_g2sd_unlabeled": 34,
            "low_g2sd": 26,
            "low_gd_only": 17,
            "low_sd_only": 26,
            "low_scratch": 17,
        },
        results_seconds=40,
    ),
    # One GPU: 224x224 cells, a ViT-S-sized MAE teacher pre-trained for 400 epochs, a ViT-Ti-sized student.
    "gpu": DemoScale(
        image_size=224,
        patch_size=16,
        teacher="hidden_size=384,num_hidden_layers=12,num_attention_heads=6,intermediate_size=1536,decoder_hidden_size=256,"
        "decoder_num_hidden_layers=4,decoder_num_attention_heads=8,decoder_intermediate_size=1024",
        student="hidden_size=192,num_hidden_layers=12,num_attention_heads=3,intermediate_size=768,"
        "decoder_hidden_size=128,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,decoder_intermediate_size=512",
        target_layer=2,
        batch_size=128,
        mae_epochs=400,
        teacher_epochs=50,
        generic_epochs=100,
        specific_epochs=30,
        pretraining_batch_size=256,
        pretraining_learning_rate=1.5e-3,
        max_image_side=300,
        throughput_batch=128,
        analysis_batch=128,
        bf16=True,
    ),
    # Seconds, for the tests: tiny models, a few steps on a few images, the teacher pre-trained on the spot.
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
        seeds=(0, 1),
        pretraining_batch_size=16,
        low_label_fraction=0.25,
        max_train_samples=48,
        max_eval_samples=32,
        throughput_batch=8,
        analysis_batch=16,
    ),
}

STUDENTS = {
    "g2sd": "G2SD (GD + SD)",
    "gd_only": "GD only (GD + fine-tuning)",
    "sd_only": "SD only (scratch + SD)",
    "scratch": "Scratch (supervised only)",
}
# The few-labels track (`low_label_fraction`): the same students on a fraction of the labels, and G2SD whose specific
# distillation also learns from the teacher on the other training images, unlabeled.
LOW_LABEL_STUDENTS = {
    "low_g2sd_unlabeled": "G2SD + unlabeled SD (SD on every image)",
    "low_g2sd": "G2SD (GD + SD on the labeled images)",
    "low_gd_only": "GD only (GD + fine-tuning)",
    "low_sd_only": "SD only (scratch + SD on the labeled images)",
    "low_scratch": "Scratch (supervised only)",
}
DESCRIPTIONS = {
    "teacher": ("MAE pre-training", "-"),
    "g2sd": ("generic distillation", "hard distillation"),
    "gd_only": ("generic distillation", "-"),
    "sd_only": ("random", "hard distillation"),
    "scratch": ("random", "-"),
    "low_g2sd_unlabeled": ("generic distillation", "hard distillation, every image"),
    "low_g2sd": ("generic distillation", "hard distillation, labeled images"),
    "low_gd_only": ("generic distillation", "-"),
    "low_sd_only": ("random", "hard distillation, labeled images"),
    "low_scratch": ("random", "-"),
}
PRIMARY_METRIC = "balanced_accuracy"
PRIMARY_METRIC_REASON = (
    "ELPV's literature reports both the four-class task (defect probability 0, 1/3, 2/3, 1) and the two-class one "
    "(functional vs defective, probability >= 0.5). In earlier runs of this demo on four classes, no model ever "
    "predicted the two middle classes (1/3 and 2/3: 15% of the cells, the ones the experts were unsure of), so the "
    "four-class accuracy measured little beyond the two extremes. The two-class task is the practical question (is "
    "this cell defective?) and every model predicts both classes. The models are compared on the balanced accuracy "
    "(the mean of the two classes' recalls): 69% of the cells are functional, so plain accuracy rewards a model for "
    "calling cells functional (always answering 'functional' scores 0.69 accuracy but 0.50 balanced accuracy), "
    "while a missed defective cell is the costly error. Plain accuracy, the figure Deitsch et al. report, is shown "
    "beside it."
)
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}


def default_scale() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------------
def common_arguments(
    scale: DemoScale, output_dir: Path, epochs: float, seed: int, batch_size: int | None = None
) -> list[str]:
    arguments = [
        "--output_dir",
        str(output_dir),
        "--dataset_name",
        "elpv",
        "--dataset_config_name",
        ELPV_TASK,
        "--recipe",
        "small-data",
        "--num_train_epochs",
        str(epochs),
        "--per_device_train_batch_size",
        str(batch_size or scale.batch_size),
        "--per_device_eval_batch_size",
        str(2 * scale.batch_size),
        "--logging_steps",
        "10",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        str(seed),
        "--disable_tqdm",
        "true",
        "--eval_crop_ratio",
        "1.0",  # the whole cell: a defect near the border counts
        "--do_train",
    ]
    for flag, value in (
        ("--max_train_samples", scale.max_train_samples),
        ("--max_eval_samples", scale.max_eval_samples),
        ("--max_image_side", scale.max_image_side),
    ):
        if value is not None:
            arguments += [flag, str(value)]
    return arguments + (["--bf16"] if scale.bf16 else [])


def mae_teacher_arguments(scale: DemoScale, output_dir: Path) -> list[str]:
    """The command line of `run_mae_pretraining.py` that pre-trains the demo's MAE teacher; at the `cpu` scale, the
    one that made the shipped teacher (its `provenance.json` records it, and a test keeps the two equal)."""
    arguments = [
        "--output_dir",
        str(output_dir),
        "--dataset_name",
        "elpv",
        "--config_overrides",
        f"image_size={scale.image_size},patch_size={scale.patch_size},{scale.teacher}",
        "--num_train_epochs",
        str(scale.mae_epochs),
        "--per_device_train_batch_size",
        str(scale.pretraining_batch_size),
        "--learning_rate",
        str(scale.pretraining_learning_rate),
        "--scale_lr_with_batch_size",
        "false",
        "--warmup_steps",
        "0.05",
        "--dataloader_num_workers",
        "2",
        "--dataloader_persistent_workers",
        "true",
        "--seed",
        "0",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1500",
        "--logging_steps",
        "50",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--do_train",
    ]
    for flag, value in (("--max_train_samples", scale.max_train_samples), ("--max_image_side", scale.max_image_side)):
        if value is not None:
            arguments += [flag, str(value)]
    return arguments + (["--bf16"] if scale.bf16 else [])


def teacher_classifier_arguments(scale: DemoScale, output_dir: Path, mae_teacher: Path) -> list[str]:
    """The command line of `run_finetune_teacher.py` that fine-tunes the MAE teacher into the classification teacher
    (at the `cpu` scale, the one that made the shipped classifier)."""
    return common_arguments(scale, output_dir, scale.teacher_epochs, 0) + [
        "--do_eval",
        "--mae_name_or_path",
        str(mae_teacher),
        "--layer_decay",
        "0.75",
        "--min_crop_scale",
        str(scale.min_crop_scale),
    ]


def low_label_teacher_arguments(scale: DemoScale, output_dir: Path, mae_teacher: Path) -> list[str]:
    """The classification teacher of the few-labels track: the MAE teacher fine-tuned like the full-label one, on the
    labeled fraction alone."""
    return teacher_classifier_arguments(scale, output_dir, mae_teacher) + [
        "--label_fraction",
        str(scale.low_label_fraction),
    ]


def low_label_steps(scale: DemoScale, train_images: int) -> int:
    """The optimizer steps of every student of the few-labels track: those of a full-label student
    (`specific_epochs` over every training image), whichever images it learns from."""
    return math.ceil(train_images / scale.batch_size) * math.ceil(scale.specific_epochs)


def stage_arguments(
    scale: DemoScale,
    stages: Path,
    mae_teacher: Path,
    teacher_classifier: Path,
    low_label_teacher: Path | None = None,
    train_images: int = 0,
) -> dict[str, tuple]:
    """The student stages of every seed: (script module, arguments), in the order they run; with
    `low_label_teacher`, the few-labels track's students too (`train_images`: the size of the full training set)."""
    student_shape = f"image_size={scale.image_size},patch_size={scale.patch_size},{scale.student}"
    teacher = str(teacher_classifier)
    stages_to_run = {}
    for seed in scale.seeds:
        generic = stages / f"generic_seed{seed}"

        def specific(name, seed=seed):
            # The demo trains the scratch student as a stage of its own, for every seed: no scratch baseline inside.
            return common_arguments(scale, stages / f"{name}_seed{seed}", scale.specific_epochs, seed) + [
                "--do_eval",
                "--min_crop_scale",
                str(scale.min_crop_scale),
                "--scratch_baseline",
                "false",
            ]

        stages_to_run.update(
            {
                f"generic_seed{seed}": (
                    run_generic,
                    common_arguments(scale, generic, scale.generic_epochs, seed)
                    + [
                        "--teacher_name_or_path",
                        str(mae_teacher),
                        "--target_layer",
                        str(scale.target_layer),
                        "--config_overrides",
                        scale.student,
                        "--do_eval",
                    ],
                ),
                # Initialized from generic distillation: layer-wise lr decay as in the release; from scratch: none.
                f"g2sd_seed{seed}": (
                    run_specific,
                    specific("g2sd")
                    + [
                        "--student_name_or_path",
                        str(generic),
                        "--teacher_name_or_path",
                        teacher,
                        "--distillation_type",
                        "hard",
                        "--layer_decay",
                        "0.75",
                    ],
                ),
                f"gd_only_seed{seed}": (
                    run_specific,
                    specific("gd_only")
                    + ["--student_name_or_path", str(generic), "--distillation_type", "none", "--layer_decay", "0.75"],
                ),
                f"sd_only_seed{seed}": (
                    run_specific,
                    specific("sd_only")
                    + [
                        "--config_overrides",
                        student_shape,
                        "--teacher_name_or_path",
                        teacher,
                        "--distillation_type",
                        "hard",
                        "--layer_decay",
                        "1.0",
                    ],
                ),
                f"scratch_seed{seed}": (
                    run_specific,
                    specific("scratch")
                    + ["--config_overrides", student_shape, "--distillation_type", "none", "--layer_decay", "1.0"],
                ),
            }
        )
        if low_label_teacher is None:
            continue

        def few_labels(name, unlabeled_rest=False):
            # Every student of the track takes the same optimizer steps, whether it sees 10% of the images or all.
            return specific(name) + [
                "--label_fraction",
                str(scale.low_label_fraction),
                "--unlabeled_rest",
                str(unlabeled_rest).lower(),
                "--max_steps",
                str(low_label_steps(scale, train_images)),
            ]

        from_generic = ["--student_name_or_path", str(generic), "--layer_decay", "0.75"]
        from_scratch = ["--config_overrides", student_shape, "--layer_decay", "1.0"]
        distilled = ["--teacher_name_or_path", str(low_label_teacher), "--distillation_type", "hard"]
        stages_to_run.update(
            {
                f"low_g2sd_unlabeled_seed{seed}": (
                    run_specific,
                    few_labels("low_g2sd_unlabeled", unlabeled_rest=True) + from_generic + distilled,
                ),
                f"low_g2sd_seed{seed}": (
                    run_specific,
                    few_labels("low_g2sd") + from_generic + distilled,
                ),
                f"low_gd_only_seed{seed}": (
                    run_specific,
                    few_labels("low_gd_only") + from_generic + ["--distillation_type", "none"],
                ),
                f"low_sd_only_seed{seed}": (
                    run_specific,
                    few_labels("low_sd_only") + from_scratch + distilled,
                ),
                f"low_scratch_seed{seed}": (
                    run_specific,
                    few_labels("low_scratch") + from_scratch + ["--distillation_type", "none"],
                ),
            }
        )
    return stages_to_run


def stage_descriptions(scale: DemoScale) -> dict[str, str]:
    """What each kind of stage trains, for its line in the terminal."""
    few = f"{scale.low_label_fraction:.0%} of the labels" if scale.low_label_fraction is not None else ""
    full = {
        "mae_teacher": "MAE pre-training of the teacher",
        "teacher_classifier": "fine-tuning the teacher into a classifier",
        "low_label_teacher": f"fine-tuning the teacher on {few}",
        "generic": "generic distillation: the student learns the MAE teacher's decoder features",
        "g2sd": "G2SD: specific distillation of the generic-distilled student",
        "gd_only": "fine-tuning the generic-distilled student, no teacher",
        "sd_only": "specific distillation of a student from scratch",
        "scratch": "supervised training of a student from scratch",
    }
    low = {f"low_{kind}": f"{full[kind]}, {few}" for kind in ("g2sd", "gd_only", "sd_only", "scratch")}
    low["low_g2sd_unlabeled"] = f"G2SD on {few}, distilled on the other training images too"
    return {**full, **low}


def prepare_teachers(scale: DemoScale, stages: Path, rebuild: bool) -> tuple[Path, Path, dict]:
    """The MAE teacher and the classification teacher: the shipped ones, or made now (`stages/mae_teacher`,
    `stages/teacher_classifier`). Returns their folders and their stage records."""
    if scale.shipped_teachers and not rebuild:
        records = {}
        for name, folder in (
            ("mae_teacher", ASSETS / MAE_TEACHER_ASSET),
            ("teacher_classifier", ASSETS / CLASSIFIER_ASSET),
        ):
            provenance = json.loads((folder / "provenance.json").read_text())
            print(f"{name}: the shipped teacher {folder.relative_to(ASSETS.parents[1])} ({provenance['summary']})")
            records[name] = {"seconds": 0.0, "reused": True, "shipped": True, "metrics": provenance.get("metrics", {})}
        return ASSETS / MAE_TEACHER_ASSET, ASSETS / CLASSIFIER_ASSET, records
    mae, classifier = stages / "mae_teacher", stages / "teacher_classifier"
    about = stage_descriptions(scale)
    records = {
        "mae_teacher": run_stage(
            "mae_teacher", run_mae_pretraining, mae_teacher_arguments(scale, mae), mae, about=about["mae_teacher"]
        ),
        "teacher_classifier": run_stage(
            "teacher_classifier",
            run_finetune_teacher,
            teacher_classifier_arguments(scale, classifier, mae),
            classifier,
            about=about["teacher_classifier"],
        ),
    }
    return mae, classifier, {name: {**record, "shipped": False} for name, record in records.items()}


def write_teacher_assets(scale: DemoScale, mae: Path, classifier: Path, records: dict) -> None:
    """Write the two teachers into `examples/assets` as the demo ships them (`write_teacher_asset`). Run by
    `--rebuild_teacher --write_assets` at the `cpu` scale."""
    from transformers import ViTMAEForPreTraining

    write_teacher_asset(
        "mae_teacher",
        mae,
        MAE_TEACHER_ASSET,
        ViTMAEForPreTraining,
        "examples/run_mae_pretraining.py",
        mae_teacher_arguments(scale, Path(f"examples/assets/{MAE_TEACHER_ASSET}")),
        records["mae_teacher"],
    )
    write_teacher_asset(
        "teacher_classifier",
        classifier,
        CLASSIFIER_ASSET,
        AutoModelForImageClassification,
        "examples/run_finetune_teacher.py",
        teacher_classifier_arguments(
            scale, Path(f"examples/assets/{CLASSIFIER_ASSET}"), Path(f"examples/assets/{MAE_TEACHER_ASSET}")
        ),
        records["teacher_classifier"],
    )


def write_teacher_asset(
    name: str, source: Path, asset: str, model_class, script: str, arguments: list[str], record: dict
) -> None:
    """Write one teacher into `examples/assets/<asset>`: weights, config and image processor, `provenance.json` (the
    script, its arguments with the assets' own paths, the stage's time and metrics) and a README with the command."""
    target = ASSETS / asset
    metrics = {key: value for key, value in record.get("metrics", {}).items() if isinstance(value, (int, float))}
    summary = f"{name.replace('_', ' ')}: {script.split('/')[-1]}, {record['seconds'] / 60:.0f} min on {torch.get_num_threads()} CPU threads"
    summary += f" ({record['note']})" if record.get("note") else ""
    provenance = {
        "script": script,
        "arguments": arguments,
        "summary": summary,
        "seconds": record["seconds"],
        "metrics": metrics,
        "torch": torch.__version__,
    }
    with staged_folder(target) as staging:  # replaces an asset written before, refuses a folder of someone else's
        model_class.from_pretrained(source).save_pretrained(staging)
        AutoImageProcessor.from_pretrained(source).save_pretrained(staging)
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2))
        (staging / "README.md").write_text(
            f"# ELPV demo teacher: {name.replace('_', ' ')}\n\nMade by the project's own script, from the repository "
            f"root:\n\n```bash\npython {script} {' '.join(arguments)}\n```\n\n{summary}. `python examples/run_demo.py "
            "--rebuild_teacher` makes both teachers again (and `--write_assets` writes them here).\n"
        )
    logger.warning(f"[{name}] wrote {target}")


def evaluate_classifier(folder: Path, split, scale: DemoScale) -> dict:
    """The `eval_*` metrics of a saved classifier on `split`, preprocessed by its own image processor."""
    model = AutoModelForImageClassification.from_pretrained(folder).eval().to(device())
    processor = AutoImageProcessor.from_pretrained(folder)
    images = resize_images(split, scale.max_image_side) if scale.max_image_side else split
    dataset = images.with_transform(ImageTransform(processor_transform(processor), with_labels=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2 * scale.batch_size, collate_fn=collate_classification)
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            logits.append(model(pixel_values=batch["pixel_values"].to(device())).logits.float().cpu())
            labels.append(batch["labels"])
    names = [model.config.id2label[index] for index in range(model.config.num_labels)]
    metrics = load_metric("classification").compute(
        predictions=torch.cat(logits).argmax(-1).numpy(), references=torch.cat(labels).numpy(), class_names=names
    )
    return {f"eval_{key}": value for key, value in metrics.items()}


def export_for_onnx_runtime(checkpoint: Path, folder: Path, split, scale: DemoScale) -> dict:
    """The saved student exported to ONNX with int8 (`python -m g2sd_hf.export --format onnx --quantize int8`),
    checked on the held-out cells: fp32 against PyTorch, int8's balanced accuracy against fp32's."""
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    images = resize_images(split, scale.max_image_side) if scale.max_image_side else split
    dataset = images.with_transform(ImageTransform(processor_transform(processor), with_labels=True))
    batch = collate_classification([dataset[index] for index in range(len(dataset))])
    checks = export_onnx(
        str(checkpoint), str(folder), quantize="int8", check_images=(batch["pixel_values"], batch["labels"])
    )
    return {**checks, "folder": str(folder)}


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def images_per_second(model, image_size: int, batch_size: int, repeats: int = 5) -> float:
    """Median inference throughput of `model` on random `batch_size` batches (after one warm-up batch)."""
    model.eval().to(device())
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device())
    model(pixel_values=pixel_values)
    times = []
    for _ in range(repeats):
        if device().type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(pixel_values=pixel_values)
        if device().type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def summarize(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def compare(results: dict) -> dict:
    """G2SD against each baseline and its teacher, on the primary metric over the seeds."""
    models = results["models"]
    g2sd = models["g2sd"][PRIMARY_METRIC]
    comparisons = {}
    for name in ("gd_only", "sd_only", "scratch"):
        baseline = models[name][PRIMARY_METRIC]
        spread = max(g2sd["std"], baseline["std"])
        comparisons[name] = {
            "difference": g2sd["mean"] - baseline["mean"],
            "spread": spread,
            "beats_by_more_than_spread": g2sd["mean"] - baseline["mean"] > spread,
            "every_seed_above": g2sd["min"] > baseline["max"],
        }
    teacher = models["teacher"][PRIMARY_METRIC]["mean"]
    scratch = models["scratch"][PRIMARY_METRIC]["mean"]
    return {
        "baselines": comparisons,
        "teacher_over_scratch": teacher - scratch,
        "g2sd_fraction_of_teacher": g2sd["mean"] / teacher,
    }


TABLE_METRICS = ("accuracy", "balanced_accuracy", "accuracy_functional", "accuracy_defective")


def summarize_runs(metrics: list[dict]) -> dict:
    """Mean +- std of each table metric over runs (`eval_*` metrics), for the metrics every run has (a class absent
    from a tiny split has no recall)."""
    return {
        metric: summarize([values[f"eval_{metric}"] for values in metrics])
        for metric in TABLE_METRICS
        if all(f"eval_{metric}" in values for values in metrics)
    }


def evaluate_models(stages: Path, scale: DemoScale, records: dict, teacher_classifier: Path, test_split) -> dict:
    models = {}
    for name in ("teacher", *STUDENTS):
        if name == "teacher":
            metrics = [evaluate_classifier(teacher_classifier, test_split, scale)]
            folder = teacher_classifier
        else:
            metrics = [records[f"{name}_seed{seed}"]["metrics"] for seed in scale.seeds]
            folder = stages / f"{name}_seed{scale.seeds[0]}"
        model = AutoModelForImageClassification.from_pretrained(folder)
        row = summarize_runs(metrics)
        row["parameters"] = model.num_parameters()
        row["images_per_second"] = images_per_second(model, scale.image_size, scale.throughput_batch)
        models[name] = row
    return models


def evaluate_low_label_track(
    stages: Path, scale: DemoScale, records: dict, low_label_teacher: Path, test_split, full_label_models: dict
) -> dict:
    """The few-labels track: its teacher and students on the held-out cells (mean +- std over the seeds), how many
    images were labeled, and G2SD + unlabeled SD against each baseline of the track and its teacher."""
    models = {"teacher": summarize_runs([evaluate_classifier(low_label_teacher, test_split, scale)])}
    for name in LOW_LABEL_STUDENTS:
        models[name] = summarize_runs([records[f"{name}_seed{seed}"]["metrics"] for seed in scale.seeds])
    first = records[f"low_g2sd_unlabeled_seed{scale.seeds[0]}"]["metrics"]
    unlabeled = first.get("train_unlabeled_images", 0)
    best = models["low_g2sd_unlabeled"][PRIMARY_METRIC]
    baselines = {}
    for name in ("low_scratch", "low_sd_only", "low_gd_only", "low_g2sd"):
        baseline = models[name][PRIMARY_METRIC]
        spread = max(best["std"], baseline["std"])
        baselines[name] = {
            "difference": best["mean"] - baseline["mean"],
            "spread": spread,
            "beats_by_more_than_twice_the_spread": best["mean"] - baseline["mean"] > 2 * spread,
            "every_seed_above": best["min"] > baseline["max"],
        }
    teacher = models["teacher"][PRIMARY_METRIC]["mean"]
    return {
        "label_fraction": scale.low_label_fraction,
        "labeled_images": first["train_samples"] - unlabeled,
        "unlabeled_images": unlabeled,
        "steps": low_label_steps(scale, first["train_samples"]),
        "models": models,
        "comparison": {
            "baselines": baselines,
            "fraction_of_teacher": best["mean"] / teacher,
            "teacher_over_scratch": teacher - models["low_scratch"][PRIMARY_METRIC]["mean"],
            "full_label_g2sd": full_label_models["g2sd"][PRIMARY_METRIC]["mean"],
        },
    }


OCCLUSION_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
OCCLUSION_LABELS = {
    "teacher": "Teacher",
    **STUDENTS,
    "g2sd_cls_logits": "G2SD, classification head alone",
    "g2sd_distillation_logits": "G2SD, distillation head alone",
}


def analyze(stages: Path, scale: DemoScale, test_split, output_dir: Path, teacher_classifier: Path) -> dict:
    """Occlusion curves (patches dropped from the token sequence, the paper's protocol; and their pixels filled with
    the mean, for comparison) of the teacher and the four students of the first seed, and the CKA maps of the G2SD
    and scratch students to the teacher."""
    folders = {"teacher": teacher_classifier, **{name: stages / f"{name}_seed{scale.seeds[0]}" for name in STUDENTS}}
    models = {
        name: AutoModelForImageClassification.from_pretrained(folder).eval().to(device())
        for name, folder in folders.items()
    }
    transforms = {repr(processor_transform(AutoImageProcessor.from_pretrained(folder))) for folder in folders.values()}
    if len(transforms) != 1:
        raise ValueError(
            f"The analyzed models preprocess differently ({transforms}): one loader cannot serve them all."
        )
    processor = AutoImageProcessor.from_pretrained(teacher_classifier)
    images = resize_images(test_split, scale.max_image_side) if scale.max_image_side else test_split
    dataset = images.with_transform(ImageTransform(processor_transform(processor), with_labels=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=scale.analysis_batch, collate_fn=collate_classification)
    curves = {}
    for protocol in ("drop", "fill"):
        curves[protocol] = {
            name: occlusion_curve(
                model,
                loader,
                OCCLUSION_FRACTIONS,
                scale.patch_size,
                protocol=protocol,
                description=f"occlusion ({protocol}) {name}",
            )
            for name, model in models.items()
        }
        # The G2SD student's prediction averages two heads: each alone, to see which one occlusion moves.
        for head in ("cls_logits", "distillation_logits"):
            curves[protocol][f"g2sd_{head}"] = occlusion_curve(
                models["g2sd"],
                loader,
                OCCLUSION_FRACTIONS,
                scale.patch_size,
                protocol=protocol,
                output=head,
                description=f"occlusion ({protocol}) g2sd {head}",
            )
    plot_occlusion(
        {OCCLUSION_LABELS[name]: curve for name, curve in curves["drop"].items() if not name.startswith("g2sd_")},
        output_dir / "occlusion.png",
        title="ELPV: accuracy with patches dropped from the token sequence",
    )
    cka = {
        f"{name} vs teacher": cka_matrix(models[name], models["teacher"], loader, description=f"CKA {name}")
        for name in ("g2sd", "scratch")
    }
    plot_cka(cka, output_dir / "cka.png")
    (output_dir / "cka.json").write_text(json.dumps({pair: matrix.tolist() for pair, matrix in cka.items()}, indent=2))
    return {
        "occlusion": {
            protocol: {
                name: {str(fraction): value for fraction, value in curve.items()} for name, curve in by_model.items()
            }
            for protocol, by_model in curves.items()
        },
        "cka": {
            pair: {
                "last_layer": float(matrix[-1, -1]),
                "mean_best_match": float(matrix[1:].max(axis=1).mean()),
                "matrix_file": "cka.json",
            }
            for pair, matrix in cka.items()
        },
    }


def loss_curve(folder: Path) -> list[tuple[float, float]]:
    state_file = folder / "trainer_state.json"
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    return [(entry["epoch"], entry["loss"]) for entry in state["log_history"] if "loss" in entry and "epoch" in entry]


def write_figure(results: dict, stages: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = results["seeds"][0]
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for stage, label in [
        (f"generic_seed{seed}", "generic distillation (L_GD)"),
        *[(f"{key}_seed{seed}", value) for key, value in STUDENTS.items()],
    ]:
        points = loss_curve(stages / stage)
        if points:
            curves.plot(*zip(*points), label=label)
    curves.set_xlabel("epoch")
    curves.set_ylabel("training loss")
    curves.set_yscale("log")
    curves.set_title(f"Training losses (seed {seed})")
    curves.legend(fontsize=7)

    names = ["teacher", *STUDENTS]
    labels = ["Teacher (MAE + FT)", *STUDENTS.values()]
    width = 0.38
    for offset, metric, title in (
        (-width / 2, "accuracy", "accuracy"),
        (width / 2, "balanced_accuracy", "balanced accuracy"),
    ):
        means = [results["models"][name][metric]["mean"] for name in names]
        errors = [results["models"][name][metric]["std"] for name in names]
        positions = [index + offset for index in range(len(names))]
        drawn = bars.bar(positions, means, width, yerr=errors, capsize=3, label=title)
        bars.bar_label(drawn, fmt="%.3f", fontsize=7, padding=6)
    bars.axhline(results["majority_class_accuracy"], color="gray", linestyle="--", linewidth=1, label="majority class")
    bars.set_xticks(range(len(names)), [label.replace(" (", "\n(") for label in labels], fontsize=7)
    bars.set_ylim(0, 1)
    bars.set_title(
        f"ELPV functional vs defective, held-out 25% (students: mean +- std of {len(results['seeds'])} seeds)"
    )
    bars.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cell(summary: dict) -> str:
    return f"{summary['mean']:.3f} +- {summary['std']:.3f}" if len(summary["values"]) > 1 else f"{summary['mean']:.3f}"


def write_markdown(results: dict, path: Path) -> None:
    models, comparison, seeds = results["models"], results["comparison"], results["seeds"]
    teacher_note = (
        "shipped with the demo (examples/assets: pre-trained and fine-tuned once, with the commands in their "
        "provenance.json)"
        if results["teachers_shipped"]
        else "pre-trained and fine-tuned in this run"
    )
    lines = [
        "# G2SD on ELPV: results of `make demo`",
        "",
        f"Task: functional vs defective solar cells (defect probability >= 0.5). Held-out split: {results['eval_images']} "
        f"of 2,624 ELPV cells (stratified 25%, seed 42); trained on {results['train_images']}. Majority class "
        f"(functional): {results['majority_class_accuracy']:.3f}. Scale `{results['scale']}`: {results['image_size']}x"
        f"{results['image_size']} images; {results['device']}. Teachers {teacher_note}. Stage time "
        f"{sum(stage['seconds'] for stage in results['stages'].values()) / 60:.1f} min; this run's wall time "
        f"{results['total_seconds'] / 60:.1f} min.",
        "",
        f"**Primary metric: {METRIC_NAMES[PRIMARY_METRIC]} on the two-class task.** {PRIMARY_METRIC_REASON}",
        "",
        f"Students: mean +- standard deviation over seeds {', '.join(map(str, seeds))} (each seed reruns generic "
        "distillation and every fine-tuning); the teacher is one model.",
        "",
        "| Model | Initialization | Teacher signal | Params | Accuracy | Balanced acc. | Recall functional | Recall defective | Images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in [("teacher", "Teacher (MAE ViT, fine-tuned)"), *STUDENTS.items()]:
        row = models[name]
        init, signal = DESCRIPTIONS[name]
        lines.append(
            f"| {label} | {init} | {signal} | {row['parameters'] / 1e6:.2f}M | {_cell(row['accuracy'])} | "
            f"{_cell(row['balanced_accuracy'])} | {_cell(row['accuracy_functional']) if 'accuracy_functional' in row else '-'} | "
            f"{_cell(row['accuracy_defective']) if 'accuracy_defective' in row else '-'} | {row['images_per_second']:.0f} |"
        )
    lines += [
        "",
        f"Per seed ({METRIC_NAMES[PRIMARY_METRIC]}):",
        "",
        "| Model | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name, label in STUDENTS.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{value:.3f}" for value in models[name][PRIMARY_METRIC]["values"]) + " |"
        )
    lines += ["", "## What it shows", ""]
    lines.append(
        f"- The teacher is {comparison['teacher_over_scratch'] * 100:+.1f} {METRIC_NAMES[PRIMARY_METRIC]} points from the scratch student "
        f"(goal: at least +5)."
    )
    for name, row in comparison["baselines"].items():
        verdict = "beats" if row["beats_by_more_than_spread"] else "does **not** beat"
        lines.append(
            f"- G2SD {verdict} {STUDENTS[name]} by more than the seed-to-seed spread: {row['difference'] * 100:+.1f} points "
            f"against a spread (the larger standard deviation) of {row['spread'] * 100:.1f}; every G2SD seed above every "
            f"baseline seed: {'yes' if row['every_seed_above'] else 'no'}."
        )
    lines.append(
        f"- The G2SD student reaches {comparison['g2sd_fraction_of_teacher'] * 100:.1f}% of its teacher's {METRIC_NAMES[PRIMARY_METRIC]} (goal: "
        f"at least 95%) at {results['speedup']:.2f}x its images/s ({models['g2sd']['parameters'] / 1e6:.2f}M vs "
        f"{models['teacher']['parameters'] / 1e6:.2f}M parameters)."
    )
    lines += [
        "",
        "Every student has the same architecture and the same fine-tuning budget "
        f"({results['specific_epochs']} epochs); the G2SD and GD-only students also had {results['generic_epochs']} "
        "epochs of generic distillation. The split is random per cell, so cells of one module can be on both sides.",
    ]
    if "low_labels" in results:
        lines += low_label_lines(results)
    if results["warnings"]:
        lines += ["", "## Learning warnings", ""]
        lines += [f"- `{stage}`: {warning}" for stage, warnings in results["warnings"].items() for warning in warnings]
    occlusion = results["analysis"]["occlusion"]
    fractions = list(next(iter(occlusion["drop"].values())))
    for protocol, title in (
        ("drop", "patches dropped from the token sequence (the paper's protocol)"),
        ("fill", "patch pixels set to the image mean (for comparison)"),
    ):
        lines += [
            "",
            f"## Occlusion: {title}",
            "",
            f"Accuracy with a random fraction of the {results['scale_settings']['patch_size']}-pixel patches removed, "
            f"seed {seeds[0]}" + (" ([occlusion.png](occlusion.png))" if protocol == "drop" else "") + ":",
            "",
            "| Model | " + " | ".join(f"{float(fraction) * 100:.0f}%" for fraction in fractions) + " |",
            "|---|" + "---|" * len(fractions),
            *[
                f"| {OCCLUSION_LABELS[name]} | " + " | ".join(f"{value:.3f}" for value in curve.values()) + " |"
                for name, curve in occlusion[protocol].items()
            ],
        ]
    lines += [
        "",
        "## Representation similarity",
        "",
        "Linear CKA (minibatch estimator, mean-pooled tokens) between each student layer and each teacher layer on the "
        "held-out cells ([cka.png](cka.png), matrices in cka.json): the last layers', and the mean over student "
        "blocks of their best match among the teacher's layers.",
        "",
        "| Pair | Last layers | Mean best match |",
        "|---|---|---|",
        *[
            f"| {pair} | {row['last_layer']:.3f} | {row['mean_best_match']:.3f} |"
            for pair, row in results["analysis"]["cka"].items()
        ],
        "",
        "## Stages",
        "",
        "| Stage | Seconds | Reused |",
        "|---|---|---|",
    ]
    for stage, record in results["stages"].items():
        lines.append(f"| {stage} | {record['seconds']:.0f} | {'yes' if record['reused'] else 'no'} |")
    estimates = results.get("time_left_estimates", [])
    if len(estimates) > 1 and estimates[1]["estimated_seconds_left"] is not None:
        second = estimates[1]
        lines += [
            "",
            f"The progress line's time-left estimate at stage 2 ({second['stage']}): "
            f"{second['estimated_seconds_left'] / 60:.1f} min announced, {second['real_seconds_left'] / 60:.1f} min "
            f"real ({100 * (second['estimated_seconds_left'] / second['real_seconds_left'] - 1):+.0f}%).",
        ]
    lines += onnx_lines(results)
    lines += ["", "![results](results.png)", "", "![occlusion](occlusion.png)", "", "![cka](cka.png)", ""]
    path.write_text("\n".join(lines))


def onnx_lines(results: dict) -> list[str]:
    """The deployment section of results.md: the student in ONNX Runtime, fp32 and int8."""
    onnx = results.get("onnx")
    if not onnx:
        return []
    return [
        "",
        "## Deployment: the student in ONNX Runtime",
        "",
        f"`python -m g2sd_hf.export --format onnx --quantize int8` of the seed-{results['seeds'][0]} G2SD student "
        f"(`{Path(onnx['folder']).name}`), checked on the {onnx['checked_images']} held-out cells:",
        "",
        "| Model | Balanced acc. | Largest logit difference from PyTorch |",
        "|---|---|---|",
        f"| PyTorch (the saved student) | {onnx['pytorch_balanced_accuracy']:.3f} | - |",
        f"| ONNX Runtime, fp32 | {onnx['fp32_balanced_accuracy']:.3f} | {onnx['fp32_max_abs_difference_on_images']:.1e} |",
        f"| ONNX Runtime, int8 (dynamic quantization) | {onnx['int8_balanced_accuracy']:.3f} | "
        f"{onnx['int8_max_abs_difference_on_images']:.1e} |",
        "",
        f"int8 - fp32 balanced accuracy: {onnx['int8_minus_fp32_balanced_accuracy']:+.3f}.",
    ]


def low_label_lines(results: dict) -> list[str]:
    """The few-labels track's section of results.md."""
    track, seeds = results["low_labels"], results["seeds"]
    models, comparison = track["models"], track["comparison"]
    lines = [
        "",
        f"## Few labels: {track['label_fraction']:.0%} of the training labels",
        "",
        f"The teacher fine-tuned on {track['labeled_images']} labeled cells (stratified, `--label_fraction "
        f"{track['label_fraction']}`, the same cells for every model); every student takes {track['steps']} optimizer "
        f"steps (a full-label student's budget). G2SD + unlabeled SD also learns from the teacher on the other "
        f"{track['unlabeled_images']} training cells, unlabeled. Generic distillation (no labels) is the full-label "
        "track's.",
        "",
        "| Model | Initialization | Teacher signal | Accuracy | Balanced acc. | Recall functional | Recall defective |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("teacher", f"Teacher (MAE ViT, fine-tuned on {track['labeled_images']} labels)"),
        *LOW_LABEL_STUDENTS.items(),
    ]
    for name, label in rows:
        row = models[name]
        init, signal = ("MAE pre-training", "-") if name == "teacher" else DESCRIPTIONS[name]
        cells = [_cell(row[metric]) if metric in row else "-" for metric in TABLE_METRICS]
        lines.append(f"| {label} | {init} | {signal} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Per seed ({METRIC_NAMES[PRIMARY_METRIC]}): "
        + "; ".join(
            f"{LOW_LABEL_STUDENTS[name].split(' (')[0]} "
            + ", ".join(f"{value:.3f}" for value in models[name][PRIMARY_METRIC]["values"])
            for name in LOW_LABEL_STUDENTS
        )
        + f" (seeds {', '.join(map(str, seeds))}).",
        "",
    ]
    for name, row in comparison["baselines"].items():
        verdict = "beats" if row["beats_by_more_than_twice_the_spread"] else "does **not** beat"
        lines.append(
            f"- G2SD + unlabeled SD {verdict} {LOW_LABEL_STUDENTS[name]} by more than twice the seed-to-seed spread: "
            f"{row['difference'] * 100:+.1f} points against 2 x {row['spread'] * 100:.1f}; every seed above every "
            f"baseline seed: {'yes' if row['every_seed_above'] else 'no'}."
        )
    lines.append(
        f"- It reaches {comparison['fraction_of_teacher'] * 100:.1f}% of its teacher's {METRIC_NAMES[PRIMARY_METRIC]} "
        f"(goal: at least 95%); the teacher is {comparison['teacher_over_scratch'] * 100:+.1f} points from the "
        f"scratch student of this track; the full-label G2SD student scored {comparison['full_label_g2sd']:.3f}."
    )
    return lines


def time_left_estimates(records: dict, seconds_from_first_stage: float) -> list[dict]:
    """For each stage: the time left the progress line announced when it started, and the real time left then
    (until the demo ended)."""
    return [
        {
            "stage": name,
            "estimated_seconds_left": record["estimated_seconds_left"],
            "real_seconds_left": seconds_from_first_stage - record["started_after_seconds"],
        }
        for name, record in records.items()
    ]


def save_student(stages: Path, folder: str, checkpoint: Path) -> None:
    """Copy a student stage into a pipeline-ready folder (weights, config, processor, model card) through
    `staged_folder`: a folder the demo wrote before is replaced, a folder holding anything else is refused."""
    with staged_folder(checkpoint) as staging:
        shutil.copytree(
            stages / folder,
            staging,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(
                "checkpoint-*",
                "*.bin",
                "*_results.json",
                "trainer_state.json",
                STAGE_MARKER,
                STAGE_LOG,
                WRITTEN_FILES,
                "runs",
            ),
        )


def main(args: list[str] | None = None) -> dict:
    options, output_dir, stages = start_demo(__doc__, "demo_output", SCALES, args, default=default_scale())
    scale = SCALES[options.scale]
    start = time.perf_counter()

    mae_teacher, teacher_classifier, teacher_records = prepare_teachers(scale, stages, options.rebuild_teacher)
    if options.write_assets:
        if options.scale != "cpu" or not options.rebuild_teacher:
            raise ValueError(
                "--write_assets writes the cpu scale's teachers after --rebuild_teacher: pass both, with --scale cpu."
            )
        write_teacher_assets(scale, mae_teacher, teacher_classifier, teacher_records)
    splits = load_elpv(task=ELPV_TASK)
    train_images = min(scale.max_train_samples or len(splits["train"]), len(splits["train"]))
    planned = {}
    low_label_teacher = None
    if scale.low_label_fraction is not None:
        low_label_teacher = stages / "low_label_teacher"
        planned["low_label_teacher"] = (
            run_finetune_teacher,
            low_label_teacher_arguments(scale, low_label_teacher, mae_teacher),
        )
    planned.update(stage_arguments(scale, stages, mae_teacher, teacher_classifier, low_label_teacher, train_images))
    stages_started = time.perf_counter() - start
    records = run_stages(planned, stages, scale.stage_seconds, scale.results_seconds, stage_descriptions(scale))

    # The evaluation, the exports and the analysis: one line here, their log in evaluation.log.
    evaluation_log, evaluation_start = output_dir / "evaluation.log", time.perf_counter()
    print(f"Evaluating every model, ONNX export, occlusion and CKA analysis (log: {evaluation_log})", flush=True)
    with logging_to_file(evaluation_log):
        eval_labels = splits["test"]["label"][: scale.max_eval_samples or len(splits["test"])]
        test_split = splits["test"].select(range(len(eval_labels)))
        models = evaluate_models(stages, scale, records, teacher_classifier, test_split)
        results = {
            "scale": options.scale,
            "scale_settings": asdict(scale),
            "seeds": list(scale.seeds),
            "device": f"CUDA ({torch.cuda.get_device_name()})"
            if torch.cuda.is_available()
            else f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "image_size": scale.image_size,
            "train_images": train_images,
            "eval_images": len(eval_labels),
            "majority_class_accuracy": max(eval_labels.count(label) for label in set(eval_labels)) / len(eval_labels),
            "generic_epochs": scale.generic_epochs,
            "specific_epochs": scale.specific_epochs,
            "primary_metric": PRIMARY_METRIC,
            "teachers_shipped": teacher_records["mae_teacher"]["shipped"],
            "models": models,
            "speedup": models["g2sd"]["images_per_second"] / models["teacher"]["images_per_second"],
            "stages": {
                name: {"seconds": record["seconds"], "reused": record["reused"]}
                for name, record in {**teacher_records, **records}.items()
            },
            "warnings": {
                name: record["metrics"]["learning_warnings"]
                for name, record in {**teacher_records, **records}.items()
                if record["metrics"].get("learning_warnings")
            },
        }
        results["comparison"] = compare(results)
        if low_label_teacher is not None:
            results["low_labels"] = evaluate_low_label_track(
                stages, scale, records, low_label_teacher, test_split, results["models"]
            )

        checkpoint = output_dir / "g2sd-student"
        save_student(stages, f"g2sd_seed{scale.seeds[0]}", checkpoint)
        classifier = pipeline("image-classification", model=str(checkpoint), device=-1)
        example = splits["test"][0]
        results["pipeline_check"] = {
            "image": example["image"]["path"],
            "label": splits["test"].features["label"].names[example["label"]],
            "prediction": classifier(open_rgb_image(example["image"]))[0],
        }

        results["onnx"] = export_for_onnx_runtime(checkpoint, output_dir / "g2sd-student-onnx", test_split, scale)

        results["analysis"] = analyze(stages, scale, test_split, output_dir, teacher_classifier)

        results["total_seconds"] = time.perf_counter() - start
        results["time_left_estimates"] = time_left_estimates(records, results["total_seconds"] - stages_started)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_markdown(results, output_dir / "results.md")
        write_figure(results, stages, output_dir / "results.png")
    print(f"    done in {format_seconds(time.perf_counter() - evaluation_start)}", flush=True)
    print(
        f"\nG2SD demo finished in {results['total_seconds'] / 60:.1f} min. Results: {output_dir / 'results.md'} "
        f"(+ results.json, results.png); pipeline-ready student: {checkpoint}"
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
