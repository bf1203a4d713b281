"""Named training recipes: sets of defaults for the example scripts' arguments, chosen with `--recipe`.

- `release`: the authors' ImageNet recipe, which the argument dataclasses carry as their own defaults (strong
  regularization for 200-300 epochs of 1.28M images: mixup/cutmix, RandAugment, random erasing, label smoothing, the
  learning rate scaled by batch / 256).
- `small-data`: for a few thousand images and a few hundred to a few thousand steps, where the release's recipe
  trains to chance: plain augmentation (crops and flips; no mixup/cutmix, RandAugment or random erasing), an
  unscaled learning rate of 1e-3 with 10% warm-up. Specific distillation (`run_specific.py`) runs without layer-wise
  lr decay: a short generic distillation is a weaker start than the release's 300 epochs, and decaying the lower
  layers' rate held the student below scratch; the teacher's fine-tuning from an MAE keeps the release's 0.75
  (better than none from every MAE measured), the dense tasks their own. Specific distillation also trains the
  scratch baseline (`scratch_baseline`: the same student, no teacher), cheap at this size, and warns naming the weak
  stage when the distilled student ends below it. Measured on ELPV (docs/demo.md) and on generated and packaged sets
  (docs/recipes.md).

A recipe only changes defaults: any flag given on the command line (or in a JSON/YAML file) wins. Each script takes
the recipe's values for the arguments it has and ignores the others; `STAGE_RECIPES` holds the values that differ
by stage, keyed by the stage's training-arguments class.
"""

from collections.abc import Iterable


RECIPES: dict[str, dict[str, object]] = {
    "release": {},
    "small-data": {
        "learning_rate": 1e-3,
        "scale_lr_with_batch_size": False,
        "warmup_steps": 0.1,
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "auto_augment": "none",
        "random_erasing": 0.0,
        "min_crop_scale": 0.5,
    },
}
# A recipe's values for one stage only, by the name of the stage's training-arguments class: they replace the
# recipe's own for that stage.
STAGE_RECIPES: dict[str, dict[str, dict[str, object]]] = {
    "small-data": {"SpecificDistillationArguments": {"layer_decay": 1.0, "scratch_baseline": True}},
}
DEFAULT_RECIPE = "release"

# Below this many optimizer steps the release's recipe is unlikely to learn (it warms up for 5-10 epochs of ImageNet,
# about 25,000 steps at batch 256); the trainers then recommend `--recipe small-data`.
SMALL_RUN_STEPS = 5000


def recipe_defaults(name: str, field_names: Iterable[str], stage: str | None = None) -> dict[str, object]:
    """The defaults of recipe `name` for the arguments in `field_names` (the others are left out), with the values
    `STAGE_RECIPES` gives for `stage` (the name of a training-arguments class) instead of the recipe's own.

    Raises:
        ValueError: for an unknown recipe, listing the known ones.

    Example:

    ```python
    >>> recipe_defaults("small-data", ["learning_rate", "mask_ratio"])
    {'learning_rate': 0.001}
    >>> recipe_defaults("small-data", ["layer_decay"], stage="SpecificDistillationArguments")
    {'layer_decay': 1.0}
    ```
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}: choose one of {sorted(RECIPES)}.")
    names = set(field_names)
    values = {**RECIPES[name], **STAGE_RECIPES.get(name, {}).get(stage, {})}
    return {key: value for key, value in values.items() if key in names}


__all__ = ["DEFAULT_RECIPE", "RECIPES", "SMALL_RUN_STEPS", "STAGE_RECIPES", "recipe_defaults"]
