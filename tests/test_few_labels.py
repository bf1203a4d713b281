"""Few labels, many images (issue 18): a stratified, seeded label fraction; unlabeled images beside the labeled ones,
learned from the teacher alone; the refusals; the teacher fine-tuned on the same labels."""

import json
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from g2sd_hf import G2SDForImageClassification, SpecificDistillationTrainer
from g2sd_hf.few_labels import (
    UNLABELED,
    count_unlabeled,
    labeled_rows,
    load_unlabeled_images,
    split_labels,
    with_unlabeled,
)
from g2sd_hf.losses import labeled_cross_entropy, nkd_loss, soft_target_cross_entropy
from g2sd_hf.scripts.arguments import every_training_image

from .conftest import (
    NORMALIZATION,
    SHAPES_STUDENT,
    run_arguments,
    tiny_classifier_teacher,
    tiny_image_dataset,
    tiny_mae_teacher,
    tiny_student_config,
)
from .test_trainer import specific_args


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_finetune_teacher  # noqa: E402
import run_specific  # noqa: E402


def labeled_table(counts: dict[str, int]) -> datasets.Dataset:
    """A labeled set of fake image paths with `counts[name]` images of each class."""
    names = list(counts)
    rows = [(f"{name}-{index}.png", label) for label, name in enumerate(names) for index in range(counts[name])]
    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"image": [row[0] for row in rows], "label": [row[1] for row in rows]}, features=features
    )


# -- the label fraction ---------------------------------------------------------------------------------------------
def test_a_label_fraction_is_stratified_seeded_and_keeps_the_rest_as_images():
    table = labeled_table({"functional": 1352, "defective": 616})  # ELPV's two-class training split
    labeled, unlabeled = split_labels(table, 0.1, seed=0)
    assert Counter(labeled["label"]) == {0: 135, 1: 62}  # round(0.1 * n_c) of each class: 197 cells
    assert unlabeled.column_names == ["image"] and len(unlabeled) == 1968 - 197
    assert set(labeled["image"]).isdisjoint(unlabeled["image"])
    assert set(labeled["image"]) | set(unlabeled["image"]) == set(table["image"])
    again, _ = split_labels(table, 0.1, seed=0)
    other, _ = split_labels(table, 0.1, seed=1)
    assert list(again["image"]) == list(labeled["image"]) and list(other["image"]) != list(labeled["image"])
    whole, nothing = split_labels(table, 1.0, seed=0)
    assert len(whole) == len(table) and len(nothing) == 0


def test_a_label_fraction_that_leaves_a_class_without_a_label_or_is_out_of_range_is_refused():
    table = labeled_table({"common": 100, "rare": 4})
    with pytest.raises(ValueError, match=r"leaves class 'rare' \(4 training images\).*at least 0.25"):
        split_labels(table, 0.1, seed=0)
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"--label_fraction must be in \(0, 1\]"):
            split_labels(table, fraction, seed=0)


def test_one_training_set_holds_the_labeled_rows_and_the_unlabeled_images():
    labeled, unlabeled = split_labels(labeled_table({"a": 10, "b": 10}), 0.3, seed=0)
    combined = with_unlabeled(labeled, unlabeled)
    assert len(combined) == 20 and count_unlabeled(combined) == 14
    assert combined.features["label"] == labeled.features["label"]
    assert list(combined["label"][:6]) == list(labeled["label"]) and set(combined["label"][6:]) == {UNLABELED}
    assert list(labeled_rows(combined.with_transform(lambda batch: batch))["image"]) == list(labeled["image"])
    assert with_unlabeled(labeled, None) is labeled and count_unlabeled(labeled) == 0
    # The label-free stages take every image.
    splits = datasets.DatasetDict(train=labeled, unlabeled=unlabeled)
    assert sorted(every_training_image(splits)["image"]) == sorted([*labeled["image"], *unlabeled["image"]])


