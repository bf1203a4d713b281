"""The script layer (g2sd_hf.scripts.run): resuming only the same run, the output_dir lock, config overrides."""

import contextlib
import json
import types

import pytest

from g2sd_hf import GenericDistillationArguments
from g2sd_hf.scripts.arguments import DataArguments
from g2sd_hf.scripts.run import RUN_ARGUMENTS, checkpoint_to_resume, release_output_dir


def arguments(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), do_train=True, learning_rate=1e-3, report_to=[], use_cpu=True)
    return GenericDistillationArguments(**{**values, **overrides})


def write_checkpoint(folder, step: int) -> None:
    """A complete Trainer checkpoint as far as resuming can tell: weights, then the trainer state (written last)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"weight": torch.full((4, 4), float(step))}, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def interrupted_run(output_dir, training_args, data_args):
    """What a run killed after its second checkpoint leaves: its arguments record and two checkpoint folders."""
    assert checkpoint_to_resume(training_args, data_args) is None  # a new folder: a new run, recorded
    for step in (2, 4):
        write_checkpoint(output_dir / f"checkpoint-{step}", step)


@pytest.mark.parametrize("damage", ["truncated weights", "no trainer state", "unreadable trainer state"])
def test_resuming_skips_an_incomplete_checkpoint_and_says_why(tmp_path, damage, caplog):
    """Issue 19: a save cut short (a full disk, a kill) left a checkpoint that resume picked and died on."""
    data = DataArguments(dataset_name="elpv")
    interrupted_run(tmp_path, arguments(tmp_path), data)
    latest = tmp_path / "checkpoint-4"
    if damage == "truncated weights":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-20])
        reason = "model.safetensors is truncated"
    elif damage == "no trainer state":
        (latest / "trainer_state.json").unlink()
        reason = "no trainer_state.json"
    else:
        (latest / "trainer_state.json").write_text('{"global_step": ')
        reason = "trainer_state.json cannot be read"
    with caplog.at_level("WARNING"):
        assert checkpoint_to_resume(arguments(tmp_path), data) == str(tmp_path / "checkpoint-2")
    assert f"Skipping {latest}, an incomplete checkpoint: {reason}" in caplog.text
    assert latest.is_dir()  # skipped, not removed
    # Given explicitly, it is refused with the reason.
    with pytest.raises(ValueError, match=rf"not a complete checkpoint: {reason}"):
        checkpoint_to_resume(arguments(tmp_path, resume_from_checkpoint=str(latest)), data)
    # With no complete checkpoint left, the rerun is refused rather than started anew over them.
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="none of them complete"):
        checkpoint_to_resume(arguments(tmp_path), data)


def test_a_rerun_with_the_same_arguments_resumes_its_last_checkpoint(tmp_path):
    data = DataArguments(dataset_name="elpv")
    interrupted_run(tmp_path, arguments(tmp_path), data)
    assert json.loads((tmp_path / RUN_ARGUMENTS).read_text())["learning_rate"] == 1e-3
    # Logging, saving and data-loading settings may change between the two.
    rerun = arguments(tmp_path, logging_steps=7, dataloader_num_workers=0, save_total_limit=2)
    assert checkpoint_to_resume(rerun, data) == str(tmp_path / "checkpoint-4")


def test_resuming_with_another_number_of_processes_is_refused_naming_the_batch_and_learning_rate(
    tmp_path, monkeypatch
):
    """Issue 19: a run started on 1 process and resumed on 2 silently doubled its global batch. (The second launch is
    simulated by the world size the arguments report; a real 2-process run is in test_distributed.py.)"""
    data = DataArguments(dataset_name="elpv")
    interrupted_run(tmp_path, arguments(tmp_path, per_device_train_batch_size=32), data)
    record = json.loads((tmp_path / RUN_ARGUMENTS).read_text())
    assert (record["num_processes"], record["global_batch_size"]) == (1, 32)
    assert record["peak_learning_rate"] == pytest.approx(1e-3 * 32 / 256)
    monkeypatch.setattr(GenericDistillationArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError) as refused:
        checkpoint_to_resume(arguments(tmp_path, per_device_train_batch_size=32), data)
    message = str(refused.value)
    assert "global_batch_size: 32 then, 64 now" in message and "num_processes: 1 then, 2 now" in message
    assert "peak_learning_rate: 0.000125 then, 0.00025 now" in message and "--resume_from_checkpoint" in message


@pytest.mark.parametrize("change", ["training", "data"])
def test_a_run_with_other_arguments_is_refused_and_names_the_difference(tmp_path, change):
    interrupted_run(tmp_path, arguments(tmp_path), DataArguments(dataset_name="elpv"))
    training_args = arguments(tmp_path, learning_rate=5e-4) if change == "training" else arguments(tmp_path)
    data = (
        DataArguments(dataset_name="elpv", max_train_samples=100)
        if change == "data"
        else DataArguments(dataset_name="elpv")
    )
    expected = (
        "learning_rate: 0.001 then, 0.0005 now; peak_learning_rate: 3.125e-05 then, 1.5625e-05 now"
        if change == "training"
        else "max_train_samples: None then, 100 now"
    )
    with pytest.raises(
        ValueError, match=rf"other arguments \({expected}\).*--overwrite_output_dir.*--resume_from_checkpoint"
    ):
        checkpoint_to_resume(training_args, data)


def test_checkpoints_without_a_record_and_finished_runs_are_refused(tmp_path):
    (tmp_path / "unknown" / "checkpoint-10").mkdir(parents=True)
    with pytest.raises(ValueError, match="without a run_arguments.json record"):
        checkpoint_to_resume(arguments(tmp_path / "unknown"))
    finished = tmp_path / "finished"
    assert checkpoint_to_resume(arguments(finished)) is None
    (finished / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"a finished run \(model.safetensors\) of this same run"):
        checkpoint_to_resume(arguments(finished))
    assert (finished / "model.safetensors").read_bytes() == b"weights"


def test_overwrite_output_dir_starts_a_new_run_and_explicit_resume_is_kept(tmp_path):
    interrupted_run(tmp_path, arguments(tmp_path), DataArguments(dataset_name="elpv"))
    assert checkpoint_to_resume(arguments(tmp_path, learning_rate=5e-4, overwrite_output_dir=True)) is None
    assert json.loads((tmp_path / RUN_ARGUMENTS).read_text())["learning_rate"] == 5e-4
    # Issue 19: the earlier run's checkpoints are moved aside whole (not resumed, not removed, out of the rotation).
    earlier = tmp_path / "_earlier_run_1"
    assert sorted(path.name for path in earlier.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not list(tmp_path.glob("checkpoint-*"))
    # The overwriting run killed before its first checkpoint, then rerun as is: a new start, not the earlier run's
    # last checkpoint (which it used to resume, training 0 steps and keeping the old weights).
    assert checkpoint_to_resume(arguments(tmp_path, learning_rate=5e-4)) is None
    explicit = arguments(tmp_path, resume_from_checkpoint=str(earlier / "checkpoint-2"), learning_rate=1.0)
    assert checkpoint_to_resume(explicit) == str(earlier / "checkpoint-2")
    # A second overwrite over new checkpoints keeps both earlier runs apart.
    write_checkpoint(tmp_path / "checkpoint-6", 6)
    assert checkpoint_to_resume(arguments(tmp_path, learning_rate=2e-4, overwrite_output_dir=True)) is None
    assert [path.name for path in (tmp_path / "_earlier_run_2").iterdir()] == ["checkpoint-6"]


def test_config_overrides_are_parsed_and_unknown_names_refused():
    from transformers import ViTMAEConfig

    from g2sd_hf import G2SDConfig
    from g2sd_hf.scripts.run import parse_overrides

    assert parse_overrides("hidden_size=96, qkv_bias=false,drop_path_rate=0.1,hidden_act=gelu", G2SDConfig) == {
        "hidden_size": 96,
        "qkv_bias": False,
        "drop_path_rate": 0.1,
        "hidden_act": "gelu",
    }
    assert (
        parse_overrides("num_labels=3,decoder_hidden_size=64,norm_pix_loss=true", ViTMAEConfig)["norm_pix_loss"]
        is True
    )
    with pytest.raises(
        ValueError,
        match="Unknown config override 'hiden_size': G2SDConfig has no such setting. Did you mean hidden_size",
    ):
        parse_overrides("hiden_size=8", G2SDConfig)
    with pytest.raises(ValueError, match="'decoder_depth'.*ViTMAEConfig"):
        parse_overrides("decoder_depth=4", ViTMAEConfig)
    with pytest.raises(ValueError, match="name=value"):
        parse_overrides("hidden_size")


def test_a_second_main_process_on_one_output_dir_is_refused(tmp_path):
    """Two processes that both believe they are rank 0 (`accelerate launch --multi_gpu` without GPUs and without
    ACCELERATE_USE_CPU) would overwrite each other: the second is refused; a lock of a finished process is taken over."""
    import os
    import subprocess
    import sys

    from g2sd_hf.scripts.run import RUN_LOCK

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / RUN_LOCK).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename, "world_size": 1}))
        with pytest.raises(
            RuntimeError, match=rf"process {other.pid}, 1 process\(es\)\) is writing .*ACCELERATE_USE_CPU=true"
        ):
            checkpoint_to_resume(arguments(tmp_path))
        assert not (tmp_path / RUN_ARGUMENTS).exists()
    finally:
        other.kill()
        other.wait()
    assert checkpoint_to_resume(arguments(tmp_path)) is None  # its process ended: the lock is stale
    assert json.loads((tmp_path / RUN_LOCK).read_text())["pid"] == os.getpid()
    assert checkpoint_to_resume(arguments(tmp_path)) is None  # the same process may start again
    release_output_dir(arguments(tmp_path))
    assert not (tmp_path / RUN_LOCK).exists()


def test_stage_clock_estimates_the_time_left_by_kind_of_stage():
    from g2sd_hf.scripts.stages import StageClock

    clock = StageClock(["teacher", "generic_seed0", "g2sd_seed0", "generic_seed1", "g2sd_seed1"])
    assert clock.position("teacher") == "[1/5] "  # nothing timed yet: no estimate
    clock.finished("teacher", 600.0)
    clock.finished("generic_seed0", 120.0)
    clock.finished("g2sd_seed0", 60.0)
    assert clock.seconds_left("generic_seed1") == 120.0 + 60.0  # each by its kind's first seed
    clock.finished("generic_seed1", 180.0)
    assert clock.seconds_left("g2sd_seed1") == 60.0 and clock.position("g2sd_seed1") == "[5/5, about 1 min left] "
    other = StageClock(["a", "b", "c"])
    other.finished("a", 90.0)
    assert other.seconds_left("b") == 180.0  # unknown kinds take the mean stage
    # With the seconds each kind took in a measured run (and the work after the stages): an estimate from stage 1,
    # then scaled by this machine's speed on the stages finished so far.
    measured = StageClock(
        ["teacher", "generic_seed0", "g2sd_seed0", "generic_seed1", "g2sd_seed1"],
        {"teacher": 50.0, "generic": 70.0, "g2sd": 40.0},
        tail_seconds=300.0,
    )
    assert measured.seconds_left("teacher") == 50.0 + 2 * (70.0 + 40.0) + 300.0
    measured.finished("teacher", 100.0)  # twice as slow as measured
    assert measured.seconds_left("generic_seed0") == 2 * (2 * (70.0 + 40.0) + 300.0)
    measured.finished("generic_seed0", 70.0)  # generic is now known; the speed is (100 + 70) / (50 + 70)
    speed = 170.0 / 120.0
    assert measured.seconds_left("g2sd_seed0") == pytest.approx(40.0 * speed + 70.0 + 40.0 * speed + 300.0 * speed)
    # Shrunk toward the measured run's speed: 60 expected seconds at speed 1 count beside the stages finished.
    shrunk = StageClock(["teacher", "generic_seed0"], {"teacher": 50.0, "generic": 70.0}, prior_seconds=60.0)
    shrunk.finished("teacher", 100.0)
    assert shrunk.seconds_left("generic_seed0") == pytest.approx(70.0 * (100.0 + 60.0) / (50.0 + 60.0))


def test_a_stage_shows_a_progress_bar_in_a_terminal_only(tmp_path, monkeypatch):
    """The bar is display only: the record that decides reuse keeps the arguments as given."""
    import types

    from g2sd_hf.scripts.stages import run_stage

    seen = []
    script = types.SimpleNamespace(__name__="script", main=lambda arguments: seen.append(arguments) or {"x": 1.0})
    for terminal, folder in ((True, "tty"), (False, "log")):
        monkeypatch.setattr("sys.stderr.isatty", lambda terminal=terminal: terminal)
        record = run_stage(folder, script, ["--disable_tqdm", "true"], tmp_path / folder)
        assert record["arguments"] == ["--disable_tqdm", "true"] and not record["reused"]
    assert seen == [["--disable_tqdm", "true", "--disable_tqdm", "false"], ["--disable_tqdm", "true"]]
    assert run_stage("tty", script, ["--disable_tqdm", "true"], tmp_path / "tty")["reused"]


def test_the_examples_in_the_stages_docstrings_hold():
    import doctest

    from g2sd_hf.scripts import stages

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(stages):
        for example in test.examples:
            example.want = example.want.removesuffix("```\n")  # the markdown fence that closes the example
        runner.run(test)
    assert runner.summarize(verbose=False) == (0, 8)


def logging_state():
    """What logging_to_file changes and must restore: every logger's handlers, level and propagation, warnings,
    standard output and the libraries' progress bars."""
    import logging
    import sys
    import warnings

    import datasets
    import huggingface_hub
    import transformers

    loggers = [logging.getLogger()] + [
        item for item in logging.Logger.manager.loggerDict.values() if isinstance(item, logging.Logger)
    ]
    return (
        {item.name: (item.handlers[:], item.level, item.propagate) for item in loggers},
        warnings.showwarning,
        list(warnings.filters),
        sys.stdout,
        transformers.utils.logging.is_progress_bar_enabled(),
        huggingface_hub.utils.are_progress_bars_disabled(),
        datasets.is_progress_bar_enabled(),
    )


