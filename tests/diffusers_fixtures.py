"""Tiny, seeded diffusers models and pipelines built from config, offline (for tests of any layer).

Every builder runs under its own RNG fork, so it neither reads nor changes the global torch seed: the same
``seed`` always gives the same weights. Nothing is downloaded (tokenizers are word-level vocabularies built
in memory). Families: ``"flux"``, ``"sd3"``, ``"lumina2"``, ``"flux2"`` (latents (B, 16, H, W): the 4-channel VAE
latent patchified 2x2), ``"qwen_image"``, ``"wan"`` (video: latents
(B, C, F, H, W) with ``LATENT_FRAMES`` frames, ``NUM_FRAMES`` video frames).

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
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

FAMILY_NAMES = ("flux", "sd3", "lumina2", "flux2", "qwen_image", "wan")
WORDS = "a photo of cat dog red blue small large tree house in the on sky".split()
TEXT_LENGTH = 8  # tokens per prompt of the CLIP/T5 encoders (CLIP max length, max_sequence_length)
#: max_sequence_length to pass to each family's pipeline (Lumina 2 prepends a ~35-token system prompt)
SEQUENCE_LENGTH = {"flux": TEXT_LENGTH, "sd3": TEXT_LENGTH, "lumina2": 48, "flux2": TEXT_LENGTH,
                   "qwen_image": TEXT_LENGTH, "wan": TEXT_LENGTH}
LATENT_CHANNELS = {"flux": 4, "sd3": 4, "lumina2": 4, "flux2": 16, "qwen_image": 4, "wan": 4}
#: FLUX.2's chat template, reduced to what a word-level vocabulary can tokenise
FLUX2_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} {{ message['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}assistant{% endif %}")
#: Flux2KleinPipeline reads hidden layers (9, 18, 27) of its text encoder
FLUX2_TEXT_LAYERS = 27
LATENT_SIZE = 8  # latent height = width
NUM_FRAMES = 5  # Wan video frames of the tiny pipeline (4k + 1, as WanPipeline needs; temporal factor 2: 3 latent frames)
LATENT_FRAMES = 3
#: words of Qwen-Image's prompt template (its system prefix must tokenise to prompt_template_encode_start_idx = 34)
QWEN_TEMPLATE_WORDS = ("system user assistant Describe image by detailing color , shape size texture quantity text "
                       "spatial relationships objects and background :").split()
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "\n"]


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
        "flux2": lambda: Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        ),
        "qwen_image": lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        ),
        "wan": lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ),
    }
    if family not in factories:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILY_NAMES}")
    return _build(seed, factories[family]).to(dtype)


def tiny_latents(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Standard-normal (B, C, H, W) latents in the VAE-latent layout of ``family``'s tiny pipeline."""
    generator = torch.Generator().manual_seed(seed)
    frames = (LATENT_FRAMES,) if family == "wan" else ()
    return torch.randn(batch, LATENT_CHANNELS[family], *frames, LATENT_SIZE, LATENT_SIZE, generator=generator)


def tiny_cond(family: str, batch: int = 2, seed: int = 0) -> dict:
    """Random cond for ``family``'s tiny transformer: its cache keys and widths (plus Flux's guidance)."""
    g = torch.Generator().manual_seed(seed)
    width = 24 if family == "flux2" else 32  # FLUX.2: three layers of an 8-wide Qwen3
    cond = {"prompt_embeds": torch.randn(batch, 6, width, generator=g)}
    if family in ("flux", "sd3"):
        cond["pooled_prompt_embeds"] = torch.randn(batch, 32 if family == "flux" else 64, generator=g)
    if family in ("lumina2", "qwen_image"):
        mask = torch.ones(batch, 6, dtype=torch.long)
        mask[0, 4:] = 0  # padded text in the first row
        cond["prompt_attention_mask" if family == "lumina2" else "prompt_embeds_mask"] = mask
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


def _flux2_vae() -> AutoencoderKLFlux2:
    """2x downsampling, 4 latent channels, and batch-norm statistics far from (0, 1), so that the normalisation of
    FLUX.2's latents is really exercised."""
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32,
    )
    features = vae.bn.num_features
    vae.bn.running_mean.copy_(0.3 * torch.randn(features))
    vae.bn.running_var.copy_(0.5 + torch.rand(features))
    return vae


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Word level; the template's special tokens and newline are added tokens, so its prefix is 34 tokens."""
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for word in QWEN_SPECIAL + WORDS + QWEN_TEMPLATE_WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in QWEN_SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", unk_token="[UNK]",
                                   model_max_length=2048, padding_side="right")


def _wan_tokenizer() -> PreTrainedTokenizerFast:
    """Word level, appending EOS as umt5-xxl does (the empty prompt is one token)."""
    tokenizer = tiny_tokenizer(512)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A [EOS]", special_tokens=[("[EOS]", 3)])
    return tokenizer


def tiny_scheduler(family: str):
    """The family's usual scheduler settings (Flux: dynamic shift; SD3: shift 3; Lumina 2: shift 6; Qwen-Image:
    its dynamic shift with a terminal stretch; Wan: UniPC with flow shift 3)."""
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    if family == "flux2":  # FLUX.2's scheduler config (its pipeline computes mu itself)
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096, time_shift_type="exponential")
    if family == "qwen_image":
        return FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential", shift=1.0)
    if family == "wan":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                       num_train_timesteps=1000, solver_order=2)
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
    if family == "flux2":
        tokenizer = tiny_tokenizer(512)
        tokenizer.chat_template = FLUX2_CHAT_TEMPLATE
        qwen3 = Qwen3Config(
            vocab_size=VOCAB_SIZE, hidden_size=8, intermediate_size=16, num_hidden_layers=FLUX2_TEXT_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
        )
        return Flux2KleinPipeline(
            transformer=transformer, scheduler=scheduler, vae=_build(seed + 1, _flux2_vae), tokenizer=tokenizer,
            text_encoder=_build(seed + 2, lambda: Qwen3ForCausalLM(qwen3)),
        )
    if family == "qwen_image":
        tokenizer = _qwen_tokenizer()
        qwen = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1,
                             rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default"},
                             pad_token_id=0, bos_token_id=0, eos_token_id=0),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        )
        vae = _build(seed + 1, lambda: AutoencoderKLQwenImage(  # one downsampling: 2x, like the other tiny VAEs
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.2]))
        return QwenImagePipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer,
            text_encoder=_build(seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(qwen)),
        )
    if family == "wan":
        umt5 = UMT5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                          relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
        vae = _build(seed + 1, lambda: AutoencoderKLWan(  # 2x in space and in time
            base_dim=2, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
            latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 2.0, 0.5, 1.25],
            scale_factor_spatial=2, scale_factor_temporal=2))
        return WanPipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=_wan_tokenizer(),
            text_encoder=_build(seed + 2, lambda: UMT5EncoderModel(umt5)),
        )
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILY_NAMES}")


def quiet_tiny_pipelines(families) -> dict:
    """Tiny pipelines by family name, with their progress bars off (for module-scoped test fixtures)."""
    built = {family: tiny_pipeline(family) for family in families}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built
