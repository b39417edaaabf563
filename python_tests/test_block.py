"""BridgeBlock: zero at initialization, shapes, parameters, gradients."""

import pytest
import torch
from torch import nn

import bridge_ops
from bridge_ops import BridgeBlock, reference


def grouped_hidden(sizes=(4, 1, 3), seqlen=5, hidden=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    cu = bridge_ops.cu_group_lens_from_sizes(sizes)
    x = torch.randn(sum(sizes), seqlen, hidden, generator=gen).to(dtype)
    mask = torch.rand(sum(sizes), seqlen, generator=gen) < 0.7
    return x, cu, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_block_returns_exact_zero(dtype):
    x, cu, mask = grouped_hidden(dtype=dtype)
    block = BridgeBlock(64, d_bridge=32, dtype=dtype)
    delta = block(x, cu, mask)
    assert delta.dtype == dtype and delta.shape == x.shape
    assert torch.count_nonzero(delta) == 0


def test_defaults_and_small_widths():
    block = BridgeBlock(1024)
    assert (block.d_bridge, block.num_heads, block.head_dim) == (512, 4, 128)
    small = BridgeBlock(16, d_bridge=24)  # d_bridge < 128: one head of 24
    assert (small.num_heads, small.head_dim) == (1, 24)
    with pytest.raises(ValueError, match="must be >= 1 and divide d_bridge"):
        BridgeBlock(16, d_bridge=24, num_heads=5)
    with pytest.raises(ValueError, match="hidden must have shape"):
        small(torch.zeros(2, 3, 8), torch.tensor([0, 2], dtype=torch.int32))


def test_parameter_count():
    block = BridgeBlock(1024, d_bridge=512)
    assert block.num_parameters() == BridgeBlock.parameter_count(1024, 512) == 4 * 1024 * 512 + 1024
    assert "parameters=2098176" in repr(block)
    assert all(p.dim() == 1 for n, p in block.named_parameters() if "norm" in n)
    assert not any("bias" in n for n, _ in block.named_parameters())


def test_custom_norm_module_is_used():
    class ScaleNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.g * x

    block = BridgeBlock(8, d_bridge=8, norm=ScaleNorm())
    assert block.num_parameters() == BridgeBlock.parameter_count(8, 8, norm_parameters=1)
    x, cu, _ = grouped_hidden(hidden=8)
    nn.init.normal_(block.o_proj.weight)
    q = block.q_proj(2 * x).view(*x.shape[:2], 1, 8)
    k = block.k_proj(2 * x).view(*x.shape[:2], 1, 8)
    v = block.v_proj(2 * x).view(*x.shape[:2], 1, 8)
    want = block.o_proj(reference.bridge_attention(q, k, v, cu)[0].reshape(*x.shape[:2], 8))
    torch.testing.assert_close(block(x, cu), want, rtol=1e-5, atol=1e-5)


def test_forward_matches_a_plain_composition_and_gradients_cross_rows():
    x, cu, mask = grouped_hidden()
    block = BridgeBlock(64, d_bridge=64, num_heads=2)
    nn.init.normal_(block.o_proj.weight, std=0.02)
    x = x.requires_grad_()
    delta = block(x, cu, mask)
    n = block.norm(x)
    heads = (*x.shape[:2], 2, 32)
    mixed, _ = reference.bridge_attention(
        block.q_proj(n).view(heads), block.k_proj(n).view(heads), block.v_proj(n).view(heads), cu, mask
    )
    torch.testing.assert_close(delta, block.o_proj(mixed.reshape(*x.shape[:2], 64)), rtol=1e-5, atol=1e-6)
    # The loss of row 0 reaches the hidden states of its group peers (rows 1-3), not of other groups.
    (grad,) = torch.autograd.grad(delta[0].sum(), x)
    assert grad[1:4].abs().sum() > 0 and torch.count_nonzero(grad[4:]) == 0


def test_zero_output_projection_still_receives_gradient():
    x, cu, mask = grouped_hidden()
    block = BridgeBlock(64, d_bridge=32)
    (block(x, cu, mask) * x).sum().backward()  # a loss whose gradient in the delta is not zero
    assert block.o_proj.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(block.q_proj.weight.grad) == 0  # O = 0 blocks the path to Q/K/V at step 0


def test_compiles_fullgraph():
    torch._dynamo.reset()
    x, cu, mask = grouped_hidden()
    block = BridgeBlock(64, d_bridge=32)
    nn.init.normal_(block.o_proj.weight, std=0.02)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, cu, mask), block(x, cu, mask))
