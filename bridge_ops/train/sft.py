"""Supervised fine-tuning on grouped responses, and the Bridge warm-up data it trains on.

`train_sft` minimizes the token-level NLL of response tokens (prompt tokens carry no loss), whole groups per batch,
with the groups' Bridge mixing in the forward: a group is one prompt and its responses. Pretraining a base model is
the same call on an unbridged model with one response (the reference answer) per prompt and every parameter
trainable. The Bridge warm-up of the paper is `collect_correct_groups` (N samples per prompt from the base model,
keep the correct ones, keep prompts with at least two) followed by `train_sft` with only Bridge parameters trainable.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .data import grouped_batch, rollout, token_log_probs
from .distributed import DistContext
from .losses import sft_loss
from .trainer import Trainer, TrainConfig, step_rng

Group = Tuple[List[int], List[List[int]]]  # (prompt ids, responses' ids with EOS)


@dataclass
class SFTConfig(TrainConfig):
    lr: float = 1e-3
    groups_per_step: int = 16


def train_sft(
    model: nn.Module,
    groups: Sequence[Group],
    config: SFTConfig,
    *,
    trainable: Optional[Dict[str, nn.Parameter]] = None,
    pad_token_id: Optional[int] = None,
    dist: DistContext = DistContext(),
    description: str = "sft",
) -> List[Dict[str, float]]:
    """Trains `model` in place on `groups`; each step takes `groups_per_step` groups chosen by (seed, step).

    trainable: default every parameter with requires_grad (pass `bridge_ops.bridge_parameters`-based names for the
    paper's Bridge-only warm-up). Metrics per step: loss (mean NLL per response token), tokens, grad_norm.
    """
    if not groups:
        raise ValueError("bridge_ops: no SFT groups")
    if config.groups_per_step % dist.world_size:
        raise ValueError(f"bridge_ops: groups_per_step={config.groups_per_step} must be a multiple of "
                         f"{dist.world_size} ranks")
    trainable = trainable if trainable is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    ddp_model = dist.wrap(model)
    count = min(config.groups_per_step, len(groups))

    def step_fn(step: int, optimizer_step) -> Dict[str, float]:
        chosen = step_rng(config.seed, step).sample(range(len(groups)), count)
        mine = [groups[i] for i in dist.shard(chosen)]
        batch = grouped_batch([g[0] for g in mine], [g[1] for g in mine], pad)
        total_tokens = dist.sum(batch.response_mask.sum().item())
        loss = sft_loss(token_log_probs(ddp_model, batch), batch.response_mask, total_tokens)
        (loss * dist.world_size).backward()
        optimizer_step(loss)
        return {"loss": dist.sum(loss.item()), "tokens": total_tokens}

    return Trainer(model, trainable, config, step_fn, dist, description=description).train()


@torch.no_grad()
def collect_correct_groups(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward_fn: Callable[[int, List[int]], float],
    width: int = 8,
    *,
    min_correct: int = 2,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    batch_prompts: int = 64,
    eos_token_id=None,
    pad_token_id=None,
) -> List[Group]:
    """Samples `width` responses per prompt, keeps those with reward > 0, and returns (prompt, correct responses)
    for every prompt with at least `min_correct` of them (the paper's warm-up data: 8 samples, drop prompts with
    <= 1 correct)."""
    out: List[Group] = []
    for start in range(0, len(prompts), batch_prompts):
        indices = list(range(start, min(start + batch_prompts, len(prompts))))
        samples = rollout(model, prompts, indices, width, max_new_tokens, (seed, 0), temperature=temperature,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        for i, responses in zip(indices, samples):
            correct = [r for r in responses if reward_fn(i, r) > 0]
            if len(correct) >= min_correct:
                out.append((list(prompts[i]), correct))
    return out
