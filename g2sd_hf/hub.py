"""Hub-ready checkpoints: the model card of a G2SD student, and the last steps of a training run.

Cards are built with `huggingface_hub`'s `ModelCard`/`ModelCardData` (YAML metadata with a `model-index`) and a Jinja
template, never by string concatenation.
"""

import logging
import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .metrics import metric_name


logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2302.14771"
CITATION = """@inproceedings{huang2023generic,
  title     = {Generic-to-Specific Distillation of Masked Autoencoders},
  author    = {Huang, Wei and Peng, Zhiliang and Dong, Li and Wei, Furu and Jiao, Jianbin and Ye, Qixiang},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {15996--16005},
  year      = {2023}
}"""

STAGES = {
    "generic-distillation": {
        "title": "generic distillation",
        "pipeline_tag": "image-feature-extraction",
        "task_type": "image-feature-extraction",
        "summary": (
            "the task-agnostic first stage of G2SD: with a light MAE-style decoder, the student saw masked images and "
            "learned to predict the teacher's LayerNorm-ed MAE decoder features for visible and masked patches "
            "(Smooth-L1). Fine-tune it on a task (ideally with specific distillation) before using it as a classifier."
        ),
    },
    "specific-distillation": {
        "title": "specific distillation",
        "pipeline_tag": "image-classification",
        "task_type": "image-classification",
        "summary": (
            "the task-specific second stage of G2SD: the student was fine-tuned on the task with the task loss plus a "
            "knowledge-distillation loss from a task-fine-tuned teacher, L_SD = L_task + beta * L_KD."
        ),
    },
    "fine-tuning": {
        "title": "supervised fine-tuning",
        "pipeline_tag": "image-classification",
        "task_type": "image-classification",
        "summary": "supervised fine-tuning of a G2SD-architecture student, without a distillation teacher.",
    },
    "segmentation-distillation": {
        "title": "specific distillation for semantic segmentation",
        "pipeline_tag": "image-segmentation",
        "task_type": "semantic-segmentation",
        "summary": (
            "a segmentation head on a G2SD backbone, trained with the task loss plus distillation of the pyramid "
            "features and of the per-pixel class distribution of a teacher (the same head on a larger backbone)."
        ),
    },
    "segmentation-fine-tuning": {
        "title": "fine-tuning for semantic segmentation",
        "pipeline_tag": "image-segmentation",
        "task_type": "semantic-segmentation",
        "summary": "a segmentation head on a G2SD backbone, trained on the task without a teacher.",
    },
    "detection-distillation": {
        "title": "specific distillation for object detection",
        "pipeline_tag": "object-detection",
        "task_type": "object-detection",
        "summary": (
            "a DETR-family detector on a G2SD backbone, trained with the task loss plus distillation of the pyramid "
            "features and of the (box-projected) class scores of a teacher (the same detector on a larger backbone)."
        ),
    },
    "detection-fine-tuning": {
        "title": "fine-tuning for object detection",
        "pipeline_tag": "object-detection",
        "task_type": "object-detection",
        "summary": "a DETR-family detector on a G2SD backbone, trained on the task without a teacher.",
    },
}

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A **G2SD student** ({{ architecture }}, {{ parameters }} parameters) from {{ stage_title }} of
*Generic-to-Specific Distillation of Masked Autoencoders* (Huang et al., CVPR 2023, [arXiv 2302.14771]({{ paper_url }})).
{% if teacher_link %}The teacher is [{{ teacher }}]({{ teacher_link }}).{% elif teacher %}The teacher is a local checkpoint, `{{ teacher }}`.{% endif %}

This checkpoint is {{ summary }}
{% if warnings %}
## Warning: this run may have learned nothing, or built on a stage too weak to build on

The training checks of `g2sd_hf` found:

{% for warning in warnings %}- {{ warning }}
{% endfor %}
Do not use this checkpoint before finding out why.
{% endif %}
## How to use

```python
{{ usage }}
```

{{ loading_note }}

## Model

| | |
|---|---|
{% for name, value in details %}| {{ name }} | {{ value }} |
{% endfor %}
## Training

Trained with `g2sd_hf`'s `{{ trainer_class }}` on **{{ dataset }}**.

| Hyperparameter | Value |
|---|---|
{% for name, value in hyperparameters %}| {{ name }} | {{ value }} |
{% endfor %}
## Results

{% if results %}| Metric ({{ dataset }}, validation) | Key | Value |
|---|---|---|
{% for name, key, value in results %}| {{ name }} | `{{ key }}` | {{ value }} |
{% endfor %}{% else %}No evaluation was run.{% endif %}

## Intended use and limitations

{{ limitations }}

## Citation

