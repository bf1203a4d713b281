"""The run of an example script: argument parsing (command line, JSON or YAML, named recipes), logging, the output
folder (one run at a time, resumed only with the same arguments), train + evaluate + save, and the model card."""

import argparse
import atexit
import contextlib
import dataclasses
import difflib
import inspect
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import huggingface_hub
import transformers
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..checkpoints import checkpoint_problem, last_complete_checkpoint
from ..recipes import DEFAULT_RECIPE, recipe_defaults


logger = logging.getLogger(__name__)


def parse_arguments(dataclass_types: Sequence[type], args: Sequence[str] | None = None) -> tuple:
    """Parse dataclasses from the command line, or from a single `.json` / `.yaml` file given as the only argument.

    `--recipe NAME` (a field of the training arguments) first sets the defaults of the named recipe
    (`g2sd_hf.recipes`, for the stage named by the last dataclass, the training arguments); flags given explicitly
    override them.
    """
    parser = HfArgumentParser(dataclass_types)
    field_names = [field.name for dataclass_type in dataclass_types for field in dataclasses.fields(dataclass_type)]
    stage = dataclass_types[-1].__name__  # the training arguments: a recipe's values can differ by stage
    args = list(sys.argv[1:] if args is None else args)
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        text = Path(args[0]).read_text()
        values = json.loads(text) if args[0].endswith(".json") else yaml.safe_load(text)
        defaults = recipe_defaults(values.get("recipe", DEFAULT_RECIPE), field_names, stage)
        return parser.parse_dict({**defaults, **values})
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--recipe", default=DEFAULT_RECIPE)
    recipe = peek.parse_known_args(args)[0].recipe
    parser.set_defaults(**recipe_defaults(recipe, field_names, stage))
    return parser.parse_args_into_dataclasses(args=args)


