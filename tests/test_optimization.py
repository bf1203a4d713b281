"""Parameter groups: the G2SD models declare them (no_weight_decay / group_matcher), other models by the name rule."""

import pytest

from g2sd_hf import G2SDForImageClassification, optimization
from g2sd_hf.dense_models import semantic_segmentation_model
from g2sd_hf.optimization import FINE_TUNING_NO_DECAY_NAMES, declared_groups, parameter_groups

from .conftest import tiny_classifier_teacher, tiny_student_config
from .dense_helpers import detector, tiny_backbone_config


def settings(model, **kwargs) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr_scale, weight_decay)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = parameter_groups(model, 1e-3, 0.05, **kwargs)
    return {names[id(p)]: (group["lr_scale"], group["weight_decay"]) for group in groups for p in group["params"]}


def classifier():
    return G2SDForImageClassification(tiny_student_config(num_labels=3, use_distillation_token=True))


@pytest.mark.parametrize("build", [classifier, lambda: semantic_segmentation_model(tiny_backbone_config(), 4)])
def test_declared_groups_are_the_release_rule(build, monkeypatch):
    model = build()
    prefix, owner = declared_groups(model)
    assert prefix in ("", "backbone.") and owner.no_weight_decay()
    fine_tuning = dict(layer_decay=0.75, no_decay_names=FINE_TUNING_NO_DECAY_NAMES)
    declared = settings(model, **fine_tuning)
    monkeypatch.setattr(optimization, "declared_groups", lambda model: None)  # the name rule instead
    assert declared == settings(model, **fine_tuning)
    # MAE's layer ids: embeddings layer 0, block i layer i + 1, the distillation token and the heads at the top.
    name = f"{prefix}g2sd.embeddings.cls_token"
    assert declared[name] == (0.75**3, 0.0)
    assert declared[f"{prefix}g2sd.layers.1.mlp.fc1.weight"] == (0.75, 0.05)
    if prefix == "":
        assert declared["g2sd.embeddings.distillation_token"] == (1.0, 0.0)


def test_what_the_model_declares_is_what_the_optimizer_does():
    class DecayTokens(G2SDForImageClassification):
        def no_weight_decay(self):
            return set()

    model = DecayTokens(tiny_student_config(num_labels=3))
    assert settings(model, no_decay_names=FINE_TUNING_NO_DECAY_NAMES)["g2sd.embeddings.cls_token"] == (1.0, 0.05)
    # Generic distillation asks for no exemption: tokens decay whatever the model declares.
    assert settings(classifier())["g2sd.embeddings.cls_token"] == (1.0, 0.05)


def test_models_that_declare_nothing_use_the_name_rule():
    vit = settings(tiny_classifier_teacher(), layer_decay=0.75, no_decay_names=FINE_TUNING_NO_DECAY_NAMES)
    assert declared_groups(tiny_classifier_teacher()) is None
    assert vit["vit.embeddings.cls_token"] == (0.75**3, 0.0)
    assert vit["vit.layers.0.attention.q_proj.weight"] == (0.75**2, 0.05)
    # Inside a detector only the backbone's declared names are exempt: DETR's query position embeddings decay (a
    # name fragment rule used to exempt them by accident).
    detr = settings(detector(), no_decay_names=FINE_TUNING_NO_DECAY_NAMES)
    assert detr["model.query_position_embeddings.weight"] == (1.0, 0.05)
    assert detr["model.backbone.model.g2sd.embeddings.cls_token"][1] == 0.0
