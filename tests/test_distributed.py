"""A real 2-process run: `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) against one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import ViTImageProcessor

from g2sd_hf import G2SDForGenericDistillation

from .conftest import tiny_mae_teacher
from .test_examples import EXAMPLES, NORMALIZATION, TINY_STUDENT


def generic_command(teacher, output_dir, per_device_batch):
    return [
        str(EXAMPLES / "run_generic.py"),
        "--dataset_name",
        "elpv",
        "--teacher_name_or_path",
        str(teacher),
        "--target_layer",
        "2",
        "--config_overrides",
        TINY_STUDENT,
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--max_train_samples",
        "64",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--learning_rate",
        "1e-3",
        "--scale_lr_with_batch_size",
        "false",
        "--warmup_steps",
        "0",
        "--seed",
        "7",
        # Deterministic images: a full-image crop and no flips, so both runs see identical pixels.
        "--min_crop_scale",
        "1.0",
        "--horizontal_flip",
        "false",
        "--disable_tqdm",
        "true",
        "--do_train",
    ]


def logged_losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
    reason="accelerate CLI not installed",
)
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_mae_teacher(decoder_num_hidden_layers=4).save_pretrained(teacher)
    ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION).save_pretrained(teacher)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}

    single = subprocess.run(
        [sys.executable, *generic_command(teacher, tmp_path / "one", 8)],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]
    double = subprocess.run(
        [*launch, *generic_command(teacher, tmp_path / "two", 4)], env=environment, capture_output=True, text=True
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "distributed True" in double.stdout + double.stderr  # both processes joined one gloo group
    assert "Training setup: 2 processes, data parallel (gloo)" in double.stdout + double.stderr
    assert "Training setup: single process, no distributed training" in single.stdout + single.stderr

    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    # Same samples, same masks (noise seeded by step, sliced per process): the losses agree to float noise.
    assert two == pytest.approx(one, rel=1e-4)
    assert one[-1] != pytest.approx(one[0], rel=1e-3)  # and training moved them

    # Without ACCELERATE_USE_CPU, the same launch on a machine without GPUs starts two independent rank-0 runs: the
    # scripts refuse the second rather than let both write one output_dir.
    without = {key: value for key, value in environment.items() if key != "ACCELERATE_USE_CPU"}
    clash = subprocess.run(
        [*launch, *generic_command(teacher, tmp_path / "clash", 4)], env=without, capture_output=True, text=True
    )
    if "distributed True" not in clash.stdout + clash.stderr:  # (a machine whose accelerate forms the group anyway)
        assert clash.returncode != 0
        output = clash.stdout + clash.stderr
        # Refused while the first runs (the lock), or after it finished (its finished run is not overwritten).
        assert (
            "is writing" in output and "ACCELERATE_USE_CPU=true" in output
        ) or "already holds a finished run" in output


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
    reason="accelerate CLI not installed",
)
def test_the_fsdp_config_launches_saves_a_loadable_student_and_says_it_falls_back_on_cpu(tmp_path):
    """The shipped FSDP config, launched with 2 CPU processes. accelerate enables FSDP only on accelerators (GPUs):
    on CPUs it runs plain data parallelism without a word, so the scripts say so. FSDP sharding itself needs a GPU
    machine; here: the config is valid, the run trains and saves a checkpoint `from_pretrained` loads whole."""
    teacher = tmp_path / "teacher"
    tiny_mae_teacher(decoder_num_hidden_layers=4).save_pretrained(teacher)
    ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION).save_pretrained(teacher)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(EXAMPLES / "accelerate_configs" / "fsdp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        "29518",
    ]
    command = generic_command(teacher, tmp_path / "fsdp", 4)
    command[command.index("--save_strategy") + 1] = "steps"
    run = subprocess.run([*launch, *command, "--save_steps", "4"], env=environment, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert (
        "distributed True" in output and "The accelerate config asks for FSDP, but accelerate runs MULTI_CPU" in output
    )
    for folder in (tmp_path / "fsdp", tmp_path / "fsdp" / "checkpoint-4"):
        student, info = G2SDForGenericDistillation.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(logged_losses(tmp_path / "fsdp")) == 4
