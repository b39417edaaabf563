"""Per-forward state of a bridged HuggingFace model: how each forward tells the Bridge layers which rows form groups.

HF forwards carry no notion of "these rows are the N samples of one prompt", nor of which rows have finished. That
state travels one way only: as a forward keyword argument. transformers passes the `**kwargs` of a model's forward
through its base model to every decoder layer, so

    model(input_ids, ..., bridge_groups=BridgeGroups(cu_group_lens, key_mask, batch_size))

reaches each bridged layer, which takes it out of the kwargs before running the original layer. The same channel
carries the shared-prefix cache to the cascade attention function (`bridge_ops.hf.attention.CACHE_KWARG`).

Invariants:

1. Every forward of a bridged model carries its own `BridgeGroups`: `cu_group_lens` (int32 [G+1], rows of a group
   adjacent) covers exactly the forward's B rows, `key_mask` (bool [B, S] or None) exactly its S positions. A layer
   that gets none, or one of another shape, raises.
2. A layer reads the groups from its call's arguments only; nothing is set on the model or its layers for it. A
   gradient-checkpointing recompute replays the layer with the arguments of the original call, so it sees the same
   groups whatever ran in between.
3. `with bridge_ops.groups(model, width=N):` (or `sizes=[...]`, or explicit `cu_group_lens=` / `key_mask=`) only
   fills in that argument: a forward pre-hook on the base model derives it, for every forward inside the block,
   from the batch size, the forward's 2-D `attention_mask` (padding is invisible) and, with `eos_token_id`, the
   tokens seen so far (a sequence's keys are invisible after its EOS; the EOS position itself stays visible). A
   bridged model's `generate` enters this block itself with N = num_return_sequences.
4. The one thing such a block follows across forwards is the EOS state of a KV cache: a forward that extends a
   cache continues where the block's previous forward over that cache stopped (rows that emitted EOS stay
   finished); a forward without a cache, or with an empty one, starts fresh (a prompt, or a teacher-forced batch
   whose `attention_mask` already says which keys exist). Unrelated batches in one block never share state.
5. `bridge_ops.generate` passes `bridge_groups=` itself at every step (it knows finished rows and compacts the
   batch), and therefore refuses to run inside a `groups(...)` block; blocks of one model do not nest.
"""

import contextlib
import inspect
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..checks import integer, token_ids
from ..layout import cu_group_lens_from_sizes, cu_group_lens_from_width

GROUPS_KWARG = "bridge_groups"  # the forward keyword argument that carries a forward's BridgeGroups
ACTIVE_BLOCK = "_bridge_groups_block"  # attribute of a bridged model: its active groups(...) block, or None

NO_GROUPS = (
    "bridge_ops: this model has Bridge blocks and needs to know which rows form a group. Run the forward inside "
    "`with bridge_ops.groups(model, width=N):` (or sizes=[...] / cu_group_lens=...), or use bridge_ops.generate / "
    "model.generate(..., num_return_sequences=N)."
)


