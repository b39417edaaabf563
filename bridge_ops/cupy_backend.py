"""GPU backend without a CUDA build: the kernels of csrc/cuda/kernels/bridge_attention.cuh compiled at run time.

When bridge_ops._C was built without CUDA kernels (a CPU wheel, a CPU-only torch at build time) but torch sees a GPU
and cupy is installed (`pip install "bridge_ops[cupy]"`: cupy-cuda13x for CUDA 13, cupy-cuda12x for CUDA 12), this
module compiles the SAME kernel source that nvcc compiles into _C, with NVRTC through `cupy.RawModule`, and registers
it as the CUDA kernel of `torch.ops.bridge_ops.bridge_attention` / `bridge_attention_backward` (so the C++ autograd,
the fake kernels and torch.compile work unchanged). Every launch goes to torch's current stream.

The host code (argument checks, cu_group_lens validation, launch plan, parameter struct, casts) follows the C++
launcher csrc/cuda/bridge_attention_cuda.cu step by step against a small `launcher` interface. It re-derives nothing
about a launch: the plan, the constants and the kernels' parameter structs are those of csrc/cuda/kernels/launch.h,
read through bridge_ops._C.kernels (`kernels()`), and cu_group_lens is validated by the C++ cache the CUDA launchers
use (the op `_validated_max_group`). The tests also run this module end to end on the CPU with python_tests/emulator
as the launcher, so the kernels and this host code are exercised in CI although CI has no GPU.
"""

import functools
import importlib.util
import os
import re
from typing import List, Optional, Tuple

import torch

from . import checks

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
    """`bridge_ops._C.kernels`: the launch plan, constants and parameter structs of csrc/cuda/kernels/launch.h."""
    from ._loader import _C, LOAD_ERROR

    if _C is None:
        raise RuntimeError(f"bridge_ops: the cupy backend needs bridge_ops._C, which is not loaded ({LOAD_ERROR})")
    return _C.kernels


def constants() -> dict:
    """The kernels' constants (launch.h), by name."""
    return kernels().constants()


def plan_launch(is_double: bool, dim: int, tasks: int, num_sms: int, backward: bool, max_group: int):
    """launch.h's plan_launch: the kernel (fast<T, td> or simple), grid, block, shared memory and workspace of a call
    with tasks = S * G * H; max_group is -1 when unknown."""
    return kernels().plan_launch(is_double, dim, tasks, num_sms, backward, max_group)


C_TYPES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.bfloat16: "bridge_ops::kernels::bf16_t",
    torch.float16: "bridge_ops::kernels::half_t",
}


def kernel_name(kind: str, dtype: torch.dtype, plan) -> str:
    """The C++ name of a kernel instantiation (the NVRTC name expression), e.g.
    `bridge_ops::kernels::bridge_attention_fwd<float, 4>`; kind is "fwd" or "bwd"."""
    if plan.fast:
        return f"bridge_ops::kernels::bridge_attention_{kind}<{C_TYPES[dtype]}, {plan.td}>"
    acc = "double" if dtype == torch.float64 else "float"
    return f"bridge_ops::kernels::bridge_attention_{kind}_simple<{C_TYPES[dtype]}, {acc}>"


def all_kernel_names(dtype: torch.dtype) -> List[str]:
    """Every kernel a call with this dtype may launch (what NVRTC compiles for it)."""
    k = kernels()
    names = []
    if dtype != torch.float64:
        for td in k.constants()["td_values"]:
            plan = k.LaunchPlan(True, td, 0, 0, 0, False)
            names += [kernel_name("fwd", dtype, plan), kernel_name("bwd", dtype, plan)]
    simple = k.LaunchPlan(False, 0, 0, 0, 0, False)
    return names + [kernel_name("fwd", dtype, simple), kernel_name("bwd", dtype, simple)]


