"""Old import paths and names keep working for users, with a FutureWarning that names the new home."""

import importlib

import pytest

import g2sd_hf
import g2sd_hf.output_folders
import g2sd_hf.scripts
from g2sd_hf import trainer


@pytest.mark.parametrize(
    "module, old_name, new_object",
    [
        ("g2sd_hf", "GenericDistillationConfig", trainer.GenericDistillationArguments),
        ("g2sd_hf", "SpecificDistillationConfig", trainer.SpecificDistillationArguments),
        ("g2sd_hf", "DenseDistillationConfig", g2sd_hf.DenseDistillationArguments),
        ("g2sd_hf.trainer", "RecipeConfig", trainer.RecipeArguments),
        ("g2sd_hf.dense", "DenseTeacher", g2sd_hf.DenseTeacher),
        ("g2sd_hf.dense", "DenseDistillationConfig", g2sd_hf.DenseDistillationArguments),
        ("g2sd_hf.cli", "parse_overrides", g2sd_hf.scripts.parse_overrides),
        ("g2sd_hf.data", "DataArguments", g2sd_hf.scripts.DataArguments),
        ("g2sd_hf.hub", "finish_training_run", g2sd_hf.scripts.finish_training_run),
        ("g2sd_hf.hub", "staged_folder", g2sd_hf.output_folders.staged_folder),
    ],
)
def test_old_names_import_with_a_warning_naming_the_new_home(module, old_name, new_object):
    with pytest.warns(FutureWarning, match=rf"`{module}\.{old_name}` moved to `g2sd_hf\."):
        assert getattr(importlib.import_module(module), old_name) is new_object


def test_unknown_names_are_still_attribute_errors():
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        g2sd_hf.NoSuchThing  # noqa: B018


def test_fine_tuning_arguments_refuse_a_teacher_loss(tmp_path):
    assert trainer.FineTuningArguments(str(tmp_path)).distillation_type == "none"
    with pytest.raises(ValueError, match="Fine-tuning has no teacher"):
        trainer.FineTuningArguments(str(tmp_path), distillation_type="hard")


def test_the_teachers_mask_ratio_reads_with_a_warning_pointing_to_the_students_config():
    from g2sd_hf import MAETeacher

    from .conftest import tiny_mae_teacher

    teacher = MAETeacher(tiny_mae_teacher(), target_layer=2)
    with pytest.warns(FutureWarning, match="lives in the student's G2SDConfig.mask_ratio"):
        assert teacher.mask_ratio == 0.75
