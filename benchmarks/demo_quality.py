"""Quality benchmark of the CPU demo: SCFM student against its teacher, over several training seeds.

Runs ``shortcutfm demo`` once per seed (two at a time: one torch thread each suits a 2-core machine), then
prints, for the primary metric (Frechet distance for digits, energy distance for vectors), the student's 3-step
Euler value against the teacher's 32-step and 3-step Euler values at the same shift, per seed and the median.

    python benchmarks/demo_quality.py --data digits --seeds 0 1 2 --out runs/quality
    python benchmarks/demo_quality.py --data checkerboard --seeds 0 --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def ratios(metrics_path: Path, metric: str, shift: float, steps: int) -> dict[str, float]:
    rows = json.loads(metrics_path.read_text())["rows"]

    def value(model: str, n: int) -> float:
        (row,) = [r for r in rows if r["model"] == model and r["sampler"] == "euler" and r["steps"] == n
                  and r["shift"] == shift and r["metric"] == metric]
        return row["value"]

    student, teacher_32, teacher_n = value("student", steps), value("teacher", 32), value("teacher", steps)
    return {"student": student, "teacher_32": teacher_32, f"teacher_{steps}": teacher_n,
            "student/teacher_32": student / teacher_32, f"student/teacher_{steps}": student / teacher_n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--shift", type=float, default=1.0, help="sampling shift of the compared rows")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra section.field=value overrides for the distillation")
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args.out.mkdir(parents=True, exist_ok=True)
    pending = list(args.seeds)
    running: list[tuple[int, subprocess.Popen, float]] = []
    wall = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            seed = pending.pop(0)
            out = args.out / f"{args.data}-seed{seed}"
            command = [sys.executable, "-m", "shortcutfm.cli", "demo", "--data", args.data, "--out", str(out),
                       f"train.seed={seed}", *args.overrides]
            log = open(args.out / f"{args.data}-seed{seed}.log", "w")
            running.append((seed, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
        time.sleep(2)
        for item in list(running):
            seed, process, started = item
            if process.poll() is not None:
                running.remove(item)
                wall[seed] = time.time() - started
                if process.returncode:
                    raise SystemExit(f"seed {seed} failed; see {args.out / f'{args.data}-seed{seed}.log'}")

    results = {}
    for seed in args.seeds:
        metrics = args.out / f"{args.data}-seed{seed}" / "report" / "metrics.json"
        primary = "frechet_distance" if "frechet_distance" in metrics.read_text() else "energy_distance"
        results[seed] = {**ratios(metrics, primary, args.shift, args.steps), "wall_seconds": wall[seed]}
    keys = list(next(iter(results.values())))
    print(f"{args.data}: {primary}, Euler, shift {args.shift:g}")
    print("seed  " + "  ".join(f"{k:>20}" for k in keys))
    for seed, row in results.items():
        print(f"{seed:<5} " + "  ".join(f"{row[k]:>20.4g}" for k in keys))
    median = {k: statistics.median(r[k] for r in results.values()) for k in keys}
    print("median" + "  ".join(f"{median[k]:>20.4g}" for k in keys))
    (args.out / f"{args.data}-summary.json").write_text(json.dumps({"metric": primary, "shift": args.shift,
                                                                     "seeds": results, "median": median}, indent=2))


if __name__ == "__main__":
    main()
