"""GPU backend without a CUDA build: the kernels of csrc/cuda/kernels/bridge_attention.cuh compiled at run time.

When bridge_ops._C was built without CUDA kernels (a CPU wheel, a CPU-only torch at build time) but torch sees a GPU
and cupy is installed (`pip install "bridge_ops[cupy]"`: cupy-cuda13x for CUDA 13, cupy-cuda12x for CUDA 12), this
module compiles the SAME kernel source that nvcc compiles into _C, with NVRTC through `cupy.RawModule`, and registers
it as the CUDA kernel of `torch.ops.bridge_ops.bridge_attention` / `bridge_attention_backward` (so the C++ autograd,
the fake kernels and torch.compile work unchanged). Tensors reach the kernels zero-copy through DLPack, and every
launch goes to torch's current stream.

The host logic (argument checks, the one-time validation of cu_group_lens, the launch plan, alignment, workspace,
casts) is written once here against a small `launcher` interface; it mirrors csrc/cuda/bridge_attention_cuda.cu,
and `plan_launch` mirrors `plan_launch` of the kernel header (a test compares the two). The tests also run this
module end to end on the CPU with python_tests/emulator as the launcher, so the kernels and this host code are
exercised in CI although CI has no GPU.
"""

import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import checks

_HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_FILE = "bridge_attention.cuh"
# Installed wheels carry the header in bridge_ops/_kernels (setup.py copies it); a source checkout has it in csrc.
_SEARCH = [os.path.join(_HERE, "_kernels"), os.path.join(_HERE, os.pardir, "csrc", "cuda", "kernels")]


def kernel_source_path() -> Optional[str]:
    for folder in _SEARCH:
        path = os.path.normpath(os.path.join(folder, KERNEL_FILE))
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def kernel_source() -> str:
    path = kernel_source_path()
    if path is None:
        raise FileNotFoundError(f"bridge_ops: {KERNEL_FILE} not found in {_SEARCH}")
    with open(path) as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def constants() -> dict:
    """The `#define BRIDGE_*` integer constants of the kernel header (one source of truth for both hosts)."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define (BRIDGE_\w+) (\d+)", kernel_source(), re.M)}


# ---------------------------------------------------------------------------------------------------------------
# Launch plan (mirror of plan_launch / *_smem_bytes_per_warp in the kernel header)
# ---------------------------------------------------------------------------------------------------------------


def forward_smem_bytes_per_warp(td: int) -> int:
    return 2 * constants()["BRIDGE_KEY_TILE"] * 32 * td * 4


def backward_smem_bytes_per_warp(td: int) -> int:
    kb = constants()["BRIDGE_KEY_TILE"]
    return (4 * kb * 32 * td + 2 * kb * kb) * 4


@dataclass(frozen=True)
class LaunchPlan:
    fast: bool
    td: int
    threads: int
    blocks: int
    smem_bytes: int
    workspace: bool


def plan_launch(is_double: bool, dim: int, tasks: int, num_sms: int, backward: bool, max_group: int) -> LaunchPlan:
    c = constants()
    if not is_double and dim <= 32 * c["BRIDGE_MAX_TD"]:
        td = 1 if dim <= 32 else 2 if dim <= 64 else 4 if dim <= 128 else 8
        per_warp = backward_smem_bytes_per_warp(td) if backward else forward_smem_bytes_per_warp(td)
        warps = c["BRIDGE_MAX_WARPS"]
        while warps > 1 and (warps * per_warp > c["BRIDGE_SMEM_LIMIT"] or -(-tasks // warps) < 2 * num_sms):
            warps //= 2
        workspace = backward and (max_group < 0 or max_group > c["BRIDGE_KEY_TILE"])
        return LaunchPlan(True, td, 32 * warps, -(-tasks // warps), warps * per_warp, workspace)
    threads = c["BRIDGE_SIMPLE_THREADS"]
    return LaunchPlan(False, 0, threads, -(-tasks // threads), 0, False)


C_TYPES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.bfloat16: "bridge_ops::kernels::bf16_t",
    torch.float16: "bridge_ops::kernels::half_t",
}


def kernel_name(kind: str, dtype: torch.dtype, plan: LaunchPlan) -> str:
    """The C++ name of a kernel instantiation (the NVRTC name expression), e.g.
    `bridge_ops::kernels::bridge_attention_fwd<float, 4>`; kind is "fwd" or "bwd"."""
    if plan.fast:
        return f"bridge_ops::kernels::bridge_attention_{kind}<{C_TYPES[dtype]}, {plan.td}>"
    acc = "double" if dtype == torch.float64 else "float"
    return f"bridge_ops::kernels::bridge_attention_{kind}_simple<{C_TYPES[dtype]}, {acc}>"


def all_kernel_names(dtype: torch.dtype) -> List[str]:
    """Every kernel a call with this dtype may launch (what NVRTC compiles for it)."""
    names = []
    if dtype != torch.float64:
        for td in (1, 2, 4, 8):
            plan = LaunchPlan(True, td, 0, 0, 0, False)
            names += [kernel_name("fwd", dtype, plan), kernel_name("bwd", dtype, plan)]
    simple = LaunchPlan(False, 0, 0, 0, 0, False)
    return names + [kernel_name("fwd", dtype, simple), kernel_name("bwd", dtype, simple)]


def instantiation_source() -> str:
    """A translation unit that includes the kernel header and instantiates every kernel cupy may request, for
    `nvcc --ptx` in CI (which compiles nothing from the bare header, all of it being templates)."""
    lines = [f'#include "{KERNEL_FILE}"', "void* bridge_ops_cupy_kernels[] = {"]
    for dtype in C_TYPES:
        lines += [f"  (void*)&{name}," for name in all_kernel_names(dtype)]
    return "\n".join(lines + ["};", ""])


# ---------------------------------------------------------------------------------------------------------------
# cu_group_lens: validated once per tensor (and again after any in-place change), not on every call
# ---------------------------------------------------------------------------------------------------------------

try:
    from torch.utils.weak import WeakTensorKeyDictionary

    _VALIDATED = WeakTensorKeyDictionary()
except ImportError:  # pragma: no cover - torch < 2.0
    _VALIDATED = None


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: validated on every call
        return None


def validated_max_group(cu_group_lens: torch.Tensor, batch: int) -> int:
    """Largest group of cu_group_lens, validated like the CPU op (ValueError naming the problem).

    Reading the offsets costs a device-to-host copy (a sync), so the result is cached per tensor and version
    counter: a tensor reused across calls (a decode loop) is read once. During CUDA graph capture nothing is read
    (-1: unknown); the kernels clamp every offset, so bad offsets can never make them access memory out of bounds.
    """
    if cu_group_lens.is_cuda and torch.cuda.is_current_stream_capturing():
        return -1
    version = _version(cu_group_lens)
    if _VALIDATED is not None and version is not None:
        hit = _VALIDATED.get(cu_group_lens)
        if hit is not None and hit[0] == version and hit[1] == batch:
            return hit[2]
    max_group = checks.check_cu_group_lens_values(cu_group_lens, batch)
    if _VALIDATED is not None and version is not None:
        _VALIDATED[cu_group_lens] = (version, batch, max_group)
    return max_group


# ---------------------------------------------------------------------------------------------------------------
# Host code of the two ops, against a launcher
# ---------------------------------------------------------------------------------------------------------------


class Arg:
    """One kernel argument: a tensor (passed as its data pointer), None (a null pointer), or a typed scalar."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value):
        self.kind, self.value = kind, value  # kind: "ptr", "i32", "i64", "f64"


