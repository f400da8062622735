"""Writes a sweep's outputs: ``metrics.json``, ``report.md`` and PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..data import ArrayDataset  # noqa: E402
from .sweep import MetricRow, SweepSamples  # noqa: E402

LOWER_IS_BETTER = {"energy_distance", "sliced_wasserstein2", "frechet_distance", "fd_data", "fd_teacher", "fid_teacher",
                   "fid_reference", "seconds_per_image"}


def shift_text(shift: float | str) -> str:
    """A grid shift as a table cell: a number, or "dynamic" (Flux's resolution-dependent shift)."""
    return shift if isinstance(shift, str) else f"{shift:g}"


def write_metrics(rows: list[MetricRow], path: Path, extra: dict | None = None) -> None:
    path.write_text(json.dumps({"rows": [r.to_dict() for r in rows], **(extra or {})}, indent=2))


def plot_metric_vs_steps(rows: list[MetricRow], out_dir: Path) -> list[Path]:
    """One figure per metric: value against steps (log-log), colour per model/sampler, line style per shift,
    and the data-against-data floor as a dotted line (or in the legend when it is not positive)."""
    paths = []
    styles = ["-", "--", ":", "-."]
    for metric in sorted({r.metric for r in rows}):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        series: dict[tuple, list[MetricRow]] = {}
        for r in rows:
            if r.metric == metric and r.model != "data":
                series.setdefault((r.model, r.sampler, r.shift), []).append(r)
        curves = sorted({(model, sampler) for model, sampler, _ in series}, key=lambda c: (c[0] != "teacher", c))
        shifts = sorted({shift for _, _, shift in series}, key=str)
        positive = all(p.value > 0 for points in series.values() for p in points)
        for (model, sampler, shift), points in sorted(series.items()):
            points.sort(key=lambda r: r.steps)
            ax.plot([p.steps for p in points], [p.value for p in points], styles[shifts.index(shift) % 4], marker="o",
                    ms=3, color=f"C{curves.index((model, sampler))}", label=f"{model} {sampler}, shift {shift_text(shift)}")
        for r in rows:
            if r.metric == metric and r.model == "data":
                if r.value > 0 or not positive:
                    ax.axhline(r.value, color="grey", lw=1, ls=":", label=f"data floor ({r.value:.3g})")
                else:
                    ax.plot([], [], " ", label=f"data floor {r.value:.2g} (not positive: off the log axis)")
        steps = sorted({r.steps for r in rows if r.model != "data"})
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(n) for n in steps])
        if metric in LOWER_IS_BETTER and positive:
            ax.set_yscale("log")
        ax.set_xlabel("sampling steps (Euler: NFE = steps; Heun: NFE = 2 steps - 1)")
        ax.set_ylabel(metric.replace("_", " "))
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{metric.replace('_', ' ')} against steps ({better} is better)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_steps.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_samples(kept: SweepSamples, dataset: ArrayDataset, out_dir: Path, max_images: int = 100) -> Path:
    """Held-out data, then one panel per kept (model, sampler, steps, shift): image grids, or scatter plots of
    the first two coordinates on shared axes."""
    keys = sorted(kept.by_key, key=lambda k: (k[0] != "teacher", -k[2], k[1], k[3]))
    panels = [("held-out data", dataset.to_data_space(dataset.x))]
    panels += [(f"{m} {s}, {n} step{'s' if n > 1 else ''}", dataset.to_data_space(kept.by_key[(m, s, n, h)]))
               for m, s, n, h in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    if dataset.kind != "image":
        reference = panels[0][1][:, :2]
        low, high = torch.quantile(reference, 0.005, dim=0), torch.quantile(reference, 0.995, dim=0)
        margin = 0.15 * (high - low)
        low, high = (low - margin).tolist(), (high + margin).tolist()
    for ax, (title, x) in zip(axes[0], panels):
        if dataset.kind == "image":
            is_data = title == "held-out data" and dataset.y is not None
            _show_image_grid(ax, x[_classes_in_turn(dataset.y, max_images)] if is_data else x[:max_images], dataset)
        else:
            points = x[:, :2].numpy()
            ax.scatter(points[:, 0], points[:, 1], s=0.3, alpha=0.4, rasterized=True)
            ax.set_xlim(low[0], high[0])
            ax.set_ylim(low[1], high[1])
            ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = out_dir / "samples.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _classes_in_turn(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices whose labels run 0, 1, ..., K-1, 0, 1, ... like the evaluation's class-conditional samples."""
    num_classes = int(labels.max()) + 1
    by_class = [torch.nonzero(labels == k).flatten() for k in range(num_classes)]
    picks = [by_class[i % num_classes][(i // num_classes) % len(by_class[i % num_classes])]
             for i in range(count) if len(by_class[i % num_classes])]
    return torch.stack(picks)


def _show_image_grid(ax, images: torch.Tensor, dataset: ArrayDataset) -> None:
    if dataset.normalization.mode == "range":
        low, high = dataset.to_data_space(torch.tensor([-1.0, 1.0])).tolist()
    else:
        low, high = images.min().item(), images.max().item()
    draw_image_grid(ax, images, low, high)


def draw_image_grid(ax, images: torch.Tensor, low: float, high: float) -> None:
    """Images (N, C, H, W) tiled in a near-square grid, values ``[low, high]`` shown black to white."""
    n = images.shape[0]
    cols = int(n ** 0.5 + 0.999)
    rows = (n + cols - 1) // cols
    c, h, w = images.shape[1:]
    canvas = torch.full((c, rows * (h + 1), cols * (w + 1)), low)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, r * (h + 1): r * (h + 1) + h, q * (w + 1): q * (w + 1) + w] = images[i]
    canvas = ((canvas - low) / max(high - low, 1e-8)).clamp(0, 1)
    if c == 1:
        ax.imshow(canvas[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(canvas[:3].permute(1, 2, 0).numpy())


def markdown_table(rows: list[MetricRow], metrics: list[str]) -> str:
    """Wide table: one line per (model, sampler, steps, shift), one column per metric."""
    lines = {}
    for r in rows:
        lines.setdefault((r.model, r.sampler, r.steps, r.nfe, r.shift), {})[r.metric] = r.value
    header = "| model | sampler | steps | NFE | shift | " + " | ".join(m.replace("_", " ") for m in metrics) + " |"
    out = [header, "|" + "---|" * (5 + len(metrics))]
    for (model, sampler, steps, nfe, shift), values in lines.items():
        cells = [f"{values[m]:.4g}" if m in values else "" for m in metrics]
        step_cell = "-" if model == "data" else str(steps)
        nfe_cell = "-" if model == "data" else str(nfe)
        shift_cell = "-" if model == "data" else shift_text(shift)
        out.append(f"| {model} | {sampler} | {step_cell} | {nfe_cell} | {shift_cell} | " + " | ".join(cells) + " |")
    return "\n".join(out)
