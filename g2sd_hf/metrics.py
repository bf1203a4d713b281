"""Classification metrics computed locally (no `evaluate.load`, which fetches its scripts from the Hub).

`ClassificationMetrics` is a `compute_metrics` callable for the Trainer: top-1 accuracy, per-class accuracy (recall of
each class), their mean (balanced accuracy), and optionally a binary accuracy for a grouping of the classes (ELPV:
defective = defect probability >= 0.5).
"""

from collections.abc import Sequence

import numpy as np
from transformers import EvalPrediction


def classification_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    positive_classes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Accuracy metrics of `logits` `(num_samples, num_classes)` against integer `labels` `(num_samples,)`.

    Returns:
        `dict`: `accuracy`; `accuracy_<name>` (non-alphanumerics as `_`) per class present in `labels` and `balanced_accuracy` (their mean)
        when `class_names` is given; `binary_accuracy` (prediction and label both in, or both out of,
        `positive_classes`) when `positive_classes` is given.

    Example:

    ```python
    >>> classification_metrics(np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), np.array([0, 1, 1]), ["ok", "bad"])
    {'accuracy': 0.6666666666666666, 'accuracy_ok': 1.0, 'accuracy_bad': 0.5, 'balanced_accuracy': 0.75}
    ```
    """
    logits, labels = np.asarray(logits), np.asarray(labels).astype(np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"Expected logits (num_samples, num_classes) and labels (num_samples,), got {logits.shape} and {labels.shape}.")
    predictions = logits.argmax(axis=-1)
    metrics = {"accuracy": float((predictions == labels).mean())}
    if class_names is not None:
        per_class = []
        for index, name in enumerate(class_names):
            selected = labels == index
            if selected.any():
                value = float((predictions[selected] == index).mean())
                metrics[f"accuracy_{metric_name(name)}"] = value
                per_class.append(value)
        metrics["balanced_accuracy"] = float(np.mean(per_class))
    if positive_classes is not None:
        positive = np.asarray(list(positive_classes))
        metrics["binary_accuracy"] = float((np.isin(predictions, positive) == np.isin(labels, positive)).mean())
    return metrics


def metric_name(class_name: str) -> str:
    """The metric-key form of a class name: non-alphanumerics become `_` (`"1/3"` -> `"1_3"`)."""
    return "".join(character if character.isalnum() else "_" for character in str(class_name))


class ClassificationMetrics:
    """`compute_metrics` for `Trainer`: `ClassificationMetrics(class_names, positive_classes)(eval_prediction)`."""

    def __init__(self, class_names: Sequence[str] | None = None, positive_classes: Sequence[int] | None = None):
        self.class_names = list(class_names) if class_names is not None else None
        self.positive_classes = positive_classes

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return classification_metrics(logits, prediction.label_ids, self.class_names, self.positive_classes)


__all__ = ["ClassificationMetrics", "classification_metrics", "metric_name"]
