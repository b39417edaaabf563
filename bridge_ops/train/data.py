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

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..checks import integer
from ..generation import SamplingConfig, check_batch_fits, generate
from ..hf import groups, is_bridged
from ..layout import cu_group_lens_from_sizes
from .trainer import seed_of


@dataclass
class GroupedBatch:
    """Rows R = sum of group widths; L = longest prompt, T = longest response.

    input_ids      long [R, L + T]  prompt (left-padded) then response (right-padded)
    attention_mask long [R, L + T]  1 on real prompt tokens and on every response slot
    position_ids   long [R, L + T]
    key_mask       bool [R, L + T]  Bridge key visibility (prompt tokens, response tokens up to EOS)
    response_mask  bool [R, T]      response tokens
    loss_mask      bool [R, T]      the response tokens a loss is taken on (all of them unless loss masks were given)
    widths         list[int]        group sizes (a group is one prompt's responses)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    key_mask: torch.Tensor
    response_mask: torch.Tensor
    loss_mask: torch.Tensor
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
        return GroupedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.key_mask.to(device),
            self.response_mask.to(device),
            self.loss_mask.to(device),
            self.widths,
        )

    def solo(self) -> "GroupedBatch":
        """The same rows with every row its own group (Bridge sees only the row itself)."""
        return replace(self, widths=[1] * self.input_ids.shape[0])


def pad_id(model: nn.Module, pad_token_id: Optional[int]) -> int:
    """The padding id of the trainers' batches: `pad_token_id`, else the model config's; a ValueError when neither
    gives an id of the model's vocabulary (padding carries no loss, so any id of it will do, e.g. EOS)."""
    pad = pad_token_id if pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    if pad is None:
        raise ValueError(
            "bridge_ops: pad_token_id is None and the model's config has no pad_token_id: pass pad_token_id= "
            "(any id of the vocabulary, e.g. the tokenizer's pad or EOS id: padding carries no loss)"
        )
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= integer("pad_token_id", pad) < vocab:
        raise ValueError(f"bridge_ops: pad_token_id {pad} is outside the model's vocabulary [0, {vocab})")
    return pad


def check_token_ids(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]], vocab: int) -> None:
    """A ValueError naming the group, the row and the token unless every prompt and response token is an id of the
    vocabulary [0, vocab) (an integer: a TypeError otherwise)."""
    for g, (prompt, group) in enumerate(zip(prompts, responses)):
        for where, ids in [("prompt", prompt), *((f"response {r}", response) for r, response in enumerate(group))]:
            for position, token in enumerate(ids):
                if not 0 <= integer(f"token {position} of group {g}'s {where}", token) < vocab:
                    raise ValueError(
                        f"bridge_ops: group {g}'s {where} holds token id {token} at position {position}, outside the "
                        f"model's vocabulary [0, {vocab})"
                    )


