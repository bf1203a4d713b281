"""Loading saved classifiers: a checkpoint without the encoder's weights or (where it is used as is) without a trained
head is refused, never run with random weights."""

import logging

import pytest
from transformers import AutoModelForImageClassification

from g2sd_hf import G2SDForGenericDistillation, G2SDForImageClassification, export_to_transformers
from g2sd_hf.checkpoints import load_image_classifier

from .conftest import tiny_mae_teacher, tiny_student_config


@pytest.fixture
def saved(tmp_path):
    tiny_mae_teacher().save_pretrained(tmp_path / "mae")
    G2SDForGenericDistillation(tiny_student_config()).save_pretrained(tmp_path / "generic")
    G2SDForImageClassification(tiny_student_config(num_labels=3)).save_pretrained(tmp_path / "classifier")
    return tmp_path


def test_an_mae_checkpoint_is_not_a_student(saved):
    with pytest.raises(ValueError, match=r"mae does not hold the weights of a G2SDForImageClassification: \d+ of its encoder's weights are missing"):
        load_image_classifier(str(saved / "mae"), G2SDForImageClassification, new_head="warn")


def test_a_generic_checkpoint_has_no_head_to_score_or_export(saved, caplog):
    with pytest.raises(ValueError, match="has no trained classification head .*classifier.weight"):
        load_image_classifier(str(saved / "generic"), AutoModelForImageClassification)
    with pytest.raises(ValueError, match="has no trained classification head"):
        export_to_transformers(str(saved / "generic"), str(saved / "exported"))
    assert not (saved / "exported").exists()
    with caplog.at_level(logging.WARNING):
        model = load_image_classifier(str(saved / "generic"), G2SDForImageClassification, new_head="warn", num_labels=3)
    assert isinstance(model, G2SDForImageClassification) and "classification head" in caplog.text and "is new" in caplog.text


def test_a_fine_tuned_classifier_loads_as_is(saved):
    model = load_image_classifier(str(saved / "classifier"))
    assert isinstance(model, G2SDForImageClassification) and model.config.num_labels == 3
