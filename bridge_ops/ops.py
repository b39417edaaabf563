"""Python surface of the bridge_ops operators: wrappers, fake (meta) kernels and autograd.

The schemas, the CPU/CUDA kernels and the autograd kernels are defined in C++ (csrc/). Here each op gets a
fake kernel (`register_fake`), so that FakeTensor tracing and torch.compile(fullgraph=True) see its output
shapes without running it and keep it as one graph node.
"""

import warnings
from typing import Optional, Tuple, Union

import torch

from . import checks, reference
from ._loader import _C
from .dispatch import Inputs, available_backends, register_gpu_backend, select

register_gpu_backend()  # cupy kernels as the ops' CUDA kernels, when _C has none and cupy + a GPU are present
_BACKENDS = available_backends()  # fixed for the process once the CUDA kernels are registered


def _compiled(op: str, t: torch.Tensor, head_dim: bool = True) -> bool:
    """Whether the backend that serves this call (`bridge_ops.dispatch.select`) runs through torch.ops.bridge_ops
    (else the reference twin runs). `t`: the call's q (or o_a, or hidden); its last dim is the head dim if
    `head_dim`."""
    dim = t.shape[-1] if head_dim and t.dim() > 0 else None
    return select(Inputs(op, t.device.type, t.dtype, dim), _BACKENDS).compiled


