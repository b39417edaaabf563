"""The bridge_attention implementations the benchmarks compare, and one call of each at a given shape."""

import torch

import bridge_ops
from bridge_ops import reference

IMPLEMENTATIONS = {
    "fused": lambda q, k, v, cu: bridge_ops.bridge_attention(q, k, v, cu),
    "reference": lambda q, k, v, cu: reference.bridge_attention(q, k, v, cu)[0],
    "dense_sdpa": lambda q, k, v, cu: reference.bridge_attention_dense(q, k, v, cu),
}


def make_call(cfg: dict, impl: str, mode: str, *, heads=4, head_dim=128, device="cpu", dtype=torch.float32):
    """(call, q): `call()` runs `impl` once on groups of cfg["width"] rows ([groups * width, seqlen, heads, head_dim]):
    forward under no_grad for mode "fwd", forward + backward (returning the gradients, so nothing accumulates from one
    call to the next) for "fwd+bwd"."""
    batch = cfg["groups"] * cfg["width"]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, cfg["seqlen"], heads, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(3)
    )
    cu = bridge_ops.cu_group_lens_from_width(batch, cfg["width"], device=device)
    fn = IMPLEMENTATIONS[impl]
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return fn(q, k, v, cu)

        return call, q
    leaves = [t.requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=gen, device=device, dtype=dtype)

    def call():
        return torch.autograd.grad(fn(*leaves, cu), leaves, grad_out)

    return call, q
