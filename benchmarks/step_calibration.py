"""Step-count calibration measured: the calibrated student against the same student as trained, per step count,
median over seeds, from finished demo runs (their ``report/metrics.json``; each sweep row uses held-out data):

    for s in 0 1 2; do shortcutfm demo --data checkerboard --out runs/cal/checkerboard-s$s train.seed=$s; done
    for s in 0 1 2; do shortcutfm demo --data digits --out runs/cal/digits-s$s train.seed=$s; done
    python benchmarks/step_calibration.py runs/cal/checkerboard-s* --out docs/results/step_calibration_checkerboard.md
    python benchmarks/step_calibration.py runs/cal/digits-s* --out docs/results/step_calibration_digits.md

A run whose report predates calibration is calibrated and swept again first (``shortcutfm calibrate`` and
``shortcutfm eval``, into ``report-calibrated/``). Values are at ``--shift`` (1, the built-in calibration's shift);
the ratios divide by the teacher's 32-step Euler value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = ("student", "student-uncalibrated")


def report_of(run: Path) -> Path:
    """The run's calibrated sweep: report-calibrated/ (a later calibration's sweep) if there is one, else report/ when
    it has the student-uncalibrated rows; otherwise the run is calibrated and swept here."""
    for name in ("report-calibrated", "report"):
        metrics = run / name / "metrics.json"
        if metrics.is_file() and any(r["model"] == "student-uncalibrated" for r in json.loads(metrics.read_text())["rows"]):
            return run / name
    student, teacher = run / "student", json.loads((run / "student" / "model" / "model.json").read_text())
    teacher_dir = _teacher_dir(run)
    subprocess.run([sys.executable, "-m", "shortcutfm.cli", "calibrate", str(student)], check=True)
    subprocess.run([sys.executable, "-m", "shortcutfm.cli", "eval", "--teacher", str(teacher_dir), "--student",
                    str(student / "model"), "--out", str(run / "report-calibrated"), "eval.sweep_shifts=[1.0]",
                    f"data.source={teacher['data']['source'] or teacher['data']['name']}"], check=True)
    return run / "report-calibrated"


def _teacher_dir(run: Path) -> Path:
    import yaml

    config = yaml.safe_load((run / "student" / "config.yaml").read_text())
    return Path(config["train"]["teacher"])


def value_at(rows: list[dict], model: str, sampler: str, steps: int, metric: str, shift: float) -> float:
    values = [r["value"] for r in rows
              if (r["model"], r["sampler"], r["steps"], r["metric"], r["shift"]) == (model, sampler, steps, metric, shift)]
    if len(values) != 1:
        raise KeyError(f"{len(values)} rows for {model} {sampler} {steps} steps at shift {shift}")
    return values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo run folders (one per seed)")
    parser.add_argument("--out", type=Path, required=True, help="markdown table to write")
    parser.add_argument("--shift", type=float, default=1.0, help="grid shift of the rows (the calibration's)")
    args = parser.parse_args()
    reports = [report_of(run) for run in args.runs]
    all_rows = [json.loads((report / "metrics.json").read_text())["rows"] for report in reports]
    metric = next(r["metric"] for r in all_rows[0] if r["model"] == "student")
    steps = sorted({r["steps"] for r in all_rows[0] if r["model"] == "student"})
    scales = [json.loads((run / "student" / "model" / "calibration.json").read_text())["scales"] for run in args.runs]

    def median(model: str, sampler: str, n: int) -> float:
        return statistics.median(value_at(rows, model, sampler, n, metric, args.shift) for rows in all_rows)

    teacher32 = median("teacher", "euler", max(steps))
    lines = [f"# Step-count calibration: {metric}, median of {len(args.runs)} seeds", "",
             f"Runs: {', '.join(f'`{run}`' for run in args.runs)}; grid shift {args.shift:g} (the calibration's); "
             "held-out data; lower is better. "
             f"Teacher at {max(steps)} Euler steps: {teacher32:.4g}.", "",
             "| steps | teacher Euler | student as trained | calibrated student | calibrated / teacher@32 | scales (per seed) |",
             "|---:|---:|---:|---:|---:|---|"]
    for n in steps:
        calibrated, plain, teacher = median("student", "euler", n), median("student-uncalibrated", "euler", n), \
            median("teacher", "euler", n)
        per_seed = ", ".join(f"{s.get(str(n), '-')}" for s in scales)
        lines.append(f"| {n} | {teacher:.4g} | {plain:.4g} | {calibrated:.4g} | {calibrated / teacher32:.2f} | {per_seed} |")
    three = median("student", "euler", 3) if 3 in steps else None
    if three is not None:
        worst = max((median("student", "euler", n) for n in steps if n > 3), default=None)
        if worst is not None:
            lines += ["", f"Worst calibrated N > 3 over the calibrated 3-step figure: {worst / three:.2f}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
