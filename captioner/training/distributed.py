"""Torchrun support: which process this is, on which device, and sums across processes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_dict(self, sums: dict[str, float], device: torch.device) -> dict[str, float]:
        keys = sorted(sums)  # the same keys on every rank: all ranks run the same steps
        return dict(zip(keys, self.all_sum([float(sums[k]) for k in keys], device), strict=True))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one (nccl on GPUs, gloo on CPUs); pick this
    process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        info = Dist(dist.get_rank(), dist.get_world_size(), local_rank)
        return info, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Dist(), torch.device(chosen)
