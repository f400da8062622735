"""The kohya (sd-scripts / ComfyUI) export of a Flux LoRA: per-module alpha, fused qkv/linear1 as block-diagonal
LoRAs, read back by diffusers' own kohya converter into the same weights, and the same images in the pipeline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffusers_fixtures import SEQUENCE_LENGTH, tiny_latents, tiny_pipeline
from shortcutfm.cli import app
from shortcutfm.models.diffusers import LoraSettings, LoraStudent, export_lora, sample_with_pipeline
from shortcutfm.models.diffusers.kohya import KOHYA_WEIGHTS, export_kohya, read_diffusers_lora, to_kohya_flux

torch.set_num_threads(1)
FUSED_SINGLE = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".proj_mlp")
TOP_LEVEL = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def blocks_only(module: str) -> bool:
    """Modules diffusers 0.42 reads back from a kohya Flux file at any size: double blocks, and single blocks'
    linear2 / modulation (its converter hard-codes FLUX.1-dev's sizes for linear1, and drops the embedders' and final
    layer's keys, which it leaves without the ``transformer.`` prefix)."""
    if module.startswith(TOP_LEVEL):
        return False
    return not (module.startswith("single_transformer_blocks") and module.endswith(FUSED_SINGLE))


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    tiny_pipeline("flux").save_pretrained(root / "pipe")
    student = LoraStudent.from_pretrained("flux", str(root / "pipe"), lora=LoraSettings(rank=4, alpha=8),
                                          dtype=torch.float32, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in student.trainable_tensors().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    export_lora(student, root / "lora", include_ema=False)
    return root


def deltas(pairs, alpha, rank):
    return {module: (b @ a) * (alpha / rank) for module, (a, b) in pairs.items()}


def converted_deltas(kohya_state):
    """What diffusers' kohya reader makes of the file, as weight deltas (it folds alpha / rank into A)."""
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya_state))
    out = {}
    for key, a in converted.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[module] = converted[key.replace("lora_A", "lora_B")] @ a
    return out


def test_every_module_converts_back_to_the_same_weight_delta(flux_lora):
    pairs, alpha, rank = read_diffusers_lora(flux_lora / "lora" / "pytorch_lora_weights.safetensors")
    assert (alpha, rank) == (8.0, 4)
    kohya = to_kohya_flux(pairs, alpha, rank)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * alpha  # rank 3r, same alpha / r
    assert kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == alpha
    assert kohya["lora_unet_final_layer_linear.alpha"].item() == rank  # scale folded in: diffusers ignores it there
    small = {k: v for k, v in kohya.items() if "single_blocks" not in k or "linear1" not in k}
    want, got = deltas(pairs, alpha, rank), converted_deltas(small)
    assert set(got) == {m for m in want if not (m.startswith("single_transformer_blocks") and m.endswith(FUSED_SINGLE))}
    for module, delta in got.items():
        torch.testing.assert_close(delta, want[module], atol=1e-6, rtol=1e-5, msg=module)


def test_single_block_linear1_at_flux1_dev_size():
    """linear1 fuses q, k, v (3072 each) and the MLP input (12288): diffusers' reader splits the block-diagonal LoRA
    back into the four LoRAs."""
    generator = torch.Generator().manual_seed(1)
    sizes = {".attn.to_q": 3072, ".attn.to_k": 3072, ".attn.to_v": 3072, ".proj_mlp": 12288}
    pairs = {f"single_transformer_blocks.0{part}": (torch.randn(2, 3072, generator=generator),
                                                    torch.randn(out, 2, generator=generator))
             for part, out in sizes.items()}
    kohya = to_kohya_flux(pairs, alpha=1.0, rank=2)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 8)
    got, want = converted_deltas(kohya), deltas(pairs, 1.0, 2)
    assert set(got) == set(want)
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=1e-5, rtol=1e-5)


def test_the_kohya_file_gives_the_same_images_in_the_stock_pipeline(flux_lora, tmp_path):
    pairs, alpha, rank = read_diffusers_lora(flux_lora / "lora" / "pytorch_lora_weights.safetensors")
    kept = {m: p for m, p in pairs.items() if blocks_only(m)}
    state = {f"{m}.lora_{n}.weight": t for m, (a, b) in kept.items() for n, t in (("A", a), ("B", b))}
    FluxPipeline.save_lora_weights(tmp_path / "diffusers", transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata={"r": rank, "lora_alpha": alpha,
                                                                      "target_modules": sorted(kept)})
    export_kohya(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors", tmp_path / "kohya" / KOHYA_WEIGHTS)
    assert all(k.startswith("lora_unet_") for k in load_file(str(tmp_path / "kohya" / KOHYA_WEIGHTS)))
    noise = tiny_latents("flux", batch=2, seed=5)
    images = []
    for folder, weight_name in ((tmp_path / "diffusers", "pytorch_lora_weights.safetensors"),
                                (tmp_path / "kohya", KOHYA_WEIGHTS), (None, None)):
        pipe = FluxPipeline.from_pretrained(str(flux_lora / "pipe"))
        pipe.set_progress_bar_config(disable=True)
        if folder is not None:
            pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="scfm")
        images.append(sample_with_pipeline(pipe, ["a photo of a cat", "red tree in the sky"], num_steps=2,
                                           latents=noise, max_sequence_length=SEQUENCE_LENGTH["flux"]))
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=1e-4)
    assert (images[0] - images[2]).abs().max() > 1e-2  # the LoRA changes the images: not a vacuous comparison


def test_cli_export_and_its_errors(flux_lora, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export-kohya", str(flux_lora / "lora"), "--out", str(tmp_path / "k.safetensors")])
    assert result.exit_code == 0, result.output
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in load_file(str(tmp_path / "k.safetensors"))
    with pytest.raises(ValueError, match="Flux"):
        export_kohya(flux_lora / "lora" / "pytorch_lora_weights.safetensors", tmp_path / "x.safetensors", family="sd3")
    partial = {"transformer_blocks.0.attn.to_q": (torch.zeros(2, 4), torch.zeros(4, 2))}
    with pytest.raises(ValueError, match="only part"):
        to_kohya_flux(partial, 2.0, 2)
