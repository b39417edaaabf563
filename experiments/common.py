"""What the experiments share: cached pretrained bases, evaluation at widths, statistics and formatting, and a pool
that runs every training run as a job on processes of one torch thread."""

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import ClassVar, Dict, List, Optional

import torch

MAX_NEW_TOKENS = 16
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every job of one run needs (picklable): the size's name, where the run writes, whether jobs show
    progress. An experiment subclasses it with its SIZES and NAME (its directory under `out`)."""

    size: str
    out: str
    progress: bool
    SIZES: ClassVar[dict] = {}
    NAME: ClassVar[str] = ""

    @property
    def spec(self) -> dict:
        return self.SIZES[self.size]

    @property
    def directory(self) -> str:
        return os.path.join(self.out, self.NAME)


def experiment_parser(description: str, sizes) -> argparse.ArgumentParser:
    """The options every experiment script takes: --size (one of `sizes`), --out (default experiments/results),
    --jobs (processes of one torch thread) and --no-progress."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sorted(sizes), default="default")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes, 1 torch thread each (default 2)"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def cached_base(train, size: dict, directory: str, progress: bool, seed: int = 0):
    """The base pretrained with `seed` (initialization and batch order) from `directory` when it was made with the
    same spec and task, else pretrained and saved. Returns (model, seconds spent pretraining now)."""
    from transformers import AutoModelForCausalLM

    from bridge_ops.train.recipes import BaseSpec, pretrain_base

    spec = BaseSpec(
        hidden_size=size["hidden"],
        num_layers=size["layers"],
        steps=size["base_steps"],
        batch=size["base_batch"],
        seed=seed,
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


def confirmatory_data(task, size: dict, validation_stream: int, test_stream: int):
    """(train, validation, confirmatory test) TaskData of a char-level `task`: size["train"] train problems; validation:
    problems test .. test + val of the test split's `validation_stream` (its first size["test"] are what a pilot or an
    earlier round may have looked at); test: size["test"] problems of the `test_stream`, without any problem of the
    validation stream's first test + val."""
    from bridge_ops.charlm import char_tokenizer
    from bridge_ops.train import TaskData, task_data

    tok = char_tokenizer(task.alphabet)
    train = task_data(task, tok, "train", size["train"])
    val = task_data(task, tok, "test", size["val"], seed=validation_stream, skip=size["test"])
    seen = {p.prompt for p in task.problems("test", size["test"] + size["val"], validation_stream)}
    fresh = [p for p in task.problems("test", size["test"] + len(seen), test_stream) if p.prompt not in seen]
    problems = fresh[: size["test"]]
    test = TaskData(task, tok, problems, [tok(p.prompt)["input_ids"] for p in problems])
    return train, val, test


def evaluate(
    model,
    data,
    widths,
    seed,
    peers="group",
    details=True,
    max_new_tokens=MAX_NEW_TOKENS,
    rows_per_batch=1024,
    progress=False,
):
    """`evaluate_widths` of `data`'s problems (per-problem details by default)."""
    from bridge_ops.train import evaluate_widths

    return evaluate_widths(
        model,
        data.prompts,
        data.reward,
        data.extract_answer,
        data.answers,
        widths,
        peers=peers,
        max_new_tokens=max_new_tokens,
        seed=seed,
        eos_token_id=data.tokenizer.eos_token_id,
        rows_per_batch=rows_per_batch,
        details=details,
        progress=progress,
    )


def per_problem(entry: dict, metric: str = "mean_accuracy") -> List[float]:
    """One evaluation entry's per-problem values of `metric` (an `evaluate_widths` key): "mean_accuracy" (the share
    of correct samples), "all_correct", "any_correct" or "majority_accuracy"."""
    if metric == "majority_accuracy":
        return [float(p["vote_correct"]) for p in entry["problems"]]
    reduce = {
        "mean_accuracy": lambda c: sum(c) / len(c),
        "all_correct": lambda c: float(all(c)),
        "any_correct": lambda c: float(any(c)),
    }[metric]
    return [reduce(p["correct"]) for p in entry["problems"]]


def method_spec(
    size: dict,
    seed: int,
    *,
    trains: str = "added",
    width: int = 4,
    groups_per_prompt: int = 1,
    lr: Optional[float] = None,
    lr_mult: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
):
    """The MethodSpec of one run at `size` (its warm-up prompts and steps, GRPO steps and prompts per step): a
    warm-up of the added blocks, or with trains="all" of every parameter at size["warmup_all"] = (lr, added-block
    multiplier); GRPO at `width` x `groups_per_prompt` rollouts per prompt, at `lr` (None: MethodSpec's), the added
    blocks at `lr_mult` times it."""
    from bridge_ops.train.recipes import MethodSpec

    spec = MethodSpec(seed=seed, warmup_prompts=size["warmup_prompts"])
    spec.warmup.steps = size["warmup_steps"]
    if trains == "all":
        spec.warmup_trains = "all"
        spec.warmup.lr, spec.warmup.added_lr_mult = size["warmup_all"]
    g = spec.grpo
    g.steps, g.prompts_per_step = size["grpo_steps"], size["prompts_per_step"]
    g.width, g.groups_per_prompt, g.added_lr_mult, g.max_new_tokens = width, groups_per_prompt, lr_mult, max_new_tokens
    if lr is not None:
        g.lr = lr
    return spec


def grpo_summary(grpo_log: List[dict]) -> dict:
    """A GRPO run in three numbers: the mean share of groups with zero advantage, and the mean reward over the first
    and over the last 10 steps."""
    return {
        "zero_advantage": statistics.mean(h["zero_advantage"] for h in grpo_log),
        "reward_first": statistics.mean(h["reward"] for h in grpo_log[:10]),
        "reward_last": statistics.mean(h["reward"] for h in grpo_log[-10:]),
    }


def mean_over(lists: List[List[float]]) -> List[float]:
    """Element-wise mean of equally long lists (per-problem values averaged over seeds)."""
    return [statistics.mean(values) for values in zip(*lists)]


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t quantiles


def seed_interval(differences: List[float]) -> Dict[str, float]:
    """Mean of per-seed differences and its 95% t-interval over the seeds (each seed: a base, a training, samples)."""
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan")}
    half = T975.get(len(differences) - 1, 1.96) * statistics.stdev(differences) / len(differences) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half}


