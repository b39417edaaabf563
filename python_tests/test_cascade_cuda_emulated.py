"""The CUDA cascade kernels without a GPU: csrc/cuda/kernels/cascade_attention.cuh compiled by g++ and run lane by lane
by the warp emulator (python_tests/emulator), driven by the ops' C++ host (csrc/host/cascade_attention_host.cpp, the
one a CUDA build binds as the ops' CUDA kernels) with the emulator as its launcher: checks, launch.h's plan_cascade
(chunking, grids, shared memory, workspace) and params structs, the kernels' indexing, chunking, LSE merges and every
warp collective; not the nvcc code generation (CI compiles it) or timing.
"""

import pytest
import torch
from helpers import DTYPES, assert_flash_rule, max_err
from test_cascade_attention import CASES, cascade_inputs, run_reference

from bridge_ops import reference

emulator_launcher = pytest.importorskip("emulator_launcher")


@pytest.fixture(scope="module")
def emu():
    return emulator_launcher.emulator()


def emulated_cascade(emu, q, pk, pv, plens, sk, sv, cu, slens, scale=None):
    """cascade_attention by the C++ host, with the emulator as the GPU."""
    return emulator_launcher.kernels.cascade_attention(emu, q, pk, pv, plens, sk, sv, cu, slens, scale)


def emulated_merge(emu, o_a, lse_a, o_b, lse_b):
    """merge_attention_states by the C++ host, with the emulator as the GPU."""
    return emulator_launcher.kernels.merge_attention_states(emu, o_a, lse_a, o_b, lse_b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_cascade_matches_reference(emu, case, dtype):
    sizes, q_heads, kv_heads, head_dim, p, t, prefix_lens, suffix_lens = CASES[case]
    args = cascade_inputs(
        sizes, q_heads, kv_heads, head_dim, p, t, dtype, prefix_lens=prefix_lens, suffix_lens=suffix_lens
    )
    out, lse = emulated_cascade(emu, *args)
    oracle, oracle_lse = run_reference(args)
    low, low_lse = run_reference(args, dtype, upcast=False)
    assert_flash_rule("out", out, low, oracle, dtype)
    assert_flash_rule("lse", lse, low_lse, oracle_lse, dtype, magnitude=float(oracle_lse.abs().max()))


def test_emulated_cascade_strided_inputs_and_wide_heads(emu):
    """q and the suffix as views (as GroupPrefixCache hands them over); head_dim 200: several dims per lane and a
    chunk shorter than 32 keys; a suffix longer than one 32-key tile."""
    args = cascade_inputs([3, 2], 4, 2, 200, 70, 40, suffix_lens=[40, 33, 1, 0, 32])
    padded = lambda t, dim: torch.cat([t, torch.full_like(t, float("nan"))], dim=dim)  # noqa: E731
    q = padded(args[0], 1)[:, :4]
    suffix_k, suffix_v = (padded(t, 2)[:, :, :40] for t in args[4:6])
    out, lse = emulated_cascade(emu, q, args[1], args[2], args[3], suffix_k, suffix_v, args[6], args[7], scale=0.05)
    ref_out, ref_lse = reference.cascade_attention(*args, 0.05)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_merge_states(emu, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    o_a, o_b = torch.randn(5, 40, dtype=dtype), torch.randn(5, 40, dtype=dtype)
    lse_a, lse_b = torch.randn(5, dtype=acc), torch.randn(5, dtype=acc)
    lse_a[1] = lse_b[1] = lse_b[2] = float("-inf")
    o_b[2] = float("nan")  # an empty side is never read
    out, lse = emulated_merge(emu, o_a, lse_a, o_b, lse_b)
    ref_out, ref_lse = reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert max_err(out, ref_out) <= 2 * torch.finfo(dtype).eps * 4
    torch.testing.assert_close(lse, ref_lse)  # -inf where both sides are empty
    assert torch.equal(out[1], torch.zeros_like(out[1])) and lse[1] == float("-inf")


def test_emulated_cascade_propagates_nan_and_takes_plus_inf_lse_as_empty(emu):
    """A NaN prefix key (in the second chunk) and a NaN query poison their rows as in the reference; merge_states takes
    a lse of +inf as an empty side (issue 13)."""
    args = cascade_inputs([2, 3], 4, 2, 16, 70, 4, prefix_lens=[70, 70])
    args[1][0, 0, 40, 3] = float("nan")
    args[0][3, 2, 0] = float("nan")
    out, _ = emulated_cascade(emu, *args)
    ref_out, _ = reference.cascade_attention(*args)
    nan = torch.isnan(ref_out)
    assert nan.any() and torch.equal(torch.isnan(out), nan)
    assert max_err(out[~nan], ref_out[~nan]) < 1e-5
    o_a, o_b = torch.randn(2, 40), torch.randn(2, 40)
    lse_a, lse_b = torch.tensor([float("inf"), 0.5]), torch.tensor([1.5, float("inf")])
    o_a[0], o_b[1] = float("nan"), float("nan")
    merged, lse = emulated_merge(emu, o_a, lse_a, o_b, lse_b)
    assert torch.equal(merged, torch.stack([o_b[0], o_a[1]])) and lse.tolist() == [1.5, 0.5]


def test_emulated_cascade_runs_the_host_checks_of_a_cuda_build(emu):
    """A check that only the C++ host of the CUDA kernels makes (the CPU kernel and the reference take any head_dim):
    the emulated ops go through it."""
    args = cascade_inputs([2, 1], 2, 1, 264, 5, 3)
    torch.ops.bridge_ops.cascade_attention(*args)  # the CPU kernel serves head_dim 264
    with pytest.raises(ValueError, match="the CUDA cascade kernels take head_dim <= 256, got 264"):
        emulated_cascade(emu, *args)
    o, lse = torch.randn(3, 264), torch.randn(3)
    with pytest.raises(ValueError, match="head_dim <= 256, got 264"):
        emulated_merge(emu, o, lse, o, lse)
    with pytest.raises(ValueError, match="the emulator kernels take cpu tensors, got o_a on meta"):
        emulated_merge(emu, *(t.to("meta") for t in (o, lse, o, lse)))
