"""Benchmarks run apart from the tests: `pytest bench/ --benchmark-json=bench/results/cpu.json`."""

import ctypes
import os
import re
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def peak_memory_of_call(call) -> int:
    """Peak growth of this process's resident memory during one call (Linux).

    Meaningful when the allocator returns every large block to the OS when it is freed (MALLOC_MMAP_THRESHOLD_ set
    before the process starts, as `peak_memory_bytes` does): then resident memory tracks live tensor bytes.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    before = _status_kib("VmRSS")
    call()
    return (_status_kib("VmHWM") - before) * 1024


def peak_memory_bytes(module: str, factory: str, *args: str) -> int:
    """Peak memory of one call of `module.factory(*args)()`, measured in a fresh process whose glibc maps every
    allocation of 64 KiB or more on its own, so the timing runs keep the default allocator behaviour. -1 if the
    platform cannot measure it."""
    code = (
        f"import sys; sys.path.insert(0, {HERE!r}); import conftest, {module};"
        f"call = {module}.{factory}(*{list(args)!r}); call();"
        "print(conftest.peak_memory_of_call(call))"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return int(result.stdout.strip()) if result.returncode == 0 else -1


def paired_rounds(benchmark, first, second, rounds: int, warmup_rounds: int = 1):
    """Times `first` and `second` alternately in each round (drift of a shared machine hits both alike); returns the
    medians of each and the median of the per-round ratios second / first."""
    times = ([], [])

    def pair():
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=rounds, warmup_rounds=warmup_rounds)
    ratios = [b / a for a, b in zip(*times)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def pytest_report_header(config):
    return f"bridge_ops bench: torch {torch.__version__}, {torch.get_num_threads()} threads"
