"""Analyses: CKA's invariances and the minibatch estimator, occlusion, saliency, the 200-class restriction, plots,
and the two analysis scripts."""

import io
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
from transformers.modeling_outputs import ImageClassifierOutput

from g2sd_hf import G2SDForImageClassification
from g2sd_hf.analysis import (
    MinibatchCKA,
    cka_matrix,
    evaluate_accuracy,
    imagenet_wnids,
    linear_cka,
    logits_with_patches_dropped,
    occlude_patches,
    occlusion_curve,
    patch_saliency,
    plot_cka,
    plot_occlusion,
    restrict_to_subset,
    subset_indices,
)
from g2sd_hf.data import ELPV_CLASS_NAMES

from .conftest import tiny_student_config


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_cka_of_a_representation_with_itself_and_its_invariances():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ rotation) == pytest.approx(1.0, abs=1e-9)  # orthogonal transforms
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-12)  # centering
    stretched = x * torch.linspace(0.1, 10, 12)  # anisotropic: not invariant
    assert linear_cka(x, stretched) < 0.95
    assert linear_cka(x, torch.randn(200, 12, generator=generator)) < 0.2


def test_minibatch_cka_matches_full_cka():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(600, 10, generator=generator)
    layers = [
        x,
        x @ torch.randn(10, 20, generator=generator) + 0.5 * torch.randn(600, 20, generator=generator),
        torch.randn(600, 6, generator=generator),
    ]
    minibatch = MinibatchCKA(len(layers), len(layers))
    for start in range(0, 600, 100):
        minibatch.update(
            [layer[start : start + 100] for layer in layers], [layer[start : start + 100] for layer in layers]
        )
    estimate = minibatch.compute()
    full = np.array([[linear_cka(a, b) for b in layers] for a in layers])
    np.testing.assert_allclose(np.diag(estimate), 1.0, atol=1e-9)
    np.testing.assert_allclose(estimate, full, atol=0.03)
    np.testing.assert_allclose(estimate, estimate.T, atol=1e-9)


def test_cka_matrix_between_two_models_has_one_row_per_layer():
    torch.manual_seed(0)
    student = G2SDForImageClassification(tiny_student_config(num_labels=3)).eval()
    loader = [{"pixel_values": torch.randn(8, 3, 32, 32)} for _ in range(3)]
    matrix = cka_matrix(student, student, loader)
    assert matrix.shape == (3, 3)  # embeddings + 2 layers
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)


class PatchModel(nn.Module):
    """A 2-class classifier whose logits depend on the mean of one 8x8 patch only (patch `index` of a 4x4 grid)."""

    def __init__(self, index: int = 5):
        super().__init__()
        self.index = index
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, pixel_values):
        row, column = divmod(self.index, 4)
        value = (
            pixel_values[:, :, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8].mean(dim=(1, 2, 3)) * self.weight
        )
        return ImageClassifierOutput(logits=torch.stack([-value, value], dim=1))


def test_occlusion_zeroes_the_chosen_patches():
    pixels = torch.ones(2, 3, 32, 32)
    order = torch.arange(16).repeat(2, 1)
    occluded = occlude_patches(pixels, 0.25, 8, order)  # 4 of 16 patches: the first row
    assert occluded[:, :, :8].abs().sum() == 0 and torch.equal(occluded[:, :, 8:], pixels[:, :, 8:])
    assert torch.equal(occlude_patches(pixels, 0.0, 8, order), pixels)
    assert occlude_patches(pixels, 1.0, 8, order).abs().sum() == 0


def test_occlusion_curve_starts_at_the_plain_accuracy_and_falls():
    model = PatchModel(index=5).eval()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        labels = torch.randint(0, 2, (16,), generator=generator)
        pixels = torch.randn(16, 3, 32, 32, generator=generator) * 0.1 + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
        batches.append({"pixel_values": pixels, "labels": labels})
    plain = evaluate_accuracy(model, batches)["accuracy"]
    curve = occlusion_curve(model, batches, [0.0, 0.5, 1.0], patch_size=8, seed=0, protocol="fill")
    assert curve[0.0] == plain == 1.0
    assert 0.5 < curve[0.5] < 1.0  # images whose informative patch was dropped fall to the tie-break
    assert curve[1.0] == pytest.approx(np.mean([(batch["labels"] == 0).float().mean() for batch in batches]))
    salient = occlusion_curve(model, batches, [1 / 16], patch_size=8, order="salient", protocol="fill")
    assert salient[1 / 16] < 0.6  # the one informative patch goes first


