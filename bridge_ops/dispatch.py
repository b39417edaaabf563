"""Which implementation serves an operator call, and why the others cannot (after xformers' `not_supported_reasons`).

Backends are data. Each declares what it supports per input: the device type it serves, the ops it has kernels for,
the dtypes, and per op a largest head dim; and what the environment must provide (`unavailable_reason`: a sentence
when the compiled extension, a CUDA build, a GPU or cupy is missing). `Backend.not_supported_reasons(inputs)` lists
every reason a backend cannot serve one call (`Inputs`: op, device type, dtype, head dim); `select(inputs)` returns the
first backend with none. The PyTorch reference supports every input (its own checks refuse invalid ones with a
readable error) and is last, so no call is sent to a kernel that would refuse it: a CUDA cascade call with a head dim
over the kernels' limit runs the reference, not a kernel that raises.

Order: CPU tensors go to the C++ kernels of bridge_ops._C; CUDA tensors to the CUDA kernels compiled into _C, else to
the same kernel source compiled at run time by NVRTC through cupy (bridge_ops.cupy_backend, registered as the ops'
CUDA kernels; bridge attention only); then the reference. `python -m bridge_ops.info` prints every backend, what it
supports and why it is unavailable.
"""

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import cupy_backend
from ._loader import _C, LOAD_ERROR, build_info
from .checks import SUPPORTED_DTYPES

BRIDGE_OPS = ("bridge_attention", "bridge_block_decode")
CASCADE_OPS = ("cascade_attention", "merge_attention_states")  # the cascade decode ops
OPS = BRIDGE_OPS + CASCADE_OPS


@dataclass(frozen=True)
class Inputs:
    """What a backend's support depends on in one op call: the op (one of OPS), the device type and dtype of its
    tensors, and its head dim (the last dim of q / o_a; None where no backend limits it, as in bridge_block_decode)."""

    op: str
    device_type: str
    dtype: torch.dtype
    head_dim: Optional[int] = None


@dataclass(frozen=True)
class Backend:
    name: str
    device_type: Optional[str]  # None: any device type
    description: str
    unavailable_reason: Callable[[], Optional[str]]  # why the environment cannot run it (None: it can)
    ops: Tuple[str, ...] = OPS
    dtypes: Optional[Tuple[torch.dtype, ...]] = SUPPORTED_DTYPES  # None: any (the op's own checks refuse the others)
    max_head_dim: Dict[str, int] = field(default_factory=dict)  # op -> largest head dim its kernels take
    compiled: bool = True  # served through torch.ops.bridge_ops (autograd, fake kernels, torch.compile)

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def input_reasons(self, inputs: Inputs) -> List[str]:
        """Why this backend cannot serve these inputs, whatever the environment (empty: it can)."""
        reasons = []
        if self.device_type not in (None, inputs.device_type):
            reasons.append(f"serves {self.device_type} tensors, not {inputs.device_type}")
        if inputs.op not in self.ops:
            reasons.append(f"has no {inputs.op} kernel")
        if self.dtypes is not None and inputs.dtype not in self.dtypes:
            reasons.append(f"has no {inputs.dtype} kernels")
        limit = self.max_head_dim.get(inputs.op)
        if limit is not None and inputs.head_dim is not None and inputs.head_dim > limit:
            reasons.append(f"its {inputs.op} kernels take head_dim <= {limit}, got {inputs.head_dim}")
        return reasons

    def not_supported_reasons(self, inputs: Inputs) -> List[str]:
        """Every reason this backend cannot serve this call here: the inputs', then the environment's."""
        environment = self.unavailable_reason()
        return self.input_reasons(inputs) + ([environment] if environment is not None else [])

    def support(self) -> str:
        """What it serves, in one line (for `python -m bridge_ops.info`)."""
        devices = "any device" if self.device_type is None else f"{self.device_type} tensors"
        dtypes = "any dtype" if self.dtypes is None else "/".join(str(d).removeprefix("torch.") for d in self.dtypes)
        limits = "".join(f"; {op}: head_dim <= {n}" for op, n in self.max_head_dim.items())
        return f"{devices}, {dtypes}; {', '.join(self.ops)}{limits}"


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


def _cuda_cascade_limits() -> Dict[str, int]:
    """The CUDA cascade kernels' head dim limit (a warp of lanes, each holding at most cascade_max_td dims), as the C++
    launch header defines it (empty without _C: the backend is unavailable then anyway)."""
    if _C is None:
        return {}
    constants = _C.kernels.constants()
    return dict.fromkeys(CASCADE_OPS, constants["warp_size"] * constants["cascade_max_td"])


BACKENDS: List[Backend] = [
    Backend("cpu", "cpu", "fused C++ kernels (bridge_ops._C, at::parallel_for, AVX2 when present)", _cpu_reason),
    Backend(
        "cuda",
        "cuda",
        "fused CUDA kernels compiled into bridge_ops._C",
        _cuda_reason,
        max_head_dim=_cuda_cascade_limits(),
    ),
    Backend(
        "cupy",
        "cuda",
        "the same CUDA kernel source compiled at run time by NVRTC through cupy (bridge attention only)",
        _cupy_reason,
        ops=BRIDGE_OPS,
    ),
    Backend("reference", None, "plain PyTorch (bridge_ops.reference)", lambda: None, dtypes=None, compiled=False),
]


def available_backends() -> Tuple[Backend, ...]:
    """The backends this environment can run, in dispatch order (the environment's reasons read once)."""
    return tuple(b for b in BACKENDS if b.available)


def select(inputs: Inputs, backends: Optional[Sequence[Backend]] = None) -> Backend:
    """The first of `backends` (default: every available one) that supports `inputs`; the reference supports all."""
    candidates = available_backends() if backends is None else backends
    return next(b for b in candidates if not b.input_reasons(inputs))


def backend_for(device_type: str, op: str = "bridge_attention") -> Backend:
    """The backend that serves `op` on tensors of this device type (float32, any head dim its kernels take)."""
    return select(Inputs(op, device_type, torch.float32))


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
