"""Dense tasks: the G2SD backbone in transformers' heads, dense distillation, the generated shapes, the metrics."""

import math
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoBackbone, UperNetForSemanticSegmentation

from g2sd_hf import G2SDBackbone, G2SDBackboneConfig, G2SDForGenericDistillation
from g2sd_hf.dense_data import (
    DetectionTransform,
    SegmentationTransform,
    collate_detection,
    collate_instances,
    collate_segmentation,
)
from g2sd_hf.dense_models import (
    box_score_maps,
    detector_queries,
    find_backbone,
    load_backbone_weights,
    object_detection_model,
    query_class_probabilities,
    semantic_segmentation_model,
    universal_segmentation_model,
)
from g2sd_hf.dense_trainer import (
    DENSE_DISTILLATION_DEFAULTS,
    DenseDistillationArguments,
    DenseDistillationTrainer,
    resolve_dense_distillation,
)
from g2sd_hf.losses import (
    channel_wise_distillation_loss,
    pixel_distillation_loss,
    release_feature_distillation_loss,
    release_score_distillation_loss,
    weighted_feature_distillation_loss,
    weighted_score_distillation_loss,
)
from g2sd_hf.metrics import SegmentationMetrics, coco_detection_metrics, evaluate_detection, segmentation_predictions
from g2sd_hf.synthetic import SHAPE_CLASSES, make_shapes_dataset

from .conftest import tiny_student_config


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NORMALIZATION = ([0.5] * 3, [0.5] * 3)


def tiny_backbone_config(hidden_size=32, **overrides):
    values = dict(
        image_size=32,
        patch_size=8,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        fpn_hidden_size=32,
    )
    values.update(overrides)
    return G2SDBackboneConfig(**values)


def dense_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    values.update(overrides)
    return DenseDistillationArguments(**values)


# ---------------------------------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------------------------------
def test_backbone_pyramid_at_any_input_size():
    backbone = G2SDBackbone(tiny_backbone_config()).eval()
    outputs = backbone(torch.randn(2, 3, 70, 50))  # padded to 72 x 56: a 9 x 7 patch grid
    assert [tuple(feature.shape) for feature in outputs.feature_maps] == [
        (2, 32, 36, 28),
        (2, 32, 18, 14),
        (2, 32, 9, 7),
        (2, 32, 4, 3),
    ]
    assert backbone.channels == [32, 32, 32, 32] and backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    subset = G2SDBackbone(tiny_backbone_config(out_features=["stem", "stage4"])).eval()
    assert [tuple(feature.shape) for feature in subset(torch.randn(1, 3, 64, 64)).feature_maps] == [
        (1, 32, 8, 8),
        (1, 32, 4, 4),
    ]
    assert subset.channels == [32, 32]
    assert isinstance(AutoBackbone.from_config(tiny_backbone_config()), G2SDBackbone)
    with pytest.raises(ValueError, match="global_attention_layers"):
        tiny_backbone_config(global_attention_layers=[5])


def test_windows_covering_the_grid_equal_global_attention_and_smaller_ones_differ():
    torch.manual_seed(0)
    global_backbone = G2SDBackbone(tiny_backbone_config(window_size=0)).eval()
    pixels = torch.randn(1, 3, 64, 64)  # an 8 x 8 grid
    reference = global_backbone(pixels).feature_maps[2]
    for window, same in ((8, True), (4, False)):
        windowed = G2SDBackbone(tiny_backbone_config(window_size=window, global_attention_layers=[1])).eval()
        windowed.load_state_dict(global_backbone.state_dict())
        with torch.no_grad():
            assert torch.allclose(windowed(pixels).feature_maps[2], reference, atol=1e-5) == same


