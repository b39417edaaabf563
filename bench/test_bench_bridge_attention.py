"""bridge_attention on the CPU: the fused C++ kernel vs the PyTorch reference vs a dense-mask SDPA formulation.

Shapes follow the foundation issue: decode (S=1) at B=64 as 16 groups of 4 and B=256 as 64 groups of 4, and a
training shape B=16 as 4 groups of 4 with S=512; H=4, Dh=128, float32. Each implementation is timed forward only
(under no_grad, as in generation) and forward + backward; the peak memory of one call (measured in a fresh
process, see conftest.py) is kept in extra_info.
"""

import attention_calls
import pytest
import torch
from conftest import peak_memory_bytes

SHAPES = {
    "decode-16x4": dict(groups=16, width=4, seqlen=1),
    "decode-64x4": dict(groups=64, width=4, seqlen=1),
    "train-4x4-S512": dict(groups=4, width=4, seqlen=512),
}


def make_call(shape: str, impl: str, mode: str):
    return attention_calls.make_call(SHAPES[shape], impl, mode)[0]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", list(attention_calls.IMPLEMENTATIONS))
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
