"""Fused-LoRA sampling: an N-step student should cost N base transformer passes.

    python benchmarks/fused_sampling.py [--layers 12 --heads 8 --head-dim 64] [--batch 8] [--repeats 5] [--out FILE]

Builds the proving ground's SD3 pipeline (world text encoders and VAE) around a mid-size random transformer,
adds a rank-16 SCFM LoRA (random, non-zero), and times the denoising (``output_type="latent"``, no CFG: one pass
per step) of the teacher at 32 steps and of the student at 3 steps, unfused (peft adapters active, scale 1.25)
and fused (``fuse_lora``: folded into the weights). Prints the medians and the ratios against 3/32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    from shortcutfm.models.diffusers import LoraSettings, LoraStudent, export_lora, fuse_lora, get_family
    from shortcutfm.models.diffusers import sample_with_pipeline
    from shortcutfm.t2i.pipeline import TransformerShape, build_base_pipeline, build_vae, save_pipeline
    from shortcutfm.t2i.evaluate import load_world_pipeline

    diffusers_logging.set_verbosity_error()
    shape = TransformerShape(args.layers, args.heads, args.head_dim)
    work = Path(tempfile.mkdtemp())
    base_dir = save_pipeline(build_base_pipeline(build_vae(0), shape), work / "base")
    family = get_family("sd3")
    student = LoraStudent(family.velocity(load_world_pipeline(base_dir).transformer), family,
                          lora=LoraSettings(rank=16, alpha=16), guidance_scale=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in student.trainable_tensors().values():
            tensor.copy_(0.02 * torch.randn(tensor.shape, generator=generator))
    export_lora(student, work / "lora")

    prompts = ["a red circle at the top left on a white background"] * args.batch
    pipe = load_world_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.transformer.parameters())

    def sampler(num_steps, scale=1.0):
        def run():
            with torch.no_grad():
                sample_with_pipeline(pipe, prompts, num_steps=num_steps, guidance=0.0, lora_scale=scale, height=32,
                                     width=32, generator=torch.Generator().manual_seed(1), max_sequence_length=4)
        return run

    teacher = median_seconds(sampler(32), args.repeats)
    pipe.load_lora_weights(str(work / "lora"), adapter_name="scfm")
    unfused = median_seconds(sampler(3, 1.25), args.repeats)
    fuse_lora(pipe, "scfm", 1.25)
    fused = median_seconds(sampler(3), args.repeats)
    result = {
        "transformer_parameters": params, "batch": args.batch, "threads": torch.get_num_threads(),
        "teacher_32_steps_s": teacher, "student_3_steps_unfused_s": unfused, "student_3_steps_fused_s": fused,
        "ideal_ratio": 3 / 32, "fused_ratio": fused / teacher, "unfused_ratio": unfused / teacher,
        "fused_ratio_over_ideal": fused / teacher / (3 / 32),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
