"""GRPO (RLVR) for bridged and plain HF causal LMs: rollouts at width N, group advantages, token-level clipped loss.

One step:
  1. pick `prompts_per_step` prompts (a function of (seed, step)); this rank takes its contiguous share;
  2. roll out N responses per prompt with `bridge_ops.generate` (Bridge groups = the N responses of a prompt; each
     prompt samples from its own generator seeded by (seed, step, prompt), so ranks draw what one process would);
  3. reward every response with the user's `reward_fn(prompt_index, response_ids)`; advantages within each group;
  4. old log-probs (and reference log-probs when beta > 0) from one teacher-forced forward with the rollout's groups
     (a token's probability depends on its peers through Bridge, so a per-sequence forward would be wrong);
  5. one optimizer step per minibatch of whole groups on the clipped token-level loss (the first minibatch is
     exactly on-policy; later ones are off-policy, which the clip bounds). Through Bridge, each sample's loss
     reaches the parameters through its peers' hidden states too.
"""

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .data import grouped_batch, rollout, token_log_probs
from .distributed import DistContext
from .losses import GRPOLossConfig, group_advantages, grpo_loss, rewards_of
from .trainer import Trainer, TrainConfig, step_rng

RewardFn = Callable[[int, List[int]], float]  # (prompt index, response token ids incl. EOS) -> reward


@dataclass
class GRPOConfig(TrainConfig):
    lr: float = 1e-4
    width: int = 4
    prompts_per_step: int = 16
    max_new_tokens: int = 16
    temperature: float = 1.0
    scale_rewards: bool = True
    minibatches: int = 1  # optimizer steps per rollout batch, each on an equal share of its groups
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)


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
    of groups with a rewarded member), clip_fraction, kl, response_length (tokens), grad_norm.
    """
    if config.minibatches < 1:
        raise ValueError(f"bridge_ops: minibatches must be >= 1, got {config.minibatches}")
    if config.prompts_per_step > len(prompts):
        raise ValueError(f"bridge_ops: prompts_per_step={config.prompts_per_step} > {len(prompts)} prompts")
    if config.prompts_per_step % (dist.world_size * config.minibatches):
        raise ValueError(f"bridge_ops: prompts_per_step={config.prompts_per_step} must be a multiple of ranks x "
                         f"minibatches = {dist.world_size} x {config.minibatches}")
    trainable = trainable if trainable is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    reference = None
    if config.loss.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    ddp_model = dist.wrap(model)

    def step_fn(step: int, optimizer_step) -> Dict[str, float]:
        chosen = step_rng(config.seed, step).sample(range(len(prompts)), config.prompts_per_step)
        per_minibatch = len(chosen) // config.minibatches
        # minibatch m holds the same groups on any number of ranks; each rank takes its share of every minibatch
        shares = [dist.shard(chosen[m * per_minibatch : (m + 1) * per_minibatch]) for m in range(config.minibatches)]
        indices = [i for share in shares for i in share]
        model.eval()
        responses = rollout(model, prompts, indices, config.width, config.max_new_tokens, (config.seed, step),
                            temperature=config.temperature, eos_token_id=eos_token_id, pad_token_id=pad)
        rewards = rewards_of(reward_fn, indices, responses)
        widths = [len(group) for group in responses]
        advantages = group_advantages(rewards, widths, config.scale_rewards).split(widths)
        model.train()
        stats: Dict[str, float] = {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0}
        for m, share in enumerate(shares):
            part = slice(m * len(share), (m + 1) * len(share))
            batch = grouped_batch([prompts[i] for i in share], responses[part], pad)
            adv = torch.cat(advantages[part])
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
        stats = {"loss": dist.sum(stats["loss"]), "clip_fraction": dist.sum(stats["clip_fraction"]) / dist.world_size,
                 "kl": dist.sum(stats["kl"]) / dist.world_size}
        stats["reward"] = dist.sum(rewards.sum().item()) / dist.sum(rows)
        solved = [float(g.max() > 0) for g in rewards.split(widths)]
        stats["solved"] = dist.sum(sum(solved)) / dist.sum(len(solved))
        stats["response_length"] = dist.sum(sum(len(r) for group in responses for r in group)) / dist.sum(rows)
        return stats

    return Trainer(model, trainable, config, step_fn, dist, description="grpo").train()
