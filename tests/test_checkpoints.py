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
    with pytest.raises(
        ValueError,
        match=r"mae does not hold the weights of a G2SDForImageClassification: \d+ of its encoder's weights are missing",
    ):
        load_image_classifier(str(saved / "mae"), G2SDForImageClassification, new_head="warn")


def test_a_generic_checkpoint_has_no_head_to_score_or_export(saved, caplog):
    with pytest.raises(ValueError, match="has no trained classification head .*classifier.weight"):
        load_image_classifier(str(saved / "generic"), AutoModelForImageClassification)
    with pytest.raises(ValueError, match="has no trained classification head"):
        export_to_transformers(str(saved / "generic"), str(saved / "exported"))
    assert not (saved / "exported").exists()
    with caplog.at_level(logging.WARNING):
        model = load_image_classifier(
            str(saved / "generic"), G2SDForImageClassification, new_head="warn", num_labels=3
        )
    assert (
        isinstance(model, G2SDForImageClassification)
        and "classification head" in caplog.text
        and "is new" in caplog.text
    )


def test_a_fine_tuned_classifier_loads_as_is(saved):
    model = load_image_classifier(str(saved / "classifier"))
    assert isinstance(model, G2SDForImageClassification) and model.config.num_labels == 3


def test_a_truncated_weights_file_is_named(saved):
    from g2sd_hf import ClassificationTeacher

    weights = saved / "classifier" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    for load in (
        lambda: load_image_classifier(str(saved / "classifier")),
        lambda: ClassificationTeacher.from_pretrained(str(saved / "classifier")),
    ):
        with pytest.raises(ValueError, match=rf"The weights in {weights} cannot be read .*damaged.*again"):
            load()


def test_a_checkpoint_at_another_resolution_is_refused_with_the_sizes(saved):
    with pytest.raises(
        ValueError, match=r"image_size 32 in the checkpoint, 64 asked\): its position embeddings do not fit"
    ):
        load_image_classifier(str(saved / "classifier"), G2SDForImageClassification, new_head="warn", image_size=64)
