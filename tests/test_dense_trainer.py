"""DenseDistillationTrainer: the release's dense recipes, the adapter, the refusals, and learning the generated shapes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from g2sd_hf import G2SDForGenericDistillation
from g2sd_hf.dense_data import (
    DetectionTransform,
    SegmentationTransform,
    collate_detection,
    collate_instances,
    collate_segmentation,
)
from g2sd_hf.dense_models import (
    box_score_maps,
    evaluate_detection,
    find_backbone,
    object_detection_model,
    query_class_probabilities,
    semantic_segmentation_model,
)
from g2sd_hf.dense_trainer import (
    DENSE_DISTILLATION_DEFAULTS,
    DenseDistillationArguments,
    DenseDistillationTrainer,
    resolve_dense_distillation,
)
from g2sd_hf.losses import (
    pixel_distillation_loss,
    weighted_feature_distillation_loss,
)
from g2sd_hf.metrics import SegmentationMetrics, segmentation_predictions
from g2sd_hf.synthetic import SHAPE_CLASSES, make_shapes_dataset

from .conftest import tiny_student_config
from .dense_helpers import (
    NORMALIZATION,
    dense_args,
    detector,
    mask2former,
    segmentation_pair,
    shapes,
    tiny_backbone_config,
)


def test_release_dense_defaults_are_pinned():
    # plain_distill_net.py + mask_rcnn_vitdet_b2s_100ep.py: distill_feat_weight 0.001, distill_cls_weight 0.1,
    # distill_warm_step 500, ADAP (3x3); distill_cwd.py: ChannelWiseDivergence tau 1.0, weight 10, nothing else.
    assert DENSE_DISTILLATION_DEFAULTS["detection"] == {
        "feature_distillation_weight": 0.001,
        "score_distillation_weight": 0.1,
        "distillation_warmup_steps": 500,
        "feature_adapter": True,
    }
    segmentation = resolve_dense_distillation(DenseDistillationArguments("out"), "segmentation")
    assert (
        segmentation.feature_weight,
        segmentation.score_weight,
        segmentation.warmup_steps,
        segmentation.temperature,
    ) == (0.0, 10.0, 0, 1.0)
    assert segmentation.segmentation_distillation == "channel-wise" and not segmentation.feature_adapter
    detection = resolve_dense_distillation(DenseDistillationArguments("out"), "detection")
    assert detection.feature_loss_reduction == "release" and detection.feature_adapter
    overridden = resolve_dense_distillation(
        DenseDistillationArguments("out", score_distillation_weight=2.0, feature_adapter=False), "detection"
    )
    assert (overridden.score_weight, overridden.feature_weight, overridden.feature_adapter) == (2.0, 0.001, False)


def test_segmentation_default_is_channel_wise_distillation_of_the_decode_head(tmp_path):
    trainer, student, teacher, batch = segmentation_pair(tmp_path)
    student.train()
    loss = trainer.compute_loss(student, batch)
    captured = {}
    for name, model in (("student", student), ("teacher", teacher)):
        handle = model.decode_head.register_forward_hook(
            lambda module, args, output, name=name: captured.update({name: output})
        )
        with torch.no_grad():
            outputs = model(**batch)
        handle.remove()
        captured[f"{name}_loss"] = outputs.loss
    student_logits, teacher_logits = captured["student"], captured["teacher"]
    assert student_logits.shape[-2:] == (
        16,
        16,
    )  # the decode head's resolution (the finest level), not the upsampled 32 x 32
    # CWD by its definition: per image and class, softmax over the 64 locations; KL(teacher || student); mean over N*C.
    expected_cwd = 0.0
    for image in range(4):
        for channel in range(4):
            p = F.softmax(teacher_logits[image, channel].flatten(), 0)
            q = F.softmax(student_logits[image, channel].flatten(), 0)
            expected_cwd += float((p * (p.log() - q.log())).sum())
    expected_cwd /= 16
    torch.testing.assert_close(
        loss, captured["student_loss"] + 10.0 * expected_cwd, atol=1e-5, rtol=1e-5
    )  # no warm-up
    trainer._check_and_record(loss, {"x": loss})  # the recorded terms: score only, no feature term
    assert trainer.settings.feature_weight == 0.0 and trainer.feature_adapter is None


def test_pixel_kl_variant_with_feature_distillation_and_warm_up(tmp_path):
    trainer, student, teacher, batch = segmentation_pair(
        tmp_path,
        segmentation_distillation="pixel-kl",
        distillation_warmup_steps=4,
        feature_distillation_weight=0.5,
        score_distillation_weight=2.0,
        distillation_temperature=2.0,
        feature_loss_reduction="mean",
    )
    student.train()
    trainer.state.global_step = 1
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        teacher_features = find_backbone(teacher)(batch["pixel_values"]).feature_maps
        teacher_logits = teacher(pixel_values=batch["pixel_values"]).logits
        student_features = find_backbone(student)(batch["pixel_values"]).feature_maps
        outputs = student(**batch)
    confidence = teacher_logits.softmax(dim=1).max(dim=1).values
    expected = outputs.loss + 0.25 * (
        0.5 * weighted_feature_distillation_loss(list(student_features), list(teacher_features), confidence)
        + 2.0 * pixel_distillation_loss(outputs.logits, teacher_logits, 2.0)
    )
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)  # ramp = step 1 / 4
    assert not any(parameter.requires_grad for parameter in trainer.teacher.parameters())


def test_detection_default_is_the_release_recipe(tmp_path):
    torch.manual_seed(0)
    student, teacher = detector(32), detector(64).eval()
    trainer = DenseDistillationTrainer(model=student, teacher=teacher, args=dense_args(tmp_path))
    batch = collate_detection([item for item in shapes(4, DetectionTransform(32, *NORMALIZATION, True))])
    student.train()
    trainer.state.global_step = 250  # half-way through the release's 500-step warm-up
    torch.manual_seed(1)
    loss = trainer.compute_loss(student, batch)
    logged = {name: values[-1] for name, values in trainer._term_history.items()}

    torch.manual_seed(1)
    outputs = student(**batch)
    student_maps = list(find_backbone(student)(batch["pixel_values"]).feature_maps)
    with torch.no_grad():
        teacher_outputs = teacher(pixel_values=batch["pixel_values"])
        teacher_maps = list(find_backbone(teacher)(batch["pixel_values"]).feature_maps)
    adapted = [conv(level) for conv, level in zip(trainer.feature_adapter.layers, student_maps)]
    student_probabilities = query_class_probabilities(outputs.logits, 3)
    teacher_probabilities = query_class_probabilities(teacher_outputs.logits, 3)
    feature_loss, score_loss = 0.0, 0.0
    for student_level, teacher_level, adapted_level in zip(student_maps, teacher_maps, adapted):
        size = student_level.shape[-2:]
        student_scores = box_score_maps(student_probabilities, outputs.pred_boxes, size, 50)
        teacher_scores = box_score_maps(teacher_probabilities, teacher_outputs.pred_boxes, size, 50)
        mask = teacher_scores.max(dim=1).values
        covered = mask * (student_scores.amax(dim=1) > 0)
        feature_loss += ((adapted_level - teacher_level) ** 2 * mask[:, None]).sum() / mask.sum()
        bce = F.binary_cross_entropy(student_scores.clamp(1e-6, 1 - 1e-6), teacher_scores, reduction="none")
        score_loss += (bce * covered[:, None]).sum() / covered.sum()
    torch.testing.assert_close(logged["feature_distillation_loss"], feature_loss.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logged["score_distillation_loss"], score_loss.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        loss, outputs.loss + 0.5 * (0.001 * feature_loss + 0.1 * score_loss), atol=1e-4, rtol=1e-4
    )


def test_the_detection_adapter_is_trained_checkpointed_and_not_saved_with_the_model(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    args = dense_args(
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        distillation_warmup_steps=1,
        dataloader_num_workers=0,
    )
    trainer = DenseDistillationTrainer(
        model=detector(32),
        teacher=detector(64).eval(),
        args=args,
        train_dataset=shapes(16, DetectionTransform(32, *NORMALIZATION, True)),
        data_collator=collate_detection,
    )
    before = {name: value.clone() for name, value in trainer.feature_adapter.state_dict().items()}
    trainer.train()
    adapter = trainer.accelerator.unwrap_model(trainer.feature_adapter)
    assert any(not torch.equal(before[name], value) for name, value in adapter.state_dict().items())  # it learned
    assert any(group.get("feature_adapter") for group in trainer.optimizer.param_groups)
    saved = load_file(tmp_path / "checkpoint-2" / DenseDistillationTrainer.ADAPTER_FILE)
    assert all(torch.equal(saved[name], value) for name, value in adapter.state_dict().items())
    trainer.save_model()
    assert not any("adapter" in key for key in load_file(tmp_path / "model.safetensors"))
    # Resuming restores the adapter; a checkpoint without one is refused.
    resumed = DenseDistillationTrainer(
        model=detector(32),
        teacher=detector(64).eval(),
        args=args,
        train_dataset=shapes(16, DetectionTransform(32, *NORMALIZATION, True)),
        data_collator=collate_detection,
    )
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(saved[name], value) for name, value in resumed.feature_adapter.state_dict().items())
    (tmp_path / "checkpoint-2" / DenseDistillationTrainer.ADAPTER_FILE).unlink()
    with pytest.raises(ValueError, match="has no distillation_adapter.safetensors"):
        resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))


def test_dense_trainer_refusals(tmp_path):
    student = semantic_segmentation_model(tiny_backbone_config(), 4, hidden_size=16)
    with pytest.raises(ValueError, match="pyramid channels"):
        DenseDistillationTrainer(
            model=student,
            teacher=semantic_segmentation_model(tiny_backbone_config(fpn_hidden_size=64), 4, hidden_size=16),
            args=dense_args(tmp_path),
        )
    with pytest.raises(ValueError, match="4 classes, the teacher 5"):
        DenseDistillationTrainer(
            model=student,
            teacher=semantic_segmentation_model(tiny_backbone_config(), 5, hidden_size=16),
            args=dense_args(tmp_path),
        )
    with pytest.raises(ValueError, match="no transformers backbone"):
        DenseDistillationTrainer(model=G2SDForGenericDistillation(tiny_student_config()), args=dense_args(tmp_path))


@pytest.mark.parametrize("head", ["deformable-detr", "mask2former"])
def test_detection_and_mask_distillation_train_with_all_terms(tmp_path, head):
    torch.manual_seed(0)
    if head == "deformable-detr":
        build = detector
        transform, collate = DetectionTransform(32, *NORMALIZATION, True), collate_detection
    else:
        build = mask2former

        transform, collate = DetectionTransform(32, *NORMALIZATION, True, with_instance_masks=True), collate_instances
    trainer = DenseDistillationTrainer(
        model=build(32),
        teacher=build(64).eval(),
        args=dense_args(tmp_path),
        train_dataset=shapes(16, transform),
        data_collator=collate,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"task_loss", "feature_distillation_loss", "score_distillation_loss"} <= logged.keys()
    assert all(math.isfinite(logged[key]) for key in ("loss", "feature_distillation_loss", "score_distillation_loss"))


def test_segmentation_training_lowers_the_loss_and_beats_chance(tmp_path):
    torch.manual_seed(0)
    splits = {
        name: make_shapes_dataset(size, 32, seed=seed).rename_column("semantic_mask", "mask")
        for name, size, seed in (("train", 128, 0), ("validation", 32, 1))
    }
    trainer = DenseDistillationTrainer(
        model=semantic_segmentation_model(
            tiny_backbone_config(hidden_size=48, num_hidden_layers=3), 4, hidden_size=32
        ),
        args=dense_args(tmp_path, max_steps=-1, num_train_epochs=6, learning_rate=1e-3, logging_steps=8),
        train_dataset=splits["train"].with_transform(SegmentationTransform(32, *NORMALIZATION, True)),
        eval_dataset=splits["validation"].with_transform(SegmentationTransform(32, *NORMALIZATION, False)),
        data_collator=collate_segmentation,
        compute_metrics=SegmentationMetrics(4, class_names=["background", *SHAPE_CLASSES]),
        preprocess_logits_for_metrics=segmentation_predictions,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0]
    assert (
        after["eval_pixel_accuracy"] > before["eval_pixel_accuracy"] + 0.3
        and after["eval_mean_iou"] > before["eval_mean_iou"]
    )
    background = (np.asarray(splits["validation"]["mask"][0]) == 0).mean()
    assert after["eval_pixel_accuracy"] > 0.5 and background < 1


def test_detection_training_lowers_the_loss_and_moves_ap_from_chance(tmp_path):
    torch.manual_seed(0)
    train, validation = make_shapes_dataset(128, 64, seed=0), make_shapes_dataset(32, 64, seed=1)
    model = object_detection_model(
        tiny_backbone_config(
            image_size=64,
            hidden_size=64,
            num_hidden_layers=4,
            fpn_hidden_size=32,
            out_features=["stage2", "stage3", "stage4"],
        ),
        3,
        hidden_size=32,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )
    transformed = validation.with_transform(DetectionTransform(64, *NORMALIZATION, False))
    before = evaluate_detection(model, transformed, validation, 3, collate_detection)
    trainer = DenseDistillationTrainer(
        model=model,
        args=dense_args(
            tmp_path,
            max_steps=-1,
            num_train_epochs=40,
            learning_rate=1e-3,
            per_device_train_batch_size=16,
            logging_steps=40,
        ),
        train_dataset=train.with_transform(DetectionTransform(64, *NORMALIZATION, True)),
        data_collator=collate_detection,
    )
    trainer.train()
    after = evaluate_detection(trainer.model, transformed, validation, 3, collate_detection)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.6 * losses[0]
    assert after["map_50"] > max(3 * before["map_50"], 0.03)