LOG_FORMAT = logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S")
# True while a `logging_to_file` block runs (the demos' stages): `setup_logging` then adds no terminal handler.
_inside_logging_to_file = False


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger | None = None) -> None:
    """transformers-style logging: INFO on the main process, warnings elsewhere; the same level for datasets, the
    package and the script's own logger (`script_logger`: its name is `__main__` only when run as a script). Inside
    `logging_to_file`, into its file rather than the terminal."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LOG_FORMAT)
    logging.basicConfig(handlers=[handler])  # nothing when the root logger has a handler already
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    for logger_ in (logging.getLogger("g2sd_hf"), logging.getLogger("__main__"), script_logger):
        if logger_ is not None:
            logger_.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    if not _inside_logging_to_file:
        transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank {training_args.process_index}, device {training_args.device}, n_gpu {training_args.n_gpu}, "
        f"distributed {training_args.parallel_mode.value == 'distributed'}, bf16 {training_args.bf16}, fp16 {training_args.fp16}"
    )


RUN_ARGUMENTS = "run_arguments.json"  # the arguments a script started its run in output_dir with
# Arguments that do not change what a run computes: a rerun may change them and still resume.
NON_RESULT_ARGUMENTS = frozenset(
    {
        "output_dir",
        "logging_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "run_name",
        "report_to",
        "disable_tqdm",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_only_model",
        "eval_strategy",
        "eval_steps",
        "do_eval",
        "do_predict",
        "per_device_eval_batch_size",
        "dataloader_num_workers",
        "dataloader_persistent_workers",
        "dataloader_pin_memory",
        "dataloader_prefetch_factor",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "hub_strategy",
        "hub_private_repo",
        "local_rank",
        "ddp_timeout",
    }
)
FINISHED_RUN_FILES = ("model.safetensors", "pytorch_model.bin", "all_results.json")


def run_arguments(training_args: TrainingArguments, *argument_groups) -> dict:
    """The arguments that decide what a run computes, as JSON values (the record `checkpoint_to_resume` compares),
    with what the launch decides: the number of processes, the global batch and the peak learning rate (resuming
    with another number of processes would change the batch, the steps and the learning-rate curve)."""
    global_batch = (
        training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
    )
    scaled = getattr(training_args, "scale_lr_with_batch_size", False)
    values = {
        **training_args.to_dict(),
        "num_processes": training_args.world_size,
        "global_batch_size": global_batch,
        "peak_learning_rate": training_args.learning_rate * (global_batch / 256 if scaled else 1),
    }
    for group in argument_groups:
        values.update(dataclasses.asdict(group))
    values = json.loads(json.dumps(values, default=str))
    return {key: value for key, value in sorted(values.items()) if key not in NON_RESULT_ARGUMENTS}


def _differences(saved: dict, current: dict) -> str:
    keys = sorted(
        key for key in saved.keys() | current.keys() if saved.get(key, "<unset>") != current.get(key, "<unset>")
    )
    shown = "; ".join(
        f"{key}: {saved.get(key, '<unset>')!r} then, {current.get(key, '<unset>')!r} now" for key in keys[:6]
    )
    return shown + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")


RUN_LOCK = "_g2sd_run.lock"  # held by the main process writing an output_dir ("_*" files are not pushed to the Hub)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_output_dir(training_args: TrainingArguments) -> None:
    """Make the main process the only writer of `output_dir` while it runs (`_g2sd_run.lock`, removed at exit).

    A second main process on the same folder is refused: two runs would overwrite each other's checkpoints and
    model. It is what `accelerate launch --multi_gpu --num_processes 2` does on a machine without GPUs unless
    `ACCELERATE_USE_CPU=true` is set: two independent processes, each of rank 0. A lock left by a process that no
    longer runs is taken over.
    """
    if training_args.process_index != 0:
        return
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / RUN_LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "world_size": training_args.world_size}
    for _ in range(3):
        if _create_with_content(lock, json.dumps(me)):
            break
        holder = _read_lock(lock)
        if holder.get("pid") == me["pid"]:
            return  # this process claimed it already (a script run twice in one process, as the tests do)
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and _alive(holder["pid"]):
            raise RuntimeError(
                f"Another run (process {holder['pid']}, {holder.get('world_size')} process(es)) is writing "
                f"{output_dir} as its main process. Two main processes on one folder overwrite each other's "
                "checkpoints: wait for it, use another --output_dir, or, if both were started by one `accelerate "
                "launch --multi_gpu` on a machine without GPUs, set ACCELERATE_USE_CPU=true so that they form one "
                "distributed run (see docs/distributed.md)."
            )
        if holder.get("host") not in (None, me["host"]):
            logger.warning(f"{lock} was left by a run on {holder['host']}; taking it over.")
        lock.unlink(missing_ok=True)  # left by a run that no longer runs
    else:
        raise RuntimeError(f"Could not claim {output_dir}: {lock} keeps reappearing. Is another run starting there?")

    atexit.register(release_output_dir, training_args)


def _create_with_content(path: Path, content: str) -> bool:
    """Create `path` holding `content` in one step (False if it exists): a reader never sees it empty."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(content)
    try:
        os.link(staging, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: create, then write
        try:
            with open(path, "x") as handle:
                handle.write(content)
            return True
        except FileExistsError:
            return False
    finally:
        staging.unlink(missing_ok=True)


def _read_lock(path: Path, attempts: int = 20) -> dict:
    """The lock's content; `{}` when it stays unreadable (a lock being written is retried for about a second)."""
    for _ in range(attempts):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


PROCESSOR_FILE = "preprocessor_config.json"


def checkpoint_normalization(name_or_path: str, **load) -> tuple[list[float], list[float]] | None:
    """The pixel normalization (`image_mean`, `image_std`) of a checkpoint's image processor; `None` when it has none,
    for the caller to fall back with a warning that says to what.

    Raises:
        ValueError: naming the file, when the checkpoint has a processor file that cannot be read (a damaged file is
            never taken for a missing one: the model would be trained or served with another normalization).
    """
    from transformers import AutoImageProcessor

    local = Path(name_or_path)
    if local.is_dir() and not (local / PROCESSOR_FILE).is_file():
        return None
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, **load)
    except (OSError, ValueError) as error:
        if local.is_dir():
            raise ValueError(
                f"{local / PROCESSOR_FILE} cannot be read ({error}). Repair or remove it (without it, the normalization "
                "falls back with a warning saying to what)."
            ) from error
        return None  # a Hub checkpoint without a processor
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError(f"The image processor of {name_or_path} has no image_mean / image_std: add them to it.")
    return list(mean), list(std)


