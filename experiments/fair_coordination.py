"""B, round 2: do Bridge's samples split the answers between them beyond what independent sampling can reach, at
equal compute, on a test set fixed first?

    python experiments/fair_coordination.py                 # default size (one 2-core CPU; time in summary.md)
    python experiments/fair_coordination.py --size smoke    # seconds (the test suite)

Pre-registered in experiments/preregistration.md (part B), committed before the default run: the task, the methods
and their budgets, the tuning grid, the confirmatory test set, the yardsticks and the decision rules below.

Task: SubsetSumTask(draw_length=2), round 1's: several correct subsets per problem, every one enumerated; a response
starts with two random letters, which the rows of a group sample independently (without them the rows of a group
are identical until they sample different tokens, and Bridge, permutation-equivariant, cannot make identical rows
differ). Methods, each from a base pretrained with the run's seed (one base per seed):
    grpo           GRPO with the group reward, no added block: its rows are independent by construction
    pmatch-ranked  a parameter-matched MLP per layer (the paper's P-Match), the ranked warm-up, then the same GRPO
    bridge-ranked  Bridge, the ranked warm-up (a prompt's distinct correct answers reassigned so that the row with the
                   k-th smallest draw gives the k-th answer: a protocol only rows that read each other can follow),
                   then the same GRPO
Equal compute: every GRPO run draws one group of 4 per prompt, 16 prompts per step, 100 steps, with the group reward
(a correct answer earns 1 / the number of rows of its group giving it); both warm-ups are the same data (8 base
samples of each of the 5,000 train prompts, ranked), 1,000 steps of every parameter at 3e-4, the added blocks at 10x.
Equal tuning: on seed 0, the GRPO learning rate of every method from 1e-5, 3e-5, 1e-4 (the added blocks at 10x),
scored by distinct correct answers per group of 4 on 200 validation problems (2 groups each); the winner is used for
every seed, and the independent method with the best validation score is "the best independent method".
Confirmatory test set: 500 problems of the test split from a stream (split seed 1) no earlier run used, minus every
problem of the validation stream's first 700 (round 1's 500 test problems and the validation problems); evaluated
once: per problem 4 groups of N = 4 with peers and 16 solo samples.

Yardsticks, per problem (distinct correct answers per group of N):
    own-frequency bound   sum_k [1 - (1 - p_k)^N] over the with-peers samples' own answer frequencies p_k (pooled
                          over the 4 groups, drawn without replacement): what independent draws from the same
                          per-sample distribution reach. Above it: the rows of a group coordinate.
    solo bound            the same over the same checkpoint's 16 solo samples.
    even-spread ideal     K [1 - (1 - v / K)^N], v the with-peers share of correct samples and K the problem's number
                          of solutions: the most any independent sampler with that validity can reach (the p_k spread
                          evenly; concavity). Above it: no independent sampler of the same accuracy can match it.
    the best independent method (chosen on validation), measured directly.
Every difference with a seed-level 95% t-interval (over the 5 seeds' means) and a problem-level bootstrap (per-problem
means over seeds).

Writes OUT/fair_coordination/: problems.csv.gz (every problem of every evaluation), results.csv (every method and
seed), grid.csv, training.csv, summary.md and distinct_vs_yardsticks.png.
"""

import copy
import gzip
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (run as a script or imported by the tests)
import common  # noqa: E402
from common import (  # noqa: E402
    cached_base,
    confirmatory_data,
    experiment_parser,
    grpo_summary,
    interval,
    mean_over,
    method_spec,
    run_jobs,
    seed_interval,
    write_csv,
)

SIZES = {
    "smoke": dict(
        task=dict(numbers=5, max_number=9, draw_length=2),
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
        warmup_all=(3e-4, 10.0),
        grpo_steps=2,
        prompts_per_step=4,
        grpo_lrs=[3e-5, 1e-4],
        lr_mult=10.0,
        seeds=[0, 1],
        width=2,
        val_groups=1,
        groups=2,
        solo_samples=4,
    ),
    "default": dict(
        task=dict(draw_length=2),  # round 1's task: numbers=6, max_number=15, max_subset=4, min_solutions=2
        max_new_tokens=16,
        hidden=96,
        layers=4,
        base_steps=1000,  # round 1: 1500 (636 s a base); 5 bases had to fit the session
        base_batch=64,
        train=5000,
        val=200,
        test=500,
        warmup_prompts=5000,  # every train problem: the ranked protocol overfits 768 (round 1)
        warmup_steps=1000,
        warmup_all=(3e-4, 10.0),  # the warm-up trains every parameter (round 1: Bridge alone learned no protocol)
        grpo_steps=100,
        prompts_per_step=16,
        grpo_lrs=[1e-5, 3e-5, 1e-4],
        lr_mult=10.0,  # the added blocks' GRPO learning-rate multiplier (round 1's)
        seeds=[0, 1, 2, 3, 4],
        width=4,
        val_groups=2,
        groups=4,
        solo_samples=16,
    ),
}
METHODS = ("grpo", "pmatch-ranked", "bridge-ranked")
INDEPENDENT = ("grpo", "pmatch-ranked")
VALIDATION_STREAM, TEST_STREAM = 0, 1  # split seeds: validation (and round 1's test set) and the confirmatory test set
YARDSTICKS = (
    ("marginal_bound", "own-frequency bound"),
    ("bound", "solo bound"),
    ("ideal", "even-spread ideal"),
)


