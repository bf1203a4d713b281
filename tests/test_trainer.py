"""Both trainers: losses against references, what gets gradients, accumulation, resuming, the refusals, the guard."""

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import TrainerCallback, ViTImageProcessor

from g2sd_hf import (
    ClassificationTeacher,
    G2SDForGenericDistillation,
    G2SDForImageClassification,
    GenericDistillationArguments,
    GenericDistillationTrainer,
    MAETeacher,
    SpecificDistillationArguments,
    SpecificDistillationTrainer,
)
from g2sd_hf.losses import nkd_loss
from g2sd_hf.trainer import RecipeTrainer

from .conftest import NUM_PATCHES, tiny_classifier_teacher, tiny_image_dataset, tiny_mae_teacher, tiny_student_config


def quick_run(tmp_path, **overrides) -> dict:
    """A few logged CPU steps at a fixed learning rate, nothing saved."""
    return (
        dict(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=2,
            learning_rate=1e-3,
            scale_lr_with_batch_size=False,
            warmup_steps=0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        | overrides
    )


def generic_args(tmp_path, **overrides):
    return GenericDistillationArguments(**quick_run(tmp_path, **overrides))


def specific_args(tmp_path, **overrides):
    return SpecificDistillationArguments(
        **quick_run(tmp_path, **{"mixup_alpha": 0.0, "cutmix_alpha": 0.0, **overrides})
    )


def generic_trainer(tmp_path, student_seed=0, dataset=None, **overrides):
    torch.manual_seed(student_seed)
    student = G2SDForGenericDistillation(tiny_student_config())
    teacher = MAETeacher(tiny_mae_teacher(), target_layer=2)
    return GenericDistillationTrainer(
        model=student,
        teacher=teacher,
        args=generic_args(tmp_path, **overrides),
        train_dataset=dataset or tiny_image_dataset(),
    )


def student_state(trainer):
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Generic distillation
# ---------------------------------------------------------------------------------------------------------------------
def test_generic_loss_equals_reference_from_the_formulas(tmp_path, pixel_values, noise):
    trainer = generic_trainer(tmp_path)
    mae = trainer.teacher.model
    captured = {}
    handle = mae.decoder.decoder_layers[1].register_forward_hook(lambda m, a, output: captured.update(h=output))
    with torch.no_grad():
        mae(pixel_values, noise=noise)
    handle.remove()
    hidden = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
    target = (hidden - hidden.mean(-1, keepdim=True)) / torch.sqrt(hidden.var(-1, unbiased=False, keepdim=True) + 1e-6)

    student = trainer.model.eval()
    prediction = student(pixel_values, noise=noise).predicted_features
    difference = (prediction - target).abs()
    expected = torch.where(difference < 2.0, 0.5 * difference**2 / 2.0, difference - 1.0).mean()

    loss = trainer.compute_loss(student, {"pixel_values": pixel_values, "noise": noise})
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_trainer_optimizes_and_logs_what_generic_distillation_loss_returns(tmp_path, pixel_values, noise, monkeypatch):
    """L_GD has one home: change `losses.generic_distillation_loss` and the trainer's loss and logged terms follow."""
    from g2sd_hf import losses, modeling_g2sd

    def tripled(*args, **kwargs):
        return {name: 3 * value for name, value in losses.generic_distillation_loss(*args, **kwargs).items()}

    trainer = generic_trainer(tmp_path)
    student = trainer.model.train()
    inputs = {"pixel_values": pixel_values, "noise": noise}
    reference = losses.generic_distillation_loss(
        student(**inputs).predicted_features,
        trainer.teacher(pixel_values, noise),
        student(**inputs).mask,
        return_terms=True,
    )
    monkeypatch.setattr(modeling_g2sd, "generic_distillation_loss", tripled)
    loss = trainer.compute_loss(student, inputs)
    torch.testing.assert_close(loss, 3 * reference["loss"])
    for name in ("masked_token_loss", "visible_token_loss"):
        torch.testing.assert_close(trainer._term_history[name][-1], 3 * reference[name])


def test_only_student_parameters_receive_gradients(tmp_path):
    trainer = generic_trainer(tmp_path)
    teacher_before = {name: value.clone() for name, value in trainer.teacher.state_dict().items()}
    student_before = student_state(trainer)
    trainer.train()
    assert all(parameter.grad is None for parameter in trainer.teacher.parameters())
    for name, value in trainer.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[name], rtol=0, atol=0)
    after = student_state(trainer)
    assert not torch.equal(
        after["g2sd.layers.0.attention.qkv.weight"], student_before["g2sd.layers.0.attention.qkv.weight"]
    )
    # Fixed sin-cos tables are not trained.
    torch.testing.assert_close(
        after["g2sd.embeddings.position_embeddings"], student_before["g2sd.embeddings.position_embeddings"]
    )
    history = trainer.state.log_history[0]
    assert {"loss", "masked_token_loss", "visible_token_loss"} <= history.keys()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # SGD: Adam would turn the float noise of exactly-zero gradients (the key bias) into full-size steps.
    large = generic_trainer(
        tmp_path / "large", per_device_train_batch_size=4, gradient_accumulation_steps=1, optim="sgd"
    )
    large.train()
    accumulated = generic_trainer(
        tmp_path / "accumulated", per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd"
    )
    accumulated.train()
    large_state, accumulated_state = student_state(large), student_state(accumulated)
    for name in large_state:
        torch.testing.assert_close(accumulated_state[name], large_state[name], atol=1e-7, rtol=1e-6)
    losses = [entry["loss"] for entry in large.state.log_history if "loss" in entry]
    accumulated_losses = [entry["loss"] for entry in accumulated.state.log_history if "loss" in entry]
    assert accumulated_losses == pytest.approx(losses, rel=1e-5)


