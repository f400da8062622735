"""GPU memory of SCFM LoRA training on a FLUX.1-dev-shaped transformer: a markdown table for picking a route
(bf16 / int8 / NF4 base, AdamW / AdamW8bit, batch, resolution) for 24, 48 and 80 GB GPUs.

Nothing is downloaded and nothing full-size is allocated: the transformer (19 double + 38 single blocks,
11.9 B parameters) is built on the ``meta`` device, where tensors have shapes and dtypes but no storage.

What is *counted* from the module tree (exact arithmetic, no measurement):

1. Frozen base weights: bf16 (2 bytes/param); int8 weight-only, torchao style (every ``nn.Linear`` weight
   1 byte/element + one bf16 scale per output row; biases, norms and all other parameters bf16; the installed
   torchao 0.18 ``Int8Tensor`` keeps a float32 scale and an int8 zero point per row, also shown); NF4,
   bitsandbytes style (every ``nn.Linear`` weight 0.5 byte/element + one float32 absmax per block of 64
   elements, no double quantization, as ``shortcutfm.models.diffusers.quantization`` configures it; the rest bf16).
2. LoRA at ``--rank`` on the family's default targets (``families.flux.LORA_TARGETS``, peft's suffix match on
   a dotted boundary): ``r * (in + out)`` parameters per matched linear, cross-checked against peft's own
   injection on the meta model. The trainer keeps three float32 adapters (student, fast EMA, slow EMA), float32
   gradients of the student, and AdamW state (2 float32 tensors per parameter) or bitsandbytes AdamW8bit state
   (2 uint8 tensors per parameter + a float32 absmax per 256 elements for each of the two states; tensors
   under 4096 elements keep float32 state).

What is *measured* on the meta device (activations):

3. A training forward (LoRA injected by peft, base frozen, noisy latents without grad, so the graph exists
   only because the adapters are trainable, as in training) under
   ``torch.autograd.graph.saved_tensors_hooks``: the pack hook records the untyped storage (and its byte size)
   of every tensor autograd saves for backward, attributed to the block running at the time (forward
   pre-/post-hooks), deduplicated by storage (views and tensors saved by several ops count once) and excluding
   parameter storages (a saved weight is not extra memory). Block inputs are recorded by the pre-hooks.
   The loss (float32 MSE against a target, as ``scfm_loss``) is included. The meta kernels are slow Python,
   so each configuration runs the embedders, 2 double + 2 single blocks and the head, and adds the other
   17 double + 36 single blocks from the second block of each type (identical shapes); one configuration is
   also run at full depth (57 blocks) and must agree to the byte (``--full-depth`` runs all of them so).

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

   Precision, three variants: ``bf16`` (base, adapters and inputs in bf16, no autocast); ``trainer``
   (float32 adapters under bf16 autocast, what ``train.mixed_precision: bf16`` runs); ``trainer-int8`` (the
   same on a torchao int8 weight-only base). Autocast has no meta backend, so it is emulated with a
   ``TorchFunctionMode`` applying CUDA autocast's rules to the op kinds this model uses them for: ``F.linear``
   and ``mm`` compute in bf16 (casting float32 inputs, e.g. LoRA weights and peft's float32 copy of a LoRA
   input, as fresh copies), ``F.layer_norm`` computes in float32 (so the AdaLN-modulated hidden states are
   float32); the other ops follow ordinary type promotion, as under autocast. ``trainer-int8`` also replays
   torchao 0.18's per-row weight-only ``F.linear`` override (it runs above autograd: ``mm(x,
   qdata.t().to(x.dtype)) * scale``), so the bf16 copy of each frozen weight that autograd saves for the
   input gradient is measured. bitsandbytes 0.50's NF4 ``MatMul4Bit`` keeps only the packed weight for
   backward (``ctx.tensors = (None, B)``), so NF4 uses the ``trainer`` activations. The totals use ``trainer``
   (bf16 and NF4 bases) and ``trainer-int8`` (int8 base), all with fused attention and checkpointing.

4. Totals: base + 3 adapters + student gradients + optimizer state + activations, and which GPUs fit:
   total + 1 GiB (CUDA context) <= 90% of the card, the 10% covering the allocator's fragmentation and caches,
   cuBLAS workspaces and backward's transient gradient buffers. Cards: 24 GB = 24 GiB (RTX 3090/4090),
   48 GB = 48 GiB (A6000 / L40S), 80 GB = 80 GiB (A100/H100).

    python benchmarks/memory_table.py                       # prints the tables
    python benchmarks/memory_table.py --rank 64 --out memory.md   # and writes them

About 30 s on one CPU core (half of it importing diffusers); peak host memory is printed at the end (~0.6 GB).
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
        if kind == "int8-torchao":  # torchao 0.18 Int8Tensor: float32 scale + int8 zero point per row
            return self.linear_weight + 5 * self.linear_rows + 2 * self.other
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
        self.meta: dict[int, tuple] = {}  # storage id -> (shape, dtype) of the first tensor saved on it
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
            self.meta.setdefault(key, (tuple(t.shape), str(t.dtype).replace("torch.", "")))
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


class TrainerEmulation(TorchFunctionMode):
    """CUDA bf16 autocast's rules for the ops that matter here (autocast has no meta backend): F.linear (and mm)
    in bf16, F.layer_norm in float32; casts are ordinary (autograd-recorded) ``.to`` copies, as autocast's are.

    ``int8_weights``: frozen base weights to treat as torchao 0.18 ``Int8Tensor`` (per-row weight-only), whose
    ``F.linear`` override runs above autograd as ``mm(x, qdata.t().to(x.dtype)) * scale (+ bias)``: the
    int8 -> float copy of the weight is what autograd then saves for the input gradient."""

    LOW, HIGH = torch.bfloat16, torch.float32

    def __init__(self, int8_weights=()):
        super().__init__()
        self.int8 = {id(w): w for w in int8_weights}
        self.qdata: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _cast(obj, dtype):
        if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.dtype != dtype:
            return obj.to(dtype)
        return obj

    def _int8_linear(self, x, weight, bias=None):
        if id(weight) not in self.qdata:  # the quantized storage (a parameter: never counted as saved)
            self.qdata[id(weight)] = (torch.empty(weight.shape, device=weight.device, dtype=torch.int8),
                                      torch.empty(weight.shape[0], 1, device=weight.device, dtype=torch.float32))
        qdata, scale = self.qdata[id(weight)]
        output_dtype = x.dtype
        w = self._cast(qdata.t().to(output_dtype), self.LOW)  # torchao's .to(output_dtype), then autocast's mm cast
        m = torch.mm(self._cast(x.reshape(-1, x.shape[-1]), self.LOW), w)
        y = m * scale.to(m.dtype).flatten()
        y = y.reshape(*x.shape[:-1], qdata.shape[0])
        if bias is not None:
            y += bias
        return y.to(output_dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self.int8:
                return self._int8_linear(*args, **kwargs)
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
    depth: str  # "full" (57 blocks run) or "2+2" (2 double + 2 single run, the rest added per block)
    double_block: int  # saved bytes of one double block (a steady-state one: not the first), its inputs excluded
    single_block: int
    double_square: int  # of which T x T (math attention)
    single_square: int
    block_inputs: int  # union of the 57 blocks' input storages
    outside: int  # saved by embedders, head and loss (not checkpointed), beyond block inputs
    no_checkpoint: int  # union of every saved storage
    breakdown: dict = field(default_factory=dict)  # block type -> [(shape, dtype, nbytes)] of its saved storages

    @property
    def recompute(self) -> int:
        return max(self.double_block, self.single_block)

    @property
    def checkpointed(self) -> int:
        return self.block_inputs + self.outside + self.recompute

    def totals(self):
        return self.double_block, self.single_block, self.block_inputs, self.outside, self.no_checkpoint


@contextlib.contextmanager
def truncated(model: nn.Module, double: int | None, single: int | None):
    """Run only the first ``double`` / ``single`` blocks (None = all)."""
    saved = model.transformer_blocks, model.single_transformer_blocks
    if double is not None:
        model.transformer_blocks = nn.ModuleList(list(saved[0])[:double])
        model.single_transformer_blocks = nn.ModuleList(list(saved[1])[:single])
    try:
        yield
    finally:
        model.transformer_blocks, model.single_transformer_blocks = saved


def measure_activations(model: nn.Module, batch: int, resolution: int, precision: str, attention: str,
                        full_depth: bool = False) -> ActivationResult:
    """One training forward on meta under the saved-tensor meter (see the module docstring).

    ``full_depth=False`` runs 2 double + 2 single blocks (the meta kernels are slow Python) and adds the other
    17 double and 36 single blocks from the second block of each type, which has the same shapes as all later
    ones; ``full_depth=True`` runs all 57 (``report`` checks that both agree on one configuration)."""
    from shortcutfm.models.diffusers.families.flux import unpack_latents

    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    run_double, run_single = (n_double, n_single) if full_depth else (min(2, n_double), min(2, n_single))
    latent = resolution // 8  # VAE factor 8; packed 2x2 -> (res/16)^2 tokens
    image_tokens = (latent // 2) ** 2
    meta = dict(device="meta", dtype=torch.bfloat16)
    inputs = dict(
        hidden_states=torch.empty(batch, image_tokens, 64, **meta),  # noisy latents: no grad, as in training
        encoder_hidden_states=torch.empty(batch, TEXT_TOKENS, 4096, **meta),
        pooled_projections=torch.empty(batch, 768, **meta),
        timestep=torch.empty(batch, **meta),
        guidance=torch.empty(batch, **meta),
        txt_ids=torch.zeros(TEXT_TOKENS, 3, **meta),
        img_ids=torch.zeros(image_tokens, 3, **meta),
    )
    attn_ctx = fused_attention() if attention == "fused" else contextlib.nullcontext()
    if precision == "bf16":
        cast_ctx = contextlib.nullcontext()
    else:  # trainer: fp32 LoRA under bf16 autocast; trainer-int8: the same on a torchao int8 weight-only base
        int8 = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
        int8 = int8 if precision == "trainer-int8" else []
        cast_ctx = TrainerEmulation(int8_weights=int8)
    with truncated(model, run_double, run_single):
        meter = SavedTensorMeter(model)
        meter.tokens = TEXT_TOKENS + image_tokens
        try:
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack), attn_ctx:
                with cast_ctx:
                    out = model(**inputs, return_dict=False)[0]
                prediction = unpack_latents(out, latent, latent).float()  # FluxVelocity returns latents.dtype
                target = torch.empty(prediction.shape, device="meta", dtype=torch.float32)
                loss = F.mse_loss(prediction, target, reduction="none").flatten(1).mean(1).mean()  # as scfm_loss
            if not loss.requires_grad:
                raise RuntimeError("no autograd graph: are the LoRA parameters trainable?")
        finally:
            meter.close()

    labels = list(meter.inputs)
    # storages in the inputs of more than one block: temb and the rotary tables (shared by all 57)
    seen, shared = set(), set()
    for label in labels:
        for key in meter.inputs[label]:
            (shared if key in seen else seen).add(key)
    block_input = {}
    for held in meter.inputs.values():
        block_input.update(held)
    everything = {}
    for d in meter.saved.values():
        everything.update(d)

    def own(label):
        """Saved storages of a block, its inputs excluded: what checkpointing recomputes for it."""
        return {k: v for k, v in meter.saved.get(label, {}).items() if k not in meter.inputs[label]}

    def steady(prefix, count):
        label = f"{prefix}{min(1, count - 1)}"
        mine = own(label)
        square = sum(v for k, v in meter.square.get(label, {}).items() if k in mine)
        sizes = {sum(own(f"{prefix}{i}").values()) for i in range(count)}
        # per extra block of this type: its own input storages, and every storage it saves that no other part does
        others = set()
        for other, d in meter.saved.items():
            if other != label:
                others.update(d)
        extra_inputs = sum(v for k, v in meter.inputs[label].items() if k not in shared)
        extra_saved = sum(v for k, v in meter.saved.get(label, {}).items() if k not in shared and k not in others)
        detail = sorted(((tuple(meter.meta[k][0]), meter.meta[k][1], v) for k, v in mine.items()), key=lambda x: -x[2])
        return max(sizes), square, extra_inputs, extra_saved, detail

    double_block, double_sq, double_in, double_saved, double_detail = steady("double", run_double)
    single_block, single_sq, single_in, single_saved, single_detail = steady("single", run_single)
    add_double, add_single = n_double - run_double, n_single - run_single
    outside = {k: v for k, v in meter.saved.get("outside", {}).items() if k not in block_input}
    return ActivationResult(
        batch=batch, resolution=resolution, precision=precision, attention=attention,
        depth="full" if full_depth else f"{run_double}+{run_single}",
        double_block=double_block, single_block=single_block, double_square=double_sq, single_square=single_sq,
        block_inputs=sum(block_input.values()) + add_double * double_in + add_single * single_in,
        outside=sum(outside.values()),
        no_checkpoint=sum(everything.values()) + add_double * double_saved + add_single * single_saved,
        breakdown={"double": double_detail, "single": single_detail},
    )


# ---------------------------------------------------------------------------------------------------- 4. tables


def table(headers, rows) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fits(total_bytes: float) -> list[int]:
    need = gib(total_bytes) + CUDA_CONTEXT_GIB
    return [g for g in GPUS_GIB if need <= (1 - HEADROOM) * g]


def report(rank: int, full_depth: bool = False, breakdown: bool = False) -> str:
    from shortcutfm.models.diffusers.families.flux import LORA_TARGETS

    t0 = time.perf_counter()
    model = build_meta_transformer()
    base = count_base(model)
    lora = count_lora(model, LORA_TARGETS, rank)
    peft_params = inject_student_lora(model, LORA_TARGETS, rank)
    if peft_params != lora.params:
        raise RuntimeError(f"peft injected {peft_params} LoRA parameters, the suffix count says {lora.params}")

    results: dict[tuple, ActivationResult] = {}
    check = None
    for precision, lora_dtype in (("bf16", torch.bfloat16), ("trainer", torch.float32), ("trainer-int8", torch.float32)):
        set_lora_dtype(model, lora_dtype)
        for attention in ("math", "fused") if precision != "trainer-int8" else ("fused",):
            for res in RESOLUTIONS:
                for b in ACT_BATCHES:
                    results[(precision, attention, res, b)] = measure_activations(model, b, res, precision, attention,
                                                                                 full_depth=full_depth)
        if precision == "trainer" and not full_depth:  # the 2+2 extrapolation against a full 57-block forward
            full = measure_activations(model, 2, 512, "trainer", "fused", full_depth=True)
            part = results[("trainer", "fused", 512, 2)]
            check = (full, part)
            if full.totals() != part.totals():
                raise RuntimeError(f"2+2 extrapolation {part.totals()} != full depth {full.totals()}")
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
        ["int8 as torchao 0.18 stores it", "linear weights 1 B/elem + fp32 scale + int8 zero point per row; rest bf16",
         fmt(base.bytes("int8-torchao"))],
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
               "(emulated: F.linear / mm in bf16, F.layer_norm in float32), as `train.mixed_precision: bf16` runs; "
               "also the NF4 route (bitsandbytes' 4-bit matmul saves only the packed weight). `trainer-int8`: the "
               "same on a torchao int8 weight-only base, whose linear override saves a bf16 copy of each frozen "
               "weight for backward (in the recomputed block and the embedders/head).\n")
    out.append("**Residual stream.** With the bf16 base, autocast's bf16 linears keep block inputs bf16. torchao's "
               "override returns its input's dtype, and the AdaLN-modulated inputs are float32 under autocast, so on the "
               "int8 base the MLP outputs and with them the residual stream become float32: the block inputs double.\n")
    if check is not None:
        full, _ = check
        out.append(f"**Depth.** Each configuration runs 2 double + 2 single blocks on meta and adds the other 17 + 36 "
                   "blocks from the second block of each type (all later blocks have its shapes). Check: a full "
                   f"57-block forward (trainer, fused, 512px, batch 2) gives exactly the same bytes "
                   f"(checkpointed {fmt(full.checkpointed, 3)} GiB, no checkpointing {fmt(full.no_checkpoint, 3)} GiB).\n")
    else:
        out.append("**Depth.** Every configuration ran all 57 blocks on meta (`--full-depth`).\n")
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

    if breakdown:
        r = results[("trainer", "fused", 1024, 1)]
        for kind in ("double", "single"):
            out.append(f"Saved storages of one {kind} block (trainer, fused, 1024px, batch 1), largest first:\n")
            out += table(["shape", "dtype", "MiB"], [[str(list(shape)), dt, f"{n / 2**20:.1f}"] for shape, dt, n in r.breakdown[kind]])
            out.append("")

    out.append("## 4. Totals and GPU fit\n")
    out.append(f"total = base + 3 adapters + gradients + optimizer + checkpointed activations with fused attention "
               "(`trainer` for the bf16 and NF4 bases, `trainer-int8` for int8; int8 base as the rule of section 1). "
               f"A GPU fits when total + {CUDA_CONTEXT_GIB:.0f} GiB CUDA context <= "
               f"{100 * (1 - HEADROOM):.0f}% of its memory (10% headroom: allocator fragmentation and cache, cuBLAS "
               "workspaces, backward's transient gradients). 24 / 48 / 80 GB cards taken as 24 / 48 / 80 GiB. "
               "Cell: total GiB -> smallest card that fits, and so every larger one (`-` = none of them).\n")
    headers = ["base", "optimizer"] + [f"{res}px b{b}" for res in RESOLUTIONS for b in TOTAL_BATCHES]
    rows = []
    for kind in ("bf16", "int8", "nf4"):
        for opt in ("adamw", "adamw8bit"):
            static = base.bytes(kind) + adapters + grads + lora.optimizer_bytes(opt)
            row = [kind, opt]
            for res in RESOLUTIONS:
                for b in TOTAL_BATCHES:
                    total = static + results[("trainer-int8" if kind == "int8" else "trainer", "fused", res, b)].checkpointed
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
        "- Autocast is emulated for F.linear / mm / F.layer_norm only; its cast cache holds a bf16 copy of the student "
        f"adapter ({fmt(2 * lora.params)} GiB) until the forward ends (freed before backward; not in the totals).",
        "- Quantized bases: the int8 and NF4 kernels' transient dequantized weights (one layer at a time: at most "
        "3072 x 18432 = 0.1 GiB in bf16, 0.2 GiB as torchao's float32 copy of an fp32 input) are not counted; diffusers "
        "may leave a few modules unquantized. The int8 / NF4 backward behaviour is read from torchao 0.18 / "
        "bitsandbytes 0.50 sources, not run. Verify a chosen route on the GPU with `torch.cuda.max_memory_allocated` "
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
    parser.add_argument("--full-depth", action="store_true",
                        help="run all 57 blocks for every configuration (slow: about 3 s each) instead of 2+2 extrapolated")
    parser.add_argument("--breakdown", action="store_true", help="also list the saved tensors of one block of each type")
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error("--rank must be >= 1")
    text = report(args.rank, full_depth=args.full_depth, breakdown=args.breakdown)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
