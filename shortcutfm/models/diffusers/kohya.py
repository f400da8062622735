"""Export an SCFM Flux LoRA as a kohya (sd-scripts) file: ``lora_unet_<BFL module>.lora_down/lora_up/alpha``.

ComfyUI, Forge and most LoRA tools read this layout for FLUX.1; diffusers' ``FluxPipeline.load_lora_weights``
converts it back (``_convert_kohya_flux_lora_to_diffusers``), which the tests use to show that the file gives the
same images as the diffusers-format export. Each module carries its own ``alpha`` so a reader that applies
``alpha / rank`` gets the trained scale:

* separate LoRAs that the original Flux checkpoint fuses into one linear (double blocks' ``qkv``; single blocks'
  ``linear1`` = q, k, v and the MLP input) become one LoRA of rank ``k * r``: the A matrices stacked, the B
  matrices block-diagonal, and alpha ``k * alpha`` (the same ``alpha / r`` per part). Parts the LoRA did not
  adapt are zero blocks;
* the final layer (``norm_out.linear``, ``proj_out``), whose alpha diffusers' converter ignores, gets the scale
  folded into ``lora_down`` and ``alpha = rank``; ``norm_out``'s B rows are swapped back to BFL's (shift, scale)
  order.

Only Flux has a kohya layout that diffusers reads back; SD3 and Lumina 2 LoRAs stay in the diffusers format,
which ComfyUI also loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...atomic import atomic_path

KOHYA_WEIGHTS = "kohya_lora.safetensors"

_DOUBLE = {
    "attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin", "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin",
}
_DOUBLE_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
}
_FINAL = {"norm_out.linear": "final_layer_adaLN_modulation_1", "proj_out": "final_layer_linear"}


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def read_diffusers_lora(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """``{module: (A, B)}`` (module paths without ``transformer.``), alpha and rank of a diffusers-format file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    # diffusers' save_lora_weights stores the peft config as JSON under "lora_adapter_metadata", keys "transformer.<field>"
    stored = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    config = {key.removeprefix("transformer."): value for key, value in stored.items() if key.startswith("transformer.")}
    pairs: dict[str, list] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise ValueError(f"{path}: key {key!r} is not a diffusers transformer LoRA key (transformer.<module>.lora_A/B)")
        pairs.setdefault(match.group(1), [None, None])["AB".index(match.group(2))] = tensor.float()
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"{path}: modules have different ranks {sorted(ranks)}; kohya export needs one rank")
    rank = ranks.pop()
    alpha = float(config.get("lora_alpha", rank))
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ValueError(f"{path}: per-module rank or alpha patterns are not supported by the kohya export")
    return {module: (a, b) for module, (a, b) in pairs.items()}, alpha, rank


def to_kohya_flux(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """The kohya state dict of a Flux LoRA given as ``{diffusers module: (A, B)}`` with one ``alpha`` and ``rank``."""
    left = dict(pairs)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor, module_alpha: float) -> None:
        out[f"lora_unet_{name}.lora_down.weight"] = down.contiguous()
        out[f"lora_unet_{name}.lora_up.weight"] = up.contiguous()
        out[f"lora_unet_{name}.alpha"] = torch.tensor(float(module_alpha))

    def fused(name: str, prefix: str, parts: tuple[str, ...]) -> None:
        present = [left.get(f"{prefix}.{part}") for part in parts]
        if all(p is None for p in present):
            return
        reference = next(p for p in present if p is not None)
        in_features = reference[0].shape[1]
        downs, ups = [], []
        for part, pair in zip(parts, present):
            if pair is None:
                raise ValueError(f"the LoRA adapts only part of {prefix}'s fused {name} ({part} is missing): "
                                 "the kohya layout cannot hold that; export it in the diffusers format")
            if pair[0].shape[1] != in_features:
                raise ValueError(f"{prefix}.{part}: input size differs from the rest of the fused {name}")
            downs.append(pair[0])
            ups.append(pair[1])
            del left[f"{prefix}.{part}"]
        put(name, torch.cat(downs), torch.block_diag(*ups), alpha * len(parts))

    for module in sorted(pairs):
        match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
        if match is None or module not in left:
            continue
        kind, index, suffix = match.groups()
        prefix = f"{kind}.{index}"
        if kind == "transformer_blocks":
            if suffix in _DOUBLE:
                put(f"double_blocks_{index}_{_DOUBLE[suffix]}", *left.pop(module), alpha)
            for name, parts in _DOUBLE_FUSED.items():
                if suffix in parts:
                    fused(f"double_blocks_{index}_{name}", prefix, parts)
        else:
            if suffix in _SINGLE:
                put(f"single_blocks_{index}_{_SINGLE[suffix]}", *left.pop(module), alpha)
            for name, parts in _SINGLE_FUSED.items():
                if suffix in parts:
                    fused(f"single_blocks_{index}_{name}", prefix, parts)
    for module, name in _TOP.items():
        if module in left:
            put(name, *left.pop(module), alpha)
    for module, name in _FINAL.items():
        if module in left:
            down, up = left.pop(module)
            put(name, down * (alpha / rank), _swap_halves(up) if module == "norm_out.linear" else up, rank)
    if left:
        raise ValueError(f"modules with no kohya Flux name: {sorted(left)[:4]}; export them in the diffusers format")
    return out


def export_kohya(lora_file: str | Path, out_file: str | Path, family: str = "flux") -> Path:
    """Convert a diffusers-format SCFM LoRA file (``pytorch_lora_weights.safetensors``) to a kohya file."""
    if family != "flux":
        raise ValueError(f"kohya export is for Flux LoRAs; {family} LoRAs stay in the diffusers format "
                         "(pytorch_lora_weights.safetensors), which diffusers and ComfyUI load")
    pairs, alpha, rank = read_diffusers_lora(lora_file)
    state = to_kohya_flux(pairs, alpha, rank)
    out_file = Path(out_file)
    with atomic_path(out_file, what="kohya LoRA") as temporary:
        save_file(state, str(temporary), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                                   "ss_network_alpha": str(alpha), "ss_base_model_version": "flux1",
                                                   "shortcutfm_source": Path(lora_file).name})
    return out_file
