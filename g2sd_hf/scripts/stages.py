"""Multi-stage runs (the demos): a command line shared by the demos, and stages that each run one example script in
its own folder and are reused when they finished with the same arguments."""

import argparse
import json
import logging
import shutil
import time
from pathlib import Path


logger = logging.getLogger(__name__)

STAGE_MARKER = "g2sd_demo_stage.json"  # written into every stage folder the demo makes


STARTED_MARKER = "g2sd_demo_stage_started"


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
    if marker.exists():
        record = json.loads(marker.read_text())
        if record["arguments"] == arguments:
            logger.warning(f"[{name}] {position}reusing the finished stage in {folder}")
            return {**record, "reused": True}
    if folder.exists():
        if not (marker.exists() or (folder / STARTED_MARKER).exists()):
            raise FileExistsError(
                f"{folder} exists and was not written by the demo: move it away, or choose another --output_dir."
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / STARTED_MARKER).touch()
    logger.warning(f"[{name}] {position}{module.__name__}.py {' '.join(arguments)}")
    start = time.perf_counter()
    metrics = module.main(arguments)
    record = {"arguments": arguments, "seconds": time.perf_counter() - start, "metrics": metrics}
    marker.write_text(json.dumps(record, indent=2))
    return {**record, "reused": False}


__all__ = ["STAGE_MARKER", "STARTED_MARKER", "run_stage", "start_demo"]
