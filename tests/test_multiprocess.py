"""Two CPU processes (torchrun, gloo) distilling tiny FLUX through run_training: ranks in sync, different batches,
and a run killed after its first checkpoint resumes (in fresh processes) to the uninterrupted run's weights.

The processes run tests/_ddp_train_script.py; see its docstring for the phases and the files each rank dumps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _launch import finish
from diffusers_fixtures import SEQUENCE_LENGTH, tiny_pipeline
from shortcutfm.models.diffusers import EMA_WEIGHTS, STUDENT_WEIGHTS
from shortcutfm.preparation import prepare_from_folder
from shortcutfm.training.checkpoint import step_name

SCRIPT = Path(__file__).with_name("_ddp_train_script.py")
CHECKPOINT_FILES = ("student.safetensors", "ema.safetensors", "optimizer.safetensors")


def start(phases: list[str], pipe_dir: Path, cache_dir: Path, root: Path, steps: int = 4,
          shard: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               "--pipe-dir", str(pipe_dir), "--cache-dir", str(cache_dir), "--run-root", str(root / "runs"),
               "--dump-root", str(root / "dumps"), "--steps", str(steps), *(["--shard"] if shard else []), *phases]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # its own process group: a hang kills every worker


def launch(phases: list[str], pipe_dir: Path, cache_dir: Path, root: Path, timeout: float = 240, steps: int = 4,
           shard: bool = False) -> str:
    """torchrun --standalone --nproc_per_node 2 on the script; fails the test (with the output) unless rc == 0."""
    return finish(start(phases, pipe_dir, cache_dir, root, steps, shard), f"torchrun {phases}", timeout)


def dumps(root: Path, phase: str) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    directory = root / "dumps" / phase
    tensors = [load_file(str(directory / f"rank{rank}.safetensors")) for rank in (0, 1)]
    infos = [json.loads((directory / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return tensors, infos


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def prepare_world(tmp_path: Path) -> tuple[Path, Path]:
    pipe_dir, images, cache_dir = tmp_path / "pipe", tmp_path / "images", tmp_path / "cache"
    pipe = tiny_pipeline("flux")
    pipe.save_pretrained(pipe_dir)
    images.mkdir()
    for index in range(8):
        pixels = np.random.default_rng(index).integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{index}.png")
        (images / f"img{index}.txt").write_text(f"a photo of {['cat', 'dog'][index % 2]}")
    prepare_from_folder(pipe, images, cache_dir, height=16, width=16, max_sequence_length=SEQUENCE_LENGTH["flux"],
                        model_id=str(pipe_dir), show_progress=False)
    return pipe_dir, cache_dir


def test_two_process_flux_distillation_syncs_and_resumes_exactly(tmp_path):
    pipe_dir, cache_dir = prepare_world(tmp_path)

    # one launch: an uninterrupted run, then a run whose ranks all die right after the step-2 checkpoint;
    # a second launch (fresh processes) resumes the killed run
    launch(["full", "killed"], pipe_dir, cache_dir, tmp_path)
    killed_run = tmp_path / "runs" / "killed"
    assert [p.name for p in (killed_run / "checkpoints").iterdir() if not p.name.startswith(".")] == [step_name(2)]
    assert not (killed_run / "model").exists()
    launch(["resume"], pipe_dir, cache_dir, tmp_path)

    full, full_info = dumps(tmp_path, "full")
    resumed, resumed_info = dumps(tmp_path, "resume")
    _, killed_info = dumps(tmp_path, "killed")
    assert [info["world"] for info in full_info] == [2, 2]
    assert [info["final_step"] for info in full_info + resumed_info] == [4] * 4

    # DDP kept the LoRA and both EMAs identical on the two ranks, and they trained
    assert {key.split(".")[0] for key in full[0]} == {"student", "ema"}
    assert any(key.startswith("ema.fast.") for key in full[0]) and any(key.startswith("ema.slow.") for key in full[0])
    assert_same(full[0], full[1], "rank 0 vs rank 1 (uninterrupted run)")
    assert_same(resumed[0], resumed[1], "rank 0 vs rank 1 (resumed run)")
    assert any(v.abs().max() > 0 for k, v in full[0].items() if k.startswith("student.") and "lora_B" in k)

    # each rank drew its own batches (2 of the global 4), the same ones with or without the interruption
    for step in range(4):
        assert full_info[0]["indices"][step] != full_info[1]["indices"][step]
        assert all(len(info["indices"][step]) == 2 for info in full_info)
    for rank in (0, 1):
        assert killed_info[rank]["indices"] == full_info[rank]["indices"][:2]
        assert resumed_info[rank]["indices"] == full_info[rank]["indices"][2:]

    # killed + resumed == uninterrupted: in memory on both ranks, and in the step-2 and step-4 checkpoints
    assert_same(resumed[0], full[0], "resumed vs uninterrupted")
    for step in (2, 4):
        for filename in CHECKPOINT_FILES:
            assert_same(load_file(str(tmp_path / "runs" / "full" / "checkpoints" / step_name(step) / filename)),
                        load_file(str(killed_run / "checkpoints" / step_name(step) / filename)),
                        f"{filename} at step {step}")

    # the main process exported the (rank-identical) student: final/ and model/ (best/) hold the LoRA
    for run in (tmp_path / "runs" / "full", killed_run):
        final = load_file(str(run / "final" / STUDENT_WEIGHTS))
        student = {k[len("student."):]: v for k, v in full[0].items() if k.startswith("student.")}
        assert_same(final, {f"transformer.{k}": v for k, v in student.items()}, f"{run.name}/final export")
        assert (run / "model" / STUDENT_WEIGHTS).is_file() and (run / "model" / EMA_WEIGHTS).is_file()
        assert (run / "best" / STUDENT_WEIGHTS).is_file()
        state = json.loads((run / "trainer_state.json").read_text())
        assert state["step"] == 4 and [h["step"] for h in state["history"]] == [2, 4]


def test_sharded_run_matches_data_parallel_and_resumes(tmp_path):
    """FSDP2 (train.shard=true) on two CPU processes: the student LoRA, both EMAs and the exported files equal the
    data-parallel run's within float tolerance (the same draws; sharded all-gathers and reduce-scatters sum in
    another order), and a sharded run killed after its step-2 checkpoint resumes to the uninterrupted one."""
    pipe_dir, cache_dir = prepare_world(tmp_path)
    launch(["full"], pipe_dir, cache_dir, tmp_path)
    launch(["full", "killed"], pipe_dir, cache_dir, tmp_path, shard=True)
    launch(["resume"], pipe_dir, cache_dir, tmp_path, shard=True)
    data_parallel, _ = dumps(tmp_path, "full")
    sharded, infos = dumps(tmp_path, "full-sharded")
    resumed, resumed_infos = dumps(tmp_path, "resume-sharded")
    assert [i["world"] for i in infos] == [2, 2] and resumed_infos[0]["final_step"] == 4
    assert [i["parameter_type"] for i in infos] == ["DTensor", "DTensor"]  # really sharded
    assert dumps(tmp_path, "full")[1][0]["parameter_type"] == "Parameter"
    for rank in (0, 1):
        assert sharded[rank].keys() == data_parallel[rank].keys()
        for key in data_parallel[rank]:
            torch.testing.assert_close(sharded[rank][key], data_parallel[rank][key], atol=2e-5, rtol=1e-4, msg=key)
        for key in sharded[rank]:
            torch.testing.assert_close(resumed[rank][key], sharded[rank][key], atol=1e-6, rtol=1e-5, msg=key)
    moved = [v for k, v in sharded[0].items() if k.startswith("student.") and "lora_B" in k]
    assert any(v.abs().max() > 1e-3 for v in moved)  # the LoRA trained: not a vacuous comparison
    for name in (STUDENT_WEIGHTS, EMA_WEIGHTS):
        a = load_file(str(tmp_path / "runs" / "full" / "final" / name))
        b = load_file(str(tmp_path / "runs" / "full-sharded" / "final" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=f"{name}:{key}")
    state = json.loads((tmp_path / "runs" / "full-sharded" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [2, 4]


@pytest.mark.slow
def test_two_process_run_sigkilled_at_random_moments_resumes_exactly(tmp_path):
    """The whole torchrun process group killed with SIGKILL at a random moment after a checkpoint exists, three
    times, each time launched again with --resume: the final checkpoint equals the uninterrupted run's."""
    import random
    import time

    steps = 16
    pipe_dir, cache_dir = prepare_world(tmp_path)
    launch(["full"], pipe_dir, cache_dir, tmp_path, steps=steps)
    checkpoints = tmp_path / "runs" / "sigkill" / "checkpoints"
    rng, kills = random.Random(0), 0
    for _ in range(3):
        process = start(["sigkill"], pipe_dir, cache_dir, tmp_path, steps)
        seen = {p.name for p in checkpoints.iterdir()} if checkpoints.is_dir() else set()
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:  # wait for a new checkpoint
            if checkpoints.is_dir() and {p.name for p in checkpoints.iterdir() if not p.name.startswith(".")} - seen:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.communicate()
    assert kills >= 1
    launch(["sigkill"], pipe_dir, cache_dir, tmp_path, steps=steps)
    for filename in CHECKPOINT_FILES:
        assert_same(load_file(str(tmp_path / "runs" / "full" / "checkpoints" / step_name(steps) / filename)),
                    load_file(str(checkpoints / step_name(steps) / filename)), f"{filename} after {kills} kills")
