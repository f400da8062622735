"""Sampling a trained built-in model to files (the ``shortcutfm sample`` command)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .core.grids import sigma_grid
from .core.samplers import euler_sample
from .data import Normalization
from .models.builtin import load_model
from .training.builtin import guidance_wrap


def sample_builtin(
    model_dir: Path, *, steps: int, num: int, shift: float = 1.0, label: int | None = None, seed: int = 0, out: Path
) -> list[Path]:
    """Draw ``num`` samples with ``steps`` Euler steps; save ``x`` (data space) and ``y`` to ``out`` (.npz) and a PNG."""
    if steps < 1 or num < 1:
        raise ValueError("--steps and --num must be >= 1")
    loaded = load_model(model_dir)
    info = loaded.info
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *info.sample_shape), generator=generator)
    cond = {}
    if info.num_classes:
        if label is not None and not 0 <= label < info.num_classes:
            raise ValueError(f"--label must be in [0, {info.num_classes - 1}], got {label}")
        cond["y"] = torch.full((num,), label) if label is not None else torch.arange(num) % info.num_classes
    velocity = guidance_wrap(info.num_classes, float(info.model.get("guidance_scale", 0.0)))(loaded.module)
    x = euler_sample(velocity, noise, sigma_grid(steps, shift), **cond).x
    x = Normalization.from_dict(info.data["normalization"]).to_data_space(x)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x.numpy()}
    if "y" in cond:
        arrays["y"] = cond["y"].numpy()
    np.savez(out, **arrays)
    picture = out.with_suffix(".png")
    _save_picture(x, info.data.get("kind", "vector"), picture, f"{steps} Euler step{'s' if steps > 1 else ''}")
    return [out, picture]


def _save_picture(x: torch.Tensor, kind: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if kind == "image":
        n, c, h, w = x.shape
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        low, high = x.min().item(), x.max().item()
        canvas = np.zeros((rows * h, cols * w, c))
        for i in range(n):
            r, q = divmod(i, cols)
            canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = ((x[i] - low) / max(high - low, 1e-8)).permute(1, 2, 0).numpy()
        ax.imshow(canvas[..., 0] if c == 1 else canvas[..., :3], cmap="gray" if c == 1 else None)
    else:
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy() if x.shape[1] > 1 else np.zeros(len(x)), s=2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
