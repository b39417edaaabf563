"""`python -m bridge_ops.demo`: Bridge attention on a small grouped batch, fused kernel vs reference.

Five prompts with 4, 4, 1, 8 and 3 parallel generations (ragged groups, one of width 1), 64 positions, some
sequences finished early (their later keys masked). Prints agreement of outputs and gradients with the PyTorch
reference, timings, and what a BridgeBlock adds to a decoder layer.
"""

import argparse
import time

import torch

import bridge_ops
from bridge_ops import reference
from bridge_ops.dispatch import backend_for


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def grouped_batch(widths, seqlen, heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = bridge_ops.cu_group_lens_from_sizes(widths)
    batch = int(cu[-1])
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, generator=gen) for _ in range(3))
    # Each sequence finishes (emits EOS) at a random position; its keys after that are masked.
    finish = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=gen)
    key_mask = torch.arange(seqlen)[None, :] <= finish[:, None]
    return q, k, v, cu, key_mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="4,4,1,8,3", help="parallel generations per prompt")
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    widths = [int(w) for w in args.widths.split(",")]
    q, k, v, cu, key_mask = grouped_batch(widths, args.seqlen, args.heads, args.head_dim)
    print(f"bridge_ops {bridge_ops.__version__}: CPU calls served by the '{backend_for('cpu').name}' backend")
    print(f"batch: {len(widths)} prompts x widths {widths} = {q.shape[0]} rows, S={args.seqlen}, "
          f"H={args.heads}, Dh={args.head_dim}, float32; cu_group_lens = {cu.tolist()}")

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = bridge_ops.bridge_attention(*leaves, cu, key_mask)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.bridge_attention(*ref_leaves, cu, key_mask)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.double())
    print(f"max |fused - reference(float64)|: out {(out.double() - ref_out).abs().max():.2e}, "
          + ", ".join(f"{n} {(g.double() - r).abs().max():.2e}" for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)))

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(q, k, v, cu, key_mask)

        return run

    def forward_backward(fn):
        return lambda: torch.autograd.grad(fn(*leaves, cu, key_mask), leaves, grad_out)

    fused = bridge_ops.bridge_attention
    ref = lambda *a: reference.bridge_attention(*a)[0]  # noqa: E731
    for name, wrap in (("forward", forward), ("forward+backward", forward_backward)):
        t_fused = median_seconds(wrap(fused), args.repeats)
        t_ref = median_seconds(wrap(ref), args.repeats)
        print(f"{name:>17}: fused {t_fused * 1e3:7.3f} ms, reference {t_ref * 1e3:7.3f} ms, "
              f"speed-up {t_ref / t_fused:.1f}x ({torch.get_num_threads()} threads)")

    hidden = 1024
    block = bridge_ops.BridgeBlock(hidden, d_bridge=512)
    x = torch.randn(q.shape[0], 8, hidden)
    delta = block(x, cu, key_mask[:, :8])
    print(f"BridgeBlock(hidden={hidden}, d_bridge=512, heads={block.num_heads}): {block.num_parameters():,} parameters "
          f"per decoder layer; a fresh block returns exactly zero: {bool((delta == 0).all())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
