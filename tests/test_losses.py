"""The losses against reference computations written here from the paper's formulas (element by element)."""

import math

import pytest
import torch
import torch.nn.functional as F

from g2sd_hf.losses import (
    channel_wise_distillation_loss,
    generic_distillation_loss,
    hard_distillation_loss,
    nkd_loss,
    normalize_teacher_features,
    pixel_distillation_loss,
    release_feature_distillation_loss,
    release_score_distillation_loss,
    smooth_targets,
    soft_distillation_loss,
    soft_target_cross_entropy,
    specific_distillation_loss,
    weighted_feature_distillation_loss,
    weighted_score_distillation_loss,
)


def reference_smooth_l1(x: float, y: float, beta: float) -> float:
    difference = abs(x - y)
    return 0.5 * difference**2 / beta if difference < beta else difference - 0.5 * beta


def reference_generic_loss(predicted, targets, mask, tokens, beta):
    """Mean Smooth-L1 over the selected tokens and all channels, one element at a time."""
    batch, num_tokens, dim = predicted.shape
    total, count = 0.0, 0
    for b in range(batch):
        for t in range(num_tokens):
            if tokens == "masked" and (t == 0 or mask[b, t - 1] == 0):
                continue
            if tokens == "visible" and (t == 0 or mask[b, t - 1] == 1):
                continue
            for c in range(dim):
                total += reference_smooth_l1(predicted[b, t, c].item(), targets[b, t, c].item(), beta)
                count += 1
    return total / count


@pytest.mark.parametrize("tokens", ["all", "masked", "visible"])
def test_generic_distillation_loss_matches_smooth_l1_formula(tokens):
    generator = torch.Generator().manual_seed(0)
    predicted = 3 * torch.randn(2, 5, 3, generator=generator)  # differences on both sides of beta
    targets = torch.randn(2, 5, 3, generator=generator)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    loss = generic_distillation_loss(predicted, targets, mask, tokens=tokens, beta=2.0)
    expected = reference_generic_loss(predicted, targets, mask, tokens, beta=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_generic_distillation_loss_beta_changes_the_loss():
    predicted, targets = torch.zeros(1, 2, 1), torch.full((1, 2, 1), 1.5)
    assert generic_distillation_loss(predicted, targets, beta=2.0).item() == pytest.approx(0.5 * 1.5**2 / 2.0)
    assert generic_distillation_loss(predicted, targets, beta=1.0).item() == pytest.approx(1.5 - 0.5)


def test_generic_distillation_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="target_hidden_size"):
        generic_distillation_loss(torch.zeros(1, 5, 8), torch.zeros(1, 5, 16))
    with pytest.raises(ValueError, match="needs the mask"):
        generic_distillation_loss(torch.zeros(1, 5, 8), torch.zeros(1, 5, 8), tokens="masked")


def test_normalize_teacher_features_is_layer_norm_without_affine():
    hidden = torch.randn(2, 7, 12) * 5 + 3
    expected = torch.nn.LayerNorm(12, eps=1e-6, elementwise_affine=False)(hidden)
    torch.testing.assert_close(normalize_teacher_features(hidden), expected)
    by_hand = (hidden - hidden.mean(-1, keepdim=True)) / torch.sqrt(
        hidden.var(-1, unbiased=False, keepdim=True) + 1e-6
    )
    torch.testing.assert_close(normalize_teacher_features(hidden), by_hand, atol=1e-5, rtol=1e-5)


