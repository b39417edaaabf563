"""The paper's "P-Match" baseline: a parameter-matched residual MLP where Bridge would go, mixing nothing across rows.

`apply_parameter_matched_mlp(model, d_bridge)` adds to every decoder layer, right after its feed-forward block,
`h = h + W_down · silu(W_up · norm(h))` with W_up [2·d_bridge, D] and W_down [D, 2·d_bridge] (zero-initialized),
i.e. 4·D·d_bridge + D parameters per layer, exactly a BridgeBlock's count. It separates "more parameters" from
"samples that read each other" in the experiment.
"""

import types
from typing import Optional

import torch.nn.functional as F
from torch import nn

from ..block import default_init_std
from ..hf.patch import REGISTRY, _generic_norm, decoder_layers


class ResidualMLP(nn.Module):
    """norm -> Linear(D, hidden) -> SiLU -> Linear(hidden, D) (zero-initialized, so the block starts as zero)."""

    def __init__(self, hidden_size: int, inner: int, norm: nn.Module, init_std: Optional[float] = None):
        super().__init__()
        self.norm = norm
        self.up = nn.Linear(hidden_size, inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)
        nn.init.normal_(self.up.weight, std=default_init_std(hidden_size) if init_std is None else init_std)
        nn.init.zeros_(self.down.weight)

    def forward(self, hidden):
        return self.down(F.silu(self.up(self.norm(hidden))))


def _layer_forward(layer: nn.Module, *args, **kwargs):
    out = layer._pmatch_base_forward(*args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    hidden = hidden + layer.pmatch(hidden)
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def apply_parameter_matched_mlp(model: nn.Module, d_bridge: int, init_std: Optional[float] = None) -> nn.Module:
    """Adds a ResidualMLP with the parameter count of a BridgeBlock(d_bridge) to every decoder layer (in place)."""
    layers = decoder_layers(model)
    make_norm = REGISTRY.get(getattr(model.config, "model_type", None), _generic_norm)
    reference = next(model.parameters())
    for layer in layers:
        if hasattr(layer, "pmatch"):
            raise ValueError("bridge_ops: this model already has parameter-matched MLP blocks")
        block = ResidualMLP(model.config.hidden_size, 2 * d_bridge, make_norm(layer, model.config), init_std)
        layer.pmatch = block.to(device=reference.device, dtype=reference.dtype)
        layer._pmatch_base_forward = layer.forward
        layer.forward = types.MethodType(_layer_forward, layer)
    return model