def test_resume_from_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    uninterrupted = generic_trainer(tmp_path / "full", max_steps=4)
    uninterrupted.train()
    first = generic_trainer(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed = generic_trainer(tmp_path / "resumed", student_seed=123, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected, actual = student_state(uninterrupted), student_state(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5)


def mae_pretraining_trainer(output_dir, model_seed=0, **overrides):
    model = tiny_mae_teacher(seed=model_seed).train()
    return RecipeTrainer(model=model, args=generic_args(output_dir, **overrides), train_dataset=tiny_image_dataset())


def test_resuming_a_transformers_model_restores_its_renamed_weights(tmp_path):
    """transformers 5 saves ViT-MAE checkpoints under the original key names; Trainer's own resume skips the renaming
    and goes on from random blocks. The resumed MAE pre-training must end with the uninterrupted run's weights."""
    uninterrupted = mae_pretraining_trainer(tmp_path / "full", max_steps=4)
    uninterrupted.train()
    mae_pretraining_trainer(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2).train()
    saved = load_file(str(tmp_path / "resumed" / "checkpoint-2" / "model.safetensors"))
    assert not any(".layers." in name for name in saved), "the checkpoint no longer uses the renamed keys"
    resumed = mae_pretraining_trainer(
        tmp_path / "resumed", model_seed=123, max_steps=4, save_strategy="steps", save_steps=2
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected, actual = student_state(uninterrupted), student_state(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5)


def test_resuming_from_another_models_checkpoint_is_refused(tmp_path):
    mae_pretraining_trainer(tmp_path / "mae", max_steps=2, save_strategy="steps", save_steps=2).train()
    trainer = generic_trainer(tmp_path / "student", max_steps=4)
    with pytest.raises(ValueError, match="does not hold this model's weights"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "mae" / "checkpoint-2"))


def test_evaluation_scores_every_image_and_training_needs_one_full_batch(tmp_path):
    """dataloader_drop_last (on in the recipes) drops training's last partial batch, never evaluation's; a training
    set smaller than one batch would run no step and is refused."""
    trainer = generic_trainer(tmp_path, per_device_eval_batch_size=8)
    assert trainer.args.dataloader_drop_last
    loader = trainer.get_eval_dataloader(tiny_image_dataset(num_images=12))
    assert sum(len(batch["pixel_values"]) for batch in loader) == 12
    assert "eval_loss" in trainer.evaluate(tiny_image_dataset(num_images=5))
    assert sum(len(batch["pixel_values"]) for batch in trainer.get_train_dataloader()) == 16  # 4 full batches of 4

    too_few = generic_trainer(tmp_path, dataset=tiny_image_dataset(num_images=3))
    with pytest.raises(
        ValueError,
        match=r"3 images, fewer than one batch \(4 per process x 1 processes = 4\).*--dataloader_drop_last false",
    ):
        too_few.train()


def test_checkpoints_hold_the_student_only(tmp_path):
    trainer = generic_trainer(tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert set(saved) == set(trainer.model.state_dict())
    reloaded = G2SDForGenericDistillation.from_pretrained(tmp_path / "final")
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value, rtol=0, atol=0)


def test_generic_optimizer_follows_timm_weight_decay(tmp_path):
    trainer = generic_trainer(tmp_path, weight_decay=0.05)
    optimizer = trainer.create_optimizer()
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(trainer.model.named_parameters())
    assert decay_of[id(named["g2sd.layers.0.attention.qkv.weight"])] == 0.05
    assert decay_of[id(named["g2sd.embeddings.cls_token"])] == 0.05  # 3-D: decayed, as in MAE pre-training
    assert decay_of[id(named["g2sd.layers.0.attention.qkv.bias"])] == 0.0
    assert decay_of[id(named["g2sd.layers.0.norm1.weight"])] == 0.0
    assert id(named["g2sd.embeddings.position_embeddings"]) not in decay_of  # fixed, not optimized
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_learning_rate_scales_with_total_batch(tmp_path):
    trainer = generic_trainer(
        tmp_path, learning_rate=1.5e-4, scale_lr_with_batch_size=True, gradient_accumulation_steps=2
    )
    assert trainer.peak_learning_rate == pytest.approx(1.5e-4 * 8 / 256)
    assert all(group["lr"] == pytest.approx(1.5e-4 * 8 / 256) for group in trainer.create_optimizer().param_groups)


def test_gradient_checkpointing_and_bf16_train(tmp_path):
    plain = generic_trainer(tmp_path / "plain", max_steps=1)
    plain.train()
    checkpointed = generic_trainer(tmp_path / "checkpointed", max_steps=1, gradient_checkpointing=True)
    checkpointed.train()
    assert checkpointed.model.g2sd.layers[0].gradient_checkpointing
    assert checkpointed.state.log_history[0]["loss"] == pytest.approx(plain.state.log_history[0]["loss"], rel=1e-5)
    bf16 = generic_trainer(tmp_path / "bf16", max_steps=2, bf16=True)
    bf16.train()
    assert next(bf16.teacher.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in bf16.state.log_history if "loss" in entry)


class NaNAfter(MAETeacher):
    """A teacher whose targets turn NaN from its `after`-th call on."""

    def __init__(self, model, after):
        super().__init__(model, target_layer=2)
        self.calls, self.after = 0, after

    def forward(self, pixel_values, noise, mask_ratio=None):
        self.calls += 1
        targets = super().forward(pixel_values, noise, mask_ratio)
        return targets * float("nan") if self.calls >= self.after else targets


class RecordLogs(TrainerCallback):
    """What every `report_to` integration receives: they are all TrainerCallbacks fed by `on_log`."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_loss_terms_reach_every_report_to_backend_through_the_trainers_log(tmp_path):
    recorder = RecordLogs()
    trainer = generic_trainer(tmp_path / "generic", max_steps=2)
    trainer.add_callback(recorder)
    trainer.train()
    assert {"loss", "masked_token_loss", "visible_token_loss", "learning_rate"} <= recorder.logs[0].keys()
    recorder = RecordLogs()
    trainer = specific_trainer(tmp_path / "specific")
    trainer.add_callback(recorder)
    trainer.train()
    assert {"loss", "task_loss", "distillation_loss"} <= recorder.logs[0].keys()


class RecordSaves(TrainerCallback):
    def __init__(self):
        self.digests = {}

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.digests[folder] = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()
        }


def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_checkpoint(tmp_path):
    student = G2SDForGenericDistillation(tiny_student_config())
    recorder = RecordSaves()
    trainer = GenericDistillationTrainer(
        model=student,
        teacher=NaNAfter(tiny_mae_teacher(), after=4),
        args=generic_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2),
        train_dataset=tiny_image_dataset(32),
        callbacks=[recorder],
    )
    with pytest.raises(FloatingPointError, match=r"training step 4: loss=\[nan\]; masked_token_loss"):
        trainer.train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    folder = tmp_path / "checkpoint-2"
    assert recorder.digests[folder] == {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()
    }
    assert all(torch.isfinite(value).all() for value in trainer.model.state_dict().values())


def test_refuses_mismatched_patch_grids(tmp_path):
    student = G2SDForGenericDistillation(tiny_student_config(patch_size=4, target_hidden_size=24))
    with pytest.raises(ValueError, match="different patch grids"):
        GenericDistillationTrainer(
            model=student, teacher=MAETeacher(tiny_mae_teacher(), 2), args=generic_args(tmp_path)
        )


def test_refuses_feature_head_of_the_wrong_width(tmp_path):
    student = G2SDForGenericDistillation(tiny_student_config(target_hidden_size=32))
    with pytest.raises(ValueError, match="target_hidden_size=24"):
        GenericDistillationTrainer(
            model=student, teacher=MAETeacher(tiny_mae_teacher(), 2), args=generic_args(tmp_path)
        )


def test_refuses_wrong_student_and_teacher_types(tmp_path):
    with pytest.raises(TypeError, match="G2SDForGenericDistillation"):
        GenericDistillationTrainer(
            model=G2SDForImageClassification(tiny_student_config()),
            teacher=MAETeacher(tiny_mae_teacher(), 2),
            args=generic_args(tmp_path),
        )
    with pytest.raises(TypeError, match="MAETeacher or a ViTMAEForPreTraining"):
        GenericDistillationTrainer(
            model=G2SDForGenericDistillation(tiny_student_config()),
            teacher=torch.nn.Linear(2, 2),
            args=generic_args(tmp_path),
        )


def test_teacher_masks_with_the_students_mask_ratio(tmp_path, pixel_values, noise):
    """The mask ratio has one home, the student's config: the teacher masks with it, its own config is left alone."""
    student = G2SDForGenericDistillation(tiny_student_config(mask_ratio=0.5))
    teacher = MAETeacher(tiny_mae_teacher(), 2)
    trainer = GenericDistillationTrainer(model=student, teacher=teacher, args=generic_args(tmp_path))
    captured = {}
    handle = teacher.model.vit.register_forward_hook(lambda module, args, output: captured.update(mask=output.mask))
    trainer.compute_loss(student.eval(), {"pixel_values": pixel_values, "noise": noise})
    handle.remove()
    torch.testing.assert_close(captured["mask"], student(pixel_values, noise=noise).mask)
    assert captured["mask"].sum(-1).tolist() == [NUM_PATCHES // 2] * len(pixel_values)
    assert teacher.model.config.mask_ratio == 0.75


def test_student_normalization_is_converted_for_the_teacher(tmp_path, pixel_values, noise):
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    student = G2SDForGenericDistillation(tiny_student_config())
    trainer = GenericDistillationTrainer(
        model=student,
        teacher=MAETeacher(tiny_mae_teacher(), 2),
        args=generic_args(tmp_path),
        processing_class=processor,
    )
    assert trainer.teacher.input_mean == (0.5, 0.5, 0.5) and trainer.teacher.needs_conversion
    raw = pixel_values.sigmoid()
    reference = MAETeacher(tiny_mae_teacher(), 2)
    mean, std = torch.tensor(reference.image_mean).view(1, 3, 1, 1), torch.tensor(reference.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(
        trainer.teacher((raw - 0.5) / 0.5, noise), reference((raw - mean) / std, noise), atol=1e-5, rtol=1e-5
    )

    processor.do_normalize = False
    with pytest.raises(ValueError, match="does not normalize"):
        GenericDistillationTrainer(
            model=student,
            teacher=MAETeacher(tiny_mae_teacher(), 2),
            args=generic_args(tmp_path),
            processing_class=processor,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Specific distillation
# ---------------------------------------------------------------------------------------------------------------------
def specific_trainer(tmp_path, distillation_token=True, teacher=True, **overrides):
    torch.manual_seed(0)
    student = G2SDForImageClassification(tiny_student_config(num_labels=4, use_distillation_token=distillation_token))
    return SpecificDistillationTrainer(
        model=student,
        teacher=tiny_classifier_teacher() if teacher else None,
        args=specific_args(tmp_path, **overrides),
        train_dataset=tiny_image_dataset(16, num_labels=4),
        eval_dataset=tiny_image_dataset(8, num_labels=4, seed=1),
    )


@pytest.mark.parametrize("distillation_type", ["hard", "soft", "nkd"])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_specific_loss_equals_formula(tmp_path, distillation_type, beta, pixel_values):
    trainer = specific_trainer(
        tmp_path, distillation_type=distillation_type, distillation_beta=beta, distillation_temperature=2.0
    )
    labels = torch.tensor([0, 3, 1, 1])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels})

    torch.manual_seed(0)
    with torch.no_grad():
        outputs = model(pixel_values)
        teacher_logits = trainer.teacher.model(pixel_values).logits
    task = F.cross_entropy(outputs.cls_logits, labels, label_smoothing=0.1)
    student = outputs.distillation_logits
    if distillation_type == "hard":
        kd = F.cross_entropy(student, teacher_logits.argmax(-1))
    elif distillation_type == "soft":
        kd = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher_logits / 2, -1), reduction="batchmean") * 4
    else:
        kd = nkd_loss(student, teacher_logits, labels, temperature=2.0)
    torch.testing.assert_close(loss, (task + beta * kd) / (1 + beta), atol=1e-5, rtol=1e-5)


def test_specific_distillation_without_token_distills_the_cls_head(tmp_path, pixel_values):
    trainer = specific_trainer(tmp_path, distillation_token=False)
    labels = torch.tensor([0, 1, 2, 3])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels})
    with torch.no_grad():
        logits = model(pixel_values).logits
        teacher_logits = trainer.teacher.model(pixel_values).logits
    expected = (
        F.cross_entropy(logits, labels, label_smoothing=0.1) + F.cross_entropy(logits, teacher_logits.argmax(-1))
    ) / 2
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_specific_training_logs_terms_and_evaluates(tmp_path):
    trainer = specific_trainer(tmp_path, mixup_alpha=0.8, cutmix_alpha=1.0, max_steps=3)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "task_loss", "distillation_loss"} <= logged.keys()
    assert logged["loss"] == pytest.approx((logged["task_loss"] + logged["distillation_loss"]) / 2, rel=1e-4)
    metrics = trainer.evaluate()
    with torch.no_grad():
        batch = tiny_image_dataset(8, num_labels=4, seed=1)[:]
        logits = trainer.model.eval()(batch["pixel_values"]).logits
    assert metrics["eval_loss"] == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-4)


