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
   Tuned on seed 0 per method (validation problems, N = 8): what the warm-up trains (the added blocks, as in the
   paper, or every parameter with the added blocks at 10x) and the added blocks' GRPO lr multiplier. Every
   method is evaluated at widths 1..16; the Bridge checkpoints also solo (each sample alone), and with diagnostics
   (KL with peers || solo, attention entropy, answer loss with peers vs solo). Decisive comparisons, paired by problem
   with 95% bootstrap intervals: the same Bridge checkpoint with peers vs solo at N = 8, and Bridge vs the best
   P-Match at each width. Ablation: the same Bridge recipe on chains misaligned by random-length filler.
B. coordination: SubsetSumTask (several correct answers, all enumerated) with draws: a response starts with two
   random letters, which the base samples independently per row (without them the rows of a group are identical
   until they sample different tokens, and Bridge, permutation-equivariant, cannot make identical rows differ).
   Methods: grpo (the group reward below, no added block), pmatch-ranked and bridge-ranked (the ranked warm-up: a
   prompt's distinct correct answers reassigned so the row with the k-th smallest draw gives the k-th answer, a
   protocol only rows that read each other can follow; the warm-up trains every parameter, the added blocks at
   10x; then GRPO with the group reward: a correct answer earns 1 /
   the number of peers giving it). Measured at N = 4: distinct correct answers per group against the independence
   bound of the same checkpoint's solo samples, against the bound of its own with-peers answer frequencies
   (coordination proper), and against the independent methods.

Every training run is a job; the jobs run in three phases (bases; the learning-rate grid and the coordination
runs; the consensus runs with the chosen grid points and the ablation) on `--jobs` processes of one torch thread
each (default 2, one per core of the 2-core CPU the default size is sized for). Each job seeds itself, so the
results do not depend on the number of processes.

