"""Does interdependence pay? GRPO only vs parameter-matched MLP + GRPO vs Bridge (warm-up + GRPO), widths 1..16.

    python experiments/width_experiment.py                   # default size: 3 seeds, ~20 min on a 2-core CPU
    python experiments/width_experiment.py --size smoke      # seconds (what the test suite runs)
    python experiments/width_experiment.py --size large      # more data, steps and seeds

From one base model (a tiny Llama pretrained here from scratch on generated arithmetic, cached in OUT/base), every
method trains a copy with each seed and is evaluated at widths 1, 2, 4, 8, 16 on held-out problems: mean accuracy
(Pass@1 averaged over the N samples), all-N-correct rate and majority-vote accuracy. Writes OUT/results.csv (one row
per method, seed, width), OUT/summary.csv (mean and std over seeds), OUT/summary.md (the README table),
OUT/accuracy_vs_width.png and OUT/logs/*.json (training metrics).
"""

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

SIZES = {
    # base pretraining steps, train/test problems, GRPO steps, warm-up steps, seeds, widths
    "smoke": dict(base_steps=3, hidden=32, layers=2, train=64, test=8, grpo_steps=2, prompts_per_step=4,
                  warmup_steps=2, warmup_prompts=16, seeds=[0], widths=[1, 2]),
    "default": dict(base_steps=700, hidden=128, layers=4, train=3000, test=500, grpo_steps=150, prompts_per_step=16,
                    warmup_steps=150, warmup_prompts=1024, seeds=[0, 1, 2, 3, 4], widths=[1, 2, 4, 8, 16]),
    "large": dict(base_steps=1500, hidden=128, layers=4, train=3000, test=800, grpo_steps=300, prompts_per_step=32,
                  warmup_steps=300, warmup_prompts=2048, seeds=list(range(10)), widths=[1, 2, 4, 8, 16]),
}
METRICS = ("mean_accuracy", "all_correct", "majority_accuracy", "any_correct")


def base_model(train, size: dict, out: str, progress: bool):
    """The pretrained base from OUT/base when it was made with the same spec, else pretrained now and saved."""
    from transformers import AutoModelForCausalLM

    from bridge_ops.train.recipes import BaseSpec, pretrain_base

    spec = BaseSpec(hidden_size=size["hidden"], num_layers=size["layers"], steps=size["base_steps"])
    directory = os.path.join(out, "base")
    spec_file = os.path.join(directory, "base_spec.json")
    if os.path.exists(spec_file) and json.load(open(spec_file)) == dataclasses.asdict(spec):
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval(), 0.0
    start = time.perf_counter()
    model = pretrain_base(train, spec, progress=progress)
    seconds = time.perf_counter() - start
    model.save_pretrained(directory)
    json.dump(dataclasses.asdict(spec), open(spec_file, "w"))
    return model, seconds


