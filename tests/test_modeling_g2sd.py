"""G2SD models: shapes, masking, position embeddings, attention back-ends, parameter counts, save/load, Auto classes."""

import logging

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining
from transformers import logging as transformers_logging

from g2sd_hf import G2SDConfig, G2SDForGenericDistillation, G2SDForImageClassification, G2SDModel
from g2sd_hf.configuration_g2sd import G2SD_PRESETS
from g2sd_hf.modeling_g2sd import get_2d_sincos_position_embeddings, random_masking

from .conftest import IMAGE_SIZE, NUM_PATCHES, tiny_student_config


class G2SDModelTester:
    batch_size = 4

    def __init__(self, **config_overrides):
        self.config = tiny_student_config(**config_overrides)

    def create_and_check_model(self, pixel_values):
        model = G2SDModel(self.config).eval()
        outputs = model(pixel_values, output_hidden_states=True)
        assert outputs.last_hidden_state.shape == (self.batch_size, 1 + NUM_PATCHES, self.config.hidden_size)
        assert outputs.pooler_output.shape == (self.batch_size, self.config.hidden_size)
        assert len(outputs.hidden_states) == self.config.num_hidden_layers + 1
        torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0])
        assert outputs.mask is None and outputs.ids_restore is None

    def create_and_check_masked_model(self, pixel_values, noise):
        model = G2SDModel(self.config).eval()
        outputs = model(pixel_values, mask_ratio=0.75, noise=noise)
        num_visible = int(NUM_PATCHES * 0.25)
        assert outputs.last_hidden_state.shape == (self.batch_size, 1 + num_visible, self.config.hidden_size)
        assert outputs.mask.shape == (self.batch_size, NUM_PATCHES)
        torch.testing.assert_close(
            outputs.mask.sum(1), torch.full((self.batch_size,), float(NUM_PATCHES - num_visible))
        )

    def create_and_check_generic_distillation(self, pixel_values, noise):
        model = G2SDForGenericDistillation(self.config).eval()
        targets = torch.randn(self.batch_size, 1 + NUM_PATCHES, self.config.target_hidden_size)
        outputs = model(pixel_values, noise=noise, teacher_targets=targets)
        assert outputs.predicted_features.shape == targets.shape
        assert outputs.loss.shape == ()
        assert model(pixel_values, noise=noise).loss is None

    def create_and_check_image_classification(self, pixel_values):
        config = tiny_student_config(num_labels=5, use_distillation_token=True)
        model = G2SDForImageClassification(config).eval()
        labels = torch.tensor([0, 1, 4, 2])
        outputs = model(pixel_values, labels=labels)
        assert outputs.logits.shape == outputs.cls_logits.shape == outputs.distillation_logits.shape == (4, 5)
        torch.testing.assert_close(outputs.logits, (outputs.cls_logits + outputs.distillation_logits) / 2)
        expected_loss = torch.nn.functional.cross_entropy(outputs.logits, labels)
        torch.testing.assert_close(outputs.loss, expected_loss)


@pytest.fixture
def tester():
    return G2SDModelTester()


def test_model(tester, pixel_values):
    tester.create_and_check_model(pixel_values)


def test_masked_model(tester, pixel_values, noise):
    tester.create_and_check_masked_model(pixel_values, noise)


def test_generic_distillation_model(tester, pixel_values, noise):
    tester.create_and_check_generic_distillation(pixel_values, noise)


def test_image_classification_with_distillation_token(tester, pixel_values):
    tester.create_and_check_image_classification(pixel_values)


def test_mean_pooling_classifier_uses_fc_norm_of_patch_mean(pixel_values):
    model = G2SDForImageClassification(tiny_student_config(num_labels=3, use_mean_pooling=True)).eval()
    outputs = model.g2sd(pixel_values)
    expected = model.g2sd.fc_norm(outputs.last_hidden_state[:, 1:].mean(1))
    torch.testing.assert_close(outputs.pooler_output, expected)
    assert not hasattr(model.g2sd, "layernorm")


