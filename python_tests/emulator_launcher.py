"""The CUDA kernels on the CPU: builds python_tests/emulator (g++, no GPU) and offers it as a launcher for
bridge_ops.cupy_backend, so `cupy_backend.forward(EMULATOR, ...)` runs the real host code and the real kernels, with
the launch plans and parameter structs of csrc/cuda/kernels/launch.h (through bridge_ops._C.kernels, which the tests
therefore need).

The build is cached in build/emulator/ under a hash of its sources.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess

import torch

from bridge_ops import _loader, cupy_backend

if _loader._C is None:  # pytest.importorskip("emulator_launcher") then skips the emulator tests
    raise ImportError(f"the emulator tests launch through bridge_ops._C.kernels, not loaded ({_loader.LOAD_ERROR})")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [
    os.path.join(ROOT, *path.split("/"))
    for path in (
        "python_tests/emulator/bridge_emulator.cpp",
        "python_tests/emulator/bridge_emulator_shim.h",
        "csrc/cuda/kernels/launch.h",
        "csrc/cuda/kernels/bridge_attention.cuh",
        "csrc/cuda/kernels/prefix_attention.cuh",
        "csrc/attention_merge.h",
    )
]


def compiler() -> str:
    return os.environ.get("CXX") or shutil.which("g++") or "c++"


def build() -> str:
    digest = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as f:
            digest.update(f.read())
    out_dir = os.path.join(ROOT, "build", "emulator")
    lib = os.path.join(out_dir, f"bridge_emulator_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{lib}.{os.getpid()}.tmp"
        cmd = [
            compiler(),
            "-std=c++17",
            "-O1",
            "-g0",
            "-fPIC",
            "-shared",
            "-DBRIDGE_OPS_EMULATE",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-I",
            os.path.dirname(SOURCES[0]),
            SOURCES[0],
            "-o",
            tmp,
        ]
        subprocess.run(cmd, check=True)
        os.replace(tmp, lib)
    return lib


def _argument(value):
    """A kernel argument as a ctypes object holding its bytes: a tensor or None is a pointer, bytes a struct (e.g. a
    parameter struct's to_bytes()), a ctypes object itself."""
    if isinstance(value, torch.Tensor):
        assert value.device.type == "cpu", "the emulator runs on CPU tensors"
        return ctypes.c_void_p(value.data_ptr())
    if value is None:
        return ctypes.c_void_p(0)
    if isinstance(value, bytes):
        return ctypes.create_string_buffer(value, len(value))
    return value


class EmulatorLauncher:
    """The launcher interface of bridge_ops.cupy_backend, running kernels with the CPU warp emulator."""

    def __init__(self, num_sms: int = 132):
        self.lib = ctypes.CDLL(build())
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.c_longlong,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self._num_sms = num_sms
        self.launches = []  # (kernel name, plan) of every launch, for tests

    def num_sms(self, device) -> int:
        return self._num_sms

    def launch(self, name, plan, params, device=None) -> None:
        """cupy_backend's launch: kernel `name` as `plan` says, with the parameter struct `params` (None: launch
        nothing but the name check, for plans of zero blocks)."""
        assert device is None or device.type == "cpu", "the emulator runs on CPU tensors"
        self.launches.append((name, plan))
        args = [] if params is None else [params.to_bytes()]
        self.launch_args(name, plan.blocks, plan.threads, plan.smem_bytes, args)

    def launch_args(self, name, blocks, threads, smem_bytes, args) -> None:
        """Launches kernel `name` (its C++ name, as cupy_backend.kernel_name spells it) with these arguments in
        order (see _argument)."""
        values = [_argument(a) for a in args]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        err = ctypes.create_string_buffer(512)
        if self.lib.emu_launch(name.encode(), blocks, threads, smem_bytes, params, err, 512) != 0:
            raise RuntimeError(f"emulated launch of {name} failed: {err.value.decode()}")

    def plan(self, is_double, dim, tasks, num_sms, backward, max_group):
        """launch.h's plan_launch as compiled into the emulator (a test compares it with bridge_ops._C's)."""
        out = (ctypes.c_longlong * 6)()
        self.lib.emu_plan(
            int(is_double), dim, ctypes.c_longlong(tasks), num_sms, int(backward), ctypes.c_longlong(max_group), out
        )
        return cupy_backend.kernels().LaunchPlan(bool(out[0]), out[1], out[2], out[3], out[4], bool(out[5]))

    def constants(self):
        out = (ctypes.c_longlong * 12)()
        self.lib.emu_constants(out)
        return list(out)


@functools.cache
def emulator() -> EmulatorLauncher:
    return EmulatorLauncher()


def forward(q, k, v, cu, key_mask=None, scale=None):
    return cupy_backend.forward(emulator(), q, k, v, cu, key_mask, scale)


def backward(grad_out, grad_lse, q, k, v, lse, cu, key_mask=None, scale=None):
    return cupy_backend.backward(emulator(), grad_out, grad_lse, q, k, v, lse, cu, key_mask, scale)


class EmulatedAttention(torch.autograd.Function):
    """Autograd over the emulated forward/backward (what the C++ autograd kernel does on a GPU)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, key_mask, scale):
        out, lse = forward(q, k, v, cu, key_mask, scale)
        ctx.save_for_backward(q, k, v, lse, cu, key_mask)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, lse, cu, key_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        dq, dk, dv = backward(grad_out, grad_lse, q, k, v, lse, cu, key_mask, ctx.scale)
        return dq, dk, dv, None, None, None


def attention(q, k, v, cu, key_mask=None, scale=None):
    return EmulatedAttention.apply(q, k, v, cu, key_mask, scale)
