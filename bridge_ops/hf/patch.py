"""Adding Bridge blocks to a loaded HuggingFace decoder (and taking them out again).

`apply_bridge(model)` patches one *instance* (Liger-Kernel style: the class, and any other model in the process,
stay untouched; the base weights are kept): every decoder layer gets a `bridge` submodule (a `BridgeBlock` in the
model's dtype and device) and an instance-level `forward` that runs the original layer and then adds the Bridge
residual, which is `h = h + Bridge(norm(h))` right after the layer's `h = h + MLP(norm(h))`, with the groups the
forward passes as `bridge_groups=` (see `bridge_ops.hf.runtime`). The model's `generate` is wrapped so
`model.generate(..., num_return_sequences=N)` groups the N samples of each prompt. The Bridge hyper-parameters are
recorded in `model.config.bridge`, so `save_pretrained` keeps them.

The layer wrapping itself, `add_residual_blocks` / `remove_residual_blocks`, knows nothing of Bridge: the P-Match
baseline (a parameter-matched residual MLP, bridge_ops.train.pmatch) is added and removed with it too.
"""

import types
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..block import BridgeBlock
from ..checks import integer
from .runtime import (
    ACTIVE_BLOCK,
    GROUPS_KWARG,
    NO_GROUPS,
    base_model,
    groups,
    groups_active,
    is_bridged,
    require_bridged,
)

MIN_TRANSFORMERS = (4, 56)
BLOCK_NAME = "bridge"  # the submodule of each decoder layer that holds its BridgeBlock


@dataclass(frozen=True)
class BridgeConfig:
    d_bridge: int = 512
    num_heads: Optional[int] = None
    init_std: Optional[float] = None  # None: BridgeBlock's default, hidden_size ** -0.5


def _llama_like_norm(layer: nn.Module, config) -> nn.Module:
    """The base model's own RMSNorm class, as the paper places it (norm = post_attention_layernorm's class)."""
    return type(layer.post_attention_layernorm)(config.hidden_size, eps=config.rms_norm_eps)


def _generic_norm(layer: nn.Module, config) -> nn.Module:
    eps = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_epsilon", None) or 1e-6
    return nn.RMSNorm(config.hidden_size, eps=eps)


# The HF model types Bridge supports explicitly, each with the name of its RMSNorm class, whose forward is the HF
# Llama RMSNorm formula that the fused decode op computes. The one list of supported model types (the CLI and the
# tests read SUPPORTED_MODEL_TYPES).
RMS_NORM_CLASSES = {
    "llama": "LlamaRMSNorm",
    "mistral": "MistralRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen3": "Qwen3RMSNorm",
}

# model_type -> how to build the input norm of a block added to a layer. Layers are `<base model>.layers` for all of
# them.
REGISTRY: Dict[str, Callable[[nn.Module, object], nn.Module]] = {
    model_type: _llama_like_norm for model_type in RMS_NORM_CLASSES
}
SUPPORTED_MODEL_TYPES = tuple(REGISTRY)


