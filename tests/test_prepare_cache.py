"""The prepared-data cache on its own (no diffusers): round trip, content keys, atomic/resumable writing, and
errors that name the broken file."""

import ast
import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

import shortcutfm.preparation as preparation
from shortcutfm.preparation import CacheError, CacheLayout, CacheWriter, LatentCache, RecordInfo, content_key

LAYOUT = CacheLayout(family="flux", model_id="tiny", height=16, width=16, max_sequence_length=8)


def record_tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(4, 8, 8, generator=generator),
        "prompt_embeds": torch.randn(8, 32, generator=generator),
        "pooled_prompt_embeds": torch.randn(32, generator=generator),
    }


UNCOND = {"prompt_embeds": torch.zeros(1, 8, 32), "pooled_prompt_embeds": torch.ones(1, 32)}


def write_cache(cache_dir, seeds, records_per_shard=3, layout=LAYOUT) -> list[str]:
    keys = []
    with CacheWriter(cache_dir, layout, {"source": "test"}, records_per_shard) as writer:
        if not writer.has_uncond:
            writer.write_uncond(UNCOND)
        for seed in seeds:
            key = content_key(seed.to_bytes(8, "little"), f"caption {seed}", {"test": 1})
            writer.add(RecordInfo(key, f"caption {seed}", f"{seed}.png"), record_tensors(seed))
            keys.append(key)
    return keys


def test_public_api_imports_without_diffusers():
    for name in preparation.__all__:
        assert getattr(preparation, name) is not None
    # The cache reader must not need the diffusers extra: no module-level import of diffusers or PIL.
    for module in Path(preparation.__file__).parent.glob("*.py"):
        for node in ast.parse(module.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any("diffusers" in name or "PIL" in name for name in names), f"{module.name}: {names}"


def test_round_trip_shapes_keys_and_get(tmp_path):
    keys = write_cache(tmp_path, range(7))
    cache = LatentCache(tmp_path)
    assert len(cache) == 7 and cache.keys == keys
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [shard["num_records"] for shard in manifest["shards"]] == [3, 3, 1]
    assert manifest["layout"]["family"] == "flux" and manifest["num_records"] == 7
    batch = cache.get(torch.tensor([5, 0]))
    assert batch["latents"].shape == (2, 4, 8, 8)
    assert batch["prompt_embeds"].shape == (2, 8, 32) and batch["pooled_prompt_embeds"].shape == (2, 32)
    assert torch.equal(batch["latents"][0], record_tensors(5)["latents"])
    assert torch.equal(cache.uncond["pooled_prompt_embeds"], UNCOND["pooled_prompt_embeds"])
    with pytest.raises(IndexError):
        cache.get(torch.tensor([7]))
    with pytest.raises(ValueError, match="1-D integer"):
        cache.get(torch.tensor([0.5]))


def test_rerun_skips_cached_and_appends_new(tmp_path):
    write_cache(tmp_path, range(4))
    shard_bytes = {path.name: path.read_bytes() for path in tmp_path.glob("shard-*")}
    write_cache(tmp_path, range(6))  # 0..3 are cached: only 4 and 5 are added
    cache = LatentCache(tmp_path)
    assert len(cache) == 6
    for name, data in shard_bytes.items():
        assert (tmp_path / name).read_bytes() == data  # existing shards are never rewritten


def test_content_key_depends_on_every_part():
    base = content_key(b"img", "a cat", {"height": 16})
    assert base == content_key(b"img", "a cat", {"height": 16})
    assert len({base, content_key(b"img2", "a cat", {"height": 16}), content_key(b"img", "a dog", {"height": 16}),
                content_key(b"img", "a cat", {"height": 32})}) == 4


def test_missing_or_corrupt_manifest_names_the_file(tmp_path):
    with pytest.raises(CacheError, match="manifest.json not found.*prepare"):
        LatentCache(tmp_path)
    write_cache(tmp_path, range(2))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"manifest\.json is unreadable.*re-run"):
        LatentCache(tmp_path)


