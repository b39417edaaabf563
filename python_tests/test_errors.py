"""Bad inputs get a ValueError naming the argument, from the compiled kernel and from the reference alike."""

import numpy as np
import pytest
import torch
from helpers import HAS_GPU, make_inputs, tiny_decode_args
from test_cascade_attention import cascade_inputs

import bridge_ops
from bridge_ops import reference

compiled = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "cascade_attention"), reason="no compiled _C")
IMPLEMENTATIONS = {
    "kernel": lambda q, k, v, cu, mask: torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None),
    "reference": lambda q, k, v, cu, mask: reference.bridge_attention(q, k, v, cu, mask),
}


def good():
    return list(make_inputs([3, 2], 4, 2, 8))  # B = 5, S = 4


def replace(index, value):
    args = good()
    args[index] = value(args) if callable(value) else value
    return args


BAD_INPUTS = {
    "q rank": (replace(0, lambda a: a[0][0]), "q must have shape"),
    "q dtype": (replace(0, lambda a: a[0].to(torch.int32)), "q must be float16"),
    "k shape": (replace(1, lambda a: a[1][:, :3]), "k must have the same shape as q"),
    "v head_dim": (replace(2, lambda a: a[2][..., :4]), "v must have the same shape as q"),
    "k dtype": (replace(1, lambda a: a[1].double()), "k must have the same dtype as q"),
    "v device": (replace(2, lambda a: a[2].to("meta")), "v is on meta but q is on cpu"),
    "empty batch": (
        [*(torch.empty(0, 4, 2, 8) for _ in range(3)), torch.tensor([0], dtype=torch.int32), None],
        "empty batch",
    ),
    "no heads": ([torch.empty(5, 4, 0, 8)] * 3 + [torch.tensor([0, 5], dtype=torch.int32), None], "H > 0 heads"),
    "cu dtype": (replace(3, lambda a: a[3].long()), "cu_group_lens must be int32"),
    "cu rank": (replace(3, lambda a: a[3][None]), "cu_group_lens must be 1-D"),
    "cu too short": (replace(3, torch.tensor([0], dtype=torch.int32)), "at least 2 offsets"),
    "cu start": (replace(3, torch.tensor([1, 3, 5], dtype=torch.int32)), "must start at 0"),
    "cu not increasing": (replace(3, torch.tensor([0, 3, 3, 5], dtype=torch.int32)), "strictly increasing"),
    "cu decreasing": (replace(3, torch.tensor([0, 4, 2, 5], dtype=torch.int32)), "strictly increasing"),
    "cu end short": (replace(3, torch.tensor([0, 3, 4], dtype=torch.int32)), "must end at the batch size B = 5"),
    "cu end long": (replace(3, torch.tensor([0, 3, 6], dtype=torch.int32)), "must end at the batch size B = 5"),
    "cu device": (replace(3, lambda a: a[3].to("meta")), "cu_group_lens is on meta"),
    "mask dtype": (replace(4, lambda a: a[4].float()), "key_mask must be bool"),
    "mask shape": (replace(4, lambda a: a[4][:, :2]), r"key_mask must have shape \[B, S\] = \[5, 4\]"),
    "mask rank": (replace(4, lambda a: a[4][..., None]), "key_mask must have shape"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_bad_input_raises_value_error_naming_the_argument(impl, case):
    args, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        IMPLEMENTATIONS[impl](*args)


def on_cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a for a in args]


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_bad_input_on_cuda_raises_the_same_value_error(impl, case):
    args, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message.replace("q is on cpu", "q is on cuda:0")):
        IMPLEMENTATIONS[impl](*on_cuda(args))


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_cuda_kernel_names_the_tensor_on_another_device():
    q, k, v, cu, mask = on_cuda(good())
    with pytest.raises(ValueError, match="k is on cpu but q is on cuda:0"):
        torch.ops.bridge_ops.bridge_attention(q, k.cpu(), v, cu, mask, None)
    with pytest.raises(ValueError, match="key_mask is on cpu but q is on cuda:0"):
        torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask.cpu(), None)
    with pytest.raises(ValueError, match="cu_group_lens is on cpu but q is on cuda:0"):
        torch.ops.bridge_ops.bridge_attention(q, k, v, cu.cpu(), mask, None)


