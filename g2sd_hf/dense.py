"""Deprecated: the dense half is organized as the classification half now: `dense_models` (heads on a G2SD backbone
and their outputs), `teacher.DenseTeacher`, `dense_trainer` (DenseDistillationTrainer and its arguments),
`dense_data`, `metrics.evaluate_detection`, and the scripts' arguments in `g2sd_hf.scripts.arguments`."""

from ._deprecation import moved_names


_NEW_HOMES = {
    "DENSE_DISTILLATION_DEFAULTS": "g2sd_hf.dense_trainer",
    "DenseDistillationSettings": "g2sd_hf.dense_trainer",
    "DenseDistillationTrainer": "g2sd_hf.dense_trainer",
    "PyramidAdapter": "g2sd_hf.dense_trainer",
    "resolve_dense_distillation": "g2sd_hf.dense_trainer",
    "DenseDistillationConfig": "g2sd_hf.dense_trainer:DenseDistillationArguments",
    "DenseDistillationArguments": "g2sd_hf.dense_trainer",
    "box_score_maps": "g2sd_hf.dense_models",
    "detections_from_outputs": "g2sd_hf.dense_models",
    "detector_queries": "g2sd_hf.dense_models",
    "find_backbone": "g2sd_hf.dense_models",
    "head_task": "g2sd_hf.dense_models",
    "load_backbone_weights": "g2sd_hf.dense_models",
    "object_detection_model": "g2sd_hf.dense_models",
    "output_kind": "g2sd_hf.dense_models",
    "query_class_probabilities": "g2sd_hf.dense_models",
    "semantic_segmentation_model": "g2sd_hf.dense_models",
    "universal_pixel_probabilities": "g2sd_hf.dense_models",
    "universal_segmentation_model": "g2sd_hf.dense_models",
    "DenseTeacher": "g2sd_hf.teacher",
    "evaluate_detection": "g2sd_hf.metrics",
    "DenseModelArguments": "g2sd_hf.scripts.arguments",
    "dense_backbone_config": "g2sd_hf.scripts.arguments",
}
__all__ = sorted(_NEW_HOMES)
__getattr__ = moved_names(__name__, _NEW_HOMES)
