"""The cascade decode op cascade_attention and merge_attention_states: kernel vs reference vs stock attention
over the expanded keys [prefix; suffix], GQA, ragged prompts and padding, strided HF layouts, errors, opcheck."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, DTYPES, HAS_GPU, assert_flash_rule, max_err

import bridge_ops
from bridge_ops import reference

NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "cascade_attention"), reason="no compiled _C")


def cascade_inputs(
    sizes,
    q_heads,
    kv_heads,
    head_dim,
    prefix_len,
    suffix_len,
    dtype=torch.float32,
    *,
    prefix_lens=None,
    suffix_lens=None,
    seed=0,
    device="cpu",
):
    """Arguments of cascade_attention in call order (q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
    cu_group_lens, suffix_lens)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)  # noqa: E731
    batch, groups = sum(sizes), len(sizes)
    q = randn(batch, q_heads, head_dim)
    prefix_k, prefix_v = randn(groups, kv_heads, prefix_len, head_dim), randn(groups, kv_heads, prefix_len, head_dim)
    suffix_k, suffix_v = randn(batch, kv_heads, suffix_len, head_dim), randn(batch, kv_heads, suffix_len, head_dim)
    if prefix_lens is None:
        prefix_lens = torch.randint(1, prefix_len + 1, (groups,), generator=gen)
    prefix_lens = torch.as_tensor(prefix_lens, dtype=torch.int32, device=device)
    if suffix_lens is not None:
        suffix_lens = torch.as_tensor(suffix_lens, dtype=torch.int32, device=device)
    cu = bridge_ops.cu_group_lens_from_sizes(sizes).to(device)
    return [q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu, suffix_lens]


def run_reference(args, dtype=torch.float64, upcast=True):
    q, pk, pv, pl, sk, sv, cu, sl = args
    cast = [t.to(dtype) for t in (q, pk, pv, sk, sv)]
    return reference.cascade_attention(cast[0], cast[1], cast[2], pl, cast[3], cast[4], cu, sl, upcast=upcast)


def sdpa_over_expanded(args):
    """Stock attention over each row's explicit [prefix; suffix] keys (float64): an oracle independent of ours."""
    q, pk, pv, pl, sk, sv, cu, sl = (t.double() if t is not None and t.is_floating_point() else t for t in args)
    batch, q_heads, _ = q.shape
    outs = []
    for b in range(batch):
        g = int(torch.searchsorted(cu, torch.tensor(b, dtype=cu.dtype), right=True)) - 1
        start, t = pk.shape[2] - int(pl[g]), sk.shape[2] if sl is None else int(sl[b])
        keys = torch.cat([pk[g, :, start:], sk[b, :, :t]], dim=1)  # [Hkv, L, Dh]
        values = torch.cat([pv[g, :, start:], sv[b, :, :t]], dim=1)
        outs.append(F.scaled_dot_product_attention(q[b, :, None], keys, values, enable_gqa=True)[:, 0])
    return torch.stack(outs)


