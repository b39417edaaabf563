"""A, round 2: is Bridge better than what a user would do otherwise, at equal compute, on a test set fixed first?

    python experiments/fair_consensus.py                 # default size (one 2-core CPU; time in summary.md)
    python experiments/fair_consensus.py --size smoke    # seconds (the test suite)

Pre-registered in experiments/preregistration.md, committed before the default run: the task, the methods and their
budgets, the tuning grid, the confirmatory test set and the analysis below. Nothing is chosen on test problems.

Task: ScratchpadSumTask (running sums at aligned positions) with slips in the pretraining chains, a variant never
run before this experiment, on which majority voting over independent samples is not saturated.
Methods, each from a base pretrained with the run's seed (one base per seed):
    grpo          GRPO on every parameter ("RLVR only": the paper's baseline, the denominator of its relative gain)
    grpo-correct  rejection-sampling fine-tuning of every parameter on the base's correct samples, then GRPO: the
                  independent baseline with a warm-up
    pmatch        a parameter-matched MLP per layer (the paper's P-Match), warmed up, then GRPO
    bridge        Bridge warmed up on repair data (each sample keeps its own chain and gets the correct answer), then
                  GRPO; its samples read each other
Equal compute: every GRPO run draws k = 2 groups of 4 per prompt (8 rollouts), 16 prompts per step, 100 steps; every
warm-up samples 8 responses of the same 768 prompts from the base and takes 300 steps of 16 groups.
Equal tuning (at least as much for every baseline as for Bridge): a grid on seed 0, scored by the mean accuracy at
N = 8 on 200 validation problems; each method's winner is used for every seed:
    grpo, grpo-correct   the GRPO learning rate: 1e-5, 3e-5, 1e-4, 3e-4 (4 points each)
    pmatch               warm-up data correct | repair x warm-up trains added | all x added-block GRPO lr x30 | x100 (8)
    bridge               warm-up trains added | all x added-block GRPO lr x30 | x100 (4)
Confirmatory test set: 1,000 problems of the task's test split drawn from a stream (split seed 1) no earlier run
used, minus every problem of the validation stream; evaluated once, at widths 1, 2, 4, 8, 16 with temperature 1 (and
the Bridge checkpoints solo at N = 8: each sample alone).

Reported per width: mean accuracy (Pass@1 over the N samples), all-correct rate, Pass@N, majority vote; Bridge minus
each baseline with a seed-level interval (t over the seeds' differences) and a problem-level bootstrap (per-problem
means over seeds); the paper's relative gain (Bridge's gain over the base / GRPO's gain over the base) per seed. The
goals are judged in summary.md by the rules in preregistration.md.

Writes OUT/fair_consensus/: results.csv (every method, seed, width, peers), problems.csv.gz (every problem of every
evaluation), grid.csv, training.csv, summary.md and accuracy_vs_width.png.
"""

import csv
import dataclasses
import gzip
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (run as a script or imported by the tests)
import common  # noqa: E402
from common import (  # noqa: E402
    cached_base,
    confirmatory_data,
    evaluate,
    experiment_parser,
    grpo_summary,
    interval,
    mean_over,
    mean_std,
    method_spec,
    per_problem,
    run_jobs,
    seed_interval,
    write_csv,
)

SIZES = {
    "smoke": dict(
        task=dict(terms=3, min_operand=1, max_operand=9, slip_rate=0.25),
        max_new_tokens=16,
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
        warmup_all=(3e-4, 10.0),
        grpo_lrs=[3e-5],
        pmatch_grid=[("correct", "added", 10.0), ("repair", "all", 10.0)],
        bridge_grid=[("added", 10.0)],
        seeds=[0, 1],
        widths=[1, 2],
        solo_width=2,
    ),
    "default": dict(
        task=dict(terms=5, min_operand=1, max_operand=20, slip_rate=0.1),  # chosen on validation: preregistration.md
        max_new_tokens=20,  # "034,046,047,062>062" and EOS
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
        warmup_all=(3e-4, 10.0),  # lr and added-block multiplier of a warm-up that trains every parameter
        grpo_lrs=[1e-5, 3e-5, 1e-4, 3e-4],
        pmatch_grid=[(d, t, m) for d in ("correct", "repair") for t in ("added", "all") for m in (30.0, 100.0)],
        bridge_grid=[(t, m) for t in ("added", "all") for m in (30.0, 100.0)],
        seeds=[0, 1, 2, 3, 4],
        widths=[1, 2, 4, 8, 16],
        solo_width=8,
    ),
}
METHODS = ("grpo", "grpo-correct", "pmatch", "bridge")
INDEPENDENT = ("grpo", "grpo-correct", "pmatch")
WIDTH, GROUPS_PER_PROMPT = 4, 2  # every method's GRPO: k groups of N per prompt
VALIDATION_STREAM, TEST_STREAM = 0, 1  # split seeds: validation (tuning) and the confirmatory test set


