"""Generation with Bridge on the CPU: what Bridge costs per decode step, the fused decode op, and prefill once.

Model: a random Llama with hidden 1024, 8 layers, 16 heads (4 KV heads), MLP 2816, vocabulary 32000 (155M
parameters), float32; Bridge with d_bridge = 192 (one head of 192) adds 3.9% parameters, inside the paper's
2.8-5.1% range.

- decode: `bridge_ops.generate` end to end (prefill + 32 decode steps, no early stop) at 4 prompts x width 4,
  bridged vs the same model without Bridge, both with the expanded cache (the shared-prefix cache has its own suite,
  test_bench_prefix_cache.py). Target: bridged time <= 1.10x unbridged.
- block: one decode step of a BridgeBlock (16 rows, S=1): the fused `bridge_block_decode` op vs the same step as
  plain PyTorch calls (its reference twin) vs the module path (`hidden + block(hidden)`).
- prefill: 4 prompts of 64 tokens at width N = 4, 8, 16: prefill once per prompt and copy the cache rows to the
  members (`bridge_ops.generation.prefill_once`) vs the expanded prefill HF's generate does (N copies of each
  prompt through the model). Target: once <= 1.2 / N of expanded.
"""

import pytest
import torch
from conftest import paired_rounds

import bridge_ops
from bridge_ops import reference
from bridge_ops.generation import prefill_once

D_BRIDGE = 192
PROMPTS, PROMPT_LEN, WIDTH, NEW_TOKENS = 4, 32, 4, 32
PREFILL_PROMPTS = 4


def build_models() -> dict:
    """{"unbridged": the random Llama, "bridged": the same weights with Bridge}, seeded (also bench/
    compare_checkouts.py's model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    bridged = LlamaForCausalLM(config).eval()
    bridged.load_state_dict(base.state_dict())
    bridge_ops.apply_bridge(bridged, d_bridge=D_BRIDGE)
    for block in bridge_ops.hf.bridge_blocks(bridged):  # a trained-looking Bridge, not a zero one
        torch.nn.init.normal_(block.o_proj.weight, std=0.02)
    return {"unbridged": base, "bridged": bridged}


@pytest.fixture(scope="module")
def models():
    return build_models()


def prompts(count, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (count, length), generator=gen)


def test_decode(benchmark, models):
    ids = prompts(PROMPTS, PROMPT_LEN)

    def run(model):
        torch.manual_seed(0)
        return bridge_ops.generate(model, ids, WIDTH, NEW_TOKENS, eos_token_id=[], top_k=0, cache="expanded")

    tokens = run(models["bridged"]).num_tokens
    benchmark.group = "decode"
    unbridged, bridged, ratio = paired_rounds(
        benchmark, lambda: run(models["unbridged"]), lambda: run(models["bridged"]), rounds=9
    )
    benchmark.extra_info.update(
        kind="decode",
        tokens=tokens,
        unbridged=unbridged,
        bridged=bridged,
        ratio=ratio,
        bridge_share=bridge_ops.parameter_share(models["bridged"])["share"],
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


@pytest.mark.parametrize("impl", ["fused", "reference", "module"])
def test_block_decode_step(benchmark, models, impl):
    block = bridge_ops.hf.bridge_blocks(models["bridged"])[0]
    rows = PROMPTS * WIDTH
    hidden = torch.randn(rows, 1, 1024)
    cu = bridge_ops.cu_group_lens_from_width(rows, WIDTH)
    mask = torch.rand(rows, 1, generator=torch.Generator().manual_seed(0)) < 0.8
    weights = (
        block.norm.weight,
        block.norm.variance_epsilon,
        block.q_proj.weight,
        block.k_proj.weight,
        block.v_proj.weight,
        block.o_proj.weight,
    )
    calls = {
        "fused": lambda: bridge_ops.bridge_block_decode(hidden, *weights, cu, mask, block.num_heads),
        "reference": lambda: reference.bridge_block_decode(hidden, *weights, cu, mask, block.num_heads),
        "module": lambda: hidden + block(hidden, cu, mask),
    }
    benchmark.group = "block decode step"
    benchmark.extra_info.update(kind="block", impl=impl, threads=torch.get_num_threads(), torch=torch.__version__)
    with torch.no_grad():
        benchmark(calls[impl])


@pytest.mark.parametrize("width", [4, 8, 16])
def test_prefill(benchmark, models, width):
    from transformers import DynamicCache

    model = models["bridged"]
    ids = prompts(PREFILL_PROMPTS, 64)
    mask = torch.ones_like(ids)
    rows = torch.arange(ids.shape[0]).repeat_interleave(width)

    def once():
        return prefill_once(model, ids, mask, [width] * ids.shape[0])

    def expanded():
        with torch.no_grad(), bridge_ops.groups(model, width=width):
            return model(
                input_ids=ids[rows],
                attention_mask=mask[rows],
                past_key_values=DynamicCache(config=model.config),
                use_cache=True,
                logits_to_keep=1,
            )

    benchmark.group = f"prefill N={width}"
    expanded_time, once_time, ratio = paired_rounds(benchmark, expanded, once, rounds=5)
    benchmark.extra_info.update(
        kind="prefill",
        width=width,
        once=once_time,
        expanded=expanded_time,
        ratio=ratio,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
