"""Speed of G2SD on this machine: the generic-distillation step, where its time goes, how close it runs to the
hardware, the specific-distillation step, inference, and whole training runs on real-sized JPEGs.

Run by hand (not a test; about 10 minutes on 2 CPU cores):

    python benchmarks/benchmark_generic_distillation.py                          # CPU
    python benchmarks/benchmark_generic_distillation.py --device cuda --bf16     # GPU, bf16 autocast
    python benchmarks/benchmark_generic_distillation.py --torch_compile          # also compiled

What is measured is what a user gets without flags: `MAETeacher(mae, target_layer=4)(pixel_values, noise,
mask_ratio)` for the targets (encoder on the visible 25% of patches, decoder blocks 1..4, inference mode, sdpa) and the
student's forward/backward with its defaults, then an AdamW step. The baseline stands in for the authors' step
(`main_distill.py`): eager attention, the teacher's full `ViTMAEForPreTraining` forward (all 8 decoder blocks and the
pixel head) under `no_grad` instead of inference mode; the authors' code itself is not part of this project (fetch
`github:pengzhiliang/G2SD` and time it outside the repository to compare with it directly).

Models are randomly initialized at the released sizes (no download); timings are medians over the measured steps,
after warm-up steps; peak memory is each configuration's own process's peak RSS (CPU) or peak allocation (GPU).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from g2sd_hf import (
    G2SDConfig,
    G2SDForGenericDistillation,
    G2SDForImageClassification,
    MAETeacher,
    initialize_mae_from_scratch,
)


STUDENTS = {"ViT-Ti": "vit_tiny_patch16_dec128d4b", "ViT-S": "vit_small_patch16_dec256d4b"}
PHASES = ("teacher encoder", "teacher decoder", "student forward", "backward", "optimizer")


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device, steps, warmup) -> float:
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


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB


def cpu_flags() -> set[str]:
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# The GD step's matrix products (ViT-B on 16 images x 197 tokens): qkv, attention output, MLP in and out.
STEP_GEMMS = ((3152, 768, 2304), (3152, 768, 768), (3152, 768, 3072), (3152, 3072, 768))


def gemm_peak_gflops(device, dtype, repeats=7, shapes=STEP_GEMMS) -> float:
    """The best matrix-multiply throughput at the step's shapes: the fastest of `repeats` runs of each, the best
    shape (a peak, so the fastest run rather than the median)."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * m * k * n / min(times) / 1e9)
    return best


# --------------------------------------------------------------------------------------------------------------------
# The generic-distillation step
# --------------------------------------------------------------------------------------------------------------------
def mae_base(attention: str) -> ViTMAEForPreTraining:
    model = initialize_mae_from_scratch(ViTMAEForPreTraining(ViTMAEConfig(layer_norm_eps=1e-6)))
    model.set_attn_implementation(attention)
    return model


