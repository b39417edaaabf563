"""Accuracy of N (interdependent) samples per prompt, at several widths.

For each width N, every test prompt gets N samples in one group (Bridge lets them read each other; without Bridge
they are independent), drawn from per-prompt generators seeded by (seed, N, prompt), and scored by `reward_fn`:

    mean_accuracy      mean reward over all samples (Pass@1 averaged over the N samples)
    all_correct        fraction of prompts whose N samples are all correct
    any_correct        fraction of prompts with at least one correct sample (Pass@N)
    majority_accuracy  fraction of prompts whose majority-vote answer (`extract_answer`) is correct
    distinct_correct   mean number of distinct answers among a prompt's correct samples (multi-answer tasks)

`peers="solo"` draws the N samples of the same checkpoint with every sample alone (its Bridge sees only itself):
the ablation that isolates what the samples take from each other. `details=True` adds, per width, the per-prompt
results ("problems": one {"correct": [bool per sample], "answers": [...]} per prompt) for paired statistics.
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..aggregation import majority_vote
from ..generation import SamplingConfig
from .data import TASK_SAMPLING, rollout


@torch.no_grad()
def evaluate_widths(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward_fn: Callable[[int, List[int]], float],
    extract_answer: Callable[[List[int]], Optional[object]],
    answers: Sequence[object],
    widths: Sequence[int] = (1, 2, 4, 8, 16),
    *,
    peers: str = "group",
    sampling: SamplingConfig = TASK_SAMPLING,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    seed: int = 0,
    rows_per_batch: int = 512,
    eos_token_id=None,
    pad_token_id=None,
    details: bool = False,
    progress: bool = False,
) -> List[Dict[str, object]]:
    """One dict per width: {"width", "peers", "mean_accuracy", "all_correct", "any_correct", "majority_accuracy",
    "distinct_correct"} (and "problems" with details=True).

    reward_fn(i, response_ids) scores a response to prompt i (> 0: correct); extract_answer(response_ids) is what
    votes, compared with answers[i] (for multi-answer tasks a vote is right when reward_fn accepts it). The samples
    are drawn as `sampling` says (default: 16 new tokens at temperature 1); max_new_tokens, temperature, eos_token_id
    and pad_token_id, when given, replace its fields.
    """
    sampling = sampling.updated(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    model.eval()
    results = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(widths) * len(prompts), desc=f"evaluate ({peers})", unit="prompt")
    for width in widths:
        problems = []
        chunk = max(1, rows_per_batch // width)
        for start in range(0, len(prompts), chunk):
            indices = range(start, min(start + chunk, len(prompts)))
            samples = rollout(model, prompts, indices, width, None, (seed, width), peers=peers, sampling=sampling)
            for i, group in zip(indices, samples):
                problems.append(_score(i, group, reward_fn, extract_answer, answers[i]))
            if bar is not None:
                bar.update(len(indices))
        correct = [c for p in problems for c in p["correct"]]
        entry = {
            "width": width,
            "peers": peers,
            "mean_accuracy": sum(correct) / len(correct),
            "all_correct": sum(all(p["correct"]) for p in problems) / len(problems),
            "any_correct": sum(any(p["correct"]) for p in problems) / len(problems),
            "majority_accuracy": sum(p["vote_correct"] for p in problems) / len(problems),
            "distinct_correct": sum(p["distinct_correct"] for p in problems) / len(problems),
        }
        if details:
            entry["problems"] = problems
        results.append(entry)
    if bar is not None:
        bar.close()
    return results


def _score(index, group, reward_fn, extract_answer, answer) -> Dict[str, object]:
    correct = [reward_fn(index, r) > 0 for r in group]
    extracted = [extract_answer(r) for r in group]
    vote = majority_vote(extracted)
    vote_correct = vote is not None and (vote == answer or any(ok for ok, a in zip(correct, extracted) if a == vote))
    return {
        "correct": correct,
        "answers": extracted,
        "vote_correct": vote_correct,
        "distinct_correct": len({a for ok, a in zip(correct, extracted) if ok}),
    }
