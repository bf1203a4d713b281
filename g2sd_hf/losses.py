"""The losses of G2SD as small pure functions.

Generic distillation (paper's L_GD): Smooth-L1 between the student's predicted decoder features and the teacher's
LayerNorm-ed MAE decoder features. Specific distillation (paper's L_SD = L_task + beta * L_KD): a task loss plus a
knowledge-distillation loss from a task-fine-tuned teacher, hard (DeiT), soft (Hinton) or normalized (NKD).

Every loss is computed in float32 and returns the mean over the batch. This file imports only torch, so that
`save_pretrained` can ship it beside `modeling_g2sd.py` for `trust_remote_code` loading.
"""

import torch
import torch.nn.functional as F


def normalize_teacher_features(hidden_states: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The generic-distillation target: LayerNorm without affine parameters over the feature dimension.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch, tokens, dim)`): The teacher's decoder hidden states.
        eps (`float`): LayerNorm epsilon (1e-6 in G2SD).

    Returns:
        `torch.Tensor` of the same shape, in float32.

    Example:

    ```python
    >>> targets = normalize_teacher_features(torch.randn(2, 5, 8))
    >>> targets.mean(-1).abs().max() < 1e-5
    tensor(True)
    ```
    """
    hidden_states = hidden_states.float()
    return F.layer_norm(hidden_states, hidden_states.shape[-1:], eps=eps)


def feature_loss_per_token(
    predicted_features: torch.Tensor, teacher_targets: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """Smooth-L1 (with `beta`) between predicted and target features, averaged over channels: one value per token.

    Args:
        predicted_features (`torch.Tensor` of shape `(batch, 1 + num_patches, dim)`):
            The student's feature-head output for the cls token followed by every patch (visible and masked).
        teacher_targets (`torch.Tensor` of the same shape): The normalized teacher features.
        beta (`float`): Smooth-L1 threshold between the quadratic and the linear regime (2.0 in G2SD).

    Returns:
        `torch.Tensor` of shape `(batch, 1 + num_patches)`, in float32.
    """
    if predicted_features.shape != teacher_targets.shape:
        raise ValueError(
            f"Predicted features {tuple(predicted_features.shape)} and teacher targets "
            f"{tuple(teacher_targets.shape)} differ in shape: the student's target_hidden_size must equal the "
            "teacher's decoder width and both must see the same patch grid."
        )
    per_element = F.smooth_l1_loss(predicted_features.float(), teacher_targets.float(), beta=beta, reduction="none")
    return per_element.mean(dim=-1)


def reduce_token_losses(
    per_token: torch.Tensor, mask: torch.Tensor | None = None, tokens: str = "all"
) -> torch.Tensor:
    """Average per-token losses `(batch, 1 + num_patches)` over `"all"` tokens, or the `"masked"` / `"visible"` patches.

    Args:
        per_token (`torch.Tensor` of shape `(batch, 1 + num_patches)`): From `feature_loss_per_token`.
        mask (`torch.Tensor` of shape `(batch, num_patches)`, *optional*): 1 for masked patches, 0 for visible ones.
            Required unless `tokens="all"`.
        tokens (`str`): `"all"` (cls + every patch), `"masked"` or `"visible"` (patch tokens only).

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if tokens == "all":
        return per_token.mean()
    if tokens not in ("masked", "visible"):
        raise ValueError(f"tokens must be 'all', 'masked' or 'visible', got {tokens!r}.")
    if mask is None:
        raise ValueError(f"tokens={tokens!r} needs the mask of masked patches.")
    weights = mask.float() if tokens == "masked" else 1.0 - mask.float()
    return (per_token[:, 1:] * weights).sum() / weights.sum().clamp(min=1.0)  # the cls token dropped


def generic_distillation_loss(
    predicted_features: torch.Tensor,
    teacher_targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    tokens: str = "all",
    beta: float = 2.0,
    return_terms: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """L_GD: Smooth-L1 (with `beta`) between predicted and target features, averaged over tokens and channels.

    The one place L_GD is computed: `G2SDForGenericDistillation.forward` calls it, and `GenericDistillationTrainer`
    optimizes and logs what the model returns.

    Args:
        predicted_features (`torch.Tensor` of shape `(batch, 1 + num_patches, dim)`):
            The student's feature-head output for the cls token followed by every patch (visible and masked).
        teacher_targets (`torch.Tensor` of the same shape): The normalized teacher features.
        mask (`torch.Tensor` of shape `(batch, num_patches)`, *optional*):
            1 for masked patches, 0 for visible ones. Required unless `tokens="all"` (and for `return_terms`).
        tokens (`str`): `"all"` averages over the cls token and every patch (the official setting); `"masked"` and
            `"visible"` average over those patch tokens only.
        beta (`float`): Smooth-L1 threshold between the quadratic and the linear regime (2.0 in G2SD).
        return_terms (`bool`): Also return the loss restricted to the masked and to the visible patches (detached,
            for logging), as a dict `{"loss", "masked_token_loss", "visible_token_loss"}`.

    Returns:
        `torch.Tensor`: the scalar loss; with `return_terms`, the dict of the loss and its terms.

    Example:

    ```python
    >>> prediction, target = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    >>> generic_distillation_loss(prediction, target, beta=2.0)  # 0.5 * 1**2 / 2
    tensor(0.2500)
    ```
    """
    per_token = feature_loss_per_token(predicted_features, teacher_targets, beta)
    loss = reduce_token_losses(per_token, mask, tokens)
    if not return_terms:
        return loss
    if mask is None:
        raise ValueError("return_terms=True needs the mask of masked patches.")
    per_token = per_token.detach()
    return {
        "loss": loss,
        "masked_token_loss": reduce_token_losses(per_token, mask, "masked"),
        "visible_token_loss": reduce_token_losses(per_token, mask, "visible"),
    }


def smooth_targets(labels: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Class-probability targets: one-hot (or already mixed, e.g. by mixup/cutmix) with label smoothing.

    Args:
        labels (`torch.Tensor`): class indices of shape `(batch,)`, or probabilities of shape `(batch, num_classes)`.
        num_classes (`int`): Number of classes.
        label_smoothing (`float`): epsilon; the target becomes `(1 - epsilon) * target + epsilon / num_classes`.

    Returns:
        `torch.Tensor` of shape `(batch, num_classes)`, in float32.
    """
    if labels.ndim == 1:
        targets = F.one_hot(labels.long(), num_classes).float()
    else:
        targets = labels.float()
    return targets * (1.0 - label_smoothing) + label_smoothing / num_classes


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class probabilities: `mean_b( -sum_k targets[b, k] * log_softmax(logits)[b, k] )`.

    Args:
        logits (`torch.Tensor` of shape `(batch, num_classes)`): The logits.
        targets (`torch.Tensor` of shape `(batch, num_classes)`): Rows summing to one.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def labeled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor, label_smoothing: float):
    """The task loss of a batch that mixes labeled and unlabeled images: the soft-target cross-entropy (with label
    smoothing) averaged over the labeled rows only, `mean_{b labeled}( -sum_k y~[b, k] log_softmax(logits)[b, k] )`;
    zero, with a gradient path kept, when the batch has no labeled row.

    Args:
        logits (`torch.Tensor` of shape `(batch, num_classes)`): The classification head's logits.
        labels (`torch.Tensor` of shape `(batch,)`): Class indices; any value on the unlabeled rows.
        labeled (`torch.Tensor` of shape `(batch,)`, bool): Which rows have a label.
        label_smoothing (`float`): epsilon of `smooth_targets`.

    Returns:
        `torch.Tensor`: the scalar loss. With every row labeled it is `soft_target_cross_entropy` of the whole batch.
    """
    if not bool(labeled.any()):
        return logits.float().sum() * 0.0
    targets = smooth_targets(labels[labeled], logits.shape[-1], label_smoothing)
    return soft_target_cross_entropy(logits[labeled], targets)


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy against the teacher's arg-max class, `CE(s, argmax t)`.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, num_classes)`): Usually the distillation head's logits.
        teacher_logits (`torch.Tensor` of shape `(batch, num_classes)`): The teacher's logits.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def soft_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton's soft distillation: `T^2 * KL(softmax(t / T) || softmax(s / T))`, summed over classes, batch mean.

    (DeiT's implementation divides the summed KL by batch x classes instead of batch.)

    Args:
        student_logits (`torch.Tensor` of shape `(batch, num_classes)`): The student's logits.
        teacher_logits (`torch.Tensor` of shape `(batch, num_classes)`): The teacher's logits.
        temperature (`float`): T.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Normalized knowledge distillation (NKD, Yang et al., ICCV 2023).

    The G2SD release offers NKD alone on the classification head; `SpecificDistillationTrainer` uses it as L_KD on
    the distillation head, beside the task loss, so that every option shares L_SD = L_task + beta * L_KD.

    With `t` the label, `S = softmax(s)`, `T = softmax(t_logits)` and `N(.)` the softmax over the non-target classes
    at temperature `temperature` (lambda):

        L_NKD = -T_t log S_t  -  gamma * lambda^2 * sum_{i != t} N(T^lambda)_i log N(S^lambda)_i

    Args:
        student_logits (`torch.Tensor` of shape `(batch, num_classes)`): The student's logits.
        teacher_logits (`torch.Tensor` of shape `(batch, num_classes)`): The teacher's logits.
        labels (`torch.Tensor`): class indices `(batch,)`, or probabilities `(batch, num_classes)` (mixup/cutmix)
            whose arg-max is taken as the target class, as in the authors' code.
        temperature (`float`): lambda, the temperature of the non-target distributions.
        gamma (`float`): weight of the non-target term.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    target = labels.argmax(dim=-1) if labels.ndim == 2 else labels.long()
    batch_size, num_classes = student_logits.shape
    is_target = F.one_hot(target, num_classes).bool()

    student_target_log_prob = F.log_softmax(student_logits, dim=-1)[is_target]  # (batch,)
    teacher_target_prob = F.softmax(teacher_logits, dim=-1)[is_target]  # (batch,)
    target_term = -(teacher_target_prob * student_target_log_prob).mean()

    # The non-target classes of each row, renormalized: softmax over the other num_classes - 1 logits.
    student_others = student_logits[~is_target].view(batch_size, num_classes - 1)
    teacher_others = teacher_logits[~is_target].view(batch_size, num_classes - 1)
    teacher_others_probs = F.softmax(teacher_others / temperature, dim=-1)
    student_others_log_probs = F.log_softmax(student_others / temperature, dim=-1)
    non_target_term = -(teacher_others_probs * student_others_log_probs).sum(dim=-1).mean()
    return target_term + gamma * temperature**2 * non_target_term


def specific_distillation_loss(
    task_loss: torch.Tensor, distillation_loss: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """L_SD = L_task + beta * L_KD, divided by (1 + beta).

    The division keeps the loss scale fixed as beta changes, and with beta = 1 gives the official
    `(CE(cls_logits, y) + CE(distillation_logits, argmax teacher_logits)) / 2`.

    Args:
        task_loss (`torch.Tensor`): L_task.
        distillation_loss (`torch.Tensor`): L_KD.
        beta (`float`): weight of the distillation loss.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    return (task_loss + beta * distillation_loss) / (1.0 + beta)


def _resize(maps: torch.Tensor, size) -> torch.Tensor:
    """Average over the covered area when shrinking, bilinear when growing."""
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def weighted_feature_distillation_loss(
    student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Feature distillation on a feature pyramid: per level, the squared error averaged over channels and over
    locations weighted by `weights` (resized to the level); then averaged over levels.

    Args:
        student_maps (`list[torch.Tensor]`): Maps of shape `(batch, channels, height_l, width_l)`.
        teacher_maps (`list[torch.Tensor]`): The teacher's maps, same shapes.
        weights (`torch.Tensor` of shape `(batch, height, width)`, *optional*): Per-location weights (e.g. the
            teacher's confidence); uniform when not given.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"{len(student_maps)} student feature maps but {len(teacher_maps)} teacher maps.")
    losses = []
    for student, teacher in zip(student_maps, teacher_maps):
        if student.shape != teacher.shape:
            raise ValueError(
                f"Student feature map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ: use the "
                "same pyramid width (fpn_hidden_size) and input size for both."
            )
        per_location = (student.float() - teacher.float()).pow(2).mean(dim=1)  # (batch, height_l, width_l)
        if weights is None:
            losses.append(per_location.mean())
            continue
        level_weights = _resize(weights[:, None].float(), per_location.shape[-2:])[:, 0]
        losses.append((per_location * level_weights).sum() / level_weights.sum().clamp(min=1e-6))
    return torch.stack(losses).mean()


def release_feature_distillation_loss(
    student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], weights: list[torch.Tensor]
) -> torch.Tensor:
    """The release's detection feature distillation (`tools/plain_distill_net.py`): per level, the squared error
    weighted per location, summed over channels and locations and divided by the sum of the weights; summed over
    levels: `sum_l sum_{c,h,w} w_l (s_l - t_l)^2 / sum_{h,w} w_l`.

    Args:
        student_maps (`list[torch.Tensor]`): The student's (adapted) maps, `(batch, channels, height_l, width_l)`.
        teacher_maps (`list[torch.Tensor]`): The teacher's maps, same shapes.
        weights (`list[torch.Tensor]`): Per level, the location weights `(batch, height_l, width_l)` (the teacher's
            highest score there).

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if not len(student_maps) == len(teacher_maps) == len(weights):
        raise ValueError(
            f"{len(student_maps)} student maps, {len(teacher_maps)} teacher maps, {len(weights)} weight maps."
        )
    total = 0.0
    for student, teacher, level_weights in zip(student_maps, teacher_maps, weights):
        if student.shape != teacher.shape:
            raise ValueError(
                f"Student feature map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ: use the "
                "same pyramid width (fpn_hidden_size) and input size for both."
            )
        level_weights = level_weights.float()
        squared = (student.float() - teacher.float()).pow(2) * level_weights[:, None]
        total = total + squared.sum() / level_weights.sum().clamp(min=1e-6)
    return total


def release_score_distillation_loss(
    student_scores: list[torch.Tensor], teacher_scores: list[torch.Tensor], weights: list[torch.Tensor]
) -> torch.Tensor:
    """The release's detection score distillation: per level, the binary cross-entropy between the student's and
    the teacher's scores (probabilities), weighted per location, summed over classes and locations and divided by the
    sum of the weights; summed over levels.

    Args:
        student_scores (`list[torch.Tensor]`): Per level, probabilities `(batch, classes, height_l, width_l)`.
        teacher_scores (`list[torch.Tensor]`): The teacher's, same shapes.
        weights (`list[torch.Tensor]`): Per level, the location weights `(batch, height_l, width_l)`.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    total = 0.0
    for student, teacher, level_weights in zip(student_scores, teacher_scores, weights, strict=True):
        level_weights = level_weights.float()
        bce = F.binary_cross_entropy(student.float().clamp(1e-6, 1 - 1e-6), teacher.float(), reduction="none")
        total = total + (bce * level_weights[:, None]).sum() / level_weights.sum().clamp(min=1e-6)
    return total


def channel_wise_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021), the release's segmentation distillation (`distill_cwd.py`):
    each class channel's map is softmax-normalized over the locations with temperature `T`, and
    `T^2 * KL(teacher || student)` is summed over locations and averaged over images and channels.

    The release computes the cross-entropy `-sum p_t log p_s` instead of the KL: the two differ by the teacher's
    entropy, a constant, so their gradients are the same.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, classes, height, width)`): The student's decode-head logits.
        teacher_logits (`torch.Tensor` of the same shape): The teacher's.
        temperature (`float`): T (1.0 in the release).

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: the "
            "decode heads must predict the same classes at the same resolution."
        )
    batch, channels = student_logits.shape[:2]
    student = F.log_softmax(student_logits.float().flatten(2) / temperature, dim=-1)  # (batch, classes, locations)
    teacher = F.log_softmax(teacher_logits.float().flatten(2) / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum() * temperature**2 / (batch * channels)


def pixel_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-pixel soft distillation of class distributions: `T^2 * KL(softmax(t / T) || softmax(s / T))`, summed over
    classes and averaged over pixels.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, classes, height, width)`): The student's per-pixel logits.
        teacher_logits (`torch.Tensor` of the same shape): The teacher's.
        temperature (`float`): T.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return (teacher.exp() * (teacher - student)).sum(dim=1).mean() * temperature**2


def probability_distillation_loss(
    student_probabilities: torch.Tensor, teacher_probabilities: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """`KL(teacher || student)` between per-pixel class distributions given as probabilities `(batch, classes, h, w)`
    (e.g. Mask2Former's semantic maps), summed over classes and averaged over pixels."""
    student = student_probabilities.float().clamp(min=eps)
    teacher = teacher_probabilities.float().clamp(min=eps)
    return (teacher * (teacher.log() - student.log())).sum(dim=1).mean()


def weighted_score_distillation_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Score distillation: binary cross-entropy between the student's and the teacher's class scores (probabilities)
    at each location, averaged over classes, and over locations weighted by `weights`.

    Args:
        student_scores (`torch.Tensor` of shape `(batch, classes, height, width)`): Probabilities in [0, 1].
        teacher_scores (`torch.Tensor` of the same shape): The teacher's.
        weights (`torch.Tensor` of shape `(batch, height, width)`): Per-location weights.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    student = student_scores.float().clamp(1e-6, 1 - 1e-6)
    bce = F.binary_cross_entropy(student, teacher_scores.float(), reduction="none").mean(dim=1)
    return (bce * weights.float()).sum() / weights.float().sum().clamp(min=1e-6)


__all__ = [
    "channel_wise_distillation_loss",
    "feature_loss_per_token",
    "generic_distillation_loss",
    "hard_distillation_loss",
    "labeled_cross_entropy",
    "nkd_loss",
    "normalize_teacher_features",
    "pixel_distillation_loss",
    "probability_distillation_loss",
    "reduce_token_losses",
    "release_feature_distillation_loss",
    "release_score_distillation_loss",
    "smooth_targets",
    "soft_distillation_loss",
    "soft_target_cross_entropy",
    "specific_distillation_loss",
    "weighted_feature_distillation_loss",
    "weighted_score_distillation_loss",
]
