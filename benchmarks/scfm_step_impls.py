"""The two SCFM training steps that ``bench_scfm_step.py`` times, on a FLUX-shaped transformer with random weights.

* :class:`OursStep`: the library as the trainer drives it: :class:`LoraStudent` (teacher = adapters off, EMAs as
  non-trainable adapters), ``sample_jumps`` + ``scfm_targets`` (first sub-step per row group) + ``scfm_loss``,
  AdamW, ``student.emas.update``.
* :class:`ReferenceStep`: the authors' scripts' structure: one LoRA adapter; each EMA target pass copies the EMA
  tensors into the live LoRA weights in place and restores them afterwards (store / copy_to / restore); the
  teacher (adapters disabled) and fast-EMA first sub-steps each run on the whole batch and rows are picked
  afterwards; then the slow-EMA pass, the student forward/backward, AdamW and the EMA updates.

Both draw the same per-step randomness (:func:`step_inputs`) and start from the same LoRA weights
(:func:`init_lora_`), so for one seed they compute the same loss and the same update up to float rounding.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

from shortcutfm.core import EMASchedule, JumpBatch, euler_sample, sample_jumps, scfm_loss, scfm_targets
from shortcutfm.core.jumps import FLOW, TEACHER
from shortcutfm.core.velocity import expand_like, interpolate
from shortcutfm.models.diffusers import FLUX, LoraSettings, LoraStudent, adapter_tensors, sampling_grid

from bench_settings import BenchSettings

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def sdpa_context(name: str):
    """``sdpa_kernel`` forcing one attention backend, or a no-op for "default"."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    if name == "default":
        return nullcontext()
    if name not in backends:
        raise ValueError(f"attention must be default, efficient, math or flash, got {name!r}")
    return sdpa_kernel(backends[name])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_transformer(settings: BenchSettings) -> torch.nn.Module:
    """The Flux transformer of ``settings.transformer_config`` with seeded random weights, built on the device
    in the base dtype (no float32 copy of 12 B parameters, no checkpoint)."""
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    previous = torch.get_default_dtype()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), device:
        torch.manual_seed(settings.seed)
        torch.set_default_dtype(dtype)
        try:
            transformer = FluxTransformer2DModel(**settings.transformer_config)
        finally:
            torch.set_default_dtype(previous)
    return transformer.eval().requires_grad_(False)


@torch.no_grad()
def init_lora_(live: dict, fast: dict, slow: dict, seed: int, mode: str) -> None:
    """Write the same starting LoRA weights into any implementation's tensors (keys without adapter name).

    standard: A ~ U(+-1/sqrt(fan_in)) (peft's default scale), B = 0, both EMAs = student (docs/method.md).
    perturbed: B ~ N(0, 0.05^2) and each EMA = student + its own N(0, 0.02^2) noise, so teacher, student and
    both EMAs all differ (a test that an implementation used the right weights in every pass).
    """
    if mode not in ("standard", "perturbed"):
        raise ValueError(f"lora_init must be standard or perturbed, got {mode!r}")
    device = next(iter(live.values())).device
    generator = torch.Generator(device=device).manual_seed(seed + 12345)

    def draw(shape):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    for name in sorted(live):
        tensor = live[name]
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(tensor.shape[1])
            value = (torch.rand(tensor.shape, generator=generator, device=device) * 2 - 1) * bound
        elif mode == "perturbed":
            value = 0.05 * draw(tensor.shape)
        else:
            value = torch.zeros(tensor.shape, device=device)
        tensor.copy_(value)
        for ema in (fast, slow):
            ema[name].copy_(value + 0.02 * draw(tensor.shape) if mode == "perturbed" else value)


@dataclass
class FixedBatch:
    """One cached batch (as from a latent cache): x0 latents and text embeddings, on the device."""

    x0: torch.Tensor  # (B, C, H, W)
    cond: dict  # prompt_embeds (B, L, D), pooled_prompt_embeds (B, P)


def fixed_batch(settings: BenchSettings, batch: int | None = None, resolution: int | None = None) -> FixedBatch:
    batch = batch or settings.batch
    side = settings.latent_side(resolution)
    config, device = settings.transformer_config, torch.device(settings.device)
    generator = torch.Generator(device=device).manual_seed(settings.seed + 1)
    x0 = torch.randn(batch, settings.latent_channels, side, side, generator=generator, device=device)
    cond = {
        "prompt_embeds": torch.randn(batch, settings.text_length, config["joint_attention_dim"], generator=generator,
                                     device=device, dtype=DTYPES[settings.dtype]),
        "pooled_prompt_embeds": torch.randn(batch, config["pooled_projection_dim"], generator=generator,
                                            device=device, dtype=DTYPES[settings.dtype]),
    }
    return FixedBatch(x0=x0, cond=cond)


