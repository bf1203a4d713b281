"""G2SD's classification metric as an `evaluate` module, loadable offline: `g2sd_hf.metrics.load_metric("classification")`.

The numbers come from `g2sd_hf.metrics.classification_metrics`, which the package's `ClassificationMetrics` (the
Trainers' `compute_metrics`) also computes through this module.
"""

import datasets
import evaluate

from g2sd_hf.metrics import classification_metrics


_DESCRIPTION = """Top-1 accuracy; with `class_names`, the accuracy of each class (its recall), named
`accuracy_<class name>`, and their mean, `balanced_accuracy`; with `positive_classes`, `binary_accuracy`: the
prediction and the label both in, or both out of, the positive classes (ELPV: defective cells)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted class indices.
    references (`list[int]`): True class indices.
    class_names (`list[str]`, *optional*): The class names, in index order, for the per-class and balanced accuracy.
    positive_classes (`list[int]`, *optional*): Indices of the positive classes, for the binary accuracy.
    (Both can also be given to `load_metric("classification", class_names=..., positive_classes=...)`.)
Returns:
    `dict[str, float]`: `accuracy`, and `accuracy_<class>` / `balanced_accuracy` / `binary_accuracy` when asked for.
Example:
    >>> metric = g2sd_hf.metrics.load_metric("classification")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], class_names=["ok", "bad"])
    {'accuracy': 0.6666666666666666, 'accuracy_ok': 0.5, 'accuracy_bad': 1.0, 'balanced_accuracy': 0.75}
"""


# `evaluate` names the module after its class: G2sdClassification -> its folder's name.
class G2sdClassification(evaluate.Metric):
    """`class_names` and `positive_classes` can also be given once, to `evaluate.load` / `load_metric`, for callers
    that only pass predictions and references (`evaluate.evaluator`)."""

    def __init__(self, class_names=None, positive_classes=None, **kwargs):
        super().__init__(**kwargs)
        self.class_names, self.positive_classes = class_names, positive_classes

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, class_names=None, positive_classes=None):
        class_names = self.class_names if class_names is None else class_names
        positive_classes = self.positive_classes if positive_classes is None else positive_classes
        return classification_metrics(predictions, references, class_names, positive_classes)
