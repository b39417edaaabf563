"""C, round 2, tuned: the paper's question on SmolLM2-135M-Instruct with the paper's warm-up and rates chosen on
validation (the second run of part C; the first, experiments/real_model.py, broke the base with an untuned recipe).

    python experiments/real_model_tuned.py                 # default size (resumable: see "Stages" below)
    python experiments/real_model_tuned.py --size smoke    # about two minutes (the test suite)
    python experiments/real_model_tuned.py --size gpu      # larger budgets (bench/gpu_check.sh)

Pre-registered in experiments/preregistration.md (part C, tuned), committed before the default run.

What changed from the first run, and why (its diagnosis, experiments/README.md):
- The added blocks warm up alone, the base frozen (the paper's recipe); the first run trained every parameter and
  P-Match fell 23 points below the base, Bridge 6.
- Bridge and P-Match warm up on *repair* groups: every sample of a prompt keeps its own chain and gets the correct
  answer ("... The answer is 14."); the loss covers the whole row where its own answer was right and only the answer
  where it was wrong, so a wrong row must take the answer from its peers. The first run's "correct" groups were 63
  of 68 identical rows, on which Bridge's queries and keys get no gradient (a per-row adapter, not a peer reader).
  P-Match gets the same rows: the ablation without peers. grpo-correct keeps rejection-sampling fine-tuning on the
  same samples' correct rows (every parameter at 1e-5, as before).
- The added blocks' warm-up rate is chosen per method on the validation problems, from WARMUP_LRS; GRPO trains every
  parameter at 1e-5 and the added blocks at 10x for every method (no search: fixed in the preregistration).
- A fresh confirmatory test set: the test split's stream 2, minus the problems of streams 0 (validation) and 1 (the
  first run's test set) that any earlier run could have drawn.
Everything else (base, task, widths, budgets, analysis) is the first run's, through its functions.

Stages: each finished stage (validation of the base, the warm-up samples, each candidate's validation, each method's
test evaluations) is stored as JSON under the work directory (default: OUT/real_model_tuned/stages-<digest of the
size>, committed with the results), so a run stopped at any point, on this machine or another, resumes where it
stopped, with the same numbers (the format-tuned base is rebuilt deterministically from its recipe).

Writes OUT/real_model_tuned/: results.csv, problems.csv.gz, training.csv, grid.csv (the validation of every
candidate rate), summary.md (with the goals judged) and accuracy_vs_width.png.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (run as a script or imported by the tests)
import real_model as first  # noqa: E402
from common import grpo_summary, interval, write_csv  # noqa: E402

NAME = "real_model_tuned"
METHODS = ("grpo-correct", "pmatch-repair", "bridge-repair")
TEST_STREAM = 2
SEEN = ((first.VALIDATION_STREAM, 200), (first.TEST_STREAM, 400))  # (stream, problems an earlier run could draw)
TUNED = {
    "smoke": dict(warmup_lrs=(1e-4, 1e-3)),
    "default": dict(warmup_lrs=(1e-4, 3e-4, 1e-3)),
    "gpu": dict(warmup_lrs=(1e-4, 3e-4, 1e-3)),
}
# the first run's sizes; GRPO's added blocks at 10x (the first run: 30x); warm-up rates of the added blocks searched
SIZES = {name: dict(first.SIZES[name], grpo_lr=(1e-5, 10.0), **TUNED[name]) for name in first.SIZES}


@dataclasses.dataclass(frozen=True)
class Setting(first.Setting):
    work_dir: Optional[str] = None  # finished stages (default: OUT/real_model_tuned/stages-<digest of the size>)

    @property
    def spec(self) -> dict:
        return SIZES[self.size]

    @property
    def directory(self) -> str:
        return os.path.join(self.out, NAME)

    @property
    def stages(self) -> str:
        """Where finished stages are kept: beside the results (committed with them, so that a run spans sessions and
        machines), in a directory named by the size's digest (a changed recipe starts afresh)."""
        from bridge_ops.files import json_digest

        if self.work_dir:
            return self.work_dir
        return os.path.join(self.directory, f"stages-{json_digest(self.spec)[:12]}")


