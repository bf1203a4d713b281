"""What the package may write and remove: folders written all at once, and the one record of what it wrote.

A folder is built in a staging folder beside its target and moved into place only when complete, so an error never
leaves a half-written checkpoint. The files written are recorded in `.g2sd_hf_written.json`, so that a later rewrite
can tell the package's files from anyone else's: a folder holding only the package's files is replaced; anything else
is refused, or with `overwrite` written into without removing a file the package did not write.

A folder that a script fills as it runs (a demo's stage) cannot be staged: `claim_folder` creates it with the same
record saying that the whole folder is the package's, and `remove_claimed_folder` removes only such a folder.
"""

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


logger = logging.getLogger(__name__)

WRITTEN_FILES = (
    ".g2sd_hf_written.json"  # the files a staged folder was written with (so a rewrite can tell them apart)
)


WHOLE_FOLDER = "*"  # the record's `files` of a folder the package claimed whole (`claim_folder`)


def _written_by_us(folder: Path) -> set[str] | None:
    """The files the package wrote into `folder` (relative paths: those `staged_folder` recorded, or every file of a
    claimed folder), or `None` when it did not write the folder."""
    record = folder / WRITTEN_FILES
    if not record.is_file():
        return None
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return None
    return _files(folder) if files == WHOLE_FOLDER else set(files)


def claim_folder(folder: str | Path) -> Path:
    """Create `folder` (which must not exist) for the package to fill as a script runs, with the record that the whole
    folder is the package's, so that `remove_claimed_folder` may replace it later.

    Example:

    ```python
    >>> stage = claim_folder("demo_output/stages/generic_seed0")
    >>> run_generic.main(["--output_dir", str(stage), ...])
    ```
    """
    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / WRITTEN_FILES).write_text(json.dumps({"files": WHOLE_FOLDER}) + "\n")
    return folder


def is_claimed_folder(folder: str | Path) -> bool:
    """Whether `folder` was created by `claim_folder` (the whole folder is the package's)."""
    record = Path(folder) / WRITTEN_FILES
    try:
        return json.loads(record.read_text())["files"] == WHOLE_FOLDER
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_claimed_folder(folder: str | Path) -> None:
    """Remove a folder `claim_folder` created; anything else is refused, naming it, and left as it is."""
    folder = Path(folder)
    if not is_claimed_folder(folder):
        raise FileExistsError(
            f"{folder} exists and was not written by this package ({WRITTEN_FILES} does not claim it): move it away, "
            "or choose another output folder."
        )
    shutil.rmtree(folder)


def _files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() or path.is_symlink()}


def check_output_folder(output_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output folder whose files `staged_folder` would not be allowed to touch.

    A missing or empty folder, or one this package wrote earlier (holding only the files it wrote then), is fine.
    Anything else holds files someone else put there: refused unless `overwrite`, and even then only the files of
    the same names are replaced, never removed.
    """
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder. Choose another output folder.")
    if overwrite or not output_dir.exists():
        return
    present = _files(output_dir)
    ours = _written_by_us(output_dir)
    foreign = sorted(present - (ours or set()) - {WRITTEN_FILES})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{output_dir} already holds files this package did not write ({shown}). Choose an empty or new output "
            "folder, or pass --overwrite (overwrite=True) to write into it: files of the same names are then replaced "
            "and the others are kept."
        )


@contextmanager
def staged_folder(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder all at once: yield a staging folder beside `output_dir`, which takes `output_dir`'s place only
    when the block succeeds; on an error nothing is left behind and `output_dir` is untouched.

    Nothing the package did not write is ever removed. A previous folder written by `staged_folder` (it records its
    files in `.g2sd_hf_written.json`) is replaced; a folder holding other files is refused (`check_output_folder`)
    unless `overwrite`, which replaces the files of the same names and keeps the rest.

    Example:

    ```python
    >>> with staged_folder("converted") as staging:
    ...     model.save_pretrained(staging)
    ```
    """
    output_dir = Path(output_dir).resolve()
    check_output_folder(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.staging-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private (0700); the written folder gets the usual mode
    try:
        yield staging
        written = sorted(_files(staging))
        (staging / WRITTEN_FILES).write_text(json.dumps({"files": written}, indent=2) + "\n")
        check_output_folder(output_dir, overwrite)  # again: the folder may have changed while the block ran
        if not output_dir.exists():
            staging.rename(output_dir)
        elif _written_by_us(output_dir) is not None and _files(output_dir) <= _written_by_us(output_dir) | {
            WRITTEN_FILES
        }:
            # Only what this package wrote before: swap the folders, then remove the old one (its files are ours).
            previous = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.previous-", dir=output_dir.parent))
            previous.rmdir()
            output_dir.rename(previous)
            staging.rename(output_dir)
            shutil.rmtree(previous)
        else:  # an empty folder (kept: it may be the working directory), or overwrite=True: replace same-named files
            kept = sorted(_files(output_dir) - set(written) - {WRITTEN_FILES})
            for name in [*written, WRITTEN_FILES]:
                target = output_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, target)
            if kept:
                logger.warning(
                    f"Wrote into {output_dir}, which also holds files not written by this package, kept: {kept}"
                )
    finally:
        if staging.exists():
            shutil.rmtree(staging)


__all__ = [
    "WRITTEN_FILES",
    "check_output_folder",
    "claim_folder",
    "is_claimed_folder",
    "remove_claimed_folder",
    "staged_folder",
]
