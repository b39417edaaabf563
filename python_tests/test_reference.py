"""The reference itself, checked against the most literal loop implementation and the dense-mask formulation."""

import pytest
import torch
from helpers import make_inputs, max_err, naive_bridge_attention

import bridge_ops
from bridge_ops import reference

NAN = float("nan")


@pytest.mark.parametrize(
    "sizes, finished", [([1], ()), ([4, 1, 3], ()), ([2, 5, 1, 3], (1,)), ([3, 3], (0, 1))], ids=str
)
@pytest.mark.parametrize("masked", [True, False])
def test_reference_matches_the_literal_loop(sizes, finished, masked):
    q, k, v, cu, mask = make_inputs(sizes, 3, 2, 5, torch.float64, finished_groups=finished)
    mask = mask if masked else None
    out, lse = reference.bridge_attention(q, k, v, cu, mask, 0.7)
    want_out, want_lse = naive_bridge_attention(q, k, v, cu, mask, 0.7)
    assert max_err(out, want_out) < 1e-12 and max_err(lse, want_lse) < 1e-12


@pytest.mark.parametrize("sizes", [[4] * 4, [1, 6, 2]], ids=str)
def test_dense_sdpa_formulation_agrees(sizes):
    q, k, v, cu, mask = make_inputs(sizes, 4, 3, 8, torch.float64)
    out, _ = reference.bridge_attention(q, k, v, cu, mask)
    assert max_err(reference.bridge_attention_dense(q, k, v, cu, mask), out) < 1e-12


def test_visibility_mask_rules():
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    key_mask = torch.tensor([[True], [False], [False]])
    allowed = reference.visibility_mask(cu, key_mask, 1)[0]
    expected = torch.tensor([[True, False, False], [True, True, False], [False, False, True]])
    assert torch.equal(allowed, expected)


def test_low_precision_mode_computes_in_the_input_dtype():
    q, k, v, cu, mask = make_inputs([3, 2], 2, 2, 16, torch.bfloat16)
    up, _ = reference.bridge_attention(q, k, v, cu, mask)
    low, _ = reference.bridge_attention(q, k, v, cu, mask, upcast=False)
    oracle, _ = reference.bridge_attention(q.double(), k.double(), v.double(), cu, mask)
    assert up.dtype == low.dtype == torch.bfloat16
    assert max_err(up, oracle) <= max_err(low, oracle)
    assert not torch.equal(up, low)


@pytest.mark.guarantee
def test_reference_keeps_nan_of_hidden_keys_in_their_own_row():
    """A padding or finished row's key/value is hidden from its peers: a NaN there reaches its own output only, in
    the reference as in the fused kernel."""
    q, k, v, cu, mask = make_inputs([3, 2, 1], 4, 2, 8)  # ragged: the reference pads the groups
    mask[:] = True
    mask[1, :2] = False  # row 1: left padding at positions 0-1
    mask[4, 3] = False  # row 4: finished before position 3
    for row, position in ((1, 0), (1, 1), (4, 3)):
        k[row, position], v[row, position] = NAN, NAN
    out = bridge_ops.bridge_attention(q, k, v, cu, mask)
    ref, _ = reference.bridge_attention(q, k, v, cu, mask)
    poisoned = torch.zeros(6, 4, dtype=torch.bool)
    poisoned[1, :2] = poisoned[4, 3] = True
    for result in (out, ref):
        assert torch.equal(torch.isnan(result).any(-1).any(-1), poisoned)
    torch.testing.assert_close(out[~poisoned], ref[~poisoned])