class Setting(common.Setting):
    """What every job of one run needs (picklable)."""

    SIZES, NAME = SIZES, "fair_consensus"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One grid point: the warm-up data (None: no warm-up), what it trains, GRPO's lr, the added blocks' multiplier."""

    warmup: str = None
    trains: str = "added"
    lr: float = 3e-5
    mult: float = 1.0

    def name(self) -> str:
        warmup = f"{self.warmup}/{self.trains}" if self.warmup else "-"
        return f"warm-up {warmup}, lr {self.lr:g} x{self.mult:g}"


def grid(size: dict) -> Dict[str, List[Choice]]:
    """Every method's grid points (see the module docstring)."""
    return {
        "grpo": [Choice(lr=lr) for lr in size["grpo_lrs"]],
        "grpo-correct": [Choice("correct", "all", lr) for lr in size["grpo_lrs"]],
        "pmatch": [Choice(d, t, mult=m) for d, t, m in size["pmatch_grid"]],
        "bridge": [Choice("repair", t, mult=m) for t, m in size["bridge_grid"]],
    }


def data(setting: Setting):
    """(train, validation, confirmatory test) task data. The test set is the test split's TEST_STREAM without any
    problem of the validation stream's first test + val problems (the stream a pilot may have looked at)."""
    from bridge_ops.tasks import ScratchpadSumTask

    return confirmatory_data(ScratchpadSumTask(**setting.spec["task"]), setting.spec, VALIDATION_STREAM, TEST_STREAM)


def base_dir(setting: Setting, seed: int) -> str:
    return os.path.join(setting.directory, f"base-seed{seed}")


def choice_spec(size: dict, seed: int, choice: Choice):
    """The MethodSpec of a grid point: every method's GRPO at WIDTH x GROUPS_PER_PROMPT rollouts per prompt."""
    return method_spec(
        size,
        seed,
        trains=choice.trains,
        width=WIDTH,
        groups_per_prompt=GROUPS_PER_PROMPT,
        lr=choice.lr,
        lr_mult=choice.mult,
        max_new_tokens=size["max_new_tokens"],
    )


def recipe(method: str, choice: Choice) -> str:
    """The bridge_ops.train.recipes method name of a method at a grid point (e.g. pmatch + repair -> pmatch-repair)."""
    return f"{method.split('-')[0]}-{choice.warmup}" if choice.warmup else method


# ---- jobs ----------------------------------------------------------------------------------------------------------
def job_base(setting: Setting, seed: int) -> dict:
    """Pretrains (or loads from the cache) the base of `seed`."""
    train, _, _ = data(setting)
    _, seconds = cached_base(train, setting.spec, base_dir(setting, seed), setting.progress, seed)
    return {"job": "base", "seed": seed, "seconds": seconds}


def train_one(setting: Setting, method: str, seed: int, choice: Choice):
    from bridge_ops.train.recipes import output_norm, train_method

    size = setting.spec
    train, val, test = data(setting)
    base, _ = cached_base(train, size, base_dir(setting, seed), False, seed)
    start = time.perf_counter()
    model, log = train_method(base, recipe(method, choice), train, choice_spec(size, seed, choice), setting.progress)
    info = {
        "method": method,
        "seed": seed,
        "choice": choice.name(),
        "train_seconds": time.perf_counter() - start,
        "warmup_groups": log.get("warmup_groups", [{}])[0].get("groups", 0),
        "rollouts_per_prompt": WIDTH * GROUPS_PER_PROMPT,
        "grpo_steps": size["grpo_steps"],
        **grpo_summary(log["grpo"]),
        "output_norm": output_norm(model) if method in ("pmatch", "bridge") else 0.0,
    }
    return model, info, (val, test)


def test_evaluation(setting: Setting, model, test, seed: int, solo: bool) -> dict:
    """Every width with peers (and solo at solo_width for a Bridge checkpoint) on the confirmatory test set."""
    size = setting.spec
    tokens = size["max_new_tokens"]
    record = {"group": evaluate(model, test, size["widths"], 1000 + seed, max_new_tokens=tokens)}
    if solo:
        record["solo"] = evaluate(model, test, [size["solo_width"]], 1000 + seed, "solo", max_new_tokens=tokens)
    return record


