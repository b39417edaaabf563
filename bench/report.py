"""Turns pytest-benchmark JSON files of bench/ into the README's Markdown tables.

python bench/report.py bench/results/cpu.json          # bridge_attention: fused vs reference vs dense SDPA
python bench/report.py bench/results/generation.json   # decode, block decode step, prefill once
python bench/report.py bench/results/prefix_cache.json # shared-prefix vs expanded KV cache
python bench/report.py bench/results/real_model.json   # SmolLM2-135M-Instruct: bridge_ops.generate vs HF generate
python bench/report.py bench/results/real_model.json --plot bench/results/real_model_decode.png   # and its plot
"""

import json
import sys
from collections import defaultdict


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def header(data) -> str:
    first = data["benchmarks"][0]["extra_info"]
    machine = data["machine_info"]
    cpu = machine.get("cpu", {}).get("brand_raw") or machine["processor"]
    threads = first.get("threads", "?")
    return f"{cpu}, {threads} threads, torch {first.get('torch', '?')}; medians of pytest-benchmark rounds"


def attention_table(data) -> None:
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows[(info["shape"], info["mode"])][info["impl"]] = (bench["stats"]["median"], info["peak_memory_bytes"])
    print(
        "| shape | pass | fused | reference | dense SDPA | fused vs reference | fused vs dense | peak memory "
        "fused / reference / dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (shape, mode), impls in rows.items():
        (tf, mf), (tr, mr), (td, md) = impls["fused"], impls["reference"], impls["dense_sdpa"]
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        print(
            f"| {shape} | {mode} | {fmt(tf)} | {fmt(tr)} | {fmt(td)} | **{tr / tf:.1f}x** | {td / tf:.1f}x | "
            f"{mib(mf)} / {mib(mr)} / {mib(md)} MiB |"
        )


def generation_tables(data) -> None:
    by_kind = defaultdict(list)
    for bench in data["benchmarks"]:
        by_kind[bench["extra_info"]["kind"]].append((bench["extra_info"], bench["stats"]["median"]))
    ((decode, _),) = by_kind["decode"]
    print("| decode (4 prompts x width 4, 32 new tokens; runs alternated) | time | tokens/s |")
    print("|---|---|---|")
    print(f"| without Bridge | {fmt(decode['unbridged'])} | {decode['tokens'] / decode['unbridged']:.0f} |")
    print(
        f"| with Bridge ({decode['bridge_share']:.1%} parameters) | {fmt(decode['bridged'])} | "
        f"{decode['tokens'] / decode['bridged']:.0f} |"
    )
    print(f"| **bridged / unbridged** (median of per-round ratios) | **{decode['ratio']:.3f}x** (target <= 1.10x) | |")
    print()
    block = {info["impl"]: t for info, t in by_kind["block"]}
    print("| one BridgeBlock decode step (16 rows, D=1024, d_bridge=192) | time | vs fused |")
    print("|---|---|---|")
    for impl, label in (
        ("fused", "fused `bridge_block_decode`"),
        ("reference", "plain PyTorch calls (reference)"),
        ("module", "`hidden + BridgeBlock(hidden)`"),
    ):
        print(f"| {label} | {fmt(block[impl])} | {block[impl] / block['fused']:.1f}x |")
    print()
    print(
        "| prefill, 4 prompts x 64 tokens | once + cache copy | expanded (N copies) | once / expanded | target 1.2/N |"
    )
    print("|---|---|---|---|---|")
    for info, _ in sorted(by_kind["prefill"], key=lambda item: item[0]["width"]):
        print(
            f"| N = {info['width']} | {fmt(info['once'])} | {fmt(info['expanded'])} | **{info['ratio']:.3f}** | "
            f"{1.2 / info['width']:.3f} |"
        )


def prefix_cache_table(data) -> None:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    print(
        "| prompt P | width N | prompt KV expanded | prompt KV shared | ratio | decode step expanded | "
        "decode step shared | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|")
    infos = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"]["kind"] == "prefix_cache"]
    for i in sorted(infos, key=lambda i: (i["prompt_len"], i["width"])):
        ratio = i["expanded_prompt_bytes"] / i["shared_prompt_bytes"]
        print(
            f"| {i['prompt_len']} | {i['width']} | {mib(i['expanded_prompt_bytes'])} | "
            f"{mib(i['shared_prompt_bytes'])} | 1/{ratio:g} | {fmt(i['expanded_step'])} | {fmt(i['shared_step'])} | "
            f"**{i['speedup']:.2f}x** |"
        )


def real_model_tables(data) -> None:
    mib = lambda b: f"{b / 2**20:,.0f} MiB" if b >= 0 else "n/a"  # noqa: E731
    by_kind = defaultdict(list)
    for bench in data["benchmarks"]:
        by_kind[bench["extra_info"]["kind"]].append(bench["extra_info"])
    roofline = by_kind["real_roofline"][0] if by_kind["real_roofline"] else None
    if roofline is not None:
        print(
            f"Roofline: {roofline['weight_bytes'] / 1e6:.0f} MB of weights read per decode step at a measured "
            f"{roofline['bandwidth'] / 1e9:.1f} GB/s copy bandwidth: N x "
            f"{roofline['bandwidth'] / roofline['weight_bytes']:.1f} tokens/s at most (at the "
            f"{roofline['read_bandwidth'] / 1e9:.1f} GB/s of a plain read: N x "
            f"{roofline['read_bandwidth'] / roofline['weight_bytes']:.1f})."
        )
        print()
    print(
        "| prompt P | width N | bridge_ops.generate | HF generate | speedup | roofline (bridge_ops' share) | "
        "peak memory bridge_ops / HF | prompt KV bridge_ops / HF |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i in sorted(by_kind["real_generate"], key=lambda i: (i["prompt_len"], i["width"])):
        ours = i["tokens"] / i["ours"]
        limit = roofline["roofline"].get(str(i["width"])) if roofline else None
        bound = f"{limit:.0f} tok/s ({ours / limit:.0%})" if limit else "n/a"
        print(
            f"| {i['prompt_len']} | {i['width']} | {ours:.1f} tok/s | {i['tokens'] / i['hf']:.1f} "
            f"tok/s | **{i['speedup']:.2f}x** | {bound} | {mib(i['peak_ours'])} / {mib(i['peak_hf'])} | "
            f"{mib(i['prompt_kv_shared'])} / {mib(i['prompt_kv_expanded'])} |"
        )
    for i in by_kind["real_overhead"]:
        print()
        print("| bridge_ops.generate, N = 8, P = 64, 32 new tokens (runs alternated) | time | tokens/s |")
        print("|---|---|---|")
        print(f"| without Bridge | {fmt(i['unbridged'])} | {i['tokens'] / i['unbridged']:.1f} |")
        print(f"| with Bridge ({i['share']:.1%} parameters) | {fmt(i['bridged'])} | {i['tokens'] / i['bridged']:.1f} |")
        print(f"| **bridged / unbridged** (median of per-round ratios) | **{i['ratio']:.3f}x** (goal <= 1.10x) | |")
    for i in by_kind["real_linears"]:
        print()
        rows = i["rows"]
        print(f"| every linear layer once on {rows} rows (a decode step's matmuls, alternated) | time | weights read |")
        print("|---|---|---|")
        for key, label in (("torch_linear", "torch's linear (BLAS)"), ("decode_linear", "`decode_linear`")):
            print(f"| {label} | {fmt(i[key])} | {i['weight_bytes'] / i[key] / 1e9:.1f} GB/s |")
        print(f"| **speedup** (median of per-round ratios) | **{i['speedup']:.2f}x** | |")
    for i in by_kind["real_flat_step"]:
        print()
        print("| bridge_ops.generate, N = 8, P = 64, 32 new tokens (alternated, same tokens) | time | tokens/s |")
        print("|---|---|---|")
        print(f"| decode steps through the HF forward | {fmt(i['hf_forward'])} | {i['tokens'] / i['hf_forward']:.1f} |")
        print(f"| the flat decode step (hf.decode_step) | {fmt(i['flat'])} | {i['tokens'] / i['flat']:.1f} |")
        print(f"| **speedup** (median of per-round ratios) | **{i['speedup']:.2f}x** | |")
    for i in by_kind["real_fused_layer"]:
        print()
        print("| bridge_ops.generate, N = 8, P = 64, 32 new tokens (alternated, same tokens) | time | tokens/s |")
        print("|---|---|---|")
        print(f"| the flat step's layers op by op in Python | {fmt(i['python'])} | {i['tokens'] / i['python']:.1f} |")
        print(f"| each layer one `decode_layer` call | {fmt(i['fused'])} | {i['tokens'] / i['fused']:.1f} |")
        print(f"| **speedup** (median of per-round ratios) | **{i['speedup']:.2f}x** | |")
    for i in by_kind["real_profile"]:
        print()
        wall, steps = i["wall"], i["steps"]
        print(
            f"| one generation at N = {i.get('width', 8)}, P = 64, under torch.profiler: {fmt(wall)}, "
            f"{fmt(wall / steps)} per step | self CPU time per step | share |"
        )
        print("|---|---|---|")
        rows = dict(i["groups"])
        rows["other ATen ops (norms, rotary, element-wise, copies)"] = i["operators"] - sum(i["groups"].values())
        rows["Python and the HF layers' glue (wall - operators)"] = wall - i["operators"]
        for group, seconds in rows.items():
            print(f"| {group} | {fmt(seconds / steps)} | {seconds / wall:.0%} |")


def real_model_plot(data, path: str) -> None:
    """Tokens/s against N for each prompt length: bridge_ops, HF and the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    infos = [b["extra_info"] for b in data["benchmarks"]]
    generate = [i for i in infos if i["kind"] == "real_generate"]
    roofline = next((i for i in infos if i["kind"] == "real_roofline"), None)
    lengths = sorted(
        {i["prompt_len"] for i in generate if sum(j["prompt_len"] == i["prompt_len"] for j in generate) > 1}
    )
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rows = sorted((i for i in generate if i["prompt_len"] == length), key=lambda i: i["width"])
        widths = [i["width"] for i in rows]
        ax.plot(widths, [i["tokens"] / i["ours"] for i in rows], "o-", label="bridge_ops.generate")
        ax.plot(widths, [i["tokens"] / i["hf"] for i in rows], "s-", label="HF generate")
        if roofline is not None:
            ax.plot(widths, [roofline["roofline"][str(w)] for w in widths], "k--", label="memory roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width N (samples of one prompt)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"SmolLM2-135M, {length}-token prompt, 32 new tokens")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(path: str, plot: str = None) -> None:
    with open(path) as f:
        data = json.load(f)
    if plot is not None:
        real_model_plot(data, plot)
    print(header(data))
    print()
    kind = data["benchmarks"][0]["extra_info"].get("kind")
    if kind == "prefix_cache":
        prefix_cache_table(data)
    elif kind is not None and kind.startswith("real_"):
        real_model_tables(data)
    elif kind is not None:
        generation_tables(data)
    else:
        attention_table(data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--plot" else None)
