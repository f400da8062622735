"""Benchmark one SCFM training step (ours vs a reference-style step) and one few-step sampling pass on FLUX.1-dev.

The transformer has FLUX.1-dev's shape and random weights (no checkpoint, no network). Every configuration
(a train implementation, a sampling resolution) runs in its own subprocess, so a CUDA crash in one (see
docs/gpu_notes.md) is recorded in the JSON and the others still run. See benchmarks/README.md.

    python benchmarks/bench_scfm_step.py --out bench.json --attention efficient             # GPU, full size
    python benchmarks/bench_scfm_step.py --out bench.json --num-layers 2 --num-single-layers 4
    python benchmarks/bench_scfm_step.py --tiny --in-process --out tiny.json                 # CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_settings import BenchSettings  # noqa: E402 (light: no torch in the parent process)

GIB = 1024**3


def _impls():
    """The heavy module (torch, diffusers, shortcutfm), imported only where a job runs."""
    import scfm_step_impls

    return scfm_step_impls


def _environment(torch, device) -> dict:
    import diffusers
    import peft

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
           "device": str(device), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _memory(torch, device) -> dict:
    if device.type != "cuda":
        return {"peak_memory_gib": None}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def run_train(settings, impl_name: str, save_dir: str | None) -> dict:
    """Warm-up then timed steps of one implementation; seconds per step and peak memory."""
    m = _impls()
    torch = m.torch
    device = torch.device(settings.device)
    started = time.perf_counter()
    transformer = m.build_transformer(settings)
    base_parameters = sum(p.numel() for p in transformer.parameters())
    impl = m.IMPLEMENTATIONS[impl_name](settings, transformer)
    data = m.fixed_batch(settings)
    m.synchronize(device)
    result = {"build_seconds": time.perf_counter() - started, "base_parameters": base_parameters,
              "lora_parameters": sum(p.numel() for p in impl.params),
              "image_tokens": m.FLUX.num_image_tokens(*data.x0.shape[-2:])}
    if device.type == "cuda":
        result["memory_after_build_gib"] = torch.cuda.memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    if save_dir:
        _save_lora(impl, Path(save_dir) / f"{impl_name}_step0.safetensors")
    with m.sdpa_context(settings.attention):
        for step in range(1, settings.warmup + settings.steps + 1):
            inputs = m.step_inputs(settings, data, step)
            m.synchronize(device)
            tic = time.perf_counter()
            losses.append(impl.step(step, data.x0, inputs))
            m.synchronize(device)
            times.append(time.perf_counter() - tic)
            if step == 1 and save_dir:
                _save_lora(impl, Path(save_dir) / f"{impl_name}_step1.safetensors")
    timed = times[settings.warmup:]
    result.update(
        step_seconds_median=statistics.median(timed) if timed else None, step_seconds=timed,
        warmup_seconds=times[:settings.warmup], first_loss=losses[0], losses=losses, **_memory(torch, device),
    )
    return result


def _save_lora(impl, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in impl.lora_state().items()}, str(path))


def run_sample(settings, resolution: int) -> dict:
    """Latency of one ``sample_steps``-step Euler pass at batch 1, with the LoRA adapter and with the base alone."""
    m = _impls()
    torch = m.torch
    device = torch.device(settings.device)
    started = time.perf_counter()
    transformer = m.build_transformer(settings)
    _, run = m.sampling_setup(settings, transformer, resolution)
    m.synchronize(device)
    result = {"build_seconds": time.perf_counter() - started,
              "image_tokens": m.FLUX.num_image_tokens(*(2 * [settings.latent_side(resolution)]))}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with m.sdpa_context(settings.attention):
        for label, with_adapter in (("lora", True), ("base", False)):
            times = []
            for repeat in range(1 + settings.sample_repeats):  # the first pass is warm-up
                m.synchronize(device)
                tic = time.perf_counter()
                out = run(with_adapter)
                m.synchronize(device)
                times.append(time.perf_counter() - tic)
            result[f"{label}_pass_seconds_median"] = statistics.median(times[1:])
            result[f"{label}_pass_seconds"] = times[1:]
            result[f"{label}_output_finite"] = bool(torch.isfinite(out).all())
    result.update(_memory(torch, device))
    return result


def run_job(job: dict) -> dict:
    """Run one configuration in this process; failures come back as ``status: failed`` with the traceback."""
    m = _impls()
    settings = BenchSettings(**job["settings"])
    record = {k: v for k, v in job.items() if k != "settings"}
    try:
        device = m.torch.device(settings.device)
        record["environment"] = _environment(m.torch, device)
        if job["kind"] == "train":
            record.update(run_train(settings, job["impl"], job.get("save_dir")))
        else:
            record.update(run_sample(settings, job["resolution"]))
        record["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - a benchmark records every failure and goes on
        record.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    return record


def run_job_in_subprocess(job: dict, timeout: float, log_dir: Path) -> dict:
    """Run ``job`` in a fresh Python; a crash, a signal or a timeout is recorded instead of raised."""
    label = job_label(job)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        log_path = log_dir / f"{label}.log"
        command = [sys.executable, str(Path(__file__).resolve()), "--child-job", json.dumps(job),
                   "--child-out", str(result_path)]
        record = {k: v for k, v in job.items() if k != "settings"}
        started = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
                returncode = process.returncode
            except subprocess.TimeoutExpired:
                returncode = None
        if result_path.exists():
            record = json.loads(result_path.read_text())
        elif returncode is None:
            record.update(status="timeout", error=f"no result after {timeout:.0f} s (killed)")
        else:
            record.update(status="failed", error=f"process exited with {returncode} before writing a result")
        record["returncode"] = returncode
        record["wall_seconds"] = time.perf_counter() - started
        if record.get("status") != "ok":
            record["log_tail"] = log_path.read_text(errors="replace")[-4000:]
        return record


def job_label(job: dict) -> str:
    s = job["settings"]
    what = job["impl"] if job["kind"] == "train" else f"{job['resolution']}px"
    blocks = f"{s['transformer_config']['num_layers']}+{s['transformer_config']['num_single_layers']}"
    return f"{job['kind']}_{what}_{blocks}_{s['attention']}"


def make_jobs(settings, kinds: list[str], impls: list[str], save_dir: str | None) -> list[dict]:
    base = dataclasses.asdict(settings)
    jobs = []
    if "train" in kinds:
        jobs += [{"kind": "train", "impl": impl, "settings": base, "save_dir": save_dir} for impl in impls]
    if "sample" in kinds:
        jobs += [{"kind": "sample", "resolution": r, "settings": base} for r in settings.sample_resolutions]
    return jobs


def print_table(results: list[dict]) -> None:
    header = f"{'job':<40} {'status':<8} {'s/step or s/pass':>17} {'peak GiB':>9} {'first loss':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        seconds = r.get("step_seconds_median", r.get("lora_pass_seconds_median"))
        peak, loss = r.get("peak_memory_gib"), r.get("first_loss")
        print(f"{r['label']:<40} {r.get('status', '?'):<8} "
              f"{'-' if seconds is None else f'{seconds:.4f}':>17} {'-' if peak is None else f'{peak:.2f}':>9} "
              f"{'-' if loss is None else f'{loss:.6g}':>11}")
        if r.get("kind") == "sample" and r.get("status") == "ok":
            print(f"{'  (base, adapters off)':<40} {'':<8} {r['base_pass_seconds_median']:>17.4f}")
        if r.get("status") != "ok":
            print(f"  {r.get('error', '')[:300]}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON result file")
    p.add_argument("--tiny", action="store_true", help="tiny Flux on the CPU, float32, batch 2 (tests)")
    p.add_argument("--jobs", default="train,sample", help="comma list of train, sample")
    p.add_argument("--impls", default="ours,reference", help="comma list of ours, reference")
    p.add_argument("--num-layers", type=int, help="double blocks (FLUX.1-dev: 19)")
    p.add_argument("--num-single-layers", type=int, help="single blocks (FLUX.1-dev: 38)")
    p.add_argument("--batch", type=int, help="training batch (default 8; tiny 2)")
    p.add_argument("--resolution", type=int, help="training image side in pixels (default 512)")
    p.add_argument("--text-length", type=int, help="text tokens (default 512)")
    p.add_argument("--rank", type=int, help="LoRA rank, alpha = rank (default 64)")
    p.add_argument("--attention", choices=["default", "efficient", "math", "flash"],
        help="SDPA backend forced with sdpa_kernel (default: none forced)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="base weights (default bfloat16; tiny float32)")
    p.add_argument("--mixed-precision", choices=["bf16", "no"],
        help="bf16 autocast of every forward pass, as accelerate.prepare (default bf16; tiny no)")
    p.add_argument("--device", help="cuda (default) or cpu")
    p.add_argument("--warmup", type=int, help="untimed steps (default 2)")
    p.add_argument("--steps", type=int, help="timed steps (default 5)")
    p.add_argument("--sample-resolutions", help="comma list of pixel sides (default 512,1024)")
    p.add_argument("--sample-repeats", type=int, help="timed sampling passes per resolution (default 5)")
    p.add_argument("--seed", type=int)
    p.add_argument("--lora-init", choices=["standard", "perturbed"], help="perturbed: B != 0, EMAs differ")
    p.add_argument("--in-process", action="store_true", help="run every job in this process (no crash isolation)")
    p.add_argument("--job-timeout", type=float, default=300.0, help="seconds per subprocess job")
    p.add_argument("--save-first-step", help="directory: save each implementation's LoRA and EMAs before and after step 1")
    p.add_argument("--log-dir", type=Path, help="subprocess logs (default: a temporary directory)")
    p.add_argument("--child-job", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_job is None and args.out is None:
        p.error("--out is required")
    for flag, value, allowed in (("--jobs", args.jobs, ("train", "sample")), ("--impls", args.impls, ("ours", "reference"))):
        unknown = set(value.split(",")) - set(allowed)
        if unknown:
            p.error(f"{flag}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child_job is not None:  # one job in this fresh process
        record = run_job(json.loads(args.child_job))
        Path(args.child_out).write_text(json.dumps(record, indent=1))
        sys.exit(0 if record["status"] == "ok" else 1)

    resolutions = tuple(int(r) for r in args.sample_resolutions.split(",")) if args.sample_resolutions else None
    settings = BenchSettings.for_size(
        args.tiny, num_layers=args.num_layers, num_single_layers=args.num_single_layers, batch=args.batch,
        resolution=args.resolution, text_length=args.text_length, rank=args.rank, attention=args.attention,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, mixed_precision=args.mixed_precision,
        device=args.device, warmup=args.warmup, steps=args.steps, sample_resolutions=resolutions,
        sample_repeats=args.sample_repeats, seed=args.seed, lora_init=args.lora_init,
    )
    if args.save_first_step:
        Path(args.save_first_step).mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(settings, args.jobs.split(","), args.impls.split(","), args.save_first_step)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench_scfm_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)

    results = []
    for job in jobs:
        label = job_label(job)
        print(f"[bench] {label} ...", flush=True)
        started = time.perf_counter()
        record = run_job(job) if args.in_process else run_job_in_subprocess(job, args.job_timeout, log_dir)
        record["label"] = label
        record.setdefault("wall_seconds", time.perf_counter() - started)
        print(f"[bench] {label}: {record['status']} ({record['wall_seconds']:.1f} s)", flush=True)
        results.append(record)
        _write(args.out, settings, results)  # after every job: a later crash of this script loses nothing
    print_table(results)
    return json.loads(args.out.read_text())


def _write(path: Path, settings, results: list[dict]) -> None:
    environment = next((r["environment"] for r in results if "environment" in r), None)
    payload = {"settings": dataclasses.asdict(settings), "environment": environment, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)



if __name__ == "__main__":
    main()