@dataclass(frozen=True)
class BridgeGroups:
    """The groups of one forward over `batch_size` rows: cu_group_lens int32 [G+1] row offsets (cu[G] = batch_size),
    key_mask bool [B, S] (False = invisible key) or None (every key visible)."""

    cu_group_lens: torch.Tensor
    key_mask: Optional[torch.Tensor]
    batch_size: int

    def for_hidden(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(cu_group_lens, key_mask) for a layer's hidden states [B, S, D]; raises if they describe another batch."""
        batch, seqlen = hidden.shape[:2]
        if batch != self.batch_size:
            raise ValueError(
                f"bridge_ops: the groups were set for a batch of {self.batch_size} rows but the forward has {batch}"
            )
        if self.key_mask is not None and self.key_mask.shape[1] != seqlen:
            raise ValueError(
                f"bridge_ops: key_mask covers {self.key_mask.shape[1]} positions but the forward has {seqlen}"
            )
        return self.cu_group_lens, self.key_mask


def cache_argument(model: nn.Module) -> str:
    """The name of the forward argument that takes the KV cache: `cache` in the transformers releases that renamed
    it, `past_key_values` before (passing the old name to a newer release prints a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def base_model(model: nn.Module) -> nn.Module:
    """The decoder under the LM head (`model.model` for Llama, `model.transformer` for GPT-2), or the model itself."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def is_bridged(model: nn.Module) -> bool:
    return hasattr(model, ACTIVE_BLOCK)


def require_bridged(model: nn.Module) -> None:
    if not is_bridged(model):
        raise ValueError("bridge_ops: this model has no Bridge blocks; call bridge_ops.apply_bridge(model) first")


def groups_active(model: nn.Module) -> bool:
    """Whether a `groups(...)` block of this (bridged) model is open."""
    return getattr(model, ACTIVE_BLOCK, None) is not None


class _ForwardGroups:
    """The forward pre-hook of a `groups(...)` block: adds each forward's BridgeGroups (see module docstring)."""

    def __init__(self, width, sizes, cu_group_lens, key_mask, eos_token_id, cache_arg: str):
        self.width, self.sizes = width, sizes
        self.cu_group_lens, self.key_mask = cu_group_lens, key_mask
        self.eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, dtype=torch.long)  # a list of ids
        self.cache_arg = cache_arg
        self.cache: Optional[weakref.ref] = None  # the KV cache whose forwards `finished` follows
        self.finished: Optional[torch.Tensor] = None  # [B]: rows that emitted EOS in an earlier forward over it

    def __call__(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, seqlen = (tokens if tokens is not None else embeds).shape[:2]
        device = (tokens if tokens is not None else embeds).device
        cu = self._cu_group_lens(batch, device)
        key_mask = self.key_mask
        if key_mask is None:
            attention_mask = kwargs.get("attention_mask")
            key_mask = torch.ones(batch, seqlen, dtype=torch.bool, device=device)
            if attention_mask is not None and attention_mask.dim() == 2:
                key_mask = attention_mask[:, -seqlen:].bool()
            if self.eos is not None and tokens is not None:
                key_mask = key_mask & ~self._after_eos(tokens, kwargs.get(self.cache_arg))
        return args, {**kwargs, GROUPS_KWARG: BridgeGroups(cu, key_mask, batch)}

    def _cu_group_lens(self, batch: int, device) -> torch.Tensor:
        if self.cu_group_lens is not None:
            return self.cu_group_lens.to(device)
        if self.sizes is not None:
            if sum(self.sizes) != batch:
                raise ValueError(f"bridge_ops: group sizes {list(self.sizes)} sum to {sum(self.sizes)}, not {batch}")
            return cu_group_lens_from_sizes(self.sizes, device=device)
        return cu_group_lens_from_width(batch, self.width, device=device)

    def _after_eos(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """[B, S]: the position follows an EOS of its row. Only a forward that extends a KV cache continues a
        sequence: EOS tokens it feeds, and those fed by the block's earlier forwards over the same cache, count. A
        forward without a cache, or with an empty one, starts fresh (its tokens are a prompt: no EOS counts)."""
        if cache is None or cache.get_seq_length() == 0:
            self.cache = None if cache is None else weakref.ref(cache)
            self.finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            return torch.zeros_like(tokens, dtype=torch.bool)
        if self.cache is None or self.cache() is not cache:
            raise ValueError(
                "bridge_ops: this forward extends a KV cache whose first forward ran outside this groups(..., "
                "eos_token_id=...) block, so which rows already finished is unknown: run the prompt's forward "
                "inside the block too"
            )
        if self.finished.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"bridge_ops: the KV cache holds {self.finished.shape[0]} rows but this forward has "
                f"{tokens.shape[0]}: rows cannot be added, dropped or reordered inside a groups(..., eos_token_id=...) "
                "block"
            )
        hits = torch.isin(tokens, self.eos.to(tokens.device)).int()
        after = self.finished[:, None] | ((hits.cumsum(1) - hits) > 0)
        self.finished = self.finished | hits.bool().any(1)
        return after


@contextlib.contextmanager
def groups(
    model: nn.Module,
    width: Optional[int] = None,
    *,
    sizes: Optional[Sequence[int]] = None,
    cu_group_lens: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
) -> Iterator[None]:
    """Tells the Bridge layers of `model` which rows form groups for every forward inside the block.

    Give exactly one of: `width` (consecutive groups of `width` rows, the `num_return_sequences` layout), `sizes`
    (ragged group sizes), `cu_group_lens` (int32 [G+1] offsets). The key mask of each forward is `key_mask` if given
    (bool [B, S]), else the forward's 2-D `attention_mask` (padding invisible), and with `eos_token_id` also hides
    every position after a sequence's EOS, followed across the forwards that extend one KV cache (a forward without
    a cache, or with an empty one, is a prompt: its EOS tokens never count).
    """
    if sum(x is not None for x in (width, sizes, cu_group_lens)) != 1:
        raise ValueError("bridge_ops: give exactly one of width, sizes or cu_group_lens")
    if width is not None:
        width = integer("width", width, 1)
    eos = None if eos_token_id is None else token_ids("eos_token_id", eos_token_id)
    require_bridged(model)
    if groups_active(model):
        raise RuntimeError("bridge_ops: groups(...) blocks of one model cannot be nested")
    block = _ForwardGroups(width, sizes, cu_group_lens, key_mask, eos, cache_argument(base_model(model)))
    hook = base_model(model).register_forward_pre_hook(block, with_kwargs=True)
    setattr(model, ACTIVE_BLOCK, block)
    try:
        yield
    finally:
        hook.remove()
        setattr(model, ACTIVE_BLOCK, None)
