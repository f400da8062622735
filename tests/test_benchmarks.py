"""benchmarks/bench_scfm_step.py on the CPU (--tiny): its JSON, failure recording, and that the reference-style
step (one adapter, EMA weights swapped in place) computes the same loss and update as ours."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_scfm_step  # noqa: E402
import scfm_step_impls as impls  # noqa: E402 (torch, diffusers: imported at collection like other diffusers tests)

from shortcutfm.core import SELF, TEACHER  # noqa: E402

torch.set_num_threads(1)


def mixed_seed() -> int:
    """A seed whose first step has teacher- and self-taught rows, so the teacher and both EMA passes all count."""
    for seed in range(100):
        settings = impls.BenchSettings.for_size(True, seed=seed)
        modes = set(impls.step_inputs(settings, impls.fixed_batch(settings), 1).jumps.mode.tolist())
        if modes == {TEACHER, SELF}:
            return seed
    raise AssertionError("no seed with mixed rows")


def by_label(payload: dict) -> dict:
    return {(r["kind"], r.get("impl", r.get("resolution"))): r for r in payload["results"]}


@pytest.mark.parametrize("dtype, mixed_precision, loss_rtol", [
    ("float32", "no", 1e-6),
    ("bfloat16", "bf16", 1e-3),  # bf16 base with autocast, as the trainer runs FLUX
])
def test_tiny_benchmark_reports_both_implementations_and_they_agree(tmp_path, dtype, mixed_precision, loss_rtol):
    out, first_step = tmp_path / "bench.json", tmp_path / "first_step"
    payload = bench_scfm_step.main([
        "--tiny", "--in-process", "--out", str(out), "--save-first-step", str(first_step), "--lora-init", "perturbed",
        "--seed", str(mixed_seed()), "--dtype", dtype, "--mixed-precision", mixed_precision,
        "--warmup", "1", "--steps", "2", "--sample-repeats", "1",
    ])
    assert out.exists() and payload["settings"]["batch"] == 2 and payload["environment"]["device"] == "cpu"
    results = by_label(payload)
    ours, reference = results[("train", "ours")], results[("train", "reference")]
    for record in (ours, reference):
        assert record["status"] == "ok", record.get("traceback")
        assert record["step_seconds_median"] > 0 and len(record["step_seconds"]) == 2
        assert record["lora_parameters"] == ours["lora_parameters"] > 0
    assert reference["first_loss"] == pytest.approx(ours["first_loss"], rel=loss_rtol)
    for resolution in (64, 128):
        sample = results[("sample", resolution)]
        assert sample["status"] == "ok", sample.get("traceback")
        assert sample["lora_pass_seconds_median"] > 0 and sample["base_pass_seconds_median"] > 0
        assert sample["lora_output_finite"]

    # one AdamW step moves each weight by about lr; the two implementations agree far below that
    lr = payload["settings"]["lr"]
    start = load_file(first_step / "ours_step0.safetensors")
    assert start.keys() == load_file(first_step / "reference_step0.safetensors").keys()
    ours_state = load_file(first_step / "ours_step1.safetensors")
    reference_state = load_file(first_step / "reference_step1.safetensors")
    assert set(ours_state) == set(reference_state) == set(start)
    students = [name for name in start if name.startswith("student.")]
    assert max((ours_state[n] - start[n]).abs().max().item() for n in students) == pytest.approx(lr, rel=0.05)
    for name, tensor in ours_state.items():
        torch.testing.assert_close(reference_state[name], tensor, rtol=0, atol=lr / 100, msg=name)


def test_reference_swap_restores_the_live_lora_weights_exactly():
    settings = impls.BenchSettings.for_size(True, seed=mixed_seed(), lora_init="perturbed")
    reference = impls.ReferenceStep(settings, impls.build_transformer(settings))
    before = {name: tensor.detach().clone() for name, tensor in reference.live.items()}
    data = impls.fixed_batch(settings)
    reference.targets(data.x0, impls.step_inputs(settings, data, 1))
    assert all(torch.equal(reference.live[name], value) for name, value in before.items())
    assert all(tensor.requires_grad for tensor in reference.live.values())
    assert not any(torch.equal(reference.fast_ema[name], value) for name, value in before.items())


def test_a_failing_configuration_is_recorded_in_the_json(tmp_path):
    # the CPU has no memory-efficient attention kernel: the job fails, the run does not
    payload = bench_scfm_step.main([
        "--tiny", "--in-process", "--out", str(tmp_path / "bench.json"), "--jobs", "train", "--impls", "ours",
        "--attention", "efficient",
    ])
    (record,) = payload["results"]
    assert record["status"] == "failed" and "scaled_dot_product_attention" in record["error"]
    assert 'File "' in record["traceback"]


@pytest.mark.slow
def test_each_configuration_runs_in_its_own_subprocess(tmp_path):
    payload = bench_scfm_step.main([
        "--tiny", "--out", str(tmp_path / "bench.json"), "--jobs", "train", "--log-dir", str(tmp_path / "logs"),
    ])
    assert [r["status"] for r in payload["results"]] == ["ok", "ok"]
    assert all(r["returncode"] == 0 for r in payload["results"])
