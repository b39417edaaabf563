"""The CUDA kernels without a GPU: csrc/cuda/kernels/bridge_attention.cuh compiled by g++ and run lane by lane by the
warp emulator (python_tests/emulator), driven by the cupy backend's host code (bridge_ops/cupy_backend.py) with the
emulator as its launcher. This checks the kernels' indexing, staging, tiling, online softmax and both backward
passes, every warp collective (a divergent one is an error), the launch plan and the parameter structs (launch.h, read
through bridge_ops._C.kernels), in CI.
What it cannot check: NVRTC/nvcc code generation (CI compiles both), real memory ordering and timing.
"""

import pytest
import torch
from helpers import DTYPES, make_inputs, max_err
from test_attention_kernel import check_against_reference

from bridge_ops import cupy_backend, reference

emulator_launcher = pytest.importorskip("emulator_launcher")
EMU = emulator_launcher


def emulated(q, k, v, cu, key_mask, scale=None):
    return EMU.attention(q, k, v, cu, key_mask, scale)


LAYOUTS = {
    "16x4": ([4] * 16, ()),
    "ragged": ([1, 33, 4, 7, 2, 1, 16], (2,)),  # sizes 1 and 33, an all-finished group
    "tiles": ([8, 9, 17, 1], (3,)),  # one tile exactly, one row over, two tiles and one over
}