def test_missing_shard_names_the_file(tmp_path):
    write_cache(tmp_path, range(4))
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors is missing.*re-run"):
        LatentCache(tmp_path)


def test_corrupt_shard_is_named_then_set_aside_and_re_encoded(tmp_path):
    write_cache(tmp_path, range(4))
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors is corrupt.*re-run"):
        LatentCache(tmp_path)
    write_cache(tmp_path, range(4))  # the re-run: shard 0's three records are encoded again
    assert (tmp_path / "shard-00000.safetensors.corrupt").exists()
    assert len(LatentCache(tmp_path)) == 4


def test_interrupted_run_keeps_whole_shards_and_adopts_unlisted_ones(tmp_path):
    write_cache(tmp_path, range(3), records_per_shard=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    write_cache(tmp_path, range(6), records_per_shard=3)
    # Simulate a crash after the second shard's os.replace but before the manifest's, plus a half-written tmp.
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "shard-00002.safetensors.tmp").write_bytes(b"partial")
    with CacheWriter(tmp_path, LAYOUT, {"source": "test"}) as writer:
        assert writer.num_records == 6
    assert not list(tmp_path.glob("*.tmp"))
    assert len(LatentCache(tmp_path)) == 6


def test_other_layout_or_shapes_are_refused(tmp_path):
    write_cache(tmp_path, range(2))
    other = CacheLayout(family="flux", model_id="tiny", height=32, width=16, max_sequence_length=8)
    with pytest.raises(CacheError, match=r"height=16 \(asked 32\).*new out_dir"):
        CacheWriter(tmp_path, other, {})
    with CacheWriter(tmp_path, LAYOUT, {}) as writer:
        bad = {**record_tensors(9), "latents": torch.zeros(4, 4, 4)}
        with pytest.raises(CacheError, match=r"latents is float32\[4, 4, 4\].*\[4, 8, 8\]"):
            writer.add(RecordInfo("k", "c", "odd.png"), bad)


def test_empty_cache_is_an_error(tmp_path):
    with CacheWriter(tmp_path, LAYOUT, {}) as writer:
        writer.write_uncond(UNCOND)
    with pytest.raises(CacheError, match="no records"):
        LatentCache(tmp_path)


@pytest.mark.parametrize("tamper, message", [
    (lambda m: m.update(num_records=m["num_records"] + 1), r"lists 5 records but its shards hold 4"),
    (lambda m: m["tensors"]["latents"].update(dtype="bfloat16"), r"latents is float32\[4, 8, 8\], but the cache holds bfloat16"),
    (lambda m: m["tensors"]["prompt_embeds"].update(shape=[8, 16]), r"prompt_embeds is float32\[8, 32\].*\[8, 16\]"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), r"lists 4 records but its shards hold 7"),
    (lambda m: m["tensors"].pop("pooled_prompt_embeds"), r"holds tensors .*pooled_prompt_embeds.*expected"),
])
def test_manifest_that_disagrees_with_its_shards_is_named(tmp_path, tamper, message):
    write_cache(tmp_path, range(4))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tamper(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=message):
        LatentCache(tmp_path)


def test_shard_with_wrong_dtype_or_row_count_is_named(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    write_cache(tmp_path, range(4))
    shard = tmp_path / "shard-00000.safetensors"
    with safe_open(str(shard), framework="pt") as opened:
        metadata = opened.metadata()
    tensors = load_file(str(shard))
    save_file({**tensors, "latents": tensors["latents"].half()}, str(shard), metadata=metadata)
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors: latents is float16\[4, 8, 8\], but the cache holds float32"):
        LatentCache(tmp_path)
    save_file({**tensors, "latents": tensors["latents"][:2]}, str(shard), metadata=metadata)
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors: latents has 2 rows for 3 records"):
        LatentCache(tmp_path)
