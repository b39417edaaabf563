"""Turns the pytest-benchmark JSON of bench/test_bench_gpu.py into a Markdown table and a summary dict.

python bench/gpu_report.py gpu.json            # prints the Markdown table
"""

import json
import sys
from collections import defaultdict


def rows(data: dict) -> dict:
    table = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        info = bench["extra_info"]
        table[(info["shape"], info["mode"])][info["impl"]] = info
    return table


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


def summary(data: dict) -> dict:
    """Per (shape, mode): times, speedups, GB/s, and the two targets of the CUDA issue."""
    out = {}
    for (shape, mode), impls in rows(data).items():
        fused, ref, dense = impls.get("fused"), impls.get("reference"), impls.get("dense_sdpa")
        if fused is None:
            continue
        entry = {
            "fused_s": fused["event_median_s"],
            "achieved_gbps": fused["achieved_gbps"],
            "copy_gbps": fused["copy_gbps"],
            "fraction_of_copy": fused["achieved_gbps"] / fused["copy_gbps"],
            "gpu_backend": fused.get("gpu_backend"),
        }
        if ref:
            entry["reference_s"] = ref["event_median_s"]
            entry["speedup_vs_reference"] = ref["event_median_s"] / fused["event_median_s"]
        if dense:
            entry["dense_s"] = dense["event_median_s"]
            entry["speedup_vs_dense"] = dense["event_median_s"] / fused["event_median_s"]
        if mode == "fwd+bwd" and "speedup_vs_reference" in entry:
            entry["target_5x_reference_met"] = entry["speedup_vs_reference"] >= 5.0
        if shape.startswith("train"):
            entry["target_50pct_copy_met"] = entry["fraction_of_copy"] >= 0.5
        out[f"{shape} {mode}"] = entry
    return out


def markdown(data: dict) -> str:
    table = rows(data)
    if not table:
        return "(no GPU benchmark results)\n"
    first = next(iter(next(iter(table.values())).values()))
    lines = [
        f"{first['device']}, torch {first['torch']}, GPU backend `{first.get('gpu_backend')}`, {first['dtype']}, "
        f"H=4, Dh=128; CUDA-event medians; device copy bandwidth {first['copy_gbps']:.0f} GB/s (read + write)",
        "",
        "| shape | pass | fused | reference | dense SDPA | fused vs reference | fused vs dense | fused GB/s "
        "| % of copy | peak memory fused / reference / dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, mode), impls in table.items():
        f, r, d = impls.get("fused"), impls.get("reference"), impls.get("dense_sdpa")
        if not (f and r and d):
            continue
        mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
        lines.append(
            f"| {shape} | {mode} | {fmt(f['event_median_s'])} | {fmt(r['event_median_s'])} | "
            f"{fmt(d['event_median_s'])} | **{r['event_median_s'] / f['event_median_s']:.1f}x** | "
            f"{d['event_median_s'] / f['event_median_s']:.1f}x | {f['achieved_gbps']:.0f} | "
            f"{100 * f['achieved_gbps'] / f['copy_gbps']:.0f}% | "
            f"{mib(f['peak_memory_bytes'])} / {mib(r['peak_memory_bytes'])} / {mib(d['peak_memory_bytes'])} MiB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
