"""Hub-ready checkpoints: complete folders, loading in fresh processes (with g2sd_hf, with remote code only, exported
to stock transformers), feature extraction, model cards, and the push up to the upload (the Hub itself is mocked)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from PIL import Image
from transformers import ViTImageProcessor

from g2sd_hf import (
    G2SDForGenericDistillation,
    G2SDForImageClassification,
    G2SDModel,
    SpecificDistillationArguments,
    SpecificDistillationTrainer,
    export_to_transformers,
)
from g2sd_hf.export import main as export_main
from g2sd_hf.hub import build_model_card
from g2sd_hf.metrics import ClassificationMetrics
from g2sd_hf.scripts.run import finish_training_run

from .conftest import assert_card_lists_every_metric, tiny_classifier_teacher, tiny_image_dataset, tiny_student_config


LABELS = ["0", "1/3", "2/3", "1"]
PROCESSOR = dict(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=3)


def run_isolated(code: str, tmp_path: Path, block_g2sd: bool) -> dict:
    """Run `code` in a fresh Python process, optionally unable to import g2sd_hf; it prints a JSON result."""
    prelude = (
        "import sys\nsys.modules['g2sd_hf'] = None  # this process cannot import the package\n" if block_g2sd else ""
    )
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    """A specific-distillation run's output folder, as the trainer writes it (train, evaluate, save, card)."""
    output = tmp_path_factory.mktemp("classifier")
    config = tiny_student_config(
        num_labels=4,
        use_distillation_token=True,
        id2label=dict(enumerate(LABELS)),
        label2id={label: index for index, label in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    trainer = SpecificDistillationTrainer(
        model=G2SDForImageClassification(config),
        teacher=tiny_classifier_teacher(),
        args=SpecificDistillationArguments(
            str(output),
            max_steps=2,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            mixup_alpha=0,
            cutmix_alpha=0,
        ),
        train_dataset=tiny_image_dataset(8, num_labels=4),
        eval_dataset=tiny_image_dataset(8, num_labels=4, seed=1),
        processing_class=ViTImageProcessor(**PROCESSOR),
        compute_metrics=ClassificationMetrics(LABELS, [2, 3]),
    )
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    trainer.save_state()
    finish_training_run(trainer, teacher_name_or_path="facebook/vit-base-patch16-224", dataset_name="elpv")
    return output


def reference_logits(folder, images):
    model = G2SDForImageClassification.from_pretrained(folder).eval()
    processor = ViTImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt")).logits


def save_images(tmp_path):
    images = [Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()) for _ in range(2)]
    paths = []
    for index, image in enumerate(images):
        image.save(tmp_path / f"image{index}.png")
        paths.append(str(tmp_path / f"image{index}.png"))
    return images, paths


def test_checkpoint_folder_is_a_complete_hub_repository(classifier_checkpoint):
    files = {path.name for path in classifier_checkpoint.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "modeling_g2sd.py",
        "configuration_g2sd.py",
        "losses.py",
    } <= files
    config = json.loads((classifier_checkpoint / "config.json").read_text())
    assert config["id2label"] == {str(index): label for index, label in enumerate(LABELS)}
    assert config["label2id"] == {label: index for index, label in enumerate(LABELS)}
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_g2sd.G2SDForImageClassification"
    processor = json.loads((classifier_checkpoint / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == PROCESSOR["image_mean"] and processor["size"] == {"height": 32, "width": 32}


def test_pipeline_and_auto_class_with_the_package(classifier_checkpoint, tmp_path):
    images, paths = save_images(tmp_path)
    result = run_isolated(
        f"""
        import json, torch, g2sd_hf
        from transformers import AutoModelForImageClassification, AutoImageProcessor, pipeline
        folder = {str(classifier_checkpoint)!r}
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        from PIL import Image
        images = [Image.open(path).convert("RGB") for path in {paths!r}]
        with torch.no_grad():
            logits = model(**processor(images, return_tensors="pt")).logits
        predictions = pipeline("image-classification", model=folder)({paths!r})
        print(json.dumps({{"class": type(model).__module__, "logits": logits.tolist(), "top": predictions[0][0]["label"]}}))
    """,
        tmp_path,
        block_g2sd=False,
    )
    assert result["class"] == "g2sd_hf.modeling_g2sd"
    expected = reference_logits(classifier_checkpoint, images)
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert result["top"] == LABELS[expected[0].argmax()]


def test_remote_code_without_the_package(classifier_checkpoint, tmp_path):
    images, paths = save_images(tmp_path)
    result = run_isolated(
        f"""
        import json, torch
        try:
            import g2sd_hf
            raise SystemExit("g2sd_hf is importable")
        except ImportError:
            pass
        from transformers import AutoModelForImageClassification, AutoImageProcessor, pipeline
        folder = {str(classifier_checkpoint)!r}
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        from PIL import Image
        images = [Image.open(path).convert("RGB") for path in {paths!r}]
        with torch.no_grad():
            logits = model(**processor(images, return_tensors="pt")).logits
        top = pipeline("image-classification", model=folder, trust_remote_code=True)({paths[0]!r})[0]["label"]
        print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist(), "top": top}}))
    """,
        tmp_path,
        block_g2sd=True,
    )
    assert result["module"].startswith("transformers_modules.")  # the code saved in the folder
    expected = reference_logits(classifier_checkpoint, images)
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert result["top"] == LABELS[expected[0].argmax()]


@pytest.mark.parametrize("distillation_token", [True, False])
def test_export_to_stock_transformers(classifier_checkpoint, tmp_path, distillation_token):
    source = classifier_checkpoint
    if not distillation_token:
        source = tmp_path / "plain"
        plain = G2SDForImageClassification(
            tiny_student_config(
                num_labels=4, id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)}
            )
        )
        plain.save_pretrained(source)
        ViTImageProcessor(**PROCESSOR).save_pretrained(source)
    exported = export_to_transformers(str(source), str(tmp_path / "exported"))
    assert not (exported / "modeling_g2sd.py").exists()
    images, paths = save_images(tmp_path)
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModelForImageClassification, AutoImageProcessor, pipeline
        folder = {str(exported)!r}
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        from PIL import Image
        images = [Image.open(path).convert("RGB") for path in {paths!r}]
        with torch.no_grad():
            logits = model(**processor(images, return_tensors="pt")).logits
        top = pipeline("image-classification", model=folder)({paths[0]!r})[0]["label"]
        print(json.dumps({{"class": type(model).__name__, "module": type(model).__module__, "logits": logits.tolist(), "top": top}}))
    """,
        tmp_path,
        block_g2sd=True,
    )
    expected_class = "DeiTForImageClassificationWithTeacher" if distillation_token else "ViTForImageClassification"
    assert result["class"] == expected_class and result["module"].startswith("transformers.models.")
    expected = reference_logits(source, images)
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    card = ModelCard.load(exported / "README.md")
    assert "exported" in card.data.tags and "trust_remote_code" not in card.text


def test_export_refuses_mean_pooling(tmp_path):
    model = G2SDForImageClassification(tiny_student_config(num_labels=3, use_mean_pooling=True))
    with pytest.raises(ValueError, match="no stock transformers equivalent"):
        export_to_transformers(model, str(tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()


def test_export_never_removes_files_it_did_not_write(classifier_checkpoint, tmp_path, monkeypatch):
    """Exporting into a folder of the user's is refused and leaves it as it was; a previous export is replaced;
    --overwrite writes the export's files and keeps the user's."""
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\).*--overwrite"):
        export_to_transformers(str(classifier_checkpoint), str(target))
    assert sorted(path.name for path in target.iterdir()) == ["notes.txt"]
    assert not list(tmp_path.glob(".*staging-*"))

    # The command line in the current folder (`--output .`): refused, exit status non-zero, the folder untouched.
    monkeypatch.chdir(target)
    with pytest.raises(FileExistsError):
        export_main(["--model", str(classifier_checkpoint), "--output", "."])
    assert (target / "notes.txt").read_text() == "my notes" and len(list(target.iterdir())) == 1

    export_main(["--model", str(classifier_checkpoint), "--output", ".", "--overwrite"])
    assert (target / "notes.txt").read_text() == "my notes" and (target / "model.safetensors").exists()

    # A previous export (only files the package wrote) is replaced, stale files of the package included.
    exported = tmp_path / "exported"
    export_to_transformers(str(classifier_checkpoint), str(exported))
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o777 & ~umask  # not the staging folder's private 0700
    (exported / "README.md").unlink()
    export_to_transformers(str(classifier_checkpoint), str(exported))
    assert (exported / "README.md").exists() and (exported / "model.safetensors").exists()
    # ... unless the user added a file to it since.
    (exported / "evaluation.csv").write_text("mine")
    with pytest.raises(FileExistsError, match="evaluation.csv"):
        export_to_transformers(str(classifier_checkpoint), str(exported))
    assert (exported / "evaluation.csv").read_text() == "mine"


def test_generic_checkpoint_loads_and_extracts_features(tmp_path):
    generic = G2SDForGenericDistillation(tiny_student_config()).eval()
    generic.save_pretrained(tmp_path / "generic")
    ViTImageProcessor(**PROCESSOR).save_pretrained(tmp_path / "generic")
    images, paths = save_images(tmp_path)
    encoder = G2SDModel.from_pretrained(tmp_path / "generic").eval()
    with torch.no_grad():
        expected = encoder(**ViTImageProcessor(**PROCESSOR)(images[:1], return_tensors="pt")).last_hidden_state[0]
    for block in (False, True):
        result = run_isolated(
            f"""
            import json
            {"import g2sd_hf" if not block else ""}
            from transformers import pipeline
            extractor = pipeline("image-feature-extraction", model={str(tmp_path / "generic")!r}, trust_remote_code=True)
            print(json.dumps({{"features": extractor({paths[0]!r})[0]}}))
        """,
            tmp_path,
            block_g2sd=block,
        )
        torch.testing.assert_close(torch.tensor(result["features"]), expected, atol=1e-5, rtol=1e-5)


def test_model_card_metadata_and_sections(classifier_checkpoint):
    card = ModelCard.load(classifier_checkpoint / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert {"g2sd", "knowledge-distillation"} <= set(data.tags) and data.license == "apache-2.0"
    assert data.base_model == "facebook/vit-base-patch16-224" and data.datasets == ["elpv"]
    metrics = json.loads((classifier_checkpoint / "trainer_state.json").read_text())["log_history"][-1]
    results = assert_card_lists_every_metric(classifier_checkpoint, metrics, "image-classification", "elpv")
    named = {result.metric_name: (result.metric_type, result.metric_value) for result in results}
    assert named["top-1 accuracy"] == ("accuracy", round(metrics["eval_accuracy"], 6))
    assert named["accuracy of class 1/3 (its recall)"] == ("recall", round(metrics["eval_accuracy_1_3"], 6))
    assert named["balanced accuracy (mean of the per-class accuracies)"][0] == "accuracy"
    assert "binary accuracy (positive classes grouped against the rest)" in named
    assert "| training images | 8 |" in card.text and "| validation images | 8 |" in card.text
    assert "| hardware | 1 x CPU (" in card.text
    for section in (
        "## How to use",
        "## Model",
        "## Training",
        "## Results",
        "## Intended use and limitations",
        "## Citation",
    ):
        assert section in card.text, section
    assert "2302.14771" in card.text and 'pipeline("image-classification"' in card.text
    assert "specific distillation" in card.text and "layer-wise lr decay" in card.text


def test_push_to_hub_prepares_everything_up_to_the_upload(tmp_path, monkeypatch):
    """The Hub's servers cannot be reached here: `create_repo` and `upload_folder` are mocked, all else is real."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        calls["upload"] = {
            "repo_id": repo_id,
            "files": sorted(path.name for path in Path(folder_path).iterdir()),
            "card": (Path(folder_path) / "README.md").read_text(),
            "commit_message": commit_message,
            "ignore_patterns": kwargs.get("ignore_patterns"),
        }
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    trainer = SpecificDistillationTrainer(
        model=G2SDForImageClassification(tiny_student_config(num_labels=4, use_distillation_token=True)),
        teacher=tiny_classifier_teacher(),
        args=SpecificDistillationArguments(
            str(tmp_path / "out"),
            max_steps=1,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            push_to_hub=True,
            hub_model_id="g2sd-org/g2sd-tiny-elpv",
            mixup_alpha=0,
            cutmix_alpha=0,
        ),
        train_dataset=tiny_image_dataset(8, num_labels=4),
        processing_class=ViTImageProcessor(**PROCESSOR),
    )
    trainer.train()
    finish_training_run(trainer, teacher_name_or_path=None, dataset_name="elpv")
    assert calls["create_repo"] == "g2sd-org/g2sd-tiny-elpv"
    upload = calls["upload"]
    assert upload["repo_id"] == "g2sd-org/g2sd-tiny-elpv"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_g2sd.py"} <= set(
        upload["files"]
    )
    assert 'model="g2sd-org/g2sd-tiny-elpv"' in upload["card"] and "knowledge-distillation" in upload["card"]
    assert "checkpoint-*" in upload["ignore_patterns"] and "_*" in upload["ignore_patterns"]  # _earlier_run_<k>/


