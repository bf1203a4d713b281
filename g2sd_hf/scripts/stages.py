"""Multi-stage runs (the demos): a command line shared by the demos, and stages that each run one example script in
its own folder and are reused when they finished with the same arguments.

Progress: `run_stages` says which stage runs (k of n) with an estimate of the time the remaining stages take, from the
stages already run; in a terminal each stage also shows the Trainer's progress bar (not in a log file, where a bar
would write a line per update).
"""

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..output_folders import claim_folder, is_claimed_folder, remove_claimed_folder


logger = logging.getLogger(__name__)

STAGE_MARKER = "g2sd_demo_stage.json"  # a finished stage's record: its arguments, time and metrics (reuse)
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


def run_stage(name: str, module, arguments: list[str], folder: Path, position: str = "") -> dict:
    """Run a stage's script unless the same stage already finished in `folder`; return its timing and metrics.

    A folder is only ever replaced when the demo made it (it holds the demo's marker); anything else in the way is
    refused, so that nothing the demo did not write is deleted.
    """
    marker = folder / STAGE_MARKER
    if marker.exists() and is_claimed_folder(folder):
        record = json.loads(marker.read_text())
        if record["arguments"] == arguments:
            logger.warning(f"[{name}] {position}reusing the finished stage in {folder}")
            return {**record, "reused": True}
    if folder.exists():
        if not is_claimed_folder(folder):
            raise FileExistsError(
                f"{folder} exists and was not written by the demo: move it away, or choose another --output_dir."
            )
        remove_claimed_folder(folder)
    claim_folder(folder)  # the package's one record of what it wrote (output_folders), as for staged folders
    logger.warning(f"[{name}] {position}{module.__name__}.py {' '.join(arguments)}")
    start = time.perf_counter()
    # The progress bar is display only: the stage's record (what decides reuse) keeps the arguments as given.
    metrics = module.main(arguments + (["--disable_tqdm", "false"] if sys.stderr.isatty() else []))
    record = {"arguments": arguments, "seconds": time.perf_counter() - start, "metrics": metrics}
    marker.write_text(json.dumps(record, indent=2))
    return {**record, "reused": False}


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
    'stage 2/4, about 6 min left: '
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
        return f"stage {self.names.index(name) + 1}/{len(self.names)}{estimate}: "


def run_stages(
    planned: dict[str, tuple],
    stages: Path,
    expected_seconds: dict[str, float] | None = None,
    tail_seconds: float = 0.0,
) -> dict[str, dict]:
    """Run `planned` stages (`name -> (script module, arguments)`) in order, each in `stages / name`, saying the stage
    number and the time left (`StageClock`, with the measured `expected_seconds` by kind and `tail_seconds` when
    given); returns each stage's record (`run_stage`), with when it started (`started_after_seconds`, from the first
    stage's start) and the time left the clock announced then (`estimated_seconds_left`), to check the estimate."""
    clock = StageClock(list(planned), expected_seconds, tail_seconds, prior_seconds=SPEED_PRIOR_SECONDS)
    records, start = {}, time.perf_counter()
    for name, (module, arguments) in planned.items():
        announced = {
            "started_after_seconds": time.perf_counter() - start,
            "estimated_seconds_left": clock.seconds_left(name),
        }
        records[name] = {
            **run_stage(name, module, arguments, stages / name, position=clock.position(name)),
            **announced,
        }
        # A reused stage took no time now, but its recorded time is the best guess for the stages of its kind.
        clock.finished(name, records[name]["seconds"])
    return records


__all__ = ["STAGE_MARKER", "StageClock", "run_stage", "run_stages", "start_demo"]
