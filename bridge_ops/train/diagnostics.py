"""Measurements that tell whether the samples of a group use each other, and where the mechanism fails if not.

Teacher-forced, on a `GroupedBatch` (its groups = the samples that read each other):
    peer_kl             KL(with peers || solo) of the next-token distributions, and the share of argmax tokens that
                        change, over response tokens after the first (the first is predicted from the prompt alone,
                        where all rows are identical); solo = the same checkpoint with every row its own group
    answer_loss         NLL of the loss-masked tokens (e.g. the repaired answers of rows whose own chain went wrong)
                        with peers and solo: no gap means the block cannot read the answer from its peers
    attention_stats     Bridge attention entropy / log(n) and n * (weight on itself) over response positions where a
                        row sees n >= 2 keys: 1.0 and 1.0 is a uniform mean-pool
    bridge_gradient_norms  |grad| of Q/K/V/O of the Bridge blocks for the SFT loss of a batch (identical rows give
                        Q and K none)
On samples:
    independence_bound  the expected number of distinct correct answers N independent draws from a sampler reach,
                        estimated without bias from M >= N solo samples; a group cannot beat it by chance
    distinct_answers    per problem: distinct correct answers of groups with peers, against the independence bound of
                        the same checkpoint's solo samples and of the with-peers samples' own answer frequencies
    paired_bootstrap    mean difference of paired per-problem values with a bootstrap confidence interval
"""

import contextlib
import math
from collections import Counter
from typing import Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..generation import SamplingConfig
from ..hf import bridge_blocks, groups
from ..ops import bridge_attention
from .data import TASK_SAMPLING, GroupedBatch, rollout, token_log_probs
from .losses import sft_loss


def _next_token_log_probs(model: nn.Module, batch: GroupedBatch) -> torch.Tensor:
    """float32 [R, T, V]: log-softmax of the logits that predict each response token."""
    start = batch.prompt_length - 1
    with groups(model, cu_group_lens=batch.cu_group_lens, key_mask=batch.key_mask):
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=batch.input_ids.shape[1] - start,
        ).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def peer_kl(model: nn.Module, batch: GroupedBatch) -> Dict[str, float]:
    """{"kl": mean KL(with peers || solo) per token, "argmax_changed": share of tokens whose argmax differs, "tokens"}
    over the response tokens after the first of every row."""
    with_peers, solo = _next_token_log_probs(model, batch), _next_token_log_probs(model, batch.solo())
    mask = batch.response_mask.clone()
    mask[:, 0] = False
    kl = (with_peers.exp() * (with_peers - solo)).sum(-1)
    changed = with_peers.argmax(-1) != solo.argmax(-1)
    tokens = int(mask.sum())
    return {
        "kl": float(kl[mask].mean()) if tokens else 0.0,
        "argmax_changed": float(changed[mask].float().mean()) if tokens else 0.0,
        "tokens": tokens,
    }


@torch.no_grad()
def answer_loss(model: nn.Module, batch: GroupedBatch) -> Dict[str, float]:
    """{"with_peers", "solo"}: mean NLL per loss-masked token, teacher-forced with the batch's groups and alone."""
    return {
        name: float(sft_loss(token_log_probs(model, b), b.loss_mask))
        for name, b in (("with_peers", batch), ("solo", batch.solo()))
    }


@contextlib.contextmanager
def _bridge_inputs(model: nn.Module) -> Iterator[List[tuple]]:
    """Records (block, hidden, cu_group_lens, key_mask) of every Bridge block call inside the block."""
    records: List[tuple] = []
    blocks = bridge_blocks(model)
    for block in blocks:

        def residual(hidden, cu_group_lens, key_mask=None, _block=block, _original=block.residual):
            records.append((_block, hidden, cu_group_lens, key_mask))
            return _original(hidden, cu_group_lens, key_mask)

        block.residual = residual
    try:
        yield records
    finally:
        for block in blocks:
            del block.residual


@torch.no_grad()
def attention_stats(model: nn.Module, batch: GroupedBatch) -> Dict[str, float]:
    """Mean over layers, heads and (row, response position) with n >= 2 visible keys of: entropy / log(n)
    ("entropy_ratio") and n * weight on itself ("self_weight_ratio"); a uniform mean-pool gives 1.0 and 1.0.

    The entropy comes from the op itself: with v = k, scale * q . out = E_p[score], and H = lse - E_p[score]."""
    with _bridge_inputs(model) as records:
        _next_token_log_probs(model, batch)
    visible = batch.key_mask.clone()
    sizes = torch.tensor(batch.widths)
    group_of_row = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    # n[b, s]: keys row b sees at s = visible peers (itself excluded) + itself
    peers_visible = torch.zeros(len(sizes), visible.shape[1]).index_add_(0, group_of_row, visible.float())
    n = peers_visible[group_of_row] - visible.float() + 1
    positions = torch.zeros_like(visible)
    positions[:, batch.prompt_length :] = batch.response_mask
    selected = positions & (n >= 2)
    if not selected.any():
        return {"entropy_ratio": float("nan"), "self_weight_ratio": float("nan"), "queries": 0}
    entropy, self_weight = [], []
    for block, hidden, cu, key_mask in records:
        x = block.norm(hidden)
        shape = (*hidden.shape[:2], block.num_heads, block.head_dim)
        q, k = block.q_proj(x).view(shape), block.k_proj(x).view(shape)
        scale = block.head_dim**-0.5
        out, lse = bridge_attention(q, k, k, cu, key_mask, return_lse=True)
        expected = scale * (q.float() * out.float()).sum(-1)
        own = torch.exp(scale * (q.float() * k.float()).sum(-1) - lse)
        entropy.append(((lse - expected) / n.log()[..., None])[selected])
        self_weight.append((own * n[..., None])[selected])
    return {
        "entropy_ratio": float(torch.cat(entropy).mean()),
        "self_weight_ratio": float(torch.cat(self_weight).mean()),
        "queries": int(selected.sum()),
    }


