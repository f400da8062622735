#!/usr/bin/env bash
# One-shot GPU benchmark of the SCFM step and of few-step sampling on a FLUX.1-dev-shaped transformer (random
# weights). Run from the repository root on the device machine, with the diffusers wheels carried in .whl/
# (docs/gpu_notes.md); writes to $OUT: env.txt, run.log and one JSON per stage (at most 7 files). Each stage is
# skipped when too little of the budget (BENCH_BUDGET_S, default 480 s) is left; each configuration runs in its
# own subprocess, so a CUDA crash is recorded in the JSON and the next configuration still runs.
#
#   stages: 2+4 blocks, efficient attention, train (both implementations)   -> small_efficient.json
#           19+38 blocks (FLUX.1-dev), efficient attention, train            -> full_efficient.json
#           19+38 blocks, default attention, 3-step sampling at 512 and 1024 -> sample.json
#           if a full training job failed: 19+38 blocks, math attention      -> full_math.json
#           if that failed too: one step of ours with CUDA_LAUNCH_BLOCKING=1 -> full_efficient_blocking.json
set -uo pipefail
OUT=${OUT:?set OUT to the output folder}
BUDGET=${BENCH_BUDGET_S:-480}
START=$SECONDS
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl \
    || { echo "[run_on_device] no diffusers: carry the wheels in .whl (docs/gpu_notes.md)"; exit 1; }
  export PYTHONPATH=$PWD/.site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

left() { echo $(( BUDGET - (SECONDS - START) )); }

bench() {  # bench NAME MIN_SECONDS_LEFT ARGS...
  local name=$1 need=$2 remain
  shift 2
  remain=$(left)
  if (( remain < need )); then
    echo "[run_on_device] skip $name: ${remain}s of the budget left, needs ${need}s"
    return 0
  fi
  echo "[run_on_device] $name (${remain}s left)"
  # BENCH_EXTRA_ARGS: appended to every call, e.g. "--tiny --device cpu" for a dry run of this script
  timeout -k 10 "$remain" python3 benchmarks/bench_scfm_step.py --out "$OUT/$name.json" \
    --log-dir /tmp/bench_scfm_logs "$@" ${BENCH_EXTRA_ARGS:-}
}

any_failed() {  # true when the JSON is missing or a job in it did not succeed
  python3 - "$1" <<'PY'
import json, sys
try:
    results = json.load(open(sys.argv[1]))["results"]
except Exception:
    sys.exit(0)
sys.exit(0 if not results or any(r["status"] != "ok" for r in results) else 1)
PY
}

bench small_efficient 60 --jobs train --num-layers 2 --num-single-layers 4 --attention efficient --job-timeout 120
bench full_efficient 150 --jobs train --attention efficient --job-timeout 200
bench sample 90 --jobs sample --attention default --job-timeout 150
if any_failed "$OUT/full_efficient.json"; then
  bench full_math 150 --jobs train --attention math --job-timeout 200
  if any_failed "$OUT/full_math.json"; then
    export CUDA_LAUNCH_BLOCKING=1  # the failing kernel, not a later one, raises
    bench full_efficient_blocking 90 --jobs train --impls ours --attention efficient --warmup 0 --steps 1 \
      --job-timeout 120
    unset CUDA_LAUNCH_BLOCKING
  fi
fi

echo "[run_on_device] summary ($(( SECONDS - START ))s)"
python3 - "$OUT" <<'PY'
import json, pathlib, sys


def fmt(value, pattern):
    return "" if value is None else pattern.format(value)


for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime):  # stage order
    for r in json.loads(path.read_text())["results"]:
        seconds = r.get("step_seconds_median", r.get("lora_pass_seconds_median"))
        print(f"{path.stem:<24} {r['label']:<34} {r['status']:<8} {fmt(seconds, '{:.3f} s'):>9}"
              f" {fmt(r.get('base_pass_seconds_median'), '(base {:.3f} s)'):>15}"
              f" {fmt(r.get('peak_memory_gib'), '{:.1f} GiB'):>9} {fmt(r.get('first_loss'), 'loss1 {:.6g}')}"
              f" {r.get('error', '')[:160]}")
PY
