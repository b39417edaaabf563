"""bridge_attention on the CPU: the fused C++ kernel vs the PyTorch reference vs a dense-mask SDPA formulation.

Shapes follow the foundation issue: decode (S=1) at B=64 as 16 groups of 4 and B=256 as 64 groups of 4, and a
training shape B=16 as 4 groups of 4 with S=512; H=4, Dh=128, float32. Each implementation is timed forward only
(under no_grad, as in generation) and forward + backward; the peak memory of one call (measured in a fresh
process, see conftest.py) is kept in extra_info.
"""

import pytest
import torch
from conftest import peak_memory_bytes

import bridge_ops
from bridge_ops import reference

SHAPES = {
    "decode-16x4": dict(groups=16, width=4, seqlen=1),
    "decode-64x4": dict(groups=64, width=4, seqlen=1),
    "train-4x4-S512": dict(groups=4, width=4, seqlen=512),
}
HEADS, HEAD_DIM = 4, 128

IMPLEMENTATIONS = {
    "fused": lambda q, k, v, cu: bridge_ops.bridge_attention(q, k, v, cu),
    "reference": lambda q, k, v, cu: reference.bridge_attention(q, k, v, cu)[0],
    "dense_sdpa": lambda q, k, v, cu: reference.bridge_attention_dense(q, k, v, cu),
}


def make_call(shape: str, impl: str, mode: str):
    cfg = SHAPES[shape]
    batch = cfg["groups"] * cfg["width"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, cfg["seqlen"], HEADS, HEAD_DIM, generator=gen) for _ in range(3))
    cu = bridge_ops.cu_group_lens_from_width(batch, cfg["width"])
    fn = IMPLEMENTATIONS[impl]
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return fn(q, k, v, cu)

        return call
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=gen)

    def call():  # returns the gradients instead of accumulating them, so no call leaves state for the next
        return torch.autograd.grad(fn(*leaves, cu), leaves, grad_out)

    return call


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bridge_attention_cpu(benchmark, shape, impl, mode):
    call = make_call(shape, impl, mode)
    call()  # warm-up
    benchmark.group = f"{shape} {mode}"
    benchmark.extra_info.update(
        shape=shape,
        impl=impl,
        mode=mode,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        peak_memory_bytes=peak_memory_bytes("test_bench_bridge_attention", "make_call", shape, impl, mode),
    )
    benchmark(call)