def test_layer_wise_learning_rate_decay_groups(tmp_path):
    trainer = specific_trainer(tmp_path, layer_decay=0.5, weight_decay=0.05)
    optimizer = trainer.create_optimizer()
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    named = dict(trainer.model.named_parameters())
    peak = trainer.peak_learning_rate
    # Two encoder layers: embeddings are layer 0 (scale 0.5^3), block i is layer i + 1, heads are layer 3 (scale 1).
    assert group_of[id(named["g2sd.embeddings.patch_embeddings.projection.weight"])]["lr"] == pytest.approx(
        peak * 0.125
    )
    assert group_of[id(named["g2sd.layers.0.mlp.fc1.weight"])]["lr"] == pytest.approx(peak * 0.25)
    assert group_of[id(named["g2sd.layers.1.mlp.fc1.weight"])]["lr"] == pytest.approx(peak * 0.5)
    assert group_of[id(named["classifier.weight"])]["lr"] == pytest.approx(peak)
    # The new distillation token learns at the full rate, as in the release (its layer id is the heads').
    assert group_of[id(named["g2sd.embeddings.distillation_token"])]["lr"] == pytest.approx(peak)
    # The Trainer logs the first group's learning rate: it is the peak one.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(peak)
    for name in (
        "g2sd.embeddings.position_embeddings",
        "g2sd.embeddings.cls_token",
        "g2sd.embeddings.distillation_token",
        "classifier.bias",
        "g2sd.layernorm.weight",
    ):
        assert group_of[id(named[name])]["weight_decay"] == 0.0, name
    assert group_of[id(named["g2sd.layers.0.mlp.fc1.weight"])]["weight_decay"] == 0.05


