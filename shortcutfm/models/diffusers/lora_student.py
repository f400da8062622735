"""The LoRA student of a diffusers model: one frozen base, three peft adapters, no weight copies ever.

* ``student`` (trainable, float32): what the optimiser updates; LoRA B starts at 0, so student == teacher.
* ``ema_fast`` / ``ema_slow`` (never trainable, float32): the EMAs. Their own LoRA tensors are the EMA
  shadows, so ``emas.update`` lerps straight into them. Single-EMA mode keeps only ``ema_slow``.
* teacher: the same module with every adapter off.

Target passes switch adapters on the *unwrapped* module with :func:`~.adapters.use_adapter` (which restores
the active adapter and all ``requires_grad`` flags), under ``torch.no_grad``. The trainer may DDP-wrap
``student.module`` with ``accelerate.prepare`` and run the student forward through the wrapper.

    student = LoraStudent.from_pretrained("flux", "black-forest-labs/FLUX.1-dev",
                                          lora=LoraSettings(rank=64, alpha=64), dtype=torch.bfloat16)
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch

from ...core.ema import EMASchedule, StudentEMAs
from ...core.targets import TargetVelocities
from ...core.velocity import VelocityModel
from ...lora_settings import LoraSettings
from .adapters import adapter_tensors, tuner_layers, use_adapter
from .families import ModelFamily, get_family, load_transformer
from .families.base import DiffusersVelocity

STUDENT, FAST_EMA, SLOW_EMA = "student", "ema_fast", "ema_slow"


class _AdapterVelocity:
    """The student's module evaluated with one adapter (None = none: the teacher), without gradient."""

    def __init__(self, student: "LoraStudent", adapter_name: str | None):
        self.student = student
        self.adapter_name = adapter_name

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        with self.student.adapter(self.adapter_name):
            return self.student.module(x, sigma, **cond)


