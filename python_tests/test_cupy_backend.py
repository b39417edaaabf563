"""The cupy (NVRTC) backend: what can be checked anywhere, and its kernels against the reference where cupy and a GPU
exist (skipped otherwise). The full op suite runs on it on a GPU machine with BRIDGE_OPS_GPU_BACKEND=cupy
(bench/gpu_check.sh); on the CPU the C++ host it launches through runs with the warp emulator (test_cuda_emulated.py).
"""

import importlib.util

import pytest
import torch
from helpers import DTYPES, HAS_GPU, make_inputs
from test_attention_kernel import check_against_reference

from bridge_ops import cupy_backend, dispatch, info

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def test_kernel_source_is_found_and_self_contained_for_nvrtc():
    assert cupy_backend.kernel_source_path().endswith("bridge_attention.cuh")
    source = cupy_backend.kernel_source()
    assert '#include "launch.h"' not in source  # inlined: cupy's cache of compiled kernels is keyed by this text
    assert "struct ForwardParams" in source and "bridge_attention_fwd" in source


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("is_double", [False, True])
def test_launch_plans_fit_shared_memory_and_cover_every_task(is_double, backward):
    kernels = cupy_backend.kernels()
    c = kernels.constants()
    per_warp = kernels.backward_smem_bytes_per_warp if backward else kernels.forward_smem_bytes_per_warp
    for dim in (1, 16, 32, 33, 64, 80, 128, 129, 200, 256, 257, 512):
        for tasks in (1, 7, 256, 1000, 131072):
            for num_sms in (1, 16, 132):
                for max_group in (-1, 1, c["key_tile"], c["key_tile"] + 1, 300):
                    plan = kernels.plan_launch(is_double, dim, tasks, num_sms, backward, max_group)
                    assert plan.fast == (not is_double and dim <= c["chunk_dims"] * c["max_td"])
                    assert plan.threads % c["warp_size"] == 0 and 0 <= plan.smem_bytes <= c["smem_limit"]
                    per_block = plan.threads // c["warp_size"] if plan.fast else plan.threads
                    assert (plan.blocks - 1) * per_block < tasks <= plan.blocks * per_block  # every task, once
                    if not plan.fast:
                        assert not plan.workspace and plan.smem_bytes == 0
                        continue
                    # The fewest register chunks that hold the head dim, and the kernel's shared memory for them.
                    assert plan.td in c["td_values"] and plan.td * c["chunk_dims"] >= dim
                    assert all(td * c["chunk_dims"] < dim for td in c["td_values"] if td < plan.td)
                    assert per_block <= c["max_warps"] and plan.smem_bytes == per_block * per_warp(plan.td)
                    # Few tasks (decode shapes) spread over the multiprocessors rather than packed into full blocks.
                    assert per_block == 1 or plan.blocks >= 2 * num_sms
                    assert plan.workspace == (backward and (max_group < 0 or max_group > c["key_tile"]))


def test_kernel_names_cover_every_dtype_and_path():
    names = cupy_backend.all_kernel_names(torch.bfloat16)
    assert "bridge_ops::kernels::bridge_attention_fwd<bridge_ops::kernels::bf16_t, 4>" in names
    assert "bridge_ops::kernels::bridge_attention_bwd_simple<bridge_ops::kernels::bf16_t, float>" in names
    assert cupy_backend.all_kernel_names(torch.float64) == [
        "bridge_ops::kernels::bridge_attention_fwd_simple<double, double>",
        "bridge_ops::kernels::bridge_attention_bwd_simple<double, double>",
    ]
    source = cupy_backend.instantiation_source()
    assert source.count("(void*)&") == 3 * 10 + 2


def test_dispatch_explains_every_gpu_backend():
    text = info.report()
    for name in ("cuda", "cupy", "GPU backend"):
        assert name in text
    reasons = {b.name: b.unavailable_reason() for b in dispatch.BACKENDS}
    if not HAS_GPU:
        assert "no CUDA device" in dispatch.gpu_backend_summary()
        assert reasons["cupy"] is not None  # never serves without a GPU


def test_forcing_the_cupy_backend_is_explained(monkeypatch):
    monkeypatch.setenv("BRIDGE_OPS_GPU_BACKEND", "cupy")
    cuda = next(b for b in dispatch.BACKENDS if b.name == "cuda")
    assert cuda.unavailable_reason() == "BRIDGE_OPS_GPU_BACKEND=cupy selects the cupy backend"
    monkeypatch.setenv("BRIDGE_OPS_DISABLE_CUPY", "1")
    assert cupy_backend.unavailable_reason() == "disabled by BRIDGE_OPS_DISABLE_CUPY=1"


@pytest.mark.skipif(not (HAS_GPU and HAS_CUPY), reason="needs a CUDA device and cupy")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes, head_dim", [([4] * 8, 128), ([1, 33, 4, 7], 80), ([9, 2], 300)], ids=str)
def test_cupy_kernels_match_reference(sizes, head_dim, dtype):
    launcher, kernels = cupy_backend.launcher(), cupy_backend.kernels()

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu, mask, scale):
            out, lse = kernels.bridge_attention(launcher, q, k, v, cu, mask, scale)
            ctx.save_for_backward(q, k, v, lse, cu, mask)
            return out, lse

        @staticmethod
        def backward(ctx, grad_out, grad_lse):
            q, k, v, lse, cu, mask = ctx.saved_tensors
            grads = kernels.bridge_attention_backward(launcher, grad_out, grad_lse, q, k, v, lse, cu, mask)
            return (*grads, None, None, None)

    q, k, v, cu, mask = make_inputs(sizes, 3, 2, head_dim, dtype, device="cuda")
    check_against_reference(q, k, v, cu, mask, dtype, attention=lambda *a: Attention.apply(*a))
