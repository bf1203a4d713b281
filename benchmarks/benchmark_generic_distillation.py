"""Speed and memory of one generic-distillation training step: ViT-Small <- MAE ViT-Base and ViT-Tiny <- MAE ViT-Base.

Run by hand (not a test):

    python benchmarks/benchmark_generic_distillation.py                      # CPU, float32
    python benchmarks/benchmark_generic_distillation.py --device cuda --bf16  # GPU, bf16 autocast, bf16 teacher

One step = teacher targets (encoder on the visible 25% of patches + decoder blocks 1..4, inference mode) + student
forward/backward + AdamW step. The script also times the teacher alone, and the full `ViTMAEForPreTraining` forward a
naive implementation would run, to show what the truncated teacher saves. Models are randomly initialized at the
released sizes (no download); timings are medians over the measured steps, after warm-up steps.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from g2sd_hf import G2SDConfig, G2SDForGenericDistillation, MAETeacher, initialize_mae_from_scratch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device, steps, warmup):
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB, the process's peak RSS


def benchmark(student_preset, teacher, args, device):
    student = G2SDForGenericDistillation(G2SDConfig.from_preset(student_preset)).to(device).train()
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=device)
    noise = torch.rand(args.batch_size, 196, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with autocast:
            targets = teacher(pixel_values, noise)
            loss = student(pixel_values, noise=noise, teacher_targets=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def teacher_only():
        with autocast:
            teacher(pixel_values, noise)

    def full_mae_forward():
        with autocast, torch.inference_mode():
            teacher.model(pixel_values, noise=noise)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = median_seconds(step, device, args.steps, args.warmup)
    memory = peak_memory_mib(device)
    teacher_seconds = median_seconds(teacher_only, device, args.steps, args.warmup)
    full_seconds = median_seconds(full_mae_forward, device, args.steps, args.warmup)
    return {
        "student": student_preset,
        "student_params_M": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        "batch_size": args.batch_size,
        "step_ms": round(step_seconds * 1e3, 1),
        "images_per_s": round(args.batch_size / step_seconds, 1),
        "peak_memory_MiB": round(memory),
        "teacher_targets_ms": round(teacher_seconds * 1e3, 1),
        "full_mae_forward_ms": round(full_seconds * 1e3, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both, teacher weights in bf16")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--students", default="vit_small_patch16_dec256d4b,vit_tiny_patch16_dec128d4b")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (128 if device.type == "cuda" else 8)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    presets = args.students.split(",")
    if len(presets) > 1:
        # One process per student, so that each peak-memory figure is its own.
        results = []
        for preset in presets:
            with tempfile.NamedTemporaryFile(suffix=".json") as handle:
                command = [
                    sys.executable,
                    __file__,
                    "--students",
                    preset,
                    "--json",
                    handle.name,
                    "--device",
                    args.device,
                    "--batch_size",
                    str(args.batch_size),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ]
                subprocess.run(command + (["--bf16"] if args.bf16 else []), check=True, stdout=subprocess.DEVNULL)
                results.extend(json.load(open(handle.name))["results"])
    else:
        mae = initialize_mae_from_scratch(
            ViTMAEForPreTraining(ViTMAEConfig(layer_norm_eps=1e-6))
        )  # ViT-B, decoder 512x8
        teacher = MAETeacher(mae, target_layer=4).to(device)
        if args.bf16:
            teacher = teacher.to(torch.bfloat16)
        results = [benchmark(presets[0], teacher, args, device)]
    header = f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), bf16={args.bf16}, torch {torch.__version__}"
    print(header)
    columns = list(results[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in results:
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"setup": header, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