Writes OUT/<part>/: results.csv (every method, seed, width, peers), grid.csv, per-problem comparisons, summary.md
(the README's tables), and PNG plots; OUT/summary.md joins both parts.
"""

import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (run as a script or imported by the tests)
from common import (  # noqa: E402
    MAX_NEW_TOKENS,
    cached_base,
    evaluate,
    experiment_parser,
    grpo_summary,
    interval,
    mean_over,
    mean_std,
    method_spec,
    per_problem,
    run_jobs,
    write_csv,
)

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
        warmup_trains=["added", "all"],
        warmup_all=(3e-4, 10.0),
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
        lr_mults=[30.0, 100.0],  # (an earlier run: x1 < x10 < x30 for every method)
        warmup_trains=["added", "all"],  # the paper's warm-up of the added blocks, or of every parameter
        warmup_all=(3e-4, 10.0),  # lr and added-block multiplier of an every-parameter warm-up
        seeds=[0, 1, 2],
        widths=[1, 2, 4, 8, 16],
        solo_width=8,
        filler=2,
        diagnostics_problems=200,
    ),
}
COORDINATION = {
    "smoke": dict(
        task=dict(numbers=5, max_number=9, draw_length=2),
        hidden=32,
        layers=2,
        base_steps=3,
        base_batch=16,
        train=64,
        test=8,
        warmup_prompts=16,
        warmup_steps=2,
        warmup_trains="all",
        warmup_all=(3e-4, 10.0),
        grpo_steps=2,
        prompts_per_step=4,
        seeds=[0],
        width=2,
        groups=2,
        solo_samples=4,
        lr_mult=10.0,
    ),
    "default": dict(
        task=dict(draw_length=2),
        hidden=96,
        layers=4,
        base_steps=1500,
        base_batch=64,
        train=5000,
        test=500,
        warmup_prompts=5000,  # every train problem: the ranked protocol overfits 768 (held-out NLL above the base's)
        warmup_steps=1000,
        warmup_trains="all",  # Bridge alone learned no protocol (held-out first-answer NLL: peers = solo)
        warmup_all=(3e-4, 10.0),
        grpo_steps=100,
        prompts_per_step=16,
        seeds=[0, 1, 2],
        width=4,
        groups=4,
        solo_samples=16,
        lr_mult=10.0,  # the added blocks' GRPO learning-rate multiplier
    ),
}
CONSENSUS_METHODS = ("grpo", "pmatch-correct", "pmatch-repair", "bridge-repair")
COORDINATION_METHODS = ("grpo", "pmatch-ranked", "bridge-ranked")


# ---- shared steps -------------------------------------------------------------------------------------------------
# ---- jobs: every training run is one job, run on --jobs processes -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """What every job of one run needs: the sizes of both parts and where the run writes (picklable)."""

    size: str
    out: str
    progress: bool

    @property
    def consensus(self) -> dict:
        return CONSENSUS[self.size]

    @property
    def coordination(self) -> dict:
        return COORDINATION[self.size]


def consensus_data(setting: Setting, misaligned: bool = False):
    """(task data of train, test, validation problems, base directory) of the consensus part or its ablation."""
    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.tasks import ScratchpadSumTask
    from bridge_ops.train import task_data

    size = setting.consensus
    task = ScratchpadSumTask(**size["task"], max_filler=size["filler"] if misaligned else 0)
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", size["train"])
    test = task_data(task, tok, "test", size["test"])
    val = task_data(task, tok, "test", size["val"], skip=size["test"])
    directory = os.path.join(setting.out, "consensus", "base-misaligned" if misaligned else "base")
    return train, test, val, directory


def consensus_with_base(setting: Setting, misaligned: bool = False):
    """(train, test, validation task data, the pretrained base) of the consensus part or its ablation; the base
    must be in the cache (phase 1 put it there)."""
    train, test, val, directory = consensus_data(setting, misaligned)
    base, _ = cached_base(train, setting.consensus, directory, False)
    return train, test, val, base


def coordination_data(setting: Setting):
    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.tasks import SubsetSumTask
    from bridge_ops.train import task_data

    size = setting.coordination
    task = SubsetSumTask(**size["task"])
    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", size["train"])
    test = task_data(task, tok, "test", size["test"])
    return train, test, os.path.join(setting.out, "coordination", "base")


def job_base(setting: Setting, which: str) -> dict:
    """Pretrains (or loads from the cache) the base of `which`: 'aligned', 'misaligned' or 'subset'."""
    if which == "subset":
        train, _, directory = coordination_data(setting)
        size = setting.coordination
    else:
        train, _, _, directory = consensus_data(setting, misaligned=which == "misaligned")
        size = setting.consensus
    _, seconds = cached_base(train, size, directory, setting.progress)
    return {"job": "base", "which": which, "seconds": seconds}


def model_file(setting: Setting, method: str, choice: tuple) -> str:
    trains, mult = choice
    return os.path.join(setting.out, "consensus", "models", f"{method}-{trains}-x{mult:g}.pt")


def train_consensus(setting: Setting, method: str, seed: int, choice: tuple, misaligned: bool = False):
    """(model, training info, data) of one consensus run, from the cached base; choice: (what the warm-up trains,
    the added blocks' GRPO learning-rate multiplier)."""
    from bridge_ops.train.recipes import output_norm, train_method

    train, test, val, base = consensus_with_base(setting, misaligned)
    block = method.split("-")[0]
    trains, mult = choice
    spec = method_spec(
        setting.consensus, seed, trains=trains, groups_per_prompt=2 if block == "bridge" else 1, lr_mult=mult
    )
    start = time.perf_counter()
    model, train_log = train_method(base, method, train, spec, progress=setting.progress)
    grpo_log = train_log["grpo"]
    info = {
        "method": method,
        "seed": seed,
        "warmup_trains": trains,
        "lr_mult": mult,
        "train_seconds": time.perf_counter() - start,
        "warmup_groups": train_log.get("warmup_groups", [{}])[0].get("groups", 0),
        **grpo_summary(grpo_log),
        "output_norm": output_norm(model) if block != "grpo" else 0.0,
    }
    return model, info, (train, test, val, base)


def job_grid(setting: Setting, method: str, trains: str, mult: float) -> dict:
    """One point of the grid (seed 0; what the warm-up trains x the added blocks' GRPO lr multiplier): validation
    accuracy at N = solo_width; the model is kept on disk for the evaluation of seed 0 when its point wins."""
    choice = (trains, mult)
    model, info, (_, _, val, _) = train_consensus(setting, method, 0, choice)
    accuracy = evaluate(model, val, [setting.consensus["solo_width"]], seed=1000, details=False)[0]["mean_accuracy"]
    os.makedirs(os.path.dirname(model_file(setting, method, choice)), exist_ok=True)
    torch.save({"state": model.state_dict(), "info": info}, model_file(setting, method, choice))
    return {"job": "grid", **info, "val_accuracy": accuracy}


def job_consensus(setting: Setting, method: str, seed: int, choice: tuple, repair_groups=None) -> dict:
    """One method and seed at widths 1..16 (a Bridge checkpoint also solo, with its diagnostics on
    `repair_groups`, from `job_base_evaluation`)."""
    size = setting.consensus
    saved = model_file(setting, method, choice)
    if seed == 0 and os.path.exists(saved):  # the grid's run of this point
        from bridge_ops.train.recipes import add_block

        train, test, val, base = consensus_with_base(setting)
        model = copy.deepcopy(base)
        add_block(model, method.split("-")[0], method_spec(size, seed))
        checkpoint = torch.load(saved, weights_only=True)
        model.load_state_dict(checkpoint["state"])
        model.eval()
        info = checkpoint["info"]
    else:
        model, info, (train, test, val, base) = train_consensus(setting, method, seed, choice)
    results = evaluate(model, test, size["widths"], seed)
    record = {"job": "consensus", "method": method, "seed": seed, "info": info, "group": results}
    if method.startswith("bridge"):
        record["solo"] = evaluate(model, test, [size["solo_width"]], seed, peers="solo")
        record["diagnostics"] = bridge_diagnostics(model, repair_groups, test, size, seed)
    return record


def bridge_diagnostics(model, repair, test, size: dict, seed: int) -> Dict[str, float]:
    """KL(peers || solo), attention statistics and teacher-forced answer loss with peers vs solo on `repair` (the
    repair groups of the base's samples of the diagnostics problems, `diagnostic_repair_groups`)."""
    from bridge_ops.train import answer_loss, attention_stats, grouped_batch, peer_kl, rollout

    eos, pad, solo_width = test.tokenizer.eos_token_id, test.tokenizer.pad_token_id, size["solo_width"]
    diag = test.prompts[: size["diagnostics_problems"]]
    samples = rollout(
        model, diag, range(len(diag)), solo_width, MAX_NEW_TOKENS, (seed, "diagnostics"), eos_token_id=eos
    )
    batch = grouped_batch(diag, samples, pad)
    kl, attention = peer_kl(model, batch), attention_stats(model, batch)
    loss = {"with_peers": math.nan, "solo": math.nan}  # (no repair group when the base writes no answer: smoke size)
    if repair:
        loss = answer_loss(
            model,
            grouped_batch(
                [g.prompt for g in repair], [g.responses for g in repair], pad, [g.loss_masks for g in repair]
            ),
        )
    return {
        "seed": seed,
        "kl_peers_solo": kl["kl"],
        "argmax_changed": kl["argmax_changed"],
        "entropy_ratio": attention["entropy_ratio"],
        "self_weight_ratio": attention["self_weight_ratio"],
        "answer_nll_peers": loss["with_peers"],
        "answer_nll_solo": loss["solo"],
    }


def job_ablation(setting: Setting, seed: int, choice: tuple) -> dict:
    """The Bridge recipe on chains misaligned by filler: N = 1, N = solo_width with peers and solo."""
    size = setting.consensus
    model, _, (_, test, _, _) = train_consensus(setting, "bridge-repair", seed, choice, misaligned=True)
    peers = evaluate(model, test, [1, size["solo_width"]], seed)
    solo = evaluate(model, test, [size["solo_width"]], seed, peers="solo")[0]
    return {"job": "ablation", "seed": seed, "n1": peers[0], "peers": peers[1], "solo": solo}


def job_base_evaluation(setting: Setting) -> dict:
    """The base at N = 1 and N = solo_width, and the repair groups every Bridge checkpoint's diagnostics use."""
    from bridge_ops.train import collect_warmup_groups

    _, test, _, base = consensus_with_base(setting)
    size = setting.consensus
    repair_groups = collect_warmup_groups(
        base,
        test.prompts[: size["diagnostics_problems"]],
        8,
        "repair",
        repair_fn=test.repair,
        min_correct=1,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=99,
        eos_token_id=test.tokenizer.eos_token_id,
    )
    results = evaluate(base, test, [1, size["solo_width"]], 0)
    return {"job": "base-evaluation", "results": results, "repair_groups": repair_groups}


def job_coordination(setting: Setting, method: str, seed: int) -> dict:
    """One coordination run (method 'base': the base itself) and its distinct answers against the bounds."""
    from bridge_ops.train import distinct_answers
    from bridge_ops.train.recipes import train_method

    size = setting.coordination
    train, test, directory = coordination_data(setting)
    model, _ = cached_base(train, size, directory, False)
    start = time.perf_counter()
    if method != "base":
        spec = method_spec(size, seed, trains=size["warmup_trains"], width=size["width"], lr_mult=size["lr_mult"])
        model, _ = train_method(
            model, method, train, spec, progress=setting.progress, reward_fn=train.distinct_reward()
        )
    seconds = time.perf_counter() - start
    per_problem_results = distinct_answers(
        model,
        test.prompts,
        test.reward,
        test.extract_answer,
        size["width"],
        groups_per_prompt=size["groups"],
        solo_samples=size["solo_samples"],
        max_new_tokens=MAX_NEW_TOKENS,
        seed=seed,
        eos_token_id=test.tokenizer.eos_token_id,
    )
    return {"job": "coordination", "method": method, "seed": seed, "seconds": seconds, "results": per_problem_results}


# ---- A. consensus ---------------------------------------------------------------------------------------------------
def consensus_report(setting: Setting, grid: List[dict], runs: List[dict], ablation: List[dict], base_eval, seconds):
    """Writes the consensus part's CSV files, plot and summary.md from the jobs' results; returns the summary."""
    size, out = setting.consensus, os.path.join(setting.out, "consensus")
    best = best_choices(grid)
    grid_rows = [{k: v for k, v in r.items() if k not in ("job", "job_seconds")} for r in grid]
    evaluations, rows, train_info, diagnostics_rows = {}, [], [], []
    for r in runs:
        method, seed = r["method"], r["seed"]
        train_info.append(r["info"])
        evaluations[(method, seed, "group")] = {e["width"]: e for e in r["group"]}
        results = r["group"] + r.get("solo", [])
        if "solo" in r:
            evaluations[(method, seed, "solo")] = {e["width"]: e for e in r["solo"]}
            diagnostics_rows.append({"method": method, **r["diagnostics"]})
        rows += [{k: v for k, v in e.items() if k != "problems"} | {"method": method, "seed": seed} for e in results]
    write_csv(os.path.join(out, "grid.csv"), grid_rows)
    write_csv(os.path.join(out, "results.csv"), rows)
    write_csv(os.path.join(out, "training.csv"), train_info)
    write_csv(os.path.join(out, "diagnostics.csv"), diagnostics_rows)
    summary = consensus_summary(
        size, evaluations, best, grid_rows, train_info, diagnostics_rows, ablation, base_eval, seconds
    )
    consensus_plot(size, evaluations, os.path.join(out, "accuracy_vs_width.png"))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    return summary


def best_choices(grid: List[dict]) -> Dict[str, tuple]:
    """Per method, the grid point (what the warm-up trains, lr multiplier) with the best validation accuracy (the
    first in grid order among ties); grpo has no added block and no warm-up: ("added", 1)."""
    best = {"grpo": ("added", 1.0)}
    for method in CONSENSUS_METHODS[1:]:
        points = [r for r in grid if r["method"] == method]
        winner = max(points, key=lambda r: r["val_accuracy"])
        best[method] = (winner["warmup_trains"], winner["lr_mult"])
    return best


def consensus_summary(
    size,
    evaluations,
    best,
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
    def averaged(method, width, key="mean_accuracy"):
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
        "**Grid: what the warm-up trains x the added blocks' GRPO learning-rate multiplier** (seed 0, validation "
        f"accuracy at N={solo_width}; chosen: the best, *)",
        "",
        "| method | warm-up trains | " + " | ".join(f"x{m:g}" for m in size["lr_mults"]) + " |",
        "|---" * (len(size["lr_mults"]) + 2) + "|",
    ]
    for method in CONSENSUS_METHODS[1:]:
        for trains in size["warmup_trains"]:
            cells = [
                f"{100 * r['val_accuracy']:.1f}" + (" *" if (trains, m) == best[method] else "")
                for m in size["lr_mults"]
                for r in grid_rows
                if r["method"] == method and r["lr_mult"] == m and r["warmup_trains"] == trains
            ]
            lines.append(f"| {method} | {trains} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += [
        "**Training**, mean over seeds",
        "",
        "| method | warm-up trains, GRPO multiplier | seconds | warm-up groups | GRPO reward first -> last 10 steps "
        "| groups with zero advantage | added-block output norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in CONSENSUS_METHODS:
        infos = [i for i in train_info if i["method"] == method]
        avg = {k: statistics.mean(i[k] for i in infos) for k in infos[0] if isinstance(infos[0][k], (int, float))}
        trains, mult = best[method]
        lines.append(
            f"| {method} | {trains if method != 'grpo' else '-'}, x{mult:g} | {avg['train_seconds']:.0f} | "
            f"{avg['warmup_groups']:.0f} | "
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
def coordination_report(setting: Setting, runs: List[dict]) -> str:
    """Writes the coordination part's results.csv, plot and summary.md from the jobs' results; returns the summary."""
    from bridge_ops.train import paired_bootstrap

    size, out = setting.coordination, os.path.join(setting.out, "coordination")
    records = {(r["method"], r["seed"]): r["results"] for r in runs}
    rows = [{"method": m, "seed": s, "problem": i, **x} for (m, s), r in records.items() for i, x in enumerate(r)]
    write_csv(os.path.join(out, "results.csv"), rows)
    lines = [
        f"N = {size['width']}; responses start with a draw of {size['task']['draw_length']} random letters; the "
        f"ranked warm-up trains {size['warmup_trains']} parameters; GRPO "
        f"with the group reward, added-block lr multiplier x{size['lr_mult']:g}; {size['groups']} groups with peers "
        f"and {size['solo_samples']} solo samples per problem, {size['test']} test problems; differences per problem "
        "with 95% bootstrap intervals.",
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
    lines += ["", coordination_comparison(size, records)]
    summary = "\n".join(lines + [""])
    coordination_plot(records, size["width"], os.path.join(out, "distinct_vs_bound.png"))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    return summary


def coordination_comparison(size: dict, records: dict) -> str:
    """Bridge against the independent methods: distinct correct answers per group, per-problem means over seeds."""
    from bridge_ops.train import paired_bootstrap

    def averaged(method, key="distinct"):
        return mean_over([[x[key] for x in records[(method, s)]] for s in size["seeds"]])

    lines = [
        "**Bridge against independent samplers** (distinct correct answers per group, per-problem means over "
        "seeds, 95% bootstrap interval)",
        "",
        "| comparison | difference |",
        "|---|---|",
    ]
    bridge = averaged("bridge-ranked")
    lines.append(
        f"| bridge-ranked minus its own independence bound | "
        f"{interval(paired_bootstrap(bridge, averaged('bridge-ranked', 'bound')), 1.0, 3)} |"
    )
    for method in COORDINATION_METHODS:
        if method != "bridge-ranked":
            lines.append(
                f"| bridge-ranked minus {method} | {interval(paired_bootstrap(bridge, averaged(method)), 1.0, 3)} |"
            )
    return "\n".join(lines)


def coordination_plot(records, width, path) -> None:
    """Per model and seed: distinct correct answers per group minus each bound, with 95% bootstrap intervals (a bar
    above zero: more distinct answers than independent draws give)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bridge_ops.train import paired_bootstrap

    labels = [f"{m}\nseed {s}" for m, s in records]
    keys = (("bound", "minus the independence bound (solo)"), ("marginal_bound", "minus the own-frequency bound"))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    for k, (key, label) in enumerate(keys):
        cis = [paired_bootstrap([x["distinct"] for x in r], [x[key] for x in r]) for r in records.values()]
        ax.bar(
            [i + (k - 0.5) * 0.38 for i in range(len(labels))],
            [c["mean"] for c in cis],
            width=0.38,
            yerr=[[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]],
            capsize=3,
            label=label,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(f"distinct correct answers among N={width}\n(difference, 95% CI)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = experiment_parser(__doc__.split("\n")[0], CONSENSUS)
    parser.add_argument("--part", choices=["consensus", "coordination", "all"], default="all")
    args = parser.parse_args(argv)
    setting = Setting(args.size, args.out, progress=not args.no_progress and args.jobs == 1)
    consensus, coordination = args.part in ("consensus", "all"), args.part in ("coordination", "all")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    # phase 1: the bases the other jobs start from (the misaligned one only feeds phase 3, so it runs in phase 2)
    bases = run_jobs(
        [(job_base, (setting, w)) for w, wanted in (("aligned", consensus), ("subset", coordination)) if wanted],
        args.jobs,
        log,
    )
    # phase 2: the learning-rate grid of the consensus part, every coordination run
    size = setting.consensus
    phase2 = []
    if consensus:
        phase2 += [
            (job_grid, (setting, m, t, x))
            for m in CONSENSUS_METHODS[1:]
            for t in size["warmup_trains"]
            for x in size["lr_mults"]
        ]
        phase2 += [(job_base, (setting, "misaligned")), (job_base_evaluation, (setting,))]
    if coordination:
        phase2 += [(job_coordination, (setting, "base", 0))]
        phase2 += [
            (job_coordination, (setting, m, s)) for m in COORDINATION_METHODS for s in setting.coordination["seeds"]
        ]
    done = run_jobs(phase2, args.jobs, log)
    # phase 3: every consensus method and seed at its chosen grid point, and the misaligned ablation
    parts = []
    if consensus:
        grid = [r for r in done if r["job"] == "grid"]
        best = best_choices(grid)
        repair_groups = next(r["repair_groups"] for r in done if r["job"] == "base-evaluation")
        phase3 = [
            (job_consensus, (setting, m, s, best[m]) + ((repair_groups,) if m.startswith("bridge") else ()))
            for m in CONSENSUS_METHODS
            for s in size["seeds"]
        ]
        phase3 += [(job_ablation, (setting, s, best["bridge-repair"])) for s in size["seeds"]]
        finished = run_jobs(phase3, args.jobs, log)
        pretraining = sum(r["seconds"] for r in bases + done if r["job"] == "base" and r["which"] != "subset")
        summary = consensus_report(
            setting,
            grid,
            [r for r in finished if r["job"] == "consensus"],
            [r for r in finished if r["job"] == "ablation"],
            next(r["results"] for r in done if r["job"] == "base-evaluation"),
            pretraining,
        )
        parts.append(f"## A. Consensus (scratchpad sums)\n\n{summary}")
    if coordination:
        summary = coordination_report(setting, [r for r in done if r["job"] == "coordination"])
        parts.append(f"## B. Coordination (subset sum)\n\n{summary}")
    total = time.perf_counter() - started
    command = "python experiments/interdependence.py" + ("" if args.size == "default" else f" --size {args.size}")
    if args.part != "all":
        command += f" --part {args.part}"
    header = (
        f"`{command}`: {total / 60:.1f} min on {args.jobs} process(es) of 1 torch thread, torch {torch.__version__}\n\n"
    )
    with open(os.path.join(args.out, "summary.md" if args.part == "all" else f"summary-{args.part}.md"), "w") as f:
        f.write(header + "\n".join(parts))
    print(header + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