def test_specific_refusals(tmp_path):
    student = G2SDForImageClassification(tiny_student_config(num_labels=4, use_distillation_token=True))
    with pytest.raises(ValueError, match="needs a teacher"):
        SpecificDistillationTrainer(model=student, teacher=None, args=specific_args(tmp_path))
    with pytest.raises(ValueError, match="predicts 4 classes, the teacher 7"):
        SpecificDistillationTrainer(
            model=student, teacher=tiny_classifier_teacher(num_labels=7), args=specific_args(tmp_path)
        )
    with pytest.raises(ValueError, match="distillation_type must be one of"):
        specific_args(tmp_path, distillation_type="feature")
    with pytest.raises(ValueError, match="layer_decay must be in"):
        specific_args(tmp_path, layer_decay=0.0)


def named_classes(names):
    return {"id2label": dict(enumerate(names)), "label2id": {name: index for index, name in enumerate(names)}}


def test_teacher_classes_are_matched_to_the_students_by_name(tmp_path, pixel_values):
    """The same classes in another order: the teacher's logits are reordered so each target is the student's class."""
    teacher_model = tiny_classifier_teacher(num_labels=4)
    teacher_model.config.update(named_classes(["crack", "finger", "ok", "spot"]))
    student = G2SDForImageClassification(
        tiny_student_config(
            num_labels=4, use_distillation_token=True, **named_classes(["ok", "spot", "crack", "finger"])
        )
    )
    trainer = SpecificDistillationTrainer(model=student, teacher=teacher_model, args=specific_args(tmp_path))
    with torch.no_grad():
        original = teacher_model(pixel_values=pixel_values).logits
    torch.testing.assert_close(trainer.teacher(pixel_values), original[:, [2, 3, 0, 1]])

    other = G2SDForImageClassification(
        tiny_student_config(
            num_labels=4, use_distillation_token=True, **named_classes(["ok", "spot", "crack", "burn"])
        )
    )
    with pytest.raises(
        ValueError, match=r"only the teacher has \['finger'\], only the student \(the data\) has \['burn'\]"
    ):
        SpecificDistillationTrainer(model=other, teacher=teacher_model, args=specific_args(tmp_path))


