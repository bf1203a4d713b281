"""Loading a saved image classifier without ever using silently random weights.

`from_pretrained` fills whatever a checkpoint lacks with freshly initialized weights and only logs it: an MAE
checkpoint given as a student trains from random blocks, and a generic-distillation checkpoint given to the analysis
or the exporter is scored with a random head. `load_image_classifier` refuses a checkpoint without the encoder's
weights, and refuses a new head (or, when a head is to be trained, says so).
"""

from transformers import AutoModelForImageClassification, PreTrainedModel
from transformers.utils import logging


logger = logging.get_logger(__name__)

HEAD_PREFIXES = ("classifier.", "distillation_classifier.", "head.", "fc_norm.")


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
    model, info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(key) for key in info.get("mismatched_keys", []))
    head = [key for key in missing if key.startswith(HEAD_PREFIXES)]
    encoder = [key for key in missing if not key.startswith(HEAD_PREFIXES)]
    if encoder:
        raise ValueError(
            f"{name_or_path} does not hold the weights of a {type(model).__name__}: {len(encoder)} of its encoder's "
            f"weights are missing ({', '.join(encoder[:4])}{', ...' if len(encoder) > 4 else ''}), so it would run "
            "from random blocks. Give a checkpoint of this model: a G2SD student (generic or specific distillation) "
            "for a student; an MAE checkpoint is a teacher (--teacher_name_or_path of run_generic.py)."
        )
    new = head + [key for key in mismatched if key.startswith(HEAD_PREFIXES)]
    if new and new_head == "refuse":
        raise ValueError(
            f"{name_or_path} has no trained classification head ({', '.join(new[:4])} would be random): it is not a "
            "fine-tuned classifier (a generic-distillation checkpoint has no head). Fine-tune it first "
            "(run_specific.py --student_name_or_path ...) and use that checkpoint."
        )
    if new:
        logger.warning(f"The classification head of {name_or_path} is new (initialized, to be trained): {', '.join(new)}.")
    return model


__all__ = ["load_image_classifier"]