class LoraStudent:
    """Implements :class:`shortcutfm.models.student.Student` for a diffusers transformer with LoRA.

    Args:
        velocity: the family adapter around the pretrained transformer (``family.velocity(transformer)``);
            its transformer must not have adapters yet. Its base weights are frozen here.
        family: the model family (name or object): default LoRA targets and guidance.
        lora: rank, alpha and targets of the adapters.
        schedule: EMA mode and decays ("single" keeps only ``ema_slow``).
        uncond: empty-prompt embeddings (1, ...) for real-CFG families (``family.encode_prompts(...).uncond``).
        guidance_scale: CFG scale ``w`` for real-CFG families (None = the family's default).
        fold_guidance: guide the teacher only; the student and its EMAs learn the guided teacher in one
            conditional pass (the exported LoRA then samples with guidance off); teacher-taught targets take every
            sub-step with the guided teacher.
        gradient_checkpointing: recompute transformer blocks in the backward pass.
    """

    def __init__(
        self,
        velocity: DiffusersVelocity,
        family: str | ModelFamily,
        *,
        lora: LoraSettings | None = None,
        schedule: EMASchedule | None = None,
        uncond: Mapping[str, torch.Tensor] | None = None,
        guidance_scale: float | None = None,
        fold_guidance: bool = False,
        gradient_checkpointing: bool = False,
    ):
        self.family = get_family(family)
        self.lora = lora or LoraSettings()
        schedule = schedule or EMASchedule()
        self.module = velocity
        transformer = velocity.transformer
        if getattr(transformer, "peft_config", None):
            raise ValueError(f"the transformer already has adapters {sorted(transformer.peft_config)}: pass a clean one")
        transformer.requires_grad_(False)
        self.ema_names = [SLOW_EMA] if schedule.mode == "single" else [FAST_EMA, SLOW_EMA]
        with warnings.catch_warnings():  # peft warns that several adapters share the model: that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for name in (*self.ema_names, STUDENT):
                transformer.add_adapter(self.lora.peft_config(self.family.lora_target_modules), adapter_name=name)
        self._layers = tuner_layers(transformer)
        for layer in self._layers:
            layer.set_adapter(STUDENT)  # student active and trainable, EMAs frozen
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
        velocity.set_gradient_checkpointing(gradient_checkpointing)

        self._student = adapter_tensors(transformer, STUDENT)
        shadows = {name: adapter_tensors(transformer, name) for name in self.ema_names}
        for name, tensors in shadows.items():
            if set(tensors) != set(self._student):
                raise RuntimeError(f"adapter {name!r} does not mirror the student's LoRA tensors")
            with torch.no_grad():
                for key, tensor in tensors.items():
                    if self.lora.ema_init == "student":
                        tensor.copy_(self._student[key])
                    else:
                        tensor.zero_()
        self.emas = StudentEMAs(schedule, slow_shadow=shadows[SLOW_EMA], fast_shadow=shadows.get(FAST_EMA))
        self._guide_teacher = self.family.guidance.wrap(uncond, guidance_scale)
        self._guide = (lambda model: model) if fold_guidance else self._guide_teacher
        self.fold_guidance = fold_guidance

    @classmethod
    def from_pretrained(
        cls,
        family: str | ModelFamily,
        pretrained_path_or_id: str,
        *,
        lora: LoraSettings | None = None,
        schedule: EMASchedule | None = None,
        dtype: torch.dtype = torch.bfloat16,
        quantize: str = "none",
        subfolder: str | None = "transformer",
        uncond: Mapping[str, torch.Tensor] | None = None,
        guidance_scale: float | None = None,
        fold_guidance: bool = False,
        gradient_checkpointing: bool = True,
    ) -> "LoraStudent":
        """Load the family's transformer in ``dtype`` (frozen base; ``quantize``: "int8" or "nf4" stores its
        linear weights quantized, :mod:`.quantization`) and add the float32 adapters."""
        from .quantization import quantization_config

        family = get_family(family)
        config = quantization_config(quantize, dtype)
        extra = {"quantization_config": config} if config is not None else {}
        transformer = load_transformer(family, pretrained_path_or_id, subfolder=subfolder, dtype=dtype, **extra)
        return cls(
            family.velocity(transformer), family, lora=lora, schedule=schedule, uncond=uncond,
            guidance_scale=guidance_scale, fold_guidance=fold_guidance, gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def transformer(self) -> torch.nn.Module:
        return self.module.transformer

    def adapter(self, adapter_name: str | None):
        """Context manager: only ``adapter_name`` active (None: all off); restores adapters and grad flags."""
        return use_adapter(self.transformer, adapter_name, self._layers)

    def training_cond(self, cond: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """The family's per-sample training extras (Flux: a guidance value per sample)."""
        return self.family.training_cond(cond, generator)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The student's LoRA parameters, keyed like the EMA shadows (adapter name removed)."""
        return dict(self._student)

    def velocity(self, module: torch.nn.Module | None = None) -> VelocityModel:
        """The student's own guided prediction through ``module`` (default: the unwrapped velocity adapter)."""
        return self._guide(self.module if module is None else module)

    def velocity_at(self, scale: float) -> VelocityModel:
        """The student's guided prediction with its LoRA at ``scale`` (1 = as trained, 0 = the base model): the
        deployed model of a step-count calibration (:mod:`shortcutfm.core.calibration`)."""
        return self._guide(self.family.velocity(self.transformer, lora_scale=scale))

    def target_velocities(self) -> TargetVelocities:
        """Guided teacher (adapters off), fast-EMA and slow-EMA velocities; each call runs under no_grad."""
        fast = FAST_EMA if FAST_EMA in self.ema_names else SLOW_EMA
        return TargetVelocities(
            teacher=self._guide_teacher(_AdapterVelocity(self, None)),
            fast_ema=self._guide(_AdapterVelocity(self, fast)),
            slow_ema=self._guide(_AdapterVelocity(self, SLOW_EMA)),
            teacher_whole_jump=self.fold_guidance,
        )

    def ema_velocity(self) -> VelocityModel:
        """The slow EMA as a guided velocity model, for evaluation."""
        return self._guide(_AdapterVelocity(self, SLOW_EMA))

    def shard(self, device: torch.device) -> None:
        """Shard the transformer (base and every adapter) across the processes with FSDP2
        (:mod:`shortcutfm.training.sharding`) and point the student's and EMAs' tensors at the shards."""
        from ...training.sharding import shard_transformer

        shard_transformer(self.transformer, device)
        self._layers = tuner_layers(self.transformer)
        self._student = adapter_tensors(self.transformer, STUDENT)
        for ema, name in ((self.emas.slow, SLOW_EMA), (self.emas.fast, FAST_EMA)):
            if name in self.ema_names:
                ema.shadow = adapter_tensors(self.transformer, name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the student's LoRA tensors (the peft/diffusers keys without the ``transformer.`` prefix); whole
        tensors also when sharded (then a collective: every process calls it)."""
        from ...training.sharding import full_tensor

        return {name: full_tensor(tensor.detach()).clone() for name, tensor in self._student.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self._student):
            missing, extra = set(self._student) - set(state), set(state) - set(self._student)
            raise KeyError(
                f"student LoRA state differs: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}; "
                "was it saved with the same family and lora.target_modules?"
            )
        from ...training.sharding import like

        for name, value in state.items():
            self._student[name].copy_(like(self._student[name], value))
