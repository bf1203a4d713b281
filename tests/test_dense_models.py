"""The dense models: the G2SD backbone's pyramid and windows, transformers' heads on it, reading their outputs."""

import pytest
import torch
from transformers import AutoBackbone

from g2sd_hf import G2SDBackbone, G2SDForGenericDistillation
from g2sd_hf.dense_models import (
    box_score_maps,
    detector_queries,
    find_backbone,
    load_backbone_weights,
    object_detection_model,
    semantic_segmentation_model,
)
from g2sd_hf.dense_trainer import (
    DenseDistillationTrainer,
)

from .conftest import tiny_student_config
from .dense_helpers import dense_args, mask2former, tiny_backbone_config


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
        model = mask2former()
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
