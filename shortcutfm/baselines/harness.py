"""``shortcutfm bench``: SCFM against training-free solvers and other few-step methods, at equal budget.

Every method starts from the same bundled teacher and gets the same optimizer (AdamW, constant learning rate,
gradient clipping 1), the same number of optimizer steps and batch size, the same data, the same learning-rate
search (each rate of ``Budget.lrs``, the best kept) and the same checkpoint selection: every ``eval_every`` steps
the **selection score**, the mean over NFE 1, 2, 4 and 8 of the primary metric divided by the teacher's Euler
figure at that NFE (scale-free, so no step count dominates), on selection noise distinct from the sweep's.
The final sweep scores each method's selected checkpoint with its own sampler at 1, 2, 4 and 8 NFE, and the
teacher's solvers at 1 to 32 NFE, all from the same noise, on the uniform grid (shift 1).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_json_atomic, write_text_atomic
from ..core.grids import sigma_grid
from ..core.samplers import euler_sample
from ..data import DataSplit, load_dataset
from ..evaluation.judge import Judge, SampleSet
from ..models.builtin import load_model
from .base import FewStepMethod
from .solvers import DIFFUSERS, SOLVERS, solve, solver_steps

__all__ = ["Budget", "BUDGETS", "METHODS", "METHOD_NFE", "SOLVER_NFE", "build_method", "fit", "run_bench"]

METHODS = ("scfm", "progressive", "consistency", "reflow", "shortcut", "meanflow")
METHOD_NFE = (1, 2, 4, 8)
SOLVER_NFE = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Budget:
    """What every method gets on one data set."""

    steps: int  # optimizer steps per training run
    batch_size: int
    lrs: tuple[float, ...]  # the learning-rate search: one run per rate, the best selection score kept
    eval_every: int  # steps between selection scores
    eval_samples: int  # samples per NFE of a selection score
    sweep_samples: int  # samples per row of the final sweep
    reflow_pairs: int  # teacher (noise, sample) pairs that reflow trains on
    grad_clip: float = 1.0
    seed: int = 0
    reference_samples: int | None = None  # held-out samples the metric compares with (None: all of them)


BUDGETS = {
    # sized so that `shortcutfm bench --data NAME` ends within 45 minutes on a 2-core CPU (two workers)
    "checkerboard": Budget(steps=1000, batch_size=256, lrs=(1e-4, 3e-4), eval_every=200, eval_samples=2000,
                           sweep_samples=10_000, reflow_pairs=20_000),
    "digits": Budget(steps=800, batch_size=128, lrs=(1e-4, 3e-4), eval_every=200, eval_samples=1000,
                     sweep_samples=2000, reflow_pairs=4000),
    "quick": Budget(steps=6, batch_size=32, lrs=(1e-4, 3e-4), eval_every=3, eval_samples=64, sweep_samples=128,
                    reflow_pairs=64, reference_samples=256),
}


def build_method(name: str, teacher: torch.nn.Module, split: DataSplit, budget: Budget) -> FewStepMethod:
    from .consistency import ConsistencyDistillation
    from .meanflow import MeanFlow
    from .progressive import ProgressiveDistillation
    from .reflow import Reflow
    from .scfm import SCFM
    from .shortcut import ShortcutModel

    if name == "scfm":
        return SCFM(teacher)
    if name == "progressive":
        return ProgressiveDistillation(teacher, total_steps=budget.steps)
    if name == "consistency":
        return ConsistencyDistillation(teacher)
    if name == "reflow":
        return Reflow(teacher, split.train.sample_shape, split.train.num_classes, budget.reflow_pairs,
                      torch.Generator().manual_seed(budget.seed + 7))
    if name == "shortcut":
        return ShortcutModel(teacher)
    if name == "meanflow":
        return MeanFlow(teacher)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


class Selection:
    """The selection score of a method (lower is better): mean over NFE of primary / teacher Euler's primary."""

    def __init__(self, judge: Judge, teacher, samples: SampleSet, seed: int):
        self.judge, self.samples, self.seed = judge, samples, seed
        self.teacher_values = {n: self._score(self._euler(teacher, n)) for n in METHOD_NFE}

    def _euler(self, model, n: int) -> torch.Tensor:
        return euler_sample(model, self.samples.noise, sigma_grid(n, 1.0), **self.samples.cond()).x

    def _score(self, x: torch.Tensor) -> float:
        return self.judge.score(x, primary_only=True)[self.judge.primary]

    def __call__(self, method: FewStepMethod) -> float:
        ratios = []
        for n in METHOD_NFE:
            x = method.sample(self.samples.noise, n, self.samples.cond(), torch.Generator().manual_seed(self.seed + n))
            ratios.append(self._score(x) / self.teacher_values[n])
        return float(sum(ratios) / len(ratios))


