"""Which implementation serves an operator call, and why the others cannot.

Backends are data (xformers style): each says which device type it serves and, when it cannot serve, a
sentence saying why. An op call on a tensor of device type D runs the first available backend for D;
the PyTorch reference serves every device type and is always last.

CUDA tensors: the CUDA kernels compiled into bridge_ops._C first; else the same kernel source compiled at run time
by NVRTC through cupy (bridge_ops.cupy_backend), registered as the ops' CUDA kernels; else the reference. The cupy
backend serves bridge attention only: under it, the cascade decode ops (prefix_suffix_attention,
merge_attention_states) run the PyTorch reference.
"""

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from . import cupy_backend
from ._loader import LOAD_ERROR, build_info


@dataclass(frozen=True)
class Backend:
    name: str
    device_type: Optional[str]  # None: any device type
    description: str
    unavailable_reason: Callable[[], Optional[str]]
    compiled: bool = False  # served through torch.ops.bridge_ops (autograd, fake kernels, torch.compile)
    cascade: bool = True  # also serves the cascade decode ops (prefix_suffix_attention, merge_attention_states)

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None


def _cpu_reason() -> Optional[str]:
    if LOAD_ERROR is not None:
        return f"the compiled extension bridge_ops._C is not loaded ({LOAD_ERROR})"
    return None


def _forced_gpu_backend() -> str:
    """BRIDGE_OPS_GPU_BACKEND=cupy makes the cupy backend serve CUDA tensors even when _C has CUDA kernels (to test
    or compare it on a GPU machine with a CUDA build); =cuda or unset: the normal order."""
    return os.environ.get("BRIDGE_OPS_GPU_BACKEND", "").strip().lower()


def _cuda_reason() -> Optional[str]:
    if _forced_gpu_backend() == "cupy":
        return "BRIDGE_OPS_GPU_BACKEND=cupy selects the cupy backend"
    if LOAD_ERROR is not None:
        return f"the compiled extension bridge_ops._C is not loaded ({LOAD_ERROR})"
    if "cuda" not in build_info().get("backends", []):
        return (
            "this build of bridge_ops._C has no CUDA kernels (built without CUDA, or with BRIDGE_OPS_SKIP_CUDA_BUILD=1)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def _cupy_reason() -> Optional[str]:
    if LOAD_ERROR is not None:
        return f"needs bridge_ops._C for the op schemas and autograd, which is not loaded ({LOAD_ERROR})"
    if "cuda" in build_info().get("backends", []) and _forced_gpu_backend() != "cupy":
        return "bridge_ops._C has compiled CUDA kernels, which serve CUDA tensors instead"
    return cupy_backend.unavailable_reason()


BACKENDS: List[Backend] = [
    Backend("cpu", "cpu", "fused C++ kernels (bridge_ops._C, at::parallel_for, AVX2 when present)", _cpu_reason, True),
    Backend("cuda", "cuda", "fused CUDA kernels compiled into bridge_ops._C", _cuda_reason, True),
    Backend(
        "cupy",
        "cuda",
        "the same CUDA kernel source compiled at run time by NVRTC through cupy (bridge attention only; the cascade "
        "decode ops fall back to the reference)",
        _cupy_reason,
        compiled=True,
        cascade=False,
    ),
    Backend("reference", None, "plain PyTorch (bridge_ops.reference)", lambda: None),
]


def compiled_device_types(cascade: bool = False) -> frozenset:
    """Device types whose calls go to the torch.ops.bridge_ops kernels (compiled into _C or registered by cupy); with
    `cascade`, of the cascade decode ops (prefix_suffix_attention, merge_attention_states)."""
    return frozenset(b.device_type for b in BACKENDS if b.compiled and b.available and (b.cascade or not cascade))


def backend_for(device_type: str, cascade: bool = False) -> Backend:
    """The backend that serves tensors of this device type (with `cascade`: in the cascade decode ops)."""
    return next(
        b for b in BACKENDS if b.device_type in (device_type, None) and b.available and (b.cascade or not cascade)
    )


def gpu_backend_summary() -> str:
    """One line: which backend serves CUDA tensors, and why each GPU backend ahead of it does not."""
    if not torch.cuda.is_available():
        return "GPU backend: none (no CUDA device is visible to torch)"
    active = backend_for("cuda")
    skipped = [f"{b.name}: {b.unavailable_reason()}" for b in BACKENDS if b.device_type == "cuda" and not b.available]
    why = f" ({'; '.join(skipped)})" if skipped else ""
    return f"GPU backend: {active.name}{why}"


def register_gpu_backend() -> None:
    """Registers the cupy kernels as the CUDA kernels of the ops when cupy is the backend that serves CUDA (over
    _C's own CUDA kernels when BRIDGE_OPS_GPU_BACKEND=cupy forces it; torch then warns that it overrides them)."""
    try:
        if torch.cuda.is_available() and backend_for("cuda").name == "cupy":
            cupy_backend.register()
    except Exception as error:  # importing bridge_ops must never fail; CUDA tensors then use the reference
        import warnings

        cupy_backend.REGISTRATION_ERROR = f"registering its kernels failed ({type(error).__name__}: {error})"
        warnings.warn(
            f"bridge_ops: could not register the cupy CUDA kernels ({type(error).__name__}: {error})",
            RuntimeWarning,
            stacklevel=2,
        )
