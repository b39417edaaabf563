"""GRPO (RLVR) for bridged and plain HF causal LMs: rollouts at width N, group advantages, token-level clipped loss.

One step:
  1. pick `prompts_per_step` prompts (a function of (seed, step)); this rank takes its contiguous share;
  2. roll out `groups_per_prompt` groups of N responses per prompt with `bridge_ops.generate` (a Bridge group = the
     N responses that read each other; each group samples from its own generator seeded by (seed, step, prompt,
     copy), so ranks draw what one process would);
  3. reward every response: `reward_fn(prompt_index, response_ids)` per response, or a `GroupReward` that scores a
     Bridge group as a whole (e.g. valid answers divided by how many peers gave the same one); advantages are taken
     over all `groups_per_prompt * N` responses of a prompt, so with k > 1 groups a group is compared with the
     prompt's other groups (a Bridge group whose members agree has equal rewards and no advantage of its own);
  4. old log-probs (and reference log-probs when beta > 0) from one teacher-forced forward with the rollout's groups
     (a token's probability depends on its peers through Bridge, so a per-sequence forward would be wrong);
  5. one optimizer step per minibatch of whole prompts on the clipped token-level loss (the first minibatch is
     exactly on-policy; later ones are off-policy, which the clip bounds). Through Bridge, each sample's loss
     reaches the parameters through its peers' hidden states too.
"""

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..files import json_digest
from ..generation import SamplingConfig
from .data import grouped_batch, pad_id, rollout, token_log_probs
from .distributed import DistContext
from .losses import GRPOLossConfig, checked_reward, group_advantages, grpo_loss
from .trainer import TrainConfig, Trainer, require_integers, require_number, step_rng

RowRewardFn = Callable[[int, List[int]], float]  # (prompt index, response token ids incl. EOS) -> reward


@dataclass(frozen=True)
class GroupReward:
    """A reward that scores one Bridge group at once: fn(prompt index, the group's responses) -> one reward per
    response (e.g. rewarding answers that no peer gave)."""

    fn: Callable[[int, List[List[int]]], Sequence[float]]

    def __call__(self, index: int, responses: List[List[int]]) -> List[float]:
        rewards = list(self.fn(index, responses))
        if len(rewards) != len(responses):
            raise ValueError(f"bridge_ops: the group reward gave {len(rewards)} rewards for {len(responses)} responses")
        return [checked_reward(r, index, member) for member, r in enumerate(rewards)]


RewardFn = Union[RowRewardFn, GroupReward]


def score_groups(reward_fn: RewardFn, indices: Sequence[int], groups: Sequence[List[List[int]]]) -> torch.Tensor:
    """float32 [R]: the rewards of every group's responses, in order (groups[g] answers prompt indices[g]); each a
    finite number, or a ValueError naming the prompt and the response."""
    if isinstance(reward_fn, GroupReward):
        rewards = [r for i, group in zip(indices, groups) for r in reward_fn(i, group)]
    else:
        rewards = [
            checked_reward(reward_fn(i, response), i, member)
            for i, group in zip(indices, groups)
            for member, response in enumerate(group)
        ]
    return torch.tensor(rewards, dtype=torch.float32)