@dataclass
class FitResult:
    method: str
    lr: float
    best_step: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0  # optimizer steps only (evaluation excluded); reflow's pair sampling is separate
    setup_seconds: float = 0.0
    state: dict | None = None

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, self.history[-1]["step"] if self.history else 1)


def fit(name: str, lr: float, teacher, split: DataSplit, selection: Callable[[FewStepMethod], float],
        budget: Budget, progress: bool = False) -> FitResult:
    """Train method ``name`` at learning rate ``lr`` for ``budget.steps``; keep the best-scoring state."""
    from tqdm.auto import tqdm

    torch.manual_seed(budget.seed)
    started = time.perf_counter()
    method = build_method(name, teacher, split, budget)
    result = FitResult(name, lr, 0, math.inf, setup_seconds=time.perf_counter() - started)
    params = method.parameters()
    optimizer = torch.optim.AdamW(params, lr=lr)
    train = split.train
    for step in tqdm(range(1, budget.steps + 1), desc=f"{name} lr {lr:g}", disable=not progress, dynamic_ncols=True):
        tick = time.perf_counter()
        generator = torch.Generator().manual_seed((budget.seed * 1_000_003 + step) * 1_009)
        index = torch.randint(len(train), (budget.batch_size,), generator=generator)
        x0 = train.x[index]
        cond = {} if train.y is None else {"y": train.y[index]}
        noise = torch.randn(x0.shape, generator=generator)
        loss = method.loss(x0, noise, cond, generator, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"bench {name} at lr {lr:g}: non-finite loss at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, budget.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(step)
        result.train_seconds += time.perf_counter() - tick
        if step % budget.eval_every == 0 or step == budget.steps:
            score = selection(method)
            result.history.append({"step": step, "score": score, "loss": float(loss.detach())})
            if score < result.best_score:
                result.best_score, result.best_step, result.state = score, step, method.state_dict()
    return result


# ---------------------------------------------------------------- the bench


@dataclass
class BenchContext:
    data: str
    split: DataSplit
    teacher: torch.nn.Module
    judge: Judge
    budget: Budget


def bench_context(data: str, budget: Budget, cache_dir: Path) -> BenchContext:
    from ..workflows import bundled_teacher

    teacher_dir = bundled_teacher(data)
    if teacher_dir is None:
        raise ValueError(f"--data {data}: the bench runs on data with a bundled teacher (checkerboard, digits)")
    split = load_dataset(data, seed=0, num_toy_samples=20_000 if budget.reference_samples else 100_000)
    if budget.reference_samples:
        keep = torch.randperm(len(split.holdout), generator=torch.Generator().manual_seed(0))[:budget.reference_samples]
        holdout = split.holdout
        split = DataSplit(split.train, replace(holdout, x=holdout.x[keep], y=None if holdout.y is None else holdout.y[keep]))
    teacher = load_model(teacher_dir).module.eval().requires_grad_(False)
    judge = Judge.for_data(split.train, split.holdout, cache_dir / "classifiers", seed=1234)
    return BenchContext(data, split, teacher, judge, budget)


SELECTION_SEED = 4321  # the selection noise; the sweep's is 1234


def _selection(context: BenchContext) -> Selection:
    samples = SampleSet.draw(context.split.holdout, context.budget.eval_samples, seed=SELECTION_SEED)
    return Selection(context.judge, context.teacher, samples, SELECTION_SEED)


def _fit_job(args) -> FitResult:
    """One training run in a worker process: its own data, teacher and judge (nothing shared across processes)."""
    data, name, lr, budget, cache_dir = args
    torch.set_num_threads(1)
    context = bench_context(data, budget, Path(cache_dir))
    return fit(name, lr, context.teacher, context.split, _selection(context), budget)


def run_bench(data: str, out_dir: Path, *, methods: tuple[str, ...] = METHODS, solvers: tuple[str, ...] = SOLVERS,
              budget: Budget | None = None, workers: int = 1, cache_dir: Path | None = None,
              progress: bool = True) -> dict:
    """Train every method with the learning-rate search, sweep them and the teacher's solvers, write the report."""
    from tqdm.auto import tqdm

    from ..workflows import cache_dir as default_cache

    budget = budget or BUDGETS[data]
    cache_dir = Path(cache_dir or default_cache())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    started = time.perf_counter()
    context = bench_context(data, budget, cache_dir)  # also trains/caches the judge's classifier once
    jobs = [(data, name, lr, budget, str(cache_dir)) for name in methods for lr in budget.lrs]
    if workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            fits = list(tqdm(pool.map(_fit_job, jobs), total=len(jobs), desc="training", disable=not progress))
    else:  # in this process: the context and the teacher's selection figures serve every run
        selection = _selection(context)
        fits = [fit(name, lr, context.teacher, context.split, selection, budget)
                for _, name, lr, _, _ in tqdm(jobs, desc="training", disable=not progress)]
    best = {}
    for result in fits:
        if result.method not in best or result.best_score < best[result.method].best_score:
            best[result.method] = result

    samples = SampleSet.draw(context.split.holdout, budget.sweep_samples, seed=1234)
    rows = [{"method": "data", "model": "data", "sampler": "-", "steps": 0, "nfe": 0, "metric": metric, "value": value}
            for metric, value in context.judge.floor(context.split.train).items()]
    solvers = tuple(s for s in solvers if s not in DIFFUSERS or _has_diffusers())
    for solver in tqdm(solvers, desc="solvers", disable=not progress):
        done = set()
        for nfe in SOLVER_NFE:
            steps = solver_steps(solver, nfe)
            if steps is None or steps in done:
                continue
            done.add(steps)
            x, used = solve(solver, context.teacher, samples.noise, steps, samples.cond())
            rows += _score_rows(context.judge, x, samples, f"teacher-{solver}", "teacher", solver, steps, used)
    for name, result in tqdm(best.items(), desc="methods", disable=not progress):
        method = build_method(name, context.teacher, context.split, budget)
        method.load_state_dict(result.state)
        for nfe in METHOD_NFE:
            x = method.sample(samples.noise, nfe, samples.cond(), torch.Generator().manual_seed(1234 + nfe))
            rows += _score_rows(context.judge, x, samples, name, "student", name, nfe, nfe)
    training = {name: {"lr": r.lr, "best_step": r.best_step, "selection_score": r.best_score,
                       "seconds_per_step": r.seconds_per_step, "setup_seconds": r.setup_seconds,
                       "runs": [{"lr": f.lr, "best_score": f.best_score, "history": f.history}
                                for f in fits if f.method == name]}
                for name, r in best.items()}
    summary = {"data": data, "budget": asdict(budget), "primary": context.judge.primary, "rows": rows,
               "training": training, "seconds": time.perf_counter() - started}
    write_json_atomic(out_dir / "metrics.json", summary)
    figure = plot_bench(rows, context.judge.primary, out_dir / f"{data}_{context.judge.primary}_vs_nfe.png")
    write_text_atomic(out_dir / "report.md", report_markdown(summary, figure))
    return summary


def _has_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _score_rows(judge, x, samples, method, model, sampler, steps, nfe) -> list[dict]:
    return [{"method": method, "model": model, "sampler": sampler, "steps": steps, "nfe": nfe, "metric": metric,
             "value": value} for metric, value in judge.score(x, samples.labels).items()]


def plot_bench(rows: list[dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["metric"] == metric and row["method"] != "data":
            series.setdefault(row["method"], []).append(row)
    positive = all(r["value"] > 0 for points in series.values() for r in points)
    for index, (name, points) in enumerate(sorted(series.items(), key=lambda item: item[0].startswith("teacher"))):
        points.sort(key=lambda r: r["nfe"])
        style = "--" if name.startswith("teacher") else "-"
        ax.plot([p["nfe"] for p in points], [p["value"] for p in points], style, marker="o", ms=3, color=f"C{index % 10}",
                label=name, lw=2.2 if name == "scfm" else 1.2)
    floor = [r["value"] for r in rows if r["metric"] == metric and r["method"] == "data"]
    if floor and floor[0] > 0:
        ax.axhline(floor[0], color="grey", lw=1, ls=":", label=f"data floor ({floor[0]:.3g})")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["nfe"] for points in series.values() for r in points if r["nfe"] & (r["nfe"] - 1) == 0})
    ax.set_xticks(ticks, [str(t) for t in ticks])  # powers of two (Heun's odd NFEs sit between them)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_markdown(summary: dict, figure: Path) -> str:
    metric, rows, budget = summary["primary"], summary["rows"], summary["budget"]
    methods = [m for m in METHODS if m in summary["training"]]
    solvers = sorted({r["method"] for r in rows if r["method"].startswith("teacher-")})
    nfes = sorted({r["nfe"] for r in rows if r["method"] != "data"})

    def value(method, nfe):
        found = [r["value"] for r in rows if r["method"] == method and r["nfe"] == nfe and r["metric"] == metric]
        return f"{found[0]:.4g}" if found else ""

    lines = [f"# shortcutfm bench: {summary['data']}", "",
             f"Metric: `{metric}` (lower is better) of {budget['sweep_samples']} samples against the held-out split; "
             f"every row from the same noise, uniform grid (shift 1).", "",
             f"Budget per training run: {budget['steps']} optimizer steps at batch {budget['batch_size']}, AdamW with a "
             f"constant learning rate, gradient clipping {budget['grad_clip']}; learning-rate search over "
             f"{', '.join(f'{lr:g}' for lr in budget['lrs'])} for every method; the checkpoint kept is the best "
             f"selection score (mean over NFE 1/2/4/8 of the metric divided by the teacher's Euler value there, "
             f"{budget['eval_samples']} selection samples, every {budget['eval_every']} steps). Reflow trains on "
             f"{budget['reflow_pairs']} teacher pairs (32 Euler steps each, counted in its set-up time).", "",
             "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for name in solvers + methods:
        lines.append(f"| {name} | " + " | ".join(value(name, n) for n in nfes) + " |")
    floor = [r["value"] for r in rows if r["method"] == "data" and r["metric"] == metric]
    if floor:
        lines += ["", f"Data-against-data floor: {floor[0]:.4g}."]
    lines += ["", "| method | learning rate | best step | selection score | s / training step | set-up s |",
              "|---|---|---|---|---|---|"]
    for name in methods:
        info = summary["training"][name]
        lines.append(f"| {name} | {info['lr']:g} | {info['best_step']} | {info['selection_score']:.3g} | "
                     f"{info['seconds_per_step']:.3f} | {info['setup_seconds']:.1f} |")
    lines += ["", f"![{metric} against NFE]({figure.name})", "",
              f"Wall time: {summary['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))