def stage(setting: Setting, name: str, compute: Callable[[], object]):
    """compute()'s JSON value, stored as `name`.json in the work directory (written under a temporary name, then
    renamed), or the stored value when an earlier run finished this stage."""
    path = os.path.join(setting.stages, name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    os.makedirs(setting.stages, exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(value, f)
    os.replace(path + ".partial", path)
    return value


def keyed(evals: Dict[tuple, dict]) -> list:
    return [[width, peers, entry] for (width, peers), entry in sorted(evals.items())]


def unkeyed(rows: list) -> Dict[tuple, dict]:
    return {(width, peers): entry for width, peers, entry in rows}


def data(setting: Setting, tokenizer):
    """(train, validation, confirmatory test): the first run's train and validation sets; the test set is TEST_STREAM
    without any problem of SEEN."""
    size = setting.spec
    train, val, _ = first.data(setting, tokenizer)
    task = train.task
    seen = {p.prompt for stream, count in SEEN for p in task.problems("test", count, seed=stream)}
    fresh = [p for p in task.problems("test", size["test"] + len(seen), seed=TEST_STREAM) if p.prompt not in seen]
    return train, val, first.task_data(task, tokenizer, fresh[: size["test"]])


def method_spec(size: dict, method: str, warmup_lr: Optional[float] = None):
    """The first run's MethodSpec for grpo-correct; for a repair method, the added blocks alone warm up at
    `warmup_lr` (the base frozen)."""
    spec = first.method_spec(size)
    if method.endswith("-repair"):
        spec.warmup_trains = "added"
        spec.warmup.lr, spec.warmup.added_lr_mult = warmup_lr, 1.0
    return spec


def warmup_row(method: str, lr, history: dict, model) -> dict:
    from bridge_ops.train.recipes import output_norm

    groups = history["warmup_groups"][0]
    return {
        "method": method,
        "warmup_lr": lr,
        "warmup_groups": groups["groups"],
        "warmup_rows": groups["responses"],
        "warmup_identical_groups": groups["identical"],
        "warmup_loss_first": history["warmup"][0]["loss"] if "warmup" in history else "",
        "warmup_loss_last": history["warmup"][-1]["loss"] if "warmup" in history else "",
        "output_norm": output_norm(model) if not method.startswith("grpo") else "",
    }


def run(setting: Setting, log) -> dict:
    from bridge_ops.hf import load_gguf, smollm2_gguf
    from bridge_ops.train.recipes import grpo_stage, warm_up_method, warmup_groups, warmup_samples

    size = setting.spec
    top, progress = max(size["widths"]), setting.progress
    torch.manual_seed(size["seed"])
    model, tokenizer = load_gguf(smollm2_gguf(), cache_dir=setting.cache_dir)
    tokenizer.padding_side = "left"
    base, _ = first.format_base(setting, model, tokenizer)
    train, val, test = data(setting, tokenizer)
    log(f"base ready; stages in {setting.stages}")

    validation = stage(setting, "validation-base", lambda: first.evaluate(setting, base, val, [top])[0])
    log(f"validation: base mean accuracy {100 * validation['mean_accuracy']:.1f}%")
    samples = stage(setting, "warmup-samples", lambda: warmup_samples(base, train, method_spec(size, METHODS[0])))
    mode = {m: m.rsplit("-", 1)[1] for m in METHODS}
    groups = {g: warmup_groups(base, g, train, method_spec(size, METHODS[0]), samples) for g in set(mode.values())}
    log("warm-up groups: " + ", ".join(f"{g} {len(v)}" for g, v in groups.items()))

    def warmed_up(method: str, lr: Optional[float]):
        spec = method_spec(size, method, lr)
        model, history = warm_up_method(base, method, train, spec, progress, groups[mode[method]])
        return model, history, spec

    grid, chosen = [], {}
    for method in METHODS:
        if not method.endswith("-repair"):
            continue
        for lr in size["warmup_lrs"]:

            def candidate(method=method, lr=lr):
                model, history, _ = warmed_up(method, lr)
                entry = first.evaluate(setting, model, val, [top])[0]
                return {**warmup_row(method, lr, history, model), **{m: entry[m] for m, _ in first.METRICS}}

            grid.append(stage(setting, f"validation-{method}-{lr:g}", candidate))
            log(f"{method} warm-up lr {lr:g}: validation mean accuracy {100 * grid[-1]['mean_accuracy']:.1f}%")
        scores = [row for row in grid if row["method"] == method]
        chosen[method] = max(scores, key=lambda row: (row["mean_accuracy"], -row["warmup_lr"]))["warmup_lr"]
        log(f"{method}: warm-up lr {chosen[method]:g} chosen on validation")

    def test_stage(method: str) -> dict:
        start = time.perf_counter()
        model, history, spec = warmed_up(method, chosen.get(method))
        row = warmup_row(method, chosen.get(method, ""), history, model)
        grpo = grpo_stage(model, train, spec, progress)
        trained = time.perf_counter() - start
        start = time.perf_counter()
        evals = first.evaluations(setting, model.eval(), test, bridge=method.startswith("bridge"))
        row.update(train_seconds=round(trained), eval_seconds=round(time.perf_counter() - start))
        row.update({f"grpo_{k}": v for k, v in grpo_summary(grpo).items()})
        return {"evals": keyed(evals), "training": row}

    evals = {"base": unkeyed(stage(setting, "test-base", lambda: keyed(first.evaluations(setting, base, test, False))))}
    training = []
    for method in METHODS:
        done = stage(setting, f"test-{method}", lambda method=method: test_stage(method))
        evals[method], row = unkeyed(done["evals"]), done["training"]
        training.append(row)
        log(f"{method}: trained {row['train_seconds']} s, evaluated {row['eval_seconds']} s")
    header = (
        f"Base: SmolLM2-135M-Instruct after format fine-tuning; validation ({size['val']} problems, N={top}): "
        f"{100 * validation['mean_accuracy']:.1f}% mean accuracy. Test: {size['test']} problems (stream "
        f"{TEST_STREAM}, fresh). Warm-up: {size['warmup_steps']} steps of {size['warmup_groups_per_step']} groups "
        f"from {size['warmup_samples']} base samples of each of {size['warmup_prompts']} prompts: repair groups "
        f"({len(groups['repair'])}) for pmatch-repair and bridge-repair (added blocks only, rate chosen on "
        f"validation: {', '.join(f'{m} {lr:g}' for m, lr in chosen.items())}), correct groups "
        f"({len(groups['correct'])}) for grpo-correct (every parameter at {size['warmup_lr'][0]:g}). GRPO: "
        f"{size['grpo_steps']} steps x {size['prompts_per_step']} prompts x 1 group of {size['width']}, every "
        f"parameter at {size['grpo_lr'][0]:g}, the added blocks at {size['grpo_lr'][1]:g}x (the same for every method)."
    )
    return {"evals": evals, "training": training, "grid": grid, "methods": METHODS, "header": header}


def goals(setting: Setting, result: dict) -> str:
    """The pre-registered goals, each judged yes/no from the paired bootstrap over test problems."""
    evals, top = result["evals"], max(setting.spec["widths"])
    bridge, independent, grpo = first.roles(result["methods"])
    pmatch = next(m for m in independent if m.startswith("pmatch"))
    b = evals[bridge]

    def diff(a, c, metric="mean_accuracy"):
        return first.difference(a, c, metric)

    peers = diff(b[(top, "group")], b[(top, "solo")])
    lines = [
        f"- Goal 1, peers beat solo at N={top} (mean accuracy): {'yes' if peers['low'] > 0 else 'no'}, "
        f"{interval(peers)} points."
    ]
    g2 = {w: diff(b[(w, "group")], evals[pmatch][(w, "group")]) for w in setting.spec["widths"] if w >= 4}
    lines.append(
        f"- Goal 2, Bridge above P-Match at N >= 4 (mean accuracy, problem level): "
        f"{'yes' if all(d['low'] > 0 for d in g2.values()) else 'no'}, "
        + "; ".join(f"N={w} {interval(d)}" for w, d in g2.items())
        + "."
    )
    ratios = {
        w: first.gain_ratio(b[(w, "group")], evals[grpo][(w, "group")], evals["base"][(w, "group")], "mean_accuracy")
        for w in setting.spec["widths"]
    }
    lines.append(
        f"- Goal 3, relative gain above 1.2 at some width (point estimate): "
        f"{'yes' if any(r['mean'] > 1.2 for r in ratios.values()) else 'no'}, "
        + "; ".join(f"N={w} {r['mean']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" for w, r in ratios.items())
        + "."
    )
    votes = {m: diff(b[(top, "group")], evals[m][(top, "group")], "majority_accuracy") for m in independent}
    lines.append(
        f"- Goal 4, Bridge's majority vote at N={top} at or above every independent method's (point estimate): "
        f"{'yes' if all(d['mean'] >= 0 for d in votes.values()) else 'no'}, "
        + "; ".join(f"minus {m} {interval(d)}" for m, d in votes.items())
        + "."
    )
    return "\n".join(lines) + "\n"


def report(setting: Setting, result: dict) -> str:
    keys = list(result["grid"][0]) if result["grid"] else []
    grid = ["", "Validation of the added blocks' warm-up rate (N=8 with peers; chosen: the best mean accuracy):", ""]
    grid += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in result["grid"]:
        grid.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return (
        "Goals (pre-registered):\n\n" + goals(setting, result) + "\n" + first.report(setting, result) + "\n".join(grid)
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = first.arguments(__doc__, SIZES)
    parser.add_argument("--work-dir", help="where finished stages are kept (default: OUT/real_model_tuned/stages-*)")
    args = parser.parse_args(argv)
    setting = Setting(args.size, args.out, not args.no_progress, args.device, args.cache_dir, args.work_dir)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    result = run(setting, log)
    first.write(setting, result)
    write_csv(os.path.join(setting.directory, "grid.csv"), result["grid"])
    command = "python experiments/real_model_tuned.py" + ("" if args.size == "default" else f" --size {args.size}")
    seconds = sum(row["train_seconds"] + row["eval_seconds"] for row in result["training"])
    header = (
        f"`{command}` on {args.device} ({torch.get_num_threads()} torch threads), torch {torch.__version__}; "
        f"this invocation {(time.perf_counter() - started) / 60:.1f} min (finished stages are reused), the three "
        f"methods' training and test evaluation {seconds / 60:.1f} min"
    )
    summary = header + "\n\n" + report(setting, result)
    with open(os.path.join(setting.directory, "summary.md"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
