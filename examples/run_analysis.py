#!/usr/bin/env python
"""Occlusion invariance and representation similarity (linear CKA) of classifiers on a data set.

    accelerate launch examples/run_analysis.py --models g2sd-vit-small-sd,mae-vit-base-ft \\
        --cka_pairs g2sd-vit-small-sd:mae-vit-base-ft --dataset_name imagenet-1k --output_dir analysis

Writes `occlusion.png`, `occlusion.json`, `cka.png`, `cka.json` and one `cka_<a>__<b>.npy` per pair. Without a data
set, the ELPV held-out images are used.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from transformers import AutoImageProcessor, HfArgumentParser

import g2sd_hf  # noqa: F401  (registers the G2SD Auto classes)
from g2sd_hf.analysis import cka_matrix, occlusion_curve, plot_cka, plot_occlusion
from g2sd_hf.checkpoints import load_image_classifier
from g2sd_hf.data import ImageTransform, class_names, collate_classification, processor_transform
from g2sd_hf.scripts.arguments import DataArguments, prepare_splits


logger = logging.getLogger(__name__)


@dataclass
class AnalysisArguments:
    models: str = field(
        metadata={"help": "Comma-separated classifier folders or Hub ids (G2SD or any transformers ViT)."}
    )
    output_dir: str = field(default="analysis", metadata={"help": "Where the plots and numbers go."})
    cka_pairs: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated 'a:b' pairs of --models (as given there, or their last path parts) for CKA maps."
        },
    )
    fractions: str = field(default="0,0.1,0.25,0.5,0.75,0.9", metadata={"help": "Fractions of patches to drop."})
    order: str = field(default="random", metadata={"help": "'random' or 'salient' (most salient patches first)."})
    protocol: str = field(
        default="drop",
        metadata={
            "help": "How patches are occluded: 'drop' them from the token sequence (the paper's protocol) or "
            "'fill' their pixels with the image mean.",
            "choices": ["drop", "fill"],
        },
    )
    pooling: str = field(
        default="mean", metadata={"help": "CKA representation of a layer: 'mean' of the tokens or 'cls'."}
    )
    batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    seed: int = field(default=0, metadata={"help": "Seed of the random patch order."})


def display_names(names: list[str]) -> dict[str, str]:
    """Display and file name of each model given as a folder or Hub id: its last path part, or the whole name with
    `/` as `_` where last parts collide (`runs/a/model`, `runs/b/model`)."""
    short = {name: Path(name).name or name for name in names}
    collide = {value for value in short.values() if list(short.values()).count(value) > 1}
    return {name: name.strip("/").replace("/", "_") if short[name] in collide else short[name] for name in names}


def cka_pairs(pairs: str | None, names: list[str]) -> list[tuple[str, str]]:
    """`'a:b,c:d'` -> `[(a, b), (c, d)]` with each of a, b, c, d one of `names` (the --models entries), given as
    written there or by its display name."""
    lookup = {**{display: name for name, display in display_names(names).items()}, **{name: name for name in names}}
    result = []
    for pair in filter(None, (item.strip() for item in (pairs or "").split(","))):
        parts = pair.split(":")
        if len(parts) != 2 or any(part not in lookup for part in parts):
            raise ValueError(
                f"--cka_pairs entry {pair!r} must be 'a:b' with a and b among --models {names} "
                f"(or their display names {sorted(display_names(names).values())})."
            )
        result.append((lookup[parts[0]], lookup[parts[1]]))
    return result


def run_analysis(models: dict, loader, patch_size: int, arguments: AnalysisArguments, accelerator=None) -> dict:
    """Occlusion curves of every model and CKA maps of the requested pairs (`models` keyed by the --models entries;
    results keyed by their display names); plots written when on the main process."""
    fractions = [float(value) for value in arguments.fractions.split(",")]
    output = Path(arguments.output_dir)
    results = {"occlusion": {}, "cka": {}}
    display = display_names(list(models))
    for name, model in models.items():
        results["occlusion"][display[name]] = occlusion_curve(
            model,
            loader,
            fractions,
            patch_size,
            arguments.order,
            arguments.seed,
            accelerator,
            f"occlusion {display[name]}",
            protocol=arguments.protocol,
        )
    for first, second in cka_pairs(arguments.cka_pairs, list(models)):
        results["cka"][f"{display[first]} vs {display[second]}"] = cka_matrix(
            models[first],
            models[second],
            loader,
            arguments.pooling,
            accelerator,
            f"CKA {display[first]}:{display[second]}",
        )
    if accelerator is None or accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        plot_occlusion(results["occlusion"], output / "occlusion.png")
        (output / "occlusion.json").write_text(json.dumps(results["occlusion"], indent=2))
        if results["cka"]:
            plot_cka(results["cka"], output / "cka.png")
            for pair, matrix in results["cka"].items():
                np.save(output / f"cka_{pair.replace(' vs ', '__')}.npy", matrix)
            (output / "cka.json").write_text(
                json.dumps({pair: matrix.tolist() for pair, matrix in results["cka"].items()}, indent=2)
            )
    return results


def check_labels(models: dict, labels: list[str]) -> None:
    """Refuse a model whose classes (names, in order) are not the data's: its accuracy would compare unrelated indices."""
    for name, model in models.items():
        config = getattr(model, "module", model).config
        own = [str(config.id2label[index]) for index in range(config.num_labels)]
        unnamed = own == [f"LABEL_{index}" for index in range(len(own))]
        if unnamed and len(own) == len(labels):
            logger.warning(
                f"{name}'s classes have no names (LABEL_0, ...): taken to be the data's {labels}, in order."
            )
        elif own != labels:
            raise ValueError(
                f"{name} predicts the classes {own[:6]}, the data has {labels[:6]}: its accuracy on this data would be "
                "meaningless. Analyze a model fine-tuned on this data set (same --dataset_name / --dataset_config_name "
                "or --train_dir)."
            )


def main(args: list[str] | None = None) -> dict:
    arguments, data_args = HfArgumentParser((AnalysisArguments, DataArguments)).parse_args_into_dataclasses(args=args)
    # Uneven shards: each image is scored once (the default pads the last batches with repeated images).
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
    names = [name.strip() for name in arguments.models.split(",")]
    cka_pairs(arguments.cka_pairs, names)  # bad pairs fail before any model loads
    models = {name: accelerator.prepare_model(load_image_classifier(name), evaluation_mode=True) for name in names}
    processor = AutoImageProcessor.from_pretrained(names[0])
    with accelerator.main_process_first():
        splits, _ = prepare_splits(data_args, arguments.seed)
    check_labels(models, class_names(splits["validation"]))
    dataset = splits["validation"].with_transform(ImageTransform(processor_transform(processor), with_labels=True))
    loader = accelerator.prepare_data_loader(
        torch.utils.data.DataLoader(dataset, batch_size=arguments.batch_size, collate_fn=collate_classification)
    )
    patch_size = next(iter(models.values())).config.patch_size
    return run_analysis(models, loader, patch_size, arguments, accelerator)


if __name__ == "__main__":
    main(sys.argv[1:])