def instantiation_source() -> str:
    """A translation unit that includes the kernel header and instantiates every kernel cupy may request, for
    `nvcc --ptx` in CI (which compiles nothing from the bare header, all of it being templates)."""
    lines = [f'#include "{KERNEL_FILE}"', "void* bridge_ops_cupy_kernels[] = {"]
    for dtype in C_TYPES:
        lines += [f"  (void*)&{name}," for name in all_kernel_names(dtype)]
    return "\n".join(lines + ["};", ""])


def validated_max_group(cu_group_lens: torch.Tensor, batch: int) -> int:
    """Largest group of cu_group_lens, validated like the CPU op (ValueError naming the problem).

    Reading the offsets costs a device-to-host copy (a sync), so the result is cached per tensor and version counter
    (csrc/group_validation.h, the cache of the CUDA launchers, through the op `_validated_max_group`): a tensor reused
    across calls (a decode loop) is read once. During CUDA graph capture nothing is read (-1: unknown); the kernels
    clamp every offset, so bad offsets can never make them access memory out of bounds.
    """
    if cu_group_lens.is_cuda and torch.cuda.is_current_stream_capturing():
        return -1
    return torch.ops.bridge_ops._validated_max_group(cu_group_lens, batch)


# ---------------------------------------------------------------------------------------------------------------
# Host code of the two ops (csrc/cuda/bridge_attention_cuda.cu), against a launcher
# ---------------------------------------------------------------------------------------------------------------


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def rows_arg(t: torch.Tensor):
    """launch.h's RowsArg of a [B, S, H, Dh] tensor with a unit last stride."""
    return kernels().RowsArg(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def problem(q: torch.Tensor, cu: torch.Tensor, key_mask: Optional[torch.Tensor], scale: float):
    """launch.h's Problem of a call (`cu`: contiguous offsets; Problem.aligned is set per path by the caller)."""
    p = kernels().Problem()
    p.batch, p.seqlen, p.heads, p.dim = q.shape
    p.groups = cu.numel() - 1
    p.cu, p.mask = cu.data_ptr(), _address(key_mask)
    if key_mask is not None:
        p.mask_sb, p.mask_ss = key_mask.stride(0), key_mask.stride(1)
    p.scale = scale
    return p


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_rows(q: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)


def forward(launcher, q, k, v, cu_group_lens, key_mask=None, scale=None) -> Tuple[torch.Tensor, torch.Tensor]:
    checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
    batch, seqlen, heads, dim = q.shape
    max_group = validated_max_group(cu_group_lens, batch)
    scale = checks.resolve_scale(scale, dim)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    cu = cu_group_lens.contiguous()
    tasks = seqlen * (cu.numel() - 1) * heads
    plan = plan_launch(q.dtype == torch.float64, dim, tasks, launcher.num_sms(q.device), False, max_group)
    out = _empty_rows(q)
    lse = torch.empty(batch, seqlen, heads, dtype=checks.lse_dtype(q.dtype), device=q.device)
    if plan.blocks == 0:  # S = 0: nothing to compute (an empty grid is a launch error)
        return out, lse
    # The simple kernels write accumulation-type outputs (float32 for the 16-bit types, cast below).
    out_acc = out if plan.fast or q.dtype == torch.float64 else _empty_rows(q, torch.float32)
    params = kernels().ForwardParams()
    params.problem = problem(q, cu, key_mask, scale)
    params.q, params.k, params.v, params.out = (rows_arg(t) for t in (q, k, v, out_acc))
    params.lse = lse.data_ptr()
    if plan.fast:
        params.problem.aligned = params.rows_aligned(q.element_size())
    launcher.launch(kernel_name("fwd", q.dtype, plan), plan, params, q.device)
    if out_acc is not out:
        out.copy_(out_acc)
    return out, lse


def backward(launcher, grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask=None, scale=None):
    checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
    checks.check_attention_backward_args(grad_out, grad_lse, q, lse)
    batch, seqlen, heads, dim = q.shape
    max_group = validated_max_group(cu_group_lens, batch)
    scale = checks.resolve_scale(scale, dim)
    stat = checks.lse_dtype(q.dtype)
    grad_out, q, k, v = (_unit_last_stride(t) for t in (grad_out, q, k, v))
    lse = lse.to(stat).contiguous()
    grad_lse = None if grad_lse is None else grad_lse.to(stat).contiguous()
    cu = cu_group_lens.contiguous()
    tasks = seqlen * (cu.numel() - 1) * heads
    plan = plan_launch(q.dtype == torch.float64, dim, tasks, launcher.num_sms(q.device), True, max_group)
    if plan.blocks == 0:  # S = 0
        return tuple(_empty_rows(q) for _ in range(3))
    grads = [_empty_rows(q, q.dtype if plan.fast else stat) for _ in range(3)]  # simple kernels: accumulation type
    ws = torch.empty(batch * seqlen * heads * 2, dtype=torch.float32, device=q.device) if plan.workspace else None
    params = kernels().BackwardParams()
    params.problem = problem(q, cu, key_mask, scale)
    params.dout, params.q, params.k, params.v = (rows_arg(t) for t in (grad_out, q, k, v))
    params.dq, params.dk, params.dv = (rows_arg(g) for g in grads)
    params.lse, params.dlse, params.ws = (_address(t) for t in (lse, grad_lse, ws))
    if plan.fast:
        params.problem.aligned = params.rows_aligned(q.element_size())
    launcher.launch(kernel_name("bwd", q.dtype, plan), plan, params, q.device)
    return tuple(g if g.dtype == q.dtype else g.to(q.dtype) for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# The cupy launcher and the registration as torch's CUDA kernels
# ---------------------------------------------------------------------------------------------------------------

NVRTC_OPTIONS = ("--std=c++17", "-DBRIDGE_OPS_NVRTC") + tuple(os.environ.get("BRIDGE_OPS_NVRTC_FLAGS", "").split())


class CupyLauncher:
    """Compiles the kernel header with NVRTC (one cupy.RawModule per dtype, on first use; cupy caches the binaries
    on disk) and launches on torch's current stream."""

    def __init__(self):
        import cupy  # noqa: F401  (fails here, not at bridge_ops import, when cupy is broken)

        self._cupy = cupy
        self._modules = {}

    def _function(self, name: str):
        dtype = next(d for d, c in C_TYPES.items() if f"<{c}," in name)
        module = self._modules.get(dtype)
        if module is None:
            module = self._cupy.RawModule(
                code=kernel_source(), options=NVRTC_OPTIONS, name_expressions=all_kernel_names(dtype)
            )
            self._modules[dtype] = module
        return module.get_function(name)

    @functools.cache  # noqa: B019 (one launcher per process, kept for its lifetime)
    def num_sms(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def launch(self, name: str, plan, params, device: torch.device) -> None:
        """Launches kernel `name` as `plan` says, with `params` (a ForwardParams / BackwardParams of _C.kernels) as
        its one argument, passed by value (a size-one numpy array of the struct's bytes)."""
        import numpy as np

        kernel = self._function(name)
        data = params.to_bytes()
        arg = np.frombuffer(data, dtype=np.dtype((np.void, len(data))))
        stream = torch.cuda.current_stream(device)
        with self._cupy.cuda.Device(device.index), self._cupy.cuda.ExternalStream(stream.cuda_stream):
            kernel((plan.blocks,), (plan.threads,), (arg,), shared_mem=plan.smem_bytes)


_LIBRARY = None
REGISTRATION_ERROR: Optional[str] = None  # set by dispatch.register_gpu_backend when registration fails


@functools.cache
def launcher() -> CupyLauncher:
    return CupyLauncher()


def _cuda_forward(q, k, v, cu_group_lens, key_mask=None, scale=None):
    return forward(launcher(), q, k, v, cu_group_lens, key_mask, scale)


def _cuda_backward(grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask=None, scale=None):
    return backward(launcher(), grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask, scale)


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

    names = [name for dtype in C_TYPES for name in all_kernel_names(dtype)]
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
