"""Hypothesis fuzzing of the compiled kernels against the reference over random layouts, masks and dtypes.

300 examples per test by default; set BRIDGE_OPS_FUZZ_EXAMPLES for more (and BRIDGE_OPS_FUZZ_RANDOM=1 to draw
new examples instead of the fixed, derandomized sequence).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, DTYPES, HAS_GPU, assert_flash_rule, assert_same_nonfinite, term_magnitudes
from hypothesis import given
from hypothesis import strategies as st
from test_cascade_attention import cascade_inputs

from bridge_ops import checks, reference

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.bridge_ops, "bridge_attention"), reason="no compiled _C")
NAN, INF = float("nan"), float("inf")


@st.composite
def problems(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
    seqlen = draw(st.integers(1, 5))
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    visible = draw(st.sampled_from([None, 0.0, 0.3, 0.8, 1.0]))
    scale = draw(st.sampled_from([None, 0.1, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, seqlen, heads, head_dim, dtype, visible, scale, seed


def build(sizes, seqlen, heads, head_dim, dtype, visible, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = sum(sizes)
    cu = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int32)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    mask = None if visible is None else torch.rand(batch, seqlen, generator=gen) < visible
    grad_out = torch.randn(batch, seqlen, heads, head_dim, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(batch, seqlen, heads, generator=gen, dtype=torch.float64)
    return q, k, v, cu, mask, grad_out, grad_lse


@pytest.mark.parametrize("device", DEVICES)
@given(problem=problems())
def test_fuzz_forward_and_backward(device, problem):
    sizes, seqlen, heads, head_dim, dtype, visible, scale, seed = problem
    built = build(sizes, seqlen, heads, head_dim, dtype, visible, seed)
    q, k, v, cu, mask, grad_out, grad_lse = (None if t is None else t.to(device) for t in built)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.bridge_ops.bridge_attention(*leaves, cu, mask, scale)
    torch.autograd.backward([out, lse], [grad_out.to(dtype), grad_lse.to(lse.dtype)])
    oracle = reference_scaled(q, k, v, cu, mask, scale, grad_out, grad_lse, torch.float64, True)
    low = reference_scaled(q, k, v, cu, mask, scale, grad_out, grad_lse, dtype, False)
    got = [out.detach(), lse.detach()] + [t.grad for t in leaves]
    magnitudes = term_magnitudes(q, k, v, grad_out, grad_lse, scale)
    for name, g, lo, want in zip(("out", "lse", "dq", "dk", "dv"), got, low, oracle):
        assert torch.isfinite(g).all(), name
        assert_flash_rule(name, g, lo, want, dtype, magnitudes[name])


def reference_scaled(q, k, v, cu, mask, scale, grad_out, grad_lse, dtype, upcast):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.bridge_attention(*leaves, cu, mask, scale, upcast=upcast)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


# ---- the cascade ops with non-finite inputs (issue 20) -------------------------------------------------------------
# The non-finite policy of cascade_attention / merge_attention_states (ops.py): one result for the reference, the
# CPU kernel and the CUDA kernel (emulated on the CPU; on a GPU where there is one), which the reference shares with
# SDPA. Inputs: poisons that make scores +-inf (an inf in a key, or a key or query scaled to the dtype's maximum so that
# q . k overflows) or NaN, NaN queries, inf / NaN values behind present keys and behind absent ones (score -inf), rows
# whose every key scores -inf, rows with no key at all, NaN in the padding. Scaled keys and queries hold one nonzero
# entry, so that every implementation rounds their scores alike; they are not drawn with inf values (where a weight
# underflows to 0, whether an inf value shows is unspecified).

# Applied in this order (lengths first, the padding last).
CASCADE_POISONS = [
    "empty-row",
    "query-huge",
    "key-huge",
    "all-absent-group",
    "key-inf",
    "key-nan",
    "absent-key-bad-value",
    "query-nan",
    "value-inf",
    "value-nan",
    "pad-nan",
]
SCORE_ONLY, VALUE_ONLY = {"query-huge", "key-huge"}, {"value-inf", "value-nan"}


@st.composite
def cascade_problems(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    kv_heads, ratio = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    head_dim = draw(st.integers(1, 24))
    prefix_len, suffix_len = draw(st.integers(0, 80)), draw(st.integers(0, 40))
    dtype = draw(st.sampled_from(DTYPES))
    ragged_suffix = draw(st.booleans())
    scores_mode = draw(st.booleans())  # huge scores, or inf / NaN values (not both: see above)
    kinds = [k for k in CASCADE_POISONS if k not in (VALUE_ONLY if scores_mode else SCORE_ONLY)]
    poisons = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=5))
    scale = draw(st.sampled_from([None, 0.1, 1.0] + ([3.0] if scores_mode else [])))
    seed = draw(st.integers(0, 2**31 - 1))
    return sizes, kv_heads, ratio, head_dim, prefix_len, suffix_len, dtype, ragged_suffix, poisons, scale, seed


def poisoned_cascade_inputs(sizes, kv_heads, ratio, head_dim, prefix_len, suffix_len, dtype, ragged, poisons, seed):
    """cascade_attention's arguments (test_cascade_attention.cascade_inputs) with `poisons` applied."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(n, (1,), generator=gen))

    def sign():
        return 1.0 if pick(2) else -1.0

    batch, groups = sum(sizes), len(sizes)
    prefix_lens = torch.randint(0, prefix_len + 1, (groups,), generator=gen)
    suffix_lens = torch.randint(0, suffix_len + 1, (batch,), generator=gen) if ragged else None
    args = cascade_inputs(
        sizes, kv_heads * ratio, kv_heads, head_dim, prefix_len, suffix_len, dtype,
        prefix_lens=prefix_lens, suffix_lens=suffix_lens, seed=seed,
    )  # fmt: skip
    q, pk, pv, plens, sk, sv, cu, slens = args
    group_of = [g for g, n in enumerate(sizes) for _ in range(n)]
    rows_of = [list(range(int(cu[g]), int(cu[g + 1]))) for g in range(groups)]
    big = torch.finfo(dtype).max

    def key():  # (keys, values, index) of a random key position, visible or not; None without any position
        sides = [side for side, n in (("prefix", prefix_len), ("suffix", suffix_len)) if n > 0]
        if not sides:
            return None
        if sides[pick(len(sides))] == "prefix":
            return pk, pv, (pick(groups), pick(kv_heads), pick(prefix_len))
        return sk, sv, (pick(batch), pick(kv_heads), pick(suffix_len))

    for kind in sorted(poisons, key=CASCADE_POISONS.index):
        d = pick(head_dim)
        if kind == "empty-row":
            b = pick(batch)
            plens[group_of[b]] = 0
            if slens is None:
                slens = args[7] = torch.full((batch,), suffix_len, dtype=torch.int32)
            slens[b] = 0
        elif kind == "query-huge":  # every score of (b, h) is q[b, h, d] k[d]: overflows to +-inf or is huge
            b, h = pick(batch), pick(q.shape[1])
            q[b, h] = 0.0
            q[b, h, d] = sign() * big * (0.5 + 0.5 * float(torch.rand((), generator=gen)))
        elif kind == "key-huge":
            if (slot := key()) is not None:
                keys, _, i = slot
                keys[i] = 0.0
                keys[i + (d,)] = sign() * big * (0.5 + 0.5 * float(torch.rand((), generator=gen)))
        elif kind == "all-absent-group":  # every key of group g scores -inf for its rows
            g = pick(groups)
            rows = rows_of[g]
            q[rows, :, d] = q[rows, :, d].abs()
            pk[g, :, :, d] = -INF
            sk[rows, :, :, d] = -INF
            if prefix_len:  # behind absent keys: never read
                pv[g, pick(kv_heads), pick(prefix_len), pick(head_dim)] = [INF, -INF, NAN][pick(3)]
        elif kind in ("key-inf", "key-nan", "absent-key-bad-value"):
            if (slot := key()) is not None:
                keys, values, i = slot
                keys[i + (d,)] = NAN if kind == "key-nan" else sign() * INF
                if kind == "absent-key-bad-value":  # its score is -inf (never read) or +inf / NaN (a NaN row)
                    values[i + (pick(head_dim),)] = [INF, -INF, NAN][pick(3)]
        elif kind == "query-nan":
            q[pick(batch), pick(q.shape[1]), d] = NAN
        elif kind in ("value-inf", "value-nan"):
            if (slot := key()) is not None:
                _, values, i = slot
                values[i + (d,)] = NAN if kind == "value-nan" else sign() * INF
        elif kind == "pad-nan":  # never read
            for g in range(groups):
                pk[g, :, : prefix_len - int(plens[g])] = NAN
                pv[g, :, : prefix_len - int(plens[g])] = INF
            if slens is not None:
                for b in range(batch):
                    sk[b, :, int(slens[b]) :] = NAN
                    sv[b, :, int(slens[b]) :] = NAN
    return args