def _check_transformers() -> None:
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if version < MIN_TRANSFORMERS:
        raise RuntimeError(
            f"bridge_ops: transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} is required (Cache API), "
            f"found {transformers.__version__}"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers Bridge attaches to: `<base>.layers` for registered types, else the first ModuleList of
    the base model whose every layer has an `mlp` submodule (the generic path)."""
    model_type = getattr(model.config, "model_type", None)
    base = base_model(model)
    if model_type in REGISTRY:
        return base.layers
    for child in base.children():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and all(hasattr(m, "mlp") for m in child):
            return child
    raise ValueError(
        f"bridge_ops: cannot add Bridge to model type '{model_type}': it is not one of {sorted(REGISTRY)} and its "
        "base model has no list of decoder layers with an `mlp` submodule"
    )


def residual_norm(model: nn.Module, layer: nn.Module) -> nn.Module:
    """A fresh input norm for a residual block added to `layer`: the model's own RMSNorm class for the
    SUPPORTED_MODEL_TYPES, else torch.nn.RMSNorm (on the current default device, in float32)."""
    make_norm = REGISTRY.get(getattr(model.config, "model_type", None), _generic_norm)
    return make_norm(layer, model.config)


def new_bridge_block(model: nn.Module, layer: nn.Module, cfg: BridgeConfig) -> BridgeBlock:
    """The BridgeBlock `apply_bridge` adds to `layer` (on the current default device, in float32)."""
    norm = residual_norm(model, layer)
    llama_rms = type(norm).__name__ == RMS_NORM_CLASSES.get(getattr(model.config, "model_type", None))
    hidden = model.config.hidden_size
    return BridgeBlock(hidden, cfg.d_bridge, cfg.num_heads, norm=norm, llama_rms_norm=llama_rms, init_std=cfg.init_std)


# ---- residual blocks on decoder layers: the instance patching Bridge and the P-Match baseline share ----------------
@dataclass(frozen=True)
class _ResidualForward:
    """The forward of a layer wrapped by `add_residual_blocks` (bound to the layer with types.MethodType, so a deep
    copy of the model binds it to the copied layer)."""

    name: str
    residual: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]
    take: Optional[Callable[[dict], Any]]

    def __call__(self, layer: nn.Module, *args, **kwargs):
        taken = self.take(kwargs) if self.take is not None else None
        out = getattr(layer, _base_forward_attr(self.name))(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.residual(getattr(layer, self.name), hidden, taken)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def _base_forward_attr(name: str) -> str:
    return f"_{name}_base_forward"


def has_residual_blocks(model: nn.Module, name: str) -> bool:
    """Whether `add_residual_blocks(model, name, ...)` patched the model's decoder layers."""
    return any(hasattr(layer, _base_forward_attr(name)) for layer in decoder_layers(model))


def add_residual_blocks(
    model: nn.Module,
    name: str,
    make_block: Callable[[nn.Module], nn.Module],
    residual: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor],
    take: Optional[Callable[[dict], Any]] = None,
) -> List[nn.Module]:
    """Adds a residual block after every decoder layer of `model`, in place, patching the instance only (the class,
    and other models, stay untouched); returns the blocks, in layer order.

    Each layer gets the submodule `name` = `make_block(layer)` (moved to the model's device and dtype) and an
    instance-level forward that runs the layer's previous forward and replaces its hidden states h (the output, or
    the output's first element) with `residual(block, h, taken)`. `take(kwargs)`, when given, runs first: it pops the
    forward keyword arguments meant for the block (the original forward never sees them) and returns `taken`.
    `remove_residual_blocks(model, name)` restores the layers.
    """
    layers = decoder_layers(model)
    if has_residual_blocks(model, name):
        raise ValueError(f"bridge_ops: the decoder layers of this model already have `{name}` blocks")
    param = next(model.parameters())
    forward = _ResidualForward(name, residual, take)
    for layer in layers:
        setattr(layer, name, make_block(layer).to(device=param.device, dtype=param.dtype))
        setattr(layer, _base_forward_attr(name), layer.forward)
        layer.forward = types.MethodType(forward, layer)
    return [getattr(layer, name) for layer in layers]


def remove_residual_blocks(model: nn.Module, name: str) -> nn.Module:
    """Takes the `name` blocks of `add_residual_blocks` out again: each layer has its previous forward back, and no
    `name` submodule. Blocks added later (on top of these) must be removed first."""
    layers = decoder_layers(model)
    if not has_residual_blocks(model, name):
        raise ValueError(f"bridge_ops: the decoder layers of this model have no `{name}` blocks")
    for layer in layers:
        wrapper = getattr(vars(layer).get("forward"), "__func__", None)
        if not (isinstance(wrapper, _ResidualForward) and wrapper.name == name):
            raise ValueError(
                f"bridge_ops: the `{name}` blocks of this model are wrapped by other blocks added after "
                "them: remove those first"
            )
    for layer in layers:
        base = vars(layer).pop(_base_forward_attr(name))
        if getattr(base, "__self__", None) is layer and getattr(base, "__func__", None) is type(layer).forward:
            del layer.forward  # the class's forward again
        else:
            layer.forward = base
        delattr(layer, name)
    return model


def _take_groups(kwargs: dict):
    """The forward's BridgeGroups, out of its kwargs (see bridge_ops.hf.runtime)."""
    bridge_groups = kwargs.pop(GROUPS_KWARG, None)
    if bridge_groups is None:
        raise RuntimeError(NO_GROUPS)
    return bridge_groups


