"""Sampling a trained built-in model to files (the ``shortcutfm sample`` command)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .core.calibration import for_steps
from .core.grids import sigma_grid
from .core.samplers import euler_sample
from .data import Normalization
from .models.builtin import load_model
from .training.builtin import deployed_velocity


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
    velocity = for_steps(deployed_velocity(loaded), steps)  # a calibrated student: this step count's scale
    x = euler_sample(velocity, noise, sigma_grid(steps, shift), **cond).x
    x = Normalization.from_dict(info.data.normalization).to_data_space(x)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"x": x.numpy()}
    if "y" in cond:
        arrays["y"] = cond["y"].numpy()
    np.savez(out, **arrays)
    picture = out.with_suffix(".png")
    _save_picture(x, info.data.kind, picture, f"{steps} Euler step{'s' if steps > 1 else ''}")
    return [out, picture]


def _save_picture(x: torch.Tensor, kind: str, path: Path, title: str) -> None:
    from .evaluation.report import draw_image_grid  # imported first: it selects the Agg backend

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    if kind == "image":
        draw_image_grid(ax, x, x.min().item(), x.max().item())
    else:
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy() if x.shape[1] > 1 else np.zeros(len(x)), s=2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- diffusers pipelines with an SCFM LoRA

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def find_lora_dir(path: Path) -> Path | None:
    """The directory holding the exported LoRA: ``path`` itself or a run's ``model/``; None for built-in models."""
    for candidate in (Path(path), Path(path) / "model"):
        if (candidate / LORA_WEIGHTS).is_file():
            return candidate
    return None


def absent_components(pretrained: str) -> dict:
    """``{name: None}`` for the components a local pipeline folder records as absent (``[null, null]`` in its
    model_index.json, e.g. SD3 without T5): ``from_pretrained`` must be told so, or it refuses the folder."""
    import json

    index = Path(pretrained) / "model_index.json"
    if not index.is_file():
        return {}
    return {name: None for name, value in json.loads(index.read_text()).items()
            if isinstance(value, list) and value == [None, None]}


def load_pipeline(pretrained: str, dtype: str = "bfloat16", device: torch.device | str | None = None):
    """A diffusers pipeline on the GPU when there is one (bf16), else on the CPU in float32; ``device`` picks one
    (a multi-process run: this process's GPU)."""
    from diffusers import DiffusionPipeline

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if device.type == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(pretrained, torch_dtype=torch_dtype, **absent_components(pretrained))
    return pipe.to(device)


def _cache_layout(source: str | None) -> dict | None:
    """The layout (height, width, max_sequence_length, and ``latent_shape``) of the prepared cache a run trained on,
    if readable."""
    from .preparation.cache import CacheError, read_manifest

    if not source:
        return None
    try:
        manifest = read_manifest(Path(source))
    except CacheError:
        return None
    return {**manifest["layout"], "latent_shape": tuple(manifest["tensors"]["latents"]["shape"])}


#: frames per second of the animated GIFs ``shortcutfm sample`` writes for video models (Wan's 16 fps)
VIDEO_FPS = 16


def _save_sample(sample, path: Path) -> Path:
    """One pipeline output: a PIL image as PNG; a video (a list of PIL frames) as an animated GIF (one frame: PNG)."""
    if isinstance(sample, (list, tuple)):
        if len(sample) > 1:
            path = path.with_suffix(".gif")
            sample[0].save(path, save_all=True, append_images=list(sample[1:]), duration=1000 // VIDEO_FPS, loop=0)
            return path
        sample = sample[0]
    sample.save(path)
    return path


def sample_diffusers(
    lora_dir: Path, *, pretrained: str | None, prompts: list[str], steps: int, shift: float | None,
    lora_scale: float | None, seed: int, out: Path, height: int | None = None, width: int | None = None,
) -> list[Path]:
    """Generate images with the stock pipeline plus the exported SCFM LoRA; one PNG per prompt (video models: an
    animated GIF, or a PNG for one-frame videos). ``lora_scale=None``: the LoRA's calibrated scale for ``steps``
    (its calibration.json), or 1 for an uncalibrated LoRA."""
    import yaml

    from .models.diffusers import family_of_pipeline, fuse_lora, sample_with_pipeline
    from .models.diffusers.export import read_calibration

    config_path = lora_dir.parent / "config.yaml"  # the run's config, beside model/, final/ and best/
    run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    if pretrained is None:
        if not run_config:
            raise FileNotFoundError(f"no --pipeline given and no {config_path} to read model.pretrained from")
        pretrained = run_config["model"]["pretrained"]
    # Sample as the LoRA was trained: the run's guidance scale and, while its cache exists, its resolution and
    # text length (otherwise the pipeline's defaults).
    model_config = run_config.get("model") or {}
    # a student with the guidance folded in samples one plain pass per step
    guidance = 0.0 if model_config.get("fold_guidance") else model_config.get("guidance_scale")
    layout = _cache_layout((run_config.get("data") or {}).get("source"))
    extra = {"max_sequence_length": layout["max_sequence_length"]} if layout else {}
    pipe = load_pipeline(pretrained)
    if lora_scale is None:
        calibration = read_calibration(lora_dir)
        lora_scale = calibration.scale_for(steps) if calibration is not None else 1.0
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS, adapter_name="scfm")
    fuse_lora(pipe, "scfm", lora_scale)  # N steps cost N base passes
    codec = family_of_pipeline(pipe).latents
    default_height, default_width = codec.default_size(pipe)
    height = height or (layout["height"] if layout else default_height)
    width = width or (layout["width"] if layout else default_width)
    if layout:  # the other size arguments of the trained latents (Wan: num_frames)
        sizes = codec.pipeline_size(pipe, layout["latent_shape"])
        extra.update({name: value for name, value in sizes.items() if name not in ("height", "width")})
    generator = torch.Generator("cpu").manual_seed(seed)
    images = sample_with_pipeline(
        pipe, prompts, num_steps=steps, shift=shift, lora_scale=1.0, guidance=guidance,  # the scale is fused in
        generator=generator, height=height, width=width, output_type="pil", **extra,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i:03d}{out.suffix or '.png'}")
        written.append(_save_sample(image, path))
    return written
