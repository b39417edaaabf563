"""Group layout of a batch: which rows are the parallel generations of one prompt.

The N generations of one prompt are N *contiguous* rows (the layout of HF `repeat_interleave` /
`num_return_sequences`). A batch of G groups is described like flash-attn's varlen batches, by
`cu_group_lens`: int32 [G+1] offsets of each group's first row, cu[0] = 0 < cu[1] < ... < cu[G] = B.
Groups may differ in size (ragged), size 1 included. `GroupLayout` holds one batch's layout in every form its readers
need (widths, cu_group_lens, the group of each row) and derives the layout of a subset of rows.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

Device = Union[torch.device, str, None]


def cu_group_lens_from_sizes(sizes: Union[Sequence[int], torch.Tensor], device: Device = None) -> torch.Tensor:
    """Offsets of groups of the given sizes, e.g. [4, 1, 3] -> tensor([0, 4, 5, 8], dtype=int32)."""
    sizes = torch.as_tensor(sizes, device=device)
    if sizes.dim() != 1 or sizes.numel() == 0:
        raise ValueError(f"bridge_ops: group sizes must be a non-empty 1-D sequence, got shape {list(sizes.shape)}")
    if sizes.dtype == torch.bool or sizes.is_floating_point() or sizes.is_complex():
        raise ValueError(f"bridge_ops: group sizes must be integers, got {sizes.dtype} values {sizes.tolist()}")
    if bool((sizes < 1).any()):
        raise ValueError(f"bridge_ops: every group needs at least one row, got sizes {sizes.tolist()}")
    ends = torch.cumsum(sizes.long(), 0)
    if int(ends[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError(
            f"bridge_ops: the group sizes add up to {int(ends[-1])} rows, more than the int32 offsets of "
            f"cu_group_lens can hold ({torch.iinfo(torch.int32).max})"
        )
    cu = torch.zeros(sizes.numel() + 1, dtype=torch.int32, device=sizes.device)
    cu[1:] = ends
    return cu


def cu_group_lens_from_width(batch_size: int, width: int, device: Device = None) -> torch.Tensor:
    """Offsets of batch_size // width groups of `width` rows each (batch_size must be a multiple of width)."""
    if width < 1:
        raise ValueError(f"bridge_ops: width must be >= 1, got {width}")
    if batch_size < 1 or batch_size % width != 0:
        raise ValueError(f"bridge_ops: batch_size {batch_size} is not a positive multiple of width {width}")
    return torch.arange(0, batch_size + 1, width, dtype=torch.int32, device=device)


def cu_group_lens_from_ids(group_ids: torch.Tensor) -> torch.Tensor:
    """Offsets from per-row group ids [B] whose equal values form contiguous runs, e.g. [7, 7, 2, 5, 5].

    Raises ValueError if an id appears in two separate runs (the rows of a group must be adjacent).
    """
    if group_ids.dim() != 1 or group_ids.numel() == 0:
        raise ValueError(f"bridge_ops: group_ids must be a non-empty 1-D tensor, got shape {list(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"bridge_ops: group_ids must be integers, got {group_ids.dtype}")
    starts = torch.ones_like(group_ids, dtype=torch.bool)
    starts[1:] = group_ids[1:] != group_ids[:-1]
    run_ids = group_ids[starts]
    if run_ids.unique().numel() != run_ids.numel():
        ids = run_ids.tolist()
        repeated = next(i for i in ids if ids.count(i) > 1)
        rows = torch.nonzero(group_ids == repeated).flatten().tolist()
        raise ValueError(
            f"bridge_ops: group_ids must form contiguous runs, but id {repeated} appears at rows {rows} "
            "with other ids between them"
        )
    first_rows = torch.nonzero(starts).flatten()
    end = torch.tensor([group_ids.numel()], device=group_ids.device)
    return torch.cat([first_rows, end]).to(torch.int32)


def group_sizes(cu_group_lens: torch.Tensor) -> torch.Tensor:
    """Sizes [G] of the groups described by cu_group_lens."""
    return cu_group_lens[1:] - cu_group_lens[:-1]


def group_ids(cu_group_lens: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """Group index [B] of every row (inverse of cu_group_lens_from_ids up to relabelling)."""
    sizes = group_sizes(cu_group_lens).long()
    ids = torch.arange(sizes.numel(), device=cu_group_lens.device)
    return torch.repeat_interleave(ids, sizes, output_size=batch_size)


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """The groups of a batch's B rows, computed once per batch and read by everything that runs over it (the Bridge
    groups of its forwards, the shared-prefix cache and its cascade attention, the sampler).

    widths: rows per group (G ints >= 1); cu_group_lens: int32 [G+1] offsets; row_group: int64 [B], the group of
    every row. Build it with `from_widths`; `select` gives the layout of a subset of the rows.
    """

    widths: Tuple[int, ...]
    cu_group_lens: torch.Tensor
    row_group: torch.Tensor

    @classmethod
    def from_widths(cls, widths: Union[Sequence[int], torch.Tensor], device: Device = None) -> "GroupLayout":
        cu = cu_group_lens_from_sizes(widths, device=device)
        return cls(tuple(group_sizes(cu).tolist()), cu, group_ids(cu))

    @property
    def num_groups(self) -> int:
        return len(self.widths)

    @property
    def num_rows(self) -> int:
        return self.row_group.numel()

    def to(self, device: Device) -> "GroupLayout":
        return GroupLayout(self.widths, self.cu_group_lens.to(device), self.row_group.to(device))

    def select(self, rows: torch.Tensor, caller: str = "bridge_ops") -> Tuple["GroupLayout", torch.Tensor]:
        """(the layout of the rows `rows`, int64 row indices in that order; the index [G'] of the group each of its
        groups was). The kept rows of a group must stay adjacent and at least one row must be kept (else a ValueError
        that names `caller`); groups left without rows are dropped."""
        row_group = self.row_group[rows]
        if row_group.numel() == 0:
            raise ValueError(f"{caller} must keep at least one row")
        groups, counts = torch.unique_consecutive(row_group, return_counts=True)
        if groups.numel() != torch.unique(groups).numel():
            raise ValueError(f"{caller} must keep the rows of a group adjacent")
        return GroupLayout.from_widths(counts, device=counts.device), groups
