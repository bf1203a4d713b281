"""g2sd-hf: Generic-to-Specific Distillation of masked autoencoders (Huang et al., CVPR 2023) for transformers.

Importing the package registers the G2SD classes with transformers' Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification` and `AutoModelForPreTraining` load G2SD checkpoints.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_g2sd import G2SD_PRESET_ALIASES, G2SD_PRESETS, G2SDConfig
from .losses import (
    generic_distillation_loss,
    hard_distillation_loss,
    nkd_loss,
    normalize_teacher_features,
    soft_distillation_loss,
    soft_target_cross_entropy,
    specific_distillation_loss,
)
from .modeling_g2sd import (
    G2SDForGenericDistillation,
    G2SDForImageClassification,
    G2SDModel,
    G2SDPreTrainedModel,
)
from .teacher import ClassificationTeacher, MAETeacher, initialize_mae_from_scratch
from .trainer import (
    GenericDistillationConfig,
    GenericDistillationTrainer,
    SpecificDistillationConfig,
    SpecificDistillationTrainer,
)


__version__ = "0.1.0"

AutoConfig.register(G2SDConfig.model_type, G2SDConfig, exist_ok=True)
AutoModel.register(G2SDConfig, G2SDModel, exist_ok=True)
AutoModelForImageClassification.register(G2SDConfig, G2SDForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(G2SDConfig, G2SDForGenericDistillation, exist_ok=True)

__all__ = [
    "ClassificationTeacher",
    "G2SDConfig",
    "G2SDForGenericDistillation",
    "G2SDForImageClassification",
    "G2SDModel",
    "G2SDPreTrainedModel",
    "G2SD_PRESETS",
    "G2SD_PRESET_ALIASES",
    "GenericDistillationConfig",
    "GenericDistillationTrainer",
    "MAETeacher",
    "SpecificDistillationConfig",
    "SpecificDistillationTrainer",
    "generic_distillation_loss",
    "hard_distillation_loss",
    "initialize_mae_from_scratch",
    "nkd_loss",
    "normalize_teacher_features",
    "soft_distillation_loss",
    "soft_target_cross_entropy",
    "specific_distillation_loss",
]