class Setting(common.Setting):
    """What every job of one run needs (picklable)."""

    SIZES, NAME = SIZES, "fair_coordination"


def data(setting: Setting):
    """(train, validation, confirmatory test) task data. Validation: the validation stream's problems test .. test +
    val (its first `test` were round 1's test set); test: TEST_STREAM without any problem of the validation stream's
    first test + val."""
    from bridge_ops.tasks import SubsetSumTask

    return confirmatory_data(SubsetSumTask(**setting.spec["task"]), setting.spec, VALIDATION_STREAM, TEST_STREAM)


def base_dir(setting: Setting, seed: int) -> str:
    return os.path.join(setting.directory, f"base-seed{seed}")


def spec_of(size: dict, seed: int, method: str, lr: float):
    """Every method's MethodSpec: GRPO at one group of `width` per prompt, `lr`, the added blocks at lr_mult x lr;
    a warm-up (the ranked methods) of every parameter."""
    trains = "all" if "-" in method else "added"
    return method_spec(
        size,
        seed,
        trains=trains,
        width=size["width"],
        lr=lr,
        lr_mult=size["lr_mult"],
        max_new_tokens=size["max_new_tokens"],
    )


def measure(model, data, size: dict, seed, groups: int, solo_samples: int) -> List[dict]:
    """Per problem: `distinct_answers` (distinct correct answers per group of N with peers, the own-frequency and solo
    bounds, validity) plus the problem's number of solutions and the even-spread ideal at the with-peers validity."""
    from bridge_ops.train import distinct_answers

    width = size["width"]
    rows = distinct_answers(
        model,
        data.prompts,
        data.reward,
        data.extract_answer,
        width,
        groups_per_prompt=groups,
        solo_samples=solo_samples,
        max_new_tokens=size["max_new_tokens"],
        seed=seed,
        eos_token_id=data.tokenizer.eos_token_id,
    )
    for row, problem in zip(rows, data.problems):
        k = len(problem.solutions)
        row["solutions"] = k
        row["ideal"] = k * (1.0 - (1.0 - row["valid"] / k) ** width)
    return rows


def model_file(setting: Setting, method: str, lr: float) -> str:
    return os.path.join(setting.directory, "models", f"{method}-lr{lr:g}.pt")


def train_runs(setting: Setting, method: str, seed: int, lrs: List[float]):
    """Yields (lr, model, info) for each GRPO learning rate in `lrs`, every one from the same warmed-up model (the
    warm-up does not depend on GRPO's rate; each GRPO run seeds itself, so a run equals train_method's)."""
    from bridge_ops.train.recipes import grpo_stage, output_norm, warm_up_method

    size = setting.spec
    train, _, _ = data(setting)
    base, _ = cached_base(train, size, base_dir(setting, seed), False, seed)
    start = time.perf_counter()
    warmed, log = warm_up_method(base, method, train, spec_of(size, seed, method, lrs[0]), setting.progress)
    warmup_seconds = time.perf_counter() - start
    for lr in lrs:
        start = time.perf_counter()
        model = copy.deepcopy(warmed)
        grpo_log = grpo_stage(model, train, spec_of(size, seed, method, lr), setting.progress, train.distinct_reward())
        yield (
            lr,
            model.eval(),
            {
                "method": method,
                "seed": seed,
                "lr": lr,
                "warmup_seconds": warmup_seconds,
                "grpo_seconds": time.perf_counter() - start,
                "warmup_groups": log.get("warmup_groups", [{}])[0].get("groups", 0),
                "rollouts_per_prompt": size["width"],
                "grpo_steps": size["grpo_steps"],
                **grpo_summary(grpo_log),
                "output_norm": output_norm(model) if method != "grpo" else 0.0,
            },
        )


