"""The GRPO objective: group-normalized advantages, clipped ratio, token-level (DAPO) aggregation, optional KL.

For rows r of groups g (a group = the N responses to one prompt), rewards R_r and response tokens t:

    A_r      = (R_r - mean_g R) / (std_g R + eps)            (scale_rewards=False: no division, Dr. GRPO)
    ratio_rt = exp(logp_rt - old_logp_rt)
    L        = sum_{r,t} [ -min(ratio_rt A_r, clip(ratio_rt, 1 - eps_low, 1 + eps_high) A_r) + beta KL_rt ] / T_total

with KL_rt = exp(ref_rt - logp_rt) - (ref_rt - logp_rt) - 1 (the k3 estimator, >= 0) and T_total the number of
response tokens in the whole step (all ranks): every token weighs the same, whatever its sequence's length.
std is the population std of the group; a group whose rewards are all equal has zero advantage.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from .trainer import require_number


def checked_reward(reward, index: int, member: int) -> float:
    """`reward` as a float, refusing anything but a finite number (a single NaN, inf or None would turn every
    trained parameter into NaN); index and member name the prompt and the response in the error."""
    if isinstance(reward, torch.Tensor) and reward.numel() == 1:
        reward = reward.item()
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise ValueError(
            f"bridge_ops: reward_fn returned {reward!r} for prompt {index} (response {member}); "
            "it must return a finite number for every response"
        )
    return float(reward)


def group_advantages(
    rewards: torch.Tensor, widths: Sequence[int], scale_rewards: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """float32 [R]: rewards [R] normalized within consecutive groups of sizes `widths`."""
    if rewards.dim() != 1 or rewards.numel() != sum(widths):
        raise ValueError(f"bridge_ops: rewards must be [sum(widths)] = [{sum(widths)}], got {list(rewards.shape)}")
    out = []
    for group in rewards.float().split(list(widths)):
        centered = group - group.mean()
        out.append(centered / (group.std(unbiased=False) + eps) if scale_rewards else centered)
    return torch.cat(out)


@dataclass(frozen=True)
class GRPOLossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO's clip-higher
    beta: float = 0.0  # weight of the KL penalty to the reference model (0: no reference model is needed)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first coefficient that is not a finite number in its range: clip_low in
        [0, 1] (the ratio's lower bound is 1 - clip_low), clip_high >= 0, beta >= 0."""
        for name in ("clip_low", "clip_high", "beta"):
            require_number(name, getattr(self, name), positive=False)
        if self.clip_low > 1:
            raise ValueError(
                f"bridge_ops: clip_low must be <= 1 (the ratio's lower bound is 1 - clip_low), got {self.clip_low}"
            )


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: GRPOLossConfig = GRPOLossConfig(),
    ref_log_probs: Optional[torch.Tensor] = None,
    total_tokens: Optional[float] = None,
) -> Dict[str, torch.Tensor]:
    """Token-level clipped GRPO loss.

    Args:
        log_probs: float32 [R, T] current policy log-probs of the response tokens (differentiable).
        old_log_probs: float32 [R, T] log-probs under the policy that sampled them (no grad).
        advantages: float32 [R] per-row advantages.
        response_mask: bool [R, T].
        ref_log_probs: float32 [R, T] reference-model log-probs; required when config.beta > 0.
        total_tokens: the denominator (default: response_mask.sum()); data-parallel ranks pass the global count.

    Returns {"loss", "clip_fraction", "kl"} (the last two detached, over this call's tokens).
    """
    if config.beta > 0 and ref_log_probs is None:
        raise ValueError("bridge_ops: beta > 0 needs ref_log_probs")
    mask = response_mask.float()
    denominator = mask.sum().clamp(min=1) if total_tokens is None else total_tokens
    ratio = torch.exp(log_probs - old_log_probs)
    adv = advantages[:, None]
    clipped_ratio = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
    unclipped, clipped = ratio * adv, clipped_ratio * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_log_probs is not None:
        delta = ref_log_probs - log_probs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + config.beta * kl
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        clip_fraction = ((clipped < unclipped).float() * mask).sum() / tokens  # tokens the clip took out
        mean_kl = (kl * mask).sum() / tokens
    return {"loss": (per_token * mask).sum() / denominator, "clip_fraction": clip_fraction, "kl": mean_kl}


def sft_loss(log_probs: torch.Tensor, response_mask: torch.Tensor, total_tokens: Optional[float] = None):
    """Token-level negative log-likelihood of the response tokens: -sum(log_probs * mask) / total_tokens."""
    mask = response_mask.float()
    denominator = mask.sum().clamp(min=1) if total_tokens is None else total_tokens
    return -(log_probs * mask).sum() / denominator
