"""Multi-stage runs (the demos): a command line shared by the demos, and stages that each run one example script in
its own folder and are reused when they finished with the same arguments.

What the terminal shows: a line per stage (k of n, its name, what it trains, and the time the stages left should
take, from those already run), the Trainer's progress bar while it trains (in a terminal only: in a log file a bar
writes a line per update), and a line with its results. Each stage's whole log (the script's arguments, the
libraries' INFO lines, the Trainer's log dicts, warnings, a traceback) goes to `<stage folder>/train.log`, whose path
is printed when the stage fails.
"""

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import transformers.trainer
from transformers.trainer_callback import ProgressCallback

from ..output_folders import claim_folder, is_claimed_folder, remove_claimed_folder
from .run import logging_to_file


logger = logging.getLogger(__name__)

STAGE_MARKER = "g2sd_demo_stage.json"  # a finished stage's record: its arguments, time and metrics (reuse)
STAGE_LOG = "train.log"  # everything the stage's script logged or printed
# The metrics a stage's result line shows, when the stage has them.
SUMMARY_METRICS = {
    "eval_balanced_accuracy": "balanced accuracy",
    "eval_accuracy": "accuracy",
    "eval_mean_iou": "mean IoU",
    "eval_map": "box AP",
    "eval_loss": "eval loss",
    "train_loss": "train loss",
}
# How much expected stage time the measured run's speed counts for in the time-left estimate (`StageClock`).
SPEED_PRIOR_SECONDS = 60.0


def start_demo(
    description: str, default_output_dir: str, scales, args: list[str] | None, default: str | None = None
) -> tuple[argparse.Namespace, Path, Path]:
    """The demos' command line (`--output_dir`, `--scale`, `--seed`, `--rebuild_teacher`) and logging; returns the
    options, the output folder and its `stages/` folder (created)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=default_output_dir)
    parser.add_argument("--scale", choices=sorted(scales), default=default or next(iter(scales)))
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of single-seed demos (the ELPV demo runs its scale's seeds)."
    )
    parser.add_argument(
        "--rebuild_teacher",
        action="store_true",
        help="Pre-train and fine-tune the teachers again instead of using the ones shipped with the demo.",
    )
    parser.add_argument(
        "--write_assets",
        action="store_true",
        help="With --rebuild_teacher at the cpu scale: write the new teachers into examples/assets.",
    )
    options = parser.parse_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    output_dir = Path(options.output_dir).resolve()
    (output_dir / "stages").mkdir(parents=True, exist_ok=True)
    return options, output_dir, output_dir / "stages"


def run_stage(name: str, module, arguments: list[str], folder: Path, position: str = "", about: str = "") -> dict:
    """Run a stage's script unless the same stage already finished in `folder`; return its timing and metrics.

    Prints one line when it starts (`position`: "[k/n, about m min left] ", and `about`: what it trains) and one
    with its results when it ends; the script's own log goes to `folder / STAGE_LOG`. A folder is only ever replaced
    when the demo made it (it holds the demo's marker); anything else in the way is refused, so that nothing the demo
    did not write is deleted.
    """
    marker = folder / STAGE_MARKER
    heading = f"{position}{name}" + (f" ({about})" if about else "")
    if marker.exists() and is_claimed_folder(folder):
        record = json.loads(marker.read_text())
        if record["arguments"] == arguments:
            print(f"{heading}: reused, finished earlier in {folder}", flush=True)
            print(f"    {stage_summary(record['metrics'], record['seconds'])}", flush=True)
            return {**record, "reused": True}
    if folder.exists():
        if not is_claimed_folder(folder):
            raise FileExistsError(
                f"{folder} exists and was not written by the demo: move it away, or choose another --output_dir."
            )
        remove_claimed_folder(folder)
    claim_folder(folder)  # the package's one record of what it wrote (output_folders), as for staged folders
    print(heading, flush=True)
    log = folder / STAGE_LOG
    start = time.perf_counter()
    # The progress bar is display only: the stage's record (what decides reuse) keeps the arguments as given.
    display = ["--disable_tqdm", "false"] if sys.stderr.isatty() else []
    try:
        with logging_to_file(log), clearing_progress_bars():
            logger.warning(f"[{name}] {module.__name__}.py {' '.join(arguments)}")
            metrics = module.main(arguments + display)
    except BaseException as error:
        print(f"    FAILED after {format_seconds(time.perf_counter() - start)}: {error!r}", flush=True)
        if log.exists():
            print(f"    The stage's whole log: {log}", flush=True)
        raise
    record = {"arguments": arguments, "seconds": time.perf_counter() - start, "metrics": metrics}
    marker.write_text(json.dumps(record, indent=2))
    print(f"    {stage_summary(metrics, record['seconds'])}", flush=True)
    return {**record, "reused": False}


class StageProgressCallback(ProgressCallback):
    """The Trainer's progress bars, cleared when they end: a finished stage leaves its two lines in the terminal (what
    it trains, its results), not its bars."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.leave = False  # tqdm reads it when the bar closes

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if self.prediction_bar is not None:
            self.prediction_bar.leave = False


