"""Grouped prompt + response batches, and the teacher-forced log-probabilities every trainer needs.

A `GroupedBatch` holds G groups: group g is one prompt and its responses (N_g rows, adjacent, ragged widths
allowed). One forward over `[left-padded prompt | right-padded response]` with the Bridge groups and key mask that
generation used gives, at every response position, the distribution the token was drawn from: a token's
probability depends on its group peers, so SFT, GRPO's old/new policy and the reference model all go through
`token_log_probs`, never through a per-sequence forward.

`rollout` draws the responses: N interdependent samples per prompt through `bridge_ops.generate`, each prompt from its
own seeded generator (GRPO rollouts, the warm-up data and the evaluation all sample this way).

Masking (the generation rule of `bridge_ops.generate`): left padding of the prompt is invisible to self-attention
and to Bridge; a response's tokens up to and including its EOS are visible Bridge keys, the padding after it is
not. Positions ids count real tokens only.
"""

from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import nn

from ..generation import generate
from ..groups import cu_group_lens_from_sizes
from ..hf.patch import is_bridged
from ..hf.runtime import groups
from .trainer import seed_of


@dataclass
class GroupedBatch:
    """Rows R = sum of group widths; L = longest prompt, T = longest response.

    input_ids      long [R, L + T]  prompt (left-padded) then response (right-padded)
    attention_mask long [R, L + T]  1 on real prompt tokens and on every response slot
    position_ids   long [R, L + T]
    key_mask       bool [R, L + T]  Bridge key visibility (prompt tokens, response tokens up to EOS)
    response_mask  bool [R, T]      response tokens (the tokens a loss is taken on)
    widths         list[int]        group sizes (a group is one prompt's responses)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    key_mask: torch.Tensor
    response_mask: torch.Tensor
    widths: List[int]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def cu_group_lens(self) -> torch.Tensor:
        return cu_group_lens_from_sizes(self.widths, device=self.input_ids.device)

    @property
    def response_ids(self) -> torch.Tensor:
        """long [R, T]: the response tokens (padding where response_mask is False)."""
        return self.input_ids[:, self.prompt_length :]

    def to(self, device) -> "GroupedBatch":
        return GroupedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                            self.key_mask.to(device), self.response_mask.to(device), self.widths)


def grouped_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]], pad_token_id: int
) -> GroupedBatch:
    """prompts[g]: token ids of prompt g; responses[g]: its responses (token ids, EOS included if emitted)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"bridge_ops: {len(prompts)} prompts and {len(responses)} response groups; need as many, >= 1")
    widths = [len(group) for group in responses]
    if any(w < 1 for w in widths):
        raise ValueError(f"bridge_ops: every prompt needs at least one response, got widths {widths}")
    rows = [(prompt, response) for prompt, group in zip(prompts, responses) for response in group]
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for _, r in rows))
    ids = torch.full((len(rows), prompt_len + response_len), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    key_mask = torch.zeros(ids.shape, dtype=torch.bool)
    attention[:, prompt_len:] = 1
    for r, (prompt, response) in enumerate(rows):
        ids[r, prompt_len - len(prompt) : prompt_len] = torch.as_tensor(prompt, dtype=torch.long)
        ids[r, prompt_len : prompt_len + len(response)] = torch.as_tensor(response, dtype=torch.long)
        attention[r, prompt_len - len(prompt) : prompt_len] = 1
        key_mask[r, prompt_len - len(prompt) : prompt_len + len(response)] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return GroupedBatch(ids, attention, positions, key_mask, key_mask[:, prompt_len:].clone(), widths)


def token_log_probs(model: nn.Module, batch: GroupedBatch, temperature: float = 1.0) -> torch.Tensor:
    """float32 [R, T]: log-probability of each response token under `model` (logits / temperature), computed in one
    teacher-forced forward with the batch's groups; 0 where response_mask is False. Differentiable."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    start = batch.prompt_length - 1
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  logits_to_keep=batch.input_ids.shape[1] - start)
    if is_bridged(inner):
        with groups(inner, cu_group_lens=batch.cu_group_lens, key_mask=batch.key_mask):
            logits = model(**kwargs).logits
    else:
        logits = model(**kwargs).logits
    logits = logits[:, :-1].float() / temperature
    chosen = logits.gather(-1, batch.response_ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return chosen.masked_fill(~batch.response_mask, 0.0)


def rollout(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    indices: Sequence[int],
    width: int,
    max_new_tokens: int,
    seed_parts: tuple,
    *,
    temperature: float = 1.0,
    eos_token_id=None,
    pad_token_id=None,
) -> List[List[List[int]]]:
    """`width` interdependent samples for each prompt in `indices` (token lists, EOS included when emitted). Prompt i
    draws from its own generator seeded by `seed_of(*seed_parts, i)`, so its samples do not depend on the batch."""
    device = next(model.parameters()).device
    generators = [torch.Generator(device=device).manual_seed(seed_of(*seed_parts, i)) for i in indices]
    result = generate(model, [prompts[i] for i in indices], width, max_new_tokens, temperature=temperature,
                      generators=generators, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return result.sequences