def _bridge_residual(block: BridgeBlock, hidden: torch.Tensor, bridge_groups) -> torch.Tensor:
    return block.residual(hidden, *bridge_groups.for_hidden(hidden))


def _bridged_generate(model: nn.Module, *args, **kwargs):
    if groups_active(model):  # the caller set the groups
        return model._bridge_base_generate(*args, **kwargs)
    config = kwargs.get("generation_config") or model.generation_config
    width = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    if (kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1) > 1:
        raise ValueError("bridge_ops: beam search is not supported on a bridged model (use sampling or greedy)")
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    with groups(model, width=width, eos_token_id=eos):
        return model._bridge_base_generate(*args, **kwargs)


def apply_bridge(
    model: nn.Module,
    d_bridge: Optional[int] = None,
    num_heads: Optional[int] = None,
    *,
    init_std: Optional[float] = None,
) -> nn.Module:
    """Adds a BridgeBlock after the feed-forward block of every decoder layer of `model` (in place; returns it).

    Supported explicitly: SUPPORTED_MODEL_TYPES (the Bridge norm is the model's own RMSNorm class); any other
    decoder whose layers have an `mlp` submodule goes through a generic path (torch.nn.RMSNorm). Defaults come from
    `model.config.bridge` when present (a model saved after `apply_bridge`), else d_bridge=512, num_heads =
    d_bridge // 128, init_std = hidden_size ** -0.5. The blocks' output projections are zero, so the model's outputs are
    unchanged.
    """
    _check_transformers()
    if is_bridged(model):
        raise ValueError("bridge_ops: this model already has Bridge blocks (remove_bridge(model) first)")
    saved = getattr(model.config, "bridge", None) or {}
    defaults = BridgeConfig(**saved) if saved else BridgeConfig()
    cfg = BridgeConfig(
        d_bridge=d_bridge if d_bridge is not None else defaults.d_bridge,
        num_heads=num_heads if num_heads is not None else defaults.num_heads,
        init_std=init_std if init_std is not None else defaults.init_std,
    )
    integer("d_bridge", cfg.d_bridge, 1)
    if cfg.num_heads is not None:
        integer("num_heads", cfg.num_heads, 1)
    blocks = add_residual_blocks(
        model, BLOCK_NAME, lambda layer: new_bridge_block(model, layer, cfg), _bridge_residual, take=_take_groups
    )
    cfg = BridgeConfig(cfg.d_bridge, blocks[0].num_heads, blocks[0].init_std)
    model.config.bridge = asdict(cfg)
    setattr(model, ACTIVE_BLOCK, None)
    if hasattr(model, "generate"):
        model._bridge_base_generate = model.generate
        model.generate = types.MethodType(_bridged_generate, model)
    return model


def remove_bridge(model: nn.Module) -> nn.Module:
    """Takes the Bridge blocks out again: the model is the original one (same modules, same weights)."""
    require_bridged(model)
    if groups_active(model):
        raise RuntimeError("bridge_ops: remove_bridge inside a groups(...) block of the model")
    remove_residual_blocks(model, BLOCK_NAME)
    if hasattr(model, "_bridge_base_generate"):
        del model.generate, model._bridge_base_generate
    delattr(model, ACTIVE_BLOCK)
    if hasattr(model.config, "bridge"):
        del model.config.bridge
    return model


def bridge_blocks(model: nn.Module):
    """The BridgeBlock of every decoder layer, in layer order."""
    require_bridged(model)
    return [getattr(layer, BLOCK_NAME) for layer in decoder_layers(model)]


def parameter_share(model: nn.Module) -> Dict[str, float]:
    """Bridge parameters, all parameters, and their ratio (the paper: 2.8-5.1% at d_bridge 512 on 1.5B-8B models)."""
    bridge = sum(p.numel() for block in bridge_blocks(model) for p in block.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"bridge_parameters": bridge, "total_parameters": total, "share": bridge / total}


def bridge_parameters(model: nn.Module):
    """The Bridge parameters only (e.g. for an optimizer that trains Bridge with the base frozen)."""
    return [p for block in bridge_blocks(model) for p in block.parameters()]