@pytest.mark.parametrize("failing", [False, True])
def test_logging_to_file_takes_the_runs_output_and_restores_the_terminals(tmp_path, capfd, failing):
    """Issue 22: a demo stage's logs (Python's, transformers', datasets', torch's), warnings and printed lines go to
    its file, and everything is as before after the block, also when the run fails."""
    import logging
    import warnings

    import datasets
    import transformers

    from g2sd_hf.scripts.run import logging_to_file

    def warn():
        warnings.warn("a library's warning", UserWarning)

    warn()  # shown once here: shown again inside the block
    capfd.readouterr()
    before = logging_state()
    with pytest.raises(ValueError, match="stopped") if failing else contextlib.nullcontext():
        with logging_to_file(tmp_path / "train.log"):
            transformers.utils.logging.set_verbosity_info()  # what setup_logging does in a script
            transformers.utils.logging.get_logger("transformers.trainer").info("***** Running training *****")
            datasets.utils.logging.get_logger("datasets.arrow_dataset").warning("Loading cached processed dataset")
            logging.getLogger("torch.onnx").warning("torch's own handler")  # torch's loggers do not propagate
            logging.getLogger("g2sd_hf.trainer").warning("Peak learning rate 0.001")
            print({"loss": 0.5})
            warn()
            assert not transformers.utils.logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
            if failing:
                raise ValueError("stopped")
    log = (tmp_path / "train.log").read_text()
    for line in (
        "Running training",
        "Loading cached",
        "torch's own",
        "Peak learning rate",
        "{'loss': 0.5}",
        "UserWarning: a library's warning",
    ):
        assert log.count(line) == 1, line
    assert ("Traceback" in log and "ValueError: stopped" in log) == failing
    terminal = capfd.readouterr()
    assert terminal.out == terminal.err == ""
    after = logging_state()
    assert {name: after[0][name] for name in before[0]} == before[0] and after[1:] == before[1:]
    logging.getLogger("g2sd_hf.trainer").warning("after the block")
    assert "after the block" not in (tmp_path / "train.log").read_text()