def test_windowed_backbone_gradients_match_under_gradient_checkpointing():
    torch.manual_seed(0)
    backbone = G2SDBackbone(
        tiny_backbone_config(window_size=4, global_attention_layers=[1], drop_path_rate=0.3)
    ).train()
    pixels = torch.randn(2, 3, 48, 40)  # a 6 x 5 grid: windows of 4 need padding

    def gradients():
        backbone.zero_grad()
        torch.manual_seed(1)  # the same stochastic-depth draws in both runs
        sum(feature.square().mean() for feature in backbone(pixels).feature_maps).backward()
        return {
            name: parameter.grad.clone()
            for name, parameter in backbone.named_parameters()
            if parameter.grad is not None
        }

    plain = gradients()
    backbone.gradient_checkpointing_enable()
    assert backbone.g2sd.layers[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_backbone_loads_the_encoder_of_a_generic_checkpoint(tmp_path):
    generic = G2SDForGenericDistillation(tiny_student_config(hidden_size=32, intermediate_size=64))
    generic.save_pretrained(tmp_path)
    backbone = G2SDBackbone.from_pretrained(tmp_path, fpn_hidden_size=32)
    for name, value in generic.g2sd.state_dict().items():
        torch.testing.assert_close(backbone.g2sd.state_dict()[name], value, rtol=0, atol=0)
    model = semantic_segmentation_model(tiny_backbone_config(), num_labels=4, hidden_size=16)
    load_backbone_weights(model, str(tmp_path))
    torch.testing.assert_close(
        find_backbone(model).g2sd.layers[1].mlp.fc2.weight, generic.g2sd.layers[1].mlp.fc2.weight
    )


@pytest.mark.parametrize("head", ["upernet", "deformable-detr", "rt-detr", "mask2former"])
def test_heads_run_forward_and_backward_on_a_g2sd_backbone(head):
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    boxes = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])}
    ] * 2
    if head == "upernet":
        model = semantic_segmentation_model(
            tiny_backbone_config(window_size=2, global_attention_layers=[1]), 4, hidden_size=16
        )
        outputs = model(pixel_values=pixels, labels=torch.randint(0, 4, (2, 64, 64)))
        assert outputs.logits.shape == (2, 4, 64, 64)
    elif head == "mask2former":
        model = universal_segmentation_model(
            tiny_backbone_config(),
            3,
            hidden_size=32,
            encoder_layers=1,
            decoder_layers=2,
            num_queries=5,
            encoder_feedforward_dim=32,
            dim_feedforward=32,
            num_attention_heads=2,
        )
        outputs = model(
            pixel_values=pixels,
            mask_labels=[torch.randint(0, 2, (2, 64, 64)).float()] * 2,
            class_labels=[torch.tensor([0, 2])] * 2,
        )
        assert outputs.class_queries_logits.shape == (2, 5, 4)
    else:
        model = object_detection_model(
            tiny_backbone_config(),
            3,
            head,
            hidden_size=32,
            num_queries=10,
            encoder_layers=1,
            decoder_layers=2,
            **(
                {"encoder_ffn_dim": 32, "decoder_ffn_dim": 32}
                if head == "deformable-detr"
                else {"decoder_ffn_dim": 32, "encoder_ffn_dim": 32}
            ),
        )
        outputs = model(pixel_values=pixels, pixel_mask=torch.ones(2, 64, 64, dtype=torch.long), labels=boxes)
        logits, boxes = detector_queries(outputs)  # RT-DETR adds denoising queries in training
        assert logits.shape[:2] == (2, 10) and boxes.shape == (2, 10, 4)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    backbone = find_backbone(model)
    assert backbone.g2sd.layers[0].attention.qkv.weight.grad is not None
    assert backbone.pyramid.output_layers[-1][0].weight.grad is not None


def test_layer_decay_reaches_the_backbone_inside_a_head(tmp_path):
    model = semantic_segmentation_model(tiny_backbone_config(), 4, hidden_size=16)
    trainer = DenseDistillationTrainer(model=model, args=dense_args(tmp_path, layer_decay=0.5, learning_rate=1e-3))
    optimizer = trainer.create_optimizer()
    group_of = {id(parameter): group for group in optimizer.param_groups for parameter in group["params"]}
    named = dict(model.named_parameters())
    assert group_of[id(named["backbone.g2sd.embeddings.patch_embeddings.projection.weight"])]["lr"] == pytest.approx(
        1e-3 * 0.5**3
    )
    assert group_of[id(named["backbone.g2sd.layers.1.mlp.fc1.weight"])]["lr"] == pytest.approx(1e-3 * 0.5)
    assert group_of[id(named["backbone.pyramid.output_layers.0.0.weight"])]["lr"] == pytest.approx(1e-3)
    assert group_of[id(named["decode_head.classifier.weight"])]["lr"] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------