def _ptr(t: Optional[torch.Tensor]) -> Arg:
    return Arg("ptr", t)


def _rows(t: torch.Tensor) -> List[Arg]:
    return [_ptr(t), Arg("i64", t.stride(0)), Arg("i64", t.stride(1)), Arg("i64", t.stride(2))]


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _is_aligned(tensors: Sequence[torch.Tensor], dim: int) -> bool:
    """Every row of every tensor starts on a 4-element boundary (so the kernels may use vector accesses)."""
    if dim % 4 != 0:
        return False
    for t in tensors:
        if t.data_ptr() % (4 * t.element_size()) != 0 or any(s % 4 != 0 for s in t.stride()[:3]):
            return False
    return True


def _mask_args(key_mask: Optional[torch.Tensor]) -> List[Arg]:
    if key_mask is None:
        return [_ptr(None), Arg("i64", 0), Arg("i64", 0)]
    return [_ptr(key_mask), Arg("i64", key_mask.stride(0)), Arg("i64", key_mask.stride(1))]


def _empty_rows(q: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)


def forward(launcher, q, k, v, cu_group_lens, key_mask=None, scale=None) -> Tuple[torch.Tensor, torch.Tensor]:
    checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
    batch, seqlen, heads, dim = q.shape
    groups = cu_group_lens.numel() - 1
    max_group = validated_max_group(cu_group_lens, batch)
    scale = checks.resolve_scale(scale, dim)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    cu = cu_group_lens.contiguous()
    out = _empty_rows(q)
    lse = torch.empty(batch, seqlen, heads, dtype=checks.lse_dtype(q.dtype), device=q.device)
    plan = plan_launch(q.dtype == torch.float64, dim, seqlen * groups * heads, launcher.num_sms(q.device), False, max_group)
    if plan.blocks == 0:  # S = 0: nothing to compute (an empty grid is a launch error)
        return out, lse
    shape = [Arg("i32", batch), Arg("i32", seqlen), Arg("i32", heads), Arg("i32", dim), Arg("i32", groups)]
    if plan.fast:
        aligned = _is_aligned([q, k, v, out], dim)
        args = _rows(q) + _rows(k) + _rows(v) + _rows(out) + [_ptr(lse), _ptr(cu)] + _mask_args(key_mask)
        args += shape + [Arg("f64", scale), Arg("i32", int(aligned))]
        launcher.launch(kernel_name("fwd", q.dtype, plan), plan, args)
        return out, lse
    out_acc = out if q.dtype == torch.float64 else _empty_rows(q, torch.float32)
    args = _rows(q) + _rows(k) + _rows(v) + [_ptr(out_acc), _ptr(lse), _ptr(cu)] + _mask_args(key_mask)
    args += shape + [Arg("f64", scale)]
    launcher.launch(kernel_name("fwd", q.dtype, plan), plan, args)
    if out_acc is not out:
        out.copy_(out_acc)
    return out, lse


