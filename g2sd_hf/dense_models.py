"""The dense models: transformers' detection and segmentation heads on a G2SD backbone, and how to read them.

Builders put a `G2SDBackbone` under UperNet (semantic segmentation), Deformable DETR / RT-DETR (object detection) or
Mask2Former (universal segmentation); readers turn each head's outputs into what distillation and evaluation need
(per-location class scores, boxes) and capture the backbone's feature maps and the decode head's logits with hooks.
"""

import copy

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    PreTrainedModel,
    RTDetrConfig,
    RTDetrForObjectDetection,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from .configuration_g2sd import G2SDBackboneConfig
from .dense_data import image_size_of
from .metrics import load_metric
from .modeling_g2sd import BackboneMixin, G2SDBackbone


def find_backbone(model: nn.Module) -> nn.Module:
    """The backbone module (a transformers `BackboneMixin`) inside a detection or segmentation model."""
    for module in model.modules():
        if isinstance(module, BackboneMixin):
            return module
    raise ValueError(
        f"{type(model).__name__} has no transformers backbone (BackboneMixin): dense distillation reads the backbone's "
        "feature pyramid. Build the head with backbone_config=G2SDBackboneConfig(...)."
    )


class _FeatureCapture:
    """Keeps the feature maps of the last forward of a backbone."""

    def __init__(self, backbone: nn.Module):
        self.maps = None
        backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.maps = list(output.feature_maps if hasattr(output, "feature_maps") else output[0])

    def pop(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, None
        if maps is None:
            raise RuntimeError("The backbone did not run in the last forward.")
        return maps


class _HeadCapture:
    """Keeps the output of the last forward of a semantic-segmentation decode head (UperNet's `decode_head`: the
    logits at its own resolution, before they are upsampled to the image; the release's `decode_head.conv_seg`)."""

    def __init__(self, model: nn.Module):
        self.logits = None
        head = getattr(model, "decode_head", None)
        self.available = head is not None
        if head is not None:
            head.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.logits = output

    def pop(self) -> torch.Tensor:
        logits, self.logits = self.logits, None
        if logits is None:
            raise RuntimeError("The decode head did not run in the last forward.")
        return logits


def load_backbone_weights(model: PreTrainedModel, name_or_path: str) -> None:
    """Copy a G2SD checkpoint's encoder into `model`'s G2SD backbone (the pyramid keeps its initialization)."""
    backbone = find_backbone(model)
    source = G2SDBackbone.from_pretrained(
        name_or_path, **{key: getattr(backbone.config, key) for key in ("fpn_hidden_size", "window_size")}
    )
    backbone.g2sd.load_state_dict(source.g2sd.state_dict(), strict=True)


def semantic_segmentation_model(
    backbone_config: G2SDBackboneConfig, num_labels: int, hidden_size: int | None = None, **kwargs
) -> UperNetForSemanticSegmentation:
    """UperNet on a G2SD backbone (all four pyramid levels)."""
    extra = {"hidden_size": hidden_size} if hidden_size else {}
    return UperNetForSemanticSegmentation(
        UperNetConfig(backbone_config=backbone_config, num_labels=num_labels, **extra, **kwargs)
    )


def object_detection_model(
    backbone_config: G2SDBackboneConfig,
    num_labels: int,
    detector: str = "deformable-detr",
    hidden_size: int | None = None,
    **kwargs,
) -> PreTrainedModel:
    """A DETR-family detector on a G2SD backbone (pyramid strides 8, 16 and 32): `"deformable-detr"` (which adds a
    stride-64 level) or `"rt-detr"`."""
    if detector == "deformable-detr":
        # Strides 8-32 from the backbone and a stride-64 level Deformable DETR adds itself, as standard: stride 4 would
        # give its encoder ~87k tokens at 1024 px.
        backbone_config = copy.deepcopy(backbone_config)  # the caller's config stays as it was
        backbone_config.out_features = ["stage2", "stage3", "stage4"]
        config = DeformableDetrConfig(
            backbone_config=backbone_config,
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            num_labels=num_labels,
            num_feature_levels=4,
            **({"d_model": hidden_size} if hidden_size else {}),
            **kwargs,
        )
        return DeformableDetrForObjectDetection(config)
    if detector == "rt-detr":
        backbone_config = copy.deepcopy(backbone_config)  # the caller's config stays as it was
        backbone_config.out_features = ["stage2", "stage3", "stage4"]
        config = RTDetrConfig(
            backbone_config=backbone_config,
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            num_labels=num_labels,
            encoder_in_channels=[backbone_config.fpn_hidden_size] * 3,
            feat_strides=[8, 16, 32],
            **(
                {"d_model": hidden_size, "encoder_hidden_dim": hidden_size, "decoder_in_channels": [hidden_size] * 3}
                if hidden_size
                else {}
            ),
            **kwargs,
        )
        return RTDetrForObjectDetection(config)
    raise ValueError(f"detector must be 'deformable-detr' or 'rt-detr', got {detector!r}.")


def universal_segmentation_model(
    backbone_config: G2SDBackboneConfig, num_labels: int, hidden_size: int = 256, **kwargs
) -> Mask2FormerForUniversalSegmentation:
    """Mask2Former (instance / panoptic / semantic masks) on a G2SD backbone."""
    config = Mask2FormerConfig(
        backbone_config=backbone_config,
        num_labels=num_labels,
        hidden_dim=hidden_size,
        mask_feature_size=hidden_size,
        feature_size=hidden_size,
        use_timm_backbone=False,
        **kwargs,
    )
    return Mask2FormerForUniversalSegmentation(config)


def output_kind(outputs) -> str:
    """`"detection"` (DETR family), `"universal"` (Mask2Former) or `"semantic"` (per-pixel logits, e.g. UperNet)."""
    if getattr(outputs, "pred_boxes", None) is not None:
        return "detection"
    if getattr(outputs, "masks_queries_logits", None) is not None:
        return "universal"
    logits = getattr(outputs, "logits", None)
    if logits is not None and logits.ndim == 4:
        return "semantic"
    raise ValueError(
        f"Unsupported outputs {type(outputs).__name__}: expected per-pixel logits, Mask2Former or DETR outputs."
    )


def detector_queries(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits, pred_boxes)` of a DETR-family output without RT-DETR's training-time denoising queries."""
    logits, boxes = outputs.logits, outputs.pred_boxes
    meta = getattr(outputs, "denoising_meta_values", None)
    if meta is not None and logits.shape[1] == sum(meta["dn_num_split"]):
        logits, boxes = logits[:, meta["dn_num_split"][0] :], boxes[:, meta["dn_num_split"][0] :]
    return logits, boxes


def query_class_probabilities(logits: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Class probabilities of detector queries: sigmoid (Deformable DETR, RT-DETR) or softmax without the
    "no object" class (DETR), from the number of logits."""
    if logits.shape[-1] == num_labels + 1:
        return logits.float().softmax(dim=-1)[..., :-1]
    return logits.float().sigmoid()


def box_score_maps(
    probabilities: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], top_queries: int
) -> torch.Tensor:
    """Project query class scores onto a grid: at each location and class, the best score among the `top_queries`
    queries whose box covers the location.

    Args:
        probabilities (`torch.Tensor` of shape `(batch, queries, classes)`): Class scores.
        boxes (`torch.Tensor` of shape `(batch, queries, 4)`): Normalized `(center_x, center_y, width, height)`.
        size (`tuple[int, int]`): `(height, width)` of the grid.
        top_queries (`int`): Queries kept, by their best class score.

    Returns:
        `torch.Tensor` of shape `(batch, classes, height, width)`.
    """
    keep = min(top_queries, probabilities.shape[1])
    best = probabilities.max(dim=-1).values.topk(keep, dim=1).indices  # (batch, keep)
    probabilities = probabilities.gather(1, best[..., None].expand(-1, -1, probabilities.shape[-1]))
    boxes = boxes.detach().float().gather(1, best[..., None].expand(-1, -1, 4))
    height, width = size
    ys = (torch.arange(height, device=boxes.device) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device) + 0.5) / width
    center_x, center_y, box_width, box_height = boxes.unbind(-1)  # (batch, keep)
    inside_x = (xs[None, None] >= (center_x - box_width / 2)[..., None]) & (
        xs[None, None] <= (center_x + box_width / 2)[..., None]
    )
    inside_y = (ys[None, None] >= (center_y - box_height / 2)[..., None]) & (
        ys[None, None] <= (center_y + box_height / 2)[..., None]
    )
    covers = (inside_y[..., :, None] & inside_x[..., None, :]).to(probabilities.dtype)  # (batch, keep, height, width)
    scores = probabilities.new_zeros(probabilities.shape[0], probabilities.shape[-1], height, width)
    for start in range(0, keep, 16):  # a running maximum over query chunks bounds the memory
        chunk = probabilities[:, start : start + 16, :, None, None] * covers[:, start : start + 16, None]
        scores = torch.maximum(scores, chunk.max(dim=1).values)
    return scores


def universal_pixel_probabilities(outputs, size: tuple[int, int]) -> torch.Tensor:
    """Mask2Former's per-pixel class distribution `(batch, classes, height, width)` from its queries."""
    classes = outputs.class_queries_logits.float().softmax(dim=-1)[..., :-1]  # (batch, queries, classes)
    masks = F.interpolate(
        outputs.masks_queries_logits.float(), size=size, mode="bilinear", align_corners=False
    ).sigmoid()
    semantic = torch.einsum("bqc,bqhw->bchw", classes, masks)
    return semantic / semantic.sum(dim=1, keepdim=True).clamp(min=1e-6)


def head_task(model: nn.Module) -> str:
    """`"detection"` (DETR family), `"universal"` (Mask2Former) or `"segmentation"` (per-pixel logits: UperNet)."""
    name = type(model).__name__
    if "ObjectDetection" in name:
        return "detection"
    if "Universal" in name or "Mask2Former" in name:
        return "universal"
    return "segmentation"


def detections_from_outputs(
    outputs, image_sizes: list[tuple[int, int]], num_labels: int, top_k: int = 100
) -> list[dict]:
    """Boxes of a DETR-family output for COCO evaluation: the `top_k` (query, class) pairs by score, per image.

    Returns:
        `list[dict]`: per image, `boxes` (`[x, y, width, height]` in pixels), `labels` and `scores` (numpy arrays).
    """
    logits, pred_boxes = detector_queries(outputs)
    probabilities = query_class_probabilities(logits, num_labels)  # (batch, queries, classes)
    batch_size, num_queries, num_classes = probabilities.shape
    scores, flat = probabilities.reshape(batch_size, -1).topk(min(top_k, num_queries * num_classes), dim=1)
    queries, labels = flat // num_classes, flat % num_classes
    boxes = pred_boxes.float().gather(1, queries[..., None].expand(-1, -1, 4))
    results = []
    for index, (height, width) in enumerate(image_sizes):
        center_x, center_y, box_width, box_height = boxes[index].unbind(-1)
        xywh = torch.stack(
            [
                (center_x - box_width / 2) * width,
                (center_y - box_height / 2) * height,
                box_width * width,
                box_height * height,
            ],
            dim=-1,
        )
        results.append(
            {"boxes": xywh.cpu().numpy(), "labels": labels[index].cpu().numpy(), "scores": scores[index].cpu().numpy()}
        )
    return results


@torch.no_grad()
def evaluate_detection(
    model, dataset, raw_dataset, num_labels: int, collate_fn, batch_size: int = 16, top_k: int = 100
) -> dict:
    """COCO box AP of a DETR-family `model` on `dataset` (transformed) against the boxes of `raw_dataset` (one
    process: run it on the main one)."""
    model.eval()
    device = next(model.parameters()).device
    predictions, truth = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    sizes = [image_size_of(image) for image in raw_dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    for start, batch in zip(range(0, len(sizes), batch_size), loader):
        outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
        predictions += detections_from_outputs(outputs, sizes[start : start + batch_size], num_labels, top_k)
    for size, objects in zip(sizes, raw_dataset["objects"]):
        boxes = np.asarray(objects["bbox"], dtype=np.float64).reshape(-1, 4)
        # COCO's defaults where the data set has no such field: the box area, not a crowd.
        area = objects["area"] if "area" in objects else (boxes[:, 2] * boxes[:, 3]).tolist()
        iscrowd = objects["iscrowd"] if "iscrowd" in objects else [0] * len(boxes)
        truth.append(
            {
                "boxes": boxes.tolist(),
                "labels": objects["category"],
                "size": list(size),
                "area": area,
                "iscrowd": iscrowd,
            }
        )
    predictions = [
        {key: np.asarray(value).tolist() for key, value in prediction.items()} for prediction in predictions
    ]
    return load_metric("coco_detection").compute(predictions=predictions, references=truth, num_labels=num_labels)


__all__ = [
    "box_score_maps",
    "detections_from_outputs",
    "detector_queries",
    "evaluate_detection",
    "find_backbone",
    "head_task",
    "load_backbone_weights",
    "object_detection_model",
    "output_kind",
    "query_class_probabilities",
    "semantic_segmentation_model",
    "universal_pixel_probabilities",
    "universal_segmentation_model",
]
