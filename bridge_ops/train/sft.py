"""Supervised fine-tuning on grouped responses, and the Bridge warm-up data it trains on.

`train_sft` minimizes the token-level NLL of response tokens (prompt tokens carry no loss; a group may restrict the
loss further with per-response loss masks), whole groups per batch, with the groups' Bridge mixing in the forward: a
group is one prompt and its responses. Pretraining a base model is the same call on an unbridged model with the
reference responses of each prompt and every parameter trainable.

The Bridge warm-up is `collect_warmup_groups` (N samples per prompt from the base model, turned into groups by one
of WARMUP_MODES) followed by `train_sft` with only the added parameters trainable (the paper's recipe;
`recipes.MethodSpec.warmup_trains="all"` trains every parameter, the added blocks at a higher learning rate):

    correct   the paper's recipe: a prompt's correct samples form a group. With a unique exact answer the rows of a
              group are the same string, and Bridge over identical rows returns v whatever its attention weights: its
              Q and K get no gradient (train_sft warns), so this fits a per-row adapter.
    distinct  the distinct correct samples of a prompt (duplicates removed): rows that differ, for tasks with
              several correct answers.
    repair    every sample keeps its own reasoning and gets the correct answer at its end (`repair_fn`); the loss
              covers the whole response of rows whose own reasoning was right and only the answer of the others,
              so a row whose chain went wrong must learn to take the answer from its peers.
    ranked    for tasks whose responses start with a random draw (`SubsetSumTask(draw_length > 0)`): the distinct
              correct answers of a prompt reassigned by `rank_fn` so that the row with the k-th smallest draw gives
              the k-th answer. Rows differ from their first token on, and the answer a row should give depends on
              its peers' draws: a protocol only rows that read each other can follow (an independent sampler sees
              its own draw only).
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..files import json_digest
from ..generation import SamplingConfig
from ..hf import is_bridged
from .data import TASK_SAMPLING, check_token_ids, grouped_batch, pad_id, rollout, token_log_probs
from .distributed import DistContext
from .losses import sft_loss
from .trainer import TrainConfig, Trainer, step_rng

WARMUP_MODES = ("correct", "distinct", "repair", "ranked")


class Group(NamedTuple):
    """One prompt and its responses (token ids, EOS included); loss_masks: per response, which tokens carry a loss
    (None: all of them). A plain (prompt, responses) tuple is a Group without loss masks."""

    prompt: List[int]
    responses: List[List[int]]
    loss_masks: Optional[List[List[bool]]] = None


# repair_fn(prompt index, response ids) -> (repaired ids, loss mask, own reasoning correct), or None to drop the row
RepairFn = Callable[[int, List[int]], Optional[Tuple[List[int], List[bool], bool]]]
# rank_fn(prompt index, the prompt's distinct correct responses) -> the ranked group's responses (token ids)
RankFn = Callable[[int, List[List[int]]], List[List[int]]]


@dataclass
class SFTConfig(TrainConfig):
    lr: float = 1e-3
    groups_per_step: int = 16


def identical_groups(groups: Sequence[Group]) -> int:
    """How many groups of two or more rows have every row the same token string (no gradient for Bridge's Q/K)."""
    return sum(1 for g in groups if len(g[1]) > 1 and all(r == g[1][0] for r in g[1]))


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

    trainable: default every parameter with requires_grad (pass `select_trainable(model, "bridge")` for the paper's
    Bridge-only warm-up). Metrics per step: loss (mean NLL per loss token), tokens, grad_norm. Warns when the model
    is bridged and groups have identical rows (Bridge's Q/K learn nothing from them). Token ids outside the
    vocabulary, and no `pad_token_id` (neither given nor in the model's config), are refused before training.
    """
    if not groups:
        raise ValueError("bridge_ops: no SFT groups")
    if config.groups_per_step % dist.world_size:
        raise ValueError(
            f"bridge_ops: groups_per_step={config.groups_per_step} must be a multiple of {dist.world_size} ranks"
        )
    groups = [Group(*g) for g in groups]
    check_token_ids(
        [g.prompt for g in groups], [g.responses for g in groups], model.get_input_embeddings().num_embeddings
    )
    pad = pad_id(model, pad_token_id)
    same = identical_groups(groups)
    if same and is_bridged(model):
        warnings.warn(
            f"bridge_ops: {same} of {len(groups)} SFT groups have identical rows; Bridge over identical rows "
            "returns v whatever its attention, so these groups give its Q/K projections no gradient (only groups "
            "whose rows differ train them)",
            stacklevel=2,
        )
    trainable = trainable if trainable is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
    ddp_model = dist.wrap(model)
    count = min(config.groups_per_step, len(groups))

    device = next(model.parameters()).device  # batches are built on the CPU

    def step_fn(step: int, optimizer_step) -> Dict[str, float]:
        chosen = step_rng(config.seed, step).sample(range(len(groups)), count)
        mine = [groups[i] for i in dist.shard(chosen)]
        batch = grouped_batch([g.prompt for g in mine], [g.responses for g in mine], pad, [g.loss_masks for g in mine])
        batch = batch.to(device)
        total_tokens = dist.sum(batch.loss_mask.sum().item())
        loss = sft_loss(token_log_probs(ddp_model, batch), batch.loss_mask, total_tokens)
        (loss * dist.world_size).backward()
        optimizer_step(loss)
        return {"loss": dist.sum(loss.item()), "tokens": total_tokens}

    fingerprints = {"training_data": json_digest(groups)}
    return Trainer(model, trainable, config, step_fn, dist, description=description, fingerprints=fingerprints).train()


@torch.no_grad()
def collect_warmup_groups(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    width: int = 8,
    mode: str = "correct",
    *,
    reward_fn: Optional[Callable[[int, List[int]], float]] = None,
    repair_fn: Optional[RepairFn] = None,
    rank_fn: Optional[RankFn] = None,
    min_correct: int = 2,
    sampling: SamplingConfig = TASK_SAMPLING,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    seed: int = 0,
    batch_prompts: int = 64,
    eos_token_id=None,
    pad_token_id=None,
) -> List[Group]:
    """Samples `width` responses per prompt from `model` and builds warm-up groups by `mode` (WARMUP_MODES, see the
    module docstring). A prompt is kept when at least `min_correct` of its rows are correct: rewarded (reward_fn > 0)
    for "correct" and "distinct" (distinct ones), with correct own reasoning for "repair" (repair_fn's flag), rows of
    the ranked group for "ranked" (rank_fn's output); a repair group also keeps its rows whose reasoning went wrong,
    with the loss on their answer only. The samples are drawn as `sampling` says (default: 16 new tokens at
    temperature 1); max_new_tokens, temperature, eos_token_id and pad_token_id, when given, replace its fields."""
    sampling = sampling.updated(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    _check_mode(mode, reward_fn, repair_fn, rank_fn)  # before any sample is drawn
    samples = draw_warmup_samples(model, prompts, width, sampling, seed, batch_prompts)
    return warmup_groups_of(prompts, samples, mode, reward_fn, repair_fn, rank_fn, min_correct)


def draw_warmup_samples(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    width: int,
    sampling: SamplingConfig,
    seed: int = 0,
    batch_prompts: int = 64,
) -> List[List[List[int]]]:
    """The samples `collect_warmup_groups` draws: `width` responses (token ids) per prompt, `batch_prompts` prompts
    per rollout, each rollout seeded by (seed, 0)."""
    samples: List[List[List[int]]] = []
    for start in range(0, len(prompts), batch_prompts):
        indices = list(range(start, min(start + batch_prompts, len(prompts))))
        samples += rollout(model, prompts, indices, width, None, (seed, 0), sampling=sampling)
    return samples


def warmup_groups_of(
    prompts: Sequence[Sequence[int]],
    samples: Sequence[Sequence[List[int]]],
    mode: str,
    reward_fn: Optional[Callable[[int, List[int]], float]] = None,
    repair_fn: Optional[RepairFn] = None,
    rank_fn: Optional[RankFn] = None,
    min_correct: int = 2,
) -> List[Group]:
    """The warm-up groups of `mode` built from samples already drawn (`samples[i]`: the responses of prompt i), as
    `collect_warmup_groups` builds them: one sample set can feed several modes (e.g. "correct" for an independent
    method and "repair" for Bridge)."""
    _check_mode(mode, reward_fn, repair_fn, rank_fn)
    out: List[Group] = []
    for i, responses in enumerate(samples):
        group = _warmup_group(list(prompts[i]), i, responses, mode, reward_fn, repair_fn, rank_fn)
        if group is not None and group[1] >= min_correct:
            out.append(group[0])
    return out


def _check_mode(mode, reward_fn, repair_fn, rank_fn) -> None:
    if mode not in WARMUP_MODES:
        raise ValueError(f"bridge_ops: warm-up mode must be one of {WARMUP_MODES}, got {mode!r}")
    needed = {"repair": ("repair_fn",), "ranked": ("reward_fn", "rank_fn")}.get(mode, ("reward_fn",))
    given = dict(reward_fn=reward_fn, repair_fn=repair_fn, rank_fn=rank_fn)
    if any(given[name] is None for name in needed):
        raise ValueError(f"bridge_ops: the {mode!r} warm-up needs {' and '.join(needed)}")


def _warmup_group(prompt, index, responses, mode, reward_fn, repair_fn, rank_fn) -> Optional[Tuple[Group, int]]:
    """(the group of one prompt's samples, its number of correct rows), or None when no row is usable."""
    if mode == "repair":
        rows = [r for r in (repair_fn(index, response) for response in responses) if r is not None]
        if not rows:
            return None
        return Group(prompt, [r[0] for r in rows], [r[1] for r in rows]), sum(r[2] for r in rows)
    correct = [r for r in responses if reward_fn(index, r) > 0]
    if mode in ("distinct", "ranked"):
        correct = [list(r) for r in dict.fromkeys(tuple(r) for r in correct)]
    if mode == "ranked":
        correct = rank_fn(index, correct)
    return Group(prompt, correct), len(correct)