def test_weighted_feature_loss_by_hand():
    student = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    teacher = [torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]]), torch.full((1, 2, 1, 1), 3.0)]
    weights = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # only the top-left location counts at level 0
    # Level 0: location (0, 0) has squared errors 1 and 1 -> 1. Level 1: the weights' mean 0.25, error 9 -> 9.
    assert weighted_feature_distillation_loss(student, teacher, weights).item() == pytest.approx((1.0 + 9.0) / 2)
    assert weighted_feature_distillation_loss(student, teacher).item() == pytest.approx(((1 + 4 + 1) / 8 + 9) / 2)
    with pytest.raises(ValueError, match="fpn_hidden_size"):
        weighted_feature_distillation_loss([torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 3, 2, 2)])
    # A coarser level gets the weights averaged over the area each of its locations covers (not bilinear samples).
    weights = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    errors = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # squared errors 1, 4, 9, 16 at the 2x2 level
    pooled = torch.tensor([1.0, 0.0, 0.0, 1.0])  # area means of the 4x4 weights over each 2x2 cell
    expected = float((pooled * errors.flatten() ** 2).sum() / pooled.sum())
    loss = weighted_feature_distillation_loss([torch.zeros(1, 1, 2, 2)], [errors], weights)
    assert loss.item() == pytest.approx(expected) and expected == pytest.approx(8.5)


def test_pixel_kl_and_weighted_bce_by_hand():
    student, teacher = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    expected = 0.0
    for b in range(2):
        for y in range(4):
            for x in range(5):
                p, q = F.softmax(teacher[b, :, y, x] / 2, 0), F.softmax(student[b, :, y, x] / 2, 0)
                expected += float((p * (p / q).log()).sum())
    assert pixel_distillation_loss(student, teacher, temperature=2.0).item() == pytest.approx(
        expected / 40 * 4, rel=1e-4
    )
    scores_s, scores_t = torch.tensor([[[[0.2]], [[0.9]]]]), torch.tensor([[[[0.5]], [[1.0]]]])
    bce = -(0.5 * math.log(0.2) + 0.5 * math.log(0.8) + math.log(0.9)) / 2
    assert weighted_score_distillation_loss(scores_s, scores_t, torch.ones(1, 1, 1)).item() == pytest.approx(
        bce, rel=1e-5
    )


def test_box_score_maps_project_query_scores_onto_covered_locations():
    probabilities = torch.tensor([[[0.9, 0.1], [0.2, 0.6], [0.05, 0.05]]])  # 3 queries, 2 classes
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.75, 0.75, 0.1, 0.1]]])
    maps = box_score_maps(probabilities, boxes, (2, 2), top_queries=2)  # the third query is dropped
    expected_class0 = torch.tensor([[0.9, 0.2], [0.2, 0.2]])  # query 0 covers the top-left cell only
    torch.testing.assert_close(maps[0, 0], expected_class0)
    torch.testing.assert_close(maps[0, 1], torch.full((2, 2), 0.6))
    # More queries than one chunk: the running maximum equals the maximum over all queries at once.
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(2, 40, 3, generator=generator)
    boxes = torch.cat(
        [torch.rand(2, 40, 2, generator=generator), torch.rand(2, 40, 2, generator=generator) * 0.6], dim=-1
    )
    maps = box_score_maps(probabilities, boxes, (5, 6), top_queries=37)
    top = probabilities.amax(-1).topk(37, dim=1).indices
    kept_probabilities = probabilities.gather(1, top[..., None].expand(-1, -1, 3))
    kept_boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
    ys, xs = (torch.arange(5) + 0.5) / 5, (torch.arange(6) + 0.5) / 6
    inside_x = (xs >= kept_boxes[..., :1] - kept_boxes[..., 2:3] / 2) & (
        xs <= kept_boxes[..., :1] + kept_boxes[..., 2:3] / 2
    )
    inside_y = (ys >= kept_boxes[..., 1:2] - kept_boxes[..., 3:4] / 2) & (
        ys <= kept_boxes[..., 1:2] + kept_boxes[..., 3:4] / 2
    )
    covers = (inside_y[..., :, None] & inside_x[..., None, :]).float()
    reference = (kept_probabilities[..., None, None] * covers[:, :, None]).amax(dim=1)
    torch.testing.assert_close(maps, reference)


