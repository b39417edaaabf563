"""Do the N samples of a prompt use each other? Two experiments built for interdependence, measured decisively.

    python experiments/interdependence.py                           # both parts, default size (one 2-core CPU)
    python experiments/interdependence.py --part consensus --size smoke

A. consensus: ScratchpadSumTask (`3+7+2+9=` -> `10,12,21>21`, running sums at aligned positions), with a base
   pretrained on chains that contain slips, so its samples make independent slips. Methods, each from the same base:
       grpo            GRPO on every parameter ("RLVR only")
       pmatch-correct  a parameter-matched MLP, warmed up on the base's correct samples (rejection sampling), GRPO
       pmatch-repair   the same MLP warmed up on the repair data below, GRPO
       bridge-repair   Bridge warmed up on repair data (each sample keeps its own chain and gets the correct answer;
                       the loss covers the whole response of rows whose chain was right and only the answer of the
                       others), then GRPO with k groups per prompt
   The added blocks' learning-rate multiplier is tuned on seed 0 per method (validation problems, N = 8). Every
   method is evaluated at widths 1..16; the Bridge checkpoints also solo (each sample alone), and with diagnostics
   (KL with peers || solo, attention entropy, answer loss with peers vs solo). Decisive comparisons, paired by problem
   with 95% bootstrap intervals: the same Bridge checkpoint with peers vs solo at N = 8, and Bridge vs the best
   P-Match at each width. Ablation: the same Bridge recipe on chains misaligned by random-length filler.
B. coordination: SubsetSumTask (several correct answers, all enumerated). Bridge warmed up on groups of distinct
   correct samples, then GRPO with a group reward (a correct answer earns 1 / the number of peers giving it).
   Measured at N = 4: distinct correct answers per group against the independence bound of the same checkpoint's
   solo samples, and against the bound of its own with-peers answer frequencies (coordination proper). Control: the
   same pipeline without Bridge (grpo with the same group reward), whose groups are independent by construction.

Writes OUT/<part>/: results.csv (every method, seed, width, peers), grid.csv, per-problem comparisons, summary.md
(the README's tables), and PNG plots; OUT/summary.md joins both parts.
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

CONSENSUS = {
    "smoke": dict(
        task=dict(terms=3, min_operand=1, max_operand=9, slip_rate=0.15),
        hidden=32,
        layers=2,
        base_steps=3,
        base_batch=16,
        train=64,
        val=8,
        test=8,
        warmup_prompts=16,
        warmup_steps=2,
        grpo_steps=2,
        prompts_per_step=4,
        lr_mults=[1.0, 10.0],
        seeds=[0],
        widths=[1, 2],
        solo_width=2,
        filler=1,
        diagnostics_problems=4,
    ),
    "default": dict(
        task=dict(terms=4, min_operand=1, max_operand=9, slip_rate=0.15),
        hidden=96,
        layers=4,
        base_steps=1500,
        base_batch=64,
        train=5000,
        val=200,
        test=1000,
        warmup_prompts=768,
        warmup_steps=300,
        grpo_steps=100,
        prompts_per_step=16,
        lr_mults=[1.0, 10.0, 30.0],
        seeds=[0, 1, 2],
        widths=[1, 2, 4, 8, 16],
        solo_width=8,
        filler=2,
        diagnostics_problems=200,
    ),
}
COORDINATION = {
    "smoke": dict(
        task=dict(numbers=5, max_number=9),
        hidden=32,
        layers=2,
        base_steps=3,
        base_batch=16,
        train=64,
        test=8,
        warmup_prompts=16,
        warmup_steps=2,
        grpo_steps=2,
        prompts_per_step=4,
        seeds=[0],
        width=2,
        groups=2,
        solo_samples=4,
        lr_mult=10.0,
    ),
    "default": dict(
        task=dict(),
        hidden=96,
        layers=4,
        base_steps=1500,
        base_batch=64,
        train=5000,
        test=500,
        warmup_prompts=768,
        warmup_steps=300,
        grpo_steps=100,
        prompts_per_step=16,
        seeds=[0, 1, 2],
        width=4,
        groups=4,
        solo_samples=16,
        lr_mult=10.0,  # the added blocks' GRPO learning-rate multiplier (consensus grid: 10-30 best)
    ),
}
CONSENSUS_METHODS = ("grpo", "pmatch-correct", "pmatch-repair", "bridge-repair")
MAX_NEW_TOKENS = 16


# ---- shared steps -------------------------------------------------------------------------------------------------
def cached_base(train, size: dict, directory: str, progress: bool):
    """The pretrained base from `directory` when it was made with the same spec and task, else pretrained and saved.
    Returns (model, seconds spent pretraining now)."""
    from transformers import AutoModelForCausalLM

    from bridge_ops.train.recipes import BaseSpec, pretrain_base

    spec = BaseSpec(
        hidden_size=size["hidden"], num_layers=size["layers"], steps=size["base_steps"], batch=size["base_batch"]
    )
    stamp = {"spec": dataclasses.asdict(spec), "task": repr(train.task), "problems": len(train.problems)}
    stamp_file = os.path.join(directory, "base_spec.json")
    if os.path.exists(stamp_file) and json.load(open(stamp_file)) == stamp:
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval(), 0.0
    start = time.perf_counter()
    model = pretrain_base(train, spec, progress=progress)
    seconds = time.perf_counter() - start
    model.save_pretrained(directory)
    json.dump(stamp, open(stamp_file, "w"))
    return model, seconds


def method_spec(size: dict, seed: int, lr_mult: float = 1.0, width: int = 4, groups_per_prompt: int = 1):
    from bridge_ops.train.recipes import MethodSpec

    spec = MethodSpec(seed=seed)
    spec.warmup_prompts = size["warmup_prompts"]
    spec.warmup.steps = size["warmup_steps"]
    spec.grpo.steps, spec.grpo.prompts_per_step = size["grpo_steps"], size["prompts_per_step"]
    spec.grpo.width, spec.grpo.groups_per_prompt = width, groups_per_prompt
    spec.grpo.max_new_tokens, spec.grpo.added_lr_mult = MAX_NEW_TOKENS, lr_mult
    return spec


def evaluate(model, data, widths, seed, peers="group", details=True):
    from bridge_ops.train import evaluate_widths

    return evaluate_widths(
        model,
        data.prompts,
        data.reward,
        data.extract_answer,
        data.answers,
        widths,
        peers=peers,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=seed,
        eos_token_id=data.tokenizer.eos_token_id,
        rows_per_batch=1024,
        details=details,
    )


def per_problem(entry: dict, key: str = "accuracy") -> List[float]:
    """Per-problem values of one evaluation entry: mean accuracy over the samples, or the majority vote."""
    if key == "accuracy":
        return [sum(p["correct"]) / len(p["correct"]) for p in entry["problems"]]
    return [float(p["vote_correct"]) for p in entry["problems"]]


def mean_over(lists: List[List[float]]) -> List[float]:
    """Element-wise mean of equally long lists (per-problem values averaged over seeds)."""
    return [statistics.mean(values) for values in zip(*lists)]


def interval(ci: dict, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * ci['mean']:+.{digits}f} [{scale * ci['low']:+.{digits}f}, {scale * ci['high']:+.{digits}f}]"


def write_csv(path: str, rows: List[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values: List[float], scale: float = 100.0) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.1f} ± {scale * std:.1f}"


# ---- A. consensus ---------------------------------------------------------------------------------------------------
def consensus(size: dict, out: str, progress: bool, log) -> str:
    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.tasks import ScratchpadSumTask
    from bridge_ops.train import (
        answer_loss,
        attention_stats,
        collect_warmup_groups,
        grouped_batch,
        peer_kl,
        rollout,
        task_data,
    )
    from bridge_ops.train.recipes import output_norm, train_method

    os.makedirs(out, exist_ok=True)
    task = ScratchpadSumTask(**size["task"])
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", size["train"])
    test = task_data(task, tok, "test", size["test"])
    val = task_data(task, tok, "test", size["val"], skip=size["test"])
    base, pretrain_seconds = cached_base(train, size, os.path.join(out, "base"), progress)
    eos, widths, solo_width = tok.eos_token_id, size["widths"], size["solo_width"]
    log(f"[consensus] base ready ({pretrain_seconds:.0f} s of pretraining)")

    # diagnostics data: repair groups from the base's samples of test problems (teacher-forced answer loss)
    diag = test.prompts[: size["diagnostics_problems"]]
    repair_groups = collect_warmup_groups(
        base,
        diag,
        8,
        "repair",
        repair_fn=test.repair,
        min_correct=1,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=99,
        eos_token_id=eos,
    )
    repair_batch = None
    if repair_groups:  # (none when the base writes no answer at all, as at the smoke size)
        repair_batch = grouped_batch(
            [g.prompt for g in repair_groups],
            [g.responses for g in repair_groups],
            tok.pad_token_id,
            [g.loss_masks for g in repair_groups],
        )

    def bridge_diagnostics(model, seed) -> Dict[str, float]:
        samples = rollout(
            model, diag, range(len(diag)), solo_width, MAX_NEW_TOKENS, (seed, "diagnostics"), eos_token_id=eos
        )
        batch = grouped_batch([diag[i] for i in range(len(diag))], samples, tok.pad_token_id)
        kl, attention = peer_kl(model, batch), attention_stats(model, batch)
        loss = answer_loss(model, repair_batch) if repair_batch else {"with_peers": math.nan, "solo": math.nan}
        return {
            "kl_peers_solo": kl["kl"],
            "argmax_changed": kl["argmax_changed"],
            "entropy_ratio": attention["entropy_ratio"],
            "self_weight_ratio": attention["self_weight_ratio"],
            "answer_nll_peers": loss["with_peers"],
            "answer_nll_solo": loss["solo"],
        }

    rows, diagnostics_rows, grid_rows, evaluations = [], [], [], {}
    trained: Dict[tuple, object] = {}

    def run(method, seed, mult):
        block = method.split("-")[0]
        spec = method_spec(size, seed, mult, width=4, groups_per_prompt=2 if block == "bridge" else 1)
        start = time.perf_counter()
        model, train_log = train_method(base, method, train, spec, progress=progress)
        seconds = time.perf_counter() - start
        grpo_log = train_log["grpo"]
        info = {
            "method": method,
            "seed": seed,
            "lr_mult": mult,
            "train_seconds": seconds,
            "warmup_groups": train_log.get("warmup_groups", [{}])[0].get("groups", 0),
            "zero_advantage": statistics.mean(h["zero_advantage"] for h in grpo_log),
            "reward_first": statistics.mean(h["reward"] for h in grpo_log[:10]),
            "reward_last": statistics.mean(h["reward"] for h in grpo_log[-10:]),
            "output_norm": output_norm(model) if block != "grpo" else 0.0,
        }
        return model, info

    # 1. tune the added blocks' learning-rate multiplier on seed 0 (validation problems, N = solo_width)
    best_mult = {"grpo": 1.0}
    for method in CONSENSUS_METHODS[1:]:
        scores = {}
        for mult in size["lr_mults"]:
            model, info = run(method, 0, mult)
            accuracy = evaluate(model, val, [solo_width], seed=1000, details=False)[0]["mean_accuracy"]
            grid_rows.append({**info, "val_accuracy": accuracy})
            scores[mult] = accuracy
            trained[(method, 0, mult)] = (model, info)
            log(f"[consensus] grid {method} x{mult:g}: val accuracy at N={solo_width} {100 * accuracy:.1f}")
        best_mult[method] = max(scores, key=scores.get)
    write_csv(os.path.join(out, "grid.csv"), grid_rows)

    # 2. every method and seed at widths 1..16 (Bridge also solo, with diagnostics)
    train_info = []
    for method in CONSENSUS_METHODS:
        for seed in size["seeds"]:
            mult = best_mult[method]
            model, info = trained.pop((method, seed, mult), None) or run(method, seed, mult)
            train_info.append(info)
            results = evaluate(model, test, widths, seed)
            evaluations[(method, seed, "group")] = {r["width"]: r for r in results}
            if method.startswith("bridge"):
                solo = evaluate(model, test, [solo_width], seed, peers="solo")
                evaluations[(method, seed, "solo")] = {r["width"]: r for r in solo}
                results = results + solo
                diagnostics_rows.append({"method": method, "seed": seed, **bridge_diagnostics(model, seed)})
            rows += [
                {k: v for k, v in r.items() if k != "problems"} | {"method": method, "seed": seed} for r in results
            ]
            by_width = " ".join(
                f"N={r['width']}{'s' if r['peers'] == 'solo' else ''}:{100 * r['mean_accuracy']:.1f}" for r in results
            )
            log(f"[consensus] {method} seed {seed} (x{mult:g}, {info['train_seconds']:.0f} s): {by_width}")
        trained.clear()

    # 3. ablation: the Bridge recipe on misaligned chains
    ablation = []
    misaligned = ScratchpadSumTask(**size["task"], max_filler=size["filler"])
    m_tok = char_tokenizer(misaligned.alphabet)
    m_train = task_data(misaligned, m_tok, "train", size["train"])
    m_test = task_data(misaligned, m_tok, "test", size["test"])
    m_base, m_seconds = cached_base(m_train, size, os.path.join(out, "base-misaligned"), progress)
    for seed in size["seeds"]:
        spec = method_spec(size, seed, best_mult["bridge-repair"], width=4, groups_per_prompt=2)
        model, _ = train_method(m_base, "bridge-repair", m_train, spec, progress=progress)
        peers = evaluate(model, m_test, [1, solo_width], seed)
        solo = evaluate(model, m_test, [solo_width], seed, peers="solo")[0]
        ablation.append({"seed": seed, "n1": peers[0], "peers": peers[1], "solo": solo})
        log(
            f"[consensus] misaligned seed {seed}: N=1 {100 * peers[0]['mean_accuracy']:.1f}, N={solo_width} peers "
            f"{100 * peers[1]['mean_accuracy']:.1f}, solo {100 * solo['mean_accuracy']:.1f}"
        )

    write_csv(os.path.join(out, "results.csv"), rows)
    write_csv(os.path.join(out, "training.csv"), train_info)
    write_csv(os.path.join(out, "diagnostics.csv"), diagnostics_rows)
    base_eval = evaluate(base, test, [1, solo_width], 0)
    summary = consensus_summary(
        size,
        evaluations,
        best_mult,
        grid_rows,
        train_info,
        diagnostics_rows,
        ablation,
        base_eval,
        pretrain_seconds + m_seconds,
    )
    consensus_plot(size, evaluations, os.path.join(out, "accuracy_vs_width.png"))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    return summary


def consensus_summary(
    size,
    evaluations,
    best_mult,
    grid_rows,
    train_info,
    diagnostics_rows,
    ablation,
    base_eval,
    pretrain_seconds,
) -> str:
    from bridge_ops.train import paired_bootstrap

    seeds, widths, solo_width = size["seeds"], size["widths"], size["solo_width"]
    lines = [
        f"Base: {100 * base_eval[0]['mean_accuracy']:.1f}% mean accuracy at N=1, majority vote of "
        f"{solo_width} independent samples {100 * base_eval[1]['majority_accuracy']:.1f}% "
        f"(pretraining in this run: {pretrain_seconds:.0f} s; bases loaded from the cache count 0).",
        "",
    ]
    for metric, title in (
        ("mean_accuracy", "mean accuracy (Pass@1 over the N samples), with peers"),
        ("majority_accuracy", "majority-vote accuracy"),
    ):
        lines += [
            f"**{title}**, mean ± std over {len(seeds)} seeds",
            "",
            "| method | " + " | ".join(f"N={w}" for w in widths) + f" | solo N={solo_width} |",
            "|---" * (len(widths) + 2) + "|",
        ]
        for method in CONSENSUS_METHODS:
            cells = [mean_std([evaluations[(method, s, "group")][w][metric] for s in seeds]) for w in widths]
            solo = "-"
            if (method, seeds[0], "solo") in evaluations:
                solo = mean_std([evaluations[(method, s, "solo")][solo_width][metric] for s in seeds])
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {solo} |")
        lines.append("")

    # decisive comparison 1: the same checkpoint with peers vs solo
    lines += [
        f"**Bridge with peers vs the same checkpoint solo at N={solo_width}** (mean accuracy, points; per "
        "problem, 95% bootstrap interval)",
        "",
        "| seed | with peers | solo | difference [95% CI] |",
        "|---|---|---|---|",
    ]
    pooled_peers, pooled_solo = [], []
    for seed in seeds:
        peers = per_problem(evaluations[("bridge-repair", seed, "group")][solo_width])
        solo = per_problem(evaluations[("bridge-repair", seed, "solo")][solo_width])
        pooled_peers.append(peers)
        pooled_solo.append(solo)
        lines.append(
            f"| {seed} | {100 * statistics.mean(peers):.1f} | {100 * statistics.mean(solo):.1f} | "
            f"{interval(paired_bootstrap(peers, solo))} |"
        )
    pooled = paired_bootstrap(mean_over(pooled_peers), mean_over(pooled_solo))
    lines += [
        f"| all (per-problem means over seeds) | {100 * statistics.mean(mean_over(pooled_peers)):.1f} | "
        f"{100 * statistics.mean(mean_over(pooled_solo)):.1f} | {interval(pooled)} |",
        "",
    ]

    # decisive comparison 2: Bridge vs the best P-Match, per width
    def averaged(method, width, key="accuracy"):
        return mean_over([per_problem(evaluations[(method, s, "group")][width], key) for s in seeds])

    pmatches = [m for m in CONSENSUS_METHODS if m.startswith("pmatch")]
    best_pmatch = max(pmatches, key=lambda m: statistics.mean(statistics.mean(averaged(m, w)) for w in widths))
    lines += [
        f"**Bridge vs the best P-Match ({best_pmatch}) and vs GRPO-only**, per width (points, per-problem "
        "means over seeds, 95% bootstrap interval)",
        "",
        f"| width | bridge-repair minus {best_pmatch} | bridge-repair minus grpo |",
        "|---|---|---|",
    ]
    for w in widths:
        bridge = averaged("bridge-repair", w)
        lines.append(
            f"| {w} | {interval(paired_bootstrap(bridge, averaged(best_pmatch, w)))} | "
            f"{interval(paired_bootstrap(bridge, averaged('grpo', w)))} |"
        )
    lines.append("")

    lines += [
        "**Learning-rate multiplier of the added blocks** (seed 0, validation accuracy at "
        f"N={solo_width}; chosen: the best)",
        "",
        "| method | " + " | ".join(f"x{m:g}" for m in size["lr_mults"]) + " |",
        "|---" * (len(size["lr_mults"]) + 1) + "|",
    ]
    for method in CONSENSUS_METHODS[1:]:
        cells = [
            f"{100 * r['val_accuracy']:.1f}" + (" *" if m == best_mult[method] else "")
            for m in size["lr_mults"]
            for r in grid_rows
            if r["method"] == method and r["lr_mult"] == m
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += [
        "**Training**, mean over seeds",
        "",
        "| method | seconds | warm-up groups | GRPO reward first -> last 10 steps | groups with zero advantage "
        "| added-block output norm |",
        "|---|---|---|---|---|---|",
    ]
    for method in CONSENSUS_METHODS:
        infos = [i for i in train_info if i["method"] == method]
        avg = {k: statistics.mean(i[k] for i in infos) for k in infos[0] if isinstance(infos[0][k], (int, float))}
        lines.append(
            f"| {method} | {avg['train_seconds']:.0f} | {avg['warmup_groups']:.0f} | "
            f"{avg['reward_first']:.2f} -> {avg['reward_last']:.2f} | {100 * avg['zero_advantage']:.0f}% | "
            f"{avg['output_norm']:.2f} |"
        )
    lines.append("")

    lines += [
        "**Diagnostics of the Bridge checkpoints** (test problems; uniform mean-pool = 1.00 / 1.00)",
        "",
        "| seed | KL(peers ‖ solo) per token | argmax changed | attention entropy / log n | n x self weight "
        "| answer NLL with peers | solo |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in diagnostics_rows:
        lines.append(
            f"| {d['seed']} | {d['kl_peers_solo']:.4f} | {100 * d['argmax_changed']:.1f}% | "
            f"{d['entropy_ratio']:.3f} | {d['self_weight_ratio']:.2f} | {d['answer_nll_peers']:.3f} | "
            f"{d['answer_nll_solo']:.3f} |"
        )
    lines.append("")

    lines += [
        f"**Ablation: chains misaligned by filler** (bridge-repair, N={solo_width}, mean accuracy)",
        "",
        "| seed | N=1 | with peers | solo | difference [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for a in ablation:
        diff = paired_bootstrap(per_problem(a["peers"]), per_problem(a["solo"]))
        lines.append(
            f"| {a['seed']} | {100 * a['n1']['mean_accuracy']:.1f} | {100 * a['peers']['mean_accuracy']:.1f} "
            f"| {100 * a['solo']['mean_accuracy']:.1f} | {interval(diff)} |"
        )
    return "\n".join(lines + [""])


def consensus_plot(size, evaluations, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, widths, solo_width = size["seeds"], size["widths"], size["solo_width"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in zip(
        axes, ("mean_accuracy", "majority_accuracy"), ("mean accuracy (each sample)", "majority-vote accuracy")
    ):
        for method in CONSENSUS_METHODS:
            values = [[evaluations[(method, s, "group")][w][metric] for s in seeds] for w in widths]
            ax.errorbar(
                widths,
                [statistics.mean(v) for v in values],
                yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
                marker="o",
                capsize=3,
                label=method,
            )
            if (method, seeds[0], "solo") in evaluations:
                solo = [evaluations[(method, s, "solo")][solo_width][metric] for s in seeds]
                ax.plot(
                    [solo_width],
                    [statistics.mean(solo)],
                    marker="x",
                    markersize=10,
                    color="black",
                    linestyle="none",
                    label=f"{method}, each sample alone",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width N (samples per problem)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- B. coordination ------------------------------------------------------------------------------------------------
def coordination(size: dict, out: str, progress: bool, log) -> str:
    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.tasks import SubsetSumTask
    from bridge_ops.train import distinct_answers, paired_bootstrap, task_data
    from bridge_ops.train.recipes import train_method

    os.makedirs(out, exist_ok=True)
    task = SubsetSumTask(**size["task"])
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", size["train"])
    test = task_data(task, tok, "test", size["test"])
    base, pretrain_seconds = cached_base(train, size, os.path.join(out, "base"), progress)
    log(f"[coordination] base ready ({pretrain_seconds:.0f} s of pretraining)")
    width = size["width"]

    def measure(model, seed):
        return distinct_answers(
            model,
            test.prompts,
            test.reward,
            test.extract_answer,
            width,
            groups_per_prompt=size["groups"],
            solo_samples=size["solo_samples"],
            max_new_tokens=MAX_NEW_TOKENS,
            seed=seed,
            eos_token_id=tok.eos_token_id,
        )

    records = {("base", 0): measure(base, 0)}
    for method in ("grpo", "bridge-distinct"):
        for seed in size["seeds"]:
            spec = method_spec(size, seed, size["lr_mult"], width=width)
            model, _ = train_method(base, method, train, spec, progress=progress, reward_fn=train.distinct_reward())
            records[(method, seed)] = measure(model, seed)
            r = records[(method, seed)]
            log(
                f"[coordination] {method} seed {seed}: distinct {statistics.mean(x['distinct'] for x in r):.3f}, "
                f"bound {statistics.mean(x['bound'] for x in r):.3f}"
            )
    rows = [{"method": m, "seed": s, "problem": i, **x} for (m, s), r in records.items() for i, x in enumerate(r)]
    write_csv(os.path.join(out, "results.csv"), rows)
    lines = [
        f"N = {width}; GRPO with the group reward, added-block lr multiplier x{size['lr_mult']:g}; "
        f"{size['groups']} groups with peers and {size['solo_samples']} solo samples per problem, "
        f"{size['test']} test problems; differences per problem with 95% bootstrap intervals.",
        "",
        "| model | seed | valid (peers) | valid (solo) | distinct correct per group | independence bound (solo) "
        "| minus bound | marginal bound (peers' own frequencies) | minus marginal bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, seed), r in records.items():

        def col(key):
            return [x[key] for x in r]  # noqa: B023 (used within this iteration only)

        lines.append(
            f"| {method} | {seed} | {100 * statistics.mean(col('valid')):.1f}% | "
            f"{100 * statistics.mean(col('valid_solo')):.1f}% | {statistics.mean(col('distinct')):.3f} | "
            f"{statistics.mean(col('bound')):.3f} | "
            f"{interval(paired_bootstrap(col('distinct'), col('bound')), 1.0, 3)} | "
            f"{statistics.mean(col('marginal_bound')):.3f} | "
            f"{interval(paired_bootstrap(col('distinct'), col('marginal_bound')), 1.0, 3)} |"
        )
    summary = "\n".join(lines + [""])
    coordination_plot(records, width, os.path.join(out, "distinct_vs_bound.png"))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    return summary


def coordination_plot(records, width, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{m}\nseed {s}" for m, s in records]
    keys = (
        ("distinct", "distinct correct per group (peers)"),
        ("bound", "independence bound (solo)"),
        ("marginal_bound", "bound of the peers' own frequencies"),
    )
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    for k, (key, label) in enumerate(keys):
        values = [statistics.mean(x[key] for x in r) for r in records.values()]
        ax.bar([i + (k - 1) * 0.27 for i in range(len(labels))], values, width=0.27, label=label)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(f"distinct correct answers among N={width}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["smoke", "default"], default="default")
    parser.add_argument("--part", choices=["consensus", "coordination", "all"], default="all")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    parts = []
    if args.part in ("consensus", "all"):
        summary = consensus(CONSENSUS[args.size], os.path.join(args.out, "consensus"), not args.no_progress, log)
        parts.append(f"## A. Consensus (scratchpad sums)\n\n{summary}")
    if args.part in ("coordination", "all"):
        summary = coordination(
            COORDINATION[args.size], os.path.join(args.out, "coordination"), not args.no_progress, log
        )
        parts.append(f"## B. Coordination (subset sum)\n\n{summary}")
    total = time.perf_counter() - started
    command = "python experiments/interdependence.py" + ("" if args.size == "default" else f" --size {args.size}")
    if args.part != "all":
        command += f" --part {args.part}"
    header = f"`{command}`: {total / 60:.1f} min, torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
    with open(os.path.join(args.out, "summary.md" if args.part == "all" else f"summary-{args.part}.md"), "w") as f:
        f.write(header + "\n".join(parts))
    print(header + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
