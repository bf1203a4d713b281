"""Did a training run learn anything? Checks run at the end of every training and evaluation, so that a run that
trained nothing, or stayed at chance, says so in the log and in its model card instead of passing for a model.

- A classifier learned nothing when its training task loss never left the chance level, the cross-entropy of a
  uniform guess, `ln(num_labels)`, or when its evaluation is at chance: a balanced accuracy (the mean per-class
  recall) no better than `1 / num_labels`, which is what answering one class, or guessing, scores.
- A regression-style loss (generic distillation's L_GD, MAE's pixel loss) learned nothing when it did not fall
  below its first logged value.

And whether a stage of the chain is too weak for the next one (`skill`: how far a balanced accuracy is from chance
towards perfect, `(balanced - 1/K) / (1 - 1/K)`):

- A specific-distillation teacher is too weak to teach when its skill on the validation split is below
  `MIN_TEACHER_SKILL` (a third of the way from chance to perfect), or when it is no better than the student before
  training; and the teacher was the weak stage when the student ends above it.
- A distilled student that ends below the scratch baseline (the same student trained from a random initialization,
  same recipe, no teacher) names the weak stage: the teacher when it is no better than that baseline, else the
  student's starting point (its generic distillation).
- A fine-tuned classifier (the teacher-to-be) learned less than its first epoch suggests when its final skill is
  below `MIN_TEACHER_SKILL`, or no more than `MIN_GAIN_AFTER_FIRST_EPOCH` above its skill after the first epoch.

The functions are pure: they read a Trainer's `state.log_history` and metrics dictionaries and return warnings.
"""

import math
from collections.abc import Sequence


# The last fraction of the logged losses whose mean is compared with the chance level: a loss that merely starts at
# chance is normal, one that ends there is not.
FINAL_FRACTION = 0.25
# A mean training loss above this fraction of ln(num_labels) counts as chance.
CHANCE_LOSS_FRACTION = 0.95
# A balanced accuracy within this of 1 / num_labels counts as chance.
CHANCE_ACCURACY_MARGIN = 0.02
# A regression loss whose final mean is above this fraction of its first value did not decrease.
NO_PROGRESS_FRACTION = 0.95
# A teacher whose skill is below this is barely above chance: most of its distillation targets are wrong. Every
# teacher measured below it ended below a scratch student of the student's size (docs/recipes.md).
MIN_TEACHER_SKILL = 1 / 3
# Fine-tuning that ends less than this skill above where its first epoch got to stopped learning after it.
MIN_GAIN_AFTER_FIRST_EPOCH = 0.02


def chance_cross_entropy(num_labels: int) -> float:
    """The cross-entropy of a uniform guess over `num_labels` classes: `ln(num_labels)`."""
    return math.log(num_labels)


def logged_values(log_history: Sequence[dict], key: str) -> list[float]:
    """The per-step values of `key` in a Trainer's `log_history` (the end-of-training summary excluded)."""
    return [float(entry[key]) for entry in log_history if key in entry and "train_runtime" not in entry]


def final_mean(values: Sequence[float], fraction: float = FINAL_FRACTION) -> float:
    """The mean of the last `fraction` of `values` (at least one value)."""
    count = max(1, math.ceil(len(values) * fraction))
    return sum(values[-count:]) / count


def no_step_warning(global_step: int) -> list[str]:
    """A warning when training ran no optimizer step at all."""
    if global_step > 0:
        return []
    return [
        "Training ran 0 optimizer steps: the saved weights are the initial ones. Check that the training set holds at "
        "least one batch (per_device_train_batch_size x processes x gradient_accumulation_steps images, fewer with "
        "dataloader_drop_last false) and that max_steps / num_train_epochs are positive."
    ]


def classification_training_warnings(
    log_history: Sequence[dict], num_labels: int, loss_key: str = "task_loss", causes: str = ""
) -> list[str]:
    """Warn when the classification loss `loss_key` ended at the chance level `ln(num_labels)`.

    Args:
        log_history (`Sequence[dict]`): A Trainer's `state.log_history`.
        num_labels (`int`): Number of classes.
        loss_key (`str`): The logged task loss (the loss of the labels alone, not a distillation term).
        causes (`str`): Likely causes to name in the warning.

    Returns:
        `list[str]`: one warning, or none.

    Example:

    ```python
    >>> classification_training_warnings([{"task_loss": 2.31}, {"task_loss": 2.30}], num_labels=10)
    ['The training task_loss stayed at the chance level: ...']
    ```
    """
    values = logged_values(log_history, loss_key)
    if not values or num_labels < 2:
        return []
    chance, final = chance_cross_entropy(num_labels), final_mean(values)
    if final < CHANCE_LOSS_FRACTION * chance:
        return []
    return [
        f"The training {loss_key} stayed at the chance level: {final:.3f} over the last quarter of training, against "
        f"ln({num_labels}) = {chance:.3f} for a uniform guess. The model learned nothing from the labels. {causes}".strip()
    ]