def test_release_feature_and_score_losses_by_hand():
    student = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    teacher = [torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]]), torch.full((1, 2, 1, 1), 3.0)]
    weights = [torch.tensor([[[1.0, 0.5], [0.0, 0.0]]]), torch.tensor([[[2.0]]])]
    # Level 0: (1 * (1 + 1) + 0.5 * 4) / 1.5; level 1: 2 * (9 + 9) / 2. Summed over channels and levels.
    assert release_feature_distillation_loss(student, teacher, weights).item() == pytest.approx(4 / 1.5 + 18)
    scores_s, scores_t = [torch.tensor([[[[0.2]], [[0.9]]]])], [torch.tensor([[[[0.5]], [[1.0]]]])]
    bce = -(0.5 * math.log(0.2) + 0.5 * math.log(0.8) + math.log(0.9))  # summed over the two classes
    assert release_score_distillation_loss(scores_s, scores_t, [torch.full((1, 1, 1), 0.7)]).item() == pytest.approx(
        bce, rel=1e-5
    )


def test_channel_wise_distillation_has_the_gradient_of_the_release_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 4, 5)
    loss = channel_wise_distillation_loss(student, teacher, temperature=2.0)
    (ours,) = torch.autograd.grad(loss, student)
    # The release's ChannelWiseDivergence: sum(-softmax(t/tau) * log_softmax(s/tau)) * tau^2 / (C * N), over H*W.
    flat_s, flat_t = student.reshape(-1, 20) / 2.0, teacher.reshape(-1, 20) / 2.0
    release = (-(F.softmax(flat_t, dim=1) * F.log_softmax(flat_s, dim=1))).sum() * 4.0 / 6
    (theirs,) = torch.autograd.grad(release, student)
    torch.testing.assert_close(ours, theirs)
    entropy = (-(F.softmax(flat_t, dim=1) * F.log_softmax(flat_t, dim=1))).sum() * 4.0 / 6
    assert loss.item() == pytest.approx((release - entropy).item(), rel=1e-5)  # KL = cross-entropy - entropy


# ---------------------------------------------------------------------------------------------------------------------
# The trainer with a teacher
# ---------------------------------------------------------------------------------------------------------------------
def shapes(size, transform, seed=0, image_size=32):
    return make_shapes_dataset(size, image_size, seed=seed).with_transform(transform)


def segmentation_pair(tmp_path, **overrides):
    torch.manual_seed(0)
    teacher = semantic_segmentation_model(tiny_backbone_config(hidden_size=64), 4, hidden_size=16).eval()
    student = semantic_segmentation_model(tiny_backbone_config(), 4, hidden_size=16)
    dataset = (
        make_shapes_dataset(8, 32)
        .rename_column("semantic_mask", "mask")
        .with_transform(SegmentationTransform(32, *NORMALIZATION, False))
    )
    trainer = DenseDistillationTrainer(model=student, teacher=teacher, args=dense_args(tmp_path, **overrides))
    batch = collate_segmentation([dataset[index] for index in range(4)])
    return trainer, student, teacher, batch


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


