"""Deprecated: the example scripts' run helpers live in `g2sd_hf.scripts.run` now."""

from ._deprecation import moved_names


__getattr__ = moved_names(
    __name__,
    {
        name: "g2sd_hf.scripts.run"
        for name in (
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
        )
    },
)
