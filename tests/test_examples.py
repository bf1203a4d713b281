"""The example scripts, called through their `main()` with tiny models and a few steps on real ELPV images."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, ViTImageProcessor, pipeline

from g2sd_hf import G2SDForGenericDistillation, G2SDForImageClassification, MAETeacher
from g2sd_hf.data import load_elpv
from g2sd_hf.metrics import classification_metrics, image_classification_evaluator, load_metric
from g2sd_hf.scripts.stages import run_stage

from .conftest import assert_card_lists_every_metric, command_line, tiny_classifier_teacher, tiny_mae_teacher


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_demo  # noqa: E402
import run_generic  # noqa: E402
import run_specific  # noqa: E402


TINY_STUDENT = (
    "hidden_size=16,num_hidden_layers=2,num_attention_heads=2,intermediate_size=32,"
    "decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=32"
)
NORMALIZATION = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION)
    tiny_mae_teacher(decoder_num_hidden_layers=4).save_pretrained(root / "mae")
    processor.save_pretrained(root / "mae")
    tiny_classifier_teacher(num_labels=4).save_pretrained(root / "classifier")
    processor.save_pretrained(root / "classifier")
    return root


def common(output_dir, max_steps=3, **extra):
    defaults = dict(
        dataset_name="elpv",
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=8,
        max_train_samples=48,
        max_eval_samples=16,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm="true",
    )
    return command_line("do_train", "do_eval", **(defaults | extra))


@pytest.fixture(scope="module")
def generic_run(teachers, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("generic")
    metrics = run_generic.main(
        common(output_dir, teacher_name_or_path=teachers / "mae", target_layer=2, config_overrides=TINY_STUDENT)
    )
    return output_dir, metrics


def test_run_generic_writes_a_loadable_student(generic_run):
    output_dir, metrics = generic_run
    assert {"train_loss", "eval_loss", "skipped_train_images"} <= metrics.keys() and metrics[
        "skipped_train_images"
    ] == 0
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"):
        assert (output_dir / name).exists(), name
    student = G2SDForGenericDistillation.from_pretrained(output_dir)
    assert (student.config.image_size, student.config.patch_size, student.config.target_hidden_size) == (32, 8, 24)
    assert (
        json.loads((output_dir / "preprocessor_config.json").read_text())["image_mean"] == NORMALIZATION["image_mean"]
    )
    assert not any(key.startswith(("teacher", "model.")) for key in load_file(output_dir / "model.safetensors"))
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert "masked_token_loss" in history[0] and "visible_token_loss" in history[0]
    assert_card_lists_every_metric(output_dir, metrics, "image-feature-extraction", "elpv")


def test_tensorboard_logging(teachers, tmp_path):
    pytest.importorskip("tensorboard")
    arguments = common(
        tmp_path / "out",
        max_steps=2,
        teacher_name_or_path=teachers / "mae",
        target_layer=2,
        config_overrides=TINY_STUDENT,
        report_to="tensorboard",
    )
    run_generic.main(arguments)
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))  # <output_dir>/runs/<date>_<host>/
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"train/loss", "train/masked_token_loss"} <= set(accumulator.Tags()["scalars"])


def test_trackio_logging_reads_back_the_loss_terms(teachers, tmp_path):
    """`--report_to trackio`, local and offline: the terms the trainer logs are in trackio's store, read back by
    trackio itself in another process. Both processes get their own `TRACKIO_DIR` (trackio reads it at import)."""
    pytest.importorskip("trackio")
    arguments = common(
        tmp_path / "out",
        max_steps=3,
        teacher_name_or_path=teachers / "mae",
        target_layer=2,
        config_overrides=TINY_STUDENT,
        project="g2sd-test",
        run_name="generic",
        report_to="trackio",
    )
    environment = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(EXAMPLES / "run_generic.py"), *arguments], env=environment, check=True)
    read_back = (
        "import json; from trackio.sqlite_storage import SQLiteStorage as s; "
        "print(json.dumps(s.get_logs('g2sd-test', 'generic', scalar_only=True), default=str))"
    )
    logs = json.loads(
        subprocess.run(
            [sys.executable, "-c", read_back], env=environment, check=True, capture_output=True, text=True
        ).stdout
    )
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = {entry["step"]: entry for entry in history if "masked_token_loss" in entry}
    stored = {entry["train/global_step"]: entry for entry in logs if "train/masked_token_loss" in entry}
    assert sorted(stored) == sorted(logged) == [1, 2, 3]
    for step, entry in logged.items():
        for term in ("loss", "masked_token_loss", "visible_token_loss"):
            assert stored[step][f"train/{term}"] == pytest.approx(entry[term], rel=1e-6), (step, term)


def test_run_generic_reads_a_yaml_file(teachers, tmp_path):
    import yaml

    arguments = {
        "dataset_name": "elpv",
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 8,
        "max_train_samples": 48,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "do_train": True,
        "teacher_name_or_path": str(teachers / "mae"),
        "target_layer": 2,
        "config_overrides": TINY_STUDENT,
    }
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(arguments))
    metrics = run_generic.main([str(tmp_path / "args.yaml")])
    assert metrics["train_samples"] == 48 and (tmp_path / "out" / "model.safetensors").exists()


def test_run_specific_from_the_generic_checkpoint(generic_run, teachers, tmp_path):
    metrics = run_specific.main(
        common(
            tmp_path,
            student_name_or_path=generic_run[0],
            teacher_name_or_path=teachers / "classifier",
            mixup_alpha=0.8,
            cutmix_alpha=1.0,
        )
    )
    assert {"eval_accuracy", "eval_balanced_accuracy", "eval_binary_accuracy", "eval_accuracy_1_3"} <= metrics.keys()
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(model, G2SDForImageClassification) and model.config.use_distillation_token
    assert list(model.config.id2label.values()) == ["0", "1/3", "2/3", "1"]
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert "task_loss" in history[0] and "distillation_loss" in history[0]
    card = (tmp_path / "README.md").read_text()
    assert "g2sd" in card and "image-classification" in card and "specific-distillation" in card
    assert_card_lists_every_metric(tmp_path, metrics, "image-classification", "elpv")

    # The saved student scored by `evaluate`'s image-classification evaluator (mended for transformers 5) with the
    # package's metric module (no network), by path and as a pipeline.
    names = list(model.config.id2label.values())
    images = load_elpv()["test"].select(range(12)).cast_column("image", datasets.Image())
    classifier = pipeline("image-classification", model=str(tmp_path))
    result = image_classification_evaluator().compute(
        model_or_pipeline=str(tmp_path),
        data=images,
        metric=load_metric("classification", class_names=names),
        label_mapping=model.config.label2id,
    )
    top1 = [
        model.config.label2id[max(scores, key=lambda s: s["score"])["label"]]
        for scores in classifier(list(images["image"]))
    ]
    expected = classification_metrics(np.array(top1), np.array(images["label"]), names)
    assert {key: result[key] for key in expected} == expected and "balanced_accuracy" in expected
    again = image_classification_evaluator().compute(
        model_or_pipeline=classifier,
        data=images,
        metric=load_metric("classification"),
        label_mapping=model.config.label2id,
    )
    assert again["accuracy"] == expected["accuracy"]


def test_run_specific_refuses_unknown_positive_classes(generic_run, tmp_path):
    with pytest.raises(ValueError, match=r"\['3/3'\] are not classes"):
        run_specific.main(
            common(tmp_path, student_name_or_path=generic_run[0], distillation_type="none", positive_classes="3/3")
        )


def test_demo_runs_every_stage_writes_results_and_reuses_them(tmp_path, capfd):
    results = run_demo.main(["--scale", "smoke", "--output_dir", str(tmp_path)])
    # The terminal: a line per stage (k/n, name, what it trains) and a line with its results; the rest in the logs.
    terminal = capfd.readouterr()
    planned = [name for name in results["stages"] if name not in ("mae_teacher", "teacher_classifier")]
    headings = [line for line in terminal.out.splitlines() if line.startswith("[")]
    assert [line.split("] ")[1].split(" (")[0] for line in headings] == planned
    assert headings[0].startswith(f"[ 1/{len(planned)}] low_label_teacher (fine-tuning the teacher on 25% of the")
    assert terminal.out.count("    done in ") == len(results["stages"]) + 1  # and the evaluation's
    assert len(terminal.out.splitlines()) == 2 * (len(results["stages"]) + 1) + 2  # + the final message
    assert "INFO" not in terminal.out + terminal.err and "Running training" not in terminal.out + terminal.err
    for name in results["stages"]:
        log = (tmp_path / "stages" / name / "train.log").read_text()
        assert re.match(rf"\d\d/\d\d/\d{{4}} .* \[{name}\] run_\w+\.py --output_dir", log)
        assert "***** Running training *****" in log and "'train_loss':" in log  # the Trainer's INFO and its log dict
    assert "quantization" in (tmp_path / "evaluation.log").read_text()  # ONNX Runtime's advice, from the export
    assert set(results["models"]) == {"teacher", "g2sd", "gd_only", "sd_only", "scratch"}
    seeds = run_demo.SCALES["smoke"].seeds
    for name, row in results["models"].items():
        assert len(row["accuracy"]["values"]) == (1 if name == "teacher" else len(seeds))
        assert 0 <= row["accuracy"]["mean"] <= 1 and row["images_per_second"] > 0
        assert row["accuracy"]["std"] == pytest.approx(
            float(np.std(row["accuracy"]["values"], ddof=1)) if name != "teacher" else 0.0
        )
    assert results["models"]["g2sd"]["parameters"] < results["models"]["teacher"]["parameters"]
    stages = results["stages"]
    assert {
        "mae_teacher",
        "teacher_classifier",
        *(f"{name}_seed{seed}" for seed in seeds for name in ("generic", "g2sd", "gd_only", "sd_only", "scratch")),
        "low_label_teacher",
        *(f"{name}_seed{seed}" for seed in seeds for name in run_demo.LOW_LABEL_STUDENTS),
    } == set(stages)
    # The few-labels track: a quarter of the 48 smoke cells keep their labels; the same steps for every student.
    track = results["low_labels"]
    assert track["labeled_images"] + track["unlabeled_images"] == results["train_images"]
    assert 0 < track["labeled_images"] <= round(0.25 * results["train_images"]) + 1
    assert track["steps"] == run_demo.low_label_steps(run_demo.SCALES["smoke"], results["train_images"])
    assert set(track["models"]) == {"teacher", *run_demo.LOW_LABEL_STUDENTS}
    for name in run_demo.LOW_LABEL_STUDENTS:
        assert len(track["models"][name]["balanced_accuracy"]["values"]) == len(seeds)
        assert stages[f"{name}_seed{seeds[0]}"]["seconds"] > 0
    unlabeled_run = json.loads(
        (tmp_path / "stages" / f"low_g2sd_unlabeled_seed{seeds[0]}" / "train_results.json").read_text()
    )
    labeled_run = json.loads((tmp_path / "stages" / f"low_g2sd_seed{seeds[0]}" / "train_results.json").read_text())
    assert unlabeled_run["train_unlabeled_images"] == track["unlabeled_images"]
    assert "train_unlabeled_images" not in labeled_run and labeled_run["train_samples"] == track["labeled_images"]
    assert track["comparison"]["baselines"]["low_scratch"]["difference"] == pytest.approx(
        track["models"]["low_g2sd_unlabeled"]["balanced_accuracy"]["mean"]
        - track["models"]["low_scratch"]["balanced_accuracy"]["mean"]
    )
    assert not any(stage["reused"] for stage in stages.values()) and not results["teachers_shipped"]
    comparison = results["comparison"]
    primary = run_demo.PRIMARY_METRIC
    assert primary == "balanced_accuracy"  # see PRIMARY_METRIC_REASON: accuracy rewards calling every cell functional
    assert comparison["teacher_over_scratch"] == pytest.approx(
        results["models"]["teacher"][primary]["mean"] - results["models"]["scratch"][primary]["mean"]
    )
    assert comparison["baselines"]["scratch"]["difference"] == pytest.approx(
        results["models"]["g2sd"][primary]["mean"] - results["models"]["scratch"][primary]["mean"]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"]["g2sd"]["accuracy"] == results["models"]["g2sd"]["accuracy"]
    assert set(saved["analysis"]["occlusion"]) == {"drop", "fill"}
    table = (tmp_path / "results.md").read_text()
    assert "| G2SD (GD + SD) |" in table and "| Scratch (supervised only) |" in table and "Primary metric" in table
    assert "patches dropped from the token sequence" in table
    assert (
        "## Few labels: 25% of the training labels" in table and "| G2SD + unlabeled SD (SD on every image) |" in table
    )
    with Image.open(tmp_path / "results.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 500
    assert not (tmp_path / "g2sd-student" / "train.log").exists()  # the demo's log stays in its stage folder
    classifier = pipeline("image-classification", model=str(tmp_path / "g2sd-student"))
    assert classifier(Image.new("RGB", (40, 40)))[0]["label"] in {"functional", "defective"}
    # The student in ONNX Runtime: fp32 equal to PyTorch, int8 scored against it on the held-out cells.
    onnx = results["onnx"]
    assert onnx["fp32_max_abs_difference"] < 1e-4 and onnx["checked_images"] == results["eval_images"]
    assert onnx["pytorch_balanced_accuracy"] == pytest.approx(
        results["models"]["g2sd"]["balanced_accuracy"]["values"][0]
    )
    assert onnx["fp32_balanced_accuracy"] == pytest.approx(onnx["pytorch_balanced_accuracy"])
    assert (tmp_path / "g2sd-student-onnx" / "model_int8.onnx").exists()
    assert "## Deployment: the student in ONNX Runtime" in table and "int8 - fp32 balanced accuracy" in table

    again = run_demo.main(["--scale", "smoke", "--output_dir", str(tmp_path)])
    assert all(stage["reused"] for stage in again["stages"].values())
    assert again["models"]["g2sd"]["accuracy"] == results["models"]["g2sd"]["accuracy"]


def test_the_cpu_demo_times_every_kind_of_stage_it_runs(tmp_path):
    """The progress line's estimate scales the measured seconds of each kind of stage: every kind the `cpu` demo
    plans has one, so no stage falls back to the mean."""
    from g2sd_hf.scripts.stages import StageClock

    scale = run_demo.SCALES["cpu"]
    planned = run_demo.stage_arguments(scale, tmp_path, tmp_path / "mae", tmp_path / "teacher", tmp_path / "low", 1968)
    kinds = {StageClock.kind(name) for name in ["low_label_teacher", *planned]}
    assert kinds == set(scale.stage_seconds) and scale.results_seconds > 0
    # Before any stage has run, the estimate is the measured demo's (15.4 min in all).
    clock = StageClock(["low_label_teacher", *planned], scale.stage_seconds, scale.results_seconds)
    assert 13 * 60 < clock.seconds_left("low_label_teacher") < 17 * 60


def test_teachers_written_as_assets_are_used_as_shipped(tmp_path, monkeypatch):
    import dataclasses

    scale = run_demo.SCALES["smoke"]
    stages = tmp_path / "stages"
    mae, classifier, records = run_demo.prepare_teachers(scale, stages, rebuild=False)  # smoke: made on the spot
    assert not records["mae_teacher"]["shipped"] and (classifier / "model.safetensors").exists()
    monkeypatch.setattr(run_demo, "ASSETS", tmp_path / "repository" / "examples" / "assets")
    run_demo.ASSETS.mkdir(parents=True)
    run_demo.write_teacher_assets(scale, mae, classifier, records)
    shipped = dataclasses.replace(scale, shipped_teachers=True)
    mae_asset, classifier_asset, shipped_records = run_demo.prepare_teachers(
        shipped, tmp_path / "other", rebuild=False
    )
    assert mae_asset == run_demo.ASSETS / run_demo.MAE_TEACHER_ASSET and all(
        record["shipped"] for record in shipped_records.values()
    )
    provenance = json.loads((classifier_asset / "provenance.json").read_text())
    assert flags(provenance["arguments"])["--mae_name_or_path"] == f"examples/assets/{run_demo.MAE_TEACHER_ASSET}"
    assert provenance["metrics"]["eval_accuracy"] == records["teacher_classifier"]["metrics"]["eval_accuracy"]
    original = AutoModelForImageClassification.from_pretrained(classifier)
    reloaded = AutoModelForImageClassification.from_pretrained(classifier_asset)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, original(pixel_values=pixels).logits)
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_demo_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "stages" / "teacher_classifier").mkdir(parents=True)
    (tmp_path / "stages" / "teacher_classifier" / "notes.txt").write_text("mine")
    arguments = run_demo.teacher_classifier_arguments(
        run_demo.SCALES["smoke"], tmp_path / "stages" / "teacher_classifier", tmp_path / "mae"
    )
    with pytest.raises(FileExistsError, match="was not written by the demo"):
        run_stage(
            "teacher_classifier", run_demo.run_finetune_teacher, arguments, tmp_path / "stages" / "teacher_classifier"
        )
    assert (tmp_path / "stages" / "teacher_classifier" / "notes.txt").read_text() == "mine"


def flags(arguments: list[str]) -> dict:
    """flag -> value of a command line (a flag alone, like --do_train, maps to None): order does not matter."""
    pairs = {}
    for index, item in enumerate(arguments):
        if item.startswith("--"):
            following = arguments[index + 1] if index + 1 < len(arguments) else None
            pairs[item] = None if following is None or following.startswith("--") else following
    return pairs


def test_the_shipped_teachers_are_what_their_recorded_commands_make():
    """The teachers shipped for the cpu scale: loadable, the MAE one pre-trained with the normalized-pixel loss, and
    each made by exactly the command the demo runs to rebuild it."""
    scale = run_demo.SCALES["cpu"]
    mae_folder, classifier_folder = (
        run_demo.ASSETS / run_demo.MAE_TEACHER_ASSET,
        run_demo.ASSETS / run_demo.CLASSIFIER_ASSET,
    )
    mae_provenance = json.loads((mae_folder / "provenance.json").read_text())
    recorded = mae_provenance["arguments"]
    expected = run_demo.mae_teacher_arguments(scale, Path(recorded[recorded.index("--output_dir") + 1]))
    assert mae_provenance["script"] == "examples/run_mae_pretraining.py" and flags(recorded) == flags(expected)
    classifier_provenance = json.loads((classifier_folder / "provenance.json").read_text())
    recorded = classifier_provenance["arguments"]
    expected = run_demo.teacher_classifier_arguments(
        scale,
        Path(recorded[recorded.index("--output_dir") + 1]),
        Path(recorded[recorded.index("--mae_name_or_path") + 1]),
    )
    assert classifier_provenance["script"] == "examples/run_finetune_teacher.py" and flags(recorded) == flags(expected)
    assert flags(recorded)["--mae_name_or_path"] == f"examples/assets/{run_demo.MAE_TEACHER_ASSET}"

    teacher = MAETeacher.from_pretrained(str(mae_folder), target_layer=scale.target_layer)
    assert teacher.config.norm_pix_loss and teacher.config.image_size == scale.image_size
    assert next(teacher.parameters()).dtype == torch.float32
    classifier = AutoModelForImageClassification.from_pretrained(classifier_folder)
    assert list(classifier.config.id2label.values()) == ["functional", "defective"]
    for folder in (mae_folder, classifier_folder):
        assert "python examples/run_" in (folder / "README.md").read_text()


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(teachers, tmp_path):
    """SIGKILL after a checkpoint, then --resume_from_checkpoint: the final weights equal an uninterrupted run's.

    Deterministic settings: full-image crops without flips. (With random augmentation a resumed run is equivalent
    but not identical: accelerate's data loader prepares the next batch, drawing its random crop, before the
    checkpoint saves the RNG state.)
    """
    max_steps, save_steps = 30, 5

    def command(output_dir, *extra):
        arguments = common(
            output_dir,
            max_steps=max_steps,
            teacher_name_or_path=teachers / "mae",
            target_layer=2,
            config_overrides=TINY_STUDENT,
            save_steps=save_steps,
            save_strategy="steps",
            per_device_train_batch_size=4,
            max_train_samples=64,
            min_crop_scale=1.0,
            horizontal_flip="false",
            learning_rate=1e-3,
            scale_lr_with_batch_size="false",
        )
        arguments.remove("--do_eval")
        return [sys.executable, str(EXAMPLES / "run_generic.py"), *arguments, *extra]

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(command(tmp_path / "uninterrupted"), check=True, env=environment, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(interrupted), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first_checkpoint = interrupted / f"checkpoint-{save_steps}" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if first_checkpoint.exists():
            try:
                json.loads(first_checkpoint.read_text())
                break
            except json.JSONDecodeError:
                pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (interrupted / "model.safetensors").exists()

    checkpoints = sorted(interrupted.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    complete = [path for path in checkpoints if (path / "trainer_state.json").exists()]
    last = complete[-1]
    assert int(last.name.split("-")[1]) < max_steps
    subprocess.run(
        command(interrupted, "--resume_from_checkpoint", str(last)), check=True, env=environment, capture_output=True
    )

    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-6, rtol=1e-5)
