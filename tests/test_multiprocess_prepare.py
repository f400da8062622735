"""`shortcutfm prepare` launched on two CPU processes (torchrun, gloo): the ranks split the prompts, write part
caches, rank 0 merges them into the one content-keyed cache, which then equals a one-process run's; a launch
SIGKILLed mid-run is launched again and finishes with every record exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _launch import finish
from diffusers_fixtures import SEQUENCE_LENGTH, tiny_pipeline
from shortcutfm.cli import app
from shortcutfm.preparation import LatentCache

PROMPTS = [f"a photo of a {animal} in the {place}" for animal in ("cat", "dog", "red tree") for place in ("sky", "snow")]
PROMPTS += PROMPTS[:2] + ["a dog", "a cat", "red tree in the sky", "a photo of a dog"]  # duplicates count once


def arguments(pipe_dir: Path, prompts: Path, out: Path) -> list[str]:
    return ["prepare", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
            "--height", "16", "--width", "16", "--max-sequence-length", str(SEQUENCE_LENGTH["sd3"]),
            "--records-per-shard", "1"]


def start(args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "shortcutfm.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def finish_prepare(process: subprocess.Popen) -> str:
    return finish(process, "two-process prepare")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_prepare")
    tiny_pipeline("sd3").save_pretrained(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = CliRunner().invoke(app, arguments(root / "pipe", prompts, root / "single"))
    assert result.exit_code == 0, result.output
    return root, LatentCache(root / "single")


def assert_same_cache(cache: LatentCache, single: LatentCache) -> None:
    assert len(cache) == len(single) == len(set(PROMPTS))
    assert sorted(cache.keys) == sorted(single.keys)  # each record exactly once
    position = {key: i for i, key in enumerate(single.keys)}
    order = torch.tensor([position[key] for key in cache.keys])
    mine, theirs = cache.get(torch.arange(len(cache))), single.get(order)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not (cache.path / "parts").exists()


def test_two_processes_split_the_prompts_and_merge_into_one_cache(reference):
    root, single = reference
    output = finish_prepare(start(arguments(root / "pipe", root / "prompts.txt", root / "two")))
    assert "merged from 2 processes" in output
    assert_same_cache(LatentCache(root / "two"), single)


def test_a_killed_two_process_prepare_resumes(reference):
    root, single = reference
    out = root / "killed"
    process = start(arguments(root / "pipe", root / "prompts.txt", out))
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:  # kill once a rank wrote its first shard
        if (out / "parts").is_dir() and any((out / "parts").glob("rank-*/shard-*.safetensors")):
            break
        time.sleep(0.01)
    killed = process.poll() is None
    if killed:
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert killed, "the run finished before it could be killed: the test needs more prompts"
    kept = list(out.glob("parts/rank-*/shard-*.safetensors")) + list(out.glob("shard-*.safetensors"))
    assert kept, "nothing was kept from the killed run"
    output = finish_prepare(start(arguments(root / "pipe", root / "prompts.txt", out)))
    assert "already cached" in output
    assert_same_cache(LatentCache(out), single)
