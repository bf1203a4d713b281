"""The training-script layer: what the example scripts (`examples/run_*.py`) share, under one name.

- `arguments`: the scripts' argument dataclasses (data, augmentation, dense models) and the data's preparation
  (`load_splits` reads the tables, `check_splits` decodes every image once, `prepare_splits` does both; `DataReport`).
- `run`: parsing (command line, JSON/YAML, recipes), logging, the output folder (one run at a time, resumed only with
  the same arguments), `train_and_evaluate`, `finish_training_run` (model card, push).
- `stages`: multi-stage runs (the demos), each stage one script run in its own folder, reused when finished.

The library's models, teachers, losses and trainers do not depend on this layer; the command-line converters
(`python -m g2sd_hf.convert`, `g2sd_hf.export`) use its `parse_overrides`.
"""

from .arguments import (
    ClassificationAugmentationArguments,
    DataArguments,
    DataReport,
    DenseDataArguments,
    DenseModelArguments,
    MaskedImageAugmentationArguments,
    check_splits,
    dense_backbone_config,
    load_splits,
    prepare_splits,
)
from .run import (
    checkpoint_to_resume,
    finish_training_run,
    parse_arguments,
    parse_overrides,
    setup_logging,
    train_and_evaluate,
)
from .stages import run_stage, start_demo


__all__ = [
    "ClassificationAugmentationArguments",
    "DataArguments",
    "DataReport",
    "DenseDataArguments",
    "DenseModelArguments",
    "MaskedImageAugmentationArguments",
    "check_splits",
    "checkpoint_to_resume",
    "dense_backbone_config",
    "finish_training_run",
    "load_splits",
    "parse_arguments",
    "parse_overrides",
    "prepare_splits",
    "run_stage",
    "setup_logging",
    "start_demo",
    "train_and_evaluate",
]
