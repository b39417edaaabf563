"""Tiny random HuggingFace models built locally (nothing is downloaded) for the HF and generation tests."""

import torch
from torch import nn

VOCAB, PAD, BOS, EOS = 61, 0, 1, 2
MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3"]


def tiny_config(model_type: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return classes[model_type](**settings)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def bridged_model(model_type: str = "llama", seed: int = 0, d_bridge: int = 32, o_std: float = 0.3, **overrides):
    """A tiny model with Bridge blocks whose output projection is random, so that Bridge visibly mixes rows."""
    import bridge_ops

    model = bridge_ops.apply_bridge(tiny_model(model_type, seed, **overrides), d_bridge=d_bridge, num_heads=2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in bridge_ops.hf.bridge_blocks(model):
            block.o_proj.weight.copy_(torch.randn(block.o_proj.weight.shape, generator=gen) * o_std)
    return model


def left_padded(prompts):
    """input_ids [P, L] and attention_mask for token lists of different lengths."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return ids, mask
