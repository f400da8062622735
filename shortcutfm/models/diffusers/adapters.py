"""Several peft LoRA adapters in one diffusers transformer: switching them safely, and naming their tensors.

peft's adapter switches have a side effect: ``set_adapter(name)`` makes *only* ``name``'s LoRA tensors
``requires_grad=True`` (and every other adapter's False), and ``disable_adapters()`` turns the grad of every
adapter off. Calling them for a target pass in the middle of training would silently freeze the student or
make an EMA trainable. :func:`use_adapter` is the only switch the library uses: it records each LoRA layer's
active adapters and disabled flag and every parameter's ``requires_grad``, switches, and restores all of
them exactly on exit, also when the body raises.

Rules for callers: run the body under ``torch.no_grad()`` (target passes) and never call ``backward`` inside
it (with gradient checkpointing the recomputation would run with the wrong adapter).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """The peft adapter layers of ``model`` (LoRA-wrapped linears)."""
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def use_adapter(model: nn.Module, adapter_name: str | None, layers: list[BaseTunerLayer] | None = None) -> Iterator[None]:
    """Run the body with only ``adapter_name`` active, or with all adapters off (the base model) for None.

    On exit, the active adapters, the disabled flags and every parameter's ``requires_grad`` of ``model``
    are exactly as before. ``layers`` may pass a cached :func:`tuner_layers` list (it saves a module walk).
    """
    layers = tuner_layers(model) if layers is None else layers
    if not layers:
        raise ValueError("the model has no peft adapters: add them (e.g. with LoraStudent) before switching")
    grad_flags = [(param, param.requires_grad) for param in model.parameters()]
    layer_states = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    try:
        for layer in layers:
            if adapter_name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(adapter_name)
        yield
    finally:
        for layer, active, disabled in layer_states:
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for param, flag in grad_flags:
            param.requires_grad_(flag)


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The LoRA parameters of ``adapter_name`` by a name without the adapter: the same key for every adapter.

    ``blocks.0.attn.to_q.lora_A.student.weight`` -> ``blocks.0.attn.to_q.lora_A.weight``; these are also
    the keys of ``peft.utils.get_peft_model_state_dict(model, adapter_name=...)``.
    """
    tensors = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        for i in range(1, len(parts)):
            if parts[i] == adapter_name and parts[i - 1].startswith("lora_"):
                tensors[".".join(parts[:i] + parts[i + 1:])] = param
                break
    if not tensors:
        raise ValueError(f"the model has no LoRA tensors of an adapter named {adapter_name!r}")
    return tensors
