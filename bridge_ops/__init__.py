"""bridge_ops: fused kernels and PyTorch ops for Bridge, interdependent parallel generation (arXiv 2510.01143)."""

from . import reference
from .block import BridgeBlock
from .groups import cu_group_lens_from_ids, cu_group_lens_from_sizes, cu_group_lens_from_width, group_sizes
from .ops import bridge_attention
from .version import __version__

__all__ = [
    "BridgeBlock",
    "bridge_attention",
    "cu_group_lens_from_ids",
    "cu_group_lens_from_sizes",
    "cu_group_lens_from_width",
    "group_sizes",
    "reference",
    "__version__",
]