# ---- jobs ----------------------------------------------------------------------------------------------------------
def job_base(setting: Setting, seed: int) -> dict:
    """Pretrains (or loads from the cache) the base of `seed`."""
    train, _, _ = data(setting)
    _, seconds = cached_base(train, setting.spec, base_dir(setting, seed), setting.progress, seed)
    return {"job": "base", "seed": seed, "seconds": seconds}


def job_grid(setting: Setting, method: str) -> dict:
    """Every GRPO learning rate of `method` on seed 0 from one warm-up, scored on validation problems; each model is
    kept on disk so that seed 0's run of the winner is this one (the losers are never evaluated on test problems)."""
    size = setting.spec
    _, val, _ = data(setting)
    rows = []
    for lr, model, info in train_runs(setting, method, 0, size["grpo_lrs"]):
        scores = measure(model, val, size, 7, size["val_groups"], size["width"])
        os.makedirs(os.path.dirname(model_file(setting, method, lr)), exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, model_file(setting, method, lr))
        rows.append({**info, "val_distinct": statistics.mean(r["distinct"] for r in scores)})
    return {"job": "grid", "rows": rows}


def job_run(setting: Setting, method: str, seed: int, lr: float) -> dict:
    """One method and seed at its chosen learning rate (seed 0: the grid's model) on the confirmatory test set."""
    size = setting.spec
    train, _, test = data(setting)
    if seed == 0 and os.path.exists(model_file(setting, method, lr)):
        from bridge_ops.train.recipes import add_block

        model, _ = cached_base(train, size, base_dir(setting, 0), False, 0)
        add_block(model, method.split("-")[0], spec_of(size, 0, method, lr))
        checkpoint = torch.load(model_file(setting, method, lr), weights_only=True)
        model.load_state_dict(checkpoint["state"])
        info = checkpoint["info"]
    else:
        (_, model, info), *_ = train_runs(setting, method, seed, [lr])
    rows = measure(model.eval(), test, size, 1000 + seed, size["groups"], size["solo_samples"])
    return {"job": "run", "method": method, "seed": seed, "info": info, "problems": rows}


def job_base_evaluation(setting: Setting, seed: int) -> dict:
    """The base of `seed` on the confirmatory test set."""
    size = setting.spec
    train, _, test = data(setting)
    base, _ = cached_base(train, size, base_dir(setting, seed), False, seed)
    rows = measure(base, test, size, 1000 + seed, size["groups"], size["solo_samples"])
    return {"job": "run", "method": "base", "seed": seed, "info": None, "problems": rows}


# ---- report --------------------------------------------------------------------------------------------------------
class Results:
    """Per (method, seed): the per-problem measurements on the test set."""

    def __init__(self, runs: List[dict], seeds: List[int]):
        self.seeds = seeds
        self.table = {(r["method"], r["seed"]): r["problems"] for r in runs}

    def problems(self, method: str, seed: int, key: str) -> List[float]:
        return [float(row[key]) for row in self.table[(method, seed)]]

    def seed_means(self, method: str, key: str) -> List[float]:
        return [statistics.mean(self.problems(method, s, key)) for s in self.seeds]

    def difference(self, a: str, key_a: str, b: str, key_b: str):
        """a's `key_a` minus b's `key_b`: (seed-level t-interval, problem-level bootstrap over per-problem means)."""
        from bridge_ops.train import paired_bootstrap

        seed_level = seed_interval([x - y for x, y in zip(self.seed_means(a, key_a), self.seed_means(b, key_b))])
        problem_level = paired_bootstrap(
            mean_over([self.problems(a, s, key_a) for s in self.seeds]),
            mean_over([self.problems(b, s, key_b) for s in self.seeds]),
        )
        return seed_level, problem_level


def chosen(grid_rows: List[dict]) -> Dict[str, dict]:
    """Per method, its grid row with the best validation score (the smallest rate among ties)."""
    return {
        m: max((r for r in grid_rows if r["method"] == m), key=lambda r: (r["val_distinct"], -r["lr"])) for m in METHODS
    }


