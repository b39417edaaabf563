"""How group information reaches every Bridge layer of a HuggingFace model during a forward.

HF forwards carry no notion of "these rows are the N samples of one prompt", nor of which rows have finished.
A bridged model therefore owns a `BridgeRuntime`: before each forward, its groups (`cu_group_lens`) and per-position
key mask (`key_mask`, [B, S]) are set, and every bridged decoder layer reads them. Two ways to set them:

- `with bridge_ops.groups(model, width=N):` (or `sizes=[...]`, or explicit `cu_group_lens=` / `key_mask=`): a
  forward pre-hook derives them for every forward inside the block from the batch size, the forward's
  `attention_mask` (padding is invisible) and, with `eos_token_id`, the tokens it has seen (a sequence's keys are
  invisible after its EOS; the EOS position itself stays visible). This is what `model.generate(...)` of a bridged
  model does automatically, with N = num_return_sequences.
  Forwards are independent unless they share a KV cache: a forward that extends a cache continues where the
  block's previous forward over that cache stopped (rows that emitted EOS stay finished); a forward without a cache,
  or with an empty one, starts fresh (a prompt, or a teacher-forced batch whose `attention_mask` already says which
  keys exist), so unrelated batches in one block never see each other's state.
- `runtime.set(cu_group_lens, key_mask)` before each forward: what `bridge_ops.generate` does, since it knows
  finished rows and compacts the batch itself.
"""

import contextlib
import weakref
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..groups import cu_group_lens_from_sizes, cu_group_lens_from_width

NO_GROUPS = (
    "bridge_ops: this model has Bridge blocks and needs to know which rows form a group. Run the forward inside "
    "`with bridge_ops.groups(model, width=N):` (or sizes=[...] / cu_group_lens=...), or use bridge_ops.generate / "
    "model.generate(..., num_return_sequences=N)."
)


class BridgeRuntime:
    """The group layout and key mask the bridged layers of one model read during a forward."""

    def __init__(self) -> None:
        self.cu_group_lens: Optional[torch.Tensor] = None
        self.key_mask: Optional[torch.Tensor] = None
        self.batch_size: Optional[int] = None
        self.context_active = False

    def set(self, cu_group_lens: torch.Tensor, key_mask: Optional[torch.Tensor], batch_size: int) -> None:
        self.cu_group_lens, self.key_mask, self.batch_size = cu_group_lens, key_mask, batch_size

    def clear(self) -> None:
        self.cu_group_lens = self.key_mask = self.batch_size = None

    def groups_for(self, hidden: torch.Tensor):
        """(cu_group_lens, key_mask) for a layer's hidden states [B, S, D]; raises if unset or of another batch."""
        if self.cu_group_lens is None:
            raise RuntimeError(NO_GROUPS)
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


def runtime_of(model: nn.Module) -> BridgeRuntime:
    runtime = getattr(model, "_bridge_runtime", None)
    if runtime is None:
        raise ValueError("bridge_ops: this model has no Bridge blocks; call bridge_ops.apply_bridge(model) first")
    return runtime


class _ForwardGroups:
    """Derives groups and key mask of each forward inside a `groups(...)` block (see module docstring)."""

    def __init__(self, runtime, width, sizes, cu_group_lens, key_mask, eos_token_id):
        self.runtime, self.width, self.sizes = runtime, width, sizes
        self.cu_group_lens, self.key_mask = cu_group_lens, key_mask
        eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        self.eos = None if eos is None else torch.as_tensor(list(eos))
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
                key_mask = key_mask & ~self._after_eos(tokens, kwargs.get("past_key_values"))
        self.runtime.set(cu, key_mask, batch)

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
) -> Iterator[BridgeRuntime]:
    """Tells the Bridge layers of `model` which rows form groups for every forward inside the block.

    Give exactly one of: `width` (consecutive groups of `width` rows, the `num_return_sequences` layout), `sizes`
    (ragged group sizes), `cu_group_lens` (int32 [G+1] offsets). The key mask of each forward is `key_mask` if given
    (bool [B, S]), else the forward's 2-D `attention_mask` (padding invisible), and with `eos_token_id` also hides
    every position after a sequence's EOS, followed across the forwards that extend one KV cache (a forward without
    a cache, or with an empty one, is a prompt: its EOS tokens never count).
    """
    if sum(x is not None for x in (width, sizes, cu_group_lens)) != 1:
        raise ValueError("bridge_ops: give exactly one of width, sizes or cu_group_lens")
    if width is not None and width < 1:
        raise ValueError(f"bridge_ops: width must be >= 1, got {width}")
    runtime = runtime_of(model)
    if runtime.context_active:
        raise RuntimeError("bridge_ops: groups(...) blocks of one model cannot be nested")
    hook = model.register_forward_pre_hook(
        _ForwardGroups(runtime, width, sizes, cu_group_lens, key_mask, eos_token_id), with_kwargs=True
    )
    runtime.context_active = True
    try:
        yield runtime
    finally:
        hook.remove()
        runtime.context_active = False
        runtime.clear()
