"""bridge_ops.dispatch: every backend says per input why it cannot serve a call (one test per reason), a call goes to
the first backend with no reason, the reference serves every input, and `python -m bridge_ops.info` shows it all."""

import dataclasses

import pytest
import torch
from helpers import HAS_GPU
from test_cascade_attention import cascade_inputs

import bridge_ops
from bridge_ops import dispatch, info, ops, reference
from bridge_ops.dispatch import BACKENDS, CASCADE_OPS, OPS, Inputs

BY_NAME = {b.name: b for b in BACKENDS}
CONSTANTS = bridge_ops._loader._C.kernels.constants()
CUDA_CASCADE_LIMIT = CONSTANTS["warp_size"] * CONSTANTS["cascade_max_td"]  # as csrc/cuda/kernels/launch.h defines it


def test_a_backend_serves_its_device_type_only():
    reasons = BY_NAME["cpu"].input_reasons(Inputs("bridge_attention", "cuda", torch.float32, 64))
    assert reasons == ["serves cpu tensors, not cuda"]
    assert BY_NAME["reference"].input_reasons(Inputs("bridge_attention", "meta", torch.float32, 64)) == []


def test_the_cupy_backend_has_no_cascade_kernels():
    for op in CASCADE_OPS:
        assert BY_NAME["cupy"].input_reasons(Inputs(op, "cuda", torch.float16, 64)) == [f"has no {op} kernel"]
    assert BY_NAME["cupy"].input_reasons(Inputs("bridge_attention", "cuda", torch.float16, 64)) == []


def test_the_kernels_take_floating_dtypes_only():
    reasons = BY_NAME["cpu"].input_reasons(Inputs("bridge_attention", "cpu", torch.int32, 8))
    assert reasons == ["has no torch.int32 kernels"]
    q = torch.zeros(2, 3, 1, 8, dtype=torch.int32)  # the reference serves the call and refuses it readably
    with pytest.raises(ValueError, match="q must be float16, bfloat16, float32 or float64"):
        bridge_ops.bridge_attention(q, q, q, bridge_ops.cu_group_lens_from_width(2, 2))


def test_the_cuda_cascade_kernels_limit_the_head_dim():
    assert CUDA_CASCADE_LIMIT == 256
    cuda = BY_NAME["cuda"]
    for op in CASCADE_OPS:
        assert cuda.input_reasons(Inputs(op, "cuda", torch.bfloat16, CUDA_CASCADE_LIMIT)) == []
        assert cuda.input_reasons(Inputs(op, "cuda", torch.bfloat16, CUDA_CASCADE_LIMIT + 1)) == [
            f"its {op} kernels take head_dim <= {CUDA_CASCADE_LIMIT}, got {CUDA_CASCADE_LIMIT + 1}"
        ]
    assert cuda.input_reasons(Inputs("bridge_attention", "cuda", torch.bfloat16, 1024)) == []  # its simple path
    # the CUDA cascade with a larger head dim goes to the reference, not to a kernel that raises
    chosen = dispatch.select(Inputs("cascade_attention", "cuda", torch.float16, 300), [cuda, BY_NAME["reference"]])
    assert chosen.name == "reference"


def test_a_missing_extension_is_a_reason_of_every_compiled_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "LOAD_ERROR", "ImportError: no _C")
    inputs = Inputs("bridge_attention", "cpu", torch.float32, 8)
    assert BY_NAME["cpu"].not_supported_reasons(inputs) == [
        "the compiled extension bridge_ops._C is not loaded (ImportError: no _C)"
    ]
    assert "is not loaded" in BY_NAME["cuda"].not_supported_reasons(inputs)[-1]
    assert "is not loaded" in BY_NAME["cupy"].unavailable_reason()
    assert dispatch.select(inputs).name == "reference"


@pytest.mark.skipif(HAS_GPU, reason="a CUDA device is visible")
def test_no_gpu_is_a_reason_of_the_gpu_backends():
    inputs = Inputs("bridge_attention", "cuda", torch.float32, 64)
    for name in ("cuda", "cupy"):
        assert BY_NAME[name].not_supported_reasons(inputs), name
    assert dispatch.select(inputs).name == "reference"


def test_every_input_has_a_backend_without_reasons():
    for op in OPS:
        for device in ("cpu", "cuda", "meta"):
            for dtype in (torch.float16, torch.float64, torch.int64):
                for head_dim in (None, 8, 300):
                    inputs = Inputs(op, device, dtype, head_dim)
                    chosen = dispatch.select(inputs)
                    assert chosen.not_supported_reasons(inputs) == [], inputs
    assert BACKENDS[-1].name == "reference"


def test_an_op_call_takes_the_backend_its_inputs_allow(monkeypatch):
    """A compiled backend that cannot take this head dim: the call runs the reference instead of raising."""
    limited = dataclasses.replace(BY_NAME["cpu"], max_head_dim={"cascade_attention": 8})
    monkeypatch.setattr(ops, "_BACKENDS", (limited, BY_NAME["reference"]))
    calls = []
    monkeypatch.setattr(reference, "cascade_attention", lambda *a: calls.append(a) or (a[0], a[0][..., 0]))
    small = cascade_inputs([2, 1], 4, 2, 8, 3, 2)
    large = cascade_inputs([2, 1], 4, 2, 16, 3, 2)
    bridge_ops.cascade_attention(*small)
    assert not calls
    bridge_ops.cascade_attention(*large)
    assert len(calls) == 1


def test_info_lists_what_every_backend_supports_and_why_it_is_unavailable():
    text = info.report()
    for b in BACKENDS:
        reason = b.unavailable_reason()
        assert (f"unavailable: {reason}" if reason else "available") in text
        assert f"supports {b.support()}" in text
    assert f"cascade_attention: head_dim <= {CUDA_CASCADE_LIMIT}" in text
    for op in OPS:
        assert f"serving {op} now: cpu -> " in text
