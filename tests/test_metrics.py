"""The metrics by hand: classification (per-class, balanced, binary), mean IoU and COCO AP; class names refused."""

import datasets
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from g2sd_hf.data import ELPV_CLASS_NAMES
from g2sd_hf.metrics import (
    ClassificationMetrics,
    SegmentationMetrics,
    classification_metrics,
    coco_detection_metrics,
    load_metric,
)


def test_metrics_by_hand():
    metrics = SegmentationMetrics(3, class_names=["a", "b", "c"])
    predictions, labels = np.array([[0, 1], [2, 2]]), np.array([[0, 1], [1, 255]])
    result = metrics.from_confusion_matrix(metrics.confusion_matrix(predictions, labels))
    assert result["pixel_accuracy"] == pytest.approx(2 / 3) and result["iou_b"] == pytest.approx(1 / 2)
    assert result["mean_iou"] == pytest.approx((1 + 0.5 + 0) / 3)
    # Batch by batch (`batch_eval_metrics`): the same numbers at the last batch; the Trainer's -100 padding and
    # out-of-range labels are not scored.
    from transformers import EvalPrediction

    assert metrics(EvalPrediction(torch.tensor([[0, 1]]), torch.tensor([[0, 1]])), compute_result=False) == {}
    batched = metrics(EvalPrediction(np.array([[2, 2, 0, 1]]), np.array([[1, 255, -100, 7]])), compute_result=True)
    assert batched == result and metrics.running.sum() == 0
    truth = [{"boxes": [[10, 10, 20, 20], [40, 40, 10, 12]], "labels": [0, 1], "size": (64, 64)}]
    assert coco_detection_metrics(truth, [{"boxes": truth[0]["boxes"], "labels": [0, 1], "scores": [0.9, 0.8]}], 2)[
        "map"
    ] == pytest.approx(1.0)
    assert coco_detection_metrics(truth, [{"boxes": [[0, 50, 5, 5]], "labels": [0], "scores": [0.9]}], 2)["map"] == 0.0
    # A crowd region is not a miss: only the non-crowd box must be found.
    crowd = [{**truth[0], "iscrowd": [0, 1]}]
    assert coco_detection_metrics(crowd, [{"boxes": truth[0]["boxes"][:1], "labels": [0], "scores": [0.9]}], 2)[
        "map"
    ] == pytest.approx(1.0)
    assert coco_detection_metrics(truth, [{"boxes": truth[0]["boxes"][:1], "labels": [0], "scores": [0.9]}], 2)[
        "map"
    ] == pytest.approx(0.5)
    # COCO's size ranges (large: area > 96^2) follow the data set's areas when given; by their boxes both are small.
    exact = [{"boxes": truth[0]["boxes"], "labels": [0, 1], "scores": [0.9, 0.8]}]
    assert "map_large" not in coco_detection_metrics(truth, exact, 2)  # no large objects: no AP, rather than a 0
    assert coco_detection_metrics([{**truth[0], "area": [400, 10000]}], exact, 2)["map_large"] == pytest.approx(1.0)


def test_classification_metrics_by_hand():
    logits = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 3], [3, 0, 0, 0], [0, 0, 3, 0]], dtype=np.float32)
    labels = np.array([0, 1, 2, 3, 2])
    metrics = classification_metrics(logits, labels, list(ELPV_CLASS_NAMES), positive_classes=[2, 3])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["accuracy_0"] == 1.0 and metrics["accuracy_1_3"] == 1.0
    assert metrics["accuracy_2_3"] == 0.5 and metrics["accuracy_1"] == 0.0
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    # Binary: predicted defective for samples 2, 4 (classes 3, 2); actual defective 2, 3, 4 -> sample 3 wrong.
    assert metrics["binary_accuracy"] == pytest.approx(4 / 5)
    from transformers import EvalPrediction

    assert (
        ClassificationMetrics(list(ELPV_CLASS_NAMES), [2, 3])(EvalPrediction(predictions=logits, label_ids=labels))
        == metrics
    )


@pytest.mark.parametrize(
    "names,message",
    [
        (["a-b", "a_b", "c"], r"\['a-b', 'a_b'\]\] become the same metric key \(a_b"),
        (["ok", "bad\nnews"], "line break or '|'"),
    ],
)
def test_class_names_that_break_metrics_or_the_card_are_refused(names, message):
    from g2sd_hf.data import class_names

    dataset = datasets.Dataset.from_dict(
        {"label": [0, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=names)})
    )
    with pytest.raises(ValueError, match=message):
        class_names(dataset)
    with pytest.raises(ValueError, match=message):
        ClassificationMetrics(names)


# ---------------------------------------------------------------------------------------------------------------------
# The same metrics as evaluate modules shipped in the package (loaded offline: HF_HUB_OFFLINE is set in conftest)
# ---------------------------------------------------------------------------------------------------------------------
def test_evaluate_modules_give_the_package_metrics():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(40, 4)), rng.integers(0, 4, size=40)
    names = list(ELPV_CLASS_NAMES)
    expected = classification_metrics(logits, labels, names, positive_classes=[2, 3])
    metric = load_metric("classification")
    computed = metric.compute(
        predictions=logits.argmax(-1), references=labels, class_names=names, positive_classes=[2, 3]
    )
    assert computed == expected and {"balanced_accuracy", "binary_accuracy", "accuracy_1_3"} <= computed.keys()
    # Given once at load time (for evaluate.evaluator, which passes only predictions and references).
    assert load_metric("classification", class_names=names).compute(
        predictions=logits.argmax(-1), references=labels
    ) == classification_metrics(logits, labels, names)
    # The Trainers' compute_metrics goes through the module.
    trainer_metrics = ClassificationMetrics(names, [2, 3])
    assert trainer_metrics.metric.name == "g2sd_classification"
    assert trainer_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == expected

    maps, truth = rng.integers(0, 3, size=(2, 8, 8)), rng.integers(0, 3, size=(2, 8, 8))
    truth[0, 0] = 255  # ignored
    segmentation = SegmentationMetrics(3, ["a", "b", "c"])
    assert load_metric("mean_iou").compute(
        predictions=maps, references=truth, num_labels=3, class_names=["a", "b", "c"]
    ) == segmentation.from_confusion_matrix(segmentation.confusion_matrix(maps, truth))

    boxes = [[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 8.0, 8.0]]]
    truth_boxes = [{"boxes": boxes[0], "labels": [0, 1], "size": [40, 40], "area": [100.0, 64.0], "iscrowd": [0, 0]}]
    predicted = [{"boxes": [[0.0, 0.0, 10.0, 9.0], [0.0, 30.0, 5.0, 5.0]], "labels": [0, 1], "scores": [0.9, 0.8]}]
    assert load_metric("coco_detection").compute(
        predictions=predicted, references=truth_boxes, num_labels=2
    ) == coco_detection_metrics(truth_boxes, predicted, 2)
    with pytest.raises(ValueError, match="Unknown metric 'accuracy': the package ships"):
        load_metric("accuracy")