def release_output_dir(training_args: TrainingArguments) -> None:
    """Remove this process's claim on `output_dir` (at the end of `train_and_evaluate`, or at exit)."""
    lock = Path(training_args.output_dir) / RUN_LOCK
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


EARLIER_RUN_PREFIX = "_earlier_run_"  # "_*" folders are not pushed to the Hub


def _move_earlier_checkpoints(output_dir: Path) -> Path:
    """Move an earlier run's `checkpoint-N` folders into `output_dir/_earlier_run_<k>/` (the first free `k`): the new
    run's checkpoint rotation and automatic resume only ever see its own checkpoints, and nothing is deleted."""
    index = 1
    while (output_dir / f"{EARLIER_RUN_PREFIX}{index}").exists():
        index += 1
    target = output_dir / f"{EARLIER_RUN_PREFIX}{index}"
    target.mkdir()
    for folder in sorted(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        if folder.is_dir():
            folder.rename(target / folder.name)
    return target


@contextlib.contextmanager
def logging_to_file(path: Path) -> Iterator[None]:
    """What a run logs or prints from Python inside the block goes to the file `path` (appended), not to the
    terminal: every logger (the root's handlers, and those of libraries with handlers of their own: transformers,
    datasets, torch, huggingface_hub), warnings (each shown again, not once per process), and standard output (the
    Trainer's log lines). Standard error keeps the Trainer's progress bars (`--disable_tqdm false`); transformers' and
    datasets' other bars (checkpoint shards, dataset maps) are off. Native libraries writing to the terminal
    themselves (onnxruntime's C++ log) are not redirected. An exception, `KeyboardInterrupt` and `SystemExit` included,
    is written into the file with its traceback, then raised. Loggers, levels, warnings and bars are as before after
    the block (a hub bar group disabled alone comes back as all hub bars on or off). The demos run each stage inside
    it (`stages/<name>/train.log`)."""
    global _inside_logging_to_file
    if _inside_logging_to_file:
        raise RuntimeError("logging_to_file blocks do not nest: one file receives the run's log.")
    transformers.utils.logging.get_logger()  # configures transformers' library logger first, to restore it as is
    with contextlib.ExitStack() as restore:
        stream = restore.enter_context(open(path, "a", encoding="utf-8", buffering=1))
        handler = logging.StreamHandler(stream)
        handler.setFormatter(LOG_FORMAT)
        library_handler = logging.StreamHandler(stream)  # transformers' explicit format goes on this one
        library_handler.setFormatter(LOG_FORMAT)
        restore.callback(handler.close)
        restore.callback(library_handler.close)

        loggers = [logging.getLogger()] + [
            candidate
            for candidate in logging.Logger.manager.loggerDict.values()
            if isinstance(candidate, logging.Logger)
        ]
        saved = [(logger_, logger_.handlers[:], logger_.level, logger_.propagate) for logger_ in loggers]

        def restore_loggers():
            for logger_, handlers, level, propagate in saved:
                logger_.handlers, logger_.propagate = handlers, propagate
                logger_.setLevel(level)

        restore.callback(restore_loggers)

        def to_terminal(item: logging.Handler) -> bool:  # torch's stderr handler is not a StreamHandler
            return getattr(item, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)

        for logger_, handlers, _, _ in saved:
            if logger_ is loggers[0]:
                logger_.handlers = [handler]
            elif logger_.name in ("transformers", "datasets"):  # their handlers print to the terminal
                logger_.handlers, logger_.propagate = [library_handler], False
            elif any(to_terminal(item) for item in handlers):
                # A library that prints by itself (torch, huggingface_hub): into the file, once (not again through
                # the root); its other handlers (torch's trace files) stay.
                logger_.handlers = [handler if to_terminal(item) else item for item in handlers]
                logger_.propagate = False

        # catch_warnings restores the filters and showwarning after, and resets "shown once" (a later stage's log has
        # the warnings an earlier stage already showed).
        restore.enter_context(warnings.catch_warnings())
        warnings.showwarning = _log_warning

        bars = (
            transformers.utils.logging.is_progress_bar_enabled(),
            huggingface_hub.utils.are_progress_bars_disabled(),
            datasets.is_progress_bar_enabled(),
        )

        def restore_bars():
            transformers_bars, hub_disabled, datasets_bars = bars
            if transformers_bars:
                transformers.utils.logging.enable_progress_bar()
            if hub_disabled:  # transformers' switch also turns the hub's bars on
                huggingface_hub.utils.disable_progress_bars()
            if datasets_bars:
                datasets.enable_progress_bars()

        restore.callback(restore_bars)
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()

        _inside_logging_to_file = True
        restore.callback(globals().__setitem__, "_inside_logging_to_file", False)
        restore.enter_context(contextlib.redirect_stdout(stream))
        try:
            yield
        except BaseException:
            logger.exception(f"The run stopped: {path}")
            raise


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` inside `logging_to_file`: into the log, as `logging.captureWarnings` does."""
    logging.getLogger("py.warnings").warning(
        warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    )


def checkpoint_to_resume(training_args: TrainingArguments, *argument_groups) -> str | None:
    """The checkpoint a training run starts from, after checking that `output_dir` holds nothing of another run.

    `--resume_from_checkpoint` is used as given. Otherwise a rerun into an `output_dir` that holds checkpoints resumes
    the last one only when that run was started with the same arguments (`run_arguments.json`, written here, compares
    everything but logging, saving and data-loading settings); a folder with another run's checkpoints or with a
    finished model is refused, with the two ways on: `--resume_from_checkpoint` (continue it anyway) or
    `--overwrite_output_dir` (start a new run there; the earlier run's checkpoints are moved, whole, into
    `_earlier_run_<k>/`, out of reach of the new run's checkpoint rotation and resume; same-named files are replaced;
    nothing is removed).

    Pass every argument dataclass of the script after `training_args`: the model's and the data's arguments count.
    """
    if training_args.do_train:
        claim_output_dir(training_args)
    given = training_args.resume_from_checkpoint
    if isinstance(given, str) and os.path.isdir(given) and (problem := checkpoint_problem(given)) is not None:
        raise ValueError(
            f"--resume_from_checkpoint {given} is not a complete checkpoint: {problem}. Resume from an earlier "
            "checkpoint of the run."
        )
    if isinstance(given, str) and training_args.do_train:
        _check_same_reading(given, run_arguments(training_args, *argument_groups))
    if given is not None or not training_args.do_train:
        return given
    output_dir = Path(training_args.output_dir)
    current = run_arguments(training_args, *argument_groups)
    record = output_dir / RUN_ARGUMENTS
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    finished = [name for name in FINISHED_RUN_FILES if (output_dir / name).exists()]
    resume = None
    if (last is not None or finished) and not getattr(training_args, "overwrite_output_dir", False):
        saved = json.loads(record.read_text()) if record.is_file() else None
        what = f"checkpoints (last: {Path(last).name})" if last else f"a finished run ({', '.join(finished)})"
        ways = (
            "Pass --overwrite_output_dir to start a new run there (same-named files are replaced, nothing else is "
            "removed), --resume_from_checkpoint to continue it anyway, or choose another --output_dir."
        )
        if saved is None:
            raise ValueError(
                f"{output_dir} already holds {what} of a run started without a {RUN_ARGUMENTS} record, "
                f"so it cannot be told apart from another run. {ways}"
            )
        if saved != current:
            raise ValueError(
                f"{output_dir} already holds {what} of a run with other arguments ({_differences(saved, current)}). {ways}"
            )
        if last is None:
            raise ValueError(f"{output_dir} already holds {what} of this same run, finished. {ways}")
        resume, skipped = last_complete_checkpoint(output_dir)
        for name, problem in skipped.items():
            logger.warning(f"Skipping {output_dir / name}, an incomplete checkpoint: {problem}.")
        if resume is None:
            raise ValueError(
                f"{output_dir} holds checkpoints of this same run, none of them complete ({skipped}). {ways}"
            )
        logger.info(f"Checkpoint found in {output_dir} of a run with the same arguments: resuming from {resume}.")
    elif last is not None or finished:
        moved = _move_earlier_checkpoints(output_dir) if training_args.should_save and last is not None else None
        logger.warning(
            f"--overwrite_output_dir: a new run in {output_dir}"
            + (f"; the earlier run's checkpoints are moved, whole, to {moved}" if moved else "")
            + "."
        )
    if training_args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = record.with_name(f".{RUN_ARGUMENTS}.{training_args.process_index}")
        staging.write_text(json.dumps(current, indent=2) + "\n")
        staging.replace(record)  # whole or not at all: another process may be reading it
    return resume


def _check_same_reading(checkpoint: str, current: dict) -> None:
    """Refuse `--resume_from_checkpoint` from a run that read its data the other way (streamed or not): the
    checkpoint's step counts batches of a stream in one, of an epoch-by-epoch pass in the other, so the resumed run
    would continue at images the checkpoint never meant."""
    record = Path(checkpoint).parent / RUN_ARGUMENTS
    if "streaming" not in current or not record.is_file():
        return
    then = json.loads(record.read_text()).get("streaming", False)
    if then != current["streaming"]:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} is a checkpoint of a run with --streaming {str(then).lower()}, "
            f"and this run has --streaming {str(current['streaming']).lower()}: its position in the data would not "
            "mean the same images. Resume with the checkpoint's --streaming, or start a new run (the checkpoint's "
            "weights as the student: --student_name_or_path)."
        )


# What accelerate's distributed types mean, in the words of a user reading the log.
_PARALLELISM = {
    "MULTI_CPU": "data parallel",
    "MULTI_GPU": "data parallel",
    "MULTI_XPU": "data parallel",
    "MULTI_NPU": "data parallel",
    "MULTI_MLU": "data parallel",
    "MULTI_HPU": "data parallel",
    "FSDP": "fully sharded data parallel (FSDP)",
    "DEEPSPEED": "DeepSpeed",
}


def distributed_setup(accelerator) -> str:
    """The run's processes in words: `"single process, no distributed training"`, `"2 processes, data parallel
    (gloo)"` (accelerate's `DistributedType.NO` reads as "no training" otherwise)."""
    import torch.distributed

    kind = accelerator.distributed_type.value
    if kind == "NO" or accelerator.num_processes == 1:
        return "single process, no distributed training"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "no process group"
    return f"{accelerator.num_processes} processes, {_PARALLELISM.get(kind, kind)} ({backend})"


def train_and_evaluate(trainer, resume_from_checkpoint: str | None = None, data_report=None) -> dict:
    """`--do_train`: train, save the model (and processor), metrics and state; `--do_eval`: evaluate. Returns all
    metrics, and under `learning_warnings` what the trainer's learning checks found (also written to
    `learning_warnings.json` when not empty). With `data_report` (`prepare_splits`' `DataReport`), its counts join the
    training metrics and the files it left out are written to `left_out.json` and named on the model card."""
    try:
        return _train_and_evaluate(trainer, resume_from_checkpoint, data_report)
    finally:
        release_output_dir(trainer.args)


def _train_and_evaluate(trainer, resume_from_checkpoint: str | None, data_report) -> dict:
    args, metrics = trainer.args, {}
    # FSDP, DeepSpeed, multi-GPU / multi-CPU data parallelism or none: what accelerate set up for the student.
    distributed_type = trainer.accelerator.distributed_type.value
    logger.info(
        f"Training setup: {distributed_setup(trainer.accelerator)}; this is process rank {args.process_index}."
    )
    for requested, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(flag, "false").lower() == "true" and distributed_type != requested:
            # accelerate falls back without a word: on CPUs, an FSDP config runs plain data parallelism.
            logger.warning(
                f"The accelerate config asks for {requested}, but accelerate runs {distributed_type} training here "
                f"({requested} needs GPUs): the student is replicated on every process, not sharded."
            )
    data_metrics = data_report.metrics() if data_report is not None else {}
    if data_report is not None:
        trainer.left_out_files = dict(data_report.left_out)
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        trainer.save_model()
        train_metrics = {**result.metrics, **data_metrics}
        if hasattr(trainer.train_dataset, "__len__"):  # a stream has no length
            train_metrics["train_samples"] = len(trainer.train_dataset)
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
        if trainer.left_out_files and trainer.is_world_process_zero():
            path = os.path.join(args.output_dir, "left_out.json")
            with open(path, "w") as handle:
                json.dump(trainer.left_out_files, handle, indent=2)
            logger.warning(f"{len(trainer.left_out_files)} file(s) of the data were left out, each named in {path}.")
    if args.do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(trainer.eval_dataset)}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    warnings = getattr(trainer, "learning_warnings", [])
    if warnings and trainer.is_world_process_zero():
        # Also on disk, beside the metrics, for whoever reads the run folder rather than the log.
        with open(os.path.join(args.output_dir, "learning_warnings.json"), "w") as handle:
            json.dump(warnings, handle, indent=2)
    return {**metrics, "learning_warnings": list(warnings)}


