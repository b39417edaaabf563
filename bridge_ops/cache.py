"""Group-aware KV cache: the shared prompt of a group is stored once, each member's generated tokens per row.

All N members of a group share the prompt, yet an expanded cache (HF `DynamicCache` after `repeat_interleave`)
stores the prompt's keys and values N times and every decode step reads them N times. `GroupPrefixCache` keeps,
per layer,

- the prefix: the prompts' keys/values once per group, `[G, Hkv, P, Dh]`, right-aligned (left padding), with the
  valid length of each group's prompt in `prefix_lens` (int32 [G]);
- the suffix: each row's generated keys/values, `[B, Hkv, T, Dh]` (rows of one group adjacent, `cu_group_lens`).

It is a `transformers.Cache` (importing this module imports transformers) and works wherever a `DynamicCache` does:
a forward over the G prompts fills the prefix, later forwards over the B rows append to the suffix, and `update`
returns the expanded keys/values `[B, Hkv, P + T, Dh]` (materialized per call, so any attention implementation reads
the right keys). The cascade attention reads it differently, through `cache.cascade_view()`: a cache over the same
layers whose `update` returns only the suffix, while the cascade op `cascade_attention` reads the prefix in
place, so no copy of the prompt is ever made, in memory or per step (`bridge_ops.hf.attention.routed_to_cascade`
passes both to the model; `bridge_ops.generate(..., cache="shared-prefix")` decodes that way).
"""

from typing import Optional, Sequence, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .checks import fail, integer
from .layout import GroupLayout

_SUFFIX_GROWTH = 64  # suffix capacity grows in steps of this many positions (amortized O(1) append)


def _refuse_assignment(value) -> None:
    if value is not None:  # CacheLayerMixin.__init__ assigns None
        raise NotImplementedError(
            "GroupPrefixCache layers hold the prompt once per group: their keys/values cannot be "
            "assigned (offloading, beam reordering); convert with to_dynamic_cache() first"
        )


