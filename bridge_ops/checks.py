"""Argument checks of the Python paths (the reference fallback and the fake kernels used by torch.compile), and the
integer arguments of the Python API (`integer`, `token_ids`: widths, token ids, sizes).

The op checks mirror csrc/checks.h: same conditions, same messages naming the argument, always ValueError (TypeError
for an argument that is not a tensor at all, `check_tensors`, which the public wrappers run first).
Shape/dtype/device checks never read tensor contents; `check_cu_group_lens_values` does (it syncs on GPU).
"""

import math
import operator
from collections.abc import Iterable
from typing import List, Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(message: str) -> None:
    raise ValueError(f"bridge_ops: {message}")


def integer(name: str, value, minimum: Optional[int] = None) -> int:
    """`value` as an int (Python, numpy and 0-d tensor integers; a TypeError naming `name` for a bool, float or str,
    which are never converted), a ValueError unless it is >= minimum (if given)."""
    try:
        if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"bridge_ops: {name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"bridge_ops: {name} must be >= {minimum}, got {number}")
    return number


def token_ids(name: str, value) -> List[int]:
    """None, one token id or several, as a list of ints."""
    if value is None:
        return []
    values = list(value) if isinstance(value, Iterable) and not isinstance(value, str) else [value]
    return [integer(name, v) for v in values]