def test_smooth_targets_one_hot_and_mixed():
    targets = smooth_targets(torch.tensor([2, 0]), num_classes=4, label_smoothing=0.1)
    torch.testing.assert_close(targets[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    mixed = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    torch.testing.assert_close(smooth_targets(mixed, 4, 0.1), torch.tensor([[0.655, 0.295, 0.025, 0.025]]))


def test_soft_target_cross_entropy_equals_cross_entropy_for_one_hot():
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 3, 6, 2, 2])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert soft_target_cross_entropy(logits, smooth_targets(labels, 7, 0.1)).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_hard_distillation_is_cross_entropy_to_teacher_argmax():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    teacher = torch.tensor([[0.1, 3.0, 0.0], [0.0, 0.0, 9.0]])  # teacher classes 1 and 2
    expected = (
        -(
            math.log(math.exp(0.0) / sum(map(math.exp, [2.0, 0.0, -1.0])))
            + math.log(math.exp(0.5) / sum(map(math.exp, [0.0, 1.0, 0.5])))
        )
        / 2
    )
    assert hard_distillation_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_distillation_is_scaled_kl(temperature):
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    expected = 0.0
    for s_row, t_row in zip(student, teacher):
        p = torch.softmax(t_row / temperature, 0)
        q = torch.softmax(s_row / temperature, 0)
        expected += sum(p[k].item() * math.log(p[k].item() / q[k].item()) for k in range(5))
    expected = expected / 3 * temperature**2
    assert soft_distillation_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)


def reference_nkd(student, teacher, labels, temperature, gamma):
    """NKD written per sample: -T_t log S_t - gamma * lambda^2 * sum_{i != t} N(T^lambda)_i log N(S^lambda)_i."""
    total_target, total_non_target = 0.0, 0.0
    for s_row, t_row, label in zip(student, teacher, labels):
        s_probs, t_probs = torch.softmax(s_row, 0), torch.softmax(t_row, 0)
        total_target += -t_probs[label].item() * math.log(s_probs[label].item())
        s_temp, t_temp = torch.softmax(s_row / temperature, 0), torch.softmax(t_row / temperature, 0)
        others = [i for i in range(len(s_row)) if i != label]
        s_norm = sum(s_temp[i].item() for i in others)
        t_norm = sum(t_temp[i].item() for i in others)
        total_non_target += -sum((t_temp[i].item() / t_norm) * math.log(s_temp[i].item() / s_norm) for i in others)
    n = len(labels)
    return total_target / n + gamma * temperature**2 * total_non_target / n


@pytest.mark.parametrize("temperature,gamma", [(1.0, 1.0), (2.0, 1.5)])
def test_nkd_matches_formula(temperature, gamma):
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    labels = torch.tensor([0, 5, 2, 2])
    expected = reference_nkd(student, teacher, labels, temperature, gamma)
    assert nkd_loss(student, teacher, labels, temperature, gamma).item() == pytest.approx(expected, rel=1e-5)
    # Mixed (probability) labels use their arg-max class, as the authors' code does.
    soft_labels = torch.nn.functional.one_hot(labels, 6).float() * 0.6 + 0.4 / 6
    assert nkd_loss(student, teacher, soft_labels, temperature, gamma).item() == pytest.approx(expected, rel=1e-5)


def test_specific_distillation_loss_official_hard_default():
    task, kd = torch.tensor(1.2), torch.tensor(0.4)
    assert specific_distillation_loss(task, kd, beta=1.0).item() == pytest.approx((1.2 + 0.4) / 2)
    assert specific_distillation_loss(task, kd, beta=3.0).item() == pytest.approx((1.2 + 3 * 0.4) / 4)
    assert specific_distillation_loss(task, kd, beta=0.0).item() == pytest.approx(1.2)