def test_card_for_a_generic_checkpoint_names_its_teacher():
    model = G2SDForGenericDistillation(tiny_student_config())
    card = build_model_card(
        model,
        "generic-distillation",
        dataset="imagenet-1k",
        teacher="facebook/vit-mae-base",
        metrics={"eval_loss": 0.31, "eval_runtime": 2.0},
        repo_id="org/g2sd-gd",
    )
    assert card.data.base_model == "facebook/vit-mae-base" and card.data.pipeline_tag == "image-feature-extraction"
    assert [(result.metric_type, result.metric_name) for result in card.data.eval_results] == [("loss", "loss")]
    assert "image-feature-extraction" in card.text and "not a classifier" in card.text
    assert "[facebook/vit-mae-base](https://huggingface.co/facebook/vit-mae-base)" in card.text
    local = build_model_card(model, "generic-distillation", dataset="elpv", teacher=str(Path(__file__).parent) + "/")
    assert "a local checkpoint, `tests`" in local.text and str(Path(__file__).parent) not in local.text
    assert local.data.base_model is None
    with pytest.raises(ValueError, match="stage must be one of"):
        build_model_card(model, "pre-training", dataset="x")


@pytest.mark.parametrize("module", ["g2sd_hf.export", "g2sd_hf.convert"])
def test_command_line_modules_run_without_a_runpy_warning(module):
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "RuntimeWarning" not in result.stderr and "usage" in result.stdout
