"""The release's recipe, value by value: each default that the authors' code sets is pinned here against that code's
value (G2SD's `main_distill.py`, `main_finetune_dis.py`, `util/datasets.py`, `models_vit.py`, `GD.sh`, `SD.sh`)."""

import math

import pytest
import torch
from PIL import Image
from torchvision import transforms as release_transforms
from transformers import BitImageProcessor

from g2sd_hf import (
    G2SDConfig,
    G2SDForGenericDistillation,
    G2SDForImageClassification,
    GenericDistillationArguments,
    MAETeacher,
    SpecificDistillationArguments,
)
from g2sd_hf.data import evaluation_transform, image_processor, load_elpv, open_rgb_image, processor_transform
from g2sd_hf.scripts.arguments import ClassificationAugmentationArguments
from g2sd_hf.teacher import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, classifier_from_mae

from .conftest import tiny_mae_teacher, tiny_student_config
from .test_trainer import generic_trainer, specific_args


@pytest.fixture(scope="module")
def cell_image():
    """A real ELPV cell, made non-square so that a squash and a shorter-side resize differ."""
    image = open_rgb_image(load_elpv()["train"][5]["image"])
    return image.resize((300, 240), Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------------------------------
# Optimization: no clipping, cosine schedules ending at the release's min_lr
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class", [GenericDistillationArguments, SpecificDistillationArguments])
def test_no_gradient_clipping(config_class, tmp_path):
    # GD: engine_distill.py calls the loss scaler without clip_grad; SD: --clip_grad defaults to None.
    assert config_class(str(tmp_path)).max_grad_norm == 0


@pytest.mark.parametrize(
    "config_class, min_lr, peak, warmup",
    [(GenericDistillationArguments, 2.5e-6, 1.5e-4, 10 / 300), (SpecificDistillationArguments, 1e-6, 1e-3, 5 / 200)],
)
def test_release_learning_rates(config_class, min_lr, peak, warmup, tmp_path):
    args = config_class(str(tmp_path))
    assert (args.learning_rate, args.min_learning_rate, args.warmup_steps) == (peak, min_lr, warmup)
    assert args.lr_scheduler_kwargs == {"min_lr": min_lr} and args.scale_lr_with_batch_size


def release_cosine(step: float, total: float, warmup: float, peak: float, min_lr: float) -> float:
    """MAE's `util/lr_sched.adjust_learning_rate`, with steps for epochs."""
    if step < warmup:
        return peak * step / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_generic_schedule_follows_the_release_cosine_to_its_min_lr(tmp_path):
    trainer = generic_trainer(
        tmp_path,
        learning_rate=1e-3,
        warmup_steps=10,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 2.5e-6},
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=110)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    learning_rates = []
    for _ in range(110):
        learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for step in (0, 5, 10, 35, 60, 85, 109):
        assert learning_rates[step] == pytest.approx(release_cosine(step, 110, 10, 1e-3, 2.5e-6), rel=1e-6, abs=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-6, rel=1e-6)  # the end of the schedule


def test_layer_decayed_groups_end_at_min_lr_times_their_scale(tmp_path):
    from g2sd_hf import SpecificDistillationTrainer

    from .conftest import tiny_image_dataset

    student = G2SDForImageClassification(tiny_student_config(num_labels=3))
    args = specific_args(
        tmp_path,
        learning_rate=1e-3,
        warmup_steps=0,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 1e-6},
        layer_decay=0.75,
    )
    trainer = SpecificDistillationTrainer(
        model=student,
        teacher=None,
        args=SpecificDistillationArguments(**{**args.to_dict(), "distillation_type": "none"}),
        train_dataset=tiny_image_dataset(num_labels=3),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    for _ in range(20):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    for group in trainer.optimizer.param_groups:  # the release: lr = min_lr * lr_scale at the end
        assert group["lr"] == pytest.approx(1e-6 * group["lr_scale"], rel=1e-6)


def test_a_min_lr_above_the_peak_is_refused(tmp_path):
    trainer = generic_trainer(
        tmp_path, learning_rate=1e-6, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 2.5e-6}
    )
    with pytest.raises(ValueError, match="min_learning_rate=2.5e-06, above the peak learning rate"):
        trainer.create_optimizer_and_scheduler(num_training_steps=10)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation preprocessing: Resize(shorter side = size / 0.875, bicubic) + CenterCrop(size)
