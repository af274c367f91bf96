"""torchrun's processes: this one's place among them, joining their group, and rank 0's word
to all of them. The lowest layer that knows of several processes: data and training use it."""

from __future__ import annotations

import dataclasses
import gc
import os

import torch
import torch.distributed as dist


def is_main() -> bool:
    """Whether this process is rank 0 (or alone): the one that writes files and logs."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's; rank 0 alone writes files and logs."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sums over all ranks (one collective call), as float64 on the host."""
        if self.world == 1:
            return list(values)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def init_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) when it started us."""
    if world_size() == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def from_rank0(word: str | None) -> str | None:
    """Rank 0's `word` (an error, or None for none), known to every rank at once: so that when
    rank 0 cannot go on (its run folder is held), no rank waits for it in a collective until
    the group's timeout. Call it from every rank, after `init_ranks`."""
    if world_size() == 1:
        return word
    said = [word]
    dist.broadcast_object_list(said, src=0)
    return said[0]


def leave() -> None:
    """Leave torchrun's group, if this process joined one. The run's DDP wrapper is still alive
    here, in a reference cycle, and holds the group: collected only at interpreter exit, the
    gloo group's threads can abort the process after its run ended well (CI saw SIGABRT,
    "terminate called without an active exception"). So it is collected first, while Python
    is whole."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
