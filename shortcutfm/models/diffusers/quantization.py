"""A quantized frozen base: the transformer's linear weights stored in int8 or NF4 while the LoRA adapters (student
and EMAs) stay float32 and trainable, through diffusers' quantization configs.

* ``int8``: torchao int8 weight-only (``TorchAoConfig(Int8WeightOnlyConfig())``), on the CPU and GPUs. Each
  linear computes with its dequantized weight (per-row int8 times a float scale): half a bf16 base's memory.
* ``nf4``: bitsandbytes 4-bit NormalFloat (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``),
  CUDA only: a quarter of a bf16 base. The route of ai-toolkit and SimpleTuner for FLUX on 24 GB.

Only ``nn.Linear`` layers are quantized (convolutions and norms stay in ``model.dtype``). The exported LoRA has
the same keys as on an unquantized base and loads on it unchanged.
"""

from __future__ import annotations

import importlib.util

import torch

QUANTIZE_KINDS = ("none", "int8", "nf4")


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The diffusers quantization config of ``model.quantize`` (None for "none"); a one-line error naming the
    package to install or the hardware it needs."""
    if kind == "none":
        return None
    if kind == "int8":
        if importlib.util.find_spec("torchao") is None:
            raise ValueError('model.quantize=int8 needs torchao: pip install "shortcutfm[quant]" (or torchao)')
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if kind == "nf4":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError('model.quantize=nf4 needs bitsandbytes: pip install "shortcutfm[quant]"')
        if not torch.cuda.is_available():
            raise ValueError("model.quantize=nf4 needs a CUDA GPU (bitsandbytes quantizes on the GPU); on the CPU use "
                             "model.quantize=int8")
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"model.quantize must be one of {', '.join(QUANTIZE_KINDS)}, got {kind!r}")


def dequantized_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The float weight a quantized linear computes with (torchao: its tensor subclass's ``dequantize()``)."""
    weight = linear.weight
    return weight.dequantize() if hasattr(weight, "dequantize") else weight.detach()


def quantized_linears(module: torch.nn.Module) -> list[str]:
    """Names of the linear layers whose weight is stored quantized."""
    return [name for name, child in module.named_modules()
            if isinstance(child, torch.nn.Linear) and type(child.weight) is not torch.nn.Parameter
            and type(getattr(child.weight, "data", child.weight)) is not torch.Tensor]
