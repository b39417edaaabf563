"""Shared helpers of the test suite: input builders, parameter snapshots, the flash-attn style error rule, and the
harness that kills a process while it saves."""

import os
import random
import signal
import time
import warnings
from collections import Counter
from typing import Callable, Optional, Sequence

import pytest
import torch

import bridge_ops
from bridge_ops import reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Devices the kernel tests run on: the CPU always; CUDA where a GPU is visible (skipped cleanly elsewhere). On a GPU
# the CUDA kernels of _C serve, or the cupy backend (BRIDGE_OPS_GPU_BACKEND=cupy forces it, see bench/gpu_check.sh).
HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_GPU, reason="no CUDA device"))]

# Rounding allowance of the error rule, in units of eps(dtype) * magnitude (see `assert_flash_rule`).
# bfloat16/float16: one unit; the kernel (float32 accumulation) is far more accurate than the reference run in the
# low dtype, so "2x the low-precision reference error" is the real bound. float32: the reference run in float32 is
# as accurate as the kernel, so which one rounds luckier is a coin flip. float64: no lower-precision reference
# exists (err_low = 0). A wrong kernel misses by ~1e-1 relative, orders of magnitude above these allowances.
ULPS = {torch.float64: 16, torch.float32: 16, torch.bfloat16: 1, torch.float16: 1}


def make_inputs(
    sizes: Sequence[int],
    seqlen: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    visible_fraction: Optional[float] = 0.7,
    finished_groups: Sequence[int] = (),
    requires_grad: bool = False,
    generator: Optional[torch.Generator] = None,
    device: str = "cpu",
):
    """q, k, v [B, S, H, Dh], cu_group_lens, key_mask (None when visible_fraction is None).

    Groups listed in `finished_groups` have every key masked (all members finished or padding).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    cu = bridge_ops.cu_group_lens_from_sizes(sizes).to(device)
    batch = int(sum(sizes))
    q, k, v = (
        torch.randn(batch, seqlen, heads, head_dim, generator=gen, dtype=torch.float64).to(device, dtype)
        for _ in range(3)
    )
    key_mask = None
    if visible_fraction is not None:
        key_mask = (torch.rand(batch, seqlen, generator=gen) < visible_fraction).to(device)
        for g in finished_groups:
            key_mask[int(cu[g]) : int(cu[g + 1])] = False
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, cu, key_mask


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_flash_rule(
    name: str,
    got: torch.Tensor,
    low: torch.Tensor,
    oracle: torch.Tensor,
    dtype: torch.dtype,
    magnitude: float = 0.0,
):
    """Flash-attn's error rule: |got - oracle| <= 2 |low - oracle| + ULPS[dtype] * eps(got.dtype) * M.

    `low` is the reference run in the low dtype; M = max(max |oracle|, magnitude) is the size of the terms the
    result is summed from (flash-attn adds the rounding term as `(out_ref + 0.3 - 0.3 - out_ref).abs().max()`).
    Pass `magnitude` where the terms are larger than the result (`term_magnitudes`).
    """
    err, err_low = max_err(got, oracle), max_err(low, oracle)
    ulps = ULPS[dtype] * torch.finfo(got.dtype).eps * max(oracle.abs().max().item(), magnitude)
    bound = 2 * err_low + ulps
    assert err <= bound, (
        f"{name}: error {err:.3e} exceeds 2 x low-precision reference error {err_low:.3e} + {ULPS[dtype]} ulp "
        f"({ulps:.1e})"
    )


def term_magnitudes(q, k, v, grad_out, grad_lse, scale=None):
    """Sizes of the terms that out, lse, dq, dk, dv are summed from, for `assert_flash_rule`'s `magnitude`.

    A score s = scale q.k carries a rounding error of eps |s|, which exp() turns into a relative error of the
    probabilities, so every result is conditioned by C = 1 + max |s|. The softmax backward
    dS = P (dP - delta + dlse) cancels, so dq and dk carry errors of order scale (|dP| + |dlse|) |k| (resp. |q|),
    however small they are. Maxima run over all row pairs (a superset of the pairs of one group).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    peak = lambda t: t.double().abs().max().item()  # noqa: E731
    pairs = lambda a, b: peak(torch.einsum("bshd,jshd->shbj", a.double(), b.double()))  # noqa: E731
    conditioning = 1 + scale * pairs(q, k)
    d_scores = scale * (pairs(grad_out, v) + peak(grad_lse))
    return {
        "out": conditioning * peak(v),
        "lse": conditioning,
        "dq": conditioning * d_scores * peak(k),
        "dk": conditioning * d_scores * peak(q),
        "dv": conditioning * peak(grad_out),
    }