def detector(hidden):
    return object_detection_model(
        tiny_backbone_config(hidden_size=hidden),
        3,
        hidden_size=32,
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
    )


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

        def build(hidden):
            return object_detection_model(
                tiny_backbone_config(hidden_size=hidden),
                3,
                hidden_size=32,
                num_queries=10,
                encoder_layers=1,
                decoder_layers=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
            )

        transform, collate = DetectionTransform(32, *NORMALIZATION, True), collate_detection
    else:

        def build(hidden):
            return universal_segmentation_model(
                tiny_backbone_config(hidden_size=hidden),
                3,
                hidden_size=32,
                encoder_layers=1,
                decoder_layers=2,
                num_queries=5,
                encoder_feedforward_dim=32,
                dim_feedforward=32,
                num_attention_heads=2,
            )

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


# ---------------------------------------------------------------------------------------------------------------------
# Learning the generated shapes, and the metrics
# ---------------------------------------------------------------------------------------------------------------------
def test_generated_shapes_have_exact_masks_and_boxes():
    example = make_shapes_dataset(3, 48, seed=5)[1]
    semantic, instance = np.asarray(example["semantic_mask"]), np.asarray(example["instance_mask"])
    for box, category, area, identity in zip(*(example["objects"][key] for key in ("bbox", "category", "area", "id"))):
        rows, columns = np.nonzero(instance == identity)
        assert [columns.min(), rows.min(), columns.max() - columns.min() + 1, rows.max() - rows.min() + 1] == box
        assert area == len(rows) and set(semantic[rows, columns]) == {category + 1}
    assert (semantic > 0).sum() == (instance > 0).sum()
    again = make_shapes_dataset(3, 48, seed=5)[1]
    assert np.array_equal(np.asarray(again["image"]), np.asarray(example["image"]))


def test_segmentation_masks_keep_indices_and_reduce_labels(tmp_path):
    from PIL import Image

    from g2sd_hf.dense_data import load_segmentation_dataset

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "images" / "a.jpg")
    labels = np.array([[0, 1, 2, 255]] * 4, dtype=np.uint8)
    palette = Image.fromarray(labels, mode="P")
    palette.putpalette(
        [value for index in range(256) for value in (index * 7 % 256, 0, 0)]
    )  # colors are not the classes
    palette.save(tmp_path / "masks" / "a.png")
    splits, names = load_segmentation_dataset(train_dir=str(tmp_path))
    assert names == [] and len(splits["validation"]) == 1
    plain = SegmentationTransform(4, *NORMALIZATION, False)(splits["train"][:1])["labels"][0]
    reduced = SegmentationTransform(4, *NORMALIZATION, False, reduce_labels=True)(splits["train"][:1])["labels"][0]
    assert plain[0].tolist() == [0, 1, 2, 255] and reduced[0].tolist() == [255, 0, 1, 255]
    with pytest.raises(ValueError, match="--reduce_labels"):  # label 2 with 2 classes: a missing --reduce_labels, say
        SegmentationTransform(4, *NORMALIZATION, False, num_labels=2)(splits["train"][:1])
    assert (
        SegmentationTransform(4, *NORMALIZATION, False, True, num_labels=2)(splits["train"][:1])["labels"][0].max()
        == 255
    )
    for mode in ("RGB", "LA"):
        Image.new(mode, (4, 4)).save(tmp_path / "masks" / "a.png")
        with pytest.raises(ValueError, match=r"a\.png has mode " + mode):
            SegmentationTransform(4, *NORMALIZATION, False)(splits["train"][:1])
    (tmp_path / "masks" / "a.png").rename(tmp_path / "masks" / "b.png")
    with pytest.raises(ValueError, match="No mask"):
        load_segmentation_dataset(train_dir=str(tmp_path))


