"""Plain-PyTorch twins of the bridge_ops operators: the oracle of every test and the fallback path.

Nothing here is fused or clever beyond what a careful PyTorch user would write. Two formulations of
bridge attention are kept side by side, because they fail in different ways:

- `bridge_attention` pads the groups to the widest one ([G, N] rows) and runs batched [N, N] attention per
  (group, position, head): memory grows with G * N^2, not B^2.
- `bridge_attention_dense` builds the dense [S, B, B] visibility mask and calls
  `torch.nn.functional.scaled_dot_product_attention` over the whole batch: what one writes with stock
  attention, and what the fused kernels avoid. Used by the benchmarks and cross-checked in the tests.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import checks
from .layout import group_ids


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return checks.lse_dtype(dtype) if upcast else dtype


def bridge_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_group_lens: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    *,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference bridge attention (same contract as `bridge_ops.bridge_attention`).

    Args:
        q, k, v: [B, S, H, Dh], one floating dtype, one device.
        cu_group_lens: int32 [G+1] row offsets of the groups (0 = cu[0] < cu[1] < ... < cu[G] = B).
        key_mask: bool [B, S] or None; False hides key (j, s) from the other rows of its group.
        scale: softmax scale, default Dh ** -0.5.
        upcast: compute in float32 (float64 for float64 inputs); False computes in the input dtype, which is
            what the tests use to measure how much error the low precision itself causes.

    Returns:
        out [B, S, H, Dh] in q.dtype and lse [B, S, H] in float32 (float64 for float64 inputs).
        Differentiable with ordinary autograd.
    """
    checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
    batch, seqlen, heads, head_dim = q.shape
    checks.check_cu_group_lens_values(cu_group_lens, batch)
    scale = checks.resolve_scale(scale, head_dim)
    dtype = _compute_dtype(q.dtype, upcast)

    cu = cu_group_lens.long()
    sizes = cu[1:] - cu[:-1]
    groups = sizes.numel()
    width = int(sizes.max())
    if groups * width == batch:  # uniform groups: a view, no gather
        rows = None
        qg, kg, vg = (t.to(dtype).view(groups, width, seqlen, heads, head_dim) for t in (q, k, v))
        member_valid = torch.ones(groups, width, dtype=torch.bool, device=q.device)
    else:
        member = torch.arange(width, device=q.device)
        member_valid = member[None, :] < sizes[:, None]  # [G, N]
        rows = (cu[:-1, None] + member[None, :]).clamp(max=batch - 1)  # padding slots repeat a real row
        qg, kg, vg = (t.to(dtype)[rows] for t in (q, k, v))  # [G, N, S, H, Dh]

    visible = member_valid[:, :, None].expand(groups, width, seqlen)  # [G, N(key), S]
    if key_mask is not None:
        member_mask = key_mask.reshape(groups, width, seqlen) if rows is None else key_mask[rows]
        visible = visible & member_mask
    itself = torch.eye(width, dtype=torch.bool, device=q.device)
    allowed = visible.permute(0, 2, 1)[:, :, None, None, :] | itself  # [G, S, 1, N(query), N(key)]

    scores = torch.einsum("gisHd,gjsHd->gsHij", qg, kg) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [G, S, H, N]
    probs = torch.exp(scores - lse[..., None])
    # A hidden key's value reaches its own row only: peers take it from zeros, so that a NaN or inf there (a padding
    # or finished row) never meets their zero weight, as in the fused kernels, which never read it.
    # A row's own value is read once, through the product below when its key is visible and as a separate term when
    # hidden: never with a zero weight (0 * inf would turn an inf value into NaN where SDPA and the kernels give inf).
    hidden_zeroed = vg.masked_fill(~visible[..., None, None], 0.0)
    out = torch.einsum("gsHij,gjsHd->gisHd", probs, hidden_zeroed)
    own = probs.diagonal(dim1=-2, dim2=-1).permute(0, 3, 1, 2)[..., None] * vg  # [G, N, S, H, Dh]
    out = out + own.masked_fill(visible[..., None, None], 0.0)
    lse = lse.permute(0, 3, 1, 2)  # [G, N, S, H]
    if rows is None:
        out, lse = out.reshape(batch, seqlen, heads, head_dim), lse.reshape(batch, seqlen, heads)
    else:
        out, lse = out[member_valid], lse[member_valid]
    return out.to(q.dtype), lse.to(checks.lse_dtype(q.dtype))


