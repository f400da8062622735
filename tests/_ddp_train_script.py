"""One process of multi-process tiny-Flux distillations, for tests/test_multiprocess.py (run under torchrun).

    torchrun --standalone --nproc_per_node 2 tests/_ddp_train_script.py --pipe-dir P --cache-dir C \
        --run-root R --dump-root D PHASE [PHASE ...]

Each phase calls ``run_training`` with a config from the ``flux`` preset plus tiny overrides (4 steps, a
checkpoint every 2), one after the other in the same processes (the imports dominate the time):

* ``full``: an uninterrupted run in ``R/full``;
* ``killed``: a run in ``R/killed`` where every rank raises right after the step-2 checkpoint (a killed run);
* ``resume``: ``run_training(resume=True)`` on ``R/killed`` (use it in a fresh launch);
* ``sigkill``: ``run_training(resume=True)`` on ``R/sigkill``, for a test that SIGKILLs the launch at random
  moments and launches it again until it finishes.

``--steps`` (default 4) sets the run length of every phase; ``--shard`` runs every phase with ``train.shard=true``
(FSDP2) in ``R/<name>-sharded``.

After each phase every rank writes ``D/<phase>/rank{r}.safetensors`` (its student LoRA as ``student.*``, both
EMAs as ``ema.*``) and ``D/<phase>/rank{r}.json`` (world size, final step, the batch indices it drew per step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


class Killed(RuntimeError):
    pass


STEPS, CHECKPOINT_EVERY, KILLED_AT = 4, 2, 2


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--pipe-dir", "--cache-dir", "--run-root", "--dump-root"):
        parser.add_argument(name, required=True)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--shard", action="store_true")
    parser.add_argument("phases", nargs="+", choices=["full", "killed", "resume", "sigkill"])
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    from shortcutfm.config import load_config
    from shortcutfm.training import diffusers_setup as setup_module
    from shortcutfm.training import trainer as trainer_module
    from shortcutfm.training.sharding import full_tensors
    from shortcutfm.workflows import resolve_config_path, run_training

    diffusers_logging.set_verbosity_error()
    rank = int(os.environ.get("RANK", "0"))

    # spies: the setup the run builds (to dump its student) and the batch indices each step draws
    captured: dict = {}
    drawn: list[list[int]] = []
    original_setup, original_get = setup_module.diffusers_setup, setup_module.CachedBatches.get
    original_checkpoint = trainer_module._checkpoint

    def capturing_setup(cfg):
        captured["setup"] = original_setup(cfg)
        return captured["setup"]

    def recording_get(self, indices):
        drawn.append(indices.tolist())  # the trainer calls get once per step
        return original_get(self, indices)

    def checkpoint_then_die(accelerator, cfg, setup, optimizer, state, run_dir):
        original_checkpoint(accelerator, cfg, setup, optimizer, state, run_dir)
        if state.step == KILLED_AT:
            raise Killed(f"simulated kill after the step-{state.step} checkpoint")

    setup_module.diffusers_setup = capturing_setup
    setup_module.CachedBatches.get = recording_get

    for phase in args.phases:
        run_dir = Path(args.run_root) / ({"full": "full", "sigkill": "sigkill"}.get(phase, "killed")
                                         + ("-sharded" if args.shard else ""))
        config = load_config(resolve_config_path("flux"), [
            f"data.source={args.cache_dir}", f"model.pretrained={args.pipe_dir}", "model.dtype=float32",
            'train.mixed_precision="no"', "lora.rank=4", "lora.alpha=4", f"train.steps={args.steps}",
            "train.batch_size=4", "jumps.teacher_grid=4", "jumps.self_grids=[2,4]", "eval.every=2",
            "eval.num_samples=2", "optim.lr=1e-2", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            f"train.output_dir={run_dir}", f"train.shard={str(args.shard).lower()}",
        ])
        captured.clear()
        drawn.clear()
        trainer_module._checkpoint = checkpoint_then_die if phase == "killed" else original_checkpoint
        try:
            final_step = run_training(config, resume=phase in ("resume", "sigkill"), progress=False).state.step
        except Killed:
            final_step = KILLED_AT
        student = captured["setup"].student
        tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().clone() for k, v in full_tensors(student.emas.state_dict()).items()})
        dump = Path(args.dump_root) / (phase + ("-sharded" if args.shard else ""))
        dump.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dump / f"rank{rank}.safetensors"))
        info = {"indices": drawn, "world": int(os.environ.get("WORLD_SIZE", "1")), "final_step": final_step,
                "parameter_type": type(next(student.transformer.parameters())).__name__}
        (dump / f"rank{rank}.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
