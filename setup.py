"""Builds the compiled extension `bridge_ops._C` (metadata lives in pyproject.toml).

torch must already be installed, so build without isolation:

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace (incremental)

Environment variables:
    BRIDGE_OPS_FORCE_CUDA=1        build the CUDA kernels even if torch reports no CUDA (needs a CUDA torch to link)
    BRIDGE_OPS_SKIP_CUDA_BUILD=1   never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST           CUDA architectures, e.g. "9.0" (default "9.0" for forced builds)
    CUDA_HOME                      CUDA toolkit root (e.g. /usr/local/cuda)
    MAX_JOBS                       parallel compile jobs (ninja); NVCC_THREADS: nvcc --threads (default 2)
    BRIDGE_OPS_NVCC_FLAGS          extra nvcc flags, e.g. "-Xptxas -v" or "-DBRIDGE_FWD_MIN_BLOCKS=4"
    BRIDGE_OPS_DEBUG=1             -O0 -g instead of -O3 -g0
"""

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "bridge_ops: torch must be installed before building (e.g. `pip install torch==2.13.0`), and pip must "
        "not isolate the build: `pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    if env_flag("BRIDGE_OPS_SKIP_CUDA_BUILD"):
        return False
    if env_flag("BRIDGE_OPS_FORCE_CUDA"):
        if CUDA_HOME is None:
            sys.exit("bridge_ops: BRIDGE_OPS_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def relative_sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions() -> list:
    debug = env_flag("BRIDGE_OPS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -ffp-contract=off: the backward recomputes scores exactly as the forward rounded them (the AVX2 kernels
    # still use explicit FMA intrinsics).
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    sources = relative_sources("csrc/*.cpp") + relative_sources("csrc/cpu/*.cpp") + relative_sources("csrc/host/*.cpp")
    cuda_sources = relative_sources("csrc/cuda/*.cu")
    if want_cuda() and cuda_sources:
        cuda_version = torch.version.cuda or "unknown"
        defines = ["-DBRIDGE_OPS_WITH_CUDA", f'-DBRIDGE_OPS_CUDA_VERSION="{cuda_version}"']
        nvcc = (["-O0", "-g"] if debug else ["-O3"]) + ["--threads", os.environ.get("NVCC_THREADS", "2"), "-lineinfo"]
        nvcc += defines + os.environ.get("BRIDGE_OPS_NVCC_FLAGS", "").split()  # e.g. -DBRIDGE_FWD_MIN_BLOCKS=4
        print(f"bridge_ops: building CPU + CUDA kernels (arch list {os.environ.get('TORCH_CUDA_ARCH_LIST')})")
        return [
            CUDAExtension(
                "bridge_ops._C",
                sources + cuda_sources,
                extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    print("bridge_ops: building CPU kernels only")
    return [CppExtension("bridge_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


class BuildPyWithKernelSource(build_py):
    """Ships the kernel headers csrc/cuda/kernels/*.cuh and *.h (launch.h) inside the package (bridge_ops/_kernels):
    the cupy backend compiles them at run time. A source checkout (and an editable install) reads them from csrc/."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "bridge_ops", "_kernels")
        os.makedirs(target, exist_ok=True)
        for pattern in ("*.cuh", "*.h"):
            for source in glob.glob(os.path.join(ROOT, "csrc", "cuda", "kernels", pattern)):
                shutil.copy(source, target)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithKernelSource},
)
