"""What the example scripts share: argument parsing (command line, JSON or YAML, named recipes), logging, checkpoints to
resume."""

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import datasets
import transformers
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .recipes import DEFAULT_RECIPE, recipe_defaults


logger = logging.getLogger(__name__)


def parse_arguments(dataclass_types: Sequence[type], args: Sequence[str] | None = None) -> tuple:
    """Parse dataclasses from the command line, or from a single `.json` / `.yaml` file given as the only argument.

    `--recipe NAME` (a field of the training arguments) first sets the defaults of the named recipe
    (`g2sd_hf.recipes`); flags given explicitly override them.
    """
    parser = HfArgumentParser(dataclass_types)
    field_names = [field.name for dataclass_type in dataclass_types for field in dataclasses.fields(dataclass_type)]
    args = list(sys.argv[1:] if args is None else args)
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        text = Path(args[0]).read_text()
        values = json.loads(text) if args[0].endswith(".json") else yaml.safe_load(text)
        defaults = recipe_defaults(values.get("recipe", DEFAULT_RECIPE), field_names)
        return parser.parse_dict({**defaults, **values})
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--recipe", default=DEFAULT_RECIPE)
    recipe = peek.parse_known_args(args)[0].recipe
    parser.set_defaults(**recipe_defaults(recipe, field_names))
    return parser.parse_args_into_dataclasses(args=args)


def setup_logging(training_args: TrainingArguments) -> None:
    """transformers-style logging: INFO on the main process, warnings elsewhere; the same level for datasets."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    for name in ("g2sd_hf", "__main__"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank {training_args.process_index}, device {training_args.device}, n_gpu {training_args.n_gpu}, "
        f"distributed {training_args.parallel_mode.value == 'distributed'}, bf16 {training_args.bf16}, fp16 {training_args.fp16}"
    )


def checkpoint_to_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint` if given, else the last checkpoint in `output_dir` (a rerun continues the run)."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if training_args.do_train and os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info(f"Checkpoint found in {training_args.output_dir}: resuming from {last}.")
        return last
    return None


def train_and_evaluate(trainer, resume_from_checkpoint: str | None = None, extra_train_metrics: dict | None = None) -> dict:
    """`--do_train`: train, save the model (and processor), metrics and state; `--do_eval`: evaluate. Returns all
    metrics, and under `learning_warnings` what the trainer's learning checks found (also written to
    `learning_warnings.json` when not empty)."""
    args, metrics = trainer.args, {}
    if args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        trainer.save_model()
        train_metrics = {**result.metrics, **(extra_train_metrics or {}), "train_samples": len(trainer.train_dataset)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
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


def parse_overrides(overrides: str | None) -> dict:
    """`"hidden_size=96,num_hidden_layers=6,qkv_bias=false"` -> `{"hidden_size": 96, ...}` (ints, floats, booleans)."""
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


__all__ = ["checkpoint_to_resume", "parse_arguments", "parse_overrides", "setup_logging", "train_and_evaluate"]
