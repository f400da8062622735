"""Sharded training with FSDP2 (torch's ``fully_shard``): the frozen base, the student adapter and its EMAs split
across processes, so each process holds 1/W of every weight between forward passes.

Accelerate's FSDP plugin wraps a module for the optimizer's sake; here the module holds a frozen base, a trainable
adapter and two frozen EMA adapters that target passes switch between, so the library calls ``fully_shard``
itself: one FSDP unit per transformer block (every entry of the transformer's ``nn.ModuleList``\\ s) and one for the
root. Parameters become ``DTensor``\\ s sharded on dim 0; a forward all-gathers a block's parameters, backward
reduce-scatters (averages) the student's gradients, as DDP's all-reduce does. EMA updates are elementwise, so
each process updates its own shard and the result equals the unsharded update. Checkpoints and exports gather the
adapters' and optimizer states to full tensors on every process (they are small: LoRA-sized) and the main process
writes them as safetensors, as in data-parallel runs; loading scatters them back onto the shards.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it, in the same order)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: full_tensor(value) for name, value in tensors.items()}


def like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``target``: sharded the same way if ``target`` is sharded."""
    if not is_sharded(target):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)


def shard_transformer(transformer: nn.Module, device: torch.device) -> None:
    """``fully_shard`` every block (the entries of the transformer's module lists) and the root, on a 1-D mesh of
    all processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("train.shard needs several processes: launch with torchrun or accelerate launch")
    transformer.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for child in transformer.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)


def full_optimizer_state(state: dict) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (a collective)."""
    return {"state": {index: {key: full_tensor(value) if torch.is_tensor(value) else value
                              for key, value in entries.items()} for index, entries in state["state"].items()},
            "param_groups": state["param_groups"]}


def shard_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """A whole-tensor optimizer state laid out like ``params``' shards (for ``optimizer.load_state_dict``)."""
    out = {"state": {}, "param_groups": state["param_groups"]}
    for index, entries in state["state"].items():
        param = params[int(index)]
        out["state"][index] = {key: like(param, value) if torch.is_tensor(value) and value.shape == param.shape
                               else value for key, value in entries.items()}
    return out


def reshard(module: nn.Module) -> None:
    """Free the all-gathered parameters FSDP2 keeps after a forward without backward (the root keeps them by
    default), so that every process holds only its shards again; a no-op for an unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.reshard()