@dataclass
class StepInputs:
    noise: torch.Tensor
    jumps: JumpBatch
    cond: dict  # with the per-sample guidance


def step_inputs(settings: BenchSettings, data: FixedBatch, step: int) -> StepInputs:
    """The random draws of training step ``step``, in the trainer's order (noise, jumps, guidance)."""
    generator = torch.Generator().manual_seed((settings.seed * 1_000_003 + step) * 1_009)
    noise = torch.randn(data.x0.shape, generator=generator, dtype=data.x0.dtype)
    side = data.x0.shape[-1]
    jumps = sample_jumps(data.x0.shape[0], FLUX.jump_sampling(), generator,
                         num_tokens=FLUX.num_image_tokens(side, side))
    cond = FLUX.training_cond(data.cond, generator)
    return StepInputs(noise=noise.to(data.x0.device), jumps=jumps, cond=cond)


def lora_settings(settings: BenchSettings) -> LoraSettings:
    return LoraSettings(rank=settings.rank, alpha=float(settings.rank))


def autocast_forward_(module: torch.nn.Module, settings: BenchSettings) -> None:
    """The trainer's mixed precision, as ``accelerator.prepare`` applies it: ``module.forward`` is patched to run
    under bf16 autocast. The target passes call the same module, so every forward pass runs under it, each call
    in its own autocast region (autocast's cache of bf16 weight casts is dropped after every call; one region
    around in-place EMA swaps would reuse casts of the swapped-out weights)."""
    if settings.mixed_precision != "bf16":
        return
    forward, device_type = module.forward, torch.device(settings.device).type

    def forward_in_bf16(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    module.forward = forward_in_bf16


class OursStep:
    """The trainer's step with :class:`LoraStudent` (training/trainer.py, without Accelerate's thin wrappers)."""

    name = "ours"

    def __init__(self, settings: BenchSettings, transformer: torch.nn.Module):
        self.settings = settings
        with torch.device(settings.device):  # peft creates the LoRA layers there (not 1 B parameters on the CPU)
            self.student = LoraStudent(FLUX.velocity(transformer), FLUX, lora=lora_settings(settings),
                                       schedule=EMASchedule(), gradient_checkpointing=settings.gradient_checkpointing)
        init_lora_(self.student.trainable_tensors(), self.student.emas.fast.shadow, self.student.emas.slow.shadow,
                   settings.seed, settings.lora_init)
        autocast_forward_(self.student.module, settings)
        self.params = list(self.student.trainable_tensors().values())
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)
        self.targets_from = self.student.target_velocities()
        self.student_velocity = self.student.velocity()

    def step(self, step: int, x0: torch.Tensor, inputs: StepInputs) -> float:
        batch = scfm_targets(x0, inputs.noise, inputs.jumps, self.targets_from, inputs.cond)
        prediction = self.student_velocity(batch.x, batch.sigma, **inputs.cond)
        result = scfm_loss(prediction, batch)
        result.loss.backward()
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.student.emas.update(step, self.student.trainable_tensors())
        return result.loss.item()

    def lora_state(self) -> dict[str, torch.Tensor]:
        state = {f"student.{k}": v for k, v in self.student.trainable_tensors().items()}
        state.update({f"ema_fast.{k}": v for k, v in self.student.emas.fast.shadow.items()})
        state.update({f"ema_slow.{k}": v for k, v in self.student.emas.slow.shadow.items()})
        return state


