"""The paper's "P-Match" baseline: a parameter-matched residual MLP where Bridge would go, mixing nothing across rows.

`apply_parameter_matched_mlp(model, d_bridge)` adds to every decoder layer, right after its feed-forward block,
`h = h + W_down · silu(W_up · norm(h))` with W_up [2·d_bridge, D] and W_down [D, 2·d_bridge] (zero-initialized),
i.e. 4·D·d_bridge + D parameters per layer, exactly a BridgeBlock's count. It separates "more parameters" from
"samples that read each other" in the experiment. `remove_parameter_matched_mlp(model)` takes the blocks out again.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..block import default_init_std
from ..hf import add_residual_blocks, has_residual_blocks, remove_residual_blocks, residual_norm

BLOCK_NAME = "pmatch"  # the submodule of each decoder layer (its parameters are `...layers.<i>.pmatch.<name>`)


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


def _residual(block: ResidualMLP, hidden: torch.Tensor, _) -> torch.Tensor:
    return hidden + block(hidden)


def apply_parameter_matched_mlp(model: nn.Module, d_bridge: int, init_std: Optional[float] = None) -> nn.Module:
    """Adds a ResidualMLP with the parameter count of a BridgeBlock(d_bridge) to every decoder layer (in place)."""
    if has_residual_blocks(model, BLOCK_NAME):
        raise ValueError("bridge_ops: this model already has parameter-matched MLP blocks")
    hidden_size = model.config.hidden_size

    def make_block(layer: nn.Module) -> ResidualMLP:
        return ResidualMLP(hidden_size, 2 * d_bridge, residual_norm(model, layer), init_std)

    add_residual_blocks(model, BLOCK_NAME, make_block, _residual)
    return model


def remove_parameter_matched_mlp(model: nn.Module) -> nn.Module:
    """Takes the blocks of `apply_parameter_matched_mlp` out again: the model is the original one (same modules, same
    weights)."""
    return remove_residual_blocks(model, BLOCK_NAME)
