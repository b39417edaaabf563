"""The CUDA kernels on the CPU: builds python_tests/emulator (g++, no GPU) and offers it as a launcher for
bridge_ops.cupy_backend, so `cupy_backend.forward(EMULATOR, ...)` runs the real host code and the real kernels.

The build is cached in build/emulator/ under a hash of its sources.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess

import torch

from bridge_ops import cupy_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [
    os.path.join(ROOT, "python_tests", "emulator", "bridge_emulator.cpp"),
    os.path.join(ROOT, "python_tests", "emulator", "bridge_emulator_shim.h"),
    os.path.join(ROOT, "csrc", "cuda", "kernels", "bridge_attention.cuh"),
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
        cmd = [compiler(), "-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-DBRIDGE_OPS_EMULATE", "-Wall",
               "-Wno-unknown-pragmas", "-I", os.path.dirname(SOURCES[0]), SOURCES[0], "-o", tmp]
        subprocess.run(cmd, check=True)
        os.replace(tmp, lib)
    return lib


class EmulatorLauncher:
    """The launcher interface of bridge_ops.cupy_backend, running kernels with the CPU warp emulator."""

    def __init__(self, num_sms: int = 132):
        self.lib = ctypes.CDLL(build())
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_int]
        self._num_sms = num_sms
        self.launches = []  # (kernel name, plan) of every launch, for tests

    def num_sms(self, device) -> int:
        return self._num_sms

    def launch(self, name, plan, args) -> None:
        values = []
        for a in args:
            if a.kind == "ptr":
                t = a.value
                if t is not None:
                    assert t.device.type == "cpu", "the emulator runs on CPU tensors"
                values.append(ctypes.c_void_p(0 if t is None else t.data_ptr()))
            else:
                values.append({"i32": ctypes.c_int, "i64": ctypes.c_longlong, "f64": ctypes.c_double}[a.kind](a.value))
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        err = ctypes.create_string_buffer(512)
        self.launches.append((name, plan))
        if self.lib.emu_launch(name.encode(), plan.blocks, plan.threads, plan.smem_bytes, params, err, 512) != 0:
            raise RuntimeError(f"emulated launch of {name} failed: {err.value.decode()}")

    def plan(self, is_double, dim, tasks, num_sms, backward, max_group):
        out = (ctypes.c_longlong * 6)()
        self.lib.emu_plan(int(is_double), dim, tasks, num_sms, int(backward), max_group, out)
        return cupy_backend.LaunchPlan(bool(out[0]), out[1], out[2], out[3], out[4], bool(out[5]))

    def constants(self):
        out = (ctypes.c_longlong * 12)()
        self.lib.emu_constants(out)
        return list(out)


_EMULATOR = None


def emulator() -> EmulatorLauncher:
    global _EMULATOR
    if _EMULATOR is None:
        _EMULATOR = EmulatorLauncher()
    return _EMULATOR


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
