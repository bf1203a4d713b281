"""Teachers: the truncated MAE forward, the refusals, freezing and pixel-normalization conversion."""

import pytest
import torch
from transformers import ViTImageProcessor, ViTMAEModel, ViTModel

from g2sd_hf import ClassificationTeacher, MAETeacher
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .conftest import NUM_PATCHES, tiny_classifier_teacher, tiny_mae_teacher


@pytest.mark.parametrize("target_layer", [1, 2, 3])
def test_truncated_forward_equals_hidden_state_k_of_the_full_decoder(target_layer, pixel_values, noise):
    mae = tiny_mae_teacher()
    captured = {}
    handle = mae.decoder.decoder_layers[target_layer - 1].register_forward_hook(
        lambda module, args, output: captured.update(hidden=output[0] if isinstance(output, tuple) else output)
    )
    with torch.no_grad():
        mae(pixel_values, noise=noise)  # the full transformers forward: all decoder blocks and the pixel head
    handle.remove()
    expected = torch.nn.functional.layer_norm(captured["hidden"], (mae.config.decoder_hidden_size,), eps=1e-6)

    teacher = MAETeacher(mae, target_layer=target_layer)
    targets = teacher(pixel_values, noise)
    assert targets.shape == (4, 1 + NUM_PATCHES, 24)
    torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-5)
    assert not targets.is_inference()  # usable in the student's autograd graph


def test_truncated_forward_runs_only_the_blocks_it_needs(pixel_values, noise):
    mae = tiny_mae_teacher()
    calls = []
    for index, layer in enumerate(mae.decoder.decoder_layers):
        layer.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    mae.decoder.decoder_pred.register_forward_hook(lambda *args: calls.append("pixel head"))
    mae.decoder.decoder_norm.register_forward_hook(lambda *args: calls.append("decoder norm"))
    MAETeacher(mae, target_layer=2)(pixel_values, noise)
    assert calls == [0, 1]


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = MAETeacher(tiny_mae_teacher().train(), target_layer=2)
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    teacher.train()
    assert not teacher.model.training and not any(module.training for module in teacher.modules())


def test_encoder_only_teachers_are_refused(tmp_path):
    encoder_only = ViTMAEModel(tiny_mae_teacher().config)
    with pytest.raises(TypeError, match="encoder-only MAE"):
        MAETeacher(encoder_only)
    encoder_only.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lacks its MAE pre-training decoder"):
        MAETeacher.from_pretrained(tmp_path, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)


def test_from_pretrained_reads_normalization_from_the_image_processor(tmp_path, pixel_values, noise):
    mae = tiny_mae_teacher()
    mae.save_pretrained(tmp_path)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]
    ).save_pretrained(tmp_path)
    teacher = MAETeacher.from_pretrained(tmp_path, target_layer=3)
    assert teacher.image_mean == (0.5, 0.4, 0.3) and teacher.image_std == (0.2, 0.2, 0.2)
    torch.testing.assert_close(teacher(pixel_values, noise), MAETeacher(mae, target_layer=3)(pixel_values, noise))
    assert not any(parameter.requires_grad for parameter in teacher.parameters())


def test_from_pretrained_without_processor_asks_for_the_normalization(tmp_path):
    tiny_mae_teacher().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Pass image_mean= and image_std="):
        MAETeacher.from_pretrained(tmp_path)


@pytest.mark.parametrize("target_layer", [0, 4, -1])
def test_target_layer_outside_decoder_is_refused(target_layer):
    with pytest.raises(ValueError, match="between 1 and the teacher's decoder depth \\(3\\)"):
        MAETeacher(tiny_mae_teacher(), target_layer=target_layer)


def test_inputs_normalized_differently_are_converted(noise):
    raw = torch.rand(4, 3, 32, 32)  # [0, 1] pixels
    teacher_mean, teacher_std = (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
    )
    teacher = MAETeacher(tiny_mae_teacher(), target_layer=2)
    expected = teacher((raw - teacher_mean) / teacher_std, noise)

    teacher.accept_inputs_normalized_with([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    converted = teacher((raw - 0.5) / 0.5, noise)
    torch.testing.assert_close(converted, expected, atol=1e-5, rtol=1e-5)
    # Fed without conversion, the same pixels give other targets: the conversion is not a no-op.
    teacher.accept_inputs_normalized_with(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert not torch.allclose(teacher((raw - 0.5) / 0.5, noise), expected, atol=1e-3)


def test_classification_teacher_returns_frozen_logits(pixel_values):
    model = tiny_classifier_teacher()
    teacher = ClassificationTeacher(model)
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.testing.assert_close(teacher(pixel_values), expected)
    assert teacher.num_labels == 4 and not any(p.requires_grad for p in teacher.parameters())


def test_classification_teacher_without_trained_head_is_refused(tmp_path):
    backbone = ViTModel(tiny_classifier_teacher().config, add_pooling_layer=False)
    backbone.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a trained image classifier"):
        ClassificationTeacher.from_pretrained(tmp_path, image_mean=[0.5] * 3, image_std=[0.5] * 3)
