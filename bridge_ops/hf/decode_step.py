"""One decode step of a Llama-family model over a `GroupPrefixCache`, without the HF module stack.

`generate`'s decode steps feed one token per row. Through `model(...)` each step walks 30 HF decoder layers (for
SmolLM2-135M), whose Python glue (module calls, keyword plumbing, the cache and attention registries, output objects)
costs about as much as the small tensor ops it drives. `DecodeStep(model)` runs the same step as a flat loop over the
layers' weights with the same tensor operations, in the same order and layouts: the embedding, each layer's RMSNorm
modules, the projections through `bridge_ops.ops.decode_linear` (what `decode_linears` makes every nn.Linear do in a
decode step), the model's own rotary function, the cascade op `prefix_suffix_attention` over the cache's prefix and
suffix, the MLP with the model's activation, the residual blocks `add_residual_blocks` put on the layers (Bridge,
P-Match) and the final norm and LM head. So its logits equal the HF forward's bit for bit (tested), and the tokens
sampled from them are the same.

Used by `generate` when `unsupported_reason(model)` is None (the Llama, Mistral and Qwen2 decoder layers, default
rotary embeddings, plain nn.Linear projections, no forward hooks, eval mode); any other model decodes through its
HF forward. No backward: decode steps run under torch.no_grad.
"""

import sys
from typing import List, Optional

import torch
from torch import nn

from ..ops import decode_linear, prefix_suffix_attention
from .attention import unsupported_reason as cascade_unsupported_reason
from .patch import _base_forward_attr, _ResidualForward, decoder_layers
from .runtime import BridgeGroups

MODEL_TYPES = ("llama", "mistral", "qwen2")  # decoder layers written alike (Qwen2: biases on q, k, v)
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _residual_chain(layer: nn.Module) -> Optional[List[_ResidualForward]]:
    """The residual blocks wrapped around `layer`'s class forward, innermost first; None when its forward was replaced
    by anything else."""
    chain = []
    forward = vars(layer).get("forward")
    while forward is not None:
        wrapper = getattr(forward, "__func__", None)
        if not isinstance(wrapper, _ResidualForward) or getattr(forward, "__self__", None) is not layer:
            return None
        chain.append(wrapper)
        forward = vars(layer)[_base_forward_attr(wrapper.name)]
        if getattr(forward, "__func__", None) is type(layer).forward:
            break
    return chain[::-1]


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why `DecodeStep` cannot run this model's decode steps (None if it can): what the cascade attention refuses
    (sliding windows, sinks, softcapping: `bridge_ops.hf.attention.unsupported_reason`), or a layer it does not
    reproduce."""
    cascade = cascade_unsupported_reason(model)
    if cascade is not None:
        return cascade
    config = model.config
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    if model.training:
        return "the model is in training mode"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rotary embeddings of type {rope['rope_type']!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "forward hooks on the model's modules"
    for layer in decoder_layers(model):
        if not all(hasattr(layer, part) for part in _LAYER_PARTS) or _residual_chain(layer) is None:
            return f"a decoder layer of type {type(layer).__name__} with another structure or forward"
        attention, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attention, f"{p}_proj", None) for p in "qkvo"]
        linears += [getattr(mlp, f"{p}_proj", None) for p in ("gate", "up", "down")]
        if any(type(m) is not nn.Linear for m in linears) or any("forward" in vars(m) for m in linears):
            return "projections that are not plain nn.Linear layers (e.g. LoRA or quantized)"
        if hasattr(attention, "q_norm"):
            return "attention with query/key norms"
    if type(model.get_output_embeddings()) is not nn.Linear:
        return "an LM head that is not a plain nn.Linear"
    return None


class DecodeStep:
    """`step(tokens, positions, cache, groups)`: next-token logits float32 [B, vocab] of one decode step.

    tokens: long [B], the token fed to each row; positions: long [B], its position id; cache: the GroupPrefixCache of
    `generate` (prompts stored; each layer's suffix grows by one position); groups: the step's BridgeGroups (None for
    a model without Bridge). The weights are read from the model at every call (in-place updates are seen)."""

    def __init__(self, model: nn.Module):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"bridge_ops: DecodeStep cannot run this model: {reason}")
        self.model = model
        self.decoder = model.model
        self.layers = list(decoder_layers(model))
        self.chains = [_residual_chain(layer) for layer in self.layers]
        self.rotate = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.head = model.get_output_embeddings()

    @torch.no_grad()
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, groups: Optional[BridgeGroups]
    ) -> torch.Tensor:
        hidden = self.decoder.embed_tokens(tokens[:, None])  # [B, 1, D], HF's layout throughout
        cos, sin = self.decoder.rotary_emb(hidden, positions[:, None])  # [B, 1, Dh]
        cos, sin = cos[:, 0], sin[:, 0]  # [B, Dh]: broadcast over the heads of [B, H, Dh]
        for layer, chain, kv in zip(self.layers, self.chains, cache.layers):
            hidden = self._layer(layer, hidden, cos, sin, kv, cache)
            for wrapper in chain:
                hidden = wrapper.residual(getattr(layer, wrapper.name), hidden, groups if wrapper.take else None)
        hidden = self.decoder.norm(hidden)
        return _linear(self.head, hidden)[:, -1].float()

    def _layer(self, layer, hidden, cos, sin, kv, cache) -> torch.Tensor:
        """LlamaDecoderLayer.forward for one new position per row: pre-norm attention and MLP, each a residual."""
        attention = layer.self_attn
        rows, head_dim = hidden.shape[0], attention.head_dim
        x = layer.input_layernorm(hidden)
        q = _linear(attention.q_proj, x).view(rows, -1, head_dim)  # [B, Hq, Dh]
        k = _linear(attention.k_proj, x).view(rows, -1, head_dim)  # [B, Hkv, Dh]
        v = _linear(attention.v_proj, x).view(rows, -1, 1, head_dim)  # [B, Hkv, 1, Dh]
        q, k = self.rotate(q, k, cos, sin)
        kv.append_rows(k[:, :, None], v)
        out = prefix_suffix_attention(
            q,
            kv.prefix_keys,
            kv.prefix_values,
            cache.prefix_lens,
            kv.suffix_keys,
            kv.suffix_values,
            cache.cu_group_lens,
            None,
            attention.scaling,
        )
        hidden = hidden + _linear(attention.o_proj, out.reshape(rows, 1, -1))
        mlp = layer.mlp
        x = layer.post_attention_layernorm(hidden)
        x = _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
        return hidden + x


def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return decode_linear(x, module.weight, module.bias)


def step_for(model: nn.Module, cache) -> Optional[DecodeStep]:
    """The DecodeStep for `model`'s decode steps over `cache`, or None (a DynamicCache, or an unsupported model)."""
    from ..cache import GroupPrefixCache

    if not isinstance(cache, GroupPrefixCache) or unsupported_reason(model) is not None:
        return None
    return DecodeStep(model)