def classification_evaluation_warnings(
    metrics: dict, num_labels: int, prefix: str = "eval_", causes: str = ""
) -> list[str]:
    """Warn when an evaluation is at chance: balanced accuracy within 0.02 of `1 / num_labels` or, without it, a
    cross-entropy at `ln(num_labels)` or above.

    Example:

    ```python
    >>> classification_evaluation_warnings({"eval_balanced_accuracy": 0.25, "eval_accuracy": 0.57}, num_labels=4)
    ['The evaluation is at chance: ...']
    ```
    """
    if num_labels < 2:
        return []
    balanced = metrics.get(f"{prefix}balanced_accuracy")
    if balanced is not None:
        if balanced > 1 / num_labels + CHANCE_ACCURACY_MARGIN:
            return []
        accuracy = metrics.get(f"{prefix}accuracy")
        shown = f" (accuracy {accuracy:.3f})" if accuracy is not None else ""
        finding = (
            f"balanced accuracy {balanced:.3f}{shown}, against {1 / num_labels:.3f} for answering one class "
            "or guessing"
        )
    else:
        loss = metrics.get(f"{prefix}loss")
        if loss is None or loss < CHANCE_LOSS_FRACTION * chance_cross_entropy(num_labels):
            return []
        finding = f"cross-entropy {loss:.3f}, against ln({num_labels}) = {chance_cross_entropy(num_labels):.3f} for a uniform guess"
    return [f"The evaluation is at chance: {finding}. {causes}".strip()]


def regression_training_warnings(
    log_history: Sequence[dict], loss_key: str = "loss", what: str = "The training loss"
) -> list[str]:
    """Warn when a loss with no chance level (L_GD, MAE's pixel loss) ended no lower than 95% of its first value.

    Example:

    ```python
    >>> regression_training_warnings([{"loss": 1.0}, {"loss": 0.99}, {"loss": 1.01}, {"loss": 1.0}])
    ['The training loss did not decrease: ...']
    ```
    """
    values = logged_values(log_history, loss_key)
    if len(values) < 2:
        return []
    first, final = values[0], final_mean(values[1:])
    if final < NO_PROGRESS_FRACTION * first:
        return []
    return [
        f"{what} did not decrease: {final:.4g} over the last quarter of training against {first:.4g} at the first "
        "log. The model learned nothing; check the learning rate (after any batch-size scaling) and the number of "
        "steps."
    ]


def skill(balanced_accuracy: float, num_labels: int) -> float:
    """How far a balanced accuracy is from chance towards perfect: `(balanced - 1/K) / (1 - 1/K)`, 0 at chance
    (answering one class, or guessing), 1 when every class is recalled.

    Example:

    ```python
    >>> skill(0.325, num_labels=10)  # a quarter of the way from 0.1 to 1
    0.25
    ```
    """
    chance = 1 / num_labels
    return (balanced_accuracy - chance) / (1 - chance)


def headline_accuracy(metrics: dict, prefix: str) -> tuple[str, float] | None:
    """The metric the chain checks compare: `balanced_accuracy` when present (it is at chance for a model that
    answers one class), else `accuracy`; `None` when the metrics hold neither."""
    for name in ("balanced_accuracy", "accuracy"):
        if f"{prefix}{name}" in metrics:
            return name.replace("_", " "), float(metrics[f"{prefix}{name}"])
    return None


def skill_phrase(name: str, value: float, num_labels: int) -> str:
    """A score and its skill in words, as the logs and warnings write them.

    Example:

    ```python
    >>> skill_phrase("balanced accuracy", 0.325, num_labels=10)
    'balanced accuracy 0.325, 25% of the way from chance (0.100) to perfect'
    ```
    """
    return (
        f"{name} {value:.3f}, {100 * skill(value, num_labels):.0f}% of the way from chance ({1 / num_labels:.3f}) to "
        "perfect"
    )