def test_weighted_feature_loss_by_hand():
    student = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    teacher = [torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]]), torch.full((1, 2, 1, 1), 3.0)]
    weights = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # only the top-left location counts at level 0
    # Level 0: location (0, 0) has squared errors 1 and 1 -> 1. Level 1: the weights' mean 0.25, error 9 -> 9.
    assert weighted_feature_distillation_loss(student, teacher, weights).item() == pytest.approx((1.0 + 9.0) / 2)
    assert weighted_feature_distillation_loss(student, teacher).item() == pytest.approx(((1 + 4 + 1) / 8 + 9) / 2)
    with pytest.raises(ValueError, match="fpn_hidden_size"):
        weighted_feature_distillation_loss([torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 3, 2, 2)])
    # A coarser level gets the weights averaged over the area each of its locations covers (not bilinear samples).
    weights = torch.tensor([[[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    errors = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # squared errors 1, 4, 9, 16 at the 2x2 level
    pooled = torch.tensor([1.0, 0.0, 0.0, 1.0])  # area means of the 4x4 weights over each 2x2 cell
    expected = float((pooled * errors.flatten() ** 2).sum() / pooled.sum())
    loss = weighted_feature_distillation_loss([torch.zeros(1, 1, 2, 2)], [errors], weights)
    assert loss.item() == pytest.approx(expected) and expected == pytest.approx(8.5)


def test_pixel_kl_and_weighted_bce_by_hand():
    student, teacher = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    expected = 0.0
    for b in range(2):
        for y in range(4):
            for x in range(5):
                p, q = F.softmax(teacher[b, :, y, x] / 2, 0), F.softmax(student[b, :, y, x] / 2, 0)
                expected += float((p * (p / q).log()).sum())
    assert pixel_distillation_loss(student, teacher, temperature=2.0).item() == pytest.approx(
        expected / 40 * 4, rel=1e-4
    )
    scores_s, scores_t = torch.tensor([[[[0.2]], [[0.9]]]]), torch.tensor([[[[0.5]], [[1.0]]]])
    bce = -(0.5 * math.log(0.2) + 0.5 * math.log(0.8) + math.log(0.9)) / 2
    assert weighted_score_distillation_loss(scores_s, scores_t, torch.ones(1, 1, 1)).item() == pytest.approx(
        bce, rel=1e-5
    )


def test_release_feature_and_score_losses_by_hand():
    student = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    teacher = [torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]]), torch.full((1, 2, 1, 1), 3.0)]
    weights = [torch.tensor([[[1.0, 0.5], [0.0, 0.0]]]), torch.tensor([[[2.0]]])]
    # Level 0: (1 * (1 + 1) + 0.5 * 4) / 1.5; level 1: 2 * (9 + 9) / 2. Summed over channels and levels.
    assert release_feature_distillation_loss(student, teacher, weights).item() == pytest.approx(4 / 1.5 + 18)
    scores_s, scores_t = [torch.tensor([[[[0.2]], [[0.9]]]])], [torch.tensor([[[[0.5]], [[1.0]]]])]
    bce = -(0.5 * math.log(0.2) + 0.5 * math.log(0.8) + math.log(0.9))  # summed over the two classes
    assert release_score_distillation_loss(scores_s, scores_t, [torch.full((1, 1, 1), 0.7)]).item() == pytest.approx(
        bce, rel=1e-5
    )


def test_channel_wise_distillation_has_the_gradient_of_the_release_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5, requires_grad=True), torch.randn(2, 3, 4, 5)
    loss = channel_wise_distillation_loss(student, teacher, temperature=2.0)
    (ours,) = torch.autograd.grad(loss, student)
    # The release's ChannelWiseDivergence: sum(-softmax(t/tau) * log_softmax(s/tau)) * tau^2 / (C * N), over H*W.
    flat_s, flat_t = student.reshape(-1, 20) / 2.0, teacher.reshape(-1, 20) / 2.0
    release = (-(F.softmax(flat_t, dim=1) * F.log_softmax(flat_s, dim=1))).sum() * 4.0 / 6
    (theirs,) = torch.autograd.grad(release, student)
    torch.testing.assert_close(ours, theirs)
    entropy = (-(F.softmax(flat_t, dim=1) * F.log_softmax(flat_t, dim=1))).sum() * 4.0 / 6
    assert loss.item() == pytest.approx((release - entropy).item(), rel=1e-5)  # KL = cross-entropy - entropy
