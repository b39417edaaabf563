"""Data parallelism with `torch.distributed` (launched by `torchrun`): each rank holds whole groups.

A group (one prompt and its N responses) is never split: Bridge mixes the rows of a group inside one forward, so a
rank needs all of them. The step's groups are cut into `world_size` equal contiguous shards, the model is wrapped in
DistributedDataParallel (gradients averaged over ranks), and each rank scales its token-level loss by
`world_size / global_tokens`, so the averaged gradient equals that of one process over all groups.
"""

import os
from dataclasses import dataclass
from typing import List, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def finish(self) -> None:
        """Waits for every rank, then leaves the process group (once, after the last collective): a rank that exits
        while the group's communication threads are alive can abort ("terminate called without an active
        exception") even though its work succeeded."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def shard(self, items: Sequence[T]) -> List[T]:
        """This rank's contiguous share of `items` (whole groups); len(items) must divide evenly."""
        if len(items) % self.world_size:
            raise ValueError(
                f"bridge_ops: {len(items)} groups per step cannot be split evenly over {self.world_size} ranks"
            )
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    def sum(self, value: float) -> float:
        """The sum of `value` over ranks (value itself on one process)."""
        if not self.active:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel(model) when running on several ranks, else the model itself."""
        if not self.active:
            return model
        return nn.parallel.DistributedDataParallel(model)


def init_distributed() -> DistContext:
    """Joins the process group torchrun describes (RANK / WORLD_SIZE in the environment; gloo on CPU, nccl on
    CUDA); a plain single-process context without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())