def check_tensors(optional=(), **named) -> None:
    """Every named argument is a torch.Tensor (those listed in `optional` may also be None)."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) and not (t is None and name in optional):
            allowed = "a torch.Tensor or None" if name in optional else "a torch.Tensor"
            raise TypeError(
                f"bridge_ops: {name} must be {allowed}, got {type(t).__name__} "
                "(convert it with torch.as_tensor(...) on the device of the other tensors)"
            )


def check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.shape != ref.shape:
        fail(f"{name} must have the same shape as {ref_name} {list(ref.shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype:
        fail(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
    check_same_device(t, name, ref, ref_name)


def check_cu_group_lens_meta(cu_group_lens: torch.Tensor, q: torch.Tensor, q_name: str = "q") -> None:
    if cu_group_lens.dtype != torch.int32:
        fail(f"cu_group_lens must be int32 (torch.int32), got {cu_group_lens.dtype}")
    if cu_group_lens.dim() != 1:
        fail(f"cu_group_lens must be 1-D [G+1], got shape {list(cu_group_lens.shape)}")
    if cu_group_lens.numel() < 2:
        fail(f"cu_group_lens must hold at least 2 offsets ([0, B] for one group), got {cu_group_lens.numel()}")
    check_same_device(cu_group_lens, "cu_group_lens", q, q_name)


def check_key_mask(key_mask: Optional[torch.Tensor], q: torch.Tensor, q_name: str = "q") -> None:
    """key_mask is None or bool [B, S] (q's first two dims) on q's device."""
    if key_mask is None:
        return
    if key_mask.dtype != torch.bool:
        fail(f"key_mask must be bool (True = visible key), got {key_mask.dtype}")
    if key_mask.dim() != 2 or tuple(key_mask.shape) != tuple(q.shape[:2]):
        fail(f"key_mask must have shape [B, S] = {list(q.shape[:2])}, got {list(key_mask.shape)}")
    check_same_device(key_mask, "key_mask", q, q_name)


def check_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_group_lens: torch.Tensor,
    key_mask: Optional[torch.Tensor],
) -> None:
    if q.dim() != 4:
        fail(f"q must have shape [B, S, H, Dh] (4 dims), got shape {list(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        fail(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    check_like(k, "k", q, "q")
    check_like(v, "v", q, "q")
    if q.shape[0] == 0:
        fail("q has an empty batch (B = 0); bridge_attention needs at least one row")
    if q.shape[2] == 0 or q.shape[3] == 0:
        fail(f"q must have H > 0 heads and Dh > 0 head_dim, got shape {list(q.shape)}")
    check_cu_group_lens_meta(cu_group_lens, q)
    check_key_mask(key_mask, q)


def check_cu_group_lens_values(cu_group_lens: torch.Tensor, batch: int) -> int:
    """Validates the offsets (reads them: a sync on GPU) and returns the largest group size."""
    cu = cu_group_lens.tolist()
    if cu[0] != 0:
        fail(f"cu_group_lens must start at 0, got cu_group_lens[0] = {cu[0]}")
    for g in range(len(cu) - 1):
        if cu[g + 1] <= cu[g]:
            fail(
                "cu_group_lens must be strictly increasing (every group has at least one row), got "
                f"cu_group_lens[{g}] = {cu[g]} and cu_group_lens[{g + 1}] = {cu[g + 1]}"
            )
    if cu[-1] != batch:
        fail(f"cu_group_lens must end at the batch size B = {batch}, got cu_group_lens[-1] = {cu[-1]}")
    return max(b - a for a, b in zip(cu[:-1], cu[1:]))


def check_attention_backward_args(
    grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, lse: torch.Tensor
) -> None:
    check_like(grad_out, "grad_out", q, "q")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        fail(f"lse must have shape [B, S, H] = {list(q.shape[:3])}, got {list(lse.shape)}")
    check_same_device(lse, "lse", q, "q")
    if grad_lse is not None:
        if grad_lse.shape != lse.shape:
            fail(f"grad_lse must have the shape of lse {list(lse.shape)}, got {list(grad_lse.shape)}")
        check_same_device(grad_lse, "grad_lse", q, "q")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of lse and every softmax statistic: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else scale


def check_block_decode_args(
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
) -> None:
    if hidden.dim() != 3:
        fail(f"hidden must have shape [B, S, D], got {list(hidden.shape)}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        fail(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if not (eps > 0 and math.isfinite(eps)):
        fail(f"eps must be a finite number > 0 (the RMSNorm epsilon, e.g. 1e-6), got {eps}")
    dim = hidden.shape[-1]
    d_bridge = q_weight.shape[0] if q_weight.dim() == 2 else -1
    if norm_weight.dim() != 1 or norm_weight.shape[0] != dim:
        fail(f"norm_weight must have shape [{dim}], got {list(norm_weight.shape)}")
    if norm_weight.dtype != hidden.dtype:
        fail(f"norm_weight must have the dtype of hidden ({hidden.dtype}), got {norm_weight.dtype}")
    check_same_device(norm_weight, "norm_weight", hidden, "hidden")
    check_cu_group_lens_meta(cu_group_lens, hidden, "hidden")
    check_key_mask(key_mask, hidden, "hidden")
    for name, weight, shape in (
        ("q_weight", q_weight, [d_bridge, dim]),
        ("k_weight", k_weight, [d_bridge, dim]),
        ("v_weight", v_weight, [d_bridge, dim]),
        ("o_weight", o_weight, [dim, d_bridge]),
    ):
        if list(weight.shape) != shape:
            fail(f"{name} must have shape {shape}, got {list(weight.shape)}")
        if weight.dtype != hidden.dtype:
            fail(f"{name} must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
        check_same_device(weight, name, hidden, "hidden")
    if num_heads < 1 or d_bridge % num_heads != 0:
        fail(f"num_heads ({num_heads}) must be >= 1 and divide d_bridge ({d_bridge})")


def _check_lengths(t: torch.Tensor, name: str, n: int, shape: str, q: torch.Tensor) -> None:
    if t.dtype != torch.int32:
        fail(f"{name} must be int32 (torch.int32), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        fail(f"{name} must have shape {shape} = [{n}], got {list(t.shape)}")
    check_same_device(t, name, q, "q")


def _check_kv(t: torch.Tensor, name: str, shape: str, d0: int, d1: int, head_dim: int, q: torch.Tensor) -> None:
    if t.dim() != 4 or t.shape[0] != d0 or t.shape[1] != d1 or t.shape[3] != head_dim:
        fail(f"{name} must have shape {shape} = [{d0}, {d1}, *, {head_dim}], got {list(t.shape)}")
    if t.dtype != q.dtype:
        fail(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device(t, name, q, "q")


def check_cascade_attention_args(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    prefix_lens: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: Optional[torch.Tensor],
    cu_group_lens: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices of a cascade_attention call (mirrors check_cascade_attention_args in C++)."""
    if q.dim() != 3:
        fail(f"q must have shape [B, Hq, Dh] (3 dims: one new token per row), got shape {list(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        fail(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if min(q.shape) == 0:
        fail(f"q must have B, Hq, Dh > 0, got shape {list(q.shape)}")
    if prefix_k.dim() != 4:
        fail(f"prefix_k must have shape [G, Hkv, P, Dh] (4 dims), got shape {list(prefix_k.shape)}")
    kv_heads = prefix_k.shape[1]
    if kv_heads == 0 or q.shape[1] % kv_heads != 0:
        fail(f"the q heads ({q.shape[1]}) must be a multiple of the key/value heads of prefix_k ({kv_heads})")
    check_cu_group_lens_meta(cu_group_lens, q)
    groups = cu_group_lens.numel() - 1
    _check_kv(prefix_k, "prefix_k", "[G, Hkv, P, Dh]", groups, kv_heads, q.shape[2], q)
    check_like(prefix_v, "prefix_v", prefix_k, "prefix_k")
    _check_lengths(prefix_lens, "prefix_lens", groups, "[G]", q)
    _check_kv(suffix_k, "suffix_k", "[B, Hkv, T, Dh]", q.shape[0], kv_heads, q.shape[2], q)
    check_like(suffix_v, "suffix_v", suffix_k, "suffix_k")
    if suffix_lens is not None:
        _check_lengths(suffix_lens, "suffix_lens", q.shape[0], "[B]", q)


def check_length_values(lens: torch.Tensor, limit: int, name: str, what: str) -> None:
    """0 <= lens[i] <= limit (reads the values: a sync on GPU)."""
    for i, n in enumerate(lens.tolist()):
        if not 0 <= n <= limit:
            fail(f"{name} must lie in [0, {limit}] ({what}), got {name}[{i}] = {n}")


def check_merge_args(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    if o_a.dim() < 1:
        fail(f"o_a must have shape [..., Dh] (at least 1 dim), got shape {list(o_a.shape)}")
    if o_a.dtype not in SUPPORTED_DTYPES:
        fail(f"o_a must be float16, bfloat16, float32 or float64, got {o_a.dtype}")
    check_like(o_b, "o_b", o_a, "o_a")
    stat = lse_dtype(o_a.dtype)
    for t, name in ((lse_a, "lse_a"), (lse_b, "lse_b")):
        if t.shape != o_a.shape[:-1]:
            fail(f"{name} must have shape {list(o_a.shape[:-1])} (o_a without its last dim), got {list(t.shape)}")
        if t.dtype != stat:
            fail(f"{name} must be {stat} (the lse dtype of {o_a.dtype} outputs), got {t.dtype}")
        check_same_device(t, name, o_a, "o_a")