def grouped_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    loss_masks: Optional[Sequence[Optional[Sequence[Sequence[bool]]]]] = None,
) -> GroupedBatch:
    """prompts[g]: token ids of prompt g; responses[g]: its responses (token ids, EOS included if emitted);
    loss_masks[g] (optional, per group None or one bool list per response, as long as the response): which response
    tokens carry a loss (default: all)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"bridge_ops: {len(prompts)} prompts and {len(responses)} response groups; need as many, >= 1")
    widths = [len(group) for group in responses]
    if any(w < 1 for w in widths):
        raise ValueError(f"bridge_ops: every prompt needs at least one response, got widths {widths}")
    loss_masks = [None] * len(responses) if loss_masks is None else list(loss_masks)
    if len(loss_masks) != len(responses):
        raise ValueError(f"bridge_ops: loss_masks has {len(loss_masks)} groups for {len(responses)} response groups")
    rows = []
    for prompt, group, masks in zip(prompts, responses, loss_masks):
        masks = [None] * len(group) if masks is None else masks
        for response, mask in zip(group, masks, strict=True):
            if mask is not None and len(mask) != len(response):
                raise ValueError(f"bridge_ops: a loss mask of length {len(mask)} for a response of {len(response)}")
            rows.append((prompt, response, mask))
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for _, r, _ in rows))
    ids = torch.full((len(rows), prompt_len + response_len), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    key_mask = torch.zeros(ids.shape, dtype=torch.bool)
    attention[:, prompt_len:] = 1
    for r, (prompt, response, _) in enumerate(rows):
        ids[r, prompt_len - len(prompt) : prompt_len] = torch.as_tensor(prompt, dtype=torch.long)
        ids[r, prompt_len : prompt_len + len(response)] = torch.as_tensor(response, dtype=torch.long)
        attention[r, prompt_len - len(prompt) : prompt_len] = 1
        key_mask[r, prompt_len - len(prompt) : prompt_len + len(response)] = True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    response_mask = key_mask[:, prompt_len:].clone()
    loss_mask = response_mask.clone()
    for r, (_, response, mask) in enumerate(rows):
        if mask is not None:
            loss_mask[r, : len(response)] = torch.as_tensor(mask, dtype=torch.bool)
    return GroupedBatch(ids, attention, positions, key_mask, response_mask, loss_mask, widths)


def token_log_probs(model: nn.Module, batch: GroupedBatch, temperature: float = 1.0) -> torch.Tensor:
    """float32 [R, T]: log-probability of each response token under `model` (logits / temperature), computed in one
    teacher-forced forward with the batch's groups; 0 where response_mask is False. Differentiable."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    start = batch.prompt_length - 1
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.input_ids.shape[1] - start,
    )
    if is_bridged(inner):
        with groups(inner, cu_group_lens=batch.cu_group_lens, key_mask=batch.key_mask):
            logits = model(**kwargs).logits
    else:
        logits = model(**kwargs).logits
    logits = logits[:, :-1].float() / temperature
    chosen = logits.gather(-1, batch.response_ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return chosen.masked_fill(~batch.response_mask, 0.0)


PEERS = ("group", "solo")
# The sampling of the rollouts, evaluation and warm-up collection unless told otherwise: 16 new tokens at temperature 1.
TASK_SAMPLING = SamplingConfig(max_new_tokens=16)


def rollout(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    indices: Sequence[int],
    width: int,
    max_new_tokens: Optional[int],
    seed_parts: tuple,
    *,
    copies: int = 1,
    peers: str = "group",
    sampling: SamplingConfig = TASK_SAMPLING,
    temperature: Optional[float] = None,
    eos_token_id=None,
    pad_token_id=None,
) -> List[List[List[int]]]:
    """`copies` groups of `width` samples for each prompt in `indices` (token lists, EOS included when emitted), in
    prompt-major order: [prompt indices[0] copy 0, copy 1, ..., prompt indices[1] copy 0, ...].

    peers="group": a group's samples read each other through Bridge (one Bridge group each); peers="solo": every
    sample is alone (its Bridge sees only itself: the same checkpoint without interdependence). Copy c of prompt i
    draws from its own generator seeded by `seed_of(*seed_parts, i)` (c = 0) or `seed_of(*seed_parts, i, c)`, and in
    solo mode member m from `seed_of(..., "solo", m)`, so a prompt's samples do not depend on the batch.
    The tokens are drawn as `sampling` says; max_new_tokens, temperature, eos_token_id and pad_token_id, when given
    (not None), replace its fields (`SamplingConfig.updated`).
    """
    sampling = sampling.updated(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    if peers not in PEERS:
        raise ValueError(f"bridge_ops: peers must be one of {PEERS}, got {peers!r}")
    if copies < 1 or width < 1:
        raise ValueError(f"bridge_ops: copies and width must be >= 1, got {copies} and {width}")
    check_batch_fits(model, len(indices) * copies * width, sampling.max_new_tokens)
    device = next(model.parameters()).device
    seeds = [(*seed_parts, i) + ((c,) if c else ()) for i in indices for c in range(copies)]
    if peers == "solo":
        seeds = [(*parts, "solo", m) for parts in seeds for m in range(width)]
    generators = [torch.Generator(device=device).manual_seed(seed_of(*parts)) for parts in seeds]
    group_width = width if peers == "group" else 1
    repeat = copies * (width // group_width)
    result = generate(
        model,
        [prompts[i] for i in indices for _ in range(repeat)],
        group_width,
        sampling=sampling,
        generators=generators,
    )
    rows = [sample for group in result.sequences for sample in group]
    return [rows[g * width : (g + 1) * width] for g in range(len(indices) * copies)]
