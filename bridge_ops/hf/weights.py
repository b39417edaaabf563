"""Saving and loading Bridge weights on their own, PEFT-adapter style.

`save_bridge(model, dir)` writes `bridge.safetensors` (the blocks' tensors, keyed `layers.<i>.<name>`) and
`bridge_config.json` (hyper-parameters and the shape of the model they belong to). `load_bridge(model, dir)` reads
them back, bit-exactly, after checking the shapes; it adds the blocks first if the model has none. It also reads
Bridge weights out of a directory written by `model.save_pretrained` of a bridged model (whose state dict holds
them as `...layers.<i>.bridge.<name>`), so `from_pretrained` + `load_bridge` restores a saved bridged model.
"""

import json
import os
import re
from typing import Dict

import torch
from torch import nn

from ..version import __version__
from .patch import apply_bridge, bridge_blocks, decoder_layers, is_bridged

WEIGHTS_NAME = "bridge.safetensors"
CONFIG_NAME = "bridge_config.json"
_IN_MODEL_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.bridge\.(.+)$")


def _shape_of(model: nn.Module) -> Dict[str, int]:
    blocks = bridge_blocks(model)
    return {
        "hidden_size": blocks[0].hidden_size,
        "num_layers": len(blocks),
        "d_bridge": blocks[0].d_bridge,
        "num_heads": blocks[0].num_heads,
    }


def save_bridge(model: nn.Module, directory: str) -> None:
    """Writes the Bridge weights and config of `model` to `directory` (created if needed)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {
        f"layers.{i}.{name}": tensor.detach().contiguous().cpu()
        for i, block in enumerate(bridge_blocks(model))
        for name, tensor in block.state_dict().items()
    }
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    config = dict(_shape_of(model), **model.config.bridge)
    config.update(model_type=getattr(model.config, "model_type", None), bridge_ops_version=__version__)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def _read_saved(directory: str):
    """(config, tensors keyed layers.<i>.<name>) from a save_bridge or a save_pretrained directory."""
    from safetensors.torch import load_file

    if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return json.load(f), load_file(os.path.join(directory, WEIGHTS_NAME))
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"bridge_ops: no {WEIGHTS_NAME} and no model.safetensors in {directory}")
    tensors = {}
    for name in files:
        for key, tensor in load_file(os.path.join(directory, name)).items():
            match = _IN_MODEL_KEY.search(key)
            if match:
                tensors[f"layers.{match.group(1)}.{match.group(2)}"] = tensor
    if not tensors:
        raise ValueError(f"bridge_ops: the model saved in {directory} has no Bridge weights")
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f).get("bridge", {})
    layers = sorted({int(k.split(".")[1]) for k in tensors})
    q = tensors["layers.0.q_proj.weight"]
    config.update(num_layers=len(layers), d_bridge=q.shape[0], hidden_size=q.shape[1])
    return config, tensors


def load_bridge(model: nn.Module, directory: str) -> nn.Module:
    """Loads Bridge weights saved by `save_bridge` (or inside a `save_pretrained` directory) into `model`.

    Adds the blocks first (with the saved hyper-parameters) if the model has none. Raises ValueError, leaving the
    model as it was, if the saved blocks were made for another shape (hidden size, layers, d_bridge, heads).
    """
    config, tensors = _read_saved(directory)
    model_shape = {"hidden_size": model.config.hidden_size, "num_layers": len(decoder_layers(model))}
    if is_bridged(model):
        model_shape = _shape_of(model)
    mismatched = [f"{k} {config[k]} (saved) vs {v} (model)" for k, v in model_shape.items() if config.get(k, v) != v]
    if mismatched:
        raise ValueError(f"bridge_ops: the Bridge weights in {directory} do not fit this model: {', '.join(mismatched)}")
    if not is_bridged(model):
        apply_bridge(model, config["d_bridge"], config.get("num_heads"), init_std=config.get("init_std"))
    with torch.no_grad():
        for i, block in enumerate(bridge_blocks(model)):
            for name, tensor in block.state_dict().items():
                saved = tensors.get(f"layers.{i}.{name}")
                if saved is None or saved.shape != tensor.shape:
                    found = None if saved is None else list(saved.shape)
                    raise ValueError(f"bridge_ops: {directory} has no tensor layers.{i}.{name} of shape "
                                     f"{list(tensor.shape)} (found {found})")
                tensor.copy_(saved)
    return model
