"""Bridge for HuggingFace transformers models: patch a loaded instance, tell it the groups, save and load."""

from .patch import apply_bridge, bridge_blocks, bridge_parameters, decoder_layers, is_bridged, parameter_share, remove_bridge
from .runtime import BridgeGroups, groups
from .weights import load_bridge, save_bridge

__all__ = [
    "BridgeGroups",
    "apply_bridge",
    "bridge_blocks",
    "bridge_parameters",
    "decoder_layers",
    "groups",
    "is_bridged",
    "load_bridge",
    "parameter_share",
    "remove_bridge",
    "save_bridge",
]