# (group sizes, Hq, Hkv, Dh, P, T, prefix_lens, suffix_lens): MHA/GQA 2x/4x, ragged groups, left padding, P over
# several 64-key blocks with a partial one, T = 0, ragged and empty suffixes, an empty prompt, odd head dims, one
# group and head (the CPU kernel splits its prefix into ranges, one of them past the prompt, and merges them).
CASES = {
    "one-group-split": ([4], 4, 1, 32, 300, 2, [230], None),
    "gqa4-ragged": ([3, 1, 4], 8, 2, 16, 150, 5, [150, 7, 64], None),
    "mha-pads": ([2, 2], 2, 2, 33, 20, 3, [20, 1], [3, 0, 1, 2]),
    "gqa2-no-suffix": ([5], 4, 2, 64, 65, 0, [65], None),
    "empty-prompt": ([1, 3], 6, 3, 7, 4, 2, [0, 4], [2, 1, 2, 0]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_and_stock_attention(case, dtype):
    sizes, q_heads, kv_heads, head_dim, p, t, prefix_lens, suffix_lens = CASES[case]
    args = cascade_inputs(
        sizes, q_heads, kv_heads, head_dim, p, t, dtype, prefix_lens=prefix_lens, suffix_lens=suffix_lens
    )
    out, lse = bridge_ops.cascade_attention(*args, return_lse=True)
    oracle, oracle_lse = run_reference(args)
    assert out.shape == args[0].shape and out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert max_err(oracle, sdpa_over_expanded(args)) < 1e-12  # the reference: stock attention over [prefix; suffix]
    low, low_lse = run_reference(args, dtype, upcast=False)
    assert_flash_rule("out", out, low, oracle, dtype)
    assert_flash_rule("lse", lse, low_lse, oracle_lse, dtype, magnitude=float(oracle_lse.abs().max()))


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_kernel_matches_reference(case, dtype):
    sizes, q_heads, kv_heads, head_dim, p, t, prefix_lens, suffix_lens = CASES[case]
    args = cascade_inputs(
        sizes, q_heads, kv_heads, head_dim, p, t, dtype, prefix_lens=prefix_lens, suffix_lens=suffix_lens, device="cuda"
    )
    assert bridge_ops.dispatch.backend_for("cuda", "cascade_attention").name in ("cuda", "reference")
    out, lse = bridge_ops.cascade_attention(*args, return_lse=True)
    assert out.is_cuda and lse.is_cuda
    cpu_args = [a.cpu() if a is not None else None for a in args]
    oracle, oracle_lse = run_reference(cpu_args)
    low, low_lse = run_reference(cpu_args, dtype, upcast=False)
    assert_flash_rule("out", out.cpu(), low, oracle, dtype)
    assert_flash_rule("lse", lse.cpu(), low_lse, oracle_lse, dtype, magnitude=float(oracle_lse.abs().max()))
    merged, _ = bridge_ops.merge_attention_states(out, lse, out, lse)
    assert max_err(merged, out) <= 4 * torch.finfo(dtype).eps * float(out.abs().max())


def test_no_visible_key_gives_zero_and_minus_inf():
    args = cascade_inputs([2, 1], 2, 1, 8, 3, 2, prefix_lens=[0, 3], suffix_lens=[0, 1, 2])
    out, lse = bridge_ops.cascade_attention(*args, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == float("-inf")).all())
    assert bool(torch.isfinite(lse[1:]).all())
    ref_out, ref_lse = run_reference(args)
    assert torch.equal(ref_out[0], torch.zeros_like(ref_out[0])) and max_err(out[1:], ref_out[1:]) < 1e-5


def test_strided_hf_layouts_are_read_in_place():
    """q a view of a wider tensor, the suffix a view into a larger capacity buffer (as GroupPrefixCache's), the prefix
    a slice of the group's keys: the kernel reads the strides as they are (NaN padding would show otherwise)."""
    args = cascade_inputs([2, 3], 4, 2, 16, 10, 6)
    padded = lambda t, dim: torch.cat([t, torch.full_like(t, float("nan"))], dim=dim)  # noqa: E731
    q = padded(args[0], 1)[:, :4]
    suffix_k, suffix_v = (padded(t, 2)[:, :, :6] for t in args[4:6])
    assert not q.is_contiguous() and not suffix_k.is_contiguous()
    strided = [q, args[1], args[2], args[3], suffix_k, suffix_v, args[6], None]
    assert torch.equal(bridge_ops.cascade_attention(*strided), bridge_ops.cascade_attention(*args))


def test_prefix_suffix_attention_is_a_deprecated_alias():
    """The op's old name, bridge_ops.prefix_suffix_attention (also bridge_ops.ops.), warns and returns exactly what
    cascade_attention returns; the torch op has the new name only (its schema was renamed, not registered twice)."""
    args = cascade_inputs([2, 1], 4, 2, 8, 5, 3, prefix_lens=[5, 2], suffix_lens=[3, 1, 2])
    want_out, want_lse = bridge_ops.cascade_attention(*args, return_lse=True)
    for alias in (bridge_ops.prefix_suffix_attention, bridge_ops.ops.prefix_suffix_attention):
        with pytest.warns(DeprecationWarning, match="renamed to cascade_attention"):
            out, lse = alias(*args, return_lse=True)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        with pytest.warns(DeprecationWarning, match="renamed to cascade_attention"):
            assert torch.equal(alias(*args[:7], suffix_lens=args[7], scale=None), want_out)
    assert "prefix_suffix_attention" not in bridge_ops.__all__
    assert not hasattr(torch.ops.bridge_ops, "prefix_suffix_attention")


def test_baseline_cpu_build_agrees_with_the_reference():
    """The baseline (non-AVX2) build of the kernel, forced through BRIDGE_OPS_CPU_ISA, in a subprocess."""
    script = textwrap.dedent(
        """
        import torch
        import bridge_ops
        from helpers import max_err
        from test_cascade_attention import cascade_inputs, run_reference

        assert bridge_ops._loader.build_info()["cpu_isa"] == "default"
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 0.02)):
            args = cascade_inputs([3, 2], 4, 2, 37, 70, 3, dtype, suffix_lens=[3, 1, 0, 2, 3])
            assert max_err(bridge_ops.cascade_attention(*args), run_reference(args)[0]) < tol, dtype
        """
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BRIDGE_OPS_CPU_ISA="default")
    result = subprocess.run([sys.executable, "-c", script], cwd=here, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# merge_attention_states
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_of_prefix_and_suffix_parts_is_the_whole(dtype):
    """Attention over the prefix alone (suffix_lens = 0) merged with attention over the suffix alone (prefix_lens = 0)
    equals attention over both: the cascade identity, through the standalone op."""
    args = cascade_inputs([2, 3], 4, 2, 16, 40, 7, dtype)
    batch, groups = args[0].shape[0], args[3].numel()
    prefix_only = args[:7] + [torch.zeros(batch, dtype=torch.int32)]
    suffix_only = args[:3] + [torch.zeros(groups, dtype=torch.int32)] + args[4:]
    o_a, lse_a = bridge_ops.cascade_attention(*prefix_only, return_lse=True)
    o_b, lse_b = bridge_ops.cascade_attention(*suffix_only, return_lse=True)
    merged, merged_lse = bridge_ops.merge_attention_states(o_a, lse_a, o_b, lse_b)
    whole, whole_lse = bridge_ops.cascade_attention(*args, return_lse=True)
    ref, ref_lse = reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    tolerance = {torch.float64: 1e-13, torch.float32: 1e-6}.get(dtype, 2 * torch.finfo(dtype).eps)
    assert max_err(merged, ref) <= tolerance and max_err(merged_lse, ref_lse) < 1e-6
    assert max_err(merged, whole) <= 4 * tolerance and max_err(merged_lse, whole_lse) < 1e-5


def test_merge_with_empty_sides():
    o = torch.randn(3, 2, 8)
    lse = torch.randn(3, 2)
    empty = torch.full_like(lse, float("-inf"))
    for merge in (bridge_ops.merge_attention_states, reference.merge_attention_states):
        out, out_lse = merge(o, lse, torch.full_like(o, float("nan")), empty)  # an empty side's o is ignored
        assert max_err(out, o) < 1e-6 and max_err(out_lse, lse) < 1e-6
        out, out_lse = merge(o, empty, o, empty)
        assert torch.equal(out, torch.zeros_like(o)) and bool((out_lse == float("-inf")).all())


# ---------------------------------------------------------------------------------------------------------------
# Op registration, errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = cascade_inputs([2, 1], 4, 2, 8, 9, 3, device=device, suffix_lens=[3, 1, 2])
    call = args + [None]  # scale
    torch.library.opcheck(torch.ops.bridge_ops.cascade_attention.default, tuple(call))
    o, lse = torch.ops.bridge_ops.cascade_attention(*call)
    torch.library.opcheck(torch.ops.bridge_ops.merge_attention_states.default, (o, lse, o * 2, lse - 1))


def test_no_backward():
    args = cascade_inputs([2], 2, 1, 8, 4, 1)
    args[0].requires_grad_()
    with pytest.raises(RuntimeError, match="has no backward"):
        bridge_ops.cascade_attention(*args)
    o, lse = torch.randn(2, 4, requires_grad=True), torch.randn(2)
    with pytest.raises(RuntimeError, match="has no backward"):
        bridge_ops.merge_attention_states(o, lse, o, lse)
    with torch.no_grad():
        bridge_ops.cascade_attention(*args)


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


BAD_ARGS = [
    (lambda a: _replace(a, 0, a[0][:, None]), "q must have shape \\[B, Hq, Dh\\]"),
    (lambda a: _replace(a, 0, a[0].int()), "q must be float16"),
    (lambda a: _replace(a, 0, a[0][:, :3]), "must be a multiple of the key/value heads"),
    (lambda a: _replace(a, 1, a[1][:1]), "prefix_k must have shape \\[G, Hkv, P, Dh\\]"),
    (lambda a: _replace(a, 2, a[2][:, :, :2]), "prefix_v must have the same shape as prefix_k"),
    (lambda a: _replace(a, 1, a[1].double()), "prefix_k must have the dtype of q"),
    (lambda a: _replace(a, 3, a[3].long()), "prefix_lens must be int32"),
    (lambda a: _replace(a, 3, a[3][:1]), "prefix_lens must have shape \\[G\\]"),
    (lambda a: _replace(a, 3, torch.tensor([5, 1], dtype=torch.int32)), "prefix_lens must lie in \\[0, 4\\]"),
    (lambda a: _replace(a, 4, a[4][:2]), "suffix_k must have shape \\[B, Hkv, T, Dh\\]"),
    (lambda a: _replace(a, 5, a[5][..., :1, :]), "suffix_v must have the same shape as suffix_k"),
    (lambda a: _replace(a, 6, a[6].long()), "cu_group_lens must be int32"),
    (lambda a: _replace(a, 6, torch.tensor([0, 3, 3], dtype=torch.int32)), "strictly increasing"),
    (lambda a: _replace(a, 7, torch.tensor([0, 0, 9], dtype=torch.int32)), "suffix_lens must lie in \\[0, 2\\]"),
    (lambda a: _replace(a, 7, torch.zeros(2, dtype=torch.int32)), "suffix_lens must have shape \\[B\\]"),
]


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("make_bad, message", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_bad_arguments_are_named(make_bad, message, path):
    args = make_bad(cascade_inputs([2, 1], 4, 2, 8, 4, 2, prefix_lens=[4, 2]))
    if path == "kernel":
        call = lambda: bridge_ops.cascade_attention(*args)  # noqa: E731
    else:
        call = lambda: reference.cascade_attention(*args)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("merge", [bridge_ops.merge_attention_states, reference.merge_attention_states])
def test_merge_bad_arguments_are_named(merge):
    o, lse = torch.randn(3, 8), torch.randn(3)
    with pytest.raises(ValueError, match="o_b must have the same shape as o_a"):
        merge(o, lse, o[:2], lse)
    with pytest.raises(ValueError, match="lse_b must have shape \\[3\\]"):
        merge(o, lse, o, lse[:2])
    with pytest.raises(ValueError, match="lse_a must be"):
        merge(o, lse.double(), o, lse)


@pytest.mark.guarantee
def test_cascade_attention_never_reads_padding():
    args = cascade_inputs([2, 1], 2, 1, 8, 12, 3, prefix_lens=[5, 12], suffix_lens=[1, 3, 2])
    q, pk, pv, _, sk, sv, _, _ = args
    pk[0, :, :7], pv[0, :, :7] = NAN, INF  # left padding of group 0's prompt
    sk[0, :, 1:], sv[0, :, 1:], sv[2, :, 2] = NAN, NAN, NAN  # beyond suffix_lens
    out, lse = bridge_ops.cascade_attention(*args, return_lse=True)
    ref_out, ref_lse = reference.cascade_attention(*args)
    assert torch.isfinite(out).all() and torch.isfinite(ref_out).all()
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.guarantee
@pytest.mark.parametrize("merge", [bridge_ops.merge_attention_states, reference.merge_attention_states])
def test_merge_attention_states_takes_plus_inf_lse_as_an_empty_side(merge):
    o_a, o_b = torch.randn(4, 8), torch.randn(4, 8)
    lse_a = torch.tensor([INF, 0.5, INF, NAN])
    lse_b = torch.tensor([1.5, INF, INF, 0.0])
    o_a[0], o_b[1], o_a[2] = NAN, NAN, NAN  # an empty side is never read
    out, lse = merge(o_a, lse_a, o_b, lse_b)
    torch.testing.assert_close(out[0], o_b[0])
    torch.testing.assert_close(out[1], o_a[1])
    assert torch.equal(out[2], torch.zeros(8)) and lse[2] == -INF
    assert torch.isnan(out[3]).all() and torch.isnan(lse[3])
    torch.testing.assert_close(lse[:2], torch.tensor([1.5, 0.5]))
