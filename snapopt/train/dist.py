"""One code path for one process and for torchrun: rank/world from the environment, DDP when world > 1.

Every rank builds the same *global* batch from the step's seed and keeps its slice, so a 2-GPU run at
global batch B sees exactly the samples a 1-GPU run at batch B sees (and DDP's gradient mean equals the
single-process mean over the global batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun (or a test) set up; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.enabled and not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def shard(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's rows of a global batch (the batch must split evenly)."""
    if not info.enabled:
        return x
    n = x.shape[0] // info.world
    return x[info.rank * n:(info.rank + 1) * n]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, stream) only: what makes resume exact and ranks agree."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