def test_without_teacher_both_heads_learn_the_task(tmp_path, pixel_values):
    trainer = specific_trainer(tmp_path, teacher=False, distillation_type="none")
    labels = torch.tensor([0, 1, 2, 3])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, {"pixel_values": pixel_values, "labels": labels})
    with torch.no_grad():
        outputs = model(pixel_values)
    expected = (
        F.cross_entropy(outputs.cls_logits, labels, label_smoothing=0.1)
        + F.cross_entropy(outputs.distillation_logits, labels, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_plain_fine_tuning_needs_no_teacher(tmp_path):
    trainer = specific_trainer(tmp_path, teacher=False, distillation_type="none")
    trainer.train()
    assert trainer.teacher is None
    assert "distillation_loss" not in trainer.state.log_history[0]


def test_classification_teacher_wrapper_is_used_for_models(tmp_path):
    trainer = specific_trainer(tmp_path)
    assert isinstance(trainer.teacher, ClassificationTeacher)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert NUM_PATCHES == 16


@pytest.mark.parametrize("failure", ["safetensors", "torch.save"])
def test_a_full_disk_while_saving_is_reported_as_such_naming_the_checkpoint(tmp_path, monkeypatch, failure):
    """Issue 19: a disk that filled during a save surfaced as a torch enforce failure. A full disk cannot be made
    here, so the two writers raise what they raise on one (ENOSPC; torch's zip-writer enforce failure)."""
    import errno

    trainer = specific_trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    if failure == "safetensors":

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(trainer.model, "save_pretrained", full)
    else:

        def full(*args, **kwargs):
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            )

        monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError, match=r"No space left on the device while saving .*checkpoint-1\. .*free some space"
    ) as raised:
        trainer.train()
    assert raised.value.errno == errno.ENOSPC
    # Reported once, by the save that failed: the checkpoint around the model's save does not wrap it again.
    from g2sd_hf.checkpoints import FullDiskError

    assert isinstance(raised.value, FullDiskError) and not isinstance(raised.value.__cause__, FullDiskError)
    # A checkpoint is complete or absent: the half-written folder is removed (with torch.save failing, the weights
    # had been written), nothing else.
    assert not (tmp_path / "checkpoint-1").exists() and tmp_path.is_dir()


def test_fine_tuning_arguments_refuse_a_teacher_loss(tmp_path):
    from g2sd_hf.training_args import FineTuningArguments

    assert FineTuningArguments(str(tmp_path)).distillation_type == "none"
    with pytest.raises(ValueError, match="Fine-tuning has no teacher"):
        FineTuningArguments(str(tmp_path), distillation_type="hard")
