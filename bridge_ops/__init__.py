"""bridge_ops: fused kernels and PyTorch ops for Bridge, interdependent parallel generation (arXiv 2510.01143)."""

from . import reference
from .aggregation import best_of_n, majority_vote
from .block import BridgeBlock
from .generation import GenerationOutput, SamplingConfig, generate
from .hf import apply_bridge, bridge_parameters, groups, load_bridge, parameter_share, remove_bridge, save_bridge
from .layout import cu_group_lens_from_ids, cu_group_lens_from_sizes, cu_group_lens_from_width, group_sizes
from .ops import bridge_attention, bridge_block_decode, cascade_attention, merge_attention_states
from .ops import prefix_suffix_attention as prefix_suffix_attention  # deprecated alias of cascade_attention
from .version import __version__

__all__ = [
    "BridgeBlock",
    "GenerationOutput",
    "GroupPrefixCache",
    "SamplingConfig",
    "apply_bridge",
    "best_of_n",
    "bridge_attention",
    "bridge_block_decode",
    "bridge_parameters",
    "cascade_attention",
    "cu_group_lens_from_ids",
    "cu_group_lens_from_sizes",
    "cu_group_lens_from_width",
    "generate",
    "group_sizes",
    "groups",
    "load_bridge",
    "majority_vote",
    "merge_attention_states",
    "parameter_share",
    "reference",
    "remove_bridge",
    "save_bridge",
    "__version__",
]


def __getattr__(name):
    if name == "GroupPrefixCache":  # imports transformers, an optional dependency: only on use
        from .cache import GroupPrefixCache

        return GroupPrefixCache
    raise AttributeError(f"module 'bridge_ops' has no attribute {name!r}")