def model_file(setting: Setting, method: str, index: int) -> str:
    return os.path.join(setting.directory, "models", f"{method}-{index}.pt")


def job_grid(setting: Setting, method: str, index: int) -> dict:
    """One grid point on seed 0: its validation accuracy at N = solo_width; the model is kept on disk so that seed
    0's run of the winning point is this one (the losers are never evaluated on test problems)."""
    choice = grid(setting.spec)[method][index]
    model, info, (val, _) = train_one(setting, method, 0, choice)
    size = setting.spec
    width, tokens = size["solo_width"], size["max_new_tokens"]
    accuracy = evaluate(model, val, [width], 7, details=False, max_new_tokens=tokens)[0]["mean_accuracy"]
    os.makedirs(os.path.dirname(model_file(setting, method, index)), exist_ok=True)
    torch.save({"state": model.state_dict(), "info": info}, model_file(setting, method, index))
    return {"job": "grid", **info, "index": index, "val_accuracy": accuracy}


def job_run(setting: Setting, method: str, seed: int, index: int) -> dict:
    """One method and seed at its chosen grid point (seed 0: the grid's model), on the confirmatory test set."""
    choice = grid(setting.spec)[method][index]
    saved = model_file(setting, method, index)
    if seed == 0 and os.path.exists(saved):
        from bridge_ops.train.recipes import add_block

        train, _, test = data(setting)
        model, _ = cached_base(train, setting.spec, base_dir(setting, 0), False, 0)
        add_block(model, method.split("-")[0], choice_spec(setting.spec, 0, choice))
        checkpoint = torch.load(saved, weights_only=True)
        model.load_state_dict(checkpoint["state"])
        info = checkpoint["info"]
    else:
        model, info, (_, test) = train_one(setting, method, seed, choice)
    return {"job": "run", **info, **test_evaluation(setting, model.eval(), test, seed, method == "bridge")}


def job_base_evaluation(setting: Setting, seed: int) -> dict:
    """The base of `seed` on the confirmatory test set (the reference of the relative gain)."""
    train, _, test = data(setting)
    base, _ = cached_base(train, setting.spec, base_dir(setting, seed), False, seed)
    return {"job": "run", "method": "base", "seed": seed, **test_evaluation(setting, base, test, seed, False)}


# ---- report --------------------------------------------------------------------------------------------------------
METRICS = (
    ("mean_accuracy", "mean accuracy (Pass@1 over the N samples)"),
    ("all_correct", "all-correct rate (every one of the N samples right: the paper's consistency)"),
    ("any_correct", "Pass@N (at least one of the N samples right)"),
    ("majority_accuracy", "majority-vote accuracy"),
)


