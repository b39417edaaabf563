"""GPU backend without a CUDA build: the kernels of csrc/cuda/kernels/bridge_attention.cuh compiled at run time.

When bridge_ops._C was built without CUDA kernels (a CPU wheel, a CPU-only torch at build time) but torch sees a GPU
and cupy is installed (`pip install "bridge_ops[cupy]"`: cupy-cuda13x for CUDA 13, cupy-cuda12x for CUDA 12), this
module compiles the SAME kernel source that nvcc compiles into _C, with NVRTC through `cupy.RawModule`, and registers
the ops' C++ hosts with it as the CUDA kernels of `torch.ops.bridge_ops.bridge_attention` / `bridge_attention_backward`
(so the C++ autograd, the fake kernels and torch.compile work unchanged).

This module only compiles and launches a kernel by name (`CupyLauncher`). Everything else about a call (argument
checks, cu_group_lens validation, launch plan, params struct, casts) is the C++ host a CUDA build runs (csrc/host/,
bound as bridge_ops._C.kernels.bridge_attention etc., csrc/kernel_launch.cpp), and the kernel names are its table
(`_C.kernels.kernel_table()`). The tests run the same hosts on the CPU with a warp-emulator launcher
(python_tests/emulator_launcher.py). Every launch goes to torch's current stream.
"""

import functools
import importlib.util
import os
import re
from typing import Dict, List, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_FILE = "bridge_attention.cuh"
# Installed wheels carry the headers in bridge_ops/_kernels (setup.py copies them); a source checkout has them in csrc.
_SEARCH = [os.path.join(_HERE, "_kernels"), os.path.join(_HERE, os.pardir, "csrc", "cuda", "kernels")]
_LOCAL_INCLUDE = re.compile(r'^#include "([^"/]+)"\s*$', re.M)


def kernel_source_path() -> Optional[str]:
    for folder in _SEARCH:
        path = os.path.normpath(os.path.join(folder, KERNEL_FILE))
        if os.path.isfile(path):
            return path
    return None


@functools.cache
def kernel_source() -> str:
    """The kernel header as the one self-contained source NVRTC compiles: each `#include "x.h"` of a header beside it
    (launch.h) is replaced by that header's text, so cupy's cache of compiled kernels, keyed by the source text, sees
    a change to any of them."""
    path = kernel_source_path()
    if path is None:
        raise FileNotFoundError(f"bridge_ops: {KERNEL_FILE} not found in {_SEARCH}")
    folder = os.path.dirname(path)

    def inline(match: "re.Match[str]") -> str:
        included = os.path.join(folder, match.group(1))
        if not os.path.isfile(included):
            return match.group(0)
        with open(included) as f:
            return f.read().replace("#pragma once\n", "")

    with open(path) as f:
        return _LOCAL_INCLUDE.sub(inline, f.read())


def kernels():
    """`bridge_ops._C.kernels`: the C++ hosts, the kernel table and the launch plans (csrc/kernel_launch.cpp)."""
    from ._loader import _C, LOAD_ERROR

    if _C is None:
        raise RuntimeError(f"bridge_ops: the cupy backend needs bridge_ops._C, which is not loaded ({LOAD_ERROR})")
    return _C.kernels


def kernel_dtypes() -> Dict[str, str]:
    """Every kernel of KERNEL_FILE a host may launch (the C++ kernel table, `_C.kernels.kernel_table()`): its name,
    the NVRTC name expression, and the dtype it serves as torch spells it ("bfloat16")."""
    return {kernel: dtype for kernel, dtype, source in kernels().kernel_table() if source == KERNEL_FILE}


def all_kernel_names(dtype: torch.dtype) -> List[str]:
    """Every kernel a call with this dtype may launch (what NVRTC compiles for it)."""
    name = str(dtype).removeprefix("torch.")
    return [kernel for kernel, d in kernel_dtypes().items() if d == name]


def instantiation_source() -> str:
    """A translation unit that includes the kernel header and instantiates every kernel cupy may request, for
    `nvcc --ptx` in CI (which compiles nothing from the bare header, all of it being templates)."""
    lines = [f'#include "{KERNEL_FILE}"', "void* bridge_ops_cupy_kernels[] = {"]
    lines += [f"  (void*)&{name}," for name in kernel_dtypes()]
    return "\n".join(lines + ["};", ""])


# ---------------------------------------------------------------------------------------------------------------
# The cupy launcher and the registration as torch's CUDA kernels
# ---------------------------------------------------------------------------------------------------------------

NVRTC_OPTIONS = ("--std=c++17", "-DBRIDGE_OPS_NVRTC") + tuple(os.environ.get("BRIDGE_OPS_NVRTC_FLAGS", "").split())


