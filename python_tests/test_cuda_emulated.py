"""The CUDA kernels without a GPU: csrc/cuda/kernels/bridge_attention.cuh compiled by g++ and run lane by lane by the
warp emulator (python_tests/emulator), driven by the ops' C++ host (csrc/host/bridge_attention_host.cpp, the one a
CUDA build binds as the ops' CUDA kernels) with the emulator as its launcher. This checks the host (checks, validation
of cu_group_lens, launch plan, params structs, alignment, workspace, casts), the kernels' indexing, staging, tiling,
online softmax and both backward passes, and every warp collective (a divergent one is an error), in CI.
What it cannot check: NVRTC/nvcc code generation (CI compiles both), real memory ordering and timing.
"""

import sys
import types

import pytest
import torch
from helpers import DTYPES, make_inputs, max_err
from test_attention_kernel import check_against_reference

from bridge_ops import reference

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
    # A launch plan that believes every group fits a tile (a stale validation) must not produce silent garbage: cu is
    # validated (largest group 6 <= 8 rows: no workspace), then changed through .data, which the version counter the
    # validation cache keys on does not see, to a group of 11 rows.
    q, k, v, cu, mask = make_inputs([6, 6], 1, 1, 16, torch.float32)
    out, lse = EMU.forward(q, k, v, cu, mask)
    cu.data[1] = 1
    grads = EMU.backward(torch.randn_like(q), None, q, k, v, lse, cu, mask)
    assert all(torch.isnan(g[1:]).all() and torch.isfinite(g[:1]).all() for g in grads)


def test_emulated_validation_is_cached_per_tensor_and_version():
    q, k, v, cu, mask = make_inputs([2, 3], 2, 1, 8, torch.float32)
    EMU.forward(q, k, v, cu, mask)
    cu[1] = 4  # in place: a new version, validated again
    EMU.forward(q, k, v, cu, mask)
    cu[1] = 7
    with pytest.raises(ValueError, match="strictly increasing"):
        EMU.forward(q, k, v, cu, mask)


def test_malformed_offsets_are_rejected_before_launch_and_clamped_inside_kernels():
    q, k, v, cu, mask = make_inputs([3, 2], 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="strictly increasing"):
        EMU.forward(q, k, v, torch.tensor([0, 4, 2, 5], dtype=torch.int32), mask)
    # Past validation (the host reads no offsets while a CUDA graph is captured): offsets out of [0, B] are clamped.
    emu = EMU.emulator()
    capturing = types.SimpleNamespace(
        name="emulator", device_type="cpu", num_sms=emu.num_sms, capturing=lambda device: True, launch=emu.launch
    )
    bad = torch.tensor([-5, 3, 99, 1], dtype=torch.int32)
    out, lse = EMU.kernels.bridge_attention(capturing, q, k, v, bad, mask, 0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()  # groups [0, 3), [3, 5), empty
    grads = EMU.kernels.bridge_attention_backward(capturing, torch.ones_like(q), None, q, k, v, lse, bad, mask, 0.5)
    assert all(torch.isfinite(g).all() for g in grads)  # the largest group unknown: the workspace path


def test_launch_plan_of_C_matches_the_header_the_kernels_are_built_from():
    emu, kernels = EMU.emulator(), EMU.kernels
    for is_double in (False, True):
        for dim in (1, 16, 32, 33, 64, 65, 128, 129, 256, 257):
            for tasks in (1, 256, 1024, 131072):
                for backward in (False, True):
                    for max_group in (-1, 1, 8, 9, 300):
                        want = emu.plan(is_double, dim, tasks, 132, backward, max_group)
                        assert kernels.plan_launch(is_double, dim, tasks, 132, backward, max_group) == want
    c = emu.constants()
    assert [c[0], c[3]] == [kernels.constants()["key_tile"], kernels.constants()["max_td"]]
    for i, td in enumerate(kernels.constants()["td_values"]):
        assert c[4 + i] == kernels.forward_smem_bytes_per_warp(td)
        assert c[8 + i] == kernels.backward_smem_bytes_per_warp(td)


def host_calls(run):
    """Runs `run()` under a profiler; returns the C functions it called and, for each call of a launcher method
    (EmulatorLauncher.num_sms / capturing / launch), the name of the Python function right above it."""
    c_functions, launcher_callers = [], []

    def profile(frame, event, arg):
        if event == "c_call":
            c_functions.append(arg)
        elif event == "call" and isinstance(frame.f_locals.get("self"), EMU.EmulatorLauncher):
            launcher_callers.append((frame.f_code.co_name, frame.f_back.f_code.co_name))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return c_functions, launcher_callers


def test_the_emulator_tests_run_the_cpp_host_a_cuda_build_ships():
    """EMU.forward / EMU.backward (what every test here calls) call the C++ host, _C.kernels.bridge_attention(_backward)
    (csrc/host/bridge_attention_host.cpp, which csrc/cuda/cuda_launcher.cu binds as the ops' CUDA kernels), and no
    Python runs between that host and the launcher: each launcher method is called straight from the C++ host, whose
    Python caller is the thin wrapper. A host re-written in Python would stand between them and fail this."""
    q, k, v, cu, mask = make_inputs([3, 9], 2, 2, 16, torch.float32)
    out, lse = EMU.forward(q, k, v, cu, mask)
    runs = {
        "forward": (EMU.kernels.bridge_attention, lambda: EMU.forward(q, k, v, cu, mask)),
        "backward": (
            EMU.kernels.bridge_attention_backward,
            lambda: EMU.backward(torch.ones_like(q), None, q, k, v, lse, cu, mask),
        ),
    }
    for wrapper, (host, run) in runs.items():
        c_functions, launcher_callers = host_calls(run)
        assert any(f is host for f in c_functions)
        assert {method for method, _ in launcher_callers} == {"num_sms", "capturing", "launch"}
        assert {caller for _, caller in launcher_callers} == {wrapper}


def test_emulated_host_checks_the_device_of_its_launcher():
    q, k, v, cu, mask = make_inputs([2, 1], 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="the emulator kernels take cpu tensors, got q on meta"):
        EMU.forward(*(t.to("meta") for t in (q, k, v, cu, mask)))


def test_emulated_empty_sequence():
    q, k, v, cu, mask = make_inputs([2, 1], 0, 2, 8, torch.float32)
    out, lse = EMU.forward(q, k, v, cu, mask)
    assert out.shape == q.shape and lse.shape == (3, 0, 2)
    assert all(g.shape == q.shape for g in EMU.backward(torch.zeros_like(q), None, q, k, v, lse, cu, mask))