def sdpa_cascade(args, scale):
    """SDPA (math backend) over each row's present keys in the accumulation dtype, given the op's scores (q . k, then
    the scale, as the reference and the kernels round them) as the mask of zero queries and keys; the values of absent
    keys are zeroed (SDPA would multiply them by 0: the one documented difference)."""
    q, pk, pv, plens, sk, sv, cu, slens = args
    acc = checks.lse_dtype(q.dtype)
    scale = checks.resolve_scale(scale, q.shape[-1])
    ratio = q.shape[1] // pk.shape[1]
    outs = []
    for b in range(q.shape[0]):
        g = int(torch.searchsorted(cu, torch.tensor(b, dtype=cu.dtype), right=True)) - 1
        start, t = pk.shape[2] - int(plens[g]), sk.shape[2] if slens is None else int(slens[b])
        keys, values = (
            torch.cat([p[g, :, start:], s[b, :, :t]], dim=1).to(acc).repeat_interleave(ratio, 0)
            for p, s in ((pk, sk), (pv, sv))
        )
        if keys.shape[1] == 0:
            outs.append(torch.zeros(q.shape[1:], dtype=acc))
            continue
        scores = torch.einsum("hd,hkd->hk", q[b].to(acc), keys) * scale
        values = values.masked_fill((scores == -INF)[..., None], 0.0)
        zeros = scores.new_zeros(scores.shape[0], 1, 1)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(
                zeros, zeros.expand(-1, keys.shape[1], -1), values, attn_mask=scores[:, None], scale=1.0
            )
        outs.append(out[:, 0])
    return torch.stack(outs).to(q.dtype)


