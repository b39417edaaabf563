"""The fused decode op bridge_block_decode against its reference twin and against BridgeBlock itself."""

import pytest
import torch
from helpers import DTYPES, max_err, tiny_decode_args
from torch import nn

import bridge_ops
from bridge_ops import reference

NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "bridge_block_decode"), reason="no compiled _C")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def decode_args(sizes, seqlen, dim, d_bridge, heads, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    batch = sum(sizes)
    hidden = randn(batch, seqlen, dim)
    norm_weight = 1 + randn(dim, std=0.1)
    q_w, k_w, v_w = (randn(d_bridge, dim, std=dim**-0.5) for _ in range(3))
    o_w = randn(dim, d_bridge, std=d_bridge**-0.5)
    cu = bridge_ops.cu_group_lens_from_sizes(sizes)
    key_mask = torch.rand(batch, seqlen, generator=gen) < 0.7
    return [hidden, norm_weight, 1e-6, q_w, k_w, v_w, o_w, cu, key_mask, heads, None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", [[4] * 4, [1, 5, 2], [1]], ids=str)
@pytest.mark.parametrize("seqlen", [1, 3])
def test_matches_reference(sizes, seqlen, dtype):
    args = decode_args(sizes, seqlen, 48, 32, 2, dtype)
    got = torch.ops.bridge_ops.bridge_block_decode(*args)
    want = reference.bridge_block_decode(*args[:-1])
    oracle = reference.bridge_block_decode(
        *[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args[:-1]]
    )
    assert got.dtype == dtype and got.shape == args[0].shape
    assert max_err(got, want) < TOLERANCE[dtype]
    assert max_err(got, oracle) <= max(2 * max_err(want, oracle), TOLERANCE[dtype])


def test_equals_block_residual_path():
    block = bridge_ops.BridgeBlock(48, d_bridge=32, num_heads=2)
    nn.init.normal_(block.o_proj.weight, std=0.1)
    hidden = torch.randn(6, 1, 48)
    cu = bridge_ops.cu_group_lens_from_width(6, 3)
    mask = torch.tensor([[True], [False], [True], [True], [True], [False]])
    with torch.no_grad():
        fused = block.residual(hidden, cu, mask)
    unfused = hidden + block(hidden, cu, mask)
    assert max_err(fused, unfused) < 1e-6


def test_zero_output_projection_returns_hidden_exactly():
    args = decode_args([3, 2], 1, 16, 8, 1, torch.bfloat16)
    args[6] = torch.zeros_like(args[6])
    assert torch.equal(torch.ops.bridge_ops.bridge_block_decode(*args), args[0])


def test_opcheck_and_no_backward():
    args = decode_args([2, 3], 1, 16, 8, 2, torch.float32)
    torch.library.opcheck(torch.ops.bridge_ops.bridge_block_decode.default, tuple(args))
    args[0].requires_grad_()
    with pytest.raises(RuntimeError, match="has no backward"):
        torch.ops.bridge_ops.bridge_block_decode(*args)
    with torch.no_grad():
        torch.ops.bridge_ops.bridge_block_decode(*args)


@pytest.mark.parametrize(
    "index, value, message",
    [
        (0, lambda a: a[0][0], "hidden must have shape"),
        (1, lambda a: a[1][:-1], "norm_weight must have shape"),
        (3, lambda a: a[3][:, :-1], "q_weight must have shape"),
        (5, lambda a: a[5].double(), "v_weight must have the dtype of hidden"),
        (6, lambda a: a[6].T, "o_weight must have shape"),
        (9, lambda a: 3, "num_heads \\(3\\) must be >= 1 and divide d_bridge \\(8\\)"),
        (8, lambda a: a[8][:, :0], "key_mask must have shape"),
        (7, lambda a: torch.tensor([0, 4], dtype=torch.int32), "must end at the batch size"),
    ],
)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_inputs(impl, index, value, message):
    args = decode_args([2, 3], 1, 16, 8, 2, torch.float32)
    args[index] = value(args)
    fn = torch.ops.bridge_ops.bridge_block_decode if impl == "kernel" else reference.bridge_block_decode
    with pytest.raises(ValueError, match=message):
        fn(*(args if impl == "kernel" else args[:-1]))


@pytest.mark.guarantee
@pytest.mark.parametrize("name", ["norm_weight", "cu_group_lens", "key_mask", "k_weight"])
def test_block_decode_with_an_argument_on_meta_is_an_error(name):
    args = tiny_decode_args()
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but hidden is on cpu"):
        bridge_ops.bridge_block_decode(**args)


@pytest.mark.guarantee
@pytest.mark.parametrize("impl", [bridge_ops.bridge_block_decode, reference.bridge_block_decode])
def test_block_decode_refuses_a_bad_eps_and_a_norm_weight_of_another_dtype(impl):
    for eps in (0.0, -1e-6, NAN, INF):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            impl(**dict(tiny_decode_args(), eps=eps))
    args = tiny_decode_args()
    with pytest.raises(ValueError, match="norm_weight must have the dtype of hidden"):
        impl(**dict(args, norm_weight=args["norm_weight"].double()))
