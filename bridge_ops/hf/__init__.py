"""Bridge for HuggingFace transformers models: patch a loaded instance, tell it the groups, save and load."""

from .gguf import gguf_checkpoint, load_gguf, smollm2_gguf
from .patch import (
    BLOCK_NAME,
    SUPPORTED_MODEL_TYPES,
    add_residual_blocks,
    apply_bridge,
    bridge_blocks,
    bridge_parameters,
    decoder_layers,
    has_residual_blocks,
    is_bridged,
    parameter_share,
    remove_bridge,
    remove_residual_blocks,
    residual_norm,
)
from .runtime import BridgeGroups, groups
from .weights import (
    BRIDGE_FILES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    base_state_dict,
    bridge_writer,
    has_saved_bridge,
    load_bridge,
    save_bridge,
)

__all__ = [
    "BLOCK_NAME",
    "BRIDGE_FILES",
    "CONFIG_NAME",
    "SUPPORTED_MODEL_TYPES",
    "WEIGHTS_NAME",
    "BridgeGroups",
    "add_residual_blocks",
    "apply_bridge",
    "base_state_dict",
    "bridge_blocks",
    "bridge_parameters",
    "bridge_writer",
    "decoder_layers",
    "groups",
    "gguf_checkpoint",
    "has_residual_blocks",
    "has_saved_bridge",
    "is_bridged",
    "load_bridge",
    "load_gguf",
    "parameter_share",
    "remove_bridge",
    "remove_residual_blocks",
    "residual_norm",
    "save_bridge",
    "smollm2_gguf",
]
