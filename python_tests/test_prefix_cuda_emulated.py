"""The CUDA cascade kernels without a GPU: csrc/cuda/kernels/prefix_attention.cuh compiled by g++ and run lane by lane
by the warp emulator (python_tests/emulator), launched as csrc/cuda/prefix_attention_cuda.cu launches them (chunking,
workspace, argument order: mirrored here, since no Python backend serves these kernels). Checks indexing, chunking,
the LSE merges and every warp collective; not the nvcc code generation (CI compiles it) or timing.
"""

import ctypes
import hashlib
import os
import subprocess

import pytest
import torch
from helpers import assert_flash_rule, max_err
from test_prefix_attention import CASES, cascade_inputs, run_reference

from bridge_ops import reference

emulator_launcher = pytest.importorskip("emulator_launcher")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, *p.split("/")) for p in (
    "python_tests/emulator/bridge_emulator.cpp", "python_tests/emulator/bridge_emulator_shim.h",
    "csrc/cuda/kernels/bridge_attention.cuh", "csrc/cuda/kernels/prefix_attention.cuh", "csrc/attention_merge.h")]
KERNEL_TYPES = {torch.float32: "float, float", torch.float64: "double, double",
                torch.bfloat16: "bridge_ops::kernels::bf16_t, float", torch.float16: "bridge_ops::kernels::half_t, float"}


class KeyView(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("sn", ctypes.c_longlong), ("sh", ctypes.c_longlong),
                ("sl", ctypes.c_longlong)]


class CascadeShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("batch", "q_heads", "kv_heads", "dim", "groups", "prefix_len",
                                                  "suffix_len", "chunks", "chunk_len")]


@pytest.fixture(scope="module")
def lib():
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in SOURCES)).hexdigest()[:16]
    path = os.path.join(ROOT, "build", "emulator", f"prefix_emulator_{digest}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        subprocess.run([emulator_launcher.compiler(), "-std=c++17", "-O1", "-g0", "-fPIC", "-shared",
                        "-DBRIDGE_OPS_EMULATE", "-Wall", "-Wno-unknown-pragmas", "-I", os.path.dirname(SOURCES[0]),
                        SOURCES[0], "-o", tmp], check=True)
        os.replace(tmp, path)
    return ctypes.CDLL(path)


