"""Deprecated: the example scripts' run helpers live in `g2sd_hf.scripts.run` now."""

from ._deprecation import moved_names


__all__ = [
    "FINISHED_RUN_FILES",
    "NON_RESULT_ARGUMENTS",
    "RUN_ARGUMENTS",
    "RUN_LOCK",
    "checkpoint_to_resume",
    "claim_output_dir",
    "config_keys",
    "parse_arguments",
    "parse_overrides",
    "release_output_dir",
    "run_arguments",
    "setup_logging",
    "train_and_evaluate",
]
__getattr__ = moved_names(__name__, dict.fromkeys(__all__, "g2sd_hf.scripts.run"))
