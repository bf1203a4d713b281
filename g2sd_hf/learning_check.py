"""Did a training run learn anything? Checks run at the end of every training and evaluation, so that a run that
trained nothing, or stayed at chance, says so in the log and in its model card instead of passing for a model.

- A classifier learned nothing when its training task loss never left the chance level, the cross-entropy of a
  uniform guess, `ln(num_labels)`, or when its evaluation is at chance: a balanced accuracy (the mean per-class
  recall) no better than `1 / num_labels`, which is what answering one class, or guessing, scores.
- A regression-style loss (generic distillation's L_GD, MAE's pixel loss) learned nothing when it did not fall
  below its first logged value.

The functions are pure: they read a Trainer's `state.log_history` and metrics dictionaries and return warnings.
"""

import math
from collections.abc import Sequence


# The last fraction of the logged losses whose mean is compared with the chance level: a loss that merely starts at
# chance is normal, one that ends there is not.
FINAL_FRACTION = 0.25
# A mean training loss above this fraction of ln(num_labels) counts as chance.
CHANCE_LOSS_FRACTION = 0.95
# A balanced accuracy within this of 1 / num_labels counts as chance.
CHANCE_ACCURACY_MARGIN = 0.02
# A regression loss whose final mean is above this fraction of its first value did not decrease.
NO_PROGRESS_FRACTION = 0.95


def chance_cross_entropy(num_labels: int) -> float:
    """The cross-entropy of a uniform guess over `num_labels` classes: `ln(num_labels)`."""
    return math.log(num_labels)


def logged_values(log_history: Sequence[dict], key: str) -> list[float]:
    """The per-step values of `key` in a Trainer's `log_history` (the end-of-training summary excluded)."""
    return [float(entry[key]) for entry in log_history if key in entry and "train_runtime" not in entry]


def final_mean(values: Sequence[float], fraction: float = FINAL_FRACTION) -> float:
    """The mean of the last `fraction` of `values` (at least one value)."""
    count = max(1, math.ceil(len(values) * fraction))
    return sum(values[-count:]) / count


def no_step_warning(global_step: int) -> list[str]:
    """A warning when training ran no optimizer step at all."""
    if global_step > 0:
        return []
    return [
        "Training ran 0 optimizer steps: the saved weights are the initial ones. Check that the training set holds at "
        "least one batch (per_device_train_batch_size x processes x gradient_accumulation_steps images, fewer with "
        "dataloader_drop_last false) and that max_steps / num_train_epochs are positive."
    ]


def classification_training_warnings(
    log_history: Sequence[dict], num_labels: int, loss_key: str = "task_loss", causes: str = ""
) -> list[str]:
    """Warn when the classification loss `loss_key` ended at the chance level `ln(num_labels)`.

    Args:
        log_history (`Sequence[dict]`): A Trainer's `state.log_history`.
        num_labels (`int`): Number of classes.
        loss_key (`str`): The logged task loss (the loss of the labels alone, not a distillation term).
        causes (`str`): Likely causes to name in the warning.

    Returns:
        `list[str]`: one warning, or none.

    Example:

    ```python
    >>> classification_training_warnings([{"task_loss": 2.31}, {"task_loss": 2.30}], num_labels=10)
    ['The training task_loss stayed at the chance level: ...']
    ```
    """
    values = logged_values(log_history, loss_key)
    if not values or num_labels < 2:
        return []
    chance, final = chance_cross_entropy(num_labels), final_mean(values)
    if final < CHANCE_LOSS_FRACTION * chance:
        return []
    return [
        f"The training {loss_key} stayed at the chance level: {final:.3f} over the last quarter of training, against "
        f"ln({num_labels}) = {chance:.3f} for a uniform guess. The model learned nothing from the labels. {causes}".strip()
    ]


def classification_evaluation_warnings(
    metrics: dict, num_labels: int, prefix: str = "eval_", causes: str = ""
) -> list[str]:
    """Warn when an evaluation is at chance: balanced accuracy within 0.02 of `1 / num_labels` or, without it, a
    cross-entropy at `ln(num_labels)` or above.

    Example:

    ```python
    >>> classification_evaluation_warnings({"eval_balanced_accuracy": 0.25, "eval_accuracy": 0.57}, num_labels=4)
    ['The evaluation is at chance: ...']
    ```
    """
    if num_labels < 2:
        return []
    balanced = metrics.get(f"{prefix}balanced_accuracy")
    if balanced is not None:
        if balanced > 1 / num_labels + CHANCE_ACCURACY_MARGIN:
            return []
        accuracy = metrics.get(f"{prefix}accuracy")
        shown = f" (accuracy {accuracy:.3f})" if accuracy is not None else ""
        finding = (
            f"balanced accuracy {balanced:.3f}{shown}, against {1 / num_labels:.3f} for answering one class "
            "or guessing"
        )
    else:
        loss = metrics.get(f"{prefix}loss")
        if loss is None or loss < CHANCE_LOSS_FRACTION * chance_cross_entropy(num_labels):
            return []
        finding = f"cross-entropy {loss:.3f}, against ln({num_labels}) = {chance_cross_entropy(num_labels):.3f} for a uniform guess"
    return [f"The evaluation is at chance: {finding}. {causes}".strip()]


def regression_training_warnings(
    log_history: Sequence[dict], loss_key: str = "loss", what: str = "The training loss"
) -> list[str]:
    """Warn when a loss with no chance level (L_GD, MAE's pixel loss) ended no lower than 95% of its first value.

    Example:

    ```python
    >>> regression_training_warnings([{"loss": 1.0}, {"loss": 0.99}, {"loss": 1.01}, {"loss": 1.0}])
    ['The training loss did not decrease: ...']
    ```
    """
    values = logged_values(log_history, loss_key)
    if len(values) < 2:
        return []
    first, final = values[0], final_mean(values[1:])
    if final < NO_PROGRESS_FRACTION * first:
        return []
    return [
        f"{what} did not decrease: {final:.4g} over the last quarter of training against {first:.4g} at the first "
        "log. The model learned nothing; check the learning rate (after any batch-size scaling) and the number of "
        "steps."
    ]


__all__ = [
    "chance_cross_entropy",
    "classification_evaluation_warnings",
    "classification_training_warnings",
    "final_mean",
    "logged_values",
    "no_step_warning",
    "regression_training_warnings",
]