def test_public_wrapper_raises_the_same_errors():
    args, message = BAD_INPUTS["cu end short"]
    with pytest.raises(ValueError, match=message):
        bridge_ops.bridge_attention(*args)


def test_backward_op_checks_its_extra_arguments():
    q, k, v, cu, mask = good()
    _, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    grad_out = torch.randn_like(q)
    backward = torch.ops.bridge_ops.bridge_attention_backward
    with pytest.raises(ValueError, match="grad_out must have the same shape as q"):
        backward(grad_out[:, :2], None, q, k, v, lse, cu, mask, None)
    with pytest.raises(ValueError, match="lse must have shape"):
        backward(grad_out, None, q, k, v, lse[:, :2], cu, mask, None)
    with pytest.raises(ValueError, match="grad_lse must have the shape of lse"):
        backward(grad_out, lse[:, :1], q, k, v, lse, cu, mask, None)
    with pytest.raises(ValueError, match="cu_group_lens must end at the batch size"):
        backward(grad_out, None, q, k, v, lse, torch.tensor([0, 4], dtype=torch.int32), mask, None)


def test_fake_kernel_checks_shapes_under_tracing():
    q, k, v, cu, mask = good()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv, fcu, fmask = (mode.from_tensor(t) for t in (q, k, v, cu, mask))
        out, lse = torch.ops.bridge_ops.bridge_attention(fq, fk, fv, fcu, fmask, None)
        assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
        with pytest.raises(ValueError, match="k must have the same shape as q"):
            torch.ops.bridge_ops.bridge_attention(fq, fk[:, :2], fv, fcu, fmask, None)


def test_non_finite_inputs_propagate_instead_of_crashing():
    q, k, v, cu, mask = good()
    q[0, 0, 0, 0] = float("nan")
    out = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
    assert torch.isnan(out[0, 0, 0]).all()  # the row with the NaN query
    assert torch.isfinite(out[3:]).all()  # another group is untouched


@pytest.mark.guarantee
@compiled
@pytest.mark.parametrize("name", ["lse", "grad_lse"])
def test_attention_backward_with_an_argument_on_meta_is_an_error(name):
    q, k, v, cu, mask = make_inputs([3, 2], 4, 2, 8)
    _, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    args = dict(
        grad_out=torch.randn_like(q),
        grad_lse=torch.randn_like(lse),
        q=q,
        k=k,
        v=v,
        lse=lse,
        cu_group_lens=cu,
        key_mask=mask,
        scale=None,
    )
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but q is on cpu"):
        torch.ops.bridge_ops.bridge_attention_backward(*args.values())


@pytest.mark.guarantee
@pytest.mark.parametrize(
    "bad", [np.zeros((5, 4, 2, 8), dtype=np.float32), [[0.0]], None], ids=["numpy", "list", "None"]
)
def test_ops_refuse_non_tensors_naming_the_argument(bad):
    q, k, v, cu, mask = make_inputs([3, 2], 4, 2, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got"):
        bridge_ops.bridge_attention(bad, k, v, cu, mask)
    with pytest.raises(TypeError, match="key_mask must be a torch.Tensor or None"):
        bridge_ops.bridge_attention(q, k, v, cu, np.ones((5, 4), dtype=bool))
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        bridge_ops.bridge_block_decode(**dict(tiny_decode_args(), hidden=bad))
    with pytest.raises(TypeError, match="lse_b must be a torch.Tensor"):
        bridge_ops.merge_attention_states(torch.randn(2, 4), torch.randn(2), torch.randn(2, 4), bad)
    args = cascade_inputs([2], 2, 1, 8, 4, 1)
    args[3] = bad
    with pytest.raises(TypeError, match="prefix_lens must be a torch.Tensor"):
        bridge_ops.cascade_attention(*args)
