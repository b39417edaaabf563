"""Saving and loading Bridge weights on their own, PEFT-adapter style.

`save_bridge(model, dir)` writes `bridge.safetensors` (the blocks' tensors, keyed `layers.<i>.<name>`) and
`bridge_config.json` (hyper-parameters, the shape and model type of the model they belong to, and the sha256 of
bridge.safetensors and of the config itself), both as one save with one commit point (`bridge_ops.files.publish`).
`load_bridge(model, dir)` verifies both checksums and checks everything against the model first (hidden size, layers,
d_bridge, heads, model type, tensor names, shapes, floating dtypes, finite values); only then does it add the blocks
(if the model has none) and copy the weights, bit-exactly. A refused load leaves the model exactly as it was. It also
reads Bridge weights out of a directory written by `model.save_pretrained` of a bridged model (whose state dict holds
them as `...layers.<i>.bridge.<name>`), so `from_pretrained` + `load_bridge` restores a saved bridged model.
"""

import json
import os
import re
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..files import check_fields, publish, read_json, recover, self_digest, sha256_of, verify_sha256, write_json
from ..version import __version__
from .patch import BridgeConfig, apply_bridge, bridge_blocks, decoder_layers, is_bridged, new_bridge_block

WEIGHTS_NAME = "bridge.safetensors"
CONFIG_NAME = "bridge_config.json"
BRIDGE_FILES = (WEIGHTS_NAME, CONFIG_NAME)
# the types of the fields of a saved Bridge config (bridge_config.json, or config.json's "bridge" entry)
CONFIG_TYPES = dict(
    d_bridge=int,
    num_heads=(int, type(None)),
    init_std=(int, float, type(None)),
    hidden_size=int,
    num_layers=int,
    model_type=(str, type(None)),
    bridge_ops_version=str,
    sha256=dict,
)
_IN_MODEL_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.bridge\.(.+)$")


def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict without its Bridge tensors: what `save_pretrained` writes beside `save_bridge`'s file."""
    return {k: v for k, v in model.state_dict().items() if _IN_MODEL_KEY.search(k) is None}


def has_saved_bridge(directory: str) -> bool:
    """Whether `directory` holds Bridge weights `load_bridge` can read: a `save_bridge` file, or the config of a model
    saved by `save_pretrained` after `apply_bridge`."""
    recover(directory)
    if os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
        return True
    config = os.path.join(directory, "config.json")
    return os.path.exists(config) and "bridge" in read_json(config)


def _shape_of(model: nn.Module) -> Dict[str, int]:
    blocks = bridge_blocks(model)
    return {
        "hidden_size": blocks[0].hidden_size,
        "num_layers": len(blocks),
        "d_bridge": blocks[0].d_bridge,
        "num_heads": blocks[0].num_heads,
    }


def bridge_writer(model: nn.Module, blocks: Optional[List[nn.Module]] = None) -> Callable[[str], None]:
    """Checks that `model` has Bridge blocks (and that `blocks`, if given, has one per layer) and returns
    `write(directory)`, which writes their `bridge.safetensors` and `bridge_config.json` into `directory` as they are
    (`save_bridge` publishes them; the CLI publishes them with the model's own files)."""
    own = bridge_blocks(model)
    blocks = own if blocks is None else blocks
    if len(blocks) != len(own):
        raise ValueError(f"bridge_ops: {len(blocks)} blocks given for a model with {len(own)} layers")
    tensors = {
        f"layers.{i}.{name}": tensor.detach().contiguous().cpu()
        for i, block in enumerate(blocks)
        for name, tensor in block.state_dict().items()
    }
    config = dict(_shape_of(model), **model.config.bridge)
    config.update(model_type=getattr(model.config, "model_type", None), bridge_ops_version=__version__)
    config = json.loads(json.dumps(config))  # the values the file holds (the config's own sha256 is of them)

    def write(directory: str) -> None:
        from safetensors.torch import save_file

        weights = os.path.join(directory, WEIGHTS_NAME)
        save_file(tensors, weights)
        signed = dict(config, sha256={WEIGHTS_NAME: sha256_of(weights)})
        signed["sha256"][CONFIG_NAME] = self_digest(signed, CONFIG_NAME)
        write_json(os.path.join(directory, CONFIG_NAME), signed)

    return write


def save_bridge(model: nn.Module, directory: str, blocks: Optional[List[nn.Module]] = None) -> None:
    """Writes the Bridge weights and config of `model` to `directory` (created if needed) as one save: a crash at
    any instant leaves the previous save or this one, and concurrent saves the last one to finish. A model without
    Bridge is refused before anything is created. `blocks`: the BridgeBlocks to write instead of the model's own, one
    per layer (e.g. the trained copies that PEFT keeps for `modules_to_save`)."""
    publish(directory, bridge_writer(model, blocks))


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"bridge_ops: cannot read {path} (truncated or not a safetensors file): {e}") from None


def _verified_config(directory: str, allow_missing_checksum: bool) -> dict:
    """bridge_config.json, its field types checked, its own sha256 and that of bridge.safetensors verified."""
    path = os.path.join(directory, CONFIG_NAME)
    config = read_json(path)
    check_fields(config, path, **CONFIG_TYPES)
    digests = config.get("sha256", {})
    if not all(isinstance(digest, str) for digest in digests.values()):
        raise ValueError(f"bridge_ops: {path}: sha256 must map file names to sha256 hex digests, got {digests!r}")
    missing = [name for name in BRIDGE_FILES if name not in digests]
    if missing and not allow_missing_checksum:
        raise ValueError(
            f"bridge_ops: {path} records no sha256 of {' and '.join(missing)} (saved by an older bridge_ops, or "
            "edited): the saved Bridge cannot be verified; pass allow_missing_checksum=True to load it anyway"
        )
    if CONFIG_NAME in digests and digests[CONFIG_NAME] != self_digest(config, CONFIG_NAME):
        raise ValueError(
            f"bridge_ops: {path} was edited after it was saved: its fields do not match the sha256 it records of them"
        )
    if WEIGHTS_NAME in digests:
        verify_sha256(os.path.join(directory, WEIGHTS_NAME), digests[WEIGHTS_NAME], path)
    return config