# ---------------------------------------------------------------------------------------------------------------------
def release_eval_transform(input_size: int):
    """`util/datasets.build_transform(is_train=False)` of the release."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    size = int(input_size / crop_pct)
    return release_transforms.Compose(
        [
            release_transforms.Resize(size, interpolation=release_transforms.InterpolationMode.BICUBIC),
            release_transforms.CenterCrop(input_size),
            release_transforms.ToTensor(),
            release_transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


@pytest.mark.parametrize("input_size", [96, 224, 256])
def test_evaluation_transform_is_the_release_one(input_size, cell_image):
    ours = evaluation_transform(input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(cell_image)
    theirs = release_eval_transform(input_size)(cell_image)
    assert ours.shape == theirs.shape == (3, input_size, input_size)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_saved_processor_does_what_the_evaluation_transform_does(cell_image):
    processor = image_processor(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert isinstance(processor, BitImageProcessor)
    assert processor.size["shortest_edge"] == 256 and dict(processor.crop_size) == {"height": 224, "width": 224}
    processed = processor(cell_image, return_tensors="pt")["pixel_values"][0]
    expected = release_eval_transform(224)(cell_image)
    # The processor resizes tensors (torchvision), the release PIL images: the same up to rounding at the edges.
    assert (processed - expected).abs().mean() < 2e-3 and (processed - expected).abs().max() < 0.1
    torch.testing.assert_close(processor_transform(processor)(cell_image), expected, atol=1e-6, rtol=0)


def test_crop_ratio_is_configurable(cell_image):
    arguments = ClassificationAugmentationArguments(eval_crop_ratio=1.0)
    transform = arguments.eval_transform(96, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert transform.transforms[0].size == [96]
    assert image_processor(96, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, crop_ratio=1.0).size["shortest_edge"] == 96
    with pytest.raises(ValueError, match="eval_crop_ratio must be in"):
        ClassificationAugmentationArguments(eval_crop_ratio=1.5)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation: timm's rand-m9-mstd0.5-inc1 and pixel-mode random erasing
# ---------------------------------------------------------------------------------------------------------------------
def test_training_augmentation_is_the_release_policy():
    from timm.data import create_transform

    # The release's `build_transform(is_train=True)` with its `main_finetune_dis.py` defaults.
    release = create_transform(
        input_size=224,
        is_training=True,
        color_jitter=None,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    ours = ClassificationAugmentationArguments().train_transform(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert repr(ours) == repr(release)
    names = [type(step).__name__ for step in ours.transforms]
    assert "ColorJitter" not in names
    rand_augment = next(step for step in ours.transforms if type(step).__name__ == "RandAugment")
    assert rand_augment.num_layers == 2 and {op.magnitude for op in rand_augment.ops} == {9}
    assert {op.magnitude_std for op in rand_augment.ops} == {0.5}
    assert "PosterizeIncreasing" in {op.name for op in rand_augment.ops}  # inc1: the increasing variants
    erasing = ours.transforms[-1]
    assert (type(erasing).__name__, erasing.probability, erasing.mode) == ("RandomErasing", 0.25, "pixel")


def test_posterize_at_the_top_magnitude_gives_the_release_black_image():
    # rand-m9-mstd0.5 draws magnitudes up to 10, where PosterizeIncreasing keeps 0 bits: Pillow >= 13 raises on
    # that, old Pillow (the release's) returned a black image.
    transform = ClassificationAugmentationArguments().train_transform(32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    rand_augment = next(step for step in transform.transforms if type(step).__name__ == "RandAugment")
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    image = Image.new("RGB", (32, 32), (200, 120, 40))
    assert posterize.aug_fn(image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize.aug_fn(image, 4).getpixel((0, 0)) == (192, 112, 32)
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0  # always, at the top magnitude
    assert posterize(image).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_pixel_erasing_fills_with_noise():
    from g2sd_hf.data import classification_train_transform

    transform = classification_train_transform(
        64, [0.5] * 3, [0.5] * 3, min_crop_scale=1.0, horizontal_flip=False, auto_augment="none", random_erasing=1.0
    )
    torch.manual_seed(0)
    erased = transform(Image.new("RGB", (64, 64), (128, 128, 128)))
    changed = (erased - erased.flatten()[0]).abs() > 1e-6  # a flat gray image: anything not gray was erased
    assert changed.any() and erased[changed].std() > 0.5  # per-pixel N(0, 1) noise, not a constant fill


# ---------------------------------------------------------------------------------------------------------------------
# Heads: truncated normal, std 2e-5 for the classifier, 0.02 for the distillation head
# ---------------------------------------------------------------------------------------------------------------------
def test_head_initialization_from_a_generic_distillation_checkpoint(tmp_path):
    torch.manual_seed(0)
    G2SDForGenericDistillation(tiny_student_config(hidden_size=64, num_attention_heads=2)).save_pretrained(tmp_path)
    model = G2SDForImageClassification.from_pretrained(tmp_path, num_labels=100, use_distillation_token=True)
    classifier, distillation = model.classifier.weight, model.distillation_classifier.weight
    # timm's trunc_normal_ cuts at +-2 (absolute), as torch's: at these scales a plain normal.
    assert classifier.std().item() == pytest.approx(2e-5, rel=0.1)
    assert distillation.std().item() == pytest.approx(0.02, rel=0.1)
    assert (
        torch.count_nonzero(model.classifier.bias) == 0
        and torch.count_nonzero(model.distillation_classifier.bias) == 0
    )


def test_head_initialization_of_a_new_student_and_of_the_mae_classifier():
    torch.manual_seed(0)
    student = G2SDForImageClassification(
        G2SDConfig(
            **{**tiny_student_config().to_dict(), "num_labels": 100, "hidden_size": 64, "use_distillation_token": True}
        )
    )
    assert student.classifier.weight.std().item() == pytest.approx(2e-5, rel=0.1)
    assert student.distillation_classifier.weight.std().item() == pytest.approx(0.02, rel=0.1)
    teacher = classifier_from_mae(tiny_mae_teacher(hidden_size=64), num_labels=100)
    assert teacher.classifier.weight.std().item() == pytest.approx(2e-5, rel=0.1)


def test_an_mae_built_to_pre_train_has_the_release_initialization():
    # models_mae.py: Xavier-uniform linear layers (the patch projection over the flattened patch), zero biases, cls and
    # mask tokens from N(0, 0.02); transformers draws linear layers from N(0, 0.02) and leaves the cls token at zero.
    torch.manual_seed(0)
    mae = tiny_mae_teacher(hidden_size=64, intermediate_size=256, decoder_hidden_size=48)
    for name, module in [*mae.named_modules(), ("projection", mae.vit.embeddings.patch_embeddings.projection)]:
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert module.weight.abs().max().item() <= bound, name
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name
            assert not module.bias.any(), name
    for token in (mae.vit.embeddings.cls_token, mae.decoder.mask_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.3)


# ---------------------------------------------------------------------------------------------------------------------
# The generic-distillation teacher: a norm_pix_loss MAE
# ---------------------------------------------------------------------------------------------------------------------
def test_a_teacher_without_the_normalized_pixel_loss_is_reported(caplog):
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="g2sd_hf.teacher"):
            MAETeacher(tiny_mae_teacher(norm_pix_loss=False), target_layer=2)
        assert "norm_pix_loss: false" in caplog.text and "mae_pretrain_vit_base_full.pth" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="g2sd_hf.teacher"):
            MAETeacher(tiny_mae_teacher(norm_pix_loss=True), target_layer=2)
        assert "norm_pix_loss" not in caplog.text
    finally:
        hf_logging.disable_propagation()