def launch(lib, name, dtype, blocks, smem, *args):
    def pointer(v):
        if isinstance(v, torch.Tensor):
            return ctypes.c_void_p(v.data_ptr())
        return ctypes.c_void_p(0) if v is None else v

    values = [pointer(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    err = ctypes.create_string_buffer(512)
    full = f"bridge_ops::kernels::{name}<{KERNEL_TYPES[dtype]}>".encode()
    if lib.emu_launch(full, ctypes.c_longlong(blocks), 32, smem, params, err, 512) != 0:
        raise RuntimeError(err.value.decode())


def key_view(t):
    return KeyView(t.data_ptr(), *t.stride()[:3])


def emulated_cascade(lib, q, pk, pv, plens, sk, sv, cu, slens, scale=None):
    """The host code of prefix_suffix_attention_cuda, with the emulator as the GPU."""
    batch, q_heads, dim = q.shape
    groups, kv_heads, prefix_len, _ = pk.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc_bytes = 8 if acc == torch.float64 else 4
    chunk_len = min(32, 49152 // ((dim + 1) * acc_bytes))
    chunks = -(-prefix_len // chunk_len)
    shape = CascadeShape(batch, q_heads, kv_heads, dim, groups, prefix_len, sk.shape[2], chunks, chunk_len)
    scale = (ctypes.c_double if acc == torch.float64 else ctypes.c_float)(dim**-0.5 if scale is None else scale)
    ws_o = torch.full((max(chunks, 1), batch, q_heads, dim), float("nan"), dtype=acc)
    ws_lse = torch.full((max(chunks, 1), batch, q_heads), float("nan"), dtype=acc)
    out, lse = torch.empty(batch, q_heads, dim, dtype=q.dtype), torch.empty(batch, q_heads, dtype=acc)
    q_strides = [ctypes.c_longlong(s) for s in q.stride()[:2]]
    if chunks:
        launch(lib, "cascade_prefix_chunks", q.dtype, chunks * groups * kv_heads, chunk_len * (dim + 1) * acc_bytes,
               q, *q_strides, key_view(pk), key_view(pv), plens, cu, ws_o, ws_lse, shape, scale)
    launch(lib, "cascade_suffix_merge", q.dtype, batch * q_heads, 0, q, *q_strides, key_view(sk), key_view(sv), slens,
           plens, cu, ws_o, ws_lse, out, lse, shape, scale)
    return out, lse


@pytest.mark.parametrize("dtype", list(KERNEL_TYPES), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_cascade_matches_reference(lib, case, dtype):
    sizes, q_heads, kv_heads, head_dim, p, t, prefix_lens, suffix_lens = CASES[case]
    args = cascade_inputs(sizes, q_heads, kv_heads, head_dim, p, t, dtype, prefix_lens=prefix_lens,
                          suffix_lens=suffix_lens)
    out, lse = emulated_cascade(lib, *args)
    oracle, oracle_lse = run_reference(args)
    low, low_lse = run_reference(args, dtype, upcast=False)
    assert_flash_rule("out", out, low, oracle, dtype)
    assert_flash_rule("lse", lse, low_lse, oracle_lse, dtype, magnitude=float(oracle_lse.abs().max()))


def test_emulated_cascade_strided_inputs_and_wide_heads(lib):
    """q and the suffix as views (as GroupPrefixCache hands them over); head_dim 200: several dims per lane and a
    chunk shorter than 32 keys; a suffix longer than one 32-key tile."""
    args = cascade_inputs([3, 2], 4, 2, 200, 70, 40, suffix_lens=[40, 33, 1, 0, 32])
    padded = lambda t, dim: torch.cat([t, torch.full_like(t, float("nan"))], dim=dim)  # noqa: E731
    q = padded(args[0], 1)[:, :4]
    suffix_k, suffix_v = (padded(t, 2)[:, :, :40] for t in args[4:6])
    out, lse = emulated_cascade(lib, q, args[1], args[2], args[3], suffix_k, suffix_v, args[6], args[7], scale=0.05)
    ref_out, ref_lse = reference.prefix_suffix_attention(*args, 0.05)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_merge_states(lib, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    o_a, o_b = torch.randn(5, 40, dtype=dtype), torch.randn(5, 40, dtype=dtype)
    lse_a, lse_b = torch.randn(5, dtype=acc), torch.randn(5, dtype=acc)
    lse_a[1] = lse_b[1] = lse_b[2] = float("-inf")
    o_b[2] = float("nan")  # an empty side is never read
    out, lse = torch.empty_like(o_a), torch.empty_like(lse_a)
    launch(lib, "merge_states", dtype, 5, 0, o_a, lse_a, o_b, lse_b, out, lse, ctypes.c_int(40))
    ref_out, ref_lse = reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    assert max_err(out, ref_out) <= 2 * torch.finfo(dtype).eps * 4
    torch.testing.assert_close(lse, ref_lse)  # -inf where both sides are empty
    assert torch.equal(out[1], torch.zeros_like(out[1])) and lse[1] == float("-inf")


def test_emulated_cascade_propagates_nan_and_takes_plus_inf_lse_as_empty(lib):
    """A NaN prefix key (in the second chunk) and a NaN query poison their rows as in the reference; merge_states takes
    a lse of +inf as an empty side (issue 13)."""
    args = cascade_inputs([2, 3], 4, 2, 16, 70, 4, prefix_lens=[70, 70])
    args[1][0, 0, 40, 3] = float("nan")
    args[0][3, 2, 0] = float("nan")
    out, _ = emulated_cascade(lib, *args)
    ref_out, _ = reference.prefix_suffix_attention(*args)
    nan = torch.isnan(ref_out)
    assert nan.any() and torch.equal(torch.isnan(out), nan)
    assert max_err(out[~nan], ref_out[~nan]) < 1e-5
    o_a, o_b = torch.randn(2, 40), torch.randn(2, 40)
    lse_a, lse_b = torch.tensor([float("inf"), 0.5]), torch.tensor([1.5, float("inf")])
    o_a[0], o_b[1] = float("nan"), float("nan")
    merged, lse = torch.empty_like(o_a), torch.empty_like(lse_a)
    launch(lib, "merge_states", torch.float32, 2, 0, o_a, lse_a, o_b, lse_b, merged, lse, ctypes.c_int(40))
    assert torch.equal(merged, torch.stack([o_b[0], o_a[1]])) and lse.tolist() == [1.5, 0.5]
