"""The ``shortcutfm`` command line: a thin layer that builds configs and calls library functions.

Options that exist in the config are given as ``section.field=value`` overrides, never as flags.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SCFM: few-step samplers from flow-matching models.")
console = Console()
OVERRIDES_HELP = "Config overrides as section.field=value, e.g. train.steps=2000 eval.every=100."


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _threads() -> None:
    # one thread per process is fastest for the small built-in networks on CPU (see CALIBRATION.md)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@app.command()
def train(
    config: str = typer.Argument(..., help="A YAML config file, or a preset name: pretrain, distill."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in train.output_dir."),
) -> None:
    """Train: from-scratch flow matching (train.mode=pretrain) or SCFM distillation (train.mode=distill)."""
    from .config import load_config
    from .workflows import resolve_config_path, run_training

    _threads()
    try:
        cfg = load_config(resolve_config_path(config), overrides or [])
        result = run_training(cfg, resume=resume)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        _fail(exc)
    console.print(f"model: [bold]{result.model_dir}[/]")


@app.command("eval")
def evaluate(
    teacher: Path = typer.Option(..., "--teacher", help="Teacher model directory (a pretrain run or its model/)."),
    student: Optional[Path] = typer.Option(None, "--student", help="Student model directory (a distill run)."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Report directory."),
    config: Optional[str] = typer.Option(None, "--config", help="Config file for data and eval settings."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Step sweep (teacher Euler and Heun, student Euler; 1-32 steps, same noise) with metrics.json, report.md, PNGs."""
    from .config import load_config
    from .models.builtin import load_model
    from .workflows import evaluate_models, resolve_config_path

    _threads()
    try:
        base = load_config(resolve_config_path(config)) if config else None
        source = load_model(teacher).info.data.get("name", "")
        cfg = load_config(resolve_config_path(config) if config else None,
                          ([] if base else [f"data.source={source}"]) + list(overrides or []))
        report = evaluate_models(cfg, teacher, student, out)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        _fail(exc)
    console.print(report.markdown)
    console.print(f"report: [bold]{out / 'report.md'}[/]")


@app.command()
def sample(
    model: Path = typer.Argument(..., help="Model directory (a training run or its model/)."),
    steps: int = typer.Option(3, "--steps", help="Euler steps."),
    num: int = typer.Option(64, "--num", help="Number of samples."),
    shift: float = typer.Option(1.0, "--shift", help="Sampling-grid shift (1 = uniform)."),
    label: Optional[int] = typer.Option(None, "--label", help="Class label (default: classes in turn)."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("samples.npz"), "--out", help="Output .npz (x in data space, y labels); a .png beside it."),
) -> None:
    """Sample a built-in model with N Euler steps; writes the samples (data space) and a picture."""
    from .sampling import sample_builtin

    _threads()
    try:
        written = sample_builtin(model, steps=steps, num=num, shift=shift, label=label, seed=seed, out=out)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
def demo(
    data: str = typer.Option("digits", "--data", help="digits, a toy (checkerboard, 8gaussians, moons, spirals, rings) or a .npz file."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output directory."),
    teacher_steps: int = typer.Option(8000, "--teacher-steps", help="Flow-matching steps when no bundled teacher exists."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP + " Applied to the distillation."),
) -> None:
    """The whole story on the CPU: teacher, SCFM student, step sweep, report and figures."""
    from .workflows import run_demo

    _threads()
    try:
        result = run_demo(data, out, overrides or [], teacher_steps=teacher_steps)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        _fail(exc)
    console.print(result.report.markdown)
    console.print(f"report: [bold]{result.report.out_dir / 'report.md'}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