def reference_with_grads(q, k, v, cu, key_mask, grad_out, grad_lse, *, dtype=None, upcast=True):
    """Reference out, lse and (dq, dk, dv) for the given output gradients, computed in `dtype`."""
    dtype = dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.bridge_attention(*leaves, cu, key_mask, upcast=upcast)
    torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def naive_bridge_attention(q, k, v, cu, key_mask=None, scale=None):
    """Row-by-row loops over (b, s, h): the slowest, most literal reading of the contract (float64)."""
    batch, seqlen, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    lse = torch.empty(batch, seqlen, heads, dtype=torch.float64)
    offsets = cu.tolist()
    for g in range(len(offsets) - 1):
        members = range(offsets[g], offsets[g + 1])
        for b in members:
            for s in range(seqlen):
                keys = [j for j in members if j == b or key_mask is None or bool(key_mask[j, s])]
                for h in range(heads):
                    scores = torch.stack([scale * q[b, s, h].dot(k[j, s, h]) for j in keys])
                    lse[b, s, h] = torch.logsumexp(scores, 0)
                    weights = torch.exp(scores - lse[b, s, h])
                    out[b, s, h] = sum(w * v[j, s, h] for w, j in zip(weights, keys))
    return out, lse


def tiny_decode_args() -> dict:
    """bridge_block_decode's keyword arguments at a tiny size: 4 rows in 2 groups of 2, hidden 16, 2 heads of 4."""
    hidden, norm = torch.randn(4, 1, 16), torch.ones(16)
    w, o = torch.randn(8, 16), torch.randn(16, 8)
    mask = torch.ones(4, 1, dtype=torch.bool)
    return dict(
        hidden=hidden,
        norm_weight=norm,
        eps=1e-6,
        q_weight=w,
        k_weight=w,
        v_weight=w,
        o_weight=o,
        cu_group_lens=bridge_ops.cu_group_lens_from_width(4, 2),
        key_mask=mask,
        num_heads=2,
    )


def named_params(model: torch.nn.Module) -> dict:
    """A copy of every parameter of `model`, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(model: torch.nn.Module, before: dict) -> None:
    """Every parameter of `model` still equals its copy in `before` (from named_params)."""
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---- kill -9 during a save ----------------------------------------------------------------------------------------
def same(a, b) -> bool:
    """Equality of nested tuples, lists and dicts of tensors and plain values (tensors: same shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def _own_tqdm_locks() -> None:
    """tqdm's write lock is a multiprocessing lock, shared by a forked child: a child killed while holding it (in
    save_pretrained's progress bar) would block the parent's next progress bar forever, so the child takes its own."""
    import threading

    import tqdm

    classes = [tqdm.tqdm]
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if "_lock" in vars(cls):
            cls.set_lock(threading.RLock())


def kill_during_saves(
    directory, saves: Sequence[Callable[[], None]], load: Callable[[str], object], trials: int, seed: int = 0
) -> Counter:
    """SIGKILLs a child process `trials` times at a random instant while it saves into `directory`, and checks that
    `load(directory)` then returns exactly what one of the two `saves` wrote, never a mix or an error.

    The child (forked, so it starts at once) runs the two saves in turn, starting with the one the directory does not
    hold, and is killed after a delay drawn uniformly over the time of three saves, so the kills fall at random points
    of writing, committing and publishing. Returns the counts of the outcomes: "old" (the directory holds what it held
    before the save the kill interrupted) or "new" (what that save wrote), "killed writing" (the kill left a staging
    directory behind) and "killed committing" (it left a committed save not yet moved into place, which the loader
    completed)."""
    from bridge_ops.files import COMMIT, STAGING

    saves[0]()
    states = [None, None]
    start = time.perf_counter()
    for i in (1, 0):  # the directory holds save 0 afterwards
        saves[i]()
        states[i] = load(str(directory))
    duration = (time.perf_counter() - start) / 2
    rng, outcomes, current = random.Random(seed), Counter(), 0
    for trial in range(trials):
        done_read, done_write = os.pipe()  # the child writes one byte per finished save
        with warnings.catch_warnings():  # Python >= 3.12 warns about forking a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: save until killed
            code = 0
            try:
                _own_tqdm_locks()
                for n in range(10**9):
                    saves[(1 - current + n) % 2]()
                    os.write(done_write, b".")
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(done_write)
        time.sleep(rng.uniform(0, 3 * duration))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"trial {trial}: the child failed"
        with os.fdopen(done_read, "rb") as f:
            finished = len(f.read())
        left = os.listdir(directory)
        outcomes["killed writing"] += any(name.startswith(STAGING) for name in left)
        outcomes["killed committing"] += any(name.startswith(COMMIT) for name in left)
        loaded = load(str(directory))
        old = (current + finished) % 2  # the saves alternate between the two states
        assert same(loaded, states[old]) or same(loaded, states[1 - old]), (
            f"trial {trial}: after the kill the directory holds neither save"
        )
        outcomes["old" if same(loaded, states[old]) else "new"] += 1
        current = old if same(loaded, states[old]) else 1 - old
    return outcomes


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, name: str = "") -> None:
    """NaN, +inf and -inf at the same places (issue 20's non-finite policy), and close finite values."""
    got, want = got.cpu(), want.cpu()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        differ = kind(got) != kind(want)
        where = differ.nonzero()[:4].tolist()
        assert not differ.any(), f"{name}: {kind.__name__} differs at {where}: {got[differ][:4]} vs {want[differ][:4]}"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=rtol, atol=atol, msg=name or None)
