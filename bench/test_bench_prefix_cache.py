"""Shared-prefix KV cache vs the expanded cache on the CPU: cache bytes and decode step time.

    pytest bench/test_bench_prefix_cache.py --benchmark-json=bench/results/prefix_cache.json
    python bench/report.py bench/results/prefix_cache.json

Model: a random Llama with hidden 1024, 8 layers, 16 query heads / 4 key-value heads (head dim 64), MLP 2816,
vocabulary 32000 (155M parameters), float32, no Bridge (Bridge is the same on both sides). One prompt of P tokens,
N members (P = 512 / 2048 / 8192, N = 4 / 16).

- bytes: the prompt part of the cache, expanded (N copies: HF DynamicCache after `repeat_interleave`, what
  `generate(cache="expanded")` holds) vs shared (`GroupPrefixCache`, one copy per group). Exactly 1/N by construction.
- step: one decode step of the N rows (8 layers, LM head included: `model(...)` with one new token per row) over a
  cache holding the prompt and 16 generated tokens, expanded (DynamicCache, SDPA) vs shared (GroupPrefixCache,
  cascade op `cascade_attention` through `hf.attention.routed_to_cascade`), alternated within each round. Target: shared
  >= 2x faster at P = 2048, N = 16. The caches hold random keys/values (the decode cost does not depend on them; a
  real prefill of 8192 tokens would take minutes here).
- gpu (skipped without a GPU; bench/gpu_check.py runs it): the attention op alone on CUDA, bf16, the same head
  layout, one layer: `cascade_attention` over the shared prefix vs SDPA over the expanded keys (CUDA events).
"""

import statistics
import time

import pytest
import torch

from bridge_ops.cache import GroupPrefixCache
from bridge_ops.hf.attention import routed_to_cascade

HIDDEN, LAYERS, HEADS, KV_HEADS = 1024, 8, 16, 4
HEAD_DIM = HIDDEN // HEADS
GENERATED = 16  # tokens already generated when the step is timed
ROUNDS = {512: 10, 2048: 6, 8192: 3}


@pytest.fixture(scope="module")
def models():
    """Two instances of one model (same weights): the shared-prefix one runs with the cascade attention, so that
    switching attention implementations is never part of a timed step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=HIDDEN,
        intermediate_size=2816,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=16384,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    expanded = LlamaForCausalLM(config).eval()
    shared = LlamaForCausalLM(config).eval()
    shared.load_state_dict(expanded.state_dict())
    return expanded, shared


def filled_caches(prompt_len: int, width: int):
    """(DynamicCache [N, Hkv, P + GENERATED, Dh], the equal GroupPrefixCache) with random keys/values."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    layers = []
    for _ in range(LAYERS):
        prompt_k, prompt_v = randn(1, KV_HEADS, prompt_len, HEAD_DIM), randn(1, KV_HEADS, prompt_len, HEAD_DIM)
        own_k, own_v = randn(width, KV_HEADS, GENERATED, HEAD_DIM), randn(width, KV_HEADS, GENERATED, HEAD_DIM)
        layers.append(
            (
                torch.cat([prompt_k.expand(width, -1, -1, -1), own_k], dim=2),
                torch.cat([prompt_v.expand(width, -1, -1, -1), own_v], dim=2),
            )
        )
    expanded = DynamicCache(ddp_cache_data=layers)
    shared = GroupPrefixCache.from_dynamic_cache(expanded, [width], torch.tensor([prompt_len]), prompt_len)
    return expanded, shared


