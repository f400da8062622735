"""A real, small ``StableDiffusion3Pipeline`` for the t2i world, built from configs and trained here.

Components (all saved with ``save_pretrained``, safetensors, loadable with ``DiffusionPipeline.from_pretrained``):

* two word-level tokenizers over the world's vocabulary (``[BOS] words [EOS]``, padded to 24 tokens);
* two frozen, randomly initialised 2-layer ``CLIPTextModelWithProjection`` encoders (width 32, projection 32).
  SD3 conditions on their penultimate hidden states (joint width 64) and pooled projections (64). Random text
  encoders are enough here: the words are few, and the transformer learns what they mean;
* no T5 (``text_encoder_3=None``, a mode SD3 supports: its part of the prompt embedding is zeros); prepare with
  ``--max-sequence-length 4`` to keep those zero tokens few;
* an ``AutoencoderKL`` (32x32x3 <-> 16x16x4, trained on world renders by :func:`train_vae`; its scaling and
  shift factors are set from the latents' statistics);
* an ``SD3Transformer2DModel`` (6 joint blocks of width 64, 4x4 latent patches: 16 image tokens), random at first
  (:func:`build_base_pipeline`) and trained from scratch with flow matching by ``shortcutfm train`` (see
  ``docs/proving_ground.md`` for the commands).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import world

TEXT_LENGTH = 24  # CLIP tokens per prompt: the longest caption is 21 words plus [BOS] and [EOS]
T5_LENGTH = 4  # the zero "T5" tokens SD3 appends when it has no T5 encoder
PATCH_SIZE = 4  # 4x4 latent patches: 16 image tokens, 2x2 per quadrant
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MARKER = "t2i_world.json"  # written into a world pipeline's folder; copied into pipelines trained from it


def world_tokenizer():
    """A word-level fast tokenizer over :func:`world.vocabulary`, adding ``[BOS]``/``[EOS]``, padding to 24."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({word: index + len(vocab) for index, word in enumerate(world.vocabulary())})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=TEXT_LENGTH,
    )


def _text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(world.vocabulary()), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=32, max_position_embeddings=TEXT_LENGTH,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config)
        with torch.no_grad():  # unit-scale word vectors (CLIP's 0.02 init would make every prompt look alike)
            model.text_model.embeddings.token_embedding.weight.normal_(0.0, 1.0)
            model.text_model.embeddings.position_embedding.weight.normal_(0.0, 0.5)
    return model.eval().requires_grad_(False)


def build_vae(seed: int = 0):
    """The untrained autoencoder: 32x32x3 <-> 16x16x4."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=world.IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0,
        )


@dataclass(frozen=True)
class TransformerShape:
    """Size of the SD3 transformer (defaults: the bundled teacher's, about 0.9 M parameters)."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 16


def build_transformer(shape: TransformerShape = TransformerShape(), seed: int = 0):
    from diffusers import SD3Transformer2DModel

    width = shape.num_attention_heads * shape.attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3Transformer2DModel(
            sample_size=world.IMAGE_SIZE // 2, patch_size=PATCH_SIZE, in_channels=4, out_channels=4,
            num_layers=shape.num_layers, attention_head_dim=shape.attention_head_dim,
            num_attention_heads=shape.num_attention_heads, joint_attention_dim=64, caption_projection_dim=width,
            pooled_projection_dim=64, pos_embed_max_size=world.IMAGE_SIZE // 2 // PATCH_SIZE,
        )


def build_base_pipeline(vae, shape: TransformerShape = TransformerShape(), seed: int = 0):
    """The full pipeline with a random transformer (what ``train.mode=pretrain`` starts from)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=build_transformer(shape, seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=_text_encoder(seed + 1), tokenizer=world_tokenizer(),
        text_encoder_2=_text_encoder(seed + 2), tokenizer_2=world_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )


def train_vae(steps: int = 2500, batch_size: int = 16, lr: float = 1e-3, kl_weight: float = 1e-5, seed: int = 0,
              progress: bool = True):
    """Train :func:`build_vae` on fresh world renders (MSE on a posterior sample + a small KL), then set
    ``scaling_factor = 1 / std`` and ``shift_factor = mean`` of the latent means on 2,048 renders."""
    vae = build_vae(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    for step in tqdm(range(steps), desc="training the t2i VAE", disable=not progress):
        scenes = world.random_scenes(batch_size, seed=seed * 1_000_003 + step, split="all")
        pixels = torch.from_numpy(world.render_many(scenes, seed=seed * 7_919 + step)) * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = (reconstruction - pixels).square().mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        scenes = world.random_scenes(2048, seed=seed + 12345, split="all")
        pixels = torch.from_numpy(world.render_many(scenes, seed=seed + 54321)) * 2 - 1
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1.0 / means.std()))
    return vae


@torch.no_grad()
def vae_reconstruction_error(vae, count: int = 512, seed: int = 7) -> float:
    """Mean squared error (pixels in [-1, 1]) of encode-decode on fresh renders."""
    scenes = world.random_scenes(count, seed=seed, split="all")
    pixels = torch.from_numpy(world.render_many(scenes, seed=seed + 1)) * 2 - 1
    out = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in pixels.split(128)])
    return float((out - pixels).square().mean())


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(B, 4, 16, 16) latents in the cached layout -> (B, 3, 32, 32) images in [-1, 1] (clamped), with the
    pipeline's ``vae`` (the inverse of the scaling and shift that prepare applies)."""
    out = []
    for chunk in latents.split(batch_size):
        scaled = chunk.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        out.append(vae.decode(scaled).sample.float().clamp(-1, 1))
    return torch.cat(out)


def save_pipeline(pipe, directory: str | Path) -> Path:
    """``save_pretrained`` (safetensors) plus the world marker file that tells shortcutfm what it is."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    # save_pretrained leaves the absent T5 out of model_index.json; from_pretrained then refuses the folder.
    # [null, null] is how diffusers records an optional component that is not there.
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in ("text_encoder_3", "tokenizer_3"):
        index.setdefault(name, [None, None])
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    info = {"world": "shortcutfm.t2i", "image_size": world.IMAGE_SIZE, "max_sequence_length": T5_LENGTH}
    (directory / MARKER).write_text(json.dumps(info, indent=2))
    return directory