def generic_step(preset: str, configuration: str, args, device):
    """The step's function and its parts: `configuration` is `package` (defaults), `compiled` (the package's step with
    `torch.compile(student)`) or `baseline` (the authors' configuration)."""
    torch.manual_seed(0)
    attention = "eager" if configuration == "baseline" else "sdpa"
    teacher = MAETeacher(mae_base(attention), target_layer=4).to(device)
    student = G2SDForGenericDistillation(G2SDConfig.from_preset(preset)).to(device).train()
    student.set_attn_implementation(attention)
    if configuration == "compiled":
        student = torch.compile(student)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=device)
    noise = torch.rand(args.batch_size, 196, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def targets():
        if configuration != "baseline":
            return teacher(pixel_values, noise, 0.75)
        # The authors' teacher: the whole pre-training forward under no_grad, the decoder's 4th block captured.
        captured = {}
        hook = teacher.model.decoder.decoder_layers[3].register_forward_hook(
            lambda module, inputs, output: captured.update(hidden=output[0] if isinstance(output, tuple) else output)
        )
        with torch.no_grad():
            teacher.model(teacher.prepare_pixels(pixel_values), noise=noise)
        hook.remove()
        hidden = captured["hidden"].float()
        return torch.nn.functional.layer_norm(hidden, hidden.shape[-1:], eps=1e-6)

    def step(profiled: bool = False):
        with autocast:
            with record_function("teacher"):
                teacher_targets = targets()
            with record_function("student forward"):
                loss = student(pixel_values, noise=noise, teacher_targets=teacher_targets).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, teacher, pixel_values, noise, autocast


def profile_phases(step, teacher, pixel_values, noise, autocast, device) -> dict[str, float]:
    """Milliseconds per phase of one step (torch profiler ranges); the teacher split into encoder and decoder."""
    step()
    encoder_calls = []
    hook = teacher.model.vit.register_forward_pre_hook(lambda *a: encoder_calls.append(time.perf_counter()))
    done = teacher.model.vit.register_forward_hook(lambda *a: encoder_calls.append(time.perf_counter()))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    hook.remove()
    done.remove()
    totals = {
        event.key: event.cpu_time_total / 1e3
        for event in profiler.key_averages()
        if event.key in PHASES + ("teacher",)
    }
    encoder = (encoder_calls[1] - encoder_calls[0]) * 1e3 if len(encoder_calls) >= 2 else 0.0
    return {
        "teacher encoder": encoder,
        "teacher decoder": totals.get("teacher", 0.0) - encoder,
        **{phase: totals.get(phase, 0.0) for phase in PHASES[2:]},
    }


def count_flops(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure_generic(preset: str, configuration: str, args, device) -> dict:
    step, teacher, pixel_values, noise, autocast = generic_step(preset, configuration, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, device, args.steps, args.warmup)
    row = {
        "configuration": configuration,
        "images_per_s": args.batch_size / seconds,
        "peak_memory_MiB": peak_memory_mib(device),
        "gflop_per_image": count_flops(step) / args.batch_size / 1e9,
        "phases_ms": profile_phases(step, teacher, pixel_values, noise, autocast, device),
    }
    row["achieved_gflops"] = row["gflop_per_image"] * row["images_per_s"]
    return row


# --------------------------------------------------------------------------------------------------------------------
# Specific distillation and inference
# --------------------------------------------------------------------------------------------------------------------
def vit_base_classifier(num_labels=1000) -> ViTForImageClassification:
    return ViTForImageClassification(ViTConfig(num_labels=num_labels, layer_norm_eps=1e-6)).eval()


def student_classifier(preset: str, num_labels=1000) -> G2SDForImageClassification:
    return G2SDForImageClassification(
        G2SDConfig.from_preset(preset, num_labels=num_labels, use_distillation_token=True)
    )


def measure_specific_and_inference(preset: str, args, device) -> dict:
    from g2sd_hf import ClassificationTeacher

    torch.manual_seed(0)
    teacher_model = vit_base_classifier().to(device)
    teacher = ClassificationTeacher(teacher_model).to(device)
    student = student_classifier(preset).to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def specific_step():
        from g2sd_hf.losses import hard_distillation_loss, soft_target_cross_entropy, specific_distillation_loss

        with autocast:
            teacher_logits = teacher(pixel_values)
            outputs = student(pixel_values=pixel_values)
            task = soft_target_cross_entropy(outputs.cls_logits, torch.nn.functional.one_hot(labels, 1000).float())
            loss = specific_distillation_loss(
                task, hard_distillation_loss(outputs.distillation_logits, teacher_logits)
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    specific = args.batch_size / median_seconds(specific_step, device, args.steps, args.warmup)
    student.eval()

    def infer(model):
        def run():
            with torch.inference_mode(), autocast:
                model(pixel_values=pixel_values)

        return args.batch_size / median_seconds(run, device, args.steps, args.warmup)

    student_speed, teacher_speed = infer(student), infer(teacher_model)
    return {
        "sd_step_images_per_s": specific,
        "inference_images_per_s": student_speed,
        "teacher_inference_images_per_s": teacher_speed,
        "inference_ratio": student_speed / teacher_speed,
    }


# --------------------------------------------------------------------------------------------------------------------
# Whole training runs on real-sized JPEGs
# --------------------------------------------------------------------------------------------------------------------
def jpeg_folder(root: Path, count: int) -> Path:
    """`count` real images (the ELPV cells, tinted to RGB) resized to 500x375 JPEGs, as ImageNet's typical size, in
    two class folders."""
    from g2sd_hf.data import load_elpv, open_rgb_image

    cells = load_elpv()["train"].select(range(count))
    for index, (image, label) in enumerate(zip(cells["image"], cells["label"])):
        folder = root / f"class{label % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = open_rgb_image(image).resize((500, 375))
        picture.save(folder / f"{index}.jpg", quality=90)
    return root


def measure_whole_runs(preset: str, args, device) -> dict:
    """Images/s of `GenericDistillationTrainer.train()` and `SpecificDistillationTrainer.train()` reading, decoding and
    augmenting JPEGs every step, with the default data-loader workers."""
    from g2sd_hf import (
        GenericDistillationArguments,
        GenericDistillationTrainer,
        SpecificDistillationArguments,
        SpecificDistillationTrainer,
    )
    from g2sd_hf.data import ImageTransform
    from g2sd_hf.scripts.arguments import (
        ClassificationAugmentationArguments,
        DataArguments,
        MaskedImageAugmentationArguments,
        prepare_splits,
    )

    steps = args.run_steps
    with tempfile.TemporaryDirectory() as folder:
        data = DataArguments(train_dir=str(jpeg_folder(Path(folder) / "images", args.batch_size * steps + 16)))
        splits, _ = prepare_splits(data, seed=0)
        common = dict(
            output_dir=str(Path(folder) / "run"),
            per_device_train_batch_size=args.batch_size,
            max_steps=steps,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=args.bf16,
            logging_steps=steps,
        )
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        generic = GenericDistillationTrainer(
            model=G2SDForGenericDistillation(G2SDConfig.from_preset(preset)),
            teacher=MAETeacher(mae_base("sdpa"), target_layer=4),
            args=GenericDistillationArguments(**common),
            train_dataset=splits["train"].with_transform(
                ImageTransform(MaskedImageAugmentationArguments().train_transform(224, mean, std))
            ),
        )
        generic_speed = generic.train().metrics["train_samples_per_second"]
        specific = SpecificDistillationTrainer(
            model=student_classifier(preset, num_labels=2),
            teacher=vit_base_classifier(num_labels=2),
            args=SpecificDistillationArguments(**common),
            train_dataset=splits["train"].with_transform(
                ImageTransform(ClassificationAugmentationArguments().train_transform(224, mean, std), with_labels=True)
            ),
        )
        specific_speed = specific.train().metrics["train_samples_per_second"]
    return {
        "gd_run_images_per_s": generic_speed,
        "sd_run_images_per_s": specific_speed,
        "data_loader_workers": GenericDistillationArguments(output_dir="x").dataloader_num_workers,
    }


# --------------------------------------------------------------------------------------------------------------------
# One configuration per process (its own peak memory), and the report
# --------------------------------------------------------------------------------------------------------------------
def run_in_subprocess(task: str, preset: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        command = [sys.executable, __file__, "--task", task, "--students", preset, "--json", handle.name]
        command += ["--device", args.device, "--batch_size", str(args.batch_size), "--steps", str(args.steps)]
        command += ["--warmup", str(args.warmup), "--run_steps", str(args.run_steps)]
        command += ["--bf16"] * args.bf16 + ["--torch_compile"] * args.torch_compile
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return json.load(open(handle.name))


def report(results: dict, args, device) -> None:
    peaks = results["gemm_peak_gflops"]
    print(f"\n{results['setup']}")
    print(f"GEMM peak at the step's shapes: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    dtype = "bf16" if args.bf16 else "fp32"
    print(f"\n## Generic-distillation step (batch {args.batch_size}, 224 px, teacher MAE ViT-B)\n")
    print(
        "| Student | Configuration | images/s | vs baseline | peak memory MiB | vs baseline | GFLOP/image | "
        f"achieved GFLOP/s | % of {dtype} GEMM peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows in results["generic"].items():
        baseline = rows["baseline"]
        for key, row in rows.items():
            print(
                f"| {name} | {row['configuration']} | {row['images_per_s']:.2f} | "
                f"{row['images_per_s'] / baseline['images_per_s']:.2f}x | {row['peak_memory_MiB']:.0f} | "
                f"{row['peak_memory_MiB'] / baseline['peak_memory_MiB']:.2f}x | {row['gflop_per_image']:.1f} | "
                f"{row['achieved_gflops']:.0f} | {100 * row['achieved_gflops'] / peaks[dtype]:.0f}% |"
            )
    print("\n## Where the step's time goes (ms, torch profiler ranges)\n")
    print("| Student | Configuration | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for name, rows in results["generic"].items():
        for row in rows.values():
            phases = row["phases_ms"]
            print(f"| {name} | {row['configuration']} | " + " | ".join(f"{phases[p]:.0f}" for p in PHASES) + " |")
    print("\n## Specific distillation, inference (teacher ViT-B classifier) and whole runs on 500x375 JPEGs\n")
    print(
        "| Student | SD step images/s | inference images/s | teacher inference images/s | student / teacher | "
        "GD train() images/s | SD train() images/s | data-loader workers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, row in results["specific"].items():
        runs = results["runs"].get(name, {})
        print(
            f"| {name} | {row['sd_step_images_per_s']:.2f} | {row['inference_images_per_s']:.1f} | "
            f"{row['teacher_inference_images_per_s']:.1f} | {row['inference_ratio']:.2f}x | "
            f"{runs.get('gd_run_images_per_s', float('nan')):.2f} | {runs.get('sd_run_images_per_s', float('nan')):.2f} | "
            f"{runs.get('data_loader_workers', '-')} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for teacher and student")
    parser.add_argument("--torch_compile", action="store_true", help="also measure the step with a compiled student")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 16 on CPU, 128 on GPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--run_steps", type=int, default=6, help="steps of each whole train() run")
    parser.add_argument("--students", default=",".join(STUDENTS.values()))
    parser.add_argument(
        "--task", default="all", choices=["all", "package", "compiled", "baseline", "specific", "runs"]
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (128 if device.type == "cuda" else 16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    if args.task != "all":  # one measurement, in its own process
        preset = args.students
        result = {
            "package": lambda: measure_generic(preset, "package", args, device),
            "baseline": lambda: measure_generic(preset, "baseline", args, device),
            "compiled": lambda: measure_generic(preset, "compiled", args, device),
            "specific": lambda: measure_specific_and_inference(preset, args, device),
            "runs": lambda: measure_whole_runs(preset, args, device),
        }[args.task]()
        json.dump(result, open(args.json, "w"))
        return

    flags = cpu_flags()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    results = {
        "setup": f"device={device} ({name}), bf16={args.bf16}, torch {torch.__version__}"
        + ("" if device.type == "cuda" else f", CPU bf16 instructions: {'yes' if native_bf16 else 'no (AVX2 only)'}"),
        "gemm_peak_gflops": {
            "fp32": gemm_peak_gflops(device, torch.float32),
            # Without bf16 instructions a bf16 product is emulated, orders of magnitude slower: one shape, twice.
            "bf16": gemm_peak_gflops(device, torch.bfloat16)
            if native_bf16 or device.type == "cuda"
            else gemm_peak_gflops(device, torch.bfloat16, repeats=2, shapes=STEP_GEMMS[1:2]),
        },
        "generic": {},
        "specific": {},
        "runs": {},
    }
    for name, preset in STUDENTS.items():
        if preset not in args.students.split(","):
            continue
        results["generic"][name] = {
            configuration: run_in_subprocess(configuration, preset, args)
            for configuration in ("baseline", "package") + (("compiled",) if args.torch_compile else ())
        }
        results["specific"][name] = run_in_subprocess("specific", preset, args)
        if args.run_steps:
            results["runs"][name] = run_in_subprocess("runs", preset, args)
    report(results, args, device)
    if args.json:
        json.dump(results, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
