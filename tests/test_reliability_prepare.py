"""``prepare`` killed with SIGKILL at random moments, and failing writes injected into the cache: the cache is
always consistent and resumable, and the finished cache holds every record exactly once, equal to an
uninterrupted run's."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusers_fixtures import tiny_pipeline
from shortcutfm.atomic import WriteError
from shortcutfm.preparation import LatentCache
from shortcutfm.preparation import writer as writer_module

SCRIPT = Path(__file__).with_name("_prepare_script.py")
sys.path.insert(0, str(SCRIPT.parent))
from _prepare_script import SETTINGS  # noqa: E402

NUM_PROMPTS = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    pipe = tiny_pipeline("sd3")
    pipe.save_pretrained(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of {['cat', 'dog'][i % 2]} {i}" for i in range(NUM_PROMPTS)) + "\n")
    reference = root / "reference"  # in this process: the same code and thread count as the script
    from diffusers import StableDiffusion3Pipeline

    from shortcutfm.preparation import prepare_from_prompts

    loaded = StableDiffusion3Pipeline.from_pretrained(root / "pipe")
    loaded.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    prepare_from_prompts(loaded, prompts, reference, **SETTINGS)
    return root, reference, time.perf_counter() - started


def run(root: Path, out: Path, kill_after: float | None = None) -> tuple[bool, float]:
    """The script on ``out``; SIGKILL ``kill_after`` seconds after it is ready. Returns (killed, seconds from
    ready to the end)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(root / "pipe"), str(root / "prompts.txt"), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    ready = time.perf_counter()
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True, time.perf_counter() - ready
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return False, time.perf_counter() - ready


def records(cache_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    cache = LatentCache(cache_dir)  # checks the manifest against the shards and refuses duplicate keys
    return {key: {name: tensor[index] for name, tensor in cache.tensors.items()} for index, key in enumerate(cache.keys)}


def assert_same_records(got: Path, reference: Path) -> None:
    a, b = records(got), records(reference)
    assert set(a) == set(b) and len(a) == NUM_PROMPTS
    for key in a:
        for name in b[key]:
            assert torch.equal(a[key][name], b[key][name]), f"record {key[:8]} {name} differs"


def kill_and_resume(world, kills: int, seed: int) -> None:
    root, reference, duration = world
    rng = random.Random(seed)
    # kill moments are drawn from the reference run's duration; on a machine that got faster since (a busy CI
    # neighbour finished) every run may end before its kill, so such an attempt is redone with earlier moments
    for attempt in range(6):
        out = root / f"killed-{kills}-{seed}-{attempt}"
        killed = 0
        for _ in range(kills):
            killed += run(root, out, kill_after=rng.uniform(0.0, duration * 0.8) / 2 ** attempt)[0]
            if (out / "manifest.json").is_file():
                LatentCache(out)  # after every kill the cache on disk is consistent and readable
        if killed:
            break
    run(root, out)  # the last run resumes and finishes
    assert killed >= 1
    assert_same_records(out, reference)
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.corrupt"))


def test_prepare_killed_twice_at_random_moments_resumes_to_the_same_cache(world):
    kill_and_resume(world, kills=2, seed=0)


@pytest.mark.slow
def test_prepare_killed_eight_times_at_random_moments_resumes_to_the_same_cache(world):
    kill_and_resume(world, kills=8, seed=1)


@pytest.mark.parametrize("failing_write", [1, 3])
def test_failing_cache_write_names_the_file_and_the_rerun_completes(world, tmp_path, monkeypatch, failing_write):
    """The disk fills up on the n-th cache file write (a shard or the manifest): one-line WriteError naming the
    file; the cache keeps what was written before and a rerun completes it."""
    from diffusers import StableDiffusion3Pipeline

    from shortcutfm.preparation import prepare_from_prompts

    root, reference, _ = world
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "pipe")
    pipe.set_progress_bar_config(disable=True)
    original, calls = writer_module.save_file, []

    def fill_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == failing_write:
            Path(filename).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(writer_module, "save_file", fill_disk)
    out = tmp_path / "cache"
    with pytest.raises(WriteError) as caught:
        prepare_from_prompts(pipe, root / "prompts.txt", out, **SETTINGS)
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and "free some disk space" in message
    assert str(out) in message and ".tmp" not in message
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(writer_module, "save_file", original)
    prepare_from_prompts(pipe, root / "prompts.txt", out, **SETTINGS)
    assert_same_records(out, reference)
