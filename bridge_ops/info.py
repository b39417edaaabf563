"""`python -m bridge_ops.info`: versions, how the extension was built, every backend with what it supports and why it is
unavailable, and which backend serves each op on each device."""

import platform
import sys

import torch

from ._loader import LOAD_ERROR, build_info
from .dispatch import BACKENDS, OPS, backend_for, gpu_backend_summary
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
    lines.append("backends (a call goes to the first that supports its inputs; the reference supports every input):")
    width = max(len(b.name) for b in BACKENDS)
    for b in BACKENDS:
        reason = b.unavailable_reason()
        status = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {b.name:<{width}}  {b.description}: {status}")
        lines.append(f"  {'':<{width}}  supports {b.support()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in OPS:
        lines.append(f"serving {op} now: " + ", ".join(f"{d} -> {backend_for(d, op).name}" for d in devices))
    lines.append(gpu_backend_summary())
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