class Stepper:
    """One decode step per call (the cache grows by one position per call, as in generation). `forward_kwargs`
    give the model its cache (`routed_to_cascade`'s kwargs for the shared-prefix cache)."""

    def __init__(self, model, cache, width, **forward_kwargs):
        self.model, self.kwargs = model, forward_kwargs or {"past_key_values": cache}
        self.length = cache.get_seq_length()
        self.tokens = torch.randint(3, 32000, (width, 1), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def __call__(self):
        mask = torch.ones(self.tokens.shape[0], self.length + 1, dtype=torch.long)
        positions = torch.full_like(self.tokens, self.length)
        logits = self.model(
            input_ids=self.tokens, attention_mask=mask, position_ids=positions, use_cache=True, **self.kwargs
        ).logits
        self.length += 1
        return logits


def prompt_bytes(cache, prompt_len) -> int:
    return sum(2 * layer.keys[:, :, :prompt_len].numel() * layer.keys.element_size() for layer in cache.layers)


@pytest.mark.parametrize("width", [4, 16])
@pytest.mark.parametrize("prompt_len", [512, 2048, 8192])
def test_decode_step(benchmark, models, prompt_len, width):
    expanded_model, shared_model = models
    expanded_cache, shared_cache = filled_caches(prompt_len, width)
    expanded_bytes, (shared_bytes, suffix_bytes) = prompt_bytes(expanded_cache, prompt_len), shared_cache.nbytes()
    with routed_to_cascade(shared_model, shared_cache) as kwargs:
        steps = {
            "expanded": Stepper(expanded_model, expanded_cache, width),
            "shared": Stepper(shared_model, shared_cache, width, **kwargs),
        }
        first = {name: step() for name, step in steps.items()}  # warm-up, and the two must agree
        agreement = (first["expanded"] - first["shared"]).abs().max().item()
        assert agreement < 1e-3, agreement
        times = {name: [] for name in steps}

        def pair():
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)

        benchmark.group = f"decode step P={prompt_len} N={width}"
        benchmark.pedantic(pair, rounds=ROUNDS[prompt_len], warmup_rounds=0)
    ratios = [e / s for e, s in zip(times["expanded"], times["shared"])]
    benchmark.extra_info.update(
        kind="prefix_cache",
        prompt_len=prompt_len,
        width=width,
        expanded_step=statistics.median(times["expanded"]),
        shared_step=statistics.median(times["shared"]),
        speedup=statistics.median(ratios),
        expanded_prompt_bytes=expanded_bytes,
        shared_prompt_bytes=shared_bytes,
        shared_suffix_bytes=suffix_bytes,
        max_logit_difference=agreement,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("width", [4, 16])
@pytest.mark.parametrize("prompt_len", [2048, 8192])
def test_cascade_op_gpu(benchmark, prompt_len, width):
    import torch.nn.functional as F
    from test_bench_gpu import event_median_seconds

    import bridge_ops

    groups, dtype = 8, torch.bfloat16
    batch = groups * width
    randn = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)  # noqa: E731
    q = randn(batch, HEADS, HEAD_DIM)
    prefix_k, prefix_v = randn(groups, KV_HEADS, prompt_len, HEAD_DIM), randn(groups, KV_HEADS, prompt_len, HEAD_DIM)
    suffix_k, suffix_v = randn(batch, KV_HEADS, GENERATED, HEAD_DIM), randn(batch, KV_HEADS, GENERATED, HEAD_DIM)
    prefix_lens = torch.full((groups,), prompt_len, dtype=torch.int32, device="cuda")
    cu = bridge_ops.cu_group_lens_from_width(batch, width, device="cuda")
    rows = torch.arange(groups, device="cuda").repeat_interleave(width)
    keys, values = (torch.cat([p[rows], s], dim=2) for p, s in ((prefix_k, suffix_k), (prefix_v, suffix_v)))
    calls = {
        "cascade": lambda: bridge_ops.cascade_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu),
        "sdpa_expanded": lambda: F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True),
    }
    with torch.no_grad():
        times = {name: event_median_seconds(call) for name, call in calls.items()}
        benchmark.group = f"gpu cascade op P={prompt_len} N={width}"
        benchmark.pedantic(calls["cascade"], rounds=5, iterations=5, warmup_rounds=1)
    benchmark.extra_info.update(
        kind="prefix_cache_gpu",
        prompt_len=prompt_len,
        width=width,
        groups=groups,
        cascade_s=times["cascade"],
        sdpa_expanded_s=times["sdpa_expanded"],
        speedup=times["sdpa_expanded"] / times["cascade"],
        device=torch.cuda.get_device_name(),
        gpu_backend=bridge_ops.dispatch.backend_for("cuda", "cascade_attention").name,
    )
