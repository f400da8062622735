"""GPU memory of SCFM LoRA training on a FLUX.1-dev-shaped transformer: a markdown table for picking a route
(bf16 / int8 / NF4 base, AdamW / AdamW8bit, batch, resolution) for 24, 48 and 80 GB GPUs.

Nothing is downloaded and nothing full-size is allocated: the transformer (19 double + 38 single blocks,
11.9 B parameters) is built on the ``meta`` device, where tensors have shapes and dtypes but no storage.

What is *counted* from the module tree (exact arithmetic, no measurement):

1. Frozen base weights: bf16 (2 bytes/param); int8 weight-only, torchao style (every ``nn.Linear`` weight
   1 byte/element + one bf16 scale per output row; biases, norms and all other parameters bf16); NF4,
   bitsandbytes style (every ``nn.Linear`` weight 0.5 byte/element + one float32 absmax per block of 64
   elements, no double quantization, as ``shortcutfm.models.diffusers.quantization`` configures it; the rest bf16).
2. LoRA at ``--rank`` on the family's default targets (``families.flux.LORA_TARGETS``, peft's suffix match on
   a dotted boundary): ``r * (in + out)`` parameters per matched linear, cross-checked against peft's own
   injection on the meta model. The trainer keeps three float32 adapters (student, fast EMA, slow EMA), float32
   gradients of the student, and AdamW state (2 float32 tensors per parameter) or bitsandbytes AdamW8bit state
   (2 uint8 tensors per parameter + a float32 absmax per 256 elements for each of the two states; tensors
   under 4096 elements keep float32 state).

What is *measured* on the meta device (activations):

3. One training forward of the whole model (LoRA injected by peft, base frozen, noisy latents without grad,
   so the graph exists only because the adapters are trainable, as in training) under
   ``torch.autograd.graph.saved_tensors_hooks``: the pack hook records the untyped storage (and its byte size)
   of every tensor autograd saves for backward, attributed to the block running at the time (forward
   pre-/post-hooks), deduplicated by storage (views and tensors saved by several ops count once) and excluding
   parameter storages (a saved weight is not extra memory). Block inputs are recorded by the pre-hooks.
   The loss (float32 MSE against a target, as ``scfm_loss``) is included.

   Gradient checkpointing per transformer block (the project's FLUX default) keeps each block's inputs and
   recomputes one block at a time during backward, so

       checkpointed = storages kept outside the blocks (embedders, output head, loss)
                      + every block's input storages (hidden states, text states, temb, rotary tables)
                      + the largest block's saved tensors (excluding its inputs), recomputed in backward

   and "no checkpointing" is the union of every saved storage of the forward.

   Attention: SDPA on meta takes the math path (``torch._fused_sdp_choice`` = math), which upcasts bf16 to
   float32 and saves the (B, heads, T, T) attention matrix. Flash / memory-efficient attention on a GPU keeps
   no T x T matrix, only q, k, v, the output and a (B, heads, T) float32 logsumexp. Both are measured: once
   with the meta default (the T x T share is reported separately) and once with SDPA routed to
   ``aten._scaled_dot_product_flash_attention``, whose meta kernel and autograd node save exactly what the
   fused GPU kernel saves. The totals use the fused path.

   Precision, two variants: ``bf16`` (base, adapters and inputs in bf16, no autocast) and ``trainer``
   (float32 adapters under bf16 autocast, what ``train.mixed_precision: bf16`` runs). Autocast has no meta
   backend, so it is emulated with a ``TorchFunctionMode`` applying CUDA autocast's rules to the two op kinds
   this model uses them for: ``F.linear`` computes in bf16 (casting its float32 inputs, e.g. LoRA weights,
   as fresh copies), ``F.layer_norm`` computes in float32 (so the AdaLN-modulated hidden states are float32).
   The other ops follow ordinary type promotion, as they do under autocast. The totals use ``trainer``.

4. Totals: base + 3 adapters + student gradients + optimizer state + activations (trainer precision, fused
   attention, checkpointed), and which GPUs fit: total + 1 GiB (CUDA context) <= 90% of the card, the 10%
   covering the allocator's fragmentation and caches, cuBLAS workspaces and backward's transient gradient
   buffers. Cards: 24 GB = 24 GiB (RTX 3090/4090), 48 GB = 48 GiB (A6000 / L40S), 80 GB = 80 GiB (A100/H100).

    python benchmarks/memory_table.py                       # prints the tables
    python benchmarks/memory_table.py --rank 64 --out docs/memory.md

Runs in well under a minute on one CPU core; peak host memory is printed at the end (a few hundred MB).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

GIB = 1024**3
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
TEXT_TOKENS = 512
RESOLUTIONS = (512, 1024)
ACT_BATCHES = (1, 2, 4, 8)
TOTAL_BATCHES = (1, 4, 8)
GPUS_GIB = (24, 48, 80)
CUDA_CONTEXT_GIB = 1.0
HEADROOM = 0.10
ADAMW8BIT_MIN_SIZE, ADAMW8BIT_BLOCK = 4096, 256
NF4_BLOCK = 64


def gib(nbytes: float) -> float:
    return nbytes / GIB


def fmt(nbytes: float, digits: int = 2) -> str:
    return f"{gib(nbytes):.{digits}f}"


# ---------------------------------------------------------------------------------------------------- model


def build_meta_transformer() -> nn.Module:
    """FLUX.1-dev's transformer on the meta device, bf16, frozen."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    model.to(torch.bfloat16).requires_grad_(False)
    return model


