"""Non-finite scores and values in the cascade ops and the references (issue 20, items 5-7).

One policy (ops.py's docstrings of cascade_attention and merge_attention_states) in the reference, the CPU
kernel and the CUDA kernel (run on the CPU by the warp emulator, and on a GPU where there is one): a score of -inf is an
absent key (weight 0, its value never read); a row with no present key gets out 0 and lse -inf (SDPA: 0); a NaN or
+inf score makes out and lse NaN (lse NaN rather than +inf, which a merge would read as an empty side). Each test here
failed on the code before the fix it covers; test_fuzz.py fuzzes the same rules.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_GPU, assert_same_nonfinite, make_inputs
from test_cascade_attention import cascade_inputs

import bridge_ops
from bridge_ops import reference

NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "cascade_attention"), reason="no compiled _C")

IMPLEMENTATIONS = [
    "reference",
    "cpu-kernel",
    "cuda-emulated",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")),
]


def cascade(impl, args, scale=None):
    """cascade_attention(*args, scale) -> (out, lse) on the CPU, by implementation `impl`."""
    if impl == "reference":
        return reference.cascade_attention(*args, scale)
    if impl == "cpu-kernel":
        return torch.ops.bridge_ops.cascade_attention(*args, scale)
    if impl == "cuda-emulated":
        pytest.importorskip("emulator_launcher")
        from test_cascade_cuda_emulated import emulated_cascade, emulator_launcher

        return emulated_cascade(emulator_launcher.emulator(), *args, scale=scale)
    on_gpu = [a.cuda() if a is not None else None for a in args]
    return tuple(t.cpu() for t in torch.ops.bridge_ops.cascade_attention(*on_gpu, scale))


def merge(impl, o_a, lse_a, o_b, lse_b):
    if impl == "reference":
        return reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    if impl == "cpu-kernel":
        return torch.ops.bridge_ops.merge_attention_states(o_a, lse_a, o_b, lse_b)
    if impl == "cuda-emulated":
        pytest.importorskip("emulator_launcher")
        from test_cascade_cuda_emulated import emulated_merge

        return emulated_merge(_emu(), o_a, lse_a, o_b, lse_b)
    on_gpu = [t.cuda() for t in (o_a, lse_a, o_b, lse_b)]
    return tuple(t.cpu() for t in torch.ops.bridge_ops.merge_attention_states(*on_gpu))


def _emu():
    import emulator_launcher

    return emulator_launcher.emulator()


def assert_same(got, want, rtol=2e-6, atol=2e-6):
    assert_same_nonfinite(got, want, rtol, atol)


def sdpa_rows(args, rows, absent_values_zeroed=True):
    """Stock attention (math backend, float32) of the given rows over their [prefix; suffix], as an oracle."""
    q, pk, pv, plens, sk, sv, cu, slens = args
    outs = []
    for b in rows:
        g = int(torch.searchsorted(cu, torch.tensor(b, dtype=cu.dtype), right=True)) - 1
        start, t = pk.shape[2] - int(plens[g]), sk.shape[2] if slens is None else int(slens[b])
        keys = torch.cat([pk[g, :, start:], sk[b, :, :t]], dim=1).repeat_interleave(q.shape[1] // pk.shape[1], 0)
        values = torch.cat([pv[g, :, start:], sv[b, :, :t]], dim=1).repeat_interleave(q.shape[1] // pk.shape[1], 0)
        if absent_values_zeroed:  # SDPA reads an absent key's value with weight 0 (0 * inf = NaN); the op does not
            scores = torch.einsum("hd,hkd->hk", q[b], keys)
            values = values.masked_fill((scores == -INF)[..., None], 0.0)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            outs.append(F.scaled_dot_product_attention(q[b, :, None], keys, values)[:, 0])
    return torch.stack(outs)


def _minus_inf_key(args, rows, side, position, dim=0):
    """Makes one key score -inf for every query head of `rows`: q[rows, :, dim] > 0 and that key's dim at -inf."""
    q, pk, pv, plens, sk, sv, cu, slens = args
    q[rows, :, dim] = q[rows, :, dim].abs() + 0.1
    if side == "prefix":
        pk[position[0], :, position[1], dim] = -INF
    else:
        sk[position[0], :, position[1], dim] = -INF


