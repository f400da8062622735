"""Benchmark settings and the FLUX.1-dev transformer configuration (no torch import: the parent process of
``bench_scfm_step.py`` never touches the GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json), 11.9 B parameters.
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: the tiny Flux of tests/diffusers_fixtures.py (CPU tests)
TINY_FLUX_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
VAE_FACTOR = 8  # pixels per latent cell (Flux VAE)


@dataclass
class BenchSettings:
    """One benchmark configuration (the CLI fills it; ``--tiny`` changes the defaults, see ``for_size``)."""

    tiny: bool = False
    num_layers: int | None = None  # double blocks; None = the config's
    num_single_layers: int | None = None  # single blocks; None = the config's
    batch: int = 8
    resolution: int = 512  # training image side in pixels (latent side = resolution / 8)
    text_length: int = 512  # text tokens of prompt_embeds
    rank: int = 64  # LoRA rank (alpha = rank)
    gradient_checkpointing: bool = True
    attention: str = "default"  # SDPA backend forced with sdpa_kernel: default | efficient | math | flash
    dtype: str = "bfloat16"  # base weights
    mixed_precision: str = "bf16"  # autocast of the student forward, as the trainer with flux.yaml ("no" = off)
    device: str = "cuda"
    lr: float = 2e-5
    grad_clip: float = 10.0
    warmup: int = 2
    steps: int = 5
    sample_resolutions: tuple[int, ...] = (512, 1024)
    sample_steps: int = 3
    sample_repeats: int = 5
    seed: int = 0
    lora_init: str = "standard"  # standard: LoRA B = 0, EMAs = student; perturbed: B != 0, EMAs differ
    transformer_config: dict = field(default_factory=dict)  # filled by for_size

    def __post_init__(self) -> None:
        self.sample_resolutions = tuple(int(r) for r in self.sample_resolutions)
        choices = {"attention": ("default", "efficient", "math", "flash"), "dtype": ("bfloat16", "float32"),
                   "mixed_precision": ("bf16", "no"), "lora_init": ("standard", "perturbed")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch", "rank", "text_length", "steps", "sample_steps", "sample_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    @classmethod
    def for_size(cls, tiny: bool, **overrides) -> "BenchSettings":
        values = dict(tiny=tiny)
        if tiny:
            values.update(batch=2, resolution=64, text_length=6, rank=4, dtype="float32", mixed_precision="no",
                          device="cpu", warmup=1, steps=2, sample_resolutions=(64, 128), sample_repeats=2)
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = dict(TINY_FLUX_CONFIG if tiny else FLUX_DEV_CONFIG)
        for key in ("num_layers", "num_single_layers"):
            if values.get(key) is not None:
                config[key] = int(values[key])
        values["transformer_config"] = config
        return cls(**values)

    @property
    def latent_channels(self) -> int:
        return self.transformer_config["in_channels"] // 4  # Flux packs 2x2 latent cells per token

    def latent_side(self, resolution: int | None = None) -> int:
        side = (resolution or self.resolution) // VAE_FACTOR
        if side < 2 or side % 2:
            raise ValueError(f"resolution {resolution or self.resolution} must be a multiple of 16")
        return side