# (layout, head_dim): every register layout (TD = 1, 2, 4, 8 for head_dim <= 32, 64, 128, 256) and the simple path
# (> 256), single-tile and multi-tile groups.
CASES = [("16x4", 128), ("ragged", 80), ("tiles", 16), ("tiles", 256), ("ragged", 64), ("16x4", 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout, head_dim", CASES, ids=str)
def test_emulated_kernels_match_reference(layout, head_dim, dtype):
    sizes, finished = LAYOUTS[layout]
    q, k, v, cu, mask = make_inputs(sizes, 2, 2, head_dim, dtype, finished_groups=finished)
    check_against_reference(q, k, v, cu, mask, dtype, attention=emulated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [1, 7, 33, 64])
def test_emulated_odd_head_dims_without_vector_loads(head_dim, dtype):
    q, k, v, cu, mask = make_inputs([3, 10, 1], 2, 3, head_dim, dtype)
    check_against_reference(q, k, v, cu, mask, dtype, attention=emulated)


def test_emulated_without_mask_and_with_custom_scale():
    q, k, v, cu, _ = make_inputs([4, 12, 1], 3, 2, 32, torch.float32)
    for scale in (None, 0.37):
        out, lse = EMU.forward(q, k, v, cu, None, scale)
        ref_out, ref_lse = reference.bridge_attention(q.double(), k.double(), v.double(), cu, None, scale)
        assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5


def test_emulated_strided_inputs_use_the_unaligned_path_and_agree():
    q, k, v, cu, mask = make_inputs([3, 9], 4, 2, 16, torch.float32)
    base = EMU.forward(q, k, v, cu, mask)
    bhsd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    packed = torch.stack([q, k, v], dim=3)
    qkv_views = [packed[:, :, :, i] for i in range(3)]
    offset = [torch.cat([torch.zeros(1), t.flatten()])[1:].view(t.shape) for t in (q, k, v)]  # misaligned pointers
    for variant in (bhsd, qkv_views, offset):
        got = EMU.forward(*variant, cu, mask)
        assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    strided_mask = torch.stack([mask, mask], dim=-1)[..., 1]
    assert torch.equal(EMU.forward(q, k, v, cu, strided_mask)[0], base[0])


def test_emulated_rows_alone_get_their_own_value_exactly():
    for dtype in DTYPES:
        q, k, v, cu, mask = make_inputs([1, 5, 11, 3], 3, 2, 16, dtype, finished_groups=(1, 2))
        out = EMU.forward(q, k, v, cu, mask)[0]
        assert torch.equal(out[:17], v[:17])
        assert not torch.equal(out[17:], v[17:])


def test_emulated_groups_are_isolated_bit_for_bit():
    q, k, v, cu, mask = make_inputs([4, 1, 33, 7], 2, 2, 32, torch.float32)
    base_out, base_lse = EMU.forward(q, k, v, cu, mask)
    grad_out = torch.randn_like(q)
    base_grads = EMU.backward(grad_out, None, q, k, v, base_lse, cu, mask)
    lo, hi = int(cu[2]), int(cu[3])
    q2, k2, v2, mask2 = q.clone(), k.clone(), v.clone(), mask.clone()
    for t in (q2, k2, v2):
        t[lo:hi] = torch.randn_like(t[lo:hi])
    mask2[lo:hi] = ~mask2[lo:hi]
    out, lse = EMU.forward(q2, k2, v2, cu, mask2)
    grads = EMU.backward(grad_out, None, q2, k2, v2, lse, cu, mask2)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[lo:hi] = False
    assert torch.equal(out[others], base_out[others]) and torch.equal(lse[others], base_lse[others])
    for a, b in zip(grads, base_grads):
        assert torch.equal(a[others], b[others])


def test_emulated_non_finite_inputs_propagate_within_their_row_only():
    q, k, v, cu, mask = make_inputs([3, 2, 10], 2, 2, 8, torch.float32, visible_fraction=1.0)
    q[0, 0, 0, 0] = float("nan")
    out = EMU.forward(q, k, v, cu, mask)[0]
    assert torch.isnan(out[0, 0, 0]).all()
    assert torch.isfinite(out[3:]).all()


def test_emulated_gradcheck_float64_simple_path():
    q, k, v, cu, mask = make_inputs([3, 1, 2], 2, 2, 5, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: emulated(q, k, v, cu, mask, 0.8), (q, k, v))


def test_emulated_backward_without_workspace_poisons_large_groups_instead_of_guessing():
    # A launch plan that believes every group fits a tile (a stale validation) must not produce silent garbage.
    q, k, v, cu, mask = make_inputs([12], 1, 1, 16, torch.float32)
    out, lse = EMU.forward(q, k, v, cu, mask)
    original = cupy_backend.plan_launch

    def no_workspace(*args):
        plan = original(*args)
        plan.workspace = False
        return plan

    cupy_backend.plan_launch = no_workspace
    try:
        grads = EMU.backward(torch.randn_like(q), None, q, k, v, lse, cu, mask)
    finally:
        cupy_backend.plan_launch = original
    assert all(torch.isnan(g).all() for g in grads)


def test_malformed_offsets_are_rejected_before_launch_and_clamped_inside_kernels():
    q, k, v, cu, mask = make_inputs([3, 2], 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="strictly increasing"):
        EMU.forward(q, k, v, torch.tensor([0, 4, 2, 5], dtype=torch.int32), mask)
    # Straight to the kernel, past validation (as during CUDA graph capture): offsets out of [0, B] are clamped.
    plan = cupy_backend.plan_launch(False, 8, 2 * 3 * 1, 132, False, -1)
    out = torch.full_like(q, 7.0)
    lse = torch.full(q.shape[:3], 7.0)
    bad = torch.tensor([-5, 3, 99, 1], dtype=torch.int32)
    params = cupy_backend.kernels().ForwardParams()
    params.problem = cupy_backend.problem(q, bad, mask, 0.5)  # B = 5, S = 2, H = 1, Dh = 8, G = 3
    params.problem.aligned = 1
    params.q, params.k, params.v, params.out = (cupy_backend.rows_arg(t) for t in (q, k, v, out))
    params.lse = lse.data_ptr()
    EMU.emulator().launch(cupy_backend.kernel_name("fwd", torch.float32, plan), plan, params)
    assert torch.isfinite(out).all()  # group 0 = rows [0, 3), group 1 = rows [3, 5), group 2 empty


def test_launch_plan_of_C_matches_the_header_the_kernels_are_built_from():
    emu = EMU.emulator()
    for is_double in (False, True):
        for dim in (1, 16, 32, 33, 64, 65, 128, 129, 256, 257):
            for tasks in (1, 256, 1024, 131072):
                for backward in (False, True):
                    for max_group in (-1, 1, 8, 9, 300):
                        want = emu.plan(is_double, dim, tasks, 132, backward, max_group)
                        assert cupy_backend.plan_launch(is_double, dim, tasks, 132, backward, max_group) == want
    c, kernels = emu.constants(), cupy_backend.kernels()
    assert [c[0], c[3]] == [kernels.constants()["key_tile"], kernels.constants()["max_td"]]
    for i, td in enumerate(kernels.constants()["td_values"]):
        assert c[4 + i] == kernels.forward_smem_bytes_per_warp(td)
        assert c[8 + i] == kernels.backward_smem_bytes_per_warp(td)


def test_every_kernel_name_the_backend_asks_for_exists():
    for dtype in DTYPES:
        for name in cupy_backend.all_kernel_names(dtype):
            plan = cupy_backend.kernels().LaunchPlan(True, 1, 32, 0, 0, False)  # zero blocks: the name check only
            EMU.emulator().launch(name, plan, None)


def test_emulated_empty_sequence():
    q, k, v, cu, mask = make_inputs([2, 1], 0, 2, 8, torch.float32)
    out, lse = EMU.forward(q, k, v, cu, mask)
    assert out.shape == q.shape and lse.shape == (3, 0, 2)
    assert all(g.shape == q.shape for g in EMU.backward(torch.zeros_like(q), None, q, k, v, lse, cu, mask))