def report(setting: Setting, grid_rows: List[dict], runs: List[dict], pretraining: float) -> str:
    """Writes the CSV files, the plot and summary.md's tables; returns them."""
    size, out = setting.spec, setting.directory
    seeds, n = size["seeds"], size["width"]
    os.makedirs(out, exist_ok=True)
    results = Results(runs, seeds)
    best = chosen(grid_rows)
    independent = max(INDEPENDENT, key=lambda m: best[m]["val_distinct"])
    models = ("base",) + METHODS

    with gzip.open(os.path.join(out, "problems.csv.gz"), "wt", newline="") as f:
        import csv

        rows = [
            {"method": r["method"], "seed": r["seed"], "problem": i, **row}
            for r in runs
            for i, row in enumerate(r["problems"])
        ]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keys = ("valid", "valid_solo", "distinct", "marginal_bound", "bound", "ideal")
    write_csv(
        os.path.join(out, "results.csv"),
        [
            {"method": m, "seed": s, **{k: statistics.mean(results.problems(m, s, k)) for k in keys}}
            for m in models
            for s in seeds
        ],
    )
    write_csv(os.path.join(out, "grid.csv"), grid_rows)
    training = [r["info"] for r in runs if r["info"] is not None]
    write_csv(os.path.join(out, "training.csv"), training)
    plot(results, best, independent, n, os.path.join(out, "distinct_vs_yardsticks.png"))

    def ms(values, digits=3):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"

    def both(a, key_a, b, key_b, scale=1.0, digits=3):
        seed_level, problem_level = results.difference(a, key_a, b, key_b)
        return f"{interval(seed_level, scale, digits)} | {interval(problem_level, scale, digits)}"

    lines = [
        f"Task: `SubsetSumTask({', '.join(f'{k}={v}' for k, v in size['task'].items())})`; {size['test']} "
        f"confirmatory test problems (split seed {TEST_STREAM}), {size['val']} validation problems; "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), each with its own base ({size['base_steps']} steps). "
        f"Budget of every method: GRPO {size['grpo_steps']} steps x {size['prompts_per_step']} prompts x one group "
        f"of {n} ({n} rollouts per prompt) with the group reward; both warm-ups: the same ranked data from "
        f"{size['warmup_prompts']} prompts, {size['warmup_steps']} steps of every parameter. Measured per problem: "
        f"{size['groups']} groups of N={n} with peers, {size['solo_samples']} solo samples. Best independent method "
        f"(chosen on validation): **{independent}**. Intervals: 95%; *seeds*: t over the {len(seeds)} seeds' "
        "differences; *problems*: bootstrap over problems of the per-problem means over seeds.",
        "",
        f"**Distinct correct answers per group of N={n} and the yardsticks**, mean ± std over seeds",
        "",
        "| model | valid (peers) | valid (solo) | distinct correct | own-frequency bound | solo bound "
        "| even-spread ideal |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(
            f"| {m} | {ms(results.seed_means(m, 'valid'), 3)} | {ms(results.seed_means(m, 'valid_solo'), 3)} | "
            + " | ".join(ms(results.seed_means(m, k)) for k in ("distinct", "marginal_bound", "bound", "ideal"))
            + " |"
        )
    lines += [
        "",
        "**Each model minus its own yardsticks** (distinct correct answers per group; seeds | problems)",
        "",
        "| model | minus own-frequency bound: seeds | problems | minus solo bound: seeds | problems "
        "| minus even-spread ideal: seeds | problems |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(both(m, "distinct", m, k) for k, _ in YARDSTICKS) + " |")
    lines += [
        "",
        "**Bridge against the independent methods** (bridge-ranked minus each; seeds | problems)",
        "",
        "| comparison | distinct correct: seeds | problems | valid (peers): seeds | problems |",
        "|---|---|---|---|---|",
    ]
    for m in INDEPENDENT + ("base",):
        label = f"minus {m}" + (" (the best independent method)" if m == independent else "")
        lines.append(
            f"| {label} | {both('bridge-ranked', 'distinct', m, 'distinct')} | "
            f"{both('bridge-ranked', 'valid', m, 'valid', 100.0, 1)} |"
        )
    per_seed = {
        k: [a - b for a, b in zip(results.seed_means("bridge-ranked", "distinct"), results.seed_means(*k))]
        for k in (("bridge-ranked", "marginal_bound"), (independent, "distinct"), ("bridge-ranked", "ideal"))
    }
    lines += [
        "",
        "**Per seed, bridge-ranked** (distinct correct per group minus each yardstick)",
        "",
        f"| seed | distinct | minus own-frequency bound | minus {independent} | minus even-spread ideal |",
        "|---|---|---|---|---|",
    ]
    for i, s in enumerate(seeds):
        lines.append(
            f"| {s} | {results.seed_means('bridge-ranked', 'distinct')[i]:.3f} | "
            + " | ".join(f"{v[i]:+.3f}" for v in per_seed.values())
            + " |"
        )
    lines += ["", "**Grid** (seed 0, validation: distinct correct answers per group; chosen: *)", ""]
    lines += [
        "| method | GRPO lr (added blocks x{:g}) | validation distinct |".format(size["lr_mult"]),
        "|---|---|---|",
    ]
    for r in grid_rows:
        star = " *" if r is best[r["method"]] else ""
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['val_distinct']:.3f}{star} |")
    lines += [
        "",
        "**Training**, mean over seeds",
        "",
        "| method | GRPO lr | rollouts per prompt x GRPO steps | warm-up groups | warm-up s | GRPO s "
        "| group reward first -> last 10 steps | groups with zero advantage | added-block output norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rs = [r for r in training if r["method"] == m]
        mean = {k: statistics.mean(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        lines.append(
            f"| {m} | {best[m]['lr']:g} | {n} x {size['grpo_steps']} | {mean['warmup_groups']:.0f} | "
            f"{mean['warmup_seconds']:.0f} | {mean['grpo_seconds']:.0f} | {mean['reward_first']:.2f} -> "
            f"{mean['reward_last']:.2f} | {100 * mean['zero_advantage']:.0f}% | {mean['output_norm']:.2f} |"
        )
    lines += ["", f"Pretraining the {len(seeds)} bases: {pretraining:.0f} s.", "", *goals(results, independent)]
    return "\n".join(lines)


def goals(results: Results, independent: str) -> List[str]:
    """The pre-registered goals of part B, each a measured yes/no (seed-level intervals)."""
    rows = [
        ("B1: Bridge's groups give more distinct correct answers than its own-frequency bound", "marginal_bound"),
        (f"B2: ... than the best independent method ({independent}, chosen on validation)", independent),
        ("B3: ... than the even-spread ideal at Bridge's own validity", "ideal"),
    ]
    lines = ["**The pre-registered goals of part B** (seed-level 95% intervals above 0)", ""]
    for text, yardstick in rows:
        if yardstick in INDEPENDENT:
            seed_level, _ = results.difference("bridge-ranked", "distinct", yardstick, "distinct")
        else:
            seed_level, _ = results.difference("bridge-ranked", "distinct", "bridge-ranked", yardstick)
        verdict = "yes" if seed_level["low"] > 0 else "no"
        lines.append(f"- {text}: **{verdict}**, {interval(seed_level, 1.0, 3)}")
    return lines


def plot(results: Results, best: Dict[str, dict], independent: str, width: int, path: str) -> None:
    """Per model: distinct correct answers minus each yardstick (seed means, t-intervals over seeds), and Bridge minus
    the best independent method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = ("base",) + METHODS
    fig, ax = plt.subplots(figsize=(9, 4))
    for j, (key, label) in enumerate(YARDSTICKS):
        cis = [results.difference(m, "distinct", m, key)[0] for m in models]
        xs = [i + (j - 1) * 0.25 for i in range(len(models))]
        means = [c["mean"] for c in cis]
        errors = [[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]]
        ax.bar(xs, means, 0.25, yerr=errors, capsize=3, label=f"minus {label}")
    direct = results.difference("bridge-ranked", "distinct", independent, "distinct")[0]
    ax.errorbar(
        [len(models) - 1 + 0.45],
        [direct["mean"]],
        yerr=[[direct["mean"] - direct["low"]], [direct["high"] - direct["mean"]]],
        fmt="ks",
        capsize=3,
        label=f"bridge minus {independent}",
    )
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(f"distinct correct answers among N={width}\n(difference, 95% CI over seeds)")
    ax.legend(fontsize=8)
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
    phase2 = [(job_grid, (setting, m)) for m in reversed(METHODS)]  # the longest first
    done = run_jobs(phase2 + [(job_base, (setting, s)) for s in seeds[2:]], args.jobs, log)
    grid_rows = [row for r in done if r["job"] == "grid" for row in r["rows"]]
    best = chosen(grid_rows)
    log("chosen on validation: " + "; ".join(f"{m}: lr {best[m]['lr']:g}" for m in METHODS))
    phase3 = [(job_run, (setting, m, s, best[m]["lr"])) for s in seeds for m in reversed(METHODS)]
    runs = run_jobs(phase3 + [(job_base_evaluation, (setting, s)) for s in seeds], args.jobs, log)
    pretraining = sum(r["seconds"] for r in bases + done if r["job"] == "base")
    summary = report(setting, grid_rows, runs, pretraining)
    command = "python experiments/fair_coordination.py" + ("" if args.size == "default" else f" --size {args.size}")
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