def vit_classifier(seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def test_dropping_patches_from_the_token_sequence_ignores_their_pixels():
    torch.manual_seed(0)
    g2sd = G2SDForImageClassification(tiny_student_config(num_labels=3, use_distillation_token=True)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    order = torch.stack([torch.randperm(16) for _ in range(2)])
    for model in (g2sd, vit_classifier()):
        with torch.no_grad():
            torch.testing.assert_close(
                logits_with_patches_dropped(model, pixels, 0.0, order), model(pixel_values=pixels).logits
            )
            dropped = logits_with_patches_dropped(model, pixels, 0.25, order)
            # Scramble the 4 dropped patches (the first of `order`): a model that never sees them cannot change.
            scrambled = pixels.clone()
            for image in range(2):
                for patch in order[image, :4].tolist():
                    row, column = divmod(patch, 4)
                    scrambled[image, :, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8] = torch.randn(3, 8, 8) * 5
            torch.testing.assert_close(logits_with_patches_dropped(model, scrambled, 0.25, order), dropped)
            assert not torch.allclose(model(pixel_values=scrambled).logits, model(pixel_values=pixels).logits)
            only_class_token = logits_with_patches_dropped(model, pixels, 1.0, order)
            torch.testing.assert_close(only_class_token[0], only_class_token[1])  # nothing of the images is left
    # One head at a time: the prediction is the mean of the two heads, with or without patches dropped.
    heads = [
        logits_with_patches_dropped(g2sd, pixels, 0.25, order, output)
        for output in ("cls_logits", "distillation_logits")
    ]
    torch.testing.assert_close((heads[0] + heads[1]) / 2, logits_with_patches_dropped(g2sd, pixels, 0.25, order))
    with pytest.raises(ValueError, match="only one head"):
        logits_with_patches_dropped(vit_classifier(), pixels, 0.25, order, "cls_logits")


def test_vit_token_dropping_matches_vit_mae_masking():
    # An independent route: ViTMAEModel runs the same weights on the patches with the lowest noise.
    from transformers import ViTMAEConfig, ViTMAEModel

    classifier = vit_classifier()
    mae = ViTMAEModel(
        ViTMAEConfig(
            **{
                key: getattr(classifier.config, key)
                for key in (
                    "image_size",
                    "patch_size",
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                )
            },
            mask_ratio=0.25,
            layer_norm_eps=classifier.config.layer_norm_eps,
        )
    ).eval()
    state = {
        key.removeprefix("vit."): value for key, value in classifier.state_dict().items() if key.startswith("vit.")
    }
    mae.load_state_dict({key: value for key, value in state.items() if not key.startswith("pooler")}, strict=False)
    pixels, order = torch.randn(2, 3, 32, 32), torch.stack([torch.randperm(16) for _ in range(2)])
    noise = torch.empty(2, 16).scatter_(
        1, order, torch.arange(16, dtype=torch.float32).flip(0).expand(2, -1).contiguous()
    )
    with torch.no_grad():
        expected = classifier.classifier(mae(pixel_values=pixels, noise=noise).last_hidden_state[:, 0])
        torch.testing.assert_close(
            logits_with_patches_dropped(classifier, pixels, 0.25, order), expected, atol=1e-5, rtol=1e-5
        )


def test_saliency_finds_the_informative_patch():
    model = PatchModel(index=9)
    saliency = patch_saliency(model, torch.randn(3, 3, 32, 32), patch_size=8)
    assert saliency.shape == (3, 16) and (saliency.argmax(dim=1) == 9).all()
    assert model.weight.grad is None  # the model's parameters are left alone


class KnownLogits(nn.Module):
    """A 1000-class "model" returning logits given with the batch."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        return ImageClassifierOutput(logits=pixel_values + self.weight)


def test_the_200_class_restriction_maps_labels():
    subset = subset_indices("imagenet-r")
    assert len(subset) == 200 and len(set(subset_indices("imagenet-a"))) == 200
    assert subset[:6] == [1, 2, 4, 6, 8, 9] and subset_indices("imagenet-a")[:5] == [6, 11, 13, 15, 17]
    assert len(imagenet_wnids()) == 1000 and imagenet_wnids()[1] == "n01443537"
    outside = sorted(set(range(1000)) - set(subset))
    labels = torch.tensor([subset[0], subset[57], subset[199]])
    logits = torch.zeros(3, 1000)
    logits[torch.arange(3), torch.tensor(outside[:3])] = 10.0  # the best class overall is never in the subset
    logits[torch.arange(3), labels] = 5.0  # the best class within the subset is the label
    assert torch.equal(restrict_to_subset(logits, subset), labels)
    batches = [{"pixel_values": logits, "labels": labels}]
    assert evaluate_accuracy(KnownLogits(), batches, subset)["accuracy"] == 1.0
    assert evaluate_accuracy(KnownLogits(), batches)["accuracy"] == 0.0


def test_plots_are_valid_pngs(tmp_path):
    plot_occlusion({"a": {0.0: 0.9, 0.5: 0.6}, "b": {0.0: 0.8, 0.5: 0.7}}, tmp_path / "occlusion.png")
    plot_cka(
        {"student vs teacher": np.random.rand(4, 5), "scratch vs teacher": np.random.rand(4, 5)}, tmp_path / "cka.png"
    )
    for name in ("occlusion.png", "cka.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300


def test_analysis_script_on_elpv(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    import run_analysis

    torch.manual_seed(0)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    elpv = {
        "id2label": dict(enumerate(ELPV_CLASS_NAMES)),
        "label2id": {name: index for index, name in enumerate(ELPV_CLASS_NAMES)},
    }
    for name in ("student", "teacher"):
        G2SDForImageClassification(tiny_student_config(num_labels=4, **elpv)).save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    reordered = {"id2label": dict(enumerate(reversed(ELPV_CLASS_NAMES))), "label2id": {}}
    G2SDForImageClassification(tiny_student_config(num_labels=4, **reordered)).save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    with pytest.raises(
        ValueError,
        match=r"other predicts the classes \['1', '2/3', '1/3', '0'\], the data has \['0', '1/3', '2/3', '1'\]",
    ):
        run_analysis.main(
            [
                "--dataset_name",
                "elpv",
                "--models",
                str(tmp_path / "other"),
                "--output_dir",
                str(tmp_path / "refused"),
                "--max_eval_samples",
                "8",
            ]
        )
    results = run_analysis.main(
        [
            "--dataset_name",
            "elpv",
            "--models",
            f"{tmp_path / 'student'},{tmp_path / 'teacher'}",
            "--cka_pairs",
            "student:teacher",
            "--fractions",
            "0,0.5",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_eval_samples",
            "24",
            "--batch_size",
            "8",
        ]
    )
    assert set(results["occlusion"]) == {"student", "teacher"} and results["cka"]["student vs teacher"].shape == (3, 3)
    for name in ("occlusion.png", "occlusion.json", "cka.png", "cka.json", "cka_student__teacher.npy"):
        assert (tmp_path / "out" / name).exists()
    names = ["runs/a/model", "runs/b/model", "teacher"]
    assert run_analysis.display_names(names) == {
        "runs/a/model": "runs_a_model",
        "runs/b/model": "runs_b_model",
        "teacher": "teacher",
    }
    assert run_analysis.cka_pairs("runs_a_model:teacher,runs/b/model:teacher", names) == [
        ("runs/a/model", "teacher"),
        ("runs/b/model", "teacher"),
    ]
    with pytest.raises(ValueError, match="among --models"):
        run_analysis.cka_pairs("model:teacher", names)


def test_robustness_script_on_an_imagenet_r_folder(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES))
    import run_robustness_eval

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1000,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "model")
    wnids = [imagenet_wnids()[index] for index in subset_indices("imagenet-r")[:2]]
    for wnid in wnids:
        (tmp_path / "data" / wnid).mkdir(parents=True)
        for index in range(3):
            Image.fromarray((np.random.rand(40, 40, 3) * 255).astype(np.uint8)).save(
                tmp_path / "data" / wnid / f"{index}.png"
            )
    results = run_robustness_eval.main(
        [
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--datasets",
            str(tmp_path / "data"),
            "--subset",
            "imagenet-r",
            "--output_dir",
            str(tmp_path / "out"),
            "--batch_size",
            "4",
        ]
    )
    row = results[str(tmp_path / "data")]
    assert row["samples"] == 6 and row["restricted_to"] == "imagenet-r" and 0 <= row["accuracy"] <= 1
    assert json.loads((tmp_path / "out" / "robustness.json").read_text()) == results
    assert run_robustness_eval.imagenet_labels(wnids) == subset_indices("imagenet-r")[:2]
    # A Hub data set with plain integer labels (stood in for by an in-memory one: no Hub here) is scored as is.
    png = io.BytesIO()
    Image.fromarray((np.random.rand(40, 40, 3) * 255).astype(np.uint8)).save(png, format="PNG")
    hub_like = datasets.Dataset.from_dict(
        {"image": [{"bytes": png.getvalue(), "path": None}] * 3, "label": [5, 999, 5]},
        features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")}),
    )
    monkeypatch.setattr(run_robustness_eval, "load_split", lambda name, split: hub_like)
    results = run_robustness_eval.main(
        [
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--datasets",
            "someone/imagenet-variant",
            "--output_dir",
            str(tmp_path / "hub"),
            "--batch_size",
            "2",
        ]
    )
    assert (
        results["someone/imagenet-variant"]["samples"] == 3
        and results["someone/imagenet-variant"]["restricted_to"] == "imagenet-1k"
    )
    assert run_robustness_eval.imagenet_labels(["7", "3"]) == [7, 3]
    assert run_robustness_eval.imagenet_labels(["goldfish", "tench"], {0: "tench", 1: "goldfish", 2: "shark"}) == [
        1,
        0,
    ]
    alphabetical = sorted(f"class {index}" for index in range(1000))  # 1000 names, but not the model's: refused
    assert run_robustness_eval.imagenet_labels(alphabetical, imagenet_order=True) == list(
        range(1000)
    )  # unless declared
    for names, message in (
        (["cat", "dog"], "Cannot map"),
        (alphabetical, "Cannot map"),
        (["3", "1000"], "0-999"),
        (["n00000001"], "outside ImageNet-1k"),
    ):
        with pytest.raises(ValueError, match=message):
            run_robustness_eval.imagenet_labels(names)