def test_a_stage_shows_the_bars_that_clear(tmp_path):
    """In a terminal, a stage's Trainer gets `StageProgressCallback` (through transformers' DEFAULT_PROGRESS_CALLBACK),
    whose bars are not left on the screen; outside the block, the default one."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from g2sd_hf.scripts.stages import StageProgressCallback, clearing_progress_bars

    def callbacks():
        args = TrainingArguments(str(tmp_path), disable_tqdm=False, report_to=[], use_cpu=True)
        return [type(item) for item in Trainer(torch.nn.Linear(2, 2), args).callback_handler.callbacks]

    with clearing_progress_bars():
        inside = callbacks()
    assert StageProgressCallback in inside and ProgressCallback not in inside
    assert ProgressCallback in callbacks() and StageProgressCallback not in callbacks()
    bars = StageProgressCallback()
    state = types.SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    bars.on_train_begin(None, state, None)
    bars.on_prediction_step(None, state, None, eval_dataloader=[1, 2])
    assert bars.training_bar.leave is False and bars.prediction_bar.leave is False
    bars.on_evaluate(None, state, None)
    bars.on_train_end(None, state, None)


def test_a_stage_that_fails_says_where_its_log_is(tmp_path, capfd):
    import logging
    import types

    from g2sd_hf.scripts.stages import run_stage

    def main(arguments):
        logging.getLogger("g2sd_hf.trainer").warning("step 1 of 3")
        raise ValueError("no images in train_dir")

    with pytest.raises(ValueError, match="no images in train_dir"):
        run_stage("generic_seed0", types.SimpleNamespace(__name__="run_generic", main=main), ["--x"], tmp_path / "g")
    out = capfd.readouterr().out.splitlines()
    assert out[0] == "generic_seed0" and "FAILED after" in out[1] and "no images in train_dir" in out[1]
    assert out[2] == f"    The stage's whole log: {tmp_path / 'g' / 'train.log'}"
    log = (tmp_path / "g" / "train.log").read_text()
    assert "[generic_seed0] run_generic.py --x" in log and "step 1 of 3" in log
    assert "Traceback" in log and "ValueError: no images in train_dir" in log
    assert not (tmp_path / "g" / "g2sd_demo_stage.json").exists()  # not finished: not reused on the next run


@pytest.mark.parametrize(
    ("switch", "value", "message"),
    [
        ("per_device_train_batch_size", "0", "--per_device_train_batch_size must be at least 1, got 0"),
        ("per_device_eval_batch_size", "0", "--per_device_eval_batch_size must be at least 1, got 0"),
        ("gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1, got 0"),
        ("num_train_epochs", "-1", "--num_train_epochs must be positive, got -1"),
        ("num_train_epochs", "0", "--num_train_epochs 0 without --max_steps trains nothing"),
        ("dataloader_num_workers", "-1", "--dataloader_num_workers must be >= 0"),
    ],
)
def test_counts_that_would_train_nothing_are_refused_before_any_data_is_read(tmp_path, switch, value, message):
    """Issue 19: a negative epoch count used to exit 0 with the initial weights saved as a finished model."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import run_specific

    missing = tmp_path / "no-such-folder"  # the data pass would fail on it: the count must be refused first
    arguments = [
        "--train_dir",
        str(missing),
        "--output_dir",
        str(tmp_path / "out"),
        "--do_train",
        f"--{switch}",
        value,
    ]
    with pytest.raises(ValueError, match=message):
        run_specific.main(arguments)
    assert not (tmp_path / "out").exists()