def bridge_gradient_norms(model: nn.Module, batch: GroupedBatch) -> Dict[str, float]:
    """|grad| (Frobenius, over all layers) of the Bridge Q/K/V/O projections for the SFT loss of `batch`."""
    blocks = bridge_blocks(model)
    params = {name: [getattr(b, f"{name}_proj").weight for b in blocks] for name in ("q", "k", "v", "o")}
    flat = [p for ps in params.values() for p in ps]
    loss = sft_loss(token_log_probs(model, batch), batch.loss_mask)
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    norms, i = {}, 0
    for name, ps in params.items():
        chunk = [g for g in grads[i : i + len(ps)] if g is not None]
        norms[name] = float(torch.stack([g.norm() for g in chunk]).norm()) if chunk else 0.0
        i += len(ps)
    return norms


def independence_bound(counts: Mapping[Hashable, int], samples: int, width: int) -> float:
    """Expected number of distinct answers among `width` independent draws from a sampler, estimated from `samples`
    draws of it in which answer a appeared counts[a] times (pass the correct answers only to bound distinct correct
    answers). Unbiased: it is the mean number of distinct answers over all width-subsets of the samples,
    sum_a [1 - C(samples - counts[a], width) / C(samples, width)], whose expectation is sum_a [1 - (1 - p_a)^width]."""
    if width > samples:
        raise ValueError(f"bridge_ops: the bound at width {width} needs at least {width} samples, got {samples}")
    if sum(counts.values()) > samples:
        raise ValueError(f"bridge_ops: counts sum to {sum(counts.values())} > {samples} samples")
    total = math.comb(samples, width)
    return sum(1.0 - math.comb(samples - c, width) / total for c in counts.values())


@torch.no_grad()
def distinct_answers(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    reward_fn: Callable[[int, List[int]], float],
    extract_answer: Callable[[List[int]], Optional[Hashable]],
    width: int = 4,
    *,
    groups_per_prompt: int = 4,
    solo_samples: int = 16,
    sampling: SamplingConfig = TASK_SAMPLING,
    max_new_tokens: Optional[int] = None,
    seed: int = 0,
    prompts_per_batch: int = 64,
    eos_token_id=None,
    pad_token_id=None,
) -> List[Dict[str, float]]:
    """Per prompt: {"distinct": distinct correct answers per group of `width` with peers (mean over
    `groups_per_prompt` groups), "bound": the independence bound at `width` from `solo_samples` solo samples of the
    same model, "marginal_bound": the bound from the with-peers samples' own answer frequencies (pooled over the
    groups: what independent draws with the same per-sample distribution would reach), "valid": share of correct
    with-peers samples, "valid_solo": share of correct solo samples}. distinct > marginal_bound means the members of a
    group coordinate (their answers are negatively correlated); distinct > bound means peers raise the number of
    distinct correct answers over what the same checkpoint reaches with independent samples. Samples are drawn as
    `sampling` says (default: 16 new tokens at temperature 1); max_new_tokens, eos_token_id and pad_token_id, when
    given, replace its fields."""
    sampling = sampling.updated(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    out = []
    for start in range(0, len(prompts), prompts_per_batch):
        indices = list(range(start, min(start + prompts_per_batch, len(prompts))))
        grouped = rollout(
            model, prompts, indices, width, None, (seed, "peers"), copies=groups_per_prompt, sampling=sampling
        )
        solo = rollout(model, prompts, indices, solo_samples, None, (seed, "solo"), peers="solo", sampling=sampling)
        for p, i in enumerate(indices):
            groups_of_i = grouped[p * groups_per_prompt : (p + 1) * groups_per_prompt]
            correct = [[extract_answer(r) for r in g if reward_fn(i, r) > 0] for g in groups_of_i]
            solo_correct = [extract_answer(r) for r in solo[p] if reward_fn(i, r) > 0]
            pooled = [a for g in correct for a in g]
            out.append(
                {
                    "distinct": sum(len(set(g)) for g in correct) / groups_per_prompt,
                    "bound": independence_bound(Counter(solo_correct), solo_samples, width),
                    "marginal_bound": independence_bound(Counter(pooled), width * groups_per_prompt, width),
                    "valid": len(pooled) / (width * groups_per_prompt),
                    "valid_solo": len(solo_correct) / solo_samples,
                }
            )
    return out


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> Dict[str, float]:
    """Mean of a - b over paired items (e.g. problems) and its percentile bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"bridge_ops: paired_bootstrap needs two equally long non-empty lists, got {len(a)}, {len(b)}")
    diffs = torch.tensor([x - y for x, y in zip(a, b)], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diffs), (resamples, len(diffs)), generator=generator)
    means = diffs[picks].mean(1).sort().values
    tail = (1 - confidence) / 2
    low, high = means[int(tail * (resamples - 1))], means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return {"mean": float(diffs.mean()), "low": float(low), "high": float(high), "n": len(diffs)}
