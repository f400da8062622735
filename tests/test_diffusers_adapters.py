"""Family adapters: the velocity contract and each boundary conversion (packing, x1000, inverted time), the
guidance rules that differ by family, and the latent codecs (pixels <-> the contract's latents)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from diffusers_fixtures import FAMILY_NAMES, tiny_cond, tiny_latents, tiny_pipeline, tiny_transformer
from shortcutfm.models.diffusers import (
    FAMILIES, FLUX, FLUX2, LUMINA2, QWEN_IMAGE, SD3, WAN, get_family, load_transformer, sampling_grid,
)
from shortcutfm.models.diffusers.families import flux2
from shortcutfm.models.diffusers.families.flux import latent_image_ids, pack_latents, unpack_latents
from shortcutfm.models.diffusers.families.qwen_image import token_norm_rescale

torch.set_num_threads(1)


class Recorder:
    """Records the keyword arguments and the first output of the transformer's forward."""

    def __init__(self, transformer):
        self.kwargs, self.output = None, None
        transformer.register_forward_pre_hook(self.before, with_kwargs=True)
        transformer.register_forward_hook(self.after)

    def before(self, module, args, kwargs):
        self.kwargs = dict(kwargs)

    def after(self, module, args, output):
        self.output = output[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_contract_shape_dtype_and_rows_are_independent(family):
    velocity = get_family(family).velocity(tiny_transformer(family))
    latents, sigma, cond = tiny_latents(family), torch.tensor([0.9, 0.3]), tiny_cond(family)
    with torch.no_grad():
        v = velocity(latents, sigma, **cond)
        row = velocity(latents[1:], sigma[1:], **{k: t[1:] for k, t in cond.items()})
    assert v.shape == latents.shape and v.dtype == latents.dtype
    torch.testing.assert_close(v[1:], row, atol=1e-5, rtol=1e-5)


def test_flux_packing_layout_and_round_trip():
    latents = torch.randn(2, 4, 6, 8)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 3 * 4, 16)
    # token (r, c) holds channel ch of pixel (2r + dy, 2c + dx) at position ch * 4 + dy * 2 + dx
    for r, c, ch, dy, dx in [(0, 0, 0, 0, 0), (1, 2, 3, 1, 0), (2, 3, 1, 1, 1), (0, 1, 2, 0, 1)]:
        assert tokens[1, r * 4 + c, ch * 4 + dy * 2 + dx] == latents[1, ch, 2 * r + dy, 2 * c + dx]
    assert torch.equal(unpack_latents(tokens, 6, 8), latents)
    ids = latent_image_ids(6, 8)
    assert ids.shape == (12, 3) and ids[:, 0].eq(0).all()
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # token 5 = row 1, column 1 of a 3 x 4 token grid


def test_flux_passes_sigma_raw_guidance_and_ids():
    transformer = tiny_transformer("flux")
    record = Recorder(transformer)
    sigma, cond = torch.tensor([0.8, 0.25]), tiny_cond("flux")
    latents = tiny_latents("flux")
    with torch.no_grad():
        v = FLUX.velocity(transformer)(latents, sigma, **cond)
    kwargs = record.kwargs
    assert torch.equal(kwargs["timestep"], sigma)  # FluxPipeline passes (1000 sigma) / 1000
    assert torch.equal(kwargs["guidance"], cond["guidance"])  # raw value; the model multiplies by 1000
    assert torch.equal(kwargs["hidden_states"], pack_latents(latents))
    assert torch.equal(kwargs["img_ids"], latent_image_ids(8, 8))
    assert torch.equal(kwargs["txt_ids"], torch.zeros(6, 3))
    assert torch.equal(v, unpack_latents(record.output, 8, 8))


def test_sd3_timestep_is_sigma_times_1000():
    transformer = tiny_transformer("sd3")
    record = Recorder(transformer)
    sigma = torch.tensor([0.8, 0.25])
    with torch.no_grad():
        v = SD3.velocity(transformer)(tiny_latents("sd3"), sigma, **tiny_cond("sd3"))
    torch.testing.assert_close(record.kwargs["timestep"], torch.tensor([800.0, 250.0]))
    assert torch.equal(v, record.output)


def test_lumina2_time_is_inverted_and_velocity_negated():
    transformer = tiny_transformer("lumina2")
    record = Recorder(transformer)
    sigma, cond = torch.tensor([0.8, 0.25]), tiny_cond("lumina2")
    with torch.no_grad():
        v = LUMINA2.velocity(transformer)(tiny_latents("lumina2"), sigma, **cond)
    torch.testing.assert_close(record.kwargs["timestep"], torch.tensor([0.2, 0.75]))
    assert torch.equal(record.kwargs["encoder_attention_mask"], cond["prompt_attention_mask"])
    assert torch.equal(v, -record.output)


