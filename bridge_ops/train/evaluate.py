"""Accuracy of N (interdependent) samples per prompt, at several widths.

For each width N, every test prompt gets N samples in one group (Bridge lets them read each other; without Bridge
they are independent), drawn from per-prompt generators seeded by (seed, N, prompt), and scored by `reward_fn`:

    mean_accuracy      mean reward over all samples (Pass@1 averaged over the N samples)
    all_correct        fraction of prompts whose N samples are all correct
    any_correct        fraction of prompts with at least one correct sample (Pass@N)
    majority_accuracy  fraction of prompts whose majority-vote answer (`extract_answer`) is correct
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..aggregation import majority_vote
from .data import rollout


@torch.no_grad()
def evaluate_widths(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward_fn: Callable[[int, List[int]], float],
    extract_answer: Callable[[List[int]], Optional[object]],
    answers: Sequence[object],
    widths: Sequence[int] = (1, 2, 4, 8, 16),
    *,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    rows_per_batch: int = 512,
    eos_token_id=None,
    pad_token_id=None,
    progress: bool = False,
) -> List[Dict[str, float]]:
    """One dict per width: {"width", "mean_accuracy", "all_correct", "any_correct", "majority_accuracy"}.

    reward_fn(i, response_ids) scores a response to prompt i; extract_answer(response_ids) is what votes, compared
    with answers[i].
    """
    model.eval()
    results = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(widths) * len(prompts), desc="evaluate", unit="prompt")
    for width in widths:
        rewards, all_ok, any_ok, votes = [], [], [], []
        chunk = max(1, rows_per_batch // width)
        for start in range(0, len(prompts), chunk):
            indices = range(start, min(start + chunk, len(prompts)))
            samples = rollout(model, prompts, indices, width, max_new_tokens, (seed, width), temperature=temperature,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            for i, group in zip(indices, samples):
                scores = [reward_fn(i, r) > 0 for r in group]
                rewards.extend(scores)
                all_ok.append(all(scores))
                any_ok.append(any(scores))
                votes.append(majority_vote(extract_answer(r) for r in group) == answers[i])
            if bar is not None:
                bar.update(len(indices))
        results.append({
            "width": width,
            "mean_accuracy": sum(rewards) / len(rewards),
            "all_correct": sum(all_ok) / len(all_ok),
            "any_correct": sum(any_ok) / len(any_ok),
            "majority_accuracy": sum(votes) / len(votes),
        })
    if bar is not None:
        bar.close()
    return results