class ReferenceStep:
    """The authors' scripts' step structure: one adapter, EMA weights copied in and out of it for each pass."""

    name = "reference"
    adapter_name = "default"
    fast_decay, slow_decay = EMASchedule().fast_decay, EMASchedule().slow_decay

    def __init__(self, settings: BenchSettings, transformer: torch.nn.Module):
        self.settings = settings
        with torch.device(settings.device):
            transformer.add_adapter(lora_settings(settings).peft_config(FLUX.lora_target_modules), self.adapter_name)
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
        self.transformer = transformer
        self.velocity = FLUX.velocity(transformer)
        self.velocity.set_gradient_checkpointing(settings.gradient_checkpointing)
        autocast_forward_(self.velocity, settings)
        self.live = adapter_tensors(transformer, self.adapter_name)
        for param in self.live.values():
            param.requires_grad_(True)
        self.fast_ema = {k: torch.empty_like(v) for k, v in self.live.items()}
        self.slow_ema = {k: torch.empty_like(v) for k, v in self.live.items()}
        init_lora_(self.live, self.fast_ema, self.slow_ema, settings.seed, settings.lora_init)
        self.params = list(self.live.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0)

    @contextmanager
    def ema_swapped_in(self, ema: dict):
        """store / copy_to / restore: the live LoRA weights hold ``ema`` inside the block, exactly as before after."""
        with torch.no_grad():
            stored = {k: v.detach().clone() for k, v in self.live.items()}
            for k, v in self.live.items():
                v.copy_(ema[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in self.live.items():
                    v.copy_(stored[k])

    @torch.no_grad()
    def teacher(self, x, sigma, cond):
        self.transformer.disable_adapters()
        try:
            return self.velocity(x, sigma, **cond)
        finally:
            self.transformer.enable_adapters()

    @torch.no_grad()
    def targets(self, x0: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_start, sigma, target) of the whole batch."""
        sigmas = inputs.jumps.sigmas.to(x0.device)
        mode = inputs.jumps.mode.to(x0.device)
        sigma = sigmas[:, 0].to(x0.dtype)
        x_start = interpolate(x0, inputs.noise, sigma)
        t_skip = sigmas.shape[1] - 1
        x = x_start
        for k in range(t_skip):
            sigma_k = sigmas[:, k].to(x.dtype)
            if k < t_skip // 2:
                v_teacher = self.teacher(x, sigma_k, inputs.cond).to(x.dtype)
                with self.ema_swapped_in(self.fast_ema):
                    v_fast = self.velocity(x, sigma_k, **inputs.cond).to(x.dtype)
                v = torch.where(expand_like(mode == TEACHER, x).bool(), v_teacher, v_fast)
            else:
                with self.ema_swapped_in(self.slow_ema):
                    v = self.velocity(x, sigma_k, **inputs.cond).to(x.dtype)
            x = x + expand_like(sigmas[:, k + 1] - sigmas[:, k], x) * v
        span = expand_like(sigmas[:, 0] - sigmas[:, -1], x)
        target = (x_start - x) / span
        target = torch.where(expand_like(mode == FLOW, x).bool(), inputs.noise - x0, target)
        return x_start, sigma, target

    def step(self, step: int, x0: torch.Tensor, inputs: StepInputs) -> float:
        x_start, sigma, target = self.targets(x0, inputs)
        prediction = self.velocity(x_start, sigma, **inputs.cond)
        loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for ema, decay in ((self.fast_ema, self.fast_decay), (self.slow_ema, self.slow_decay)):
                for k, v in self.live.items():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        return loss.item()

    def lora_state(self) -> dict[str, torch.Tensor]:
        state = {f"student.{k}": v for k, v in self.live.items()}
        state.update({f"ema_fast.{k}": v for k, v in self.fast_ema.items()})
        state.update({f"ema_slow.{k}": v for k, v in self.slow_ema.items()})
        return state


IMPLEMENTATIONS = {cls.name: cls for cls in (OursStep, ReferenceStep)}


def sampling_setup(settings: BenchSettings, transformer: torch.nn.Module, resolution: int):
    """(student, run): ``run(adapter)`` does one ``sample_steps``-step Euler pass at batch 1, without gradient."""
    with torch.device(settings.device):
        student = LoraStudent(FLUX.velocity(transformer), FLUX, lora=lora_settings(settings))
    autocast_forward_(student.module, settings)  # float32 LoRA on the bf16 base, matmuls in bf16
    init_lora_(student.trainable_tensors(), student.emas.fast.shadow, student.emas.slow.shadow, settings.seed,
               settings.lora_init)
    data = fixed_batch(settings, batch=1, resolution=resolution)
    side = settings.latent_side(resolution)
    grid = sampling_grid(FLUX, settings.sample_steps, side, side)
    cond = FLUX.sampling_cond(data.cond)

    @torch.no_grad()
    def run(with_adapter: bool) -> torch.Tensor:
        if with_adapter:
            return euler_sample(student.module, data.x0, grid, **cond).x
        with student.adapter(None):
            return euler_sample(student.module, data.x0, grid, **cond).x

    return student, run