def test_detection_folder_keeps_area_and_crowds_and_images_are_upright(tmp_path):
    import json

    from PIL import Image

    from g2sd_hf.data import open_rgb_image
    from g2sd_hf.dense_data import image_size_of, load_detection_dataset

    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high, shown rotated: 20 wide x 40 high
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "images" / "a.jpg", exif=exif)
    (tmp_path / "annotations.json").write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 20}],
                "categories": [{"id": 3, "name": "cell"}],
                "annotations": [
                    {"image_id": 7, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 60.0, "iscrowd": 0},
                    {"image_id": 7, "category_id": 3, "bbox": [0, 20, 20, 20], "area": 400.0, "iscrowd": 1},
                ],
            }
        )
    )
    splits, names = load_detection_dataset(train_dir=str(tmp_path))
    objects = splits["train"][0]["objects"]
    assert names == ["cell"] and objects["area"] == [60.0, 400.0] and objects["iscrowd"] == [0, 1]
    raw = splits["train"].cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert (
        image_size_of(raw) == (40, 20)
        and open_rgb_image(raw).size == (20, 40)
        and splits["train"][0]["image"].size == (20, 40)
    )
    train = DetectionTransform(16, *NORMALIZATION, True)(splits["train"][:1])["labels"][0]
    evaluation = DetectionTransform(16, *NORMALIZATION, False)(splits["train"][:1])["labels"][0]
    assert train["class_labels"].tolist() == [0] and evaluation["class_labels"].tolist() == [
        0,
        0,
    ]  # crowds: not trained on
    torch.testing.assert_close(evaluation["boxes"][0], torch.tensor([0.25, 0.125, 0.5, 0.25]))  # normalized by 20 x 40


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


def test_dense_example_scripts_with_and_without_a_teacher(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import run_object_detection
    import run_semantic_segmentation

    tiny = "image_size=32,patch_size=8,hidden_size={},num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
    common = [
        "--image_size",
        "32",
        "--fpn_hidden_size",
        "32",
        "--head_hidden_size",
        "32",
        "--synthetic_train_size",
        "16",
        "--synthetic_validation_size",
        "8",
        "--dataset_name",
        "synthetic-shapes",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
        "--do_train",
        "--do_eval",
    ]
    for script, extra in (
        (run_semantic_segmentation, []),
        (run_object_detection, ["--num_queries", "10", "--encoder_layers", "1", "--decoder_layers", "2"]),
    ):
        teacher = tmp_path / f"{script.__name__}-teacher"
        metrics = script.main(["--output_dir", str(teacher), "--backbone_overrides", tiny.format(64), *common, *extra])
        assert ("eval_mean_iou" in metrics) or ("eval_map" in metrics)
        student = tmp_path / f"{script.__name__}-student"
        metrics = script.main(
            [
                "--output_dir",
                str(student),
                "--backbone_overrides",
                tiny.format(32),
                "--teacher_name_or_path",
                str(teacher),
                *common,
                *extra,
            ]
        )
        assert "score_distillation_loss" in (student / "trainer_state.json").read_text()
    card = (tmp_path / "run_semantic_segmentation-student" / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "specific distillation for semantic segmentation" in card
    assert "- type: mean_iou" in card and "| mean_iou |" in card
    detection_card = (tmp_path / "run_object_detection-teacher" / "README.md").read_text()
    assert (
        "pipeline_tag: object-detection" in detection_card
        and "| map_50 |" in detection_card
        and "- type: map" in detection_card
    )
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / "run_semantic_segmentation-student")
    assert isinstance(find_backbone(reloaded), G2SDBackbone)


def test_dense_demo_smoke_scale_writes_its_tables_and_reuses_finished_stages(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import run_dense_demo

    first = run_dense_demo.main(["--output_dir", str(tmp_path), "--scale", "smoke"])
    table = (tmp_path / "dense_results.md").read_text()
    assert "| Student, distilled from the teacher |" in table and "## Detection" in table and "mean_iou" in table
    assert all(not row["reused"] for rows in first["tasks"].values() for row in rows.values())
    again = run_dense_demo.main(["--output_dir", str(tmp_path), "--scale", "smoke"])
    assert all(row["reused"] for rows in again["tasks"].values() for row in rows.values())
    assert (
        again["tasks"]["segmentation"]["distilled"]["mean_iou"]
        == first["tasks"]["segmentation"]["distilled"]["mean_iou"]
    )