def bridge_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_group_lens: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    *,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention along the batch axis, within groups of rows, at every position independently.

    For every row b, position s and head h::

        out[b, s, h] = sum_j softmax_j(scale * q[b, s, h] . k[j, s, h]) v[j, s, h]

    where j ranges over the rows of b's group whose key_mask[j, s] is True, and always over b itself: a row
    alone, or whose peers have all finished, gets its own v (never NaN). Rows of different groups never
    interact; there is no positional encoding and no order among the rows of a group (the op is
    permutation-equivariant within a group).

    Args:
        q, k, v: [B, S, H, Dh], float16 / bfloat16 / float32 / float64, one device. Any strides (a
            non-contiguous last dimension is copied first).
        cu_group_lens: int32 [G+1] offsets of the groups' first rows, 0 = cu[0] < ... < cu[G] = B
            (see `cu_group_lens_from_width`, `cu_group_lens_from_sizes`, `cu_group_lens_from_ids`).
        key_mask: bool [B, S] or None (all visible). False marks a key that other rows must not see:
            left padding, or a sequence already finished at position s. Queries are never masked.
        scale: softmax scale, default Dh ** -0.5.
        return_lse: also return the log-sum-exp of the scaled scores of every (b, s, h).

    Returns:
        out [B, S, H, Dh] (contiguous, q.dtype), and with return_lse also lse [B, S, H] (float32; float64 for
        float64 inputs). Differentiable in q, k, v (through out and lse); the backward is a fused kernel and has
        no backward of its own (no double backward). Accumulation is float32 (float64 for float64 inputs).
    """
    checks.check_tensors(q=q, k=k, v=v, cu_group_lens=cu_group_lens, key_mask=key_mask, optional=("key_mask",))
    if _compiled("bridge_attention", q):
        out, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu_group_lens, key_mask, scale)
    else:
        out, lse = reference.bridge_attention(q, k, v, cu_group_lens, key_mask, scale)
    return (out, lse) if return_lse else out


def bridge_block_decode(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    o_weight: torch.Tensor,
    cu_group_lens: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_heads: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """One inference step of a BridgeBlock in a single call: `hidden + BridgeBlock(hidden)`.

    Computes `normed = norm_weight * rms_norm(hidden, eps)` (HF Llama-style RMSNorm: statistics in float32, the
    normalized value cast back to hidden's dtype before the weight), q/k/v = `normed @ W^T` viewed as
    [B, S, num_heads, d_bridge / num_heads], `bridge_attention(q, k, v, cu_group_lens, key_mask, scale)`, its output
    projected by `o_weight` and added to `hidden`.

    Args:
        hidden: [B, S, D] (S = 1 when decoding), float16 / bfloat16 / float32 / float64.
        norm_weight: [D]; q_weight, k_weight, v_weight: [d_bridge, D]; o_weight: [D, d_bridge]; all hidden's dtype.
        cu_group_lens, key_mask, scale: as in `bridge_attention` (key_mask [B, S]).

    Returns:
        [B, S, D] in hidden's dtype. No backward (an inference op; training uses `BridgeBlock.forward`).
    """
    checks.check_tensors(
        hidden=hidden,
        norm_weight=norm_weight,
        q_weight=q_weight,
        k_weight=k_weight,
        v_weight=v_weight,
        o_weight=o_weight,
        cu_group_lens=cu_group_lens,
        key_mask=key_mask,
        optional=("key_mask",),
    )
    args = (hidden, norm_weight, eps, q_weight, k_weight, v_weight, o_weight, cu_group_lens, key_mask, num_heads, scale)
    if _compiled("bridge_block_decode", hidden, head_dim=False):
        return torch.ops.bridge_ops.bridge_block_decode(*args)
    return reference.bridge_block_decode(*args)


def cascade_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    cu_group_lens: torch.Tensor,
    suffix_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    *,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Cascade decode attention: one new token per row, the group's shared prompt stored once.

    Row b of group g (rows cu_group_lens[g] .. cu_group_lens[g+1]-1) attends, for query head h and its key/value
    head h // (Hq / Hkv) (GQA), over the concatenation of

    - the group's prefix: positions P - prefix_lens[g] .. P - 1 of prefix_k/v[g] (left padding is masked), and
    - its own suffix: positions 0 .. suffix_lens[b] - 1 of suffix_k/v[b] (all T when suffix_lens is None),

    with softmax scale `scale`. The result equals standard attention over the row's expanded keys
    [prefix; suffix], but the prefix is read once per group and head: its scores are a small
    [n_g * Hq/Hkv, P] matrix product per group instead of n_g separate vector products over n_g copies; the two
    partial results are merged exactly through their log-sum-exp (see `merge_attention_states`).

    The layouts are those of a HF cache, so `GroupPrefixCache` hands its tensors over without copies (any strides;
    a non-contiguous last dimension is copied first).

    Args:
        q: [B, Hq, Dh], float16 / bfloat16 / float32 / float64 (e.g. HF's query_states[:, :, 0]).
        prefix_k, prefix_v: [G, Hkv, P, Dh], q's dtype; the prompt of each group, right-aligned.
        prefix_lens: int32 [G], 0 <= prefix_lens[g] <= P.
        suffix_k, suffix_v: [B, Hkv, T, Dh] (T >= 0), q's dtype; each row's generated tokens, the current one
            included (HF appends the new key to the cache before attending).
        cu_group_lens: int32 [G+1] row offsets of the groups (`cu_group_lens_from_sizes`).
        suffix_lens: int32 [B] or None, 0 <= suffix_lens[b] <= T.
        scale: softmax scale, default Dh ** -0.5.
        return_lse: also return the log-sum-exp of each row's scaled scores.

    Returns:
        out [B, Hq, Dh] (contiguous, q.dtype) and with return_lse also lse [B, Hq] (float32; float64 for float64
        inputs). Accumulation is float32 (float64 for float64). No backward (an inference op): calls that need a
        gradient raise an error.

    Non-finite values (one policy for the reference and the CPU and CUDA kernels; SDPA over [prefix; suffix] gives the
    same out, except that it reads an absent key's value with weight 0):

    - A score of -inf (a key holding -inf, or q . k overflowing to -inf) makes the key absent, like a masked
      position: weight 0, and its value is never read (an inf or NaN there does not reach out).
    - A row with no present key (empty prompt and suffix, or every score -inf) gets out = 0 and lse = -inf.
    - A NaN score (a NaN in q or in a present key, or inf - inf in q . k) or a +inf score makes the row's out and lse
      NaN: lse is NaN rather than +inf, because `merge_attention_states` reads a +inf lse as an empty side and would
      silently drop the row.
    - An inf or NaN in a present key's value reaches out as in SDPA (+-inf, NaN where +inf meets -inf or NaN). Where
      that key's weight underflows to 0 (its score ~87 below the row's largest in float32, ~708 in float64) whether
      it shows is unspecified (it depends on how the kernel splits the keys).
    """
    checks.check_tensors(
        q=q,
        prefix_k=prefix_k,
        prefix_v=prefix_v,
        prefix_lens=prefix_lens,
        suffix_k=suffix_k,
        suffix_v=suffix_v,
        cu_group_lens=cu_group_lens,
        suffix_lens=suffix_lens,
        optional=("suffix_lens",),
    )
    args = (q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu_group_lens, suffix_lens, scale)
    if _compiled("cascade_attention", q):
        out, lse = torch.ops.bridge_ops.cascade_attention(*args)
    else:
        out, lse = _no_grad_reference(reference.cascade_attention, "cascade_attention", args)
    return (out, lse) if return_lse else out


def prefix_suffix_attention(*args, **kwargs) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Deprecated alias of `cascade_attention` (same arguments, same results): warns (DeprecationWarning) and calls it.

    The op is named after what it computes, the cascade over a shared-prefix cache, no longer after its two inputs.
    The torch op was renamed with it: its schema is `bridge_ops::cascade_attention`
    (`torch.ops.bridge_ops.cascade_attention`); there is no `torch.ops.bridge_ops.prefix_suffix_attention` any more,
    only this Python alias (also `bridge_ops.prefix_suffix_attention`).
    """
    warnings.warn(
        "bridge_ops.prefix_suffix_attention was renamed to cascade_attention; the old name is a deprecated alias",
        DeprecationWarning,
        stacklevel=2,
    )
    return cascade_attention(*args, **kwargs)


def merge_attention_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention results over disjoint key sets A and B of the same queries.

    lse = logaddexp(lse_a, lse_b) and out = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b: the attention over A u B.

    Non-finite values (the same in the reference and the CPU and CUDA kernels): an empty side has lse = -inf, or +inf
    (how FlashAttention-2 and vLLM mark an empty split; vLLM's merge treats it the same way); its o is never read (it
    may be NaN). Both empty give out = 0, lse = -inf. A NaN lse gives out and lse NaN. A side whose weight
    exp(lse_x - lse) underflows to 0 is not read either; otherwise an inf or NaN in o reaches out. With head dim 0,
    out is empty and lse is still the merged lse of every row. (`cascade_attention` never returns lse +inf:
    its +inf scores give NaN, so that they survive a merge.)

    Args:
        o_a, o_b: [..., Dh], one dtype (float16 / bfloat16 / float32 / float64) and device.
        lse_a, lse_b: [...] (o's leading dims), float32 (float64 for float64 o).

    Returns:
        (out [..., Dh] in o's dtype, lse [...]). Computed in float32 (float64). No backward (an inference op).
    """
    checks.check_tensors(o_a=o_a, lse_a=lse_a, o_b=o_b, lse_b=lse_b)
    if _compiled("merge_attention_states", o_a):
        return torch.ops.bridge_ops.merge_attention_states(o_a, lse_a, o_b, lse_b)
    return _no_grad_reference(reference.merge_attention_states, "merge_attention_states", (o_a, lse_a, o_b, lse_b))


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`torch.nn.functional.linear` for the few rows of a decode step: x [..., in] @ weight[out, in]^T + bias [out].

    At M = x.numel() / in <= 32 rows of float32 on the CPU, the compiled kernel streams every weight row from memory
    once for all M rows (a decode step's matrix products are bound by reading the weights, which a BLAS sgemm does
    at a fraction of the bandwidth at small M). Every other case (more rows, other dtypes, other devices, no compiled
    extension) is `F.linear` itself. Results equal F.linear's up to float32 rounding (the sum order differs).
    No backward (an inference op): under autograd with inputs that require grad it is F.linear.
    """
    if (
        x.device.type == "cpu"
        and _C is not None
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
    ):
        return torch.ops.bridge_ops.decode_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def sample_categorical(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row: long [rows] from probs [rows, vocab], exactly `torch.multinomial(probs, 1).squeeze(1)`: the
    same tokens, and `generator` (default: torch's global one) left in the same state.

    torch.multinomial draws an Exp(1) number for every (row, token), serially on the CPU (about 10 ms for 8 rows of a
    49,152-token vocabulary). The compiled CPU kernel draws the same uniforms in the same order and runs the rest
    (the transformation, probs / q, the argmax) in parallel over rows. Float32 contiguous CPU probabilities only; any
    other input (or no compiled extension) is torch.multinomial itself, which also raises on invalid rows. No
    backward (a sampling op)."""
    if probs.device.type == "cpu" and _C is not None:
        return torch.ops.bridge_ops.sample_categorical(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _no_grad_reference(fn, name: str, args):
    """The reference twin of an inference op, refusing (as the compiled Autograd kernels do) to run where a backward
    would be needed."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        raise RuntimeError(f"bridge_ops: {name} has no backward (an inference op): call it under torch.no_grad()")
    return fn(*args)


if _C is not None:

    @torch.library.register_fake("bridge_ops::bridge_attention")
    def _bridge_attention_fake(q, k, v, cu_group_lens, key_mask=None, scale=None):
        checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=checks.lse_dtype(q.dtype), device=q.device)
        return out, lse

    @torch.library.register_fake("bridge_ops::bridge_attention_backward")
    def _bridge_attention_backward_fake(grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask=None, scale=None):
        checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
        checks.check_attention_backward_args(grad_out, grad_lse, q, lse)
        return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))

    @torch.library.register_fake("bridge_ops::bridge_block_decode")
    def _bridge_block_decode_fake(
        hidden, norm_weight, eps, q_weight, k_weight, v_weight, o_weight, cu_group_lens, key_mask, num_heads, scale=None
    ):
        checks.check_block_decode_args(
            hidden, norm_weight, eps, q_weight, k_weight, v_weight, o_weight, cu_group_lens, key_mask, num_heads
        )
        return torch.empty_like(hidden)

    @torch.library.register_fake("bridge_ops::cascade_attention")
    def _cascade_attention_fake(
        q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu_group_lens, suffix_lens=None, scale=None
    ):
        checks.check_cascade_attention_args(
            q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, cu_group_lens
        )
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
            q.shape[:2], dtype=checks.lse_dtype(q.dtype)
        )

    @torch.library.register_fake("bridge_ops::decode_layer")
    def _decode_layer_fake(hidden, cos, sin, input_norm_weight, input_norm_eps, post_norm_weight, post_norm_eps, *rest):
        return torch.empty_like(hidden)

    @torch.library.register_fake("bridge_ops::sample_categorical")
    def _sample_categorical_fake(probs, generator=None):
        return probs.new_empty(probs.shape[:1], dtype=torch.long)

    @torch.library.register_fake("bridge_ops::decode_linear")
    def _decode_linear_fake(x, weight, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("bridge_ops::merge_attention_states")
    def _merge_attention_states_fake(o_a, lse_a, o_b, lse_b):
        checks.check_merge_args(o_a, lse_a, o_b, lse_b)
        return torch.empty_like(o_a, memory_format=torch.contiguous_format), torch.empty_like(
            lse_a, memory_format=torch.contiguous_format
        )