class _GroupPrefixLayer(CacheLayerMixin):
    """One layer's prefix and suffix (see the module docstring). Created by `GroupPrefixCache` only."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, cache: "GroupPrefixCache"):
        super().__init__()
        self.cache = cache
        self.prefix_keys: Optional[torch.Tensor] = None  # [G, Hkv, P, Dh]
        self.prefix_values: Optional[torch.Tensor] = None
        self._suffix_keys: Optional[torch.Tensor] = None  # [B, Hkv, capacity, Dh]; positions >= length unused
        self._suffix_values: Optional[torch.Tensor] = None
        self.length = 0  # T: suffix positions written

    # -- state ------------------------------------------------------------------------------------------------------
    @property
    def suffix_keys(self) -> torch.Tensor:
        return self._suffix_keys[:, :, : self.length]

    @property
    def suffix_values(self) -> torch.Tensor:
        return self._suffix_values[:, :, : self.length]

    # The standard `Cache` layer attributes: every row's keys/values [B, Hkv, P + T, Dh], materialized on each read (a
    # copy; None before the prompts' forward). They cannot be assigned: the layer holds the prompt once per group.
    @property
    def keys(self) -> Optional[torch.Tensor]:
        return None if self.prefix_keys is None else self._expand(self.prefix_keys, self._suffix_keys)

    @keys.setter
    def keys(self, value) -> None:
        _refuse_assignment(value)

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self.prefix_values is None else self._expand(self.prefix_values, self._suffix_values)

    @values.setter
    def values(self, value) -> None:
        _refuse_assignment(value)

    def get_seq_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[2] + self.length

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # -- writing ----------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.set(key_states, value_states)

    def set(self, prefix_keys, prefix_values, suffix_keys=None, suffix_values=None) -> None:
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.is_initialized = True
        self._suffix_keys = self._suffix_values = None
        self.length = 0
        if suffix_keys is not None and suffix_keys.shape[2] > 0:
            self.append(suffix_keys, suffix_values)

    def reset(self) -> None:
        """Forgets the prompt and the suffix (the next update stores a new prompt)."""
        self.__init__(self.cache)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Appends [B, Hkv, s, Dh] to the suffix."""
        end = self.length + keys.shape[2]
        self.reserve(keys.shape[2], keys.shape[0])
        self._suffix_keys[:, :, self.length : end] = keys
        self._suffix_values[:, :, self.length : end] = values
        self.length = end

    def reserve(self, count: int, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The suffix buffers (keys, values) [rows, Hkv, capacity, Dh] in the prompt's dtype, grown (in steps of
        _SUFFIX_GROWTH positions) to hold `count` positions after the current length. The caller writes positions
        length .. length + count - 1 and then advances `length` (the fused decode layer writes in place)."""
        end = self.length + count
        if self._suffix_keys is None or end > self._suffix_keys.shape[2]:
            capacity = -(-end // _SUFFIX_GROWTH) * _SUFFIX_GROWTH
            grown = []
            for old, prefix in ((self._suffix_keys, self.prefix_keys), (self._suffix_values, self.prefix_values)):
                buffer = prefix.new_empty(rows, prefix.shape[1], capacity, prefix.shape[3])
                if old is not None and self.length > 0:
                    buffer[:, :, : self.length] = old[:, :, : self.length]
                grown.append(buffer)
            self._suffix_keys, self._suffix_values = grown
        return self._suffix_keys, self._suffix_values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.prefix_keys is None:  # the prompts' forward: one row per group
            if key_states.shape[0] != self.cache.num_groups:
                fail(
                    f"GroupPrefixCache: the first forward must hold one row per group ({self.cache.num_groups} "
                    f"prompts), got a batch of {key_states.shape[0]}"
                )
            if self.cache.row_group.device != key_states.device:
                self.cache.to(key_states.device)
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        self.append_rows(key_states, value_states)
        return self.expanded()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Appends a forward's keys/values [B, Hkv, s, Dh] over the group members to the suffix."""
        if keys.shape[0] != self.cache.num_rows:
            fail(
                f"GroupPrefixCache: forwards after the prompts must hold one row per group member "
                f"({self.cache.num_rows} rows), got a batch of {keys.shape[0]}"
            )
        self.append(keys, values)

    def _expand(self, prefix: torch.Tensor, suffix: Optional[torch.Tensor]) -> torch.Tensor:
        rows = prefix[self.cache.row_group]
        return rows if suffix is None else torch.cat([rows, suffix[:, :, : self.length]], dim=2)

    def expanded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every row, [B, Hkv, P + T, Dh] (a copy)."""
        return self.keys, self.values

    # -- rows -------------------------------------------------------------------------------------------------------
    def select(self, rows: torch.Tensor, groups: torch.Tensor) -> None:
        if self.prefix_keys is None:
            return
        self.prefix_keys, self.prefix_values = self.prefix_keys[groups], self.prefix_values[groups]
        if self._suffix_keys is not None:
            self._suffix_keys, self._suffix_values = self._suffix_keys[rows], self._suffix_values[rows]

    def nbytes(self) -> Tuple[int, int]:
        """Bytes of (prefix, suffix) keys and values in use (the suffix's spare capacity not counted)."""
        prefix = 0 if self.prefix_keys is None else 2 * self.prefix_keys.numel() * self.prefix_keys.element_size()
        suffix = 0 if self._suffix_keys is None else 2 * self.suffix_keys.numel() * self.suffix_keys.element_size()
        return prefix, suffix


class GroupPrefixCache(Cache):
    """KV cache with the prompt stored once per group (see the module docstring).

    Args:
        widths: members per group (N, or one per prompt for ragged groups); rows of a group are adjacent.
        prefix_lens: valid prompt tokens per group (int [G]); the prompts are left-padded to P = max.

    Attributes:
        layout: the `GroupLayout` of the rows (its cu_group_lens and row_group are also attributes of the cache);
        prefix_lens: int32 [G].
    """

    def __init__(self, widths: Sequence[int], prefix_lens: torch.Tensor):
        # a bound method, not a closure over self: copy.deepcopy rebinds it to the copy (HF deep-copies caches)
        super().__init__(layer_class_to_replicate=self._new_layer)
        widths = [integer("GroupPrefixCache: widths", w) for w in widths]
        if not widths or min(widths) < 1:
            fail(f"GroupPrefixCache: widths must be >= 1 (one per group), got {widths}")
        prefix_lens = torch.as_tensor(prefix_lens)
        if prefix_lens.dim() != 1 or prefix_lens.numel() != len(widths):
            fail(f"GroupPrefixCache: prefix_lens must have shape [G] = [{len(widths)}], got {list(prefix_lens.shape)}")
        self.prefix_lens = prefix_lens.to(torch.int32)
        self.layout = GroupLayout.from_widths(widths, device=prefix_lens.device)

    def _new_layer(self) -> _GroupPrefixLayer:
        return _GroupPrefixLayer(self)

    @property
    def cu_group_lens(self) -> torch.Tensor:
        return self.layout.cu_group_lens

    @property
    def row_group(self) -> torch.Tensor:
        return self.layout.row_group

    def __repr__(self) -> str:
        return f"GroupPrefixCache(groups={self.num_groups}, rows={self.num_rows}, layers={len(self.layers)})"

    @property
    def num_groups(self) -> int:
        return self.layout.num_groups

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    def to(self, device) -> "GroupPrefixCache":
        """Moves the group metadata (the layers' tensors live where the model writes them)."""
        self.prefix_lens, self.layout = self.prefix_lens.to(device), self.layout.to(device)
        return self

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows `indices` (integer row indices, in that order; or a bool mask [B] of the rows to keep, as
        DynamicCache reads one), e.g. to compact the batch when groups finish. The kept rows of a group must stay
        adjacent; groups left without rows are dropped, prefix included."""
        indices = torch.as_tensor(indices, device=self.row_group.device)
        if indices.dtype == torch.bool:
            if indices.shape != (self.num_rows,):
                fail(f"GroupPrefixCache: a bool row mask must have shape [{self.num_rows}], got {list(indices.shape)}")
            indices = torch.nonzero(indices).flatten()
        elif indices.is_floating_point() or indices.is_complex():
            fail(
                f"GroupPrefixCache: batch_select_indices takes integer row indices or a bool mask, got {indices.dtype}"
            )
        indices = indices.long()
        self.select_rows(indices, *self.layout.select(indices, "bridge_ops: GroupPrefixCache: batch_select_indices"))

    def select_rows(self, indices: torch.Tensor, layout: GroupLayout, groups: torch.Tensor) -> None:
        """Keeps the rows `indices` (long [rows kept]), whose `self.layout.select(indices)` is (layout, groups) already:
        the cache then holds that very layout object (generate's step loop and the cache share one)."""
        for layer in self.layers:
            layer.select(indices, groups)
        self.prefix_lens, self.layout = self.prefix_lens[groups], layout

    def cascade_view(self) -> "CascadeView":
        """This cache as the cascade attention reads it (see `CascadeView`); the prompts must be stored already."""
        return CascadeView(self)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("GroupPrefixCache is already grouped: give the widths at construction")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("GroupPrefixCache does not support beam search; use a DynamicCache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GroupPrefixCache cannot be cropped; use a DynamicCache")

    def nbytes(self) -> Tuple[int, int]:
        """Bytes of (prefix, suffix) keys and values over all layers (the suffix's spare capacity not counted)."""
        sizes = [layer.nbytes() for layer in self.layers]
        return sum(p for p, _ in sizes), sum(s for _, s in sizes)

    # -- conversions ------------------------------------------------------------------------------------------------
    def to_dynamic_cache(self):
        """The equivalent expanded `DynamicCache`: [B, Hkv, P + T, Dh] per layer (copies)."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[layer.expanded() for layer in self.layers])

    @classmethod
    def from_dynamic_cache(
        cls, cache, widths: Sequence[int], prefix_lens: torch.Tensor, prefix_length: int, check: bool = True
    ) -> "GroupPrefixCache":
        """Splits an expanded cache ([B, Hkv, L, Dh] per layer, rows of a group adjacent) whose first
        `prefix_length` positions hold the groups' left-padded prompts: the first row of each group gives the prefix,
        every row its suffix. With `check`, every row's prompt keys/values must equal its group's (else ValueError)."""
        new = cls(widths, prefix_lens)
        first_rows = new.cu_group_lens[:-1].long()
        for index, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            new.to(keys.device)
            first_rows = first_rows.to(keys.device)
            if keys.shape[0] != new.num_rows or keys.shape[2] < prefix_length:
                fail(
                    f"GroupPrefixCache.from_dynamic_cache: layer {index} holds {list(keys.shape)}, expected "
                    f"[{new.num_rows}, Hkv, >= {prefix_length}, Dh]"
                )
            prefix_k, prefix_v = keys[first_rows, :, :prefix_length], values[first_rows, :, :prefix_length]
            if check and not (
                torch.equal(prefix_k[new.row_group], keys[:, :, :prefix_length])
                and torch.equal(prefix_v[new.row_group], values[:, :, :prefix_length])
            ):
                fail(
                    f"GroupPrefixCache.from_dynamic_cache: layer {index}: the rows of a group do not share their "
                    "prompt's keys/values"
                )
            target = _GroupPrefixLayer(new)
            target.set(prefix_k, prefix_v, keys[:, :, prefix_length:], values[:, :, prefix_length:])
            new.layers.append(target)
        return new


class CascadeView(Cache):
    """A `GroupPrefixCache` as the cascade attention reads it: the same layers (writes go to the cache), but `update`
    appends a forward's keys/values to the rows' suffixes and returns only those suffixes, [B, Hkv, T, Dh]; the cascade
    op reads the prefix in place. Give it to a model only together with the cascade attention, which attends to the
    prefix itself: `bridge_ops.hf.attention.routed_to_cascade(model, cache)` yields both."""

    def __init__(self, cache: GroupPrefixCache):
        if not cache.layers or any(layer.prefix_keys is None for layer in cache.layers):
            fail("GroupPrefixCache.cascade_view: store the prompts first (a forward over one row per group)")
        super().__init__(layers=cache.layers)
        self.cache = cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.append_rows(key_states, value_states)
        return layer.suffix_keys, layer.suffix_values
