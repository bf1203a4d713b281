"""g2sd-hf: Generic-to-Specific Distillation of masked autoencoders (Huang et al., CVPR 2023) for transformers.

Importing the package registers the G2SD classes with transformers' Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification` and `AutoModelForPreTraining` load G2SD checkpoints, and makes `save_pretrained`
ship the model code with the weights for `trust_remote_code=True` loading without the package.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_g2sd import G2SD_PRESET_ALIASES, G2SD_PRESETS, G2SDBackboneConfig, G2SDConfig
from .dense_trainer import DenseDistillationTrainer
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
    G2SDBackbone,
    G2SDForGenericDistillation,
    G2SDForImageClassification,
    G2SDModel,
    G2SDPreTrainedModel,
)
from .teacher import ClassificationTeacher, DenseTeacher, MAETeacher, initialize_mae_from_scratch
from .trainer import FineTuningTrainer, GenericDistillationTrainer, SpecificDistillationTrainer
from .training_args import (
    DenseDistillationArguments,
    FineTuningArguments,
    GenericDistillationArguments,
    MAEPretrainingArguments,
    SpecificDistillationArguments,
)


__version__ = "0.1.0"

AutoConfig.register(G2SDConfig.model_type, G2SDConfig, exist_ok=True)
AutoModel.register(G2SDConfig, G2SDModel, exist_ok=True)
AutoModelForImageClassification.register(G2SDConfig, G2SDForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(G2SDConfig, G2SDForGenericDistillation, exist_ok=True)
AutoConfig.register(G2SDBackboneConfig.model_type, G2SDBackboneConfig, exist_ok=True)
AutoBackbone.register(G2SDBackboneConfig, G2SDBackbone, exist_ok=True)
# save_pretrained ships configuration_g2sd.py, modeling_g2sd.py and losses.py with the weights, so checkpoints load
# with `trust_remote_code=True` where g2sd_hf is not installed.
G2SDConfig.register_for_auto_class()
G2SDModel.register_for_auto_class("AutoModel")
G2SDForImageClassification.register_for_auto_class("AutoModelForImageClassification")
G2SDForGenericDistillation.register_for_auto_class("AutoModelForPreTraining")
G2SDBackboneConfig.register_for_auto_class()
G2SDBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "ClassificationTeacher",
    "DenseDistillationArguments",
    "DenseDistillationTrainer",
    "DenseTeacher",
    "FineTuningArguments",
    "FineTuningTrainer",
    "G2SDBackbone",
    "G2SDBackboneConfig",
    "G2SDConfig",
    "G2SDForGenericDistillation",
    "G2SDForImageClassification",
    "G2SDModel",
    "G2SDPreTrainedModel",
    "G2SD_PRESETS",
    "G2SD_PRESET_ALIASES",
    "GenericDistillationArguments",
    "GenericDistillationTrainer",
    "MAEPretrainingArguments",
    "MAETeacher",
    "SpecificDistillationArguments",
    "SpecificDistillationTrainer",
    "export_to_transformers",
    "generic_distillation_loss",
    "hard_distillation_loss",
    "initialize_mae_from_scratch",
    "nkd_loss",
    "normalize_teacher_features",
    "soft_distillation_loss",
    "soft_target_cross_entropy",
    "specific_distillation_loss",
]


def __getattr__(name: str):
    # Imported on first use, so that `python -m g2sd_hf.export` runs the module fresh (no runpy RuntimeWarning about
    # a module found in sys.modules before its execution).
    if name == "export_to_transformers":
        from .export import export_to_transformers

        return export_to_transformers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