class CupyLauncher:
    """The launcher of the C++ hosts for cupy (the protocol of csrc/kernel_launch.cpp): compiles the kernel header with
    NVRTC (one cupy.RawModule per dtype, on first use; cupy caches the binaries on disk) and launches a kernel by name
    on torch's current stream."""

    name = "cupy"
    device_type = "cuda"

    def __init__(self):
        import cupy  # noqa: F401  (fails here, not at bridge_ops import, when cupy is broken)

        self._cupy = cupy
        self._modules = {}
        self._dtypes = kernel_dtypes()

    def _function(self, kernel: str):
        dtype = self._dtypes[kernel]
        module = self._modules.get(dtype)
        if module is None:
            names = [k for k, d in self._dtypes.items() if d == dtype]
            module = self._cupy.RawModule(code=kernel_source(), options=NVRTC_OPTIONS, name_expressions=names)
            self._modules[dtype] = module
        return module.get_function(kernel)

    @functools.cache  # noqa: B019 (one launcher per process, kept for its lifetime)
    def num_sms(self, device: int) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def capturing(self, device: int) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def launch(self, kernel: str, grid, params: bytes) -> None:
        """Launches `kernel` over `grid` (a _C.kernels.Grid) on the current device and stream, with the params struct
        `params` as its one argument, passed by value (a size-one numpy array of the struct's bytes)."""
        import numpy as np

        function = self._function(kernel)
        arg = np.frombuffer(params, dtype=np.dtype((np.void, len(params))))
        device = torch.cuda.current_device()
        with self._cupy.cuda.Device(device), self._cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            function((grid.blocks,), (grid.threads,), (arg,), shared_mem=grid.smem_bytes)


_LIBRARY = None
REGISTRATION_ERROR: Optional[str] = None  # set by dispatch.register_gpu_backend when registration fails


@functools.cache
def launcher() -> CupyLauncher:
    return CupyLauncher()


def _cuda_forward(q, k, v, cu_group_lens, key_mask=None, scale=None):
    return kernels().bridge_attention(launcher(), q, k, v, cu_group_lens, key_mask, scale)


def _cuda_backward(grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask=None, scale=None):
    return kernels().bridge_attention_backward(
        launcher(), grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask, scale
    )


def register() -> None:
    """Registers the cupy kernels as the CUDA kernels of the bridge_ops ops (idempotent)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    lib = torch.library.Library("bridge_ops", "IMPL")
    lib.impl("bridge_attention", _cuda_forward, "CUDA")
    lib.impl("bridge_attention_backward", _cuda_backward, "CUDA")
    _LIBRARY = lib


def unavailable_reason() -> Optional[str]:
    """Why this backend cannot serve CUDA tensors here (None: it can). Imports cupy only on a machine with a GPU."""
    if os.environ.get("BRIDGE_OPS_DISABLE_CUPY", "0").lower() in ("1", "true", "yes", "on"):
        return "disabled by BRIDGE_OPS_DISABLE_CUPY=1"
    if REGISTRATION_ERROR is not None:
        return REGISTRATION_ERROR
    if kernel_source_path() is None:
        return f"the kernel source {KERNEL_FILE} is not installed with the package"
    if importlib.util.find_spec("cupy") is None:
        return (
            "cupy is not installed (pip install 'bridge_ops[cupy]': cupy-cuda13x for CUDA 13, cupy-cuda12x for CUDA 12)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return _cupy_import_error()


@functools.cache
def _cupy_import_error() -> Optional[str]:
    try:
        import cupy

        if not cupy.cuda.is_available():
            return "cupy is installed but sees no CUDA device"
    except Exception as error:  # a broken or mismatched cupy wheel
        return f"cupy cannot be imported ({type(error).__name__}: {error})"
    return None


def main() -> int:
    """`python -m bridge_ops.cupy_backend --emit-instantiations`: print the translation unit CI compiles with nvcc."""
    import sys

    if sys.argv[1:] == ["--emit-instantiations"]:
        sys.stdout.write(instantiation_source())
        return 0
    if sys.argv[1:] == ["--nvrtc-check"]:  # compile with NVRTC (no GPU needed) for the given arch
        return nvrtc_check()
    print(__doc__)
    return 2


def nvrtc_check(arch: str = "90") -> int:
    """Compiles every kernel instantiation with NVRTC (cupy's bindings), for sm_<arch>; needs no GPU (CI)."""
    from cupy_backends.cuda.libs import nvrtc

    names = list(kernel_dtypes())
    prog = nvrtc.createProgram(kernel_source(), KERNEL_FILE, (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, list(NVRTC_OPTIONS) + [f"--gpu-architecture=sm_{arch}"])
        except Exception:
            print(nvrtc.getProgramLog(prog))
            raise
        lowered = [nvrtc.getLoweredName(prog, name) for name in names]
        print(f"NVRTC {nvrtc.getVersion()} compiled {len(lowered)} kernels of {KERNEL_FILE} for sm_{arch}")
    finally:
        nvrtc.destroyProgram(prog)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
