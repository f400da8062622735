"""Guidance folded into the student (model.fold_guidance) against the two-pass CFG student, at 3 steps.

Reads two finished demo runs per data set (the same config, with and without ``model.fold_guidance=true``),
takes their 3-step quality rows from ``report/metrics.json``, and measures the 3-step sampling latency of both
deployed students here (the median of ``--repeats`` timed runs on the same noise; one torch thread):

    shortcutfm demo --data digits --out runs/fold/digits-2pass model.guidance_scale=1.0
    shortcutfm demo --data digits --out runs/fold/digits-1pass model.guidance_scale=1.0 model.fold_guidance=true
    shortcutfm demo --data t2i --out runs/demo-t2i                      # two passes per step (CFG w = 1)
    shortcutfm demo --data t2i --out runs/fold/t2i-1pass model.fold_guidance=true
    python benchmarks/fold_guidance.py --digits runs/fold/digits-2pass runs/fold/digits-1pass \\
        --t2i runs/demo-t2i runs/fold/t2i-1pass --out runs/fold/fold_guidance.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

STEPS = 3


def rows_at(report: Path, steps: int = STEPS, shift: float | None = None) -> dict[str, dict[str, float]]:
    """model -> metric -> value of the student rows at ``steps`` (and ``shift``, if given), plus their nfe."""
    out: dict[str, dict[str, float]] = {}
    for row in json.loads((report / "metrics.json").read_text())["rows"]:
        if row["model"].startswith("student") and row["steps"] == steps and shift in (None, row["shift"]):
            out.setdefault(row["model"], {"nfe": row["nfe"]})[row["metric"]] = row["value"]
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def digits_latency(run: Path, repeats: int, count: int = 1000) -> float:
    from shortcutfm.core.grids import sigma_grid
    from shortcutfm.core.samplers import euler_sample
    from shortcutfm.models.builtin import load_model
    from shortcutfm.training.builtin import deployed_velocity

    loaded = load_model(run / "student" / "model")
    velocity = deployed_velocity(loaded)
    noise = torch.randn((count, *loaded.info.sample_shape), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(count) % loaded.info.num_classes
    grid = sigma_grid(STEPS, 1.0)
    with torch.no_grad():
        return timed(lambda: euler_sample(velocity, noise, grid, y=labels), repeats) / count


def t2i_latency(run: Path, folded: bool, repeats: int, count: int = 64) -> float:
    from shortcutfm.config import load_config
    from shortcutfm.t2i import evaluate as ev

    config = load_config(run / "student" / "config.yaml")
    pipe = ev.load_world_pipeline(config.model.pretrained)
    prompts = ev.prompt_set(pipe, ev.held_out_prompts(count, 0), 0)
    transformer = ev.fused_lora_transformer(config.model.pretrained, run / "student" / "model")
    velocity = ev.guided_velocity(transformer, prompts.uncond, 0.0 if folded else ev.training_guidance_scale(config))
    with torch.no_grad():
        return timed(lambda: ev.sample_latents(velocity, prompts, STEPS, config.eval.select_shift), repeats) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", nargs=2, type=Path, metavar=("TWO_PASS", "ONE_PASS"))
    parser.add_argument("--t2i", nargs=2, type=Path, metavar=("TWO_PASS", "ONE_PASS"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/fold/fold_guidance.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["| data | student | NFE @3 | quality @3 | ratio to two-pass | adherence @3 | ms per sample @3 |",
             "|---|---|---|---|---|---|---|"]
    if args.digits:
        two, one = (rows_at(run / "report", shift=1.0)["student"] for run in args.digits)
        latency = [digits_latency(run, args.repeats) * 1000 for run in args.digits]
        # the built-in sweep counts velocity calls; a CFG call is two passes (one batch of 2B rows)
        for name, row, ms, passes in (("two-pass CFG", two, latency[0], 2), ("one pass (folded)", one, latency[1], 1)):
            fd = row["frechet_distance"]
            lines.append(f"| digits (w = 1) | {name} | {STEPS * passes} | FD {fd:.3f} | {fd / two['frechet_distance']:.2f} | "
                         f"- | {ms:.3f} |")
    if args.t2i:
        two = rows_at(args.t2i[0] / "report")["student"]
        one = rows_at(args.t2i[1] / "report")["student-1pass"]
        latency = [t2i_latency(args.t2i[0], False, args.repeats) * 1000, t2i_latency(args.t2i[1], True, args.repeats) * 1000]
        for name, row, ms in (("two-pass CFG", two, latency[0]), ("one pass (folded)", one, latency[1])):
            lines.append(f"| t2i (w = 1) | {name} | {row['nfe']} | fd_teacher {row['fd_teacher']:.3f} | "
                         f"{row['fd_teacher'] / two['fd_teacher']:.2f} | {row['adherence']:.4f} | {ms:.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