```bibtex
{{ citation }}
```
"""


def _is_quality_metric(name: str) -> bool:
    return name == "loss" or "accuracy" in name or name.startswith(("mean_iou", "iou_", "map", "mask_map"))


_COCO_AP_NAMES = {
    "map": "mAP (IoU 0.50:0.95)",
    "map_50": "mAP (IoU 0.50)",
    "map_75": "mAP (IoU 0.75)",
    "map_small": "mAP, small objects",
    "map_medium": "mAP, medium objects",
    "map_large": "mAP, large objects",
}


def describe_metric(name: str, class_names: dict[str, str] | None = None) -> tuple[str, str]:
    """The Hub metric type (`accuracy`, `recall`, `mean_iou`, `iou`, `map`, `loss`) and a readable name of an
    evaluation metric key (`eval_` removed), e.g. `accuracy_1_3` -> `("recall", "accuracy of class 1/3 (its recall)")`.

    Args:
        name (`str`): The metric key, e.g. `"balanced_accuracy"`, `"iou_circle"`, `"mask_map_50"`.
        class_names (`dict[str, str]`, *optional*): Metric-key form of each class name -> the class name.
    """
    class_names = class_names or {}
    if name.startswith(("map", "mask_map")):
        kind = "mask" if name.startswith("mask_") else "box"
        return "map", f"{kind} {_COCO_AP_NAMES.get(name.removeprefix('mask_'), name)}"
    if name == "mean_iou":
        return "mean_iou", "mean IoU"
    if name.startswith("iou_"):
        key = name.removeprefix("iou_")
        return "iou", f"IoU of class {class_names.get(key, key)}"
    fixed = {
        "accuracy": "top-1 accuracy",
        "balanced_accuracy": "balanced accuracy (mean of the per-class accuracies)",
        "binary_accuracy": "binary accuracy (positive classes grouped against the rest)",
        "pixel_accuracy": "pixel accuracy",
    }
    if name in fixed:
        return "accuracy", fixed[name]
    if name.startswith("accuracy_"):
        key = name.removeprefix("accuracy_")
        return "recall", f"accuracy of class {class_names.get(key, key)} (its recall)"
    return "loss", "loss" if name == "loss" else name


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_model_card(
    model,
    stage: str,
    dataset: str,
    teacher: str | None = None,
    metrics: dict | None = None,
    hyperparameters: dict | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    trainer_class: str = "Trainer",
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    stock: bool = False,
    warnings: list[str] | None = None,
) -> ModelCard:
    """The model card of a G2SD student checkpoint.

    Args:
        model: The student (`G2SDForImageClassification`, `G2SDForGenericDistillation`, or an exported stock model).
        stage (`str`): `"generic-distillation"`, `"specific-distillation"` or `"fine-tuning"`.
        dataset (`str`): The training data set's name.
        teacher (`str`, *optional*): The teacher's Hub id or path (the card's `base_model` when a Hub id).
        metrics (`dict`, *optional*): Evaluation metrics, e.g. `{"eval_accuracy": 0.9}`.
        hyperparameters (`dict`, *optional*): Training hyperparameters to list.
        repo_id (`str`, *optional*): Where the checkpoint will live (used in the loading example).
        model_name (`str`, *optional*): The card's title.
        trainer_class (`str`): The trainer's class name.
        license (`str`): The license identifier.
        tags (`list[str]`, *optional*): Extra tags.
        stock (`bool`): The checkpoint is a stock transformers class (an export): no remote code needed.
        warnings (`list[str]`, *optional*): What the training checks found (`trainer.learning_warnings`): shown in a
            section at the top of the card.

    Returns:
        `huggingface_hub.ModelCard`.

    Example:

    ```python
    >>> card = build_model_card(student, "specific-distillation", dataset="elpv", teacher="facebook/vit-mae-base")
    >>> card.save("g2sd-vit-small/README.md")
    ```
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}.")
    info = STAGES[stage]
    # A detection / segmentation head keeps the G2SD encoder's configuration in its backbone_config.
    config = getattr(model.config, "backbone_config", None) or model.config
    dense = config is not model.config
    metrics = {
        key: value
        for key, value in (metrics or {}).items()
        if isinstance(value, (int, float)) and _is_quality_metric(key.removeprefix("eval_"))
    }
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"g2sd-{stage}")
    location = repo_id or "path/to/this/checkpoint"

    labels = getattr(model.config, "id2label", None) or {}
    class_keys = {metric_name(label): str(label) for label in labels.values()}
    eval_results = []
    for key, value in metrics.items():
        metric_type, readable = describe_metric(key.removeprefix("eval_"), class_keys)
        eval_results.append(
            EvalResult(
                task_type=info["task_type"],
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split="validation",
                metric_type=metric_type,
                metric_name=readable,
                metric_value=round(float(value), 6),
            )
        )
    teacher_is_hub_id = teacher is not None and not os.path.exists(teacher) and teacher.count("/") == 1
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=info["pipeline_tag"],
        license=license,
        tags=["g2sd", "knowledge-distillation", "vision", "vit", stage, *(tags or [])],
        datasets=[dataset],
        base_model=teacher if teacher_is_hub_id else None,
        metrics=sorted({result.metric_type for result in eval_results}) or None,
        eval_results=eval_results or None,
    )

    remote = "" if stock else ", trust_remote_code=True"
    if dense:
        usage = (
            "import g2sd_hf  # registers the G2SD backbone\n"
            f"from transformers import {type(model).__name__}\n\n"
            f'model = {type(model).__name__}.from_pretrained("{location}")'
        )
    elif info["pipeline_tag"] == "image-classification":
        usage = (
            "from transformers import pipeline\n\n"
            f'classifier = pipeline("image-classification", model="{location}"{remote})\n'
            'predictions = classifier("image.png")'
        )
    else:
        usage = (
            "from transformers import pipeline\n\n"
            f'extractor = pipeline("image-feature-extraction", model="{location}"{remote})\n'
            'features = extractor("image.png")  # one vector per token of the (unmasked) encoder'
        )
    loading_note = (
        f"A stock `{type(model).__name__}` exported from a G2SD student: plain transformers loads it, no remote code."
        if stock
        else f"The head is transformers' `{type(model).__name__}`; its backbone is a G2SD one, so loading needs "
        "`pip install g2sd-hf` and `import g2sd_hf` (transformers cannot fetch a nested backbone's code)."
        if dense
        else "The model code ships with the checkpoint (`trust_remote_code=True`); with `pip install g2sd-hf` and "
        "`import g2sd_hf` it loads without remote code."
    )
    image_size = getattr(config, "image_size", "?")
    details = [
        (
            "Architecture",
            f"ViT, {config.hidden_size}-d, {config.num_hidden_layers} layers, {config.num_attention_heads} heads",
        ),
        ("Patch / image size", f"{config.patch_size} / {image_size}"),
        ("Parameters", f"{model.num_parameters() / 1e6:.2f}M"),
        ("Stage", info["title"]),
    ]
    if getattr(config, "use_distillation_token", False):
        details.append(
            ("Distillation token", "yes: the prediction averages the classification and distillation heads")
        )
    if stage == "generic-distillation":
        details.append(
            (
                "Decoder",
                f"{config.decoder_hidden_size}-d, {config.decoder_num_hidden_layers} blocks, predicting {config.target_hidden_size}-d teacher features",
            )
        )
    if dense:
        details.append(("Head", f"{type(model).__name__}, feature pyramid of {config.fpn_hidden_size} channels"))
    labels = getattr(model.config, "id2label", None)
    named = labels and any(
        str(label) != f"LABEL_{index}" for index, label in labels.items()
    )  # not transformers' placeholders
    if named and info["pipeline_tag"] != "image-feature-extraction":
        details.append(("Classes", ", ".join(str(label) for label in labels.values())))

    limitations = (
        "The student inherits the teacher's and the training data's biases. It was trained and evaluated on "
        f"**{dataset}** only; check it on your own data before relying on it. "
        + (
            "As a generic-distillation checkpoint it is not a classifier: fine-tune it first."
            if stage == "generic-distillation"
            else "Its performance outside the training distribution is unknown."
        )
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        architecture=f"ViT {config.hidden_size}-d x {config.num_hidden_layers}",
        parameters=f"{model.num_parameters() / 1e6:.2f}M",
        stage_title=info["title"],
        paper_url=PAPER_URL,
        # A local teacher is named by its folder: its absolute path means nothing to the card's readers.
        teacher=teacher if teacher is None or teacher_is_hub_id else os.path.basename(os.path.normpath(teacher)),
        teacher_link=f"https://huggingface.co/{teacher}" if teacher_is_hub_id else None,
        summary=info["summary"],
        usage=usage,
        loading_note=loading_note,
        details=details,
        trainer_class=trainer_class,
        dataset=dataset,
        hyperparameters=[(name, _fmt(value)) for name, value in (hyperparameters or {}).items()],
        results=[
            (result.metric_name, key.removeprefix("eval_"), _fmt(result.metric_value))
            for key, result in zip(metrics, eval_results)
        ],
        limitations=limitations,
        citation=CITATION,
        warnings=list(warnings or []),
    )


__all__ = ["CITATION", "build_model_card", "describe_metric"]
