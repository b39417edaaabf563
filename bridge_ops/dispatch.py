"""Which implementation serves an operator call, and why the others cannot.

Backends are data (xformers style): each says which device type it serves and, when it cannot serve, a
sentence saying why. An op call on a tensor of device type D runs the first available backend for D;
the PyTorch reference serves every device type and is always last.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ._loader import LOAD_ERROR, build_info


@dataclass(frozen=True)
class Backend:
    name: str
    device_type: Optional[str]  # None: any device type
    description: str
    unavailable_reason: Callable[[], Optional[str]]

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None


def _cpu_reason() -> Optional[str]:
    if LOAD_ERROR is not None:
        return f"the compiled extension bridge_ops._C is not loaded ({LOAD_ERROR})"
    return None


def _cuda_reason() -> Optional[str]:
    if LOAD_ERROR is not None:
        return f"the compiled extension bridge_ops._C is not loaded ({LOAD_ERROR})"
    if "cuda" not in build_info().get("backends", []):
        return "this build of bridge_ops._C has no CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


BACKENDS: List[Backend] = [
    Backend("cpu", "cpu", "fused C++ kernels (bridge_ops._C, at::parallel_for, AVX2 when present)", _cpu_reason),
    Backend("cuda", "cuda", "fused CUDA kernels (bridge_ops._C)", _cuda_reason),
    Backend("reference", None, "plain PyTorch (bridge_ops.reference)", lambda: None),
]


def compiled_device_types() -> frozenset:
    """Device types whose calls go to torch.ops.bridge_ops kernels compiled into _C."""
    return frozenset(b.device_type for b in BACKENDS if b.name in ("cpu", "cuda") and b.available)


def backend_for(device_type: str) -> Backend:
    """The backend that serves tensors of this device type."""
    return next(b for b in BACKENDS if b.device_type in (device_type, None) and b.available)
