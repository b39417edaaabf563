"""Hypothesis fuzzing of the compiled kernels against the reference over random layouts, masks and dtypes.

300 examples per test by default; set BRIDGE_OPS_FUZZ_EXAMPLES for more (and BRIDGE_OPS_FUZZ_RANDOM=1 to draw
new examples instead of the fixed, derandomized sequence).
"""

import pytest
import torch
from helpers import DEVICES, DTYPES, assert_flash_rule, term_magnitudes
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "bridge_attention"), reason="no compiled _C")


@st.composite
def problems(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    seqlen = draw(st.integers(1, 5))
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    visible = draw(st.sampled_from([None, 0.0, 0.3, 0.8, 1.0]))
    scale = draw(st.sampled_from([None, 0.1, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, seqlen, heads, head_dim, dtype, visible, scale, seed


def build(sizes, seqlen, heads, head_dim, dtype, visible, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = sum(sizes)
    cu = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int32)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    mask = None if visible is None else torch.rand(batch, seqlen, generator=gen) < visible
    grad_out = torch.randn(batch, seqlen, heads, head_dim, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(batch, seqlen, heads, generator=gen, dtype=torch.float64)
    return q, k, v, cu, mask, grad_out, grad_lse


@pytest.mark.parametrize("device", DEVICES)
@given(problem=problems())
def test_fuzz_forward_and_backward(device, problem):
    sizes, seqlen, heads, head_dim, dtype, visible, scale, seed = problem
    built = build(sizes, seqlen, heads, head_dim, dtype, visible, seed)
    q, k, v, cu, mask, grad_out, grad_lse = (None if t is None else t.to(device) for t in built)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.bridge_ops.bridge_attention(*leaves, cu, mask, scale)
    torch.autograd.backward([out, lse], [grad_out.to(dtype), grad_lse.to(lse.dtype)])
    oracle = reference_scaled(q, k, v, cu, mask, scale, grad_out, grad_lse, torch.float64, True)
    low = reference_scaled(q, k, v, cu, mask, scale, grad_out, grad_lse, dtype, False)
    got = [out.detach(), lse.detach()] + [t.grad for t in leaves]
    magnitudes = term_magnitudes(q, k, v, grad_out, grad_lse, scale)
    for name, g, lo, want in zip(("out", "lse", "dq", "dk", "dv"), got, low, oracle):
        assert torch.isfinite(g).all(), name
        assert_flash_rule(name, g, lo, want, dtype, magnitudes[name])


def reference_scaled(q, k, v, cu, mask, scale, grad_out, grad_lse, dtype, upcast):
    from bridge_ops import reference

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.bridge_attention(*leaves, cu, mask, scale, upcast=upcast)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]
