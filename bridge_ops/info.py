"""`python -m bridge_ops.info`: versions, how the extension was built, and which backend serves each device."""

import platform
import sys

import torch

from ._loader import LOAD_ERROR, build_info
from .dispatch import BACKENDS, backend_for, gpu_backend_summary
from .version import __version__


def report() -> str:
    lines = [
        f"bridge_ops {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{torch.get_num_threads()} CPU threads",
    ]
    if LOAD_ERROR is None:
        info = build_info()
        lines.append(
            f"extension bridge_ops._C: loaded; built with torch {info['torch_version']}, "
            f"CUDA {info['cuda_version']}, {info['compiler']}, OpenMP {info['openmp']}; "
            f"kernels for {', '.join(info['backends'])}; CPU kernels run with {info['cpu_isa']}"
        )
    else:
        lines.append(f"extension bridge_ops._C: NOT loaded ({LOAD_ERROR})")
    lines.append("backends (first available per device serves the call):")
    width = max(len(b.name) for b in BACKENDS)
    for b in BACKENDS:
        reason = b.unavailable_reason()
        status = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {b.name:<{width}}  {b.description}: {status}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append("serving now: " + ", ".join(f"{d} -> {backend_for(d).name}" for d in devices))
    cascade = ", ".join(f"{d} -> {backend_for(d, cascade=True).name}" for d in devices)
    lines.append(f"serving the cascade decode ops now: {cascade}")
    lines.append(gpu_backend_summary())
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
