"""One decode step of a Llama-family model over a `GroupPrefixCache`, without the HF module stack.

`generate`'s decode steps feed one token per row. Through `model(...)` each step walks 30 HF decoder layers (for
SmolLM2-135M), whose Python glue (module calls, keyword plumbing, the cache and attention registries, output objects)
costs about as much as the small tensor ops it drives. `DecodeStep(model)` runs the same step as a flat loop over the
layers' weights with the same tensor operations, in the same order and layouts: the embedding, each layer's RMSNorm
modules, the projections through `bridge_ops.ops.decode_linear` (what `decode_linears` makes every nn.Linear do in a
decode step), the model's own rotary function, the cascade op `cascade_attention` over the cache's prefix and
suffix, the MLP with the model's activation, the residual blocks `add_residual_blocks` put on the layers (Bridge,
P-Match) and the final norm and LM head. So its logits equal the HF forward's bit for bit (tested), and the tokens
sampled from them are the same.

On the CPU with the compiled extension each decoder layer (everything but its residual blocks) is one call of the op
`bridge_ops::decode_layer` (csrc/decode_layer.cpp): the same ATen operations in the same order in C++, without the
Python between them (`fused_layer_reason` says why a model's layers run in Python instead).

Used by `generate` when `unsupported_reason(model)` is None (the Llama, Mistral and Qwen2 decoder layers, default
rotary embeddings, plain nn.Linear projections, no forward hooks, eval mode); any other model decodes through its
HF forward. No backward: decode steps run under torch.no_grad.
"""

import sys
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .._loader import _C
from ..ops import cascade_attention, decode_linear
from .attention import unsupported_reason as cascade_unsupported_reason
from .patch import RMS_NORM_CLASSES, _base_forward_attr, _ResidualForward, decoder_layers
from .runtime import BridgeGroups

MODEL_TYPES = ("llama", "mistral", "qwen2")  # decoder layers written alike (Qwen2: biases on q, k, v)
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # the order decode_layer takes the weights in


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
        linears = [getattr(attention if p in "qkvo" else mlp, f"{p}_proj", None) for p in _PROJECTIONS]
        if any(type(m) is not nn.Linear for m in linears) or any("forward" in vars(m) for m in linears):
            return "projections that are not plain nn.Linear layers (e.g. LoRA or quantized)"
        if hasattr(attention, "q_norm"):
            return "attention with query/key norms"
    if type(model.get_output_embeddings()) is not nn.Linear:
        return "an LM head that is not a plain nn.Linear"
    return None


def fused_layer_reason(model: nn.Module) -> Optional[str]:
    """Why `DecodeStep` runs `model`'s decoder layers op by op in Python rather than as one `decode_layer` call
    each (None: fused). The op needs the compiled extension, CPU weights, and the HF RMSNorm class of the model type
    (whose forward it reproduces) in every layer."""
    if _C is None:
        return "the compiled extension is not loaded"
    if model.device.type != "cpu":
        return f"the model is on {model.device.type} (the fused layer runs on the CPU)"
    norm_class = RMS_NORM_CLASSES.get(model.config.model_type)
    for layer in decoder_layers(model):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ != norm_class or "forward" in vars(norm):
                return f"a norm of type {type(norm).__name__}, not the model type's {norm_class}"
    return None


class _Layer(NamedTuple):
    """What a decode step reads of one decoder layer, looked up once (module attribute lookups are most of the Python
    cost of a step): its norms, its projections' weights and biases, and the residual blocks after it."""

    input_norm: nn.Module
    post_norm: nn.Module
    weights: List[torch.Tensor]  # the projections in _PROJECTIONS' order (the fused layer's arguments)
    biases: List[Optional[torch.Tensor]]
    act_fn: nn.Module
    head_dim: int
    scaling: float
    residuals: List[Tuple[object, nn.Module, bool]]  # (residual function, block, whether it takes the groups)

    def project(self, x: torch.Tensor, projection: str) -> torch.Tensor:
        """x through the projection named `projection` (one of _PROJECTIONS), as nn.Linear does in a decode step."""
        index = _PROJECTIONS.index(projection)
        return decode_linear(x, self.weights[index], self.biases[index])

    @staticmethod
    def of(layer: nn.Module) -> "_Layer":
        attention, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attention if p in "qkvo" else mlp, f"{p}_proj") for p in _PROJECTIONS]
        return _Layer(
            layer.input_layernorm,
            layer.post_attention_layernorm,
            [linear.weight for linear in linears],
            [linear.bias for linear in linears],
            mlp.act_fn,
            attention.head_dim,
            attention.scaling,
            [(w.residual, getattr(layer, w.name), w.take is not None) for w in _residual_chain(layer)],
        )


