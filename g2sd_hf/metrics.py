"""The package's metrics, and the same metrics as `evaluate` modules shipped in the package (loaded offline).

`evaluate.load("accuracy")` fetches its script from the Hub; `load_metric(name)` loads the package's own modules from
`g2sd_hf/evaluate_modules/` instead, so they work offline and in `evaluate.evaluator(...)`:

- `"classification"` (`g2sd_classification`): top-1 accuracy, per-class accuracy (recall of each class), their mean
  (balanced accuracy), and optionally a binary accuracy for a grouping of the classes (ELPV: defective cells).
  `ClassificationMetrics`, the Trainers' `compute_metrics`, computes through it.
- `"mean_iou"` (`g2sd_mean_iou`): mean IoU and pixel accuracy from a confusion matrix (`SegmentationMetrics`, which
  the segmentation Trainer streams batch by batch instead of keeping every pixel map).
- `"coco_detection"` (`g2sd_coco_detection`): COCO box AP through pycocotools' `COCOeval` (`coco_detection_metrics`),
  used by `dense_models.evaluate_detection`.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import EvalPrediction


EVALUATE_MODULES = Path(__file__).parent / "evaluate_modules"
METRIC_MODULES = {
    "classification": "g2sd_classification",
    "mean_iou": "g2sd_mean_iou",
    "coco_detection": "g2sd_coco_detection",
}


def load_metric(name: str, **kwargs):
    """One of the package's metrics as an `evaluate` module, loaded from the package (no network).

    Args:
        name (`str`): `"classification"`, `"mean_iou"` or `"coco_detection"`.
        **kwargs: Passed to `evaluate.load` (by default `keep_in_memory=True`: no cache files, so processes of one
            distributed run never share a cache file).

    Example:

    ```python
    >>> metric = load_metric("classification")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], class_names=["ok", "bad"])["balanced_accuracy"]
    0.75
    ```
    """
    import evaluate

    if name not in METRIC_MODULES:
        raise ValueError(f"Unknown metric {name!r}: the package ships {sorted(METRIC_MODULES)}.")
    return evaluate.load(str(EVALUATE_MODULES / METRIC_MODULES[name]), **{"keep_in_memory": True, **kwargs})


def image_classification_evaluator():
    """`evaluate.evaluator("image-classification")`, mended for transformers 5: evaluate 0.4.6 hands the pipeline its
    own `DatasetColumn`, which a transformers 5 pipeline takes for one image, and checks a `Pipeline` object against
    `transformers.TFPreTrainedModel`, gone in v5. This one passes a list of images and accepts a pipeline object.

    Example:

    ```python
    >>> result = image_classification_evaluator().compute(
    ...     model_or_pipeline="g2sd-vit-small-sd",
    ...     data=dataset,  # `image` (decoded) and `label` columns
    ...     metric=load_metric("classification", class_names=class_names),
    ...     label_mapping=model.config.label2id,
    ... )
    ```
    """
    from evaluate.evaluator import ImageClassificationEvaluator
    from transformers import Pipeline

    class Evaluator(ImageClassificationEvaluator):
        def prepare_data(self, data, input_column, label_column):
            metric_inputs, pipeline_inputs = super().prepare_data(data, input_column, label_column)
            return metric_inputs, list(pipeline_inputs)

        def prepare_pipeline(self, model_or_pipeline, *args, **kwargs):
            if isinstance(model_or_pipeline, Pipeline):
                if model_or_pipeline.task != self.task:
                    raise ValueError(f"The pipeline's task is {model_or_pipeline.task!r}, not {self.task!r}.")
                return model_or_pipeline
            return super().prepare_pipeline(model_or_pipeline, *args, **kwargs)

    return Evaluator()


def classification_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    positive_classes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Accuracy metrics of `logits` `(num_samples, num_classes)`, or of predicted class indices `(num_samples,)`,
    against integer `labels` `(num_samples,)`.

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
    if logits.ndim not in (1, 2) or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            "Expected logits (num_samples, num_classes) or class indices (num_samples,), and labels (num_samples,), "
            f"got {logits.shape} and {labels.shape}."
        )
    predictions = logits.argmax(axis=-1) if logits.ndim == 2 else logits.astype(np.int64)
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


def check_class_names(class_names: Sequence[str]) -> None:
    """Refuse class names that would break the metrics or the model card: two names with one metric key (`a-b`,
    `a_b`: one per-class accuracy would overwrite the other), or a line break / `|` (they break the card's tables)."""
    unprintable = [name for name in class_names if any(character in str(name) for character in "\n\r|")]
    if unprintable:
        raise ValueError(
            f"Class names {unprintable!r} hold a line break or '|', which break the model card's tables: rename those "
            "classes (the sub-folders, or the data set's label names)."
        )
    keys: dict[str, list[str]] = {}
    for name in class_names:
        keys.setdefault(metric_name(name), []).append(str(name))
    clashes = [names for names in keys.values() if len(names) > 1]
    if clashes:
        raise ValueError(
            f"The class names {clashes} become the same metric key ({', '.join(metric_name(names[0]) for names in clashes)}: "
            "non-alphanumerics are written as '_'), so their per-class accuracies would overwrite each other. Rename "
            "the classes so they differ in letters or digits."
        )


class ClassificationMetrics:
    """`compute_metrics` for `Trainer`: `ClassificationMetrics(class_names, positive_classes)(eval_prediction)`,
    computed by the package's `evaluate` module (`load_metric("classification")`)."""

    def __init__(self, class_names: Sequence[str] | None = None, positive_classes: Sequence[int] | None = None):
        if class_names is not None:
            check_class_names(class_names)
        self.class_names = list(class_names) if class_names is not None else None
        self.positive_classes = list(positive_classes) if positive_classes is not None else None
        self.metric = load_metric("classification")

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return self.metric.compute(
            predictions=np.asarray(logits).argmax(axis=-1),
            references=np.asarray(prediction.label_ids),
            class_names=self.class_names,
            positive_classes=self.positive_classes,
        )


class SegmentationMetrics:
    """`compute_metrics` for semantic segmentation: mIoU, pixel accuracy and per-class IoU from a confusion matrix.

    Feed it class-index predictions, e.g. with `preprocess_logits_for_metrics=segmentation_predictions` in the
    Trainer, so that full logit maps are not gathered. It also works with `batch_eval_metrics=True`: each batch is
    added to a running confusion matrix and the metrics come with `compute_result=True` (then the matrix is reset),
    so the predictions of a whole evaluation set never sit in memory at once.

    Args:
        num_labels (`int`): Number of classes. Labels outside `[0, num_labels)` (the ignore index, the Trainer's
            `-100` padding) are not scored.
        class_names (`list[str]`, *optional*): For per-class `iou_<name>` entries.
    """

    def __init__(self, num_labels: int, class_names: Sequence[str] | None = None):
        self.num_labels, self.class_names = num_labels, class_names
        self.running = np.zeros((num_labels, num_labels), dtype=np.int64)

    def confusion_matrix(self, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
        predictions, labels = (
            _numpy(predictions).reshape(-1).astype(np.int64),
            _numpy(labels).reshape(-1).astype(np.int64),
        )
        if predictions.shape != labels.shape:
            raise ValueError(
                f"Predictions ({predictions.size} pixels) and labels ({labels.size}) differ in size: "
                "pass class-index maps at the labels' resolution (`segmentation_predictions`)."
            )
        valid = (labels >= 0) & (labels < self.num_labels)
        index = labels[valid] * self.num_labels + predictions[valid]
        return np.bincount(index, minlength=self.num_labels**2).reshape(self.num_labels, self.num_labels)

    def from_confusion_matrix(self, confusion: np.ndarray) -> dict[str, float]:
        true_positives = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - true_positives
        present = union > 0
        iou = np.where(present, true_positives / np.maximum(union, 1), np.nan)
        metrics = {
            "mean_iou": float(np.nanmean(iou)) if present.any() else 0.0,
            "pixel_accuracy": float(true_positives.sum() / max(confusion.sum(), 1)),
        }
        for index, name in enumerate(self.class_names or []):
            if present[index]:
                metrics[f"iou_{metric_name(name)}"] = float(iou[index])
        return metrics

    def __call__(self, prediction: EvalPrediction, compute_result: bool | None = None) -> dict[str, float]:
        predictions = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        confusion = self.confusion_matrix(predictions, prediction.label_ids)
        if compute_result is None:  # whole evaluation set at once
            return self.from_confusion_matrix(confusion)
        self.running += confusion
        if not compute_result:
            return {}
        metrics, self.running = self.from_confusion_matrix(self.running), np.zeros_like(self.running)
        return metrics


def _numpy(array) -> np.ndarray:
    """A NumPy array from a NumPy array or a (device) tensor."""
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


def segmentation_predictions(logits, labels):
    """`preprocess_logits_for_metrics`: upsample the logits to the labels' size and keep the arg-max class."""

    logits = logits[0] if isinstance(logits, tuple) else logits
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def coco_detection_metrics(
    ground_truth: list[dict], predictions: list[dict], num_labels: int, iou_types: Sequence[str] = ("bbox",)
) -> dict[str, float]:
    """COCO AP (pycocotools' `COCOeval`) of `predictions` against `ground_truth`.

    Args:
        ground_truth (`list[dict]`): Per image: `boxes` (`(n, 4)` `[x, y, width, height]` pixels), `labels` (`(n,)`),
            `size` (`(height, width)`), and `masks` (`(n, height, width)` booleans) for `"segm"`; optionally `area`
            and `iscrowd` (`(n,)`, COCO's fields; by default the box or mask area and 0).
        predictions (`list[dict]`): Per image, in the same order: `boxes`, `labels`, `scores` (and `masks`).
        num_labels (`int`): Number of classes.
        iou_types (`Sequence[str]`): `"bbox"` and/or `"segm"`.

    Returns:
        `dict`: `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large` (prefixed `mask_` for masks); a
        size range without ground-truth objects has no entry.
    """
    import contextlib
    import io

    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def encode(mask):
        encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
        encoded["counts"] = encoded["counts"].decode("ascii")
        return encoded

    images, annotations, detections = [], [], []
    for image_id, (truth, prediction) in enumerate(zip(ground_truth, predictions)):
        height, width = (int(value) for value in truth["size"])
        images.append({"id": image_id, "height": height, "width": width})
        for index, (box, label) in enumerate(
            zip(np.asarray(truth["boxes"]).reshape(-1, 4), np.asarray(truth["labels"]).reshape(-1))
        ):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),
                "iscrowd": int(truth["iscrowd"][index]) if "iscrowd" in truth else 0,
            }
            if "masks" in truth:
                annotation["segmentation"] = encode(truth["masks"][index])
                annotation["area"] = float(np.asarray(truth["masks"][index]).sum())
            if "area" in truth:  # the data set's own areas (COCO: the segment's), which decide small/medium/large
                annotation["area"] = float(truth["area"][index])
            annotations.append(annotation)
        for index, (box, label, score) in enumerate(
            zip(
                np.asarray(prediction["boxes"]).reshape(-1, 4),
                np.asarray(prediction["labels"]).reshape(-1),
                np.asarray(prediction["scores"]).reshape(-1),
            )
        ):
            detection = {
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [float(v) for v in box],
                "score": float(score),
            }
            if "masks" in prediction:
                detection["segmentation"] = encode(prediction["masks"][index])
            detections.append(detection)
    truth_api = COCO()
    truth_api.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": index} for index in range(num_labels)],
    }
    metrics = {}
    with contextlib.redirect_stdout(io.StringIO()):
        truth_api.createIndex()
        for iou_type in iou_types:
            if not detections:
                stats = np.zeros(12)
            else:
                evaluation = COCOeval(truth_api, truth_api.loadRes(detections), iouType=iou_type)
                evaluation.evaluate()
                evaluation.accumulate()
                evaluation.summarize()
                stats = evaluation.stats
            prefix = "" if iou_type == "bbox" else "mask_"
            for name, value in zip(("map", "map_50", "map_75", "map_small", "map_medium", "map_large"), stats[:6]):
                if value >= 0:  # COCOeval's -1: no ground-truth objects in that size range, so no AP to report
                    metrics[prefix + name] = float(value)
    return metrics


__all__ = [
    "image_classification_evaluator",
    "load_metric",
    "ClassificationMetrics",
    "SegmentationMetrics",
    "classification_metrics",
    "coco_detection_metrics",
    "metric_name",
    "segmentation_predictions",
]