# -- the loss -------------------------------------------------------------------------------------------------------
def test_the_task_loss_counts_the_labeled_rows_only():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([2, UNLABELED, 0, UNLABELED, 1])
    labeled = labels != UNLABELED
    # By hand: the smoothed cross-entropy of rows 0, 2 and 4, averaged over those three.
    expected = sum(
        F.cross_entropy(logits[row : row + 1], labels[row : row + 1], label_smoothing=0.1) for row in (0, 2, 4)
    )
    torch.testing.assert_close(labeled_cross_entropy(logits, labels, labeled, 0.1), expected / 3)
    # Every row labeled: the batch's soft-target cross-entropy, as before.
    all_labels = torch.tensor([2, 1, 0, 0, 1])
    targets = F.one_hot(all_labels, 3).float() * 0.9 + 0.1 / 3
    torch.testing.assert_close(
        labeled_cross_entropy(logits, all_labels, torch.ones(5, dtype=torch.bool), 0.1),
        soft_target_cross_entropy(logits, targets),
    )
    # No labeled row: zero, and still a graph to backpropagate through (every process joins the step).
    none = labeled_cross_entropy(logits, labels, torch.zeros(5, dtype=torch.bool), 0.1)
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def mixed_trainer(tmp_path, distillation_type="hard", **overrides):
    torch.manual_seed(0)
    student = G2SDForImageClassification(tiny_student_config(num_labels=4, use_distillation_token=True))
    train = tiny_image_dataset(16, num_labels=4)
    train = train.map(lambda row, index: {"labels": UNLABELED if index % 4 else row["labels"]}, with_indices=True)
    trainer = SpecificDistillationTrainer(
        model=student,
        teacher=tiny_classifier_teacher(),
        args=specific_args(tmp_path, distillation_type=distillation_type, **overrides),
        train_dataset=train,
    )
    return trainer


@pytest.mark.parametrize("distillation_type", ["hard", "nkd"])
def test_with_unlabeled_images_the_labels_teach_the_labeled_and_the_teacher_every_image(
    tmp_path, pixel_values, distillation_type
):
    trainer = mixed_trainer(tmp_path, distillation_type)
    assert trainer.num_unlabeled_images == 12
    labels = torch.tensor([1, UNLABELED, 3, UNLABELED])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels})
    with torch.no_grad():
        outputs = model(pixel_values)
        teacher_logits = trainer.teacher.model(pixel_values).logits
    # L_SD = (CE over the labeled rows of the classification head + KD over all rows of the distillation head) / 2.
    task = F.cross_entropy(outputs.cls_logits[[0, 2]], labels[[0, 2]], label_smoothing=0.1)
    if distillation_type == "hard":
        kd = F.cross_entropy(outputs.distillation_logits, teacher_logits.argmax(-1))
    else:  # NKD's target class: the label, else the teacher's class
        targets = torch.where(labels != UNLABELED, labels, teacher_logits.argmax(-1))
        kd = nkd_loss(outputs.distillation_logits, teacher_logits, targets)
    torch.testing.assert_close(loss, (task + kd) / 2, atol=1e-5, rtol=1e-5)
    recorded = {name: values[-1].item() for name, values in trainer._term_history.items()}
    assert recorded["labeled_share"] == 0.5 and recorded["task_loss"] == pytest.approx(task.item(), abs=1e-5)


def test_without_unlabeled_images_the_losses_are_those_of_before(tmp_path):
    """The same run through a training set without any unlabeled row logs exactly the losses of the old formula
    (task loss over the whole batch)."""
    trainer = mixed_trainer(tmp_path)
    labeled = SpecificDistillationTrainer(
        model=G2SDForImageClassification(tiny_student_config(num_labels=4, use_distillation_token=True)),
        teacher=tiny_classifier_teacher(),
        args=specific_args(tmp_path),
        train_dataset=tiny_image_dataset(16, num_labels=4),
    )
    assert labeled.num_unlabeled_images == 0 and trainer.num_unlabeled_images == 12
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 1, 2])
    model = labeled.model.train()
    loss = labeled.compute_loss(model, {"pixel_values": pixel_values, "labels": labels})
    with torch.no_grad():
        outputs = model(pixel_values)
        teacher_logits = labeled.teacher.model(pixel_values).logits
    targets = F.one_hot(labels, 4).float() * 0.9 + 0.1 / 4
    old = (
        soft_target_cross_entropy(outputs.cls_logits, targets)
        + F.cross_entropy(outputs.distillation_logits, teacher_logits.argmax(-1))
    ) / 2
    assert loss.item() == old.item() and "labeled_share" not in labeled._term_history


def test_unlabeled_images_without_a_teacher_or_with_mixup_are_refused_by_the_trainer(tmp_path):
    train = tiny_image_dataset(8, num_labels=4).map(lambda row: {"labels": UNLABELED})
    student = G2SDForImageClassification(tiny_student_config(num_labels=4))
    with pytest.raises(ValueError, match="8 unlabeled images, and only the teacher can teach"):
        SpecificDistillationTrainer(
            model=student, args=specific_args(tmp_path, distillation_type="none"), train_dataset=train
        )
    with pytest.raises(ValueError, match="--mixup_alpha 0 --cutmix_alpha 0"):
        mixed_trainer(tmp_path, mixup_alpha=0.8)