def bridge_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    cu_group_lens: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the backward op: autograd through `bridge_attention` (the saved `lse` is only checked)."""
    checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
    checks.check_attention_backward_args(grad_out, grad_lse, q, lse)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse_again = bridge_attention(*inputs, cu_group_lens, key_mask, scale)
        outputs, grads = [out], [grad_out]
        if grad_lse is not None:
            outputs.append(lse_again)
            grads.append(grad_lse.to(lse_again.dtype))
        return tuple(torch.autograd.grad(outputs, inputs, grads))


def visibility_mask(cu_group_lens: torch.Tensor, key_mask: Optional[torch.Tensor], seqlen: int) -> torch.Tensor:
    """Dense bool [S, B, B] mask: query row b may attend to key row j at position s (for tests and baselines)."""
    group_of_row = group_ids(cu_group_lens)
    batch, device = group_of_row.numel(), cu_group_lens.device
    same_group = group_of_row[:, None] == group_of_row[None, :]  # [B, B]
    keys = torch.ones(seqlen, batch, dtype=torch.bool, device=device) if key_mask is None else key_mask.T
    itself = torch.eye(batch, dtype=torch.bool, device=device)
    return (same_group[None] & keys[:, None, :]) | itself  # [S, B(query), B(key)]


def bridge_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_group_lens: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Bridge attention as stock attention over the batch axis with a dense [S, B, B] mask; returns out only."""
    checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
    mask = visibility_mask(cu_group_lens, key_mask, q.shape[1])[:, None]  # [S, 1, B, B]
    q_, k_, v_ = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [S, H, B, Dh]
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale)
    return out.permute(2, 0, 1, 3)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama-style RMSNorm: statistics in float32 (float64 for float64), cast back before the weight."""
    x = hidden.to(checks.lse_dtype(hidden.dtype))
    return weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)).to(hidden.dtype)


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
    """Reference of `bridge_ops.bridge_block_decode`: the same step as separate PyTorch calls."""
    checks.check_block_decode_args(
        hidden, norm_weight, eps, q_weight, k_weight, v_weight, o_weight, cu_group_lens, key_mask, num_heads
    )
    batch, seqlen, _ = hidden.shape
    normed = rms_norm(hidden, norm_weight, eps)
    heads = (batch, seqlen, num_heads, q_weight.shape[0] // num_heads)
    q, k, v = (F.linear(normed, w).view(heads) for w in (q_weight, k_weight, v_weight))
    mixed, _ = bridge_attention(q, k, v, cu_group_lens, key_mask, scale)
    return hidden + F.linear(mixed.reshape(batch, seqlen, -1), o_weight)


def merge_attention_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of `bridge_ops.merge_attention_states`: o = w_a o_a + w_b o_b, w_x = exp(lse_x - lse),
    lse = logaddexp(lse_a, lse_b); a side with lse -inf or +inf is empty."""
    checks.check_merge_args(o_a, lse_a, o_b, lse_b)
    lse_a, lse_b = (lse.masked_fill(lse == float("inf"), float("-inf")) for lse in (lse_a, lse_b))  # +inf: empty
    top = torch.maximum(lse_a, lse_b)
    empty = top == float("-inf")  # both sides empty: o = 0, lse = -inf
    top = top.masked_fill(empty, 0.0)
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    lse = top + torch.log(total)
    total = total.masked_fill(empty, 1.0)
    acc = lse_a.dtype

    def term(weight, o):  # a side of weight 0 is skipped: its o is never read (it may be NaN)
        weight = (weight / total)[..., None]
        return torch.where(weight == 0, 0.0, weight * o.to(acc))

    return (term(weight_a, o_a) + term(weight_b, o_b)).to(o_a.dtype), lse


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
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of `bridge_ops.cascade_attention`: standard attention of each row over the concatenation
    [its group's prefix; its own suffix], built explicitly (the expanded cache), with the pad positions masked.

    `upcast=False` computes in the input dtype (the tests' low-precision reference). Returns out [B, Hq, Dh] in
    q.dtype and lse [B, Hq] in float32 (float64 for float64). Non-finite scores as the op's docstring says: a key of
    score -inf is absent like a pad (weight 0, value never read), a row with no present key gets out 0 and lse -inf,
    a NaN or +inf score makes out and lse NaN.
    """
    checks.check_cascade_attention_args(
        q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, cu_group_lens
    )
    batch, q_heads, head_dim = q.shape
    prefix_len, suffix_len = prefix_k.shape[2], suffix_k.shape[2]
    checks.check_cu_group_lens_values(cu_group_lens, batch)
    checks.check_length_values(
        prefix_lens, prefix_len, "prefix_lens", "valid prompt positions, right-aligned in prefix_k"
    )
    if suffix_lens is not None:
        checks.check_length_values(suffix_lens, suffix_len, "suffix_lens", "valid positions from the start of suffix_k")
    scale = checks.resolve_scale(scale, head_dim)
    dtype = _compute_dtype(q.dtype, upcast)
    group = group_ids(cu_group_lens, batch)
    ratio = q_heads // prefix_k.shape[1]
    keys, values = (
        torch.cat([p[group], s], dim=2).to(dtype).repeat_interleave(ratio, dim=1)  # [B, Hq, P + T, Dh]
        for p, s in ((prefix_k, suffix_k), (prefix_v, suffix_v))
    )
    positions = torch.arange(prefix_len, device=q.device)
    prefix_visible = positions[None, :] >= (prefix_len - prefix_lens.long()[group])[:, None]
    lengths = torch.full((batch,), suffix_len, device=q.device) if suffix_lens is None else suffix_lens.long()
    suffix_visible = torch.arange(suffix_len, device=q.device)[None, :] < lengths[:, None]
    visible = torch.cat([prefix_visible, suffix_visible], dim=1)[:, None, :]  # [B, 1, P + T]
    if keys.shape[2] == 0:  # P = T = 0: no key anywhere
        out, lse = q.new_zeros(q.shape), torch.full(q.shape[:2], float("-inf"), device=q.device)
        return out, lse.to(checks.lse_dtype(q.dtype))
    scores = torch.einsum("bhd,bhkd->bhk", q.to(dtype), keys) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    absent = scores == float("-inf")  # pads and keys of score -inf: weight 0, their values never read
    # Softmax as SDPA computes it, exp(s - max) / sum: a row with no present key shifts by 0 (weights exp(-inf) = 0,
    # out 0, lse log 0 = -inf); a NaN or +inf score makes the weights (inf - inf), the sum, out and lse NaN.
    top = scores.amax(dim=-1)
    shift = top.masked_fill(top == float("-inf"), 0.0)
    weights = torch.exp(scores - shift[..., None])
    total = weights.sum(dim=-1)
    lse = shift + torch.log(total)
    out = torch.einsum("bhk,bhkd->bhd", weights, values.masked_fill(absent[..., None], 0.0))
    out = out / total.masked_fill(total == 0, 1.0)[..., None]
    return out.to(q.dtype), lse.to(checks.lse_dtype(q.dtype))
