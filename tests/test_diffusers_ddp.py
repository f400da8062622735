"""The LoRA student under DDP (2 CPU processes, gloo): student through the prepared module, targets unwrapped."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch

from diffusers_fixtures import tiny_cond, tiny_latents, tiny_transformer


def _train_two_steps():
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from shortcutfm.core import EMASchedule, scfm_loss, scfm_targets, sample_jumps
    from shortcutfm.models.diffusers import FLUX, LoraSettings, LoraStudent

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    student = LoraStudent(FLUX.velocity(tiny_transformer("flux")), FLUX, lora=LoraSettings(rank=4, alpha=4),
                          schedule=EMASchedule(fast_decay=0.5, slow_decay=0.9))
    optimizer = torch.optim.AdamW(student.trainable_tensors().values(), lr=1e-2)
    prepared, optimizer = accelerator.prepare(student.module, optimizer)
    flags = {n: p.requires_grad for n, p in student.transformer.named_parameters()}
    generator = torch.Generator().manual_seed(rank)  # different data on each rank
    for step in (1, 2):
        cond = FLUX.training_cond(tiny_cond("flux", seed=rank), generator)
        jumps = sample_jumps(2, FLUX.jump_sampling(alt_shift=1.0), generator)
        batch = scfm_targets(tiny_latents("flux", seed=10 + rank), tiny_latents("flux", seed=20 + rank), jumps,
                             student.target_velocities(), cond)
        loss = scfm_loss(prepared(batch.x, batch.sigma, **cond), batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        student.emas.update(step, student.trainable_tensors())
    assert {n: p.requires_grad for n, p in student.transformer.named_parameters()} == flags
    state = student.state_dict()
    state.update({f"ema.{k}": v for k, v in student.emas.state_dict().items()})
    checksum = torch.stack([t.double().sum() for _, t in sorted(state.items())])
    gathered = accelerator.gather(checksum.unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in state.items() if "ema" not in k)


def test_ddp_two_processes_stay_in_sync():
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    # debug_launcher forks: a single-process state left by an earlier test in this interpreter would be inherited
    AcceleratorState._reset_state(reset_partial_state=True)

    debug_launcher(_train_two_steps, num_processes=2)