def assert_same_as(name, got, want, dtype):
    """assert_same_nonfinite with tolerances of a few roundings of `dtype` (the result's)."""
    tol = (64 if dtype in (torch.float32, torch.float64) else 4) * torch.finfo(dtype).eps
    assert_same_nonfinite(got, want, rtol=tol, atol=tol, name=name)


def emulated_cascade_or_none():
    """test_cascade_cuda_emulated.emulated_cascade bound to the emulator, or None where the emulator cannot be built."""
    try:
        import test_cascade_cuda_emulated as emulated
    except pytest.skip.Exception:
        return None
    emulator = emulated.emulator_launcher.emulator()
    return lambda *args, scale=None: emulated.emulated_cascade(emulator, *args, scale=scale)


@given(problem=cascade_problems())
def test_fuzz_cascade_non_finite_inputs(problem):
    *shape, poisons, scale, seed = problem
    dtype = shape[6]
    args = poisoned_cascade_inputs(*shape, poisons, seed)
    out, lse = reference.cascade_attention(*args, scale)
    acc = checks.lse_dtype(dtype)
    assert not torch.isposinf(lse).any()  # +inf scores give NaN, never the merge's "empty side"
    assert_same_as("reference vs SDPA", out, sdpa_cascade(args, scale), dtype)
    results = {"cpu": torch.ops.bridge_ops.cascade_attention(*args, scale)}
    if (emulated := emulated_cascade_or_none()) is not None:
        results["cuda (emulated)"] = emulated(*args, scale=scale)
    if HAS_GPU:
        on_gpu = [a.cuda() if a is not None else None for a in args]
        results["cuda"] = torch.ops.bridge_ops.cascade_attention(*on_gpu, scale)
    for name, (got, got_lse) in results.items():
        assert_same_as(f"{name} out", got, out, dtype)
        assert_same_as(f"{name} lse", got_lse, lse, acc)


@st.composite
def merge_problems(draw):
    rows = draw(st.integers(1, 12))
    head_dim = draw(st.sampled_from([0, 1, 7, 32, 40]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, head_dim, dtype, seed


@given(problem=merge_problems())
def test_fuzz_merge_non_finite_inputs(problem):
    """merge_attention_states with lse drawn from finite, -inf, +inf (empty sides) and NaN, and inf / NaN in o (read
    only where its side has a nonzero weight), head dim 0 included: the CPU kernel and the CUDA kernel (emulated) give
    the reference's result."""
    rows, head_dim, dtype, seed = problem
    gen = torch.Generator().manual_seed(seed)
    acc = checks.lse_dtype(dtype)
    o_a, o_b = (torch.randn(rows, head_dim, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    specials = torch.tensor([-INF, INF, NAN], dtype=acc)
    lse_a, lse_b = (torch.randn(rows, generator=gen, dtype=torch.float64).to(acc) * 3 for _ in range(2))
    for lse in (lse_a, lse_b):
        which = torch.randint(0, 6, (rows,), generator=gen)  # 0-2: finite, 3-5: -inf, +inf, NaN
        lse[which >= 3] = specials[which[which >= 3] - 3]
    for o in (o_a, o_b):
        if head_dim:
            poison = torch.rand(rows, head_dim, generator=gen) < 0.1
            which = torch.randint(0, 3, (int(poison.sum()),), generator=gen)
            o[poison] = torch.tensor([INF, -INF, NAN], dtype=dtype)[which]
    out, lse = reference.merge_attention_states(o_a, lse_a, o_b, lse_b)
    results = {"cpu": torch.ops.bridge_ops.merge_attention_states(o_a, lse_a, o_b, lse_b)}
    try:
        from test_cascade_cuda_emulated import emulated_merge, emulator_launcher

        results["cuda (emulated)"] = emulated_merge(emulator_launcher.emulator(), o_a, lse_a, o_b, lse_b)
    except pytest.skip.Exception:
        pass
    if HAS_GPU:
        results["cuda"] = torch.ops.bridge_ops.merge_attention_states(*(t.cuda() for t in (o_a, lse_a, o_b, lse_b)))
    for name, (got, got_lse) in results.items():
        assert_same_as(f"{name} out", got, out, dtype)
        assert_same_as(f"{name} lse", got_lse, lse, acc)
