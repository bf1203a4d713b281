"""The chain on a user's own folder, with data nobody tuned for: generated shapes drawn with PIL, tiny models, the
README's `--recipe small-data`. The fine-tuned teacher must beat chance by a margin, and the chain's checks must name a
teacher too weak to teach (issue 17)."""

import json
import sys
from pathlib import Path

import pytest
from transformers import ViTImageProcessor

from g2sd_hf.learning_check import MIN_TEACHER_SKILL, skill
from g2sd_hf.synthetic import write_classification_folder

from .conftest import (
    NORMALIZATION,
    SHAPE_CLASSES,
    SHAPES_STUDENT,
    run_arguments,
    tiny_classifier_teacher,
)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_specific  # noqa: E402


CLASSES = SHAPE_CLASSES
NUM_CLASSES = len(CLASSES)
STUDENT = SHAPES_STUDENT


def test_generated_images_are_a_pure_function_of_their_index_and_a_written_folder_is_never_overwritten(shapes_folder):
    from g2sd_hf.synthetic import make_classification_example

    first, label = make_classification_example("digits", 13, image_size=32, seed=0)
    again, same_label = make_classification_example("digits", 13, image_size=32, seed=0)
    other, _ = make_classification_example("digits", 13, image_size=32, seed=1)
    assert (first.size, label) == ((32, 32), 3) and same_label == label
    assert first.tobytes() == again.tobytes() and first.tobytes() != other.tobytes()
    assert sorted(path.name for path in (shapes_folder / "train").iterdir()) == sorted(CLASSES)
    assert sum(1 for _ in (shapes_folder / "train").rglob("*.png")) == 192
    with pytest.raises(FileExistsError, match="not empty"):
        write_classification_folder(shapes_folder / "train", "shapes", 3, classes=CLASSES)
    with pytest.raises(ValueError, match="'hexagon'"):
        write_classification_folder(shapes_folder / "new", "shapes", 3, classes=("circle", "hexagon"))


def test_the_fine_tuned_teacher_beats_chance_by_a_margin_and_says_how_far(shapes_teacher):
    _, metrics = shapes_teacher
    assert metrics["eval_balanced_accuracy"] > 1 / NUM_CLASSES + 0.25
    assert metrics["eval_skill"] == pytest.approx(skill(metrics["eval_balanced_accuracy"], NUM_CLASSES))
    assert metrics["eval_skill"] >= MIN_TEACHER_SKILL and metrics["learning_warnings"] == []


def test_distilling_from_it_scores_the_teacher_first_without_a_warning(shapes_folder, shapes_teacher, tmp_path):
    classifier, teacher_metrics = shapes_teacher
    metrics = run_specific.main(
        run_arguments(
            shapes_folder,
            tmp_path / "student",
            epochs=2,
            teacher_name_or_path=classifier,
            config_overrides=f"image_size=32,patch_size=8,{STUDENT}",
            layer_decay=1.0,
        )
    )
    # The teacher's score before training is the one its own run measured on the same images.
    assert metrics["teacher_eval_balanced_accuracy"] == pytest.approx(teacher_metrics["eval_balanced_accuracy"])
    assert "initial_eval_balanced_accuracy" in metrics
    assert json.loads((tmp_path / "student" / "train_results.json").read_text())["teacher_eval_accuracy"] > 0
    assert not any("teacher" in warning for warning in metrics["learning_warnings"])


def test_a_random_teacher_is_named_as_the_weak_stage_in_the_log_and_on_the_card(shapes_folder, tmp_path, caplog):
    random_teacher = tiny_classifier_teacher(num_labels=NUM_CLASSES)
    random_teacher.config.id2label = dict(enumerate(CLASSES))
    random_teacher.config.label2id = {name: index for index, name in random_teacher.config.id2label.items()}
    random_teacher.save_pretrained(tmp_path / "random_teacher")
    ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION).save_pretrained(tmp_path / "random_teacher")

    metrics = run_specific.main(
        run_arguments(
            shapes_folder,
            tmp_path / "student",
            epochs=4,
            teacher_name_or_path=tmp_path / "random_teacher",
            config_overrides=f"image_size=32,patch_size=8,{STUDENT}",
            layer_decay=1.0,
        )
    )
    warnings = metrics["learning_warnings"]
    assert any("teacher is barely above chance" in warning for warning in warnings)
    card = (tmp_path / "student" / "README.md").read_text()
    assert "a stage too weak to build on" in card and "barely above chance" in card
    # The small-data recipe's scratch baseline learned from the labels; the student of the random teacher did not,
    # and the teacher is named as the weak stage.
    assert metrics["scratch_eval_balanced_accuracy"] > metrics["eval_balanced_accuracy"] + 0.1
    (below_scratch,) = [warning for warning in warnings if "below the same student trained from scratch" in warning]
    assert "The weak stage is the teacher" in below_scratch and "scratch baseline on the validation split" in card
    assert json.loads((tmp_path / "student" / "learning_warnings.json").read_text()) == warnings


def test_the_scratch_baseline_is_the_scratch_run_of_the_readme_and_leaves_no_files(
    shapes_folder, shapes_teacher, tmp_path
):
    """`--scratch_baseline` (on in the small-data recipe) trains what `run_specific.py --distillation_type none` from
    a new student trains, with the same seed, and saves nothing of it."""
    classifier, _ = shapes_teacher
    student = {"config_overrides": f"image_size=32,patch_size=8,{STUDENT}", "layer_decay": 1.0}
    distilled = run_specific.main(
        run_arguments(shapes_folder, tmp_path / "distilled", epochs=3, teacher_name_or_path=classifier, **student)
    )
    scratch = run_specific.main(
        run_arguments(shapes_folder, tmp_path / "scratch", epochs=3, distillation_type="none", **student)
    )
    assert "scratch_eval_balanced_accuracy" not in scratch  # no teacher, no baseline
    for name in ("accuracy", "balanced_accuracy"):
        assert distilled[f"scratch_eval_{name}"] == pytest.approx(scratch[f"eval_{name}"], abs=1e-6)
    recorded = json.loads((tmp_path / "distilled" / "train_results.json").read_text())
    assert recorded["scratch_eval_balanced_accuracy"] == pytest.approx(distilled["scratch_eval_balanced_accuracy"])
    assert not (tmp_path / "distilled" / "scratch-baseline").exists()
    card = (tmp_path / "distilled" / "README.md").read_text()
    assert f"{distilled['scratch_eval_balanced_accuracy']:.3f}" in card and "teacher on the validation split" in card