def teacher_warnings(metrics: dict, num_labels: int) -> list[str]:
    """Warn, before specific distillation, when the teacher is too weak to teach: its skill on the validation split
    (`teacher_eval_*` in `metrics`) below `MIN_TEACHER_SKILL`, or no better than the student before training
    (`initial_eval_*`, when present).

    Example:

    ```python
    >>> teacher_warnings({"teacher_eval_balanced_accuracy": 0.29}, num_labels=10)
    ['The teacher is barely above chance: ...']
    ```
    """
    teacher = headline_accuracy(metrics, "teacher_eval_")
    if teacher is None or num_labels < 2:
        return []
    name, value = teacher
    fixes = (
        "Distilling from it will likely make the student worse than training it without a teacher. Fine-tune the "
        "teacher longer or from a longer-trained MAE (docs/your-data.md), or train with --distillation_type none."
    )
    warnings = []
    if skill(value, num_labels) < MIN_TEACHER_SKILL:
        warnings.append(
            f"The teacher is barely above chance: {skill_phrase(name, value, num_labels)} on the validation split "
            f"(below {MIN_TEACHER_SKILL:.0%}). {fixes}"
        )
    start = headline_accuracy(metrics, "initial_eval_")
    if start is not None and start[0] == name and value <= start[1]:
        warnings.append(
            f"The teacher is no better than the student before training: {name} {value:.3f} against the student's "
            f"{start[1]:.3f} on the validation split. {fixes}"
        )
    return warnings


def weak_teacher_warnings(
    metrics: dict, teacher_metrics: dict, prefix: str = "eval_", teacher_prefix: str = "teacher_eval_"
) -> list[str]:
    """Warn, after specific distillation, when the student ended above its teacher on the same validation split: the
    teacher was the chain's weak stage, and the distillation term pulled the student towards a worse model.

    Example:

    ```python
    >>> weak_teacher_warnings({"eval_balanced_accuracy": 0.6}, {"teacher_eval_balanced_accuracy": 0.3})
    ['The student ended above its teacher: ...']
    ```
    """
    student, teacher = headline_accuracy(metrics, prefix), headline_accuracy(teacher_metrics, teacher_prefix)
    if student is None or teacher is None or student[0] != teacher[0] or student[1] <= teacher[1]:
        return []
    return [
        f"The student ended above its teacher: {student[0]} {student[1]:.3f} against the teacher's {teacher[1]:.3f} on "
        "the validation split. The teacher was the weak stage of the chain: its distillation targets pulled the "
        "student towards a worse model. Compare with the same run without a teacher (--distillation_type none), and "
        "fine-tune a stronger teacher (docs/your-data.md)."
    ]


def comparison_noise(first: float, second: float, num_images: int) -> float:
    """About one standard error of the difference between two accuracies measured on the same `num_images` images,
    `sqrt(2 p (1 - p) / n)` with `p` their mean: differences within it are what another seed or split could give.

    Example:

    ```python
    >>> round(comparison_noise(0.45, 0.45, num_images=600), 3)
    0.029
    ```
    """
    mean = (first + second) / 2
    return math.sqrt(2 * mean * (1 - mean) / max(num_images, 1))