@contextlib.contextmanager
def clearing_progress_bars():
    """Trainers made inside the block show `StageProgressCallback`'s bars: transformers picks the progress callback of
    a Trainer from `transformers.trainer.DEFAULT_PROGRESS_CALLBACK` (notebooks get theirs the same way)."""
    default = transformers.trainer.DEFAULT_PROGRESS_CALLBACK
    transformers.trainer.DEFAULT_PROGRESS_CALLBACK = StageProgressCallback
    try:
        yield
    finally:
        transformers.trainer.DEFAULT_PROGRESS_CALLBACK = default


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def stage_summary(metrics: dict, seconds: float) -> str:
    """A finished stage's results in one line: its time, the metrics of `SUMMARY_METRICS` it has, and the first
    sentence of its first learning warning, loudly (the whole warnings are in its log, learning_warnings.json and
    model card).

    ```python
    >>> stage_summary({"train_loss": 0.14271, "eval_loss": 0.1060, "epoch": 5.0}, 62.0)
    'done in 62 s: eval loss 0.106, train loss 0.1427'
    >>> stage_summary({"eval_balanced_accuracy": 0.5, "learning_warnings": ["At chance: 0.500. Train longer."]}, 95.0)
    'done in 1.6 min: balanced accuracy 0.5 -- LEARNING WARNING: At chance: 0.500 (learning_warnings.json)'
    ```
    """
    shown = [f"{label} {metrics[key]:.4g}" for key, label in SUMMARY_METRICS.items() if key in metrics]
    line = f"done in {format_seconds(seconds)}" + (f": {', '.join(shown)}" if shown else "")
    warnings = metrics.get("learning_warnings") or []
    if warnings:
        more = f", +{len(warnings) - 1} more" if len(warnings) > 1 else ""
        line += f" -- LEARNING WARNING: {warnings[0].split('. ')[0].rstrip('.')} (learning_warnings.json{more})"
    return line


