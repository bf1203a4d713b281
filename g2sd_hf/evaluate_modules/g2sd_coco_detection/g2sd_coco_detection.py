"""COCO box AP as an `evaluate` module, loadable offline: `g2sd_hf.metrics.load_metric("coco_detection")`.

The numbers come from `g2sd_hf.metrics.coco_detection_metrics` (pycocotools' `COCOeval`), which
`g2sd_hf.dense_models.evaluate_detection` (the detection example's evaluation) computes through this module.
"""

import datasets
import evaluate

from g2sd_hf.metrics import coco_detection_metrics


_DESCRIPTION = """COCO box average precision: `map` (IoU 0.50:0.95), `map_50`, `map_75`, and `map_small`,
`map_medium`, `map_large` for the size ranges that hold ground-truth objects."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[dict]`): Per image: `boxes` (`[x, y, width, height]` pixels), `labels` and `scores`.
    references (`list[dict]`): Per image, in the same order: `boxes`, `labels`, `size` (`[height, width]`), `area`
        (each object's area: COCO's segment area, or the box's) and `iscrowd` (0 or 1).
    num_labels (`int`): Number of classes.
Returns:
    `dict[str, float]`: `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`.
"""


# `evaluate` names the module after its class: G2sdCocoDetection -> its folder's name.
class G2sdCocoDetection(evaluate.Metric):
    def _info(self):
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "boxes": boxes,
                        "labels": datasets.Sequence(datasets.Value("int64")),
                        "scores": datasets.Sequence(datasets.Value("float64")),
                    },
                    "references": {
                        "boxes": boxes,
                        "labels": datasets.Sequence(datasets.Value("int64")),
                        "size": datasets.Sequence(datasets.Value("int64")),
                        "area": datasets.Sequence(datasets.Value("float64")),
                        "iscrowd": datasets.Sequence(datasets.Value("int64")),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, num_labels):
        return coco_detection_metrics(references, predictions, num_labels)
