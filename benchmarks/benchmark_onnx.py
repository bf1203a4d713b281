"""The student's speed over its teacher, as deployed: PyTorch eager, ONNX Runtime fp32 and ONNX Runtime int8.

Run by hand (not a test; about 10 minutes on 2 CPU cores), on an otherwise idle machine:

    python benchmarks/benchmark_onnx.py
    python benchmarks/benchmark_onnx.py --output onnx.json --latency_runs 50

Pairs of models, randomly initialized (speed does not depend on the weights):

- the demo's (96 px, 2 classes): its teacher (the shipped fine-tuned MAE ViT, 192-d, 6 blocks) and its G2SD student
  (96-d, 6 blocks, distillation token: exported as DeiT, the two heads averaged);
- the paper's (224 px, 1,000 classes): ViT-Ti and ViT-S students against the ViT-B teacher.

For each model and runtime: batch-1 latency (median and 90th percentile of `--latency_runs` runs, after warm-up) and
batch-64 throughput (median of `--throughput_runs` runs). ONNX models are exported as `python -m g2sd_hf.export
--format onnx` exports them (`export_onnx_graph`, dynamic batch; int8: `quantize_int8`). PyTorch and ONNX Runtime use
every core (`torch.get_num_threads()` threads); the ratios, measured in one run, are what to quote.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

from g2sd_hf import G2SDConfig, G2SDForImageClassification
from g2sd_hf.onnx_export import export_onnx_graph, inference_session, quantize_int8
from g2sd_hf.scripts.run import parse_overrides
from g2sd_hf.stock_model import to_stock_model


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def vit(hidden: int, heads: int, image_size: int = 224, labels: int = 1000, layers: int = 12):
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=image_size,
        patch_size=16,
        num_labels=labels,
        layer_norm_eps=1e-6,
    )
    return ViTForImageClassification(config).eval()


def demo_pair():
    import run_demo

    scale = run_demo.SCALES["cpu"]
    teacher_config = ViTConfig.from_pretrained(ROOT / "examples" / "assets" / "elpv-teacher-classifier")
    teacher = ViTForImageClassification(teacher_config).eval()
    overrides = parse_overrides(scale.student, G2SDConfig)
    config = G2SDConfig(
        **{**overrides, "image_size": scale.image_size, "patch_size": 16},
        num_labels=2,
        use_distillation_token=True,
    )
    student = to_stock_model(G2SDForImageClassification(config).eval()).eval()
    return scale.image_size, {"teacher (demo)": teacher, "G2SD student (demo)": student}


def seconds(run, runs: int, warmup: int) -> list[float]:
    """The time of each of `runs` calls of `run`, after `warmup` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def latency(run, runs: int) -> tuple[float, float]:
    times = seconds(run, runs, warmup=3)
    return statistics.median(times) * 1000, float(np.percentile(times, 90)) * 1000


def throughput(run, batch: int, runs: int) -> float:
    return batch / statistics.median(seconds(run, runs, warmup=1))


def measure(model, image_size: int, folder: Path, arguments) -> dict:
    one = torch.randn(1, 3, image_size, image_size)
    many = torch.randn(arguments.batch_size, 3, image_size, image_size)
    results = {}
    with torch.inference_mode():
        results["PyTorch eager"] = (
            *latency(lambda: model(pixel_values=one), arguments.latency_runs),
            throughput(lambda: model(pixel_values=many), arguments.batch_size, arguments.throughput_runs),
        )
    export_onnx_graph(model, folder / "model.onnx", image_size, 3)
    quantize_int8(folder / "model.onnx", folder / "model_int8.onnx")
    for name, file in (("ONNX Runtime fp32", "model.onnx"), ("ONNX Runtime int8", "model_int8.onnx")):
        session = inference_session(folder / file, threads=torch.get_num_threads())
        one_np, many_np = one.numpy(), many.numpy()
        results[name] = (
            *latency(lambda: session.run(None, {"pixel_values": one_np}), arguments.latency_runs),
            throughput(
                lambda: session.run(None, {"pixel_values": many_np}), arguments.batch_size, arguments.throughput_runs
            ),
        )
    return {
        runtime: {"latency_ms_median": a, "latency_ms_p90": b, "images_per_second": c}
        for runtime, (a, b, c) in results.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency_runs", type=int, default=30)
    parser.add_argument("--throughput_runs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default=None)
    arguments = parser.parse_args()
    demo_size, demo_models = demo_pair()
    groups = {
        "demo": (demo_size, demo_models, "teacher (demo)"),
        "224": (
            224,
            {"ViT-B (teacher)": vit(768, 12), "ViT-S": vit(384, 6), "ViT-Ti": vit(192, 3)},
            "ViT-B (teacher)",
        ),
    }
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    report = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "groups": {}}
    for group, (size, models, teacher) in groups.items():
        measured = {}
        for name, model in models.items():
            with tempfile.TemporaryDirectory() as folder:
                measured[name] = measure(model, size, Path(folder), arguments)
            print(f"{group} {name}: {json.dumps(measured[name])}", flush=True)
        report["groups"][group] = measured
        print(f"\n{group} ({size} px): {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
        print(
            "| Model | Runtime | batch-1 latency, ms (median / p90) | batch-64 images/s | images/s over the teacher's, same runtime |"
        )
        print("|---|---|---|---|---|")
        for name, runtimes in measured.items():
            for runtime, values in runtimes.items():
                ratio = values["images_per_second"] / measured[teacher][runtime]["images_per_second"]
                print(
                    f"| {name} | {runtime} | {values['latency_ms_median']:.1f} / {values['latency_ms_p90']:.1f} | "
                    f"{values['images_per_second']:.1f} | {ratio:.2f}x |"
                )
    if arguments.output:
        Path(arguments.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
