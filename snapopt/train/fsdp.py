"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for students whose weights, gradients and AdamW state do
not fit one GPU: ``train.parallel: fsdp`` under torchrun.

Each UNet block (every element of a ModuleList child, plus ``mid_block``) is its own FSDP unit, then the root:
a block's parameters are gathered just before it runs and freed after, and gradients are reduce-scattered,
so each rank holds 1/world of the parameters, gradients and optimizer state between blocks.

The sharded module is a copy: the pipeline's own module stays a plain ``nn.Module`` (what evaluations, saving
and later passes expect) and gets the trained weights back, gathered, at the end (``gather_into``). With
``release=True`` the plain module waits in host memory meanwhile, so the device holds only the shards: the
weights' full copy (1.9 GB fp32 for BK-SDM-Small) is not kept on every rank. Checkpoints hold full
(gathered) tensors in the same layout as single-process ones, so a run can resume with either.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _units(module: nn.Module) -> list[nn.Module]:
    units = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            units += [m for m in child if any(True for _ in m.parameters())]
        elif name == "mid_block" and any(True for _ in child.parameters()):
            units.append(child)
    return units


def shard_copy(module: nn.Module, device: torch.device, *, release: bool = False) -> nn.Module:
    """A copy of ``module`` sharded over the default process group (its forward hooks come along).
    ``release``: move ``module`` itself to host memory until ``gather_into`` brings it back."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    if release and device.type != "cpu":
        module.to("cpu")  # copied from host memory too: fully_shard moves each unit's states to the device
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sharded = copy.deepcopy(module)
    for unit in _units(sharded):
        fully_shard(unit, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def gather_into(module: nn.Module, sharded: nn.Module, device: torch.device) -> None:
    """The sharded copy's weights, gathered, into the plain ``module``, which ends on ``device`` whether or
    not ``shard_copy`` released it (a collective: every rank must call it)."""
    full = full_model_state(sharded)
    module.to(device)
    module.load_state_dict(full)


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def full_model_state(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered weights on every rank (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(sharded: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Gathered AdamW state keyed like a single-process optimizer's (parameter index), so the checkpoint
    format does not depend on how the run was parallelised."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(sharded, opt, options=StateDictOptions(full_state_dict=True))
    index = {n: i for i, n in enumerate(trainable_names(sharded))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(sharded: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = trainable_names(sharded)
    fqn = {"state": {names[int(i)]: s for i, s in state["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(sharded, opt, fqn, options=StateDictOptions(full_state_dict=True))


class ShardedEMA:
    """EMA of a sharded module's weights, kept as this rank's shards (fp32)."""

    def __init__(self, sharded: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in sharded.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().to_local().float().clone() for n, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        live = [p.detach().to_local().float() for p in self.params.values()]
        torch._foreach_lerp_(list(self.shadow.values()), live, 1 - self.decay_at(step))

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for n, p in self.params.items():
            p.to_local().copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors (a collective)."""
        from torch.distributed.tensor import DTensor

        return {n: DTensor.from_local(self.shadow[n], p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                for n, p in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        for n, p in self.params.items():
            self.shadow[n].copy_(distribute_tensor(state[n].to(p.device).float(), p.device_mesh, p.placements).to_local())