class DecodeStep:
    """`step(tokens, positions, cache, groups)`: next-token logits float32 [B, vocab] of one decode step.

    tokens: long [B], the token fed to each row; positions: long [B], its position id; cache: the GroupPrefixCache of
    `generate` (prompts stored; each layer's suffix grows by one position); groups: the step's BridgeGroups (None for
    a model without Bridge). The weight tensors are looked up once, at construction (a step object serves one
    generation): in-place updates are seen, parameters replaced on the modules afterwards are not."""

    def __init__(self, model: nn.Module):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"bridge_ops: DecodeStep cannot run this model: {reason}")
        decoder = model.model
        self.embed, self.rotary, self.norm = decoder.embed_tokens, decoder.rotary_emb, decoder.norm
        layers = list(decoder_layers(model))
        self.layers = [_Layer.of(layer) for layer in layers]
        self.rotate = sys.modules[type(layers[0].self_attn).__module__].apply_rotary_pos_emb
        head = model.get_output_embeddings()
        self.head = head.weight, head.bias
        self.fused = fused_layer_reason(model) is None

    @torch.no_grad()
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, groups: Optional[BridgeGroups]
    ) -> torch.Tensor:
        hidden = self.embed(tokens[:, None])  # [B, 1, D], HF's layout throughout
        cos, sin = self.rotary(hidden, positions[:, None])  # [B, 1, Dh]
        cos, sin = cos[:, 0], sin[:, 0]  # [B, Dh]: broadcast over the heads of [B, H, Dh]
        run_layer = self._fused_layer if self.fused else self._layer
        for layer, kv in zip(self.layers, cache.layers):
            hidden = run_layer(layer, hidden, cos, sin, kv, cache)
            for residual, block, takes_groups in layer.residuals:
                hidden = residual(block, hidden, groups if takes_groups else None)
        return decode_linear(self.norm(hidden), *self.head)[:, -1].float()

    def _layer(self, layer: _Layer, hidden, cos, sin, kv, cache) -> torch.Tensor:
        """LlamaDecoderLayer.forward for one new position per row: pre-norm attention and MLP, each a residual."""
        rows, head_dim = hidden.shape[0], layer.head_dim
        x = layer.input_norm(hidden)
        q = layer.project(x, "q").view(rows, -1, head_dim)  # [B, Hq, Dh]
        k = layer.project(x, "k").view(rows, -1, head_dim)  # [B, Hkv, Dh]
        v = layer.project(x, "v").view(rows, -1, 1, head_dim)  # [B, Hkv, 1, Dh]
        q, k = self.rotate(q, k, cos, sin)
        kv.append_rows(k[:, :, None], v)
        out = cascade_attention(
            q,
            kv.prefix_keys,
            kv.prefix_values,
            cache.prefix_lens,
            kv.suffix_keys,
            kv.suffix_values,
            cache.cu_group_lens,
            None,
            layer.scaling,
        )
        hidden = hidden + layer.project(out.reshape(rows, 1, -1), "o")
        x = layer.post_norm(hidden)
        x = layer.project(layer.act_fn(layer.project(x, "gate")) * layer.project(x, "up"), "down")
        return hidden + x

    @staticmethod
    def _fused_layer(layer: _Layer, hidden, cos, sin, kv, cache) -> torch.Tensor:
        """`_layer` as one call of the compiled op (the same operations in C++; its key and value written in place
        into the suffix buffers at position kv.length)."""
        suffix_keys, suffix_values = kv.reserve(1, hidden.shape[0])
        hidden = torch.ops.bridge_ops.decode_layer(
            hidden,
            cos,
            sin,
            layer.input_norm.weight,
            layer.input_norm.variance_epsilon,
            layer.post_norm.weight,
            layer.post_norm.variance_epsilon,
            layer.weights,
            layer.biases,
            kv.prefix_keys,
            kv.prefix_values,
            cache.prefix_lens,
            suffix_keys,
            suffix_values,
            kv.length,
            cache.cu_group_lens,
            layer.scaling,
        )
        kv.length += 1
        return hidden


def step_for(model: nn.Module, cache) -> Optional[DecodeStep]:
    """The DecodeStep for `model`'s decode steps over `cache`, or None (a DynamicCache, or an unsupported model)."""
    from ..cache import GroupPrefixCache

    if not isinstance(cache, GroupPrefixCache) or unsupported_reason(model) is not None:
        return None
    return DecodeStep(model)