def test_a_damaged_processor_file_is_an_error_and_a_missing_one_falls_back(tmp_path):
    """Issue 19: an unreadable preprocessor_config.json made run_specific.py use the teacher's normalization with an
    INFO line."""
    from transformers import ViTImageProcessor

    from g2sd_hf.scripts.run import checkpoint_normalization

    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path / "good")
    assert checkpoint_normalization(str(tmp_path / "good")) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    (tmp_path / "missing").mkdir()
    assert checkpoint_normalization(str(tmp_path / "missing")) is None
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "preprocessor_config.json").write_text('{"image_mean": [0.1, ')
    with pytest.raises(ValueError, match=r"damaged/preprocessor_config.json cannot be read"):
        checkpoint_normalization(str(tmp_path / "damaged"))


def test_run_finetune_teacher_refuses_an_mae_whose_processor_file_is_damaged(shapes_folder, tmp_path):
    import sys
    from pathlib import Path

    from .conftest import run_arguments, tiny_mae_teacher

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import run_finetune_teacher

    tiny_mae_teacher().save_pretrained(tmp_path / "mae")
    (tmp_path / "mae" / "preprocessor_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="preprocessor_config.json cannot be read"):
        run_finetune_teacher.main(run_arguments(shapes_folder, tmp_path / "out", 1, mae_name_or_path=tmp_path / "mae"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_overwriting_run_with_a_save_limit_keeps_the_earlier_runs_checkpoints(shapes_folder, tmp_path):
    """Issue 19: transformers' checkpoint rotation removed the earlier run's checkpoints after an overwrite."""
    import sys
    from pathlib import Path

    from .conftest import SHAPES_STUDENT, run_arguments

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import run_specific

    def run(**extra):
        return run_specific.main(
            run_arguments(
                shapes_folder,
                tmp_path / "run",
                1,
                distillation_type="none",
                config_overrides=f"image_size=32,patch_size=8,{SHAPES_STUDENT}",
                save_strategy="steps",
                save_steps=4,
                do_eval=False,
                **extra,
            )
        )

    run(learning_rate=1e-3, max_steps=8)
    first = {path.name: (path / "model.safetensors").read_bytes() for path in (tmp_path / "run").glob("checkpoint-*")}
    assert sorted(first) == ["checkpoint-4", "checkpoint-8"]
    run(learning_rate=5e-4, overwrite_output_dir=True, save_total_limit=1, max_steps=12)
    earlier = tmp_path / "run" / "_earlier_run_1"
    assert {name: (earlier / name / "model.safetensors").read_bytes() for name in first} == first
    assert [path.name for path in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-12"]


@pytest.mark.parametrize("script", ["run_generic", "run_specific"])
def test_teacher_student_mismatches_are_refused_before_any_image_is_decoded(
    script, shapes_folder, shapes_teacher, tmp_path, monkeypatch
):
    """Issue 19: the pair checks ran only after every image had been decoded once (an hour on ImageNet)."""
    import importlib
    import shutil
    import sys
    from pathlib import Path

    from transformers import ViTImageProcessor

    import g2sd_hf.data

    from .conftest import NORMALIZATION, SHAPES_STUDENT, run_arguments, tiny_mae_teacher

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    data = tmp_path / "data"  # a new folder: no data pass of another test cached by `datasets`
    shutil.copytree(shapes_folder, data)
    decoded = []
    decode = g2sd_hf.data.open_rgb_image
    monkeypatch.setattr(g2sd_hf.data, "open_rgb_image", lambda image: decoded.append(image) or decode(image))
    if script == "run_generic":
        tiny_mae_teacher().save_pretrained(tmp_path / "mae")
        ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION).save_pretrained(tmp_path / "mae")
        teacher, mismatch, message = tmp_path / "mae", "patch_size=4", "Student and teacher see different patch grids"
        extra = {"target_layer": 2}  # the tiny MAE's decoder has 3 layers
    else:
        teacher, mismatch, message = shapes_teacher[0], "image_size=64", r"Student image_size \(64, 64\) differs"
        extra = {}
    arguments = run_arguments(
        data,
        tmp_path / "out",
        epochs=1,
        teacher_name_or_path=teacher,
        config_overrides=f"{SHAPES_STUDENT},{mismatch}",
        **extra,
    )
    with pytest.raises(ValueError, match=message):
        importlib.import_module(script).main(arguments)
    assert decoded == []
    # The check is not vacuous: the same run with a matching student decodes the images.
    arguments = [argument for argument in arguments if not argument.startswith("--config_overrides")]
    importlib.import_module(script).main(
        arguments + [f"--config_overrides={SHAPES_STUDENT}", "--max_steps=1", "--overwrite_output_dir=true"]
    )
    assert len(decoded) >= 192 + 96  # the data pass


def test_the_files_left_out_are_counted_listed_and_named_on_the_card(shapes_folder, tmp_path):
    """Issue 19: input that is dropped is counted and said, in the run's summary and on the card."""
    import shutil
    import sys
    from pathlib import Path

    from .conftest import SHAPES_STUDENT, run_arguments

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import run_specific

    data = tmp_path / "data"
    shutil.copytree(shapes_folder, data)
    (data / "train" / ".cache").mkdir()
    (data / "train" / "ring" / "notes.txt").write_text("ring 3 is faint")
    (data / "train" / "cross" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    metrics = run_specific.main(
        run_arguments(
            data,
            tmp_path / "out",
            epochs=1,
            distillation_type="none",
            config_overrides=f"image_size=32,patch_size=8,{SHAPES_STUDENT}",
        )
    )
    left_out = json.loads((tmp_path / "out" / "left_out.json").read_text())
    assert {Path(path).name: reason.split(":")[0] for path, reason in left_out.items()} == {
        ".cache": "hidden (its name starts with '.')",
        "notes.txt": "not an image file",
        "broken.png": f"Cannot read image {data / 'train' / 'cross' / 'broken.png'}",
    }
    recorded = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert recorded["left_out_files"] == metrics["left_out_files"] == 3 and recorded["skipped_train_images"] == 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "files left out" in card and "3 (each with the reason in left_out.json)" in card and "notes.txt" in card


def test_one_record_says_what_the_package_wrote_for_staged_and_claimed_folders(tmp_path):
    """Issue 22: the demo's stage folders and `staged_folder` keep one record of what the package wrote."""
    from g2sd_hf.output_folders import (
        WRITTEN_FILES,
        check_output_folder,
        claim_folder,
        is_claimed_folder,
        remove_claimed_folder,
        staged_folder,
    )

    stage = claim_folder(tmp_path / "stages" / "generic_seed0")
    (stage / "model.safetensors").write_bytes(b"weights")  # what a script writes into it as it runs
    assert is_claimed_folder(stage) and (stage / WRITTEN_FILES).is_file()
    check_output_folder(stage)  # every file of a claimed folder is the package's
    remove_claimed_folder(stage)
    assert not stage.exists()

    with staged_folder(tmp_path / "export") as staging:
        (staging / "config.json").write_text("{}")
    assert not is_claimed_folder(tmp_path / "export")  # a staged folder records its files, not the whole folder
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for folder in (tmp_path / "export", theirs):
        with pytest.raises(FileExistsError, match="was not written by this package"):
            remove_claimed_folder(folder)
    assert (theirs / "notes.txt").read_text() == "mine" and (tmp_path / "export" / "config.json").exists()
    with pytest.raises(FileExistsError):
        claim_folder(theirs)  # an existing folder is never claimed