def config_keys(config_class: type) -> set[str]:
    """The names a configuration class knows: its constructor's arguments, the attributes of a default instance and
    its settable properties (`num_labels`)."""
    keys = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    settable = {
        name for name in dir(config_class) if getattr(getattr(config_class, name, None), "fset", None) is not None
    }
    return keys | settable | set(config_class().to_dict())


def parse_overrides(overrides: str | None, config_class: type | None = None) -> dict:
    """`"hidden_size=96,num_hidden_layers=6,qkv_bias=false"` -> `{"hidden_size": 96, ...}` (ints, floats, booleans).

    With `config_class`, a name that class does not know is refused, naming the closest known ones (a misspelled
    key would otherwise be stored in config.json and ignored).
    """
    values = _parse_pairs(overrides)
    if config_class is not None:
        known = config_keys(config_class)
        for name in values:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f" Did you mean {' or '.join(close)}?" if close else ""
                raise ValueError(
                    f"Unknown config override {name!r}: {config_class.__name__} has no such setting.{hint}"
                )
    return values


def _parse_pairs(overrides: str | None) -> dict:
    values = {}
    for item in filter(None, (part.strip() for part in (overrides or "").split(","))):
        if "=" not in item:
            raise ValueError(f"Config overrides are `name=value` pairs separated by commas; got {item!r}.")
        name, raw = (part.strip() for part in item.split("=", 1))
        if raw.lower() in ("true", "false"):
            values[name] = raw.lower() == "true"
            continue
        for cast in (int, float):
            try:
                values[name] = cast(raw)
                break
            except ValueError:
                continue
        else:
            values[name] = raw
    return values


def finish_training_run(trainer, teacher_name_or_path: str | None, dataset_name: str) -> None:
    """Write the model card into the output folder and, with `--push_to_hub`, upload the folder."""
    kwargs = {"dataset": dataset_name, "finetuned_from": teacher_name_or_path}
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**kwargs)  # saves the model, writes the card, uploads
    else:
        trainer.create_model_card(**kwargs)
    logger.info(f"Checkpoint, processor and model card in {trainer.args.output_dir}")


__all__ = [
    "RUN_ARGUMENTS",
    "checkpoint_to_resume",
    "claim_output_dir",
    "distributed_setup",
    "finish_training_run",
    "logging_to_file",
    "parse_arguments",
    "parse_overrides",
    "release_output_dir",
    "run_arguments",
    "setup_logging",
    "train_and_evaluate",
]
