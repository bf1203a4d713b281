"""Mean IoU of semantic segmentation as an `evaluate` module, loadable offline: `load_metric("mean_iou")`.

The numbers come from `g2sd_hf.metrics.SegmentationMetrics` (a confusion matrix over the labeled pixels). The
segmentation Trainer streams that confusion matrix batch by batch instead (`batch_eval_metrics`), so that the pixel
maps of a whole evaluation set never sit in memory, as `evaluate`'s `add_batch` would keep them.
"""

import datasets
import evaluate
import numpy as np

from g2sd_hf.metrics import SegmentationMetrics


_DESCRIPTION = """Mean intersection over union of the classes present in the labels or the predictions (`mean_iou`),
pixel accuracy (`pixel_accuracy`) and, with `class_names`, each class's IoU (`iou_<class name>`). Labels outside
`[0, num_labels)` (255, the ignore index) are not scored."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[list[int]]]`): Predicted class maps, one `(height, width)` map per image.
    references (`list[list[list[int]]]`): True class maps of the same sizes.
    num_labels (`int`): Number of classes.
    class_names (`list[str]`, *optional*): The class names, for the per-class IoU.
Returns:
    `dict[str, float]`: `mean_iou`, `pixel_accuracy`, and `iou_<class>` with `class_names`.
"""


# `evaluate` names the module after its class: G2sdMeanIou -> its folder's name.
class G2sdMeanIou(evaluate.Metric):
    def _info(self):
        maps = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": maps, "references": maps}),
        )

    def _compute(self, predictions, references, num_labels, class_names=None):
        metrics = SegmentationMetrics(num_labels, class_names)
        confusion = sum(
            metrics.confusion_matrix(np.asarray(prediction), np.asarray(reference))
            for prediction, reference in zip(predictions, references)
        )
        return metrics.from_confusion_matrix(confusion)