# ---- item 5: cascade_attention ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_minus_inf_score_is_an_absent_key(impl):
    """One suffix key of score -inf with 8 finite prefix keys: the attention over the prefix alone, as SDPA gives it
    (was NaN in both kernels). Row 1's absent key holds inf and NaN in its value: never read (was NaN in the reference).
    Row 2's -inf key is a prefix key in the middle of the prompt."""
    args = cascade_inputs([2, 1], 2, 1, 8, 8, 1, prefix_lens=[8, 8])
    _minus_inf_key(args, [0, 1], "suffix", (0, 0))
    _minus_inf_key(args, [1], "suffix", (1, 0))
    _minus_inf_key(args, [2], "prefix", (1, 3))
    args[5][1, 0, 0, :2] = torch.tensor([INF, NAN])
    out, lse = cascade(impl, args)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_same(out, sdpa_rows(args, range(3)), rtol=1e-5, atol=1e-5)
    # rows 0-1: the attention over the prefix alone (their suffix holds only the absent key)
    prefix_only = args[:7] + [torch.tensor([0, 0, 1], dtype=torch.int32)]
    want_out, want_lse = reference.cascade_attention(*prefix_only)
    assert_same(out[:2], want_out[:2], rtol=1e-5, atol=1e-5)
    assert_same(lse[:2], want_lse[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_plus_inf_score_gives_nan_out_and_lse(impl):
    """A +inf score: out NaN (as SDPA) and lse NaN (the reference gave +inf, which a merge reads as an empty side);
    the other rows are untouched."""
    args = cascade_inputs([2, 2], 4, 2, 16, 70, 3, prefix_lens=[70, 40])
    q, pk = args[0], args[1]
    q[0, 0, 5] = q[0, 0, 5].abs() + 0.1
    pk[0, 0, 65, 5] = INF  # row 0 head 0 (and row 1 / head 1 where their q[.., 5] > 0)
    out, lse = cascade(impl, args)
    assert torch.isnan(out[0, 0]).all() and torch.isnan(lse[0, 0])
    assert not torch.isposinf(lse).any()
    assert_same(out, sdpa_rows(args, range(4)), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isnan(lse), torch.isnan(out).any(-1))
    ref_out, ref_lse = reference.cascade_attention(*args)
    assert_same(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "cpu-kernel", "cuda-emulated"])
def test_a_plus_inf_score_survives_the_merge_of_prefix_and_suffix_parts(impl):
    """The cascade identity with a +inf prefix score: prefix part (+) suffix part through merge_attention_states is the
    whole, NaN included (a prefix part with lse +inf was merged as an empty side: a finite, wrong row)."""
    args = cascade_inputs([2, 1], 2, 1, 8, 10, 2, prefix_lens=[10, 10])
    args[0][0, :, 2] = args[0][0, :, 2].abs() + 0.1
    args[1][0, 0, 4, 2] = INF
    batch = args[0].shape[0]
    prefix_only = args[:7] + [torch.zeros(batch, dtype=torch.int32)]
    suffix_only = args[:3] + [torch.zeros(2, dtype=torch.int32)] + args[4:]
    merged, merged_lse = merge(impl, *cascade(impl, prefix_only), *cascade(impl, suffix_only))
    whole, whole_lse = cascade(impl, args)
    assert torch.isnan(whole[0]).all() and torch.isnan(merged[0]).all() and torch.isnan(merged_lse[0]).all()
    assert_same(merged, whole, rtol=1e-5, atol=1e-5)
    assert_same(merged_lse, whole_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_score_minus_inf_gives_zero_and_minus_inf(impl):
    """All keys of rows 0-1 (group 0: 70 prefix keys over two CPU blocks and three CUDA chunks, 33 suffix keys over
    two tiles) score -inf: out 0 and lse -inf, as SDPA's 0 (was NaN in both kernels), even with inf / NaN values."""
    args = cascade_inputs([2, 1], 4, 2, 16, 70, 33, prefix_lens=[70, 70])
    q, pk, pv, _, sk, sv, _, _ = args
    q[:2, :, 7] = q[:2, :, 7].abs() + 0.1
    pk[0, :, :, 7] = -INF
    sk[:2, :, :, 7] = -INF
    pv[0, 1, 3, 0], sv[1, 0, 32, 5] = INF, NAN  # absent keys: never read
    out, lse = cascade(impl, args)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and bool((lse[:2] == -INF).all())
    assert torch.isfinite(out[2]).all() and torch.isfinite(lse[2]).all()
    assert_same(out, sdpa_rows(args, range(3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_inf_values_of_present_keys_propagate_as_in_sdpa(impl):
    """inf in a present value gives inf (NaN where +inf meets -inf), as SDPA; its score stays finite."""
    args = cascade_inputs([2, 1], 2, 1, 8, 40, 5, prefix_lens=[40, 12])
    pv, sv = args[2], args[5]
    pv[0, 0, 39, 0] = INF  # rows 0-1
    sv[2, 0, 4, 1], sv[2, 0, 0, 1] = INF, -INF  # row 2: inf - inf
    sv[1, 0, 2, 3] = NAN
    out, lse = cascade(impl, args)
    assert torch.isposinf(out[:2, :, 0]).all() and torch.isnan(out[2, :, 1]).all() and torch.isnan(out[1, :, 3]).all()
    assert torch.isfinite(lse).all()
    assert_same(out, sdpa_rows(args, range(3)), rtol=1e-5, atol=1e-5)


# ---- item 6: merge_attention_states with head dim 0 ---------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_merge_with_head_dim_zero_returns_the_merged_lse(impl):
    """Head dim 0: out is empty, lse is still the merge of every row (was uninitialized memory in both kernels)."""
    lse_a = torch.tensor([[0.5, -INF, INF, NAN], [2.0, -INF, -1.0, 0.0]])
    lse_b = torch.tensor([[1.0, 3.0, -INF, 0.0], [INF, -INF, -1.0, NAN]])
    want = torch.tensor([[float(torch.logaddexp(torch.tensor(0.5), torch.tensor(1.0))), 3.0, -INF, NAN],
                         [2.0, -INF, -1.0 + float(torch.log(torch.tensor(2.0))), NAN]])  # fmt: skip
    o = torch.empty(2, 4, 0)
    for _ in range(3):  # the same on every call
        out, lse = merge(impl, o, lse_a, o, lse_b)
        assert out.shape == (2, 4, 0)
        assert_same(lse, want)


# ---- item 7: the reference of bridge_attention ----------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [False, True], ids=["visible", "hidden"])
def test_reference_bridge_attention_reads_an_inf_value_as_sdpa_and_the_kernel(hidden):
    """v[0, 0, 0, 0] = inf: the rows that see key (0, 0) get inf there, as the kernel and SDPA give (the reference
    gave NaN in row 0: its own value also went through the peers' product with weight 0)."""
    q, k, v, cu, mask = make_inputs([3, 2], 4, 2, 8)
    mask[:] = True
    mask[0, 0] = not hidden  # hidden: only row 0 reads its own key at position 0
    v[0, 0, 0, 0] = INF
    ref, _ = reference.bridge_attention(q, k, v, cu, mask)
    kernel = bridge_ops.bridge_attention(q, k, v, cu, mask)
    dense = reference.bridge_attention_dense(q, k, v, cu, mask)
    sees = torch.zeros(5, dtype=torch.bool)
    sees[: 1 if hidden else 3] = True
    assert torch.isposinf(ref[:, 0, 0, 0]).tolist() == sees.tolist()
    assert_same(ref, kernel, rtol=1e-5, atol=1e-5)
    assert_same(ref[sees], dense[sees], rtol=1e-5, atol=1e-5)  # SDPA: 0 * inf = NaN in the rows that do not see it


def _poison(args, case):
    """A NaN or +inf where the row of group 0 (rows 0-1) or row 3 (group 1) can see it; P = 70 spans two key blocks
    and the vectorized exp."""
    q, pk, pv, _, sk, sv, _, _ = args
    if case == "prefix-key-nan":
        pk[0, 0, 60, 3] = NAN
    elif case == "prefix-value-nan":
        pv[0, 1, 69, 0] = NAN
    elif case == "prefix-key-plus-inf-score":
        q[0, 0] = q[0, 0].abs()
        pk[0, 0, 65] = INF
    elif case == "suffix-key-nan":
        sk[3, 1, 2, 5] = NAN
    elif case == "query-nan":
        q[3, 2, 0] = NAN


@pytest.mark.guarantee
@pytest.mark.parametrize(
    "case", ["prefix-key-nan", "prefix-value-nan", "prefix-key-plus-inf-score", "suffix-key-nan", "query-nan"]
)
def test_cascade_attention_propagates_nan_and_inf_like_the_reference(case):
    args = cascade_inputs([2, 3], 4, 2, 16, 70, 4, prefix_lens=[70, 70])
    _poison(args, case)
    out, lse = bridge_ops.cascade_attention(*args, return_lse=True)
    ref_out, ref_lse = reference.cascade_attention(*args)
    q, pk, pv, _, sk, sv, _, _ = args  # stock attention over each row's [prefix; suffix]
    group = torch.tensor([0, 0, 1, 1, 1])
    keys, values = (torch.cat([p[group], s], 2).repeat_interleave(2, 1) for p, s in ((pk, sk), (pv, sv)))
    sdpa = F.scaled_dot_product_attention(q[:, :, None], keys, values)[:, :, 0]
    nan = torch.isnan(ref_out)
    assert nan.any() and not nan.all()
    assert torch.equal(torch.isnan(out), nan) and torch.equal(torch.isnan(sdpa), nan)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(out[~nan], ref_out[~nan])
    torch.testing.assert_close(lse[finite], ref_lse[finite])
