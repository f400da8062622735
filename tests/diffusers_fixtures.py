"""Tiny, seeded diffusers models and pipelines built from config, offline (for tests of any layer).

Every builder runs under its own RNG fork, so it neither reads nor changes the global torch seed: the same
``seed`` always gives the same weights. Nothing is downloaded (tokenizers are word-level vocabularies built
in memory). Families: ``"flux"``, ``"sd3"``, ``"lumina2"``.

    transformer = tiny_transformer("flux")          # the denoiser alone
    pipe = tiny_pipeline("sd3")                     # full pipeline: VAE, text encoders, tokenizers, scheduler
    pipe = tiny_pipeline("flux", transformer=transformer)
    latents = tiny_latents("flux", batch=2)         # (B, C, H, W) noise in the VAE-latent layout
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

FAMILY_NAMES = ("flux", "sd3", "lumina2")
WORDS = "a photo of cat dog red blue small large tree house in the on sky".split()
TEXT_LENGTH = 8  # tokens per prompt of the CLIP/T5 encoders (CLIP max length, max_sequence_length)
#: max_sequence_length to pass to each family's pipeline (Lumina 2 prepends a ~35-token system prompt)
SEQUENCE_LENGTH = {"flux": TEXT_LENGTH, "sd3": TEXT_LENGTH, "lumina2": 48}
LATENT_CHANNELS = {"flux": 4, "sd3": 4, "lumina2": 4}
LATENT_SIZE = 8  # latent height = width


def _build(seed: int, factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def tiny_transformer(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny denoiser of ``family`` (tens of thousands of parameters), float32 unless ``dtype`` says."""
    factories = {
        "flux": lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
        "sd3": lambda: SD3Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=64,
            out_channels=4, pos_embed_max_size=16,
        ),
        "lumina2": lambda: Lumina2Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
            num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=16,
            axes_dim_rope=(4, 2, 2), axes_lens=(64, 16, 16), cap_feat_dim=32,
        ),
    }
    if family not in factories:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILY_NAMES}")
    return _build(seed, factories[family]).to(dtype)


def tiny_latents(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Standard-normal (B, C, H, W) latents in the VAE-latent layout of ``family``'s tiny pipeline."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, LATENT_CHANNELS[family], LATENT_SIZE, LATENT_SIZE, generator=generator)


def tiny_cond(family: str, batch: int = 2, seed: int = 0) -> dict:
    """Random cond for ``family``'s tiny transformer: its cache keys and widths (plus Flux's guidance)."""
    g = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(batch, 6, 32, generator=g)}
    if family in ("flux", "sd3"):
        cond["pooled_prompt_embeds"] = torch.randn(batch, 32 if family == "flux" else 64, generator=g)
    if family == "lumina2":
        mask = torch.ones(batch, 6, dtype=torch.long)
        mask[0, 4:] = 0  # padded text in the first row
        cond["prompt_attention_mask"] = mask
    if family == "flux":
        cond["guidance"] = torch.tensor([1.0, 4.5])[:batch]
    return cond


def tiny_tokenizer(max_length: int = TEXT_LENGTH) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
    vocab.update({word: i + len(vocab) for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", model_max_length=max_length,
    )


VOCAB_SIZE = len(WORDS) + 4


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, projection_dim=32, max_position_embeddings=TEXT_LENGTH, pad_token_id=0,
        bos_token_id=2, eos_token_id=3,
    )


def _t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4))


def _vae(latent_channels: int, shift_factor: float | None) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=1.5, shift_factor=shift_factor,
    )


def tiny_scheduler(family: str) -> FlowMatchEulerDiscreteScheduler:
    """The family's usual scheduler settings (Flux: dynamic shift; SD3: shift 3; Lumina 2: shift 6)."""
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FlowMatchEulerDiscreteScheduler(shift=3.0 if family == "sd3" else 6.0)


def tiny_pipeline(family: str, transformer: torch.nn.Module | None = None, seed: int = 0):
    """A complete tiny pipeline of ``family`` (float32, CPU); ``transformer`` defaults to a fresh tiny one."""
    transformer = transformer if transformer is not None else tiny_transformer(family, seed)
    scheduler = tiny_scheduler(family)
    if family == "flux":
        return FluxPipeline(
            transformer=transformer, scheduler=scheduler, vae=_build(seed + 1, lambda: _vae(4, 0.1)),
            text_encoder=_build(seed + 2, lambda: CLIPTextModel(_clip_config())), tokenizer=tiny_tokenizer(),
            text_encoder_2=_build(seed + 3, _t5), tokenizer_2=tiny_tokenizer(),
        )
    if family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=_build(seed + 1, lambda: _vae(4, 0.1)),
            text_encoder=_build(seed + 2, lambda: CLIPTextModelWithProjection(_clip_config())),
            tokenizer=tiny_tokenizer(),
            text_encoder_2=_build(seed + 3, lambda: CLIPTextModelWithProjection(_clip_config())),
            tokenizer_2=tiny_tokenizer(), text_encoder_3=_build(seed + 4, _t5), tokenizer_3=tiny_tokenizer(),
        )
    if family == "lumina2":
        gemma = Gemma2Config(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=2,
            eos_token_id=3,
        )
        return Lumina2Pipeline(
            transformer=transformer, scheduler=scheduler, vae=_build(seed + 1, lambda: _vae(4, 0.1)),
            text_encoder=_build(seed + 2, lambda: Gemma2Model(gemma)),
            tokenizer=tiny_tokenizer(SEQUENCE_LENGTH["lumina2"]),
        )
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILY_NAMES}")


def quiet_tiny_pipelines(families) -> dict:
    """Tiny pipelines by family name, with their progress bars off (for module-scoped test fixtures)."""
    built = {family: tiny_pipeline(family) for family in families}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built
