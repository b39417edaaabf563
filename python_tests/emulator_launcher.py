"""The CUDA kernels on the CPU: builds python_tests/emulator (g++, no GPU) and offers it as a launcher of the ops' C++
hosts (csrc/host/, bound as bridge_ops._C.kernels.bridge_attention etc.), so `forward(...)` runs the host a CUDA
build ships (checks, cu_group_lens validation, launch.h's plans and params structs, alignment, workspaces, casts) and
the real kernels, on CPU tensors. The tests therefore need bridge_ops._C.

The build is cached in build/emulator/ under a hash of its sources.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess

import torch

from bridge_ops import _loader

if _loader._C is None:  # pytest.importorskip("emulator_launcher") then skips the emulator tests
    raise ImportError(f"the emulator tests run the C++ hosts of bridge_ops._C, not loaded ({_loader.LOAD_ERROR})")

kernels = _loader._C.kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [
    os.path.join(ROOT, *path.split("/"))
    for path in (
        "python_tests/emulator/bridge_emulator.cpp",
        "python_tests/emulator/bridge_emulator_shim.h",
        "csrc/cuda/kernels/launch.h",
        "csrc/cuda/kernels/kernel_table.h",
        "csrc/cuda/kernels/kernel_table.cuh",
        "csrc/cuda/kernels/bridge_attention.cuh",
        "csrc/cuda/kernels/cascade_attention.cuh",
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


class EmulatorLauncher:
    """A launcher of the C++ hosts (the protocol of csrc/kernel_launch.cpp) that runs each kernel with the CPU warp
    emulator, one block after the other, on CPU tensors."""

    name = "emulator"
    device_type = "cpu"

    def __init__(self, num_sms: int = 132):
        self.lib = ctypes.CDLL(build())
        self.lib.emu_launch.restype = ctypes.c_int
        self.lib.emu_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.c_longlong,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_longlong,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self._num_sms = num_sms

    def num_sms(self, device: int) -> int:
        return self._num_sms

    def capturing(self, device: int) -> bool:
        return False

    def launch(self, kernel: str, grid, params: bytes) -> None:
        """Runs `kernel` (a kernel_table() name) over `grid` (a _C.kernels.Grid) with the params struct `params`."""
        err = ctypes.create_string_buffer(512)
        if self.lib.emu_launch(
            kernel.encode(), grid.blocks, grid.threads, grid.smem_bytes, params, len(params), err, 512
        ):
            raise RuntimeError(f"emulated launch of {kernel} failed: {err.value.decode()}")

    def plan(self, is_double, dim, tasks, num_sms, backward, max_group):
        """launch.h's plan_launch as compiled into the emulator (a test compares it with bridge_ops._C's)."""
        out = (ctypes.c_longlong * 6)()
        self.lib.emu_plan(
            int(is_double), dim, ctypes.c_longlong(tasks), num_sms, int(backward), ctypes.c_longlong(max_group), out
        )
        return kernels.LaunchPlan(bool(out[0]), out[1], out[2], out[3], out[4], bool(out[5]))

    def constants(self):
        out = (ctypes.c_longlong * 12)()
        self.lib.emu_constants(out)
        return list(out)


@functools.cache
def emulator() -> EmulatorLauncher:
    return EmulatorLauncher()


def forward(q, k, v, cu, key_mask=None, scale=None):
    return kernels.bridge_attention(emulator(), q, k, v, cu, key_mask, scale)


def backward(grad_out, grad_lse, q, k, v, lse, cu, key_mask=None, scale=None):
    return kernels.bridge_attention_backward(emulator(), grad_out, grad_lse, q, k, v, lse, cu, key_mask, scale)


def cascade_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu, suffix_lens=None, scale=None):
    return kernels.cascade_attention(
        emulator(), q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu, suffix_lens, scale
    )


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    return kernels.merge_attention_states(emulator(), o_a, lse_a, o_b, lse_b)


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