def suffix_match(name: str, suffixes) -> bool:
    """peft's ``target_modules`` list rule: the module name is a suffix or ends with ``.suffix``."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


# ---------------------------------------------------------------------------------------------------- 1. base


@dataclass
class BaseCount:
    params: int = 0
    linear_weight: int = 0  # elements of nn.Linear weights
    linear_rows: int = 0  # output rows of those weights (int8 scales)
    nf4_blocks: int = 0  # ceil(numel / 64) per linear weight (NF4 absmax)
    linears: int = 0

    @property
    def other(self) -> int:
        return self.params - self.linear_weight

    def bytes(self, kind: str) -> float:
        if kind == "bf16":
            return 2 * self.params
        if kind == "int8":
            return self.linear_weight + 2 * self.linear_rows + 2 * self.other
        if kind == "nf4":
            return 0.5 * self.linear_weight + 4 * self.nf4_blocks + 2 * self.other
        raise ValueError(kind)


def count_base(model: nn.Module) -> BaseCount:
    c = BaseCount(params=sum(p.numel() for p in model.parameters()))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            n = module.weight.numel()
            c.linears += 1
            c.linear_weight += n
            c.linear_rows += module.out_features
            c.nf4_blocks += math.ceil(n / NF4_BLOCK)
    return c


# ---------------------------------------------------------------------------------------------------- 2. LoRA


@dataclass
class LoraCount:
    rank: int
    layers: list = field(default_factory=list)  # (name, in, out)

    @property
    def params(self) -> int:
        return sum(self.rank * (i + o) for _, i, o in self.layers)

    def tensor_sizes(self):
        for _, i, o in self.layers:
            yield self.rank * i  # lora_A (r, in)
            yield o * self.rank  # lora_B (out, r)

    def optimizer_bytes(self, kind: str) -> float:
        if kind == "adamw":
            return 8 * self.params
        if kind == "adamw8bit":
            total = 0
            for n in self.tensor_sizes():
                if n < ADAMW8BIT_MIN_SIZE:
                    total += 8 * n
                else:
                    total += 2 * n + 2 * 4 * math.ceil(n / ADAMW8BIT_BLOCK)
            return total
        raise ValueError(kind)

    @property
    def adapters_bytes(self) -> float:
        return 3 * 4 * self.params

    @property
    def grads_bytes(self) -> float:
        return 4 * self.params


def count_lora(model: nn.Module, targets, rank: int) -> LoraCount:
    c = LoraCount(rank=rank)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and suffix_match(name, targets):
            c.layers.append((name, module.in_features, module.out_features))
    return c


def inject_student_lora(model: nn.Module, targets, rank: int) -> int:
    """peft's LoRA ("student" adapter, the project's settings) on the meta model; returns its parameter count."""
    from peft import inject_adapter_in_model

    from shortcutfm.lora_settings import LoraSettings

    config = LoraSettings(rank=rank, alpha=float(rank)).peft_config(tuple(targets))
    with torch.device("meta"):
        inject_adapter_in_model(config, model, adapter_name="student", low_cpu_mem_usage=True)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    return sum(p.numel() for p in lora)


def set_lora_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for name, module in model.named_modules():
        if name.endswith(("lora_A.student", "lora_B.student")):
            module.to(dtype)


# ---------------------------------------------------------------------------------------------------- 3. activations


class SavedTensorMeter:
    """Pack hook + block hooks: storages autograd saves, attributed to the running block, deduplicated."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.label = "outside"
        self.saved: dict[str, dict[int, int]] = {}  # label -> {storage id: nbytes}
        self.inputs: dict[str, dict[int, int]] = {}  # block label -> {storage id: nbytes}
        self.square: dict[str, dict[int, int]] = {}  # label -> T x T storages (math attention)
        self.keep: list[torch.Tensor] = []  # keeps storage ids unique while measuring (meta: costs nothing)
        self.param_ids = {p.untyped_storage()._cdata for p in model.parameters()}
        self.tokens = 0
        self.handles = []
        for prefix, blocks in (("double", model.transformer_blocks), ("single", model.single_transformer_blocks)):
            for i, block in enumerate(blocks):
                self.handles.append(block.register_forward_pre_hook(self._enter(f"{prefix}{i}"), with_kwargs=True))
                self.handles.append(block.register_forward_hook(self._leave))

    @staticmethod
    def _tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                yield from SavedTensorMeter._tensors(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                yield from SavedTensorMeter._tensors(o)

    def _enter(self, label):
        def hook(module, args, kwargs):
            self.label = label
            held = self.inputs.setdefault(label, {})
            for t in self._tensors((args, kwargs)):
                st = t.untyped_storage()
                held[st._cdata] = st.nbytes()
                self.keep.append(t)
        return hook

    def _leave(self, module, args, output):
        self.label = "outside"

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.param_ids:
            self.saved.setdefault(self.label, {})[key] = st.nbytes()
            if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.tokens:
                self.square.setdefault(self.label, {})[key] = st.nbytes()
            self.keep.append(t)
        return t

    @staticmethod
    def unpack(t):
        return t

    def close(self):
        for h in self.handles:
            h.remove()


class EmulatedAutocast(TorchFunctionMode):
    """CUDA bf16 autocast's rules for the ops that matter here (autocast has no meta backend): F.linear in bf16,
    F.layer_norm in float32; casts are ordinary (autograd-recorded) ``.to`` copies, as autocast's are."""

    LOW, HIGH = torch.bfloat16, torch.float32

    @staticmethod
    def _cast(obj, dtype):
        if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.dtype != dtype:
            return obj.to(dtype)
        return obj

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            args = tuple(self._cast(a, self.LOW) for a in args)
            kwargs = {k: self._cast(v, self.LOW) for k, v in kwargs.items()}
        elif func is F.layer_norm:
            args = tuple(self._cast(a, self.HIGH) for a in args)
            kwargs = {k: self._cast(v, self.HIGH) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def fused_attention():
    """Route SDPA to the flash kernel's aten op (meta kernel + autograd node): what a GPU's fused path saves."""
    original = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            raise NotImplementedError("flash emulation: no mask / GQA (FLUX uses neither)")
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                  scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class ActivationResult:
    batch: int
    resolution: int
    precision: str
    attention: str
    double_block: int  # saved bytes of the largest double block, its inputs excluded
    single_block: int
    double_square: int  # of which T x T (math attention)
    single_square: int
    block_inputs: int  # union of all blocks' input storages
    outside: int  # embedders, head, loss (not checkpointed), beyond block inputs
    no_checkpoint: int  # union of every saved storage

    @property
    def recompute(self) -> int:
        return max(self.double_block, self.single_block)

    @property
    def checkpointed(self) -> int:
        return self.block_inputs + self.outside + self.recompute


def measure_activations(model: nn.Module, batch: int, resolution: int, precision: str, attention: str) -> ActivationResult:
    from shortcutfm.models.diffusers.families.flux import unpack_latents

    latent = resolution // 8  # VAE factor 8; packed 2x2 -> (res/16)^2 tokens
    image_tokens = (latent // 2) ** 2
    dtype = torch.bfloat16
    meta = dict(device="meta", dtype=dtype)
    inputs = dict(
        hidden_states=torch.empty(batch, image_tokens, 64, **meta),
        encoder_hidden_states=torch.empty(batch, TEXT_TOKENS, 4096, **meta),
        pooled_projections=torch.empty(batch, 768, **meta),
        timestep=torch.empty(batch, **meta),
        guidance=torch.empty(batch, **meta),
        txt_ids=torch.zeros(TEXT_TOKENS, 3, **meta),
        img_ids=torch.zeros(image_tokens, 3, **meta),
    )
    meter = SavedTensorMeter(model)
    meter.tokens = TEXT_TOKENS + image_tokens
    attn_ctx = fused_attention() if attention == "fused" else contextlib.nullcontext()
    cast_ctx = EmulatedAutocast() if precision == "trainer" else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack), attn_ctx:
            with cast_ctx:
                out = model(**inputs, return_dict=False)[0]
            prediction = unpack_latents(out, latent, latent).float()  # FluxVelocity returns latents.dtype
            target = torch.empty(prediction.shape, device="meta", dtype=torch.float32)
            loss = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1).mean()
        if not loss.requires_grad:
            raise RuntimeError("no autograd graph: are the LoRA parameters trainable?")
    finally:
        meter.close()

    block_input = {}
    for held in meter.inputs.values():
        block_input.update(held)
    everything = {}
    for d in meter.saved.values():
        everything.update(d)

    def block_stats(prefix):
        best, best_sq = 0, 0
        for label, d in meter.saved.items():
            if label.startswith(prefix):
                own = {k: v for k, v in d.items() if k not in meter.inputs[label]}
                sq = sum(v for k, v in meter.square.get(label, {}).items() if k in own)
                if sum(own.values()) > best:
                    best, best_sq = sum(own.values()), sq
        return best, best_sq

    double_block, double_sq = block_stats("double")
    single_block, single_sq = block_stats("single")
    outside = {k: v for k, v in meter.saved.get("outside", {}).items() if k not in block_input}
    return ActivationResult(
        batch=batch, resolution=resolution, precision=precision, attention=attention,
        double_block=double_block, single_block=single_block, double_square=double_sq, single_square=single_sq,
        block_inputs=sum(block_input.values()), outside=sum(outside.values()), no_checkpoint=sum(everything.values()),
    )


# ---------------------------------------------------------------------------------------------------- 4. tables


def table(headers, rows) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fits(total_bytes: float) -> list[int]:
    need = gib(total_bytes) + CUDA_CONTEXT_GIB
    return [g for g in GPUS_GIB if need <= (1 - HEADROOM) * g]


def report(rank: int) -> str:
    from shortcutfm.models.diffusers.families.flux import LORA_TARGETS

    t0 = time.perf_counter()
    model = build_meta_transformer()
    base = count_base(model)
    lora = count_lora(model, LORA_TARGETS, rank)
    peft_params = inject_student_lora(model, LORA_TARGETS, rank)
    if peft_params != lora.params:
        raise RuntimeError(f"peft injected {peft_params} LoRA parameters, the suffix count says {lora.params}")

    results: dict[tuple, ActivationResult] = {}
    for precision, lora_dtype in (("bf16", torch.bfloat16), ("trainer", torch.float32)):
        set_lora_dtype(model, lora_dtype)
        for attention in ("math", "fused"):
            for res in RESOLUTIONS:
                for b in ACT_BATCHES:
                    results[(precision, attention, res, b)] = measure_activations(model, b, res, precision, attention)
    elapsed = time.perf_counter() - t0

    out = []
    out.append(f"# SCFM LoRA training memory: FLUX.1-dev transformer, LoRA rank {rank}\n")
    out.append("Generated by `benchmarks/memory_table.py` (meta device: weights and LoRA counted from the module tree, "
               "activations measured with saved-tensor hooks). GiB = 2^30 bytes.\n")

    out.append("## 1. Frozen base weights\n")
    out.append(f"{base.params:,} parameters; {base.linears} `nn.Linear` layers hold {base.linear_weight:,} weight "
               f"elements ({100 * base.linear_weight / base.params:.2f}%), the other {base.other:,} (biases, norms) "
               "stay bf16 in every route.\n")
    out += table(["format", "rule", "GiB"], [
        ["bf16", "2 B/param", fmt(base.bytes("bf16"))],
        ["int8 weight-only (torchao)", "linear weights 1 B/elem + bf16 scale per output row; rest bf16", fmt(base.bytes("int8"))],
        ["NF4 (bitsandbytes)", "linear weights 0.5 B/elem + fp32 absmax per 64 elem; rest bf16", fmt(base.bytes("nf4"))],
    ])

    out.append(f"\n## 2. LoRA rank {rank} on `LORA_TARGETS` (the Flux family's defaults)\n")
    out.append(f"{len(lora.layers)} linears matched; {lora.params:,} parameters per adapter (peft's injection on the "
               "meta model agrees).\n")
    adapters, grads = lora.adapters_bytes, lora.grads_bytes
    out += table(["part", "dtype", "GiB"], [
        ["3 adapters: student + fast EMA + slow EMA", "float32", fmt(adapters)],
        ["student gradients", "float32", fmt(grads)],
        ["AdamW state (exp_avg, exp_avg_sq)", "2 x float32", fmt(lora.optimizer_bytes("adamw"))],
        ["AdamW8bit state (bitsandbytes)", "2 x uint8 + fp32 absmax / 256 each", fmt(lora.optimizer_bytes("adamw8bit"))],
        ["**sum with AdamW**", "", fmt(adapters + grads + lora.optimizer_bytes("adamw"))],
        ["**sum with AdamW8bit**", "", fmt(adapters + grads + lora.optimizer_bytes("adamw8bit"))],
    ])

    out.append("\n## 3. Activations (measured on meta)\n")
    out.append(f"Text tokens {TEXT_TOKENS}; image tokens (res/16)^2: "
               + ", ".join(f"{r}px = {(r // 16) ** 2}" for r in RESOLUTIONS) + ". Per-block columns: bytes autograd saves "
               "inside one block (its inputs excluded), i.e. what checkpointing recomputes for that block in backward.\n")
    out.append("**Attention path.** SDPA on meta takes the *math* path: it upcasts q, k, v to float32 and saves the "
               "(B, 24, T, T) float32 attention matrix (T = text + image tokens). Flash / memory-efficient attention on "
               "a GPU keeps no T x T matrix (q, k, v, output, float32 logsumexp only); the `fused` rows measure that "
               "path by routing SDPA to `aten._scaled_dot_product_flash_attention` on meta. **Use the fused rows on "
               "a GPU**; math rows apply only if SDPA falls back to the math kernel.\n")
    out.append("**Precision.** `bf16`: everything bf16, no autocast. `trainer`: float32 adapters under bf16 autocast "
               "(emulated: F.linear in bf16, F.layer_norm in float32), as `train.mixed_precision: bf16` runs.\n")
    rows = []
    for (precision, attention, res, b), r in results.items():
        rows.append([f"{precision}", attention, res, b, fmt(r.double_block), fmt(r.double_square),
                     fmt(r.single_block), fmt(r.single_square), fmt(r.block_inputs), fmt(r.outside),
                     f"**{fmt(r.checkpointed)}**", fmt(r.checkpointed - r.recompute + max(
                         r.double_block - r.double_square, r.single_block - r.single_square)) if attention == "math" else "",
                     fmt(r.no_checkpoint)])
    out += table(["precision", "attention", "res", "batch", "double block", "of which TxT", "single block",
                  "of which TxT", "57 block inputs", "embed/head/loss", "checkpointed", "ckpt, math minus TxT",
                  "no checkpointing"], rows)
    out.append("\ncheckpointed = 57 block inputs + embed/head/loss + max(double block, single block). "
               "\"ckpt, math minus TxT\" removes the T x T matrices from the math measurement (a rough stand-in for "
               "fused attention; the fused rows are the measured one).\n")

    out.append("## 4. Totals and GPU fit\n")
    out.append(f"total = base + 3 adapters + gradients + optimizer + activations (`trainer` precision, fused attention, "
               f"gradient checkpointing). A GPU fits when total + {CUDA_CONTEXT_GIB:.0f} GiB CUDA context <= "
               f"{100 * (1 - HEADROOM):.0f}% of its memory (10% headroom: allocator fragmentation and cache, cuBLAS "
               "workspaces, backward's transient gradients). 24 / 48 / 80 GB cards taken as 24 / 48 / 80 GiB. "
               "Cell: total GiB -> smallest card that fits (`-` = none of them).\n")
    headers = ["base", "optimizer"] + [f"{res}px b{b}" for res in RESOLUTIONS for b in TOTAL_BATCHES]
    rows = []
    for kind in ("bf16", "int8", "nf4"):
        for opt in ("adamw", "adamw8bit"):
            static = base.bytes(kind) + adapters + grads + lora.optimizer_bytes(opt)
            row = [kind, opt]
            for res in RESOLUTIONS:
                for b in TOTAL_BATCHES:
                    total = static + results[("trainer", "fused", res, b)].checkpointed
                    ok = fits(total)
                    row.append(f"{gib(total):.1f} -> {ok[0] if ok else '-'}")
            rows.append(row)
    out += table(headers, rows)
    out.append("\nStatic part (no activations), GiB: " + "; ".join(
        f"{kind}+{opt} {fmt(base.bytes(kind) + adapters + grads + lora.optimizer_bytes(opt), 1)}"
        for kind in ("bf16", "int8", "nf4") for opt in ("adamw", "adamw8bit")) + ".\n")

    out.append("## Assumptions and limits\n")
    out += [
        "- Activations are per micro-batch: with gradient accumulation, use the micro-batch size.",
        "- The SCFM target passes (teacher, EMA adapters) run under `torch.no_grad`: they add only transient "
        "per-layer buffers (well under one checkpointed block's saved tensors at fused attention) and are not counted.",
        "- Autocast is emulated for F.linear / F.layer_norm only; its cast cache holds a bf16 copy of the student "
        f"adapter ({fmt(2 * lora.params)} GiB) until the forward ends (freed before backward; not in the totals).",
        "- Quantized bases: assumes the quantized linear saves no dequantized weight for backward and dequantizes one "
        "layer at a time (transient, largest FLUX linear 3072 x 18432 = 0.1 GiB in bf16); diffusers may also leave a "
        "few modules unquantized. Verify a chosen route with `torch.cuda.max_memory_allocated` "
        "(`benchmarks/bench_scfm_step.py`).",
        "- Backward's gradient tensors (about one block's activations at a time) and the caching allocator's slack "
        "are covered by the 10% headroom, not measured.",
        "- NF4 counts no double quantization (the project's `BitsAndBytesConfig` does not enable it); AdamW8bit "
        "counts bitsandbytes' blockwise state (block 256, min_8bit_size 4096).",
    ]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.append(f"\n_{len(results)} meta forwards in {elapsed:.1f} s; peak host RSS {peak_rss:.0f} MiB "
               f"(torch {torch.__version__})._\n")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64, the paper's)")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error("--rank must be >= 1")
    text = report(args.rank)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
