"""Choose the world teacher's CFG scale on *training* prompts (the held-out prompts are never used for this).

    python benchmarks/t2i_guidance.py --pipeline runs/t2i/teacher/model --out runs/t2i/guidance.json

Samples the teacher at 32 Euler steps (shift 3) for every scale and writes fd_data (against real renders of the
same prompts) and adherence; the t2i presets use the scale chosen here (see docs/proving_ground.md).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def main(argv: list[str] | None = None) -> int:
    from shortcutfm.t2i import evaluate as ev
    from shortcutfm.t2i import judge as judging
    from shortcutfm.t2i.pipeline import T5_LENGTH, decode
    from shortcutfm.workflows import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", type=Path, default=ev.BUNDLED_PIPELINE)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--shift", type=float, default=3.0)
    args = parser.parse_args(argv)
    pipe = ev.load_world_pipeline(args.pipeline)
    judge_model, _ = ev.world_judge(cache_dir() / "t2i")
    prompts = ev.prompt_set(pipe, ev.training_prompts(args.prompts, seed=4321), 4321, T5_LENGTH)
    rows = []
    for scale in args.scales:
        velocity = ev.guided_velocity(pipe.transformer, prompts.uncond, scale)
        latents, _ = ev.sample_latents(velocity, prompts, args.steps, args.shift)
        images = decode(pipe.vae, latents)
        row = {"guidance_scale": scale, "fd_data": judging.fd(judge_model, images, prompts.reference),
               "adherence": judging.adherence(judge_model, images, prompts.scenes)}
        rows.append(row)
        print(row, flush=True)
    floor = judging.fd(judge_model, prompts.floor_reference, prompts.reference)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "fd_data_floor": floor, "prompts": "training", "steps": args.steps,
                                    "shift": args.shift}, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    raise SystemExit(main())
