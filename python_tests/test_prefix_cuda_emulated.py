"""The CUDA cascade kernels without a GPU: csrc/cuda/kernels/prefix_attention.cuh compiled by g++ and run lane by lane
by the warp emulator (python_tests/emulator), launched as csrc/cuda/prefix_attention_cuda.cu launches them: the launch
plan (chunking, grids, shared memory, workspace) is launch.h's plan_cascade, read through bridge_ops._C.kernels; the
argument order is the kernels' (no Python backend serves them). Checks indexing, chunking, the LSE merges and every
warp collective; not the nvcc code generation (CI compiles it) or timing.
"""

import ctypes

import pytest
import torch
from helpers import assert_flash_rule, max_err
from test_prefix_attention import CASES, cascade_inputs, run_reference

from bridge_ops import checks, reference

emulator_launcher = pytest.importorskip("emulator_launcher")
kernels = emulator_launcher.cupy_backend.kernels

# Template arguments <T, A> of the cascade kernels: the cupy backend's C++ storage type, the accumulation type.
KERNEL_TYPES = {
    dtype: f"{c_type}, {'double' if dtype == torch.float64 else 'float'}"
    for dtype, c_type in emulator_launcher.cupy_backend.C_TYPES.items()
}


class KeyView(ctypes.Structure):  # kernels::KeyView<T> of prefix_attention.cuh
    _fields_ = [
        ("ptr", ctypes.c_void_p),
        ("sn", ctypes.c_longlong),
        ("sh", ctypes.c_longlong),
        ("sl", ctypes.c_longlong),
    ]


@pytest.fixture(scope="module")
def emu():
    return emulator_launcher.emulator()


def launch(emu, name, dtype, blocks, smem, *args):
    full = f"bridge_ops::kernels::{name}<{KERNEL_TYPES[dtype]}>"
    emu.launch_args(full, blocks, kernels().constants()["cascade_threads"], smem, args)


def key_view(t):
    return KeyView(t.data_ptr(), *t.stride()[:3])


def emulated_cascade(emu, q, pk, pv, plens, sk, sv, cu, slens, scale=None):
    """The host code of prefix_suffix_attention_cuda, with the emulator as the GPU."""
    batch, q_heads, dim = q.shape
    groups, kv_heads, prefix_len, _ = pk.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    plan = kernels().plan_cascade(batch, q_heads, kv_heads, dim, groups, prefix_len, sk.shape[2], acc.itemsize)
    shape = plan.shape.to_bytes()
    scale = (ctypes.c_double if acc == torch.float64 else ctypes.c_float)(checks.resolve_scale(scale, dim))
    ws_o = torch.full((plan.workspace_chunks, batch, q_heads, dim), float("nan"), dtype=acc)
    ws_lse = torch.full((plan.workspace_chunks, batch, q_heads), float("nan"), dtype=acc)
    out, lse = torch.empty(batch, q_heads, dim, dtype=q.dtype), torch.empty(batch, q_heads, dtype=acc)
    q_strides = [ctypes.c_longlong(s) for s in q.stride()[:2]]
    if plan.prefix_blocks:
        launch(
            emu,
            "cascade_prefix_chunks",
            q.dtype,
            plan.prefix_blocks,
            plan.prefix_smem_bytes,
            q,
            *q_strides,
            key_view(pk),
            key_view(pv),
            plens,
            cu,
            ws_o,
            ws_lse,
            shape,
            scale,
        )
    launch(
        emu,
        "cascade_suffix_merge",
        q.dtype,
        plan.merge_blocks,
        0,
        q,
        *q_strides,
        key_view(sk),
        key_view(sv),
        slens,
        plens,
        cu,
        ws_o,
        ws_lse,
        out,
        lse,
        shape,
        scale,
    )
    return out, lse


@pytest.mark.parametrize("dtype", list(KERNEL_TYPES), ids=str)
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
    ref_out, ref_lse = reference.prefix_suffix_attention(*args, 0.05)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_merge_states(emu, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    o_a, o_b = torch.randn(5, 40, dtype=dtype), torch.randn(5, 40, dtype=dtype)
    lse_a, lse_b = torch.randn(5, dtype=acc), torch.randn(5, dtype=acc)
    lse_a[1] = lse_b[1] = lse_b[2] = float("-inf")
    o_b[2] = float("nan")  # an empty side is never read
    out, lse = torch.empty_like(o_a), torch.empty_like(lse_a)
    launch(emu, "merge_states", dtype, 5, 0, o_a, lse_a, o_b, lse_b, out, lse, ctypes.c_int(40))
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
    ref_out, _ = reference.prefix_suffix_attention(*args)
    nan = torch.isnan(ref_out)
    assert nan.any() and torch.equal(torch.isnan(out), nan)
    assert max_err(out[~nan], ref_out[~nan]) < 1e-5
    o_a, o_b = torch.randn(2, 40), torch.randn(2, 40)
    lse_a, lse_b = torch.tensor([float("inf"), 0.5]), torch.tensor([1.5, float("inf")])
    o_a[0], o_b[1] = float("nan"), float("nan")
    merged, lse = torch.empty_like(o_a), torch.empty_like(lse_a)
    launch(emu, "merge_states", torch.float32, 2, 0, o_a, lse_a, o_b, lse_b, merged, lse, ctypes.c_int(40))
    assert torch.equal(merged, torch.stack([o_b[0], o_a[1]])) and lse.tolist() == [1.5, 0.5]