class StageClock:
    """Stage `k` of `n` and the time the stages left should take. A stage whose kind (its name up to `_seed`:
    `g2sd_seed1` is of kind `g2sd`) has run is estimated by the mean of its kind. Other kinds: by `expected_seconds`
    (what each kind took in a measured run of the same scale), scaled by how fast this machine ran the stages
    finished so far against their expected times; without expectations, by the mean stage. `tail_seconds`, scaled the
    same way, is the work after the last stage (evaluation, analysis).

    The speed is shrunk toward 1 (the measured run's) by `prior_seconds` of expected time: one short first stage, which
    also pays for the process's first imports and caches, does not decide the whole estimate alone (a first stage
    twice as slow as measured, 50 s for 25, meant a 1.25x slower run in the demo of 2026-12-03).

    Example:

    ```python
    >>> clock = StageClock(["generic_seed0", "g2sd_seed0", "generic_seed1", "g2sd_seed1"])
    >>> clock.finished("generic_seed0", 120.0)
    >>> clock.position("g2sd_seed0")
    '[2/4, about 6 min left] '
    >>> measured = StageClock(["generic_seed0", "g2sd_seed0"], {"generic": 60.0, "g2sd": 30.0}, tail_seconds=30.0)
    >>> measured.finished("generic_seed0", 120.0)  # this machine runs at half the measured speed
    >>> measured.seconds_left("g2sd_seed0")
    120.0
    ```
    """

    def __init__(
        self,
        names: Sequence[str],
        expected_seconds: dict[str, float] | None = None,
        tail_seconds: float = 0.0,
        prior_seconds: float = 0.0,
    ):
        self.names = list(names)
        self.expected = dict(expected_seconds or {})
        self.tail_seconds = tail_seconds
        self.prior_seconds = prior_seconds
        self.seconds: dict[str, list[float]] = {}

    @staticmethod
    def kind(name: str) -> str:
        return name.split("_seed")[0]

    def finished(self, name: str, seconds: float) -> None:
        self.seconds.setdefault(self.kind(name), []).append(seconds)

    def _speed(self) -> float:
        """Seconds taken here per expected second, over the finished stages of expected kinds, shrunk toward 1 by
        `prior_seconds` (1 before any)."""
        taken = expected = self.prior_seconds
        for kind, values in self.seconds.items():
            if kind in self.expected:
                taken += sum(values)
                expected += self.expected[kind] * len(values)
        return taken / expected if expected else 1.0

    def seconds_left(self, name: str) -> float | None:
        """The estimate for `name`, the stages after it and the tail; `None` when nothing says anything yet."""
        if not self.seconds and not self.expected:
            return None
        means = {kind: sum(values) / len(values) for kind, values in self.seconds.items()}
        speed = self._speed()
        overall = sum(means.values()) / len(means) if means else 0.0

        def estimate(kind: str) -> float:
            if kind in means:
                return means[kind]
            return self.expected[kind] * speed if kind in self.expected else overall

        left = sum(estimate(self.kind(other)) for other in self.names[self.names.index(name) :])
        return left + self.tail_seconds * speed

    def position(self, name: str) -> str:
        left = self.seconds_left(name)
        estimate = "" if left is None else f", about {max(1, round(left / 60))} min left"
        width = len(str(len(self.names)))
        return f"[{self.names.index(name) + 1:>{width}}/{len(self.names)}{estimate}] "


def run_stages(
    planned: dict[str, tuple],
    stages: Path,
    expected_seconds: dict[str, float] | None = None,
    tail_seconds: float = 0.0,
    about: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Run `planned` stages (`name -> (script module, arguments)`) in order, each in `stages / name`, saying the stage
    number, what it trains (`about`, by kind: `StageClock.kind`) and the time left (`StageClock`, with the measured
    `expected_seconds` by kind and `tail_seconds` when given); returns each stage's record (`run_stage`), with when it
    started (`started_after_seconds`, from the first stage's start) and the time left the clock announced then
    (`estimated_seconds_left`), to check the estimate."""
    clock = StageClock(list(planned), expected_seconds, tail_seconds, prior_seconds=SPEED_PRIOR_SECONDS)
    records, start = {}, time.perf_counter()
    for name, (module, arguments) in planned.items():
        announced = {
            "started_after_seconds": time.perf_counter() - start,
            "estimated_seconds_left": clock.seconds_left(name),
        }
        records[name] = {
            **run_stage(
                name,
                module,
                arguments,
                stages / name,
                position=clock.position(name),
                about=(about or {}).get(clock.kind(name), ""),
            ),
            **announced,
        }
        # A reused stage took no time now, but its recorded time is the best guess for the stages of its kind.
        clock.finished(name, records[name]["seconds"])
    return records


__all__ = [
    "STAGE_LOG",
    "STAGE_MARKER",
    "StageClock",
    "StageProgressCallback",
    "clearing_progress_bars",
    "format_seconds",
    "run_stage",
    "run_stages",
    "stage_summary",
    "start_demo",
]