def summarize(rows: List[Dict], widths: List[int], methods: List[str]) -> List[Dict]:
    summary = []
    for method in ["base"] + methods:
        for width in widths:
            runs = [r for r in rows if r["method"] == method and r["width"] == width]
            entry = {"method": method, "width": width, "seeds": len(runs)}
            for m in METRICS:
                values = [r[m] for r in runs]
                entry[m] = statistics.mean(values)
                entry[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.append(entry)
    return summary


def cells_of(summary: List[Dict], method: str, widths: List[int]) -> List[Dict]:
    """The summary entries of `method`, in the order of `widths`."""
    by_width = {s["width"]: s for s in summary if s["method"] == method}
    return [by_width[w] for w in widths]


def markdown(summary: List[Dict], widths: List[int], methods: List[str]) -> str:
    lines = []
    for metric, title in (("mean_accuracy", "mean accuracy (Pass@1 over the N samples)"),
                          ("majority_accuracy", "majority-vote accuracy"), ("all_correct", "all-N-correct rate")):
        lines += [f"**{title}**, mean ± std over seeds", "",
                  "| method | " + " | ".join(f"N={w}" for w in widths) + " |",
                  "|---" * (len(widths) + 1) + "|"]
        for method in ["base"] + methods:
            cells = cells_of(summary, method, widths)
            lines.append(f"| {method} | " + " | ".join(f"{100 * c[metric]:.1f} ± {100 * c[metric + '_std']:.1f}"
                                                       for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paired(rows: List[Dict], widths: List[int], methods: List[str], seeds: List[int]) -> str:
    """Mean accuracy averaged over widths, and its difference to GRPO-only paired by seed (a seed's runs share the
    base, the problems and the samplers' seeds, so the paired difference is less noisy than the columns)."""
    def averaged(method, seed):
        return statistics.mean(r["mean_accuracy"] for r in rows if r["method"] == method and r["seed"] == seed)

    lines = ["**mean accuracy averaged over widths** (percent), and paired by seed against `grpo`: mean ± std", "",
             "| method | accuracy | minus grpo |", "|---|---|---|"]
    for method in ["base"] + methods:
        values = [100 * averaged(method, s) for s in seeds]
        cell = f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"
        diff = "-"
        if "grpo" in methods and method != "grpo":
            deltas = [100 * (averaged(method, s) - averaged("grpo", s)) for s in seeds]
            diff = f"{statistics.mean(deltas):+.1f} ± {statistics.stdev(deltas) if len(deltas) > 1 else 0.0:.1f}"
        lines.append(f"| {method} | {cell} | {diff} |")
    return "\n".join(lines + [""])


def diagnostics(out: str, methods: List[str], seeds: List[int]) -> str:
    """Per method, mean over seeds: training time, and the norm of the added blocks' output projections (zero at
    the start) after the warm-up and after GRPO."""
    def mean_norm(logs, stage):
        values = [e["norm"] for log in logs for e in log.get("output_norm", []) if e["stage"] == stage]
        return f"{statistics.mean(values):.3f}" if values else "-"

    lines = ["**training diagnostics**, mean over seeds", "",
             "| method | train time (s) | added-block output norm after warm-up | after GRPO |", "|---|---|---|---|"]
    for method in methods:
        logs = [json.load(open(os.path.join(out, "logs", f"{method}-{seed}.json"))) for seed in seeds]
        seconds = statistics.mean(log["train_seconds"] for log in logs)
        lines.append(f"| {method} | {seconds:.0f} | {mean_norm(logs, 'warm-up')} | {mean_norm(logs, 'grpo')} |")
    return "\n".join(lines + [""])


def plot(summary: List[Dict], widths: List[int], methods: List[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("mean_accuracy", "mean accuracy"), ("majority_accuracy", "majority-vote accuracy"),
              ("all_correct", "all-N-correct rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (metric, title) in zip(axes, panels):
        for method in ["base"] + methods:
            cells = cells_of(summary, method, widths)
            ax.errorbar(widths, [c[metric] for c in cells], yerr=[c[metric + "_std"] for c in cells], marker="o",
                        capsize=3, label=method, linestyle="--" if method == "base" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width N (samples per prompt)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--methods", default="grpo,pmatch,bridge,pmatch-warmup,bridge-nowarmup")
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the size's seeds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.tasks import ArithmeticTask
    from bridge_ops.train import evaluate_widths, task_data
    from bridge_ops.train.recipes import METHODS, MethodSpec, train_method

    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else size["seeds"]
    widths, progress = size["widths"], not args.no_progress
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    started = time.perf_counter()

    task = ArithmeticTask(max_operand=9)
    tokenizer = char_tokenizer(task.alphabet)
    train, test = task_data(task, tokenizer, "train", size["train"]), task_data(task, tokenizer, "test", size["test"])
    base, pretrain_seconds = base_model(train, size, args.out, progress)
    eos = tokenizer.eos_token_id

    def evaluate(model, seed):
        return evaluate_widths(model, test.prompts, test.reward, test.extract_answer, test.answers, widths,
                               max_new_tokens=6, seed=seed, eos_token_id=eos)

    rows = [{"method": "base", "seed": s, **r} for s in seeds for r in evaluate(base, s)]
    for method in methods:
        for seed in seeds:
            spec = MethodSpec(seed=seed)
            spec.grpo.steps, spec.grpo.prompts_per_step = size["grpo_steps"], size["prompts_per_step"]
            spec.warmup.steps, spec.warmup_prompts = size["warmup_steps"], size["warmup_prompts"]
            start = time.perf_counter()
            model, log = train_method(base, method, train, spec, progress=progress)
            train_seconds = time.perf_counter() - start
            results = evaluate(model, seed)
            rows += [{"method": method, "seed": seed, **r} for r in results]
            json.dump({"train_seconds": train_seconds, "eval": results, **log},
                      open(os.path.join(args.out, "logs", f"{method}-{seed}.json"), "w"))
            by_width = " ".join(f"N={r['width']}:{100 * r['mean_accuracy']:.1f}" for r in results)
            print(f"[{method} seed {seed}] {train_seconds:.0f}s train; mean accuracy {by_width}", flush=True)

    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", "width", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, widths, methods)
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    table = "\n".join([markdown(summary, widths, methods), paired(rows, widths, methods, seeds),
                       diagnostics(args.out, methods, seeds)])
    total = time.perf_counter() - started
    command = "python experiments/width_experiment.py" + ("" if args.size == "default" else f" --size {args.size}")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"`{command}` — {len(seeds)} seeds, {total / 60:.1f} min "
                f"(base pretraining {pretrain_seconds:.0f} s), torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads\n\n{table}")
    plot(summary, widths, methods, os.path.join(args.out, "accuracy_vs_width.png"))
    print(table)
    print(f"wrote {args.out}/results.csv, summary.csv, summary.md, accuracy_vs_width.png in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
