"""The fused bridge_attention kernels (torch.ops.bridge_ops.*) against the PyTorch reference.

Every test runs on the CPU kernels and, where a GPU is visible, on the CUDA kernels (whichever GPU backend serves:
_C's compiled kernels, or the cupy backend); CUDA cases are skipped cleanly without a GPU. The same kernels run on
the CPU through the warp emulator in test_cuda_emulated.py.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    HAS_GPU,
    assert_flash_rule,
    make_inputs,
    max_err,
    reference_with_grads,
    term_magnitudes,
)

import bridge_ops
from bridge_ops import reference

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "bridge_attention"), reason="no compiled _C")

LAYOUTS = {
    "16x4": [4] * 16,  # uniform, the decode layout of width 4
    "ragged": [1, 33, 4, 7, 2, 1, 16],  # B = 64: sizes 1 and 33, one all-finished group (index 2)
    "width1": [1],
    "odd": [3, 5, 2],
}
FINISHED = {"ragged": (2,)}


def op_attention(q, k, v, cu, key_mask, scale=None):
    return torch.ops.bridge_ops.bridge_attention(q, k, v, cu, key_mask, scale)


def fused_with_grads(q, k, v, cu, key_mask, grad_out, grad_lse, attention=op_attention):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, cu, key_mask, None)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def check_against_reference(q, k, v, cu, key_mask, dtype, attention=op_attention):
    """out, lse, dq, dk, dv of `attention` against the float64 reference, by the flash-attn error rule."""
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device)
    grad_lse = torch.randn(q.shape[:3], generator=gen, dtype=torch.float64).to(q.device)
    out, lse, grads = fused_with_grads(q, k, v, cu, key_mask, grad_out, grad_lse, attention)
    out64, lse64, grads64 = reference_with_grads(q, k, v, cu, key_mask, grad_out, grad_lse, dtype=torch.float64)
    out_low, lse_low, grads_low = reference_with_grads(q, k, v, cu, key_mask, grad_out, grad_lse, upcast=False)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == q.shape[:3]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    magnitudes = term_magnitudes(q, k, v, grad_out, grad_lse)
    assert_flash_rule("out", out, out_low, out64, dtype, magnitudes["out"])
    assert_flash_rule("lse", lse, lse_low, lse64, dtype, magnitudes["lse"])
    for name, got, low, oracle in zip(("dq", "dk", "dv"), grads, grads_low, grads64):
        assert got.dtype == dtype
        assert_flash_rule(name, got, low, oracle, dtype, magnitudes[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("seqlen", [1, 7, 128])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_grid(device, layout, seqlen, heads, head_dim, dtype):
    sizes = LAYOUTS[layout]
    q, k, v, cu, key_mask = make_inputs(
        sizes, seqlen, heads, head_dim, dtype, finished_groups=FINISHED.get(layout, ()), device=device
    )
    check_against_reference(q, k, v, cu, key_mask, dtype)


# GPU-only extras: the tile boundaries of the CUDA kernels (8 rows per shared-memory tile), head dims of every
# register layout (32, 64, 128, 256) and of the simple path (> 256), odd dims without vector loads.
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [1, 31, 32, 33, 96, 256, 257, 300])
@pytest.mark.parametrize("sizes", [[8, 9, 1], [16, 17], [40]], ids=str)
def test_cuda_tile_and_head_dim_boundaries(sizes, head_dim, dtype):
    q, k, v, cu, key_mask = make_inputs(sizes, 3, 2, head_dim, dtype, device="cuda")
    check_against_reference(q, k, v, cu, key_mask, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_without_key_mask(device, dtype):
    q, k, v, cu, _ = make_inputs([4, 1, 6], 5, 2, 32, dtype, device=device)
    check_against_reference(q, k, v, cu, None, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_default_and_custom_scale(device):
    q, k, v, cu, mask = make_inputs([3, 4], 3, 2, 24, torch.float64, device=device)
    for scale in (None, 0.37, 2.0):
        out, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, scale)
        ref_out, ref_lse = reference.bridge_attention(q, k, v, cu, mask, scale)
        assert max_err(out, ref_out) < 1e-12 and max_err(lse, ref_lse) < 1e-12
    default = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
    explicit = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, 24**-0.5)[0]
    assert torch.equal(default, explicit)


def test_public_wrapper_uses_the_compiled_kernel_on_cpu():
    assert bridge_ops.dispatch.backend_for("cpu").name == "cpu"
    q, k, v, cu, mask = make_inputs([2, 3], 2, 1, 8)
    out, lse = bridge_ops.bridge_attention(q, k, v, cu, mask, return_lse=True)
    op_out, op_lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    assert torch.equal(out, op_out) and torch.equal(lse, op_lse)
    assert torch.equal(bridge_ops.bridge_attention(q, k, v, cu, mask), op_out)


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_alone_or_with_all_peers_finished_gets_its_own_value_exactly(device):
    for dtype in DTYPES:
        q, k, v, cu, mask = make_inputs([1, 5, 3], 4, 2, 16, dtype, finished_groups=(1,), device=device)
        out = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
        assert torch.equal(out[0], v[0])  # width-1 group
        assert torch.equal(out[1:6], v[1:6])  # every key of group 1 masked: each row sees only itself
        assert not torch.equal(out[6:], v[6:])  # group 2 still mixes


@pytest.mark.parametrize("device", DEVICES)
def test_masked_keys_do_not_reach_other_rows(device):
    q, k, v, cu, mask = make_inputs([6], 3, 2, 16, torch.float32, visible_fraction=0.5, device=device)
    base = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
    hidden_rows, hidden_pos = torch.nonzero(~mask, as_tuple=True)
    k2, v2 = k.clone(), v.clone()
    k2[hidden_rows, hidden_pos] += 100.0
    v2[hidden_rows, hidden_pos] -= 100.0
    out = torch.ops.bridge_ops.bridge_attention(q, k2, v2, cu, mask, None)[0]
    # Every row whose own key is visible at s is untouched by the change of hidden keys.
    untouched = mask[:, :, None, None].expand_as(out)
    assert torch.equal(out[untouched], base[untouched])
    # A row whose own key is hidden still sees itself, so its own change shows.
    assert not torch.equal(out[~untouched], base[~untouched])


@pytest.mark.parametrize("device", DEVICES)
def test_groups_are_isolated_bit_for_bit(device):
    sizes = [4, 1, 33, 7]
    q, k, v, cu, mask = make_inputs(sizes, 6, 4, 32, torch.float32, device=device)
    base_out, base_lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    lo, hi = int(cu[2]), int(cu[3])  # change everything about group 2
    q2, k2, v2, mask2 = q.clone(), k.clone(), v.clone(), mask.clone()
    for t in (q2, k2, v2):
        t[lo:hi] = torch.randn_like(t[lo:hi])
    mask2[lo:hi] = ~mask2[lo:hi]
    out, lse = torch.ops.bridge_ops.bridge_attention(q2, k2, v2, cu, mask2, None)
    others = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    others[lo:hi] = False
    assert torch.equal(out[others], base_out[others]) and torch.equal(lse[others], base_lse[others])
    assert not torch.equal(out[lo:hi], base_out[lo:hi])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_stay_inside_the_group(device, dtype):
    q, k, v, cu, mask = make_inputs([3, 4, 2], 3, 2, 8, dtype, requires_grad=True, device=device)
    out = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
    out[3:7].sum().backward()  # loss on group 1 only
    for grad in (q.grad, k.grad, v.grad):
        assert torch.count_nonzero(grad[:3]) == 0 and torch.count_nonzero(grad[7:]) == 0
        assert torch.count_nonzero(grad[3:7]) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_permutation_equivariant_within_a_group(device):
    q, k, v, cu, mask = make_inputs([5, 6], 4, 2, 16, torch.float64, device=device)
    perm = torch.cat([torch.tensor([3, 0, 4, 1, 2]), 5 + torch.randperm(6, generator=torch.Generator().manual_seed(3))])
    perm = perm.to(device)
    out, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    out_p, lse_p = torch.ops.bridge_ops.bridge_attention(q[perm], k[perm], v[perm], cu, mask[perm], None)
    assert max_err(out_p, out[perm]) < 1e-12 and max_err(lse_p, lse[perm]) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_give_the_same_result(device):
    q, k, v, cu, mask = make_inputs([3, 2], 6, 4, 16, torch.float32, device=device)
    base = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    # [B, H, S, Dh] storage seen as [B, S, H, Dh]; a packed QKV projection split into views; a strided last dim.
    bhsd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    packed = torch.stack([q, k, v], dim=3)  # [B, S, H, 3, Dh]
    qkv_views = [packed[:, :, :, i] for i in range(3)]
    doubled = [torch.stack([t, t], dim=-1)[..., 0] for t in (q, k, v)]  # last-dim stride 2
    for variant in (bhsd, qkv_views, doubled):
        assert not variant[0].is_contiguous()
        got = torch.ops.bridge_ops.bridge_attention(*variant, cu, mask, None)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    strided_mask = torch.stack([mask, mask], dim=-1)[..., 1]
    assert torch.equal(torch.ops.bridge_ops.bridge_attention(q, k, v, cu, strided_mask, None)[0], base[0])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_without_lse_gradient_and_without_output_gradient(device):
    q, k, v, cu, mask = make_inputs([3, 2], 2, 2, 8, torch.float64, requires_grad=True, device=device)
    out, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    grads_out = torch.autograd.grad(out.square().sum(), (q, k, v), retain_graph=True)
    grads_lse = torch.autograd.grad(lse.sum(), (q, k, v))
    ref_out, ref_lse = reference.bridge_attention(q, k, v, cu, mask)
    ref_grads_out = torch.autograd.grad(ref_out.square().sum(), (q, k, v), retain_graph=True)
    ref_grads_lse = torch.autograd.grad(ref_lse.sum(), (q, k), allow_unused=True) + (torch.zeros_like(v),)
    for got, want in zip(grads_out + grads_lse, ref_grads_out + ref_grads_lse):
        assert max_err(got, want) < 1e-12
    assert torch.count_nonzero(grads_lse[2]) == 0  # lse does not depend on v


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    q, k, v, cu, mask = make_inputs([3, 1, 2], 3, 2, 5, torch.float64, requires_grad=True, device=device)
    for key_mask in (mask, None):

        def fn(q, k, v):
            return torch.ops.bridge_ops.bridge_attention(q, k, v, cu, key_mask, 0.8)  # noqa: B023 (this iteration)

        assert torch.autograd.gradcheck(fn, (q, k, v), check_undefined_grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_matches_reference_backward(device):
    q, k, v, cu, mask = make_inputs([4, 1, 3], 3, 2, 12, torch.float64, device=device)
    _, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    grad_out, grad_lse = torch.randn_like(q), torch.randn_like(lse)
    for g_lse in (grad_lse, None):
        got = torch.ops.bridge_ops.bridge_attention_backward(grad_out, g_lse, q, k, v, lse, cu, mask, None)
        want = reference.bridge_attention_backward(grad_out, g_lse, q, k, v, lse, cu, mask)
        for a, b in zip(got, want):
            assert max_err(a, b) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, cu, mask = make_inputs([3, 2], 3, 2, 8, dtype, requires_grad=True, device=device)
        torch.library.opcheck(torch.ops.bridge_ops.bridge_attention.default, (q, k, v, cu, mask, None))
        torch.library.opcheck(torch.ops.bridge_ops.bridge_attention.default, (q, k, v, cu, None, 0.5))
        _, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
        grad_out = torch.randn_like(q)
        args = (grad_out, torch.randn_like(lse), q.detach(), k.detach(), v.detach(), lse.detach(), cu, mask, None)
        torch.library.opcheck(torch.ops.bridge_ops.bridge_attention_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()

    def loss_fn(q, k, v, cu, mask):
        out, lse = bridge_ops.bridge_attention(q, k, v, cu, mask, return_lse=True)
        return (out.square().sum(dim=-1) + lse).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    q, k, v, cu, mask = make_inputs([4, 2, 1], 5, 2, 16, torch.float32, requires_grad=True, device=device)
    loss = compiled(q, k, v, cu, mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = loss_fn(q, k, v, cu, mask)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    assert max_err(loss, eager_loss) < 1e-3
    for got, want in zip(grads, eager_grads):
        assert max_err(got, want) < 1e-5


def test_both_cpu_builds_agree_with_the_reference():
    """The baseline (non-AVX2) build of the CPU kernels, forced through BRIDGE_OPS_CPU_ISA, is exercised too."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from helpers import make_inputs, max_err
        import bridge_ops
        from bridge_ops import reference

        assert bridge_ops._loader.build_info()["cpu_isa"] == "default"
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 0.05)):
            q, k, v, cu, mask = make_inputs([4, 1, 33, 2], 3, 2, 37, dtype, requires_grad=True)
            out, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
            ref_out, ref_lse = reference.bridge_attention(*(t.double() for t in (q, k, v)), cu, mask)
            grads = torch.autograd.grad(out.double().square().sum(), (q, k, v))
            ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
            errors = [max_err(out, ref_out), max_err(lse, ref_lse)]
            errors += [max_err(a, b) / 4 for a, b in zip(grads, ref_grads)]
            assert max(errors) < tol, (dtype, errors)
        """
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BRIDGE_OPS_CPU_ISA="default")
    result = subprocess.run([sys.executable, "-c", script], cwd=here, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_public_wrapper_uses_a_gpu_kernel_on_cuda():
    assert bridge_ops.dispatch.backend_for("cuda").name in ("cuda", "cupy")
    q, k, v, cu, mask = make_inputs([2, 3], 2, 1, 8, device="cuda")
    out = bridge_ops.bridge_attention(q, k, v, cu, mask)
    assert out.is_cuda and torch.equal(out, torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0])


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_cuda_matches_cpu_kernel():
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, cu, mask = make_inputs([4, 1, 9, 3], 5, 4, 64, dtype)
        cpu = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
        gpu = torch.ops.bridge_ops.bridge_attention(q.cuda(), k.cuda(), v.cuda(), cu.cuda(), mask.cuda(), None)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert max_err(gpu[0].cpu(), cpu[0]) < tol and max_err(gpu[1].cpu(), cpu[1]) < 1e-4


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_cuda_runs_on_the_current_stream_and_a_second_device_index():
    q, k, v, cu, mask = make_inputs([4, 4], 3, 2, 32, device="cuda")
    want = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(got, want)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_cuda_validates_offsets_once_and_again_after_an_in_place_change():
    q, k, v, cu, mask = make_inputs([4, 4], 2, 1, 8, device="cuda")
    torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    cu[1] = 9  # in place: bumps the version counter, so the next call reads and rejects it
    with pytest.raises(ValueError, match="strictly increasing"):
        torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_cuda_graph_capture_and_replay():
    q, k, v, cu, mask = make_inputs([4, 4, 2], 1, 4, 128, torch.bfloat16, device="cuda")
    want = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]  # validates cu before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence(device):
    q, k, v, cu, mask = make_inputs([2, 1], 0, 2, 8, torch.float32, requires_grad=True, device=device)
    out, lse = torch.ops.bridge_ops.bridge_attention(q, k, v, cu, mask, None)
    assert out.shape == q.shape and lse.shape == (3, 0, 2)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert all(g.shape == q.shape for g in grads)


@pytest.mark.guarantee
def test_double_backward_raises_instead_of_returning_zeros():
    q, k, v, cu, mask = make_inputs([3, 2], 3, 2, 8, torch.float64, requires_grad=True)

    def loss(impl):
        out, lse = impl(q, k, v, cu, mask)
        return out.square().sum() + lse.sum()

    grads = torch.autograd.grad(loss(torch.ops.bridge_ops.bridge_attention), (q, k, v), create_graph=True)
    expected = torch.autograd.grad(loss(reference.bridge_attention), (q, k, v))
    for got, want in zip(grads, expected):  # first order is right, even with create_graph=True
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="bridge_attention has no double backward"):
        torch.autograd.grad(grads[0].sum(), q)
