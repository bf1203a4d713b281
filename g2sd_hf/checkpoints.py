"""Saved checkpoints: loading an image classifier without ever using silently random weights, and telling a complete
training checkpoint from one a killed save or a full disk left half-written (`checkpoint_problem`,
`last_complete_checkpoint`).

`from_pretrained` fills whatever a checkpoint lacks with freshly initialized weights and only logs it: an MAE
checkpoint given as a student trains from random blocks, and a generic-distillation checkpoint given to the analysis
or the exporter is scored with a random head. `load_image_classifier` refuses a checkpoint without the encoder's
weights, and refuses a new head (or, when a head is to be trained, says so).
"""

import errno
import json
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from transformers import AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging


logger = logging.get_logger(__name__)

HEAD_PREFIXES = ("classifier.", "distillation_classifier.", "head.", "fc_norm.")


def _is_head(key: str) -> bool:
    """A classification head's weight, or the distillation token a specific-distillation student adds to its encoder."""
    return key.startswith(HEAD_PREFIXES) or key.endswith(".distillation_token")


@contextmanager
def readable_weights(name_or_path: str) -> Iterator[None]:
    """Turn a damaged weights file's `SafetensorError` (which names no file) into an error naming it and the fix."""
    try:
        yield
    except SafetensorError as error:
        files = (
            [name for name in sorted(os.listdir(name_or_path)) if name.endswith(".safetensors")]
            if os.path.isdir(name_or_path)
            else []
        )
        where = ", ".join(os.path.join(name_or_path, name) for name in files) or name_or_path
        raise ValueError(
            f"The weights in {where} cannot be read ({error}): the file is damaged, most often cut short by an "
            "interrupted save, copy or download. Save, copy or download it again."
        ) from error


def _check_same_geometry(name_or_path: str, overrides: dict) -> None:
    """Refuse loading a checkpoint at another image or patch size (its position embeddings would not fit)."""
    asked = {key: overrides[key] for key in ("image_size", "patch_size") if key in overrides}
    if not asked:
        return
    saved = PreTrainedConfig.get_config_dict(name_or_path)[0]
    different = {key: (saved.get(key), value) for key, value in asked.items() if saved.get(key) not in (None, value)}
    if different:
        shown = ", ".join(f"{key} {old} in the checkpoint, {new} asked" for key, (old, new) in different.items())
        raise ValueError(
            f"{name_or_path} was trained at another input geometry ({shown}): its position embeddings do not fit. "
            "Use the checkpoint's size (drop the image_size / patch_size override, and distill from a teacher at that "
            "size), or distill a student at the new size from the start."
        )


def load_image_classifier(
    name_or_path: str, model_class=AutoModelForImageClassification, new_head: str = "refuse", **kwargs
) -> PreTrainedModel:
    """`model_class.from_pretrained(name_or_path, **kwargs)`, refusing what would leave weights random.

    Args:
        name_or_path (`str`): The checkpoint folder or Hub id.
        model_class: The class to load with (`AutoModelForImageClassification` by default).
        new_head (`str`): `"refuse"` when the model is used as is (evaluated, exported, distilled from), `"warn"` when
            its head is about to be trained (fine-tuning a generic-distillation checkpoint).
        kwargs: Passed to `from_pretrained`.

    Raises:
        `ValueError`: the encoder's weights are missing (not a checkpoint of this model: an MAE teacher, another
            architecture), or the head is new with `new_head="refuse"`.
    """
    if new_head not in ("refuse", "warn"):
        raise ValueError(f"new_head must be 'refuse' or 'warn', got {new_head!r}.")
    _check_same_geometry(name_or_path, kwargs)
    with readable_weights(name_or_path):
        model, info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(key) for key in info.get("mismatched_keys", []))
    head = [key for key in missing if _is_head(key)]
    encoder = [key for key in missing if not _is_head(key)]
    if encoder:
        raise ValueError(
            f"{name_or_path} does not hold the weights of a {type(model).__name__}: {len(encoder)} of its encoder's "
            f"weights are missing ({', '.join(encoder[:4])}{', ...' if len(encoder) > 4 else ''}), so it would run "
            "from random blocks. Give a checkpoint of this model: a G2SD student (generic or specific distillation) "
            "for a student; an MAE checkpoint is a teacher (--teacher_name_or_path of run_generic.py)."
        )
    new = head + [key for key in mismatched if _is_head(key)]
    if new and new_head == "refuse":
        raise ValueError(
            f"{name_or_path} has no trained classification head ({', '.join(new[:4])} would be random): it is not a "
            "fine-tuned classifier (a generic-distillation checkpoint has no head). Fine-tune it first "
            "(run_specific.py --student_name_or_path ...) and use that checkpoint."
        )
    if new:
        logger.warning(
            f"The classification head of {name_or_path} is new (initialized, to be trained): {', '.join(new)}."
        )
    return model


