"""The authors' LoRA initialisation, EMA initialisation and fixed sampling shift against ours, on the t2i proving
ground (issue: "defaults checked against the authors").

Variants of the `t2i` preset, each trained on the same teacher-made cache (512 training prompts) and swept on the
512 held-out prompts with the demo's metrics:

* `base`: peft's kaiming-uniform LoRA A, EMA adapters that start as a copy of the student (our earlier defaults);
* `gaussian`: `lora.init=gaussian` (A ~ N(0, 1/r), the authors' scripts);
* `zero_ema`: `lora.ema_init=zero` (EMA adapters start at A = B = 0, the authors' scripts);
* the shift: the `base` student swept at the authors' fixed Flux sampling shift 3.25 instead of our 3.

Usage (about 15 minutes per training run and 5 per sweep on a 2-core CPU; runs already in --out are reused):

    python benchmarks/t2i_authors_defaults.py --out runs/authors --seeds 0 1

writes `--out/authors_defaults.md` and `--out/authors_defaults.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortcutfm.config import load_config
from shortcutfm.t2i import evaluate as ev
from shortcutfm.t2i.demo import evaluate_lora_run, prepare_teacher_data
from shortcutfm.workflows import cache_dir, resolve_config_path, run_training

VARIANTS = {
    "base": ["lora.init=kaiming", "lora.ema_init=student"],
    "gaussian": ["lora.init=gaussian", "lora.ema_init=student"],
    "zero_ema": ["lora.init=kaiming", "lora.ema_init=zero"],
}
AUTHORS_FLUX_SHIFT = 3.25
STEPS_SHOWN = (1, 2, 3, 4, 8, 16)


def run_name(variant: str, seed: int) -> str:
    return variant if seed == 0 else f"{variant}_s{seed}"


def student_rows(metrics_file: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in json.loads(metrics_file.read_text())["rows"]:
        if row["model"] == "student":
            out.setdefault(row["steps"], {})[row["metric"]] = row["value"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/authors"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-prompts", type=int, default=512)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pipeline = ev.BUNDLED_PIPELINE
    cache = out / "cache"
    if not (cache / "manifest.json").is_file():
        prompts = out / "train_prompts.txt"
        prompts.write_text("\n".join(ev.training_prompts(512, 0)) + "\n")
        base = load_config(resolve_config_path("t2i"))
        prepare_teacher_data(pipeline, prompts, cache, ev.training_guidance_scale(base))
    results: dict[str, dict] = {}
    evaluations = [(variant, seed, None) for seed in args.seeds for variant in VARIANTS]
    evaluations.append(("base", 0, AUTHORS_FLUX_SHIFT))
    for variant, seed, shift in evaluations:
        name = run_name(variant, seed)
        run = out / name
        config = load_config(resolve_config_path("t2i"), [f"data.source={cache}", f"train.output_dir={run}",
                                                           f"train.seed={seed}", *VARIANTS[variant]])
        if not (run / "model").is_dir():
            run_training(config, overwrite=True)
        shift = config.eval.select_shift if shift is None else shift
        report_dir = out / (f"{name}-eval" if shift == config.eval.select_shift else f"{name}-eval-shift{shift:g}")
        if not (report_dir / "metrics.json").is_file():
            evaluate_lora_run(pipeline, run / "model", report_dir, guidance_scale=ev.training_guidance_scale(config),
                              shift=shift, num_prompts=args.num_prompts, seed=config.eval.seed,
                              cache_dir=cache_dir() / "t2i")
        state = json.loads((run / "trainer_state.json").read_text())
        results[report_dir.name] = {"variant": variant, "seed": seed, "shift": shift,
                                    "selection_best": state["best_metric"], "best_step": state["best_step"],
                                    "student": student_rows(report_dir / "metrics.json")}
    (out / "authors_defaults.json").write_text(json.dumps(results, indent=2))
    lines = ["| run | seed | shift | selection (train prompts, best) | "
             + " | ".join(f"fd_teacher@{n}" for n in STEPS_SHOWN) + " | fd_data@3 | adherence@3 |",
             "|---|---|---|---|" + "---|" * (len(STEPS_SHOWN) + 2)]
    for name, r in results.items():
        s = r["student"]
        lines.append(f"| {r['variant']} | {r['seed']} | {r['shift']:g} | {r['selection_best']:.3f} | "
                     + " | ".join(f"{s[n]['fd_teacher']:.3f}" for n in STEPS_SHOWN)
                     + f" | {s[3]['fd_data']:.2f} | {s[3]['adherence']:.3f} |")
    (out / "authors_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