def mae_reference_sincos(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py, written out in numpy."""

    def one_d(dim, positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    grid = np.stack(
        np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), axis=0
    )
    embeddings = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), embeddings], axis=0)


def test_sincos_position_embeddings_match_mae():
    ours = get_2d_sincos_position_embeddings(32, (4, 4)).numpy()
    np.testing.assert_allclose(ours, mae_reference_sincos(32, 4), atol=1e-6)
    model = G2SDForGenericDistillation(tiny_student_config())
    np.testing.assert_allclose(
        model.g2sd.embeddings.position_embeddings[0].detach().numpy(), mae_reference_sincos(16, 4), atol=1e-6
    )
    np.testing.assert_allclose(
        model.decoder.position_embeddings[0].detach().numpy(), mae_reference_sincos(16, 4), atol=1e-6
    )


def test_random_masking_keeps_smallest_noise_and_restores_order(noise):
    sequence = torch.arange(NUM_PATCHES, dtype=torch.float32).view(1, NUM_PATCHES, 1).repeat(4, 1, 3)
    visible, mask, ids_restore = random_masking(sequence, 0.75, noise)
    kept = noise.argsort(dim=1)[:, :4]
    torch.testing.assert_close(visible[..., 0], kept.float())
    for row in range(4):
        assert set(torch.nonzero(mask[row] == 0).flatten().tolist()) == set(kept[row].tolist())
    torch.testing.assert_close(noise.argsort(1).gather(1, ids_restore), torch.arange(NUM_PATCHES).expand(4, -1))
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(sequence, 0.75, noise[:, :3])


def test_student_and_transformers_mae_mask_identically(pixel_values, noise):
    from .conftest import tiny_mae_teacher

    mae = tiny_mae_teacher()
    teacher_outputs = mae.vit(pixel_values, noise=noise)
    student_outputs = G2SDModel(tiny_student_config())(pixel_values, mask_ratio=mae.config.mask_ratio, noise=noise)
    torch.testing.assert_close(student_outputs.mask, teacher_outputs.mask)
    torch.testing.assert_close(student_outputs.ids_restore, teacher_outputs.ids_restore)


@pytest.mark.parametrize("implementation", ["eager", "flex_attention"])
def test_attention_implementations_agree_with_sdpa(implementation, pixel_values):
    torch.manual_seed(0)
    sdpa = G2SDForImageClassification(tiny_student_config(num_labels=3, use_distillation_token=True)).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    other = G2SDForImageClassification(sdpa.config).eval()
    other.load_state_dict(sdpa.state_dict())
    other.set_attn_implementation(implementation)
    assert other.config._attn_implementation == implementation
    with torch.no_grad():  # flex attention has no CPU backward
        torch.testing.assert_close(other(pixel_values).logits, sdpa(pixel_values).logits, atol=1e-5, rtol=1e-5)


def test_eager_attention_returns_probabilities(pixel_values):
    model = G2SDModel(tiny_student_config()).eval()
    model.set_attn_implementation("eager")
    attentions = model(pixel_values, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (4, 2, 1 + NUM_PATCHES, 1 + NUM_PATCHES)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(4, 2, 1 + NUM_PATCHES))


@pytest.mark.parametrize(
    "preset,distillation_token,expected_millions",
    [
        ("vit_tiny_patch16", False, 5.72),
        ("vit_tiny_patch16", True, 5.91),
        ("vit_small_patch16", False, 22.05),
        ("vit_small_patch16", True, 22.44),
        ("vit_base_patch16", False, 86.57),
    ],
)
def test_paper_parameter_counts(preset, distillation_token, expected_millions):
    config = G2SDConfig.from_preset(preset, num_labels=1000, use_distillation_token=distillation_token)
    model = G2SDForImageClassification(config)
    assert round(model.num_parameters() / 1e6, 2) == expected_millions


def test_official_student_architectures():
    tiny = G2SDConfig.from_preset("vit_tiny_patch16_dec128d4b")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads, tiny.intermediate_size) == (
        192,
        12,
        3,
        768,
    )
    assert (tiny.decoder_hidden_size, tiny.decoder_num_hidden_layers, tiny.decoder_num_attention_heads) == (128, 4, 4)
    small = G2SDConfig.from_preset("g2sd-small")
    assert (
        small.hidden_size,
        small.num_attention_heads,
        small.decoder_hidden_size,
        small.decoder_num_attention_heads,
    ) == (384, 6, 256, 8)
    assert small.layer_norm_eps == 1e-6 and small.qkv_bias and small.target_hidden_size == 512
    assert set(G2SD_PRESETS) >= {
        "vit_tiny_patch16_dec128d4b",
        "vit_small_patch16_dec256d4b",
        "vit_base_patch16_dec512d8b",
    }
    with pytest.raises(ValueError, match="Unknown G2SD preset"):
        G2SDConfig.from_preset("vit_gigantic")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"mask_ratio": -0.1}, "mask_ratio must be in"),
        ({"mask_ratio": 0.0, "feature_loss_tokens": "masked"}, "a loss that is always 0"),
        ({"mask_ratio": 0.99}, "leaves no visible patch of the 16"),
        ({"hidden_size": 18, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"image_size": 30}, "not divisible by patch_size"),
        ({"use_distillation_token": True, "use_mean_pooling": True}, "cannot both be set"),
        ({"feature_loss_tokens": "cls"}, "feature_loss_tokens"),
    ],
)
def test_config_refuses_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_student_config(**overrides)


def test_generic_distillation_without_masking(pixel_values):
    model = G2SDForGenericDistillation(tiny_student_config(mask_ratio=0.0)).eval()
    outputs = model(pixel_values, noise=torch.rand(4, NUM_PATCHES))
    assert outputs.mask.sum() == 0 and outputs.predicted_features.shape == (4, 1 + NUM_PATCHES, 24)


def test_residual_stream_stays_float32_under_autocast(pixel_values, noise):
    model = G2SDForGenericDistillation(tiny_student_config()).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(pixel_values, noise=noise, output_hidden_states=True)
    assert all(hidden.dtype == torch.float32 for hidden in outputs.hidden_states)  # as MAE and timm under autocast


def test_generic_distillation_model_refuses_classifier_options():
    with pytest.raises(ValueError, match="use_distillation_token=False"):
        G2SDForGenericDistillation(tiny_student_config(use_distillation_token=True))


def test_fixed_position_embeddings_get_no_gradient_and_stay_frozen_after_loading(tmp_path, pixel_values, noise):
    model = G2SDForGenericDistillation(tiny_student_config())
    outputs = model(pixel_values, noise=noise, teacher_targets=torch.randn(4, 1 + NUM_PATCHES, 24))
    outputs.loss.backward()
    assert model.g2sd.embeddings.position_embeddings.grad is None
    assert model.decoder.position_embeddings.grad is None
    assert model.g2sd.layers[0].attention.qkv.weight.grad is not None
    model.save_pretrained(tmp_path)
    reloaded = G2SDForGenericDistillation.from_pretrained(tmp_path)
    assert not reloaded.g2sd.embeddings.position_embeddings.requires_grad
    assert not reloaded.decoder.position_embeddings.requires_grad
    # The classifier learns its position embeddings (MAE fine-tuning).
    classifier = G2SDForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert classifier.g2sd.embeddings.position_embeddings.requires_grad


@pytest.mark.parametrize("model_class", [G2SDForGenericDistillation, G2SDForImageClassification])
def test_save_load_round_trip_is_exact(model_class, tmp_path, pixel_values, noise):
    config = tiny_student_config(num_labels=3, drop_path_rate=0.1)
    if model_class is G2SDForImageClassification:
        config.use_distillation_token = True
    model = model_class(config).eval()
    model.save_pretrained(tmp_path)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for key in original_state:
        torch.testing.assert_close(reloaded_state[key], original_state[key], rtol=0, atol=0)
    kwargs = {"noise": noise} if model_class is G2SDForGenericDistillation else {}
    first, second = model(pixel_values, **kwargs), reloaded(pixel_values, **kwargs)
    torch.testing.assert_close(first[1], second[1], rtol=0, atol=0)
    assert reloaded.config.drop_path_rate == 0.1


def test_classifier_from_generic_checkpoint_keeps_encoder_and_says_so(tmp_path, pixel_values, caplog):
    generic = G2SDForGenericDistillation(tiny_student_config())
    generic.save_pretrained(tmp_path)
    transformers_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        classifier = G2SDForImageClassification.from_pretrained(tmp_path, num_labels=4, use_distillation_token=True)
    assert "decoder and feature head are dropped" in caplog.text
    generic_encoder = generic.g2sd.state_dict()
    for key, value in classifier.g2sd.state_dict().items():
        if key in generic_encoder:
            torch.testing.assert_close(value, generic_encoder[key], rtol=0, atol=0)
    assert classifier.g2sd.embeddings.distillation_token is not None
    assert not any(
        name.startswith("decoder") or name.startswith("feature_head") for name, _ in classifier.named_parameters()
    )


def test_auto_classes_load_g2sd_checkpoints(tmp_path):
    config = tiny_student_config(num_labels=2)
    G2SDForImageClassification(config).save_pretrained(tmp_path / "classifier")
    G2SDForGenericDistillation(tiny_student_config()).save_pretrained(tmp_path / "generic")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "classifier"), G2SDConfig)
    assert isinstance(
        AutoModelForImageClassification.from_pretrained(tmp_path / "classifier"), G2SDForImageClassification
    )
    assert isinstance(AutoModel.from_pretrained(tmp_path / "classifier"), G2SDModel)
    assert isinstance(AutoModelForPreTraining.from_pretrained(tmp_path / "generic"), G2SDForGenericDistillation)


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values, noise):
    torch.manual_seed(0)
    model = G2SDForGenericDistillation(tiny_student_config()).train()
    targets = torch.randn(4, 1 + NUM_PATCHES, 24)

    def gradients():
        model.zero_grad()
        model(pixel_values, noise=noise, teacher_targets=targets).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.g2sd.layers[0].gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_interpolate_pos_encoding_runs_at_another_resolution():
    model = G2SDForImageClassification(tiny_student_config(num_labels=3)).eval()
    larger = torch.randn(2, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(larger)
    assert model(larger, interpolate_pos_encoding=True).logits.shape == (2, 3)
    same = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(model(same, interpolate_pos_encoding=True).logits, model(same).logits)


def test_wrong_channel_count_is_named():
    model = G2SDModel(tiny_student_config())
    with pytest.raises(ValueError, match="Expected 3 image channels, got 1"):
        model(torch.randn(1, 1, IMAGE_SIZE, IMAGE_SIZE))
