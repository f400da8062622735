"""Training changes for few steps, ablated: per variant of the distillation (one finished demo run per seed), the
median over seeds of the student's N-step value, as trained and calibrated, divided by the teacher's 32-step value.

    for s in 0 1 2; do
      shortcutfm demo --data checkerboard --out runs/abl/cb-authors-s$s train.seed=$s 'jumps.shift_range=[2.5,4.5]' \
          jumps.alt_shift_prob=0.1 'eval.sweep_shifts=[1.0]'
      shortcutfm demo --data checkerboard --out runs/abl/cb-shift1-s$s train.seed=$s 'eval.sweep_shifts=[1.0]'
    done
    python benchmarks/training_ablation.py --data checkerboard \
        --variant "authors' shifts [2.5, 4.5]" runs/abl/cb-authors-s* \
        --variant "shift 1 (default)" runs/abl/cb-shift1-s* --out docs/results/training_ablation_checkerboard.md

Every value is on held-out data at grid shift ``--shift`` (1: where the built-in models sample and calibrate). The
drift columns read the run's ``trainer_state.json``: the last evaluation's selection metric over the best one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from step_calibration import report_of, value_at

STEPS = (1, 2, 3, 4, 8, 16, 32)


def variant_rows(label: str, runs: list[Path], shift: float) -> tuple[list[str], dict[str, float]]:
    """Table lines of one variant (as trained, calibrated) and its acceptance figures."""
    for run in runs:
        if not any((run / name / "metrics.json").is_file() for name in ("report", "report-calibrated")):
            raise SystemExit(f"{run}: no report/metrics.json yet (is the demo still running?)")
    all_rows = [json.loads((report_of(run) / "metrics.json").read_text())["rows"] for run in runs]
    metric = next(r["metric"] for r in all_rows[0] if r["model"] == "student")

    def median(model: str, n: int) -> float:
        return statistics.median(value_at(rows, model, "euler", n, metric, shift) for rows in all_rows)

    teacher32 = median("teacher", 32)
    lines = []
    figures: dict[str, float] = {"teacher@32": teacher32}
    for model, name in (("student-uncalibrated", "as trained"), ("student", "calibrated")):
        values = {n: median(model, n) for n in STEPS}
        cells = [f"{values[1]:.3g}"] + [f"{values[n] / teacher32:.2f}" for n in STEPS[1:]]
        lines.append(f"| {label} | {name} | {len(runs)} | " + " | ".join(cells) + " |")
        if model == "student":
            figures.update({f"@{n}": values[n] for n in STEPS})
            figures["worst N>=2 / teacher@32"] = max(values[n] for n in STEPS[1:]) / teacher32
            figures["worst N>3 / @3"] = max(values[n] for n in STEPS if n > 3) / values[3]
    states = [json.loads((run / "student" / "trainer_state.json").read_text()) for run in runs]
    drift = [state["history"][-1]["value"] / state["best_metric"] for state in states]
    figures["final / best selection metric (max over seeds)"] = max(drift)
    return lines, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the data set's name, for the title")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("LABEL", "RUN"),
                        help="a label, then that variant's demo run folders (one per seed)")
    parser.add_argument("--out", type=Path, required=True, help="markdown table to write")
    parser.add_argument("--shift", type=float, default=1.0, help="grid shift of the rows")
    args = parser.parse_args()
    header = ["| variant | student | seeds | @1 (value) | " + " | ".join(f"@{n}" for n in STEPS[1:]) + " |",
              "|---|---|---:|" + "---:|" * len(STEPS)]
    lines, notes = [], []
    for label, *runs in args.variant:
        if not runs:
            parser.error(f"--variant {label!r} names no run folder")
        rows, figures = variant_rows(label, [Path(r) for r in runs], args.shift)
        lines += rows
        notes.append(f"- **{label}**: " + "; ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    text = "\n".join([
        f"# Training ablation on {args.data}: N-step value / teacher's 32-step value, median of seeds", "",
        f"Held-out data, grid shift {args.shift:g}; @1 is the value itself; lower is better.", "",
        *header, *lines, "", "Figures per variant (calibrated student; values, not ratios, for @N):", "", *notes,
    ]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