def seed_bootstrap_ratio(gains: List[float], reference: List[float], resamples: int = 10000) -> Dict[str, float]:
    """Ratio of mean gains (sum over seeds of `gains` / of `reference`) with a 95% percentile bootstrap over seeds."""
    generator = torch.Generator().manual_seed(0)
    g, r = torch.tensor(gains, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    picks = torch.randint(len(g), (resamples, len(g)), generator=generator)
    ratios = (g[picks].sum(1) / r[picks].sum(1)).sort().values
    return {
        "mean": float(g.sum() / r.sum()),
        "low": float(ratios[int(0.025 * (resamples - 1))]),
        "high": float(ratios[int(0.975 * (resamples - 1))]),
    }


class Results:
    """The runs' evaluations, indexed by (method, seed, peers) -> {width: entry}; method "base" is the base model."""

    def __init__(self, runs: List[dict], seeds: List[int]):
        self.seeds = seeds
        self.table: Dict[Tuple[str, int, str], Dict[int, dict]] = {}
        for r in runs:
            for peers in ("group", "solo"):
                if peers in r:
                    self.table[(r["method"], r["seed"], peers)] = {e["width"]: e for e in r[peers]}

    def values(self, method: str, width: int, metric: str, peers: str = "group") -> List[float]:
        """Per seed: the metric's value over the test set."""
        return [self.table[(method, s, peers)][width][metric] for s in self.seeds]

    def problems(self, method: str, seed: int, width: int, metric: str, peers: str = "group") -> List[float]:
        return per_problem(self.table[(method, seed, peers)][width], metric)

    def difference(self, a: str, b: str, width: int, metric: str, peers_a: str = "group") -> Tuple[dict, dict]:
        """a minus b: (seed-level t-interval, problem-level bootstrap of per-problem means over seeds)."""
        from bridge_ops.train import paired_bootstrap

        seed_level = seed_interval(
            [x - y for x, y in zip(self.values(a, width, metric, peers_a), self.values(b, width, metric))]
        )
        problem_level = paired_bootstrap(
            mean_over([self.problems(a, s, width, metric, peers_a) for s in self.seeds]),
            mean_over([self.problems(b, s, width, metric) for s in self.seeds]),
        )
        return seed_level, problem_level


def best_choices(grid_rows: List[dict]) -> Dict[str, int]:
    """Per method, the index of its grid point with the best validation accuracy (the first among ties)."""
    return {
        m: max((r for r in grid_rows if r["method"] == m), key=lambda r: (r["val_accuracy"], -r["index"]))["index"]
        for m in METHODS
    }


def best_independent(grid_rows: List[dict], best: Dict[str, int]) -> str:
    """The independent method whose chosen grid point has the best validation accuracy (chosen before any test)."""
    score = {(r["method"], r["index"]): r["val_accuracy"] for r in grid_rows}
    return max(INDEPENDENT, key=lambda m: score[(m, best[m])])


def report(setting: Setting, grid_rows: List[dict], runs: List[dict], seconds: float) -> str:
    """Writes the CSV files, the plot and summary.md; returns the summary."""
    size, out = setting.spec, setting.directory
    seeds, widths, solo = size["seeds"], size["widths"], size["solo_width"]
    results = Results(runs, seeds)
    best = best_choices(grid_rows)
    rival = best_independent(grid_rows, best)
    rows, problem_rows = [], []
    for (method, seed, peers), entries in results.table.items():
        for width, e in entries.items():
            rows.append(
                {"method": method, "seed": seed, "peers": peers} | {k: v for k, v in e.items() if k != "problems"}
            )
            for i, p in enumerate(e["problems"]):
                problem_rows.append(
                    {"method": method, "seed": seed, "peers": peers, "width": width, "problem": i}
                    | {
                        "correct": sum(p["correct"]),
                        "samples": len(p["correct"]),
                        "vote_correct": int(p["vote_correct"]),
                    }
                )
    write_csv(os.path.join(out, "results.csv"), rows)
    with gzip.open(os.path.join(out, "problems.csv.gz"), "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(problem_rows[0]))
        writer.writeheader()
        writer.writerows(problem_rows)
    write_csv(os.path.join(out, "grid.csv"), grid_rows)
    training = [{k: v for k, v in r.items() if k not in ("group", "solo", "job", "job_seconds")} for r in runs]
    write_csv(os.path.join(out, "training.csv"), [t for t in training if t["method"] != "base"])
    plot(results, size, os.path.join(out, "accuracy_vs_width.png"))

    n = len(seeds)
    lines = [
        f"Task: `ScratchpadSumTask({', '.join(f'{k}={v}' for k, v in size['task'].items())})`; {size['test']} "
        f"confirmatory test problems (split seed {TEST_STREAM}), {size['val']} validation problems; {n} seeds "
        f"({', '.join(map(str, seeds))}), each with its own base. Budget of every method: GRPO {size['grpo_steps']} "
        f"steps x {size['prompts_per_step']} prompts x {GROUPS_PER_PROMPT} groups of {WIDTH} "
        f"({WIDTH * GROUPS_PER_PROMPT} rollouts per prompt); every warm-up: 8 samples of each of "
        f"{size['warmup_prompts']} prompts, {size['warmup_steps']} steps. Best independent method (chosen on "
        f"validation): **{rival}**. Intervals: 95%; *seeds*: t over the {n} seeds' differences; *problems*: "
        "bootstrap over problems of the per-problem means over seeds.",
        "",
    ]
    for metric, title in METRICS:
        lines += [
            f"**{title}**, mean ± std over {n} seeds",
            "",
            "| method | " + " | ".join(f"N={w}" for w in widths) + " |",
            "|---" * (len(widths) + 1) + "|",
        ]
        for method in ("base",) + METHODS:
            lines.append(
                f"| {method} | " + " | ".join(mean_std(results.values(method, w, metric)) for w in widths) + " |"
            )
        cells = ["-" if w != solo else mean_std(results.values("bridge", w, metric, "solo")) for w in widths]
        lines += ["| bridge, each sample alone | " + " | ".join(cells) + " |", ""]

    goals = {}
    lines += [
        f"**The same Bridge checkpoint with peers vs each sample alone, N={solo}** (mean accuracy, points)",
        "",
        "| seed | with peers | solo | difference [problems' 95% CI] |",
        "|---|---|---|---|",
    ]
    from bridge_ops.train import paired_bootstrap

    diffs = []
    for s in seeds:
        with_peers = results.problems("bridge", s, solo, "mean_accuracy")
        alone = results.problems("bridge", s, solo, "mean_accuracy", "solo")
        diffs.append(statistics.mean(with_peers) - statistics.mean(alone))
        lines.append(
            f"| {s} | {100 * statistics.mean(with_peers):.1f} | {100 * statistics.mean(alone):.1f} | "
            f"{interval(paired_bootstrap(with_peers, alone))} |"
        )
    g1 = seed_interval(diffs)
    goals["G1"] = (g1["low"] > 0, f"peers minus solo at N={solo}: {interval(g1)} over seeds")
    lines += [f"| all ({n} seeds, t-interval) | | | {interval(g1)} |", ""]

    for other in dict.fromkeys(("pmatch", rival, "grpo")):  # (the best independent method may be one of the others)
        lines += [
            f"**Bridge minus {other}** (points; seeds / problems)",
            "",
            "| width | mean accuracy: seeds | problems | all-correct: seeds | majority vote: seeds | problems |",
            "|---|---|---|---|---|---|",
        ]
        for w in widths:
            acc = results.difference("bridge", other, w, "mean_accuracy")
            allc = results.difference("bridge", other, w, "all_correct")
            vote = results.difference("bridge", other, w, "majority_accuracy")
            lines.append(
                f"| {w} | {interval(acc[0])} | {interval(acc[1])} | {interval(allc[0])} | {interval(vote[0])} | "
                f"{interval(vote[1])} |"
            )
        lines.append("")
    big = [w for w in widths if w >= 4]
    g2 = {w: results.difference("bridge", "pmatch", w, "mean_accuracy")[0] for w in big}
    goals["G2"] = (
        bool(big) and all(c["low"] > 0 for c in g2.values()),
        "Bridge minus P-Match, mean accuracy, seeds: " + "; ".join(f"N={w} {interval(c)}" for w, c in g2.items()),
    )

    references = list(dict.fromkeys(("grpo", rival)))
    lines += [
        "**Relative gain** (the paper's headline: Bridge's gain over the base divided by another method's gain over "
        "the base, mean accuracy; ratio of the seeds' summed gains, 95% bootstrap over seeds; per seed in brackets)",
        "",
        "| width | " + " | ".join(f"over {m}" for m in references) + " |",
        "|---" * (len(references) + 1) + "|",
    ]
    ratios = {}
    for w in widths:
        base = results.values("base", w, "mean_accuracy")
        gain = [b - a for b, a in zip(results.values("bridge", w, "mean_accuracy"), base)]
        cells = []
        for other in references:
            ref = [b - a for b, a in zip(results.values(other, w, "mean_accuracy"), base)]
            ratio = seed_bootstrap_ratio(gain, ref)
            per_seed = ", ".join(f"{g / r:.2f}" if r else "inf" for g, r in zip(gain, ref))
            cells.append(f"{ratio['mean']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}] ({per_seed})")
            if other == "grpo":
                ratios[w] = ratio
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines.append("")
    top = max(ratios, key=lambda w: ratios[w]["mean"])
    goals["G3"] = (ratios[top]["mean"] > 1.2, f"largest relative gain over GRPO: {ratios[top]['mean']:.2f} at N={top}")

    vote_rival = statistics.mean(results.values(rival, solo, "majority_accuracy"))
    vote_diff = results.difference("bridge", rival, solo, "majority_accuracy")[0]
    goals["G4"] = (
        vote_rival < 0.9 and vote_diff["mean"] >= 0,
        f"{rival}'s vote at N={solo}: {100 * vote_rival:.1f}% (unsaturated: {vote_rival < 0.9}); Bridge minus it: "
        f"{interval(vote_diff)} over seeds",
    )

    lines += [
        "**Grid** (seed 0, validation mean accuracy at N=" + str(solo) + "; chosen: *)",
        "",
        "| method | grid point | validation accuracy |",
        "|---|---|---|",
    ]
    for r in grid_rows:
        mark = " *" if best[r["method"]] == r["index"] else ""
        lines.append(f"| {r['method']} | {r['choice']} | {100 * r['val_accuracy']:.1f}{mark} |")
    lines += [
        "",
        "**Training**, mean over seeds",
        "",
        "| method | rollouts per prompt x GRPO steps | warm-up groups | seconds | GRPO reward first -> last 10 "
        "steps | groups with zero advantage | added-block output norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        infos = [t for t in training if t["method"] == method]
        avg = {k: statistics.mean(i[k] for i in infos) for k in infos[0] if isinstance(infos[0][k], (int, float))}
        lines.append(
            f"| {method} | {infos[0]['rollouts_per_prompt']} x {infos[0]['grpo_steps']} | {avg['warmup_groups']:.0f} | "
            f"{avg['train_seconds']:.0f} | {avg['reward_first']:.2f} -> {avg['reward_last']:.2f} | "
            f"{100 * avg['zero_advantage']:.0f}% | {avg['output_norm']:.2f} |"
        )
    lines += ["", "**Pre-registered goals** (rules in experiments/preregistration.md)", ""]
    names = {
        "G1": "peers beat solo (seed-level interval above 0)",
        "G2": "Bridge beats P-Match at every N >= 4 (seed-level intervals above 0)",
        "G3": "relative gain over GRPO above 1.2 at some width",
        "G4": "voting unsaturated and Bridge's vote at or above the best independent method's at N=" + str(solo),
    }
    for key, (met, detail) in goals.items():
        lines.append(f"- {key}, {names[key]}: **{'yes' if met else 'no'}** ({detail})")
    lines += ["", f"Pretraining in this run: {seconds:.0f} s (bases loaded from the cache count 0)."]
    summary = "\n".join(lines + [""])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    return summary


def plot(results: Results, size: dict, path: str) -> None:
    """Mean accuracy and majority vote against the width, mean ± std over seeds, Bridge solo as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, solo = size["widths"], size["solo_width"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("mean_accuracy", "all_correct", "majority_accuracy")):
        for method in ("base",) + METHODS:
            values = [results.values(method, w, metric) for w in widths]
            ax.errorbar(
                widths,
                [100 * statistics.mean(v) for v in values],
                yerr=[100 * statistics.stdev(v) if len(v) > 1 else 0 for v in values],
                marker="o",
                capsize=3,
                label=method,
            )
        alone = results.values("bridge", solo, metric, "solo")
        ax.plot([solo], [100 * statistics.mean(alone)], "kx", markersize=10, label="bridge, each sample alone")
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width N (samples per problem)")
        ax.set_title(dict(METRICS)[metric].split(" (")[0] + " (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = experiment_parser(__doc__.split("\n")[0], SIZES)
    args = parser.parse_args(argv)
    setting = Setting(args.size, args.out, progress=not args.no_progress and args.jobs == 1)
    seeds = setting.spec["seeds"]
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    # 1: the bases of the first seeds; 2: the grid (on seed 0's base) and the other bases; 3: every method and seed
    bases = run_jobs([(job_base, (setting, s)) for s in seeds[:2]], args.jobs, log)
    points = grid(setting.spec)
    phase2 = [(job_grid, (setting, m, i)) for m in METHODS for i in range(len(points[m]))]
    done = run_jobs(phase2 + [(job_base, (setting, s)) for s in seeds[2:]], args.jobs, log)
    grid_rows = [{k: v for k, v in r.items() if k not in ("job", "job_seconds")} for r in done if r["job"] == "grid"]
    best = best_choices(grid_rows)
    log("chosen on validation: " + "; ".join(f"{m}: {points[m][best[m]].name()}" for m in METHODS))
    phase3 = [(job_run, (setting, m, s, best[m])) for m in METHODS for s in seeds]
    runs = run_jobs(phase3 + [(job_base_evaluation, (setting, s)) for s in seeds], args.jobs, log)
    pretraining = sum(r["seconds"] for r in bases + done if r["job"] == "base")
    summary = report(setting, grid_rows, runs, pretraining)
    command = "python experiments/fair_consensus.py" + ("" if args.size == "default" else f" --size {args.size}")
    total = time.perf_counter() - started
    header = (
        f"`{command}`: {total / 60:.1f} min on {args.jobs} process(es) of 1 torch thread, torch {torch.__version__}"
    )
    with open(os.path.join(setting.directory, "summary.md"), "w") as f:
        f.write(header + "\n\n" + summary)
    print(header + "\n\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