def test_qwen_image_passes_sigma_packed_tokens_mask_and_shapes():
    transformer = tiny_transformer("qwen_image")
    record = Recorder(transformer)
    sigma, cond, latents = torch.tensor([0.8, 0.25]), tiny_cond("qwen_image"), tiny_latents("qwen_image")
    with torch.no_grad():
        v = QWEN_IMAGE.velocity(transformer)(latents, sigma, **cond)
    kwargs = record.kwargs
    assert torch.equal(kwargs["timestep"], sigma)  # QwenImagePipeline passes t / 1000
    assert torch.equal(kwargs["hidden_states"], pack_latents(latents))
    assert torch.equal(kwargs["encoder_hidden_states_mask"], cond["prompt_embeds_mask"])
    assert kwargs["img_shapes"] == [[(1, 4, 4)]] * 2  # (frames, token rows, token columns) per sample
    assert torch.equal(v, unpack_latents(record.output, 8, 8))  # no sign flip


def test_qwen_image_guidance_keeps_each_tokens_conditional_norm():
    """Qwen's true CFG: the guided velocity of every 2x2 patch (one token) has the norm of the conditional one,
    and its direction is the plain rule's."""
    v_cond, v_uncond = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    plain = v_cond + 3.0 * (v_cond - v_uncond)
    out = token_norm_rescale(v_cond, plain)
    norms = lambda x: pack_latents(x).norm(dim=-1)  # noqa: E731 (per-token norms)
    torch.testing.assert_close(norms(out), norms(v_cond))
    cosine = torch.nn.functional.cosine_similarity(pack_latents(out), pack_latents(plain), dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    assert QWEN_IMAGE.guidance.pipeline_kwargs(3.0) == {"true_cfg_scale": 4.0, "negative_prompt": ""}
    assert QWEN_IMAGE.guidance.rescale is token_norm_rescale and SD3.guidance.rescale is None


def test_flux2_passes_sigma_row_major_tokens_and_four_axis_ids():
    transformer = tiny_transformer("flux2")
    record = Recorder(transformer)
    sigma, latents = torch.tensor([0.8, 0.25]), torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        v = FLUX2.velocity(transformer)(latents, sigma, **tiny_cond("flux2"))
    kwargs = record.kwargs
    assert torch.equal(kwargs["timestep"], sigma)  # Flux2KleinPipeline passes t / 1000
    tokens = kwargs["hidden_states"]
    assert tokens.shape == (2, 12, 16) and torch.equal(tokens[1, 1 * 4 + 2], latents[1, :, 1, 2])  # cell (1, 2)
    assert kwargs["img_ids"][6].tolist() == [0, 1, 2, 0] and kwargs["txt_ids"][5].tolist() == [0, 0, 0, 5]
    assert kwargs["guidance"] is None
    assert torch.equal(v, record.output.transpose(1, 2).reshape(2, 16, 3, 4))  # no sign flip


def test_flux2_dynamic_shift_is_its_pipelines_rule():
    """The family's "dynamic" grid is FLUX.2's own: exp(mu(tokens, steps)), depending on the step count too, and
    the training default's alternative shift is that rule's 4-step shift at 1024^2."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from shortcutfm.core.grids import sigma_grid

    for steps, side in [(4, 64), (32, 64), (3, 32)]:
        expected = sigma_grid(steps, mu=compute_empirical_mu(side * side, steps), dtype=torch.float64)
        torch.testing.assert_close(sampling_grid(FLUX2, steps, side, side), expected)
    assert not torch.allclose(sampling_grid(FLUX2, 4, 64, 64)[1], sampling_grid(FLUX2, 32, 64, 64)[8])
    assert FLUX2.alt_shift == flux2.FEW_STEP_SHIFT  # family_defaults holds the number without diffusers


def test_wan_takes_video_latents_and_timestep_times_1000():
    transformer = tiny_transformer("wan")
    record = Recorder(transformer)
    sigma, latents = torch.tensor([0.8, 0.25]), tiny_latents("wan")
    assert latents.ndim == 5
    with torch.no_grad():
        v = WAN.velocity(transformer)(latents, sigma, **tiny_cond("wan"))
    torch.testing.assert_close(record.kwargs["timestep"], torch.tensor([800.0, 250.0]))
    assert torch.equal(record.kwargs["hidden_states"], latents)
    assert torch.equal(v, record.output)
    with pytest.raises(ValueError, match="B, C, F, H, W"):
        WAN.velocity(transformer)(latents[:, :, 0], sigma, **tiny_cond("wan"))


@pytest.mark.parametrize("family", ["sd3", "flux2", "qwen_image", "wan"])
def test_latent_codec_normalises_as_the_pipeline_decodes(family):
    """codec.decode(codec.encode(x)) equals the VAE's own round trip, and decode inverts the normalisation the way
    the pipeline does before its VAE (SD3: /scaling + shift; Qwen/Wan: * latents_std + latents_mean; FLUX.2:
    patchify and batch-norm statistics)."""
    pipe = tiny_pipeline(family)
    codec, vae = get_family(family).latents, pipe.vae
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = codec.encode(vae, pixels)
    expected_shape = {"wan": (2, 4, 1, 8, 8), "flux2": (2, 16, 4, 4)}.get(family, (2, 4, 8, 8))
    assert latents.shape == expected_shape
    with torch.no_grad():
        if family == "flux2":
            raw = vae.encode(pixels).latent_dist.mode()
            patches = torch.cat([raw[:, c:c + 1, dy::2, dx::2] for c in range(4) for dy in (0, 1) for dx in (0, 1)], 1)
            std = (vae.bn.running_var + vae.config.batch_norm_eps).sqrt().view(1, -1, 1, 1)
            assert vae.bn.running_mean.abs().max() > 0.1  # the normalisation is really exercised
            torch.testing.assert_close(latents, (patches - vae.bn.running_mean.view(1, -1, 1, 1)) / std)
            torch.testing.assert_close(codec.from_pipeline(vae, raw), latents)  # the pipeline's latent output
            round_trip = vae.decode(raw).sample
        elif family == "sd3":
            raw = vae.encode(pixels).latent_dist.mean
            torch.testing.assert_close(latents, (raw - vae.config.shift_factor) * vae.config.scaling_factor)
            round_trip = vae.decode(raw).sample
        else:
            raw = vae.encode(pixels.unsqueeze(2)).latent_dist.mean
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            assert not torch.allclose(mean, torch.zeros_like(mean))  # the normalisation is really exercised
            torch.testing.assert_close(latents, ((raw - mean) / std).reshape(expected_shape))
            round_trip = vae.decode(raw).sample[:, :, 0]
    torch.testing.assert_close(codec.decode(vae, latents), round_trip, atol=1e-5, rtol=1e-5)
    assert codec.latent_shape(pipe, 16, 16) == expected_shape[1:]
    size = codec.pipeline_size(pipe, (4, 3, 8, 8) if family == "wan" else expected_shape[1:])
    assert size == ({"height": 16, "width": 16, "num_frames": 5} if family == "wan" else {"height": 16, "width": 16})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bfloat16_transformer_keeps_the_callers_dtype(family):
    velocity = get_family(family).velocity(tiny_transformer(family, dtype=torch.bfloat16))
    with torch.no_grad():
        v = velocity(tiny_latents(family), torch.tensor([0.5, 0.5]), **tiny_cond(family))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_input_errors_name_the_fix():
    velocity = FLUX.velocity(tiny_transformer("flux"))
    cond = tiny_cond("flux")
    with pytest.raises(ValueError, match="guidance"):
        velocity(tiny_latents("flux"), torch.rand(2), **{k: v for k, v in cond.items() if k != "guidance"})
    with pytest.raises(ValueError, match="even height"):
        velocity(torch.randn(2, 4, 7, 8), torch.rand(2), **cond)
    with pytest.raises(ValueError, match="sigma must have shape"):
        velocity(tiny_latents("flux"), torch.rand(1), **cond)
    with pytest.raises(ValueError, match="B, C, H, W"):
        velocity(torch.randn(2, 16, 4), torch.rand(2), **cond)


def test_registry_and_load_transformer(tmp_path):
    assert set(FAMILIES) == {"flux", "sd3", "lumina2", "flux2", "qwen_image", "wan"}
    with pytest.raises(ValueError, match="choose one of"):
        get_family("sdxl")
    tiny_transformer("sd3").save_pretrained(tmp_path / "transformer")
    loaded = load_transformer("sd3", str(tmp_path), dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and not any(p.requires_grad for p in loaded.parameters())


def test_jump_sampling_defaults_per_family():
    assert FLUX.jump_sampling().alt_shift == "dynamic"
    assert SD3.jump_sampling(alt_shift_prob=0.0).alt_shift_prob == 0.0
    assert SD3.jump_sampling().shift_range == (2.5, 4.5)


def test_public_api_names_import():
    import shortcutfm.models.diffusers as package

    assert package.__all__ and all(hasattr(package, name) for name in package.__all__)