def _read_saved(directory: str, allow_missing_checksum: bool):
    """(config, tensors keyed layers.<i>.<name>) from a save_bridge or a save_pretrained directory."""
    recover(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(weights):
        return _verified_config(directory, allow_missing_checksum), _load_safetensors(weights)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        files = sorted(set(read_json(index_path)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"bridge_ops: no {WEIGHTS_NAME} and no model.safetensors in {directory}")
    tensors = {}
    for name in files:
        for key, tensor in _load_safetensors(os.path.join(directory, name)).items():
            match = _IN_MODEL_KEY.search(key)
            if match:
                tensors[f"layers.{match.group(1)}.{match.group(2)}"] = tensor
    if "layers.0.q_proj.weight" not in tensors:
        raise ValueError(f"bridge_ops: the model saved in {directory} has no Bridge weights (of layer 0 at least)")
    config_path = os.path.join(directory, "config.json")
    model_config = read_json(config_path)
    check_fields(model_config, config_path, bridge=dict, model_type=CONFIG_TYPES["model_type"])
    config = dict(model_config.get("bridge", {}), model_type=model_config.get("model_type"))
    check_fields(config, f"{config_path} (bridge)", **CONFIG_TYPES)
    q = tensors["layers.0.q_proj.weight"]
    config.update(num_layers=len({k.split(".")[1] for k in tensors}), d_bridge=q.shape[0], hidden_size=q.shape[1])
    return config, tensors


def _target_blocks(model: nn.Module, config: dict) -> List[nn.Module]:
    """The blocks the saved weights go to: the model's own, or the ones `apply_bridge` would add (built on the meta
    device, so nothing is allocated or changed)."""
    if is_bridged(model):
        return bridge_blocks(model)
    cfg = BridgeConfig(config["d_bridge"], config.get("num_heads"), config.get("init_std", BridgeConfig.init_std))
    with torch.device("meta"):
        return [new_bridge_block(model, layer, cfg) for layer in decoder_layers(model)]


def _problems(model: nn.Module, config: dict, tensors: Dict[str, torch.Tensor], allow_other_model_type: bool):
    """Everything that keeps the saved Bridge from loading into `model`, as readable strings (none: it fits)."""
    shape = (
        _shape_of(model)
        if is_bridged(model)
        else {"hidden_size": model.config.hidden_size, "num_layers": len(decoder_layers(model))}
    )
    problems = [f"{k} {config[k]} (saved) vs {v} (model)" for k, v in shape.items() if config.get(k, v) != v]
    saved_type, model_type = config.get("model_type"), getattr(model.config, "model_type", None)
    if saved_type is not None and saved_type != model_type and not allow_other_model_type:
        problems.append(
            f"model_type {saved_type!r} (saved) vs {model_type!r} (model); pass "
            "allow_other_model_type=True to load it anyway"
        )
    if type(config.get("d_bridge")) is not int:
        problems.append(f"d_bridge must be an integer, got {config.get('d_bridge')!r}")
    if problems:
        return problems
    expected = {
        f"layers.{i}.{name}": t
        for i, block in enumerate(_target_blocks(model, config))
        for name, t in block.state_dict().items()
    }
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    problems += [f"no tensor {name}" for name in missing] + [f"unexpected tensor {name}" for name in unexpected]
    for name in sorted(expected.keys() & tensors.keys()):
        saved, target = tensors[name], expected[name]
        if saved.shape != target.shape:
            problems.append(f"{name} has shape {list(saved.shape)}, the model needs {list(target.shape)}")
        elif not saved.is_floating_point():
            problems.append(f"{name} is {saved.dtype}, not a floating-point tensor")
        elif not bool(torch.isfinite(saved).all()):
            problems.append(f"{name} holds NaN or infinite values")
    return problems


def load_bridge(
    model: nn.Module, directory: str, *, allow_other_model_type: bool = False, allow_missing_checksum: bool = False
) -> nn.Module:
    """Loads Bridge weights saved by `save_bridge` (or inside a `save_pretrained` directory) into `model`.

    Adds the blocks first (with the saved hyper-parameters) if the model has none. Saved tensors are cast to the
    model's dtype. Raises ValueError, leaving the model exactly as it was, if a file is corrupted or was edited (sha256
    mismatch of the weights or of the config, a field of the wrong type, unreadable), records no sha256 (an older
    save, or a deleted entry: `allow_missing_checksum=True` loads it anyway), or the saved blocks do not fit the model:
    another hidden size, layer count, d_bridge or head count, missing, extra or misshapen tensors, non-finite values,
    or another `model_type` (Bridge weights trained on one architecture; `allow_other_model_type=True` loads them
    anyway).
    """
    config, tensors = _read_saved(directory, allow_missing_checksum)
    problems = _problems(model, config, tensors, allow_other_model_type)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(
            f"bridge_ops: the Bridge weights in {directory} do not fit this model: {'; '.join(problems[:5])}{more}"
        )
    if not is_bridged(model):
        apply_bridge(model, config["d_bridge"], config.get("num_heads"), init_std=config.get("init_std"))
    with torch.no_grad():
        for i, block in enumerate(bridge_blocks(model)):
            for name, tensor in block.state_dict().items():
                tensor.copy_(tensors[f"layers.{i}.{name}"])
    return model