@dataclass
class GRPOConfig(TrainConfig):
    lr: float = 1e-4
    width: int = 4
    groups_per_prompt: int = 1  # k Bridge groups of `width` per prompt; advantages over the k * width responses
    prompts_per_step: int = 16
    max_new_tokens: int = 16
    temperature: float = 1.0
    scale_rewards: bool = True
    minibatches: int = 1  # optimizer steps per rollout batch, each on an equal share of its prompts
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)

    def validate(self) -> None:
        super().validate()
        require_integers(self, width=1, groups_per_prompt=1, prompts_per_step=1, max_new_tokens=1, minibatches=1)
        require_number("temperature", self.temperature, positive=True)
        if not isinstance(self.loss, GRPOLossConfig):
            raise ValueError(f"bridge_ops: loss must be a GRPOLossConfig, got {self.loss!r}")
        self.loss.validate()
        if self.prompts_per_step % self.minibatches:
            raise ValueError(
                f"bridge_ops: prompts_per_step={self.prompts_per_step} must be a multiple of "
                f"minibatches={self.minibatches}"
            )

    def sampling(self, eos_token_id=None, pad_token_id: Optional[int] = None) -> SamplingConfig:
        """How the rollouts draw: max_new_tokens and temperature of this config (the loss's log-probabilities use the
        same temperature), with the run's EOS and pad ids."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


def train_grpo(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward_fn: RewardFn,
    config: GRPOConfig,
    *,
    trainable: Optional[Dict[str, nn.Parameter]] = None,
    pad_token_id: Optional[int] = None,
    eos_token_id=None,
    dist: DistContext = DistContext(),
) -> List[Dict[str, float]]:
    """Trains `model` in place with GRPO on `prompts` (token id lists); returns the logged metrics.

    trainable: parameters to train (default: every parameter with requires_grad). With `config.loss.beta > 0` a
    frozen copy of the model at the start is the reference. Metrics per step: loss, reward (mean), solved (fraction
    of prompts with a rewarded response), zero_advantage (fraction of prompts whose responses all got the same
    reward: no gradient from them), clip_fraction, kl, response_length (tokens), grad_norm.
    """
    config.validate()
    if config.prompts_per_step > len(prompts):
        raise ValueError(f"bridge_ops: prompts_per_step={config.prompts_per_step} > {len(prompts)} prompts")
    if config.prompts_per_step % (dist.world_size * config.minibatches):
        raise ValueError(
            f"bridge_ops: prompts_per_step={config.prompts_per_step} must be a multiple of ranks x "
            f"minibatches = {dist.world_size} x {config.minibatches}"
        )
    trainable = trainable if trainable is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
    pad = pad_id(model, pad_token_id)
    reference = None
    if config.loss.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    ddp_model = dist.wrap(model)
    k = config.groups_per_prompt

    device = next(model.parameters()).device
    sampling = config.sampling(eos_token_id=eos_token_id, pad_token_id=pad)

    def step_fn(step: int, optimizer_step) -> Dict[str, float]:
        chosen = step_rng(config.seed, step).sample(range(len(prompts)), config.prompts_per_step)
        per_minibatch = len(chosen) // config.minibatches
        # minibatch m holds the same prompts on any number of ranks; each rank takes its share of every minibatch
        shares = [dist.shard(chosen[m * per_minibatch : (m + 1) * per_minibatch]) for m in range(config.minibatches)]
        indices = [i for share in shares for i in share]
        model.eval()
        responses = rollout(
            model, prompts, indices, config.width, None, (config.seed, step), copies=k, sampling=sampling
        )
        rewards = score_groups(reward_fn, [i for i in indices for _ in range(k)], responses)
        per_prompt = [sum(len(g) for g in responses[p * k : (p + 1) * k]) for p in range(len(indices))]
        advantages = group_advantages(rewards, per_prompt, config.scale_rewards).split(per_prompt)
        model.train()
        stats: Dict[str, float] = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
        for m, share in enumerate(shares):
            part = slice(m * len(share), (m + 1) * len(share))
            batch = grouped_batch(
                [prompts[i] for i in share for _ in range(k)], responses[part.start * k : part.stop * k], pad
            )
            batch, adv = batch.to(device), torch.cat(advantages[part]).to(device)  # (built on the CPU)
            with torch.no_grad():  # the sampling policy and the reference, with the rollout's groups
                old = token_log_probs(model, batch, config.temperature)
                ref = token_log_probs(reference, batch, config.temperature) if reference is not None else None
            total_tokens = dist.sum(batch.response_mask.sum().item())
            new = token_log_probs(ddp_model, batch, config.temperature)
            out = grpo_loss(new, old, adv, batch.response_mask, config.loss, ref, total_tokens)
            (out["loss"] * dist.world_size).backward()
            optimizer_step(out["loss"])
            for key in stats:
                stats[key] += out[key].item() / config.minibatches
        rows = float(rewards.numel())
        # each rank's loss is its share of the global loss; clip fraction and KL are per-rank means
        stats = {
            "loss": dist.sum(stats["loss"]),
            "clip_fraction": dist.sum(stats["clip_fraction"]) / dist.world_size,
            "kl": dist.sum(stats["kl"]) / dist.world_size,
        }
        stats["reward"] = dist.sum(rewards.sum().item()) / dist.sum(rows)
        by_prompt = rewards.split(per_prompt)
        stats["solved"] = dist.sum(sum(float(g.max() > 0) for g in by_prompt)) / dist.sum(len(by_prompt))
        stats["zero_advantage"] = dist.sum(sum(float(g.min() == g.max()) for g in by_prompt)) / dist.sum(len(by_prompt))
        stats["response_length"] = dist.sum(sum(len(r) for group in responses for r in group)) / dist.sum(rows)
        return stats

    fingerprints = {"training_data": json_digest(prompts), "reward_fn": _reward_name(reward_fn)}
    return Trainer(model, trainable, config, step_fn, dist, description="grpo", fingerprints=fingerprints).train()


def _reward_name(reward_fn: RewardFn) -> str:
    """module.qualname of a reward function (of a GroupReward's function): what a resumed run checks it against."""
    fn = reward_fn.fn if isinstance(reward_fn, GroupReward) else reward_fn
    return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