def scratch_baseline_warnings(
    metrics: dict,
    teacher_metrics: dict,
    scratch_metrics: dict,
    num_images: int,
    student_checkpoint: str | None = None,
    prefix: str = "eval_",
) -> list[str]:
    """Warn, after specific distillation, when the student ended below the same student trained from scratch without
    a teacher (`scratch_eval_*` in `scratch_metrics`, the scratch baseline) by more than `comparison_noise` on the
    `num_images` validation images, and name the weak stage:

    - the teacher, when it is no better than the scratch student (`teacher_eval_*` in `teacher_metrics`);
    - else the student's starting point: its checkpoint (`student_checkpoint`, a generic distillation too short to
      build on) or, for a student that started from a random initialization, distillation at this budget.

    A teacher no better than the scratch baseline is also named when the student did not end below it.

    Example:

    ```python
    >>> scratch_baseline_warnings(
    ...     {"eval_balanced_accuracy": 0.377},
    ...     {"teacher_eval_balanced_accuracy": 0.500},
    ...     {"scratch_eval_balanced_accuracy": 0.453},
    ...     num_images=600,
    ...     student_checkpoint="shapes-gd",
    ... )
    ['The student ended below the same student trained from scratch: ... its generic distillation (shapes-gd) ...']
    ```
    """
    student, scratch = headline_accuracy(metrics, prefix), headline_accuracy(scratch_metrics, "scratch_eval_")
    if student is None or scratch is None or student[0] != scratch[0]:
        return []
    name = student[0]
    noise = comparison_noise(student[1], scratch[1], num_images)
    teacher = headline_accuracy(teacher_metrics, "teacher_eval_")
    if student[1] >= scratch[1] - noise:
        if teacher is None or teacher[0] != name or teacher[1] > scratch[1]:
            return []
        # The student held its own, but a teacher no better than scratch is the stage to improve first.
        return [
            f"The teacher is no better than the same student trained from scratch: {name} {teacher[1]:.3f} against "
            f"the scratch baseline's {scratch[1]:.3f} on the validation split (the student ended at {student[1]:.3f}). "
            "The weak stage is the teacher: fine-tune it longer or from a longer-trained MAE (on small data, an MAE "
            "of about 1,000 optimizer steps or more; docs/your-data.md) before relying on what it teaches."
        ]
    finding = (
        f"The student ended below the same student trained from scratch: {name} {student[1]:.3f} against the scratch "
        f"baseline's {scratch[1]:.3f} on the {num_images} validation images (more than the {noise:.3f} two runs can "
        "differ by chance; the baseline has the same recipe and steps, a random initialization and no teacher)."
    )
    if teacher is None or teacher[0] != name:
        weak = (
            "unknown, the teacher or the student's initialization: the teacher was not scored (--chain_checks false). "
            "Rerun with --chain_checks true to have it named."
        )
    elif teacher[1] <= scratch[1]:
        weak = (
            f"the teacher: at {teacher[1]:.3f} it is no better than the scratch student, so its targets cannot lift "
            "the student above it. Fine-tune the teacher longer or from a longer-trained MAE (on small data, an MAE of "
            "about 1,000 optimizer steps or more; docs/your-data.md), or keep the scratch student."
        )
    elif student_checkpoint:
        weak = (
            f"the student's starting point, its generic distillation ({student_checkpoint}): the teacher "
            f"({teacher[1]:.3f}) is above the scratch student, yet the student distilled from that checkpoint ended "
            "below it. Give the generic distillation about as many optimizer steps as the MAE had (docs/your-data.md)."
        )
    else:
        weak = (
            f"the distillation at this budget: the student started from a random initialization like the baseline and "
            f"its teacher ({teacher[1]:.3f}) is above the scratch student, yet learning from both slowed it down. "
            "Train longer, start from a generic distillation (--student_name_or_path), or keep the scratch student."
        )
    return [f"{finding} The weak stage is {weak}"]


def fine_tuning_warnings(metrics: dict, first_epoch_metrics: dict | None, num_labels: int, prefix: str = "eval_"):
    """Warn when a fine-tuned classifier (a teacher-to-be) learned less than its first epoch suggests: its final skill
    below `MIN_TEACHER_SKILL` (too weak to teach), or no more than `MIN_GAIN_AFTER_FIRST_EPOCH` above its skill after
    the first epoch (`first_epoch_metrics`, same prefix): what the pre-trained initialization gave at once, the rest of
    the run did not build on.

    Example:

    ```python
    >>> fine_tuning_warnings({"eval_balanced_accuracy": 0.40}, {"eval_balanced_accuracy": 0.41}, num_labels=10)
    ['The fine-tuning learned nothing after its first epoch: ...']
    ```
    """
    final = headline_accuracy(metrics, prefix)
    if final is None or num_labels < 2:
        return []
    name, value = final
    causes = (
        "Likely causes: an MAE pre-trained too briefly to give features to build on (pre-train it longer, or start "
        "from a longer-trained one), too few fine-tuning steps for a model this size, or layer-wise lr decay holding "
        "the pre-trained layers back (docs/your-data.md)."
    )
    warnings = []
    first = headline_accuracy(first_epoch_metrics or {}, prefix)
    if (
        first is not None
        and first[0] == name
        and skill(value, num_labels) - skill(first[1], num_labels) <= (MIN_GAIN_AFTER_FIRST_EPOCH)
    ):
        warnings.append(
            f"The fine-tuning learned nothing after its first epoch: {name} {value:.3f} at the end against "
            f"{first[1]:.3f} after the first epoch. {causes}"
        )
    if skill(value, num_labels) < MIN_TEACHER_SKILL:
        warnings.append(
            f"This classifier is too weak to be a specific-distillation teacher: {skill_phrase(name, value, num_labels)} "
            f"(below {MIN_TEACHER_SKILL:.0%}); a student distilled from it would likely end worse than one trained "
            f"without a teacher. {causes}"
        )
    return warnings


__all__ = [
    "MIN_GAIN_AFTER_FIRST_EPOCH",
    "MIN_TEACHER_SKILL",
    "chance_cross_entropy",
    "classification_evaluation_warnings",
    "classification_training_warnings",
    "comparison_noise",
    "final_mean",
    "fine_tuning_warnings",
    "headline_accuracy",
    "logged_values",
    "no_step_warning",
    "regression_training_warnings",
    "scratch_baseline_warnings",
    "skill",
    "skill_phrase",
    "teacher_warnings",
    "weak_teacher_warnings",
]
