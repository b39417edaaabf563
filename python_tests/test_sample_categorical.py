"""bridge_ops.ops.sample_categorical: torch.multinomial(probs, 1)'s draw, bit for bit, and its generator state."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_ops import ops
from bridge_ops._loader import _C

compiled = pytest.mark.skipif(_C is None, reason="needs the compiled extension")


def _probs(rows: int, vocab: int, seed: int, masked: bool, temperature: float = 1.0) -> torch.Tensor:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3 / temperature
    if masked:  # top-k / top-p leave zeros
        logits[:, 1::3] = -float("inf")
    return torch.softmax(logits, -1)


def _both(probs, seed):
    """(ours, torch's) tokens and generator states from the same seed."""
    g_ours, g_torch = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ours = ops.sample_categorical(probs, g_ours)
    theirs = torch.multinomial(probs, 1, generator=g_torch).squeeze(1)
    return ours, theirs, g_ours.get_state(), g_torch.get_state()


@compiled
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    vocab=st.integers(1, 3000),
    seed=st.integers(0, 2**31 - 1),
    masked=st.booleans(),
    temperature=st.sampled_from([0.05, 1.0, 30.0]),
)
def test_equals_torch_multinomial(rows, vocab, seed, masked, temperature):
    probs = _probs(rows, vocab, seed, masked and vocab > 1, temperature)
    ours, theirs, state_ours, state_torch = _both(probs, seed)
    assert ours.dtype == torch.long and torch.equal(ours, theirs)
    assert torch.equal(state_ours, state_torch)  # the next draw is the same too


@compiled
def test_a_decode_steps_vocabulary_and_the_global_generator():
    probs = _probs(8, 49152, 0, False)
    ours, theirs, state_ours, state_torch = _both(probs, 1)
    assert torch.equal(ours, theirs) and torch.equal(state_ours, state_torch)
    torch.manual_seed(5)
    ours = ops.sample_categorical(probs)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.multinomial(probs, 1).squeeze(1))


@compiled
def test_ties_and_zero_rows_follow_torch():
    """Uniform rows (every ratio decided by q alone), one-hot rows, and torch's errors for invalid rows."""
    uniform = torch.full((3, 50), 1 / 50)
    one_hot = torch.zeros(2, 9)
    one_hot[0, 4] = one_hot[1, 8] = 1.0
    for probs in (uniform, one_hot):
        ours, theirs, state_ours, state_torch = _both(probs, 7)
        assert torch.equal(ours, theirs) and torch.equal(state_ours, state_torch)
    for bad in (torch.zeros(2, 5), torch.tensor([[0.5, float("nan")]]), torch.tensor([[1.0, -0.5]])):
        with pytest.raises(RuntimeError):
            ops.sample_categorical(bad, torch.Generator().manual_seed(0))


def test_other_inputs_are_torch_multinomial():
    """float64, a non-contiguous view: torch.multinomial's result (also without the compiled extension)."""
    probs = _probs(4, 100, 3, True).double()
    ours, theirs, _, _ = _both(probs, 2)
    assert torch.equal(ours, theirs)
    view = _probs(100, 4, 3, False).t()
    ours, theirs, _, _ = _both(view, 2)
    assert torch.equal(ours, theirs)


@compiled
def test_opcheck():
    probs = _probs(3, 17, 0, False)
    torch.library.opcheck(
        torch.ops.bridge_ops.sample_categorical, (probs, None), test_utils=("test_schema", "test_faketensor")
    )