__all__ = ["load_image_classifier", "readable_weights"]


# --------------------------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------------------------
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # the Trainer's checkpoint-N
# The Trainer writes the trainer state last: a checkpoint without it is a save that did not finish.
TRAINER_STATE = "trainer_state.json"


def _safetensors_problem(path: Path) -> str | None:
    """Why a `.safetensors` file is not whole (its header's last tensor ends beyond the file), or `None`."""
    try:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError) as error:
        return f"{path.name} cannot be read ({error.__class__.__name__})"
    expected = 8 + header_size + end
    size = path.stat().st_size
    return None if size == expected else f"{path.name} is truncated ({size} of {expected} bytes)"


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint folder is not complete, or `None` when it is: no `trainer_state.json` (written last,
    so the save stopped before its end), an unreadable one, no model weights, or a truncated `.safetensors` file.

    Example:

    ```python
    >>> checkpoint_problem("run/checkpoint-200")
    'no trainer_state.json (the save stopped before its end)'
    ```
    """
    folder = Path(folder)
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save stopped before its end)"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return f"{TRAINER_STATE} cannot be read"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")):
        return "no model weights"
    for path in weights:
        if (problem := _safetensors_problem(path)) is not None:
            return problem
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """The newest complete `checkpoint-N` in `output_dir` (or `None`), and the newer ones skipped, with why.

    Example:

    ```python
    >>> last_complete_checkpoint("run")
    ('run/checkpoint-100', {'checkpoint-200': 'model.safetensors is truncated (1024 of 4096 bytes)'})
    ```
    """
    folders = [
        (int(match.group(1)), path)
        for path in Path(output_dir).iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
    ]
    skipped = {}
    for _, path in sorted(folders, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path), skipped
        skipped[path.name] = problem
    return None, skipped


# torch.save reports a full disk as an enforce failure of its zip writer, not as ENOSPC.
_WRITE_FAILURES = ("No space left on device", "file write failed", "failed writing file")


class FullDiskError(OSError):
    """A save that ran out of disk space, naming what it was saving (`reporting_full_disk`)."""


@contextmanager
def reporting_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Turn a save that failed for want of disk space (`ENOSPC`, or torch's "file write failed" enforce error) into
    `FullDiskError(ENOSPC, "No space left on the device while saving <path>...")`; other errors, and one already
    reported by an inner save (a checkpoint's model), pass unchanged."""
    try:
        yield
    except FullDiskError:
        raise
    except (OSError, RuntimeError) as error:
        full = getattr(error, "errno", None) == errno.ENOSPC or any(text in str(error) for text in _WRITE_FAILURES)
        if not full:
            raise
        raise FullDiskError(
            errno.ENOSPC,
            f"No space left on the device while saving {path}. What it was writing is incomplete (automatic resume "
            "skips an incomplete checkpoint); free some space or choose another --output_dir, then run again to resume.",
        ) from error