# -- the scripts ----------------------------------------------------------------------------------------------------
def write_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image-{index}.png")


def test_the_scripts_refuse_what_cannot_work_before_reading_any_image(shapes_folder, shapes_teacher, tmp_path):
    classifier, _ = shapes_teacher
    missing = {"train_dir": tmp_path / "no-such-folder", "validation_dir": tmp_path / "no-such-folder"}
    # Unlabeled images without a teacher: refused before the (missing) data is looked at.
    arguments = run_arguments(tmp_path, tmp_path / "out", 1, unlabeled_train_dir=shapes_folder / "train")
    arguments += [f"--{name}={value}" for name, value in missing.items()]
    with pytest.raises(ValueError, match="need a teacher to learn from"):
        run_specific.main(arguments)
    with pytest.raises(ValueError, match="need a teacher to learn from"):
        run_finetune_teacher.main(arguments + [f"--mae_name_or_path={classifier}"])
    # mixup with unlabeled images in distillation.
    with pytest.raises(ValueError, match="cannot mix unlabeled"):
        run_specific.main(
            run_arguments(tmp_path, tmp_path / "out", 1, label_fraction=0.5, teacher_name_or_path=classifier)
            + [f"--{name}={value}" for name, value in missing.items()]
            + ["--mixup_alpha=0.8"]
        )
    with pytest.raises(ValueError, match=r"--label_fraction must be in \(0, 1\]"):
        run_specific.main(run_arguments(shapes_folder, tmp_path / "out", 1, label_fraction=0))
    # A fraction that leaves a class of the 192 generated shapes_folder (64 per class) without a label.
    with pytest.raises(ValueError, match="without a labeled image"):
        run_specific.main(run_arguments(shapes_folder, tmp_path / "out", 1, label_fraction=0.005))
    # Unlabeled images at another size than the labeled ones (the shapes_folder are 32 px).
    write_images(tmp_path / "large", 4, 96)
    with pytest.raises(ValueError, match="another size than the labeled ones: a typical shorter side of 96 px"):
        run_specific.main(
            run_arguments(
                shapes_folder,
                tmp_path / "out",
                1,
                teacher_name_or_path=classifier,
                unlabeled_train_dir=tmp_path / "large",
                config_overrides=f"image_size=32,patch_size=8,{SHAPES_STUDENT}",
            )
        )
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_distilling_on_few_labels_and_unlabeled_images_end_to_end(shapes_folder, shapes_teacher, tmp_path):
    classifier, _ = shapes_teacher
    write_images(tmp_path / "more" / "any-sub-folder", 16, 32)
    assert len(load_unlabeled_images(train_dir=str(tmp_path / "more"))) == 16
    metrics = run_specific.main(
        run_arguments(
            shapes_folder,
            tmp_path / "student",
            2,
            teacher_name_or_path=classifier,
            label_fraction=0.25,
            unlabeled_train_dir=tmp_path / "more",
            config_overrides=f"image_size=32,patch_size=8,{SHAPES_STUDENT}",
            layer_decay=1.0,
        )
    )
    # 192 shapes: 48 keep their labels (16 per class), 144 + 16 images are unlabeled.
    assert metrics["train_samples"] == 208 and metrics["train_unlabeled_images"] == 160
    history = json.loads((tmp_path / "student" / "trainer_state.json").read_text())["log_history"]
    shares = [entry["labeled_share"] for entry in history if "labeled_share" in entry]
    assert shares and 0.1 < float(np.mean(shares)) < 0.4  # 48 / 208 = 0.23 expected
    card = (tmp_path / "student" / "README.md").read_text()
    assert "| labeled / unlabeled training images | 48 / 160" in card
    # The scratch baseline learned from the labeled images alone.
    assert "scratch_eval_balanced_accuracy" in metrics


def test_the_teacher_fine_tuned_on_the_same_few_labels(shapes_folder, tmp_path):
    from transformers import ViTImageProcessor

    tiny_mae_teacher().save_pretrained(tmp_path / "mae")
    ViTImageProcessor(size={"height": 32, "width": 32}, **NORMALIZATION).save_pretrained(tmp_path / "mae")
    metrics = run_finetune_teacher.main(
        run_arguments(shapes_folder, tmp_path / "teacher", 1, mae_name_or_path=tmp_path / "mae", label_fraction=0.25)
    )
    assert metrics["train_samples"] == 48  # the labeled images alone, 16 per class
    again = json.loads((tmp_path / "teacher" / "run_arguments.json").read_text())
    assert "label_fraction" in json.dumps(again)
