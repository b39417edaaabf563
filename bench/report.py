"""Turns a pytest-benchmark JSON of bench/test_bench_bridge_attention.py into the README's Markdown table.

    python bench/report.py bench/results/cpu.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows[(info["shape"], info["mode"])][info["impl"]] = (bench["stats"]["median"], info["peak_memory_bytes"])
    machine = data["machine_info"]
    first = data["benchmarks"][0]["extra_info"]
    cpu = machine.get("cpu", {}).get("brand_raw") or machine["processor"]
    print(f"{cpu}, {first['threads']} threads, torch {first['torch']}, float32, H=4, Dh=128; medians")
    print()
    print("| shape | pass | fused | reference | dense SDPA | fused vs reference | fused vs dense | peak memory "
          "fused / reference / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for (shape, mode), impls in rows.items():
        (tf, mf), (tr, mr), (td, md) = impls["fused"], impls["reference"], impls["dense_sdpa"]
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        print(
            f"| {shape} | {mode} | {fmt(tf)} | {fmt(tr)} | {fmt(td)} | **{tr / tf:.1f}x** | {td / tf:.1f}x | "
            f"{mib(mf)} / {mib(mr)} / {mib(md)} MiB |"
        )


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    main(sys.argv[1])