def backward(launcher, grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask=None, scale=None):
    checks.check_attention_args(q, k, v, cu_group_lens, key_mask)
    checks.check_attention_backward_args(grad_out, grad_lse, q, lse)
    batch, seqlen, heads, dim = q.shape
    groups = cu_group_lens.numel() - 1
    max_group = validated_max_group(cu_group_lens, batch)
    scale = checks.resolve_scale(scale, dim)
    stat = checks.lse_dtype(q.dtype)
    grad_out, q, k, v = (_unit_last_stride(t) for t in (grad_out, q, k, v))
    lse = lse.to(stat).contiguous()
    grad_lse = None if grad_lse is None else grad_lse.to(stat).contiguous()
    cu = cu_group_lens.contiguous()
    plan = plan_launch(q.dtype == torch.float64, dim, seqlen * groups * heads, launcher.num_sms(q.device), True, max_group)
    if plan.blocks == 0:  # S = 0
        return tuple(_empty_rows(q) for _ in range(3))
    shape = [Arg("i32", batch), Arg("i32", seqlen), Arg("i32", heads), Arg("i32", dim), Arg("i32", groups)]
    inputs = _rows(grad_out) + _rows(q) + _rows(k) + _rows(v) + [_ptr(lse), _ptr(grad_lse)]
    if plan.fast:
        grads = [_empty_rows(q) for _ in range(3)]
        ws = torch.empty(batch * seqlen * heads * 2, dtype=torch.float32, device=q.device) if plan.workspace else None
        aligned = _is_aligned([grad_out, q, k, v] + grads, dim)
        args = inputs + _rows(grads[0]) + _rows(grads[1]) + _rows(grads[2]) + [_ptr(ws), _ptr(cu)]
        args += _mask_args(key_mask) + shape + [Arg("f64", scale), Arg("i32", int(aligned))]
        launcher.launch(kernel_name("bwd", q.dtype, plan), plan, args)
        return tuple(grads)
    acc = [_empty_rows(q, stat) for _ in range(3)]
    args = inputs + [_ptr(g) for g in acc] + [_ptr(cu)] + _mask_args(key_mask) + shape + [Arg("f64", scale)]
    launcher.launch(kernel_name("bwd", q.dtype, plan), plan, args)
    return tuple(g if g.dtype == q.dtype else g.to(q.dtype) for g in acc)


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

    def _function(self, name: str, dtype_key: str):
        module = self._modules.get(dtype_key)
        if module is None:
            dtype = next(d for d, c in C_TYPES.items() if c == dtype_key)
            module = self._cupy.RawModule(
                code=kernel_source(), options=NVRTC_OPTIONS, name_expressions=all_kernel_names(dtype)
            )
            self._modules[dtype_key] = module
        return module.get_function(name)

    @functools.lru_cache(maxsize=None)
    def num_sms(self, device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _arg(self, a: Arg):
        import numpy as np

        if a.kind == "ptr":
            if a.value is None:
                return np.uint64(0)
            t = a.value
            if t.dtype == torch.bfloat16:  # cupy has no bfloat16 dtype; the bits travel as int16, zero-copy
                t = t.view(torch.int16)
            return self._cupy.from_dlpack(t)
        return {"i32": np.int32, "i64": np.int64, "f64": np.float64}[a.kind](a.value)

    def launch(self, name: str, plan: LaunchPlan, args: List[Arg]) -> None:
        dtype_key = re.search(r"<([^,]+),", name).group(1)
        kernel = self._function(name, dtype_key)
        device = next(a.value.device for a in args if a.kind == "ptr" and a.value is not None)
        stream = torch.cuda.current_stream(device)
        with self._cupy.cuda.Device(device.index), self._cupy.cuda.ExternalStream(stream.cuda_stream):
            kernel((plan.blocks,), (plan.threads,), tuple(self._arg(a) for a in args), shared_mem=plan.smem_bytes)


_LAUNCHER = None
_LIBRARY = None
REGISTRATION_ERROR: Optional[str] = None  # set by dispatch.register_gpu_backend when registration fails


def launcher() -> CupyLauncher:
    global _LAUNCHER
    if _LAUNCHER is None:
        _LAUNCHER = CupyLauncher()
    return _LAUNCHER


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


@functools.lru_cache(maxsize=None)
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
