"""Self-attention of a HuggingFace model over a `GroupPrefixCache`, through transformers' attention registry.

`routed_to_cascade(model, cache)` (this module's context manager) switches the model
to the attention implementation registered here (`AttentionInterface` + `AttentionMaskInterface`, name
`ATTENTION_NAME`) and yields the forward kwargs of a decode step: the model's cache argument is `cache.cascade_view()`
(its `update` returns each row's suffix only) and `CACHE_KWARG` carries the `GroupPrefixCache` itself to the attention
function (forward kwargs reach it through every decoder layer, see `bridge_ops.hf.runtime`). Then, in every decode
step (one new token per row), each self-attention layer calls the cascade op `bridge_ops.ops.cascade_attention`: the
group's prefix is read in place, once per group, and no attention mask is built (the op masks the prompts' left
padding through the cache's `prefix_lens`). The prompts' forward (one row per group, the prefix being written) runs
before, outside the block, with transformers' attention.

Works for the models whose attention layers call `past_key_values.update` and then the registered attention function
with the updated keys/values (Llama, Qwen2, Qwen3, Mistral and the other `modeling_*` files written the same way).
Bridge blocks are independent of this and work unchanged on top. Sliding windows shorter than the sequence, attention
softcapping, sinks and multi-token decode steps are not supported by the cascade (they raise).
"""

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .. import ops
from .runtime import cache_argument

ATTENTION_NAME = "bridge_ops_prefix_cascade"
CACHE_KWARG = "bridge_prefix_cache"  # forward kwarg through which the attention function receives the cache


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The registered attention function: HF layouts query [B, Hq, S, Dh], key/value [B, Hkv, L, Dh]; returns
    ([B, S, Hq, Dh], None) like transformers' sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = kwargs.pop(CACHE_KWARG, None)
    if cache is None:  # a forward without the cascade's kwargs
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = cache.layers[module.layer_idx]
    if query.shape[2] != 1:
        raise NotImplementedError(f"bridge_ops: the cascade attention decodes one token per row, got {query.shape[2]}")
    window = kwargs.get("sliding_window")
    if window is not None and layer.get_seq_length() > window:
        raise NotImplementedError(
            f"bridge_ops: the cascade attention has no sliding window (window {window} < "
            f"{layer.get_seq_length()} cached positions)"
        )
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        raise NotImplementedError("bridge_ops: the cascade attention supports neither softcapping nor sinks")
    out = ops.cascade_attention(
        query[:, :, 0],
        layer.prefix_keys,
        layer.prefix_values,
        cache.prefix_lens,
        key,
        value,
        cache.cu_group_lens,
        None,
        scaling,
    )
    return out.unsqueeze(1), None


def _mask(*, q_length: int, **kwargs):
    """Decode steps need no mask (the cascade op masks the prompts' padding itself); any other forward gets SDPA's
    causal + padding mask."""
    from transformers.masking_utils import sdpa_mask

    return None if q_length == 1 else sdpa_mask(q_length=q_length, **kwargs)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why the cascade cannot serve this model's self-attention (None if it can), judged from its config and modules:
    every feature `_attention` refuses. Head dims, dtypes and devices need no check here: the op itself serves them
    all (`bridge_ops.dispatch` sends a call its kernels cannot take to the PyTorch reference)."""
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not call registered attention functions"
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit softcapping"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return f"layers other than full attention ({sorted(set(config.layer_types))})"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return f"a sliding window ({config.sliding_window} positions)"
    if any(getattr(module, "sinks", None) is not None for module in model.modules()):
        return "attention sinks"
    return None


def register() -> None:
    """Registers the cascade attention and its mask under ATTENTION_NAME (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask)


@contextlib.contextmanager
def routed_to_cascade(model: nn.Module, cache) -> Iterator[dict]:
    """Runs the model's self-attention through the cascade op over `cache` (a GroupPrefixCache) inside the block.

    Yields the forward kwargs of a decode step (`model(input_ids, ..., **kwargs)`): the cache's `cascade_view()` as the
    model's cache argument, and the cache itself under `CACHE_KWARG`. The prompts must be stored in the cache already.
    The model's attention implementation is restored on exit.
    """
    register()
    kwargs = {cache_argument(model): cache.cascade_view(), CACHE_KWARG: cache}
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield kwargs
    finally:
        model.set_attn_implementation(previous)
