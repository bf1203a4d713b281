"""ONNX export (issue 21): ONNX Runtime's logits against PyTorch's, int8, the pipeline, the CLI, the folder's card."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline

from g2sd_hf import G2SDForImageClassification
from g2sd_hf.data import image_processor

from .conftest import NORMALIZATION, tiny_student_config


onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install g2sd-hf[onnx])")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install g2sd-hf[onnx])")

from g2sd_hf.onnx_export import FP32_TOLERANCE, ORTImageClassifier, export_onnx, inference_session  # noqa: E402


CLASSES = {0: "circle", 1: "cross", 2: "ring"}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A saved distilled student (distillation token: the exported logits are the two heads' average)."""
    folder = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    config = tiny_student_config(
        num_labels=3,
        id2label=CLASSES,
        label2id={name: index for index, name in CLASSES.items()},
        use_distillation_token=True,
    )
    model = G2SDForImageClassification(config).eval()
    for head in (model.classifier, model.distillation_classifier):  # heads that disagree, so the average matters
        torch.nn.init.normal_(head.weight, std=0.5)
    model.save_pretrained(folder)
    image_processor(32, **NORMALIZATION).save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    folder, _ = student
    output = tmp_path_factory.mktemp("onnx") / "student-onnx"
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (24,), generator=generator)
    return output, export_onnx(str(folder), str(output), quantize="int8", check_images=(images, labels))


def test_onnx_logits_equal_pytorch_for_any_batch_size_and_int8_is_reported(student, exported):
    _, model = student
    output, checks = exported
    assert checks["fp32_max_abs_difference"] < FP32_TOLERANCE
    assert checks["files"] == sorted(
        [
            "README.md",
            "config.json",
            "model.onnx",
            "model.onnx.data",
            "model_int8.onnx",
            "onnx_checks.json",
            "preprocessor_config.json",
        ]
    )
    fp32, int8 = inference_session(output / "model.onnx"), inference_session(output / "model_int8.onnx")
    for batch in (1, 5):  # the batch axis is dynamic
        pixel_values = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()  # the two heads' average
        np.testing.assert_allclose(fp32.run(None, {"pixel_values": pixel_values.numpy()})[0], expected, atol=1e-4)
        quantized = int8.run(None, {"pixel_values": pixel_values.numpy()})[0]
        assert quantized.shape == expected.shape and not np.array_equal(quantized, expected)  # int8: close, not equal
        assert np.abs(quantized - expected).max() < 0.1
    # On the labeled images: PyTorch, fp32 and int8 scored, the int8 - fp32 difference stated.
    assert checks["checked_images"] == 24
    assert checks["fp32_balanced_accuracy"] == pytest.approx(checks["pytorch_balanced_accuracy"])
    assert checks["int8_minus_fp32_balanced_accuracy"] == pytest.approx(
        checks["int8_balanced_accuracy"] - checks["fp32_balanced_accuracy"]
    )
    recorded = json.loads((output / "onnx_checks.json").read_text())
    assert recorded["fp32_max_abs_difference"] == checks["fp32_max_abs_difference"]
    card = (output / "README.md").read_text()
    assert "model_int8.onnx" in card and "fp32_max_abs_difference" in card and "torch.onnx.export" in card
    assert f"{checks['int8_balanced_accuracy']:.6g}" in card


def test_the_onnx_model_serves_through_a_transformers_pipeline_like_the_pytorch_one(student, exported, shapes_folder):
    folder, _ = student
    output, _ = exported
    served = pipeline(
        "image-classification",
        model=ORTImageClassifier.from_onnx(output),
        image_processor=AutoImageProcessor.from_pretrained(output),
    )
    reference = pipeline("image-classification", model=str(folder))
    files = sorted(str(path) for path in (shapes_folder / "validation").rglob("*.png"))[:6]
    for ours, theirs in zip(served(files), reference(files)):
        assert [entry["label"] for entry in ours] == [entry["label"] for entry in theirs]
        np.testing.assert_allclose([e["score"] for e in ours], [e["score"] for e in theirs], atol=1e-5)
    int8 = pipeline(
        "image-classification",
        model=ORTImageClassifier.from_onnx(output, file_name="model_int8.onnx"),
        image_processor=AutoImageProcessor.from_pretrained(output),
    )
    assert {entry["label"] for entry in int8(Image.open(files[0]))} == set(CLASSES.values())


def test_the_command_line_writes_onnx_and_never_removes_what_it_did_not_write(student, tmp_path):
    from g2sd_hf.export import main

    folder, _ = student
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="notes.txt|other files|overwrite"):
        main(["--model", str(folder), "--output", str(tmp_path / "taken"), "--format", "onnx"])
    main(["--model", str(folder), "--output", str(tmp_path / "taken"), "--format", "onnx", "--overwrite"])
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and (tmp_path / "taken" / "model.onnx").exists()
    assert not (tmp_path / "taken" / "model_int8.onnx").exists()
    with pytest.raises(SystemExit):
        main(
            ["--model", str(folder), "--output", str(tmp_path / "other"), "--quantize", "int8"]
        )  # needs --format onnx
    with pytest.raises(FileNotFoundError, match="No model_int8.onnx"):
        ORTImageClassifier.from_onnx(tmp_path / "taken", file_name="model_int8.onnx")
