"""Python surface of the bridge_ops operators: wrappers, fake (meta) kernels and autograd.

The schemas, the CPU/CUDA kernels and the autograd kernels are defined in C++ (csrc/). Here each op gets a
fake kernel (`register_fake`), so that FakeTensor tracing and torch.compile(fullgraph=True) see its output
shapes without running it and keep it as one graph node.
"""

from typing import Optional, Tuple, Union

import torch

from . import checks, reference
from ._loader import _C
from .dispatch import compiled_device_types, register_gpu_backend

register_gpu_backend()  # cupy kernels as the ops' CUDA kernels, when _C has none and cupy + a GPU are present
_COMPILED = compiled_device_types()


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
    if q.device.type in _COMPILED:
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
    args = (hidden, norm_weight, eps, q_weight, k_weight, v_weight, o_weight, cu_group_lens, key_mask, num_heads, scale)
    if hidden.device.type in _COMPILED:
        return torch.ops.bridge_ops.bridge_block_decode(*args)
    return reference.bridge_block_decode(*args)


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
        checks.check_block_decode_args(hidden, norm_weight, q_weight, k_weight, v_weight, o_weight, num_heads)
        return torch.empty_like(hidden)