def interval(ci: dict, scale: float = 100.0, digits: int = 1) -> str:
    """`+1.2 [+0.3, +2.1]` from a {"mean", "low", "high"} interval (scaled: points by default)."""
    return f"{scale * ci['mean']:+.{digits}f} [{scale * ci['low']:+.{digits}f}, {scale * ci['high']:+.{digits}f}]"


def write_csv(path: str, rows: List[dict]) -> None:
    """Rows of dicts as CSV, the columns in order of first appearance."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values: List[float], scale: float = 100.0) -> str:
    """`97.4 ± 0.2`: mean and sample standard deviation (points by default)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.1f} ± {scale * std:.1f}"


def _call(job):
    function, args = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = function(*args)
    return {**result, "job_seconds": time.perf_counter() - start}


def run_jobs(jobs: List[tuple], processes: int, log) -> List[dict]:
    """Runs (function, args) jobs on `processes` processes (1 torch thread each; 1: in this process) and returns
    their results in the jobs' order. Each job seeds itself, so results do not depend on `processes`."""
    describe = [
        f"{function.__name__[4:]}{tuple(a for a in args if isinstance(a, (str, int, float, tuple)))}"  # (no data)
        for function, args in jobs
    ]
    if processes <= 1:
        results = []
        for job, name in zip(jobs, describe):
            results.append(_call(job))
            log(f"done {name} ({results[-1]['job_seconds']:.0f} s)")
        return results
    import multiprocessing

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)  # spawned workers import this module by name
    try:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = [None] * len(jobs)
            for index, result in pool.imap_unordered(_indexed_call, list(enumerate(jobs))):
                results[index] = result
                log(f"done {describe[index]} ({result['job_seconds']:.0f} s)")
            pool.close()  # (a clean exit: the context manager alone terminates the workers)
            pool.join()
    finally:
        sys.path.remove(here)
    return results


def _indexed_call(indexed_job):
    index, job = indexed_job
    return index, _call(job)
