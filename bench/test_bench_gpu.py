"""bridge_attention on a GPU: the fused CUDA kernel vs the PyTorch reference vs a dense-mask SDPA formulation.

Shapes of the CUDA issue, bf16, H=4, Dh=128: decode (S=1) at B=256 as 64 groups of 4 and as 32 groups of 8, and a
training shape B=32 as 8 groups of 4 with S=4096. Each implementation is timed forward only (no_grad) and
forward + backward, with CUDA events (median of many calls after warm-up, inside pytest-benchmark's pedantic mode,
whose own numbers are wall-clock and only a cross-check). extra_info carries the event median, the bytes the fused
kernel must move at the least, the achieved GB/s and the device copy bandwidth measured in the same session.
Skipped without a GPU. `python bench/gpu_report.py results.json` turns the JSON into the README table.

Run: `pytest bench/test_bench_gpu.py --benchmark-json=gpu.json` (bench/gpu_check.sh does this).
"""

import os

import attention_calls
import pytest
import torch

import bridge_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPES = {
    "decode-64x4": dict(groups=64, width=4, seqlen=1),
    "decode-32x8": dict(groups=32, width=8, seqlen=1),
    "train-8x4-S4096": dict(groups=8, width=4, seqlen=4096),
}
DTYPE = torch.bfloat16


def make_call(shape: str, impl: str, mode: str):
    return attention_calls.make_call(SHAPES[shape], impl, mode, device="cuda", dtype=DTYPE)


def min_bytes(q: torch.Tensor, mode: str) -> int:
    """Bytes the fused kernels must move at the least: fwd reads q, k, v and writes out (+ float32 lse);
    fwd+bwd adds the backward's reads of dO, q, k, v (+ lse) and writes of dq, dk, dv."""
    rows = q.numel() * q.element_size()
    stats = q[..., 0].numel() * 4
    forward = 4 * rows + stats
    return forward if mode == "fwd" else forward + 7 * rows + stats


def event_median_seconds(call, warmup: int = 10, iters: int = 50) -> float:
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


_COPY_BANDWIDTH = None


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), 2 GiB buffers, measured once per run."""
    global _COPY_BANDWIDTH
    if _COPY_BANDWIDTH is None:
        n = 1 << 30  # 1 Gi bf16 elements = 2 GiB per buffer
        src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
        dst = torch.empty_like(src)
        seconds = event_median_seconds(lambda: dst.copy_(src), warmup=3, iters=10)
        _COPY_BANDWIDTH = 2 * src.numel() * src.element_size() / seconds
        del src, dst
        torch.cuda.empty_cache()
    return _COPY_BANDWIDTH


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(attention_calls.IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bridge_attention_gpu(benchmark, shape, impl, mode):
    torch.cuda.empty_cache()
    call, q = make_call(shape, impl, mode)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    seconds = event_median_seconds(call, iters=int(os.environ.get("BRIDGE_OPS_BENCH_ITERS", "50")))
    moved = min_bytes(q, mode)
    benchmark.group = f"{shape} {mode}"
    benchmark.extra_info.update(
        shape=shape,
        impl=impl,
        mode=mode,
        dtype=str(DTYPE),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        gpu_backend=bridge_ops.dispatch.backend_for("cuda").name,
        event_median_s=seconds,
        min_bytes=moved,
        achieved_gbps=moved / seconds / 1e9,
        copy_gbps=copy_bandwidth() / 1e9,
        peak_memory_bytes=peak,
    )
    benchmark.pedantic(call, rounds=5, iterations=5, warmup_rounds=1)
    torch.cuda.synchronize()
