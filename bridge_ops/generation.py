"""Interdependent generation: N samples per prompt that read each other through Bridge while they are written.

`generate(model, prompts, width=N)` works on any HF causal LM (with Bridge blocks or without, for comparison):

1. The P prompts are left-padded into one batch and **prefilled once per prompt** (the N members of a group share
   the prompt, and Bridge over N identical rows is the identity, so this is exact).
2. The KV cache (HF `DynamicCache`) is expanded to the N rows of each group by index selection; the rows of one
   prompt are adjacent (the `num_return_sequences` layout); widths may differ per prompt. With
   `cache="shared-prefix"` (what the default `cache="auto"` picks where the cascade supports the model's attention)
   it is not expanded: a `GroupPrefixCache` keeps the prompt's keys/values once per group,
   and every decode step attends to them through the cascade op `cascade_attention` (bridge_ops.hf.attention).
3. Each step samples one token per row. A row that emitted EOS keeps its EOS position visible to its peers, is
   hidden as a Bridge key from the next position on, and is fed padding.
4. When every row of a group has finished, the group's rows leave the batch and the cache (`compact=True`).
5. One decode step feeds the sampled tokens of the live rows, with the groups of the live batch.

In the code: `generate` resolves and checks its arguments (`_resolve_arguments`), prefills (`prefill_once`, steps
1-2), runs the step loop (`_step_loop`, steps 3-5) and assembles the output per prompt (`_Record.output`).

Bridge keeps no cache of its own: peers' past reaches a row through its own KV cache, whose keys and values were
computed from Bridge-mixed hidden states. With `compact=False` and the same sampling settings and seed,
the tokens equal those of `model.generate(..., num_return_sequences=N)` (both draw every row every step).
"""

import contextlib
import dataclasses
import functools
import math
import numbers
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from .aggregation import best_of_n, majority_vote
from .checks import integer, token_ids
from .hf.attention import routed_to_cascade, unsupported_reason
from .hf.decode_step import step_for
from .hf.runtime import GROUPS_KWARG, BridgeGroups, cache_argument, groups_active, is_bridged
from .layout import GroupLayout
from .ops import decode_linear, sample_categorical

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[str]]


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn (after transformers' GenerationConfig): one frozen object that `generate`, the rollouts,
    evaluation and training pass on (bridge_ops.train), instead of each re-declaring the same arguments.

    max_new_tokens: tokens generated per sequence at most. do_sample, temperature, top_k, top_p: sampling as in HF
    (greedy when do_sample=False; top_k 0 or None, top_p 1 or None: no filtering). eos_token_id: one id or several
    (an empty list: none, rows end at max_new_tokens only); pad_token_id: fed to finished rows. Both None: the model's
    generation config (pad falls back to the first EOS, else 0). The values are checked where a model is known (in
    `generate`). The random numbers are not part of it: they come from torch's global generator or from `generate`'s
    per-prompt `generators` (the training helpers derive those from their `seed`).
    """

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    eos_token_id: Optional[Union[int, Sequence[int]]] = None
    pad_token_id: Optional[int] = None

    def updated(self, **fields) -> "SamplingConfig":
        """A copy with every given field that is not None replaced: how the functions that also take these settings
        as keyword arguments (a thin convenience) build their config (`sampling.updated(temperature=temperature)`)."""
        return dataclasses.replace(self, **{name: value for name, value in fields.items() if value is not None})


@dataclass
class GenerationOutput:
    """Generated continuations, `sequences[p][m]` = token ids of member m of prompt p (EOS included if emitted)."""

    sequences: List[List[List[int]]]
    log_probs: Optional[List[List[float]]]  # summed log-probability of each sequence under the sampling distribution
    num_tokens: int
    seconds: float
    logits: Optional[List[List[torch.Tensor]]] = None  # [p][m]: float32 [len(sequences[p][m]), vocab], raw model logits

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> List[List[str]]:
        decode = tokenizer.decode
        return [[decode(s, skip_special_tokens=skip_special_tokens) for s in group] for group in self.sequences]

    def majority_vote(self, extract_answer: Callable[[List[int]], Optional[object]]) -> List[Optional[object]]:
        """Per prompt, the most frequent answer extracted from its N sequences (None answers do not vote)."""
        return [majority_vote(extract_answer(s) for s in group) for group in self.sequences]

    def best_of_n(self, score: Callable[[List[int]], float]) -> List[List[int]]:
        """Per prompt, the sequence with the highest score."""
        return [best_of_n(group, score) for group in self.sequences]


def _left_padded(prompts: Prompts, attention_mask, pad_token_id: int, tokenizer, device):
    if isinstance(prompts, str):  # one text prompt, not one prompt per character
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[0] == 0:
            raise ValueError(f"bridge_ops: input_ids must be [P, L] with P >= 1, got {list(prompts.shape)}")
        mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
        return prompts.to(device), mask.to(device)
    if attention_mask is not None:
        raise ValueError(
            "bridge_ops: attention_mask goes with an input_ids tensor; prompts given as lists or strings are unpadded "
            "(every token counts), so pass no attention_mask with them"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("bridge_ops: no prompts given")
    if isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("bridge_ops: text prompts need a tokenizer (pass tokenizer=...)")
        prompts = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for i, p in enumerate(prompts):
        if isinstance(p, str) or not isinstance(p, Iterable):
            raise TypeError(
                f"bridge_ops: prompts[{i}] must be a list of token ids (or every prompt a string), got {p!r}"
            )
    prompts = [[integer(f"prompts[{i}]", token) for token in p] for i, p in enumerate(prompts)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("bridge_ops: every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, length - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _widths(width: Union[int, Sequence[int]], num_prompts: int) -> List[int]:
    widths = [integer("width", w) for w in (width if isinstance(width, Iterable) else [width] * num_prompts)]
    if len(widths) != num_prompts:
        raise ValueError(f"bridge_ops: {len(widths)} widths given for {num_prompts} prompts")
    if any(w < 1 for w in widths):
        raise ValueError(f"bridge_ops: every width must be >= 1, got {widths}")
    return widths


def _validate_generate_args(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig
) -> None:
    """Refuses, before anything runs, what would crash deep inside the model or silently generate something else
    (`sampling` with its pad_token_id resolved)."""
    max_new_tokens, pad, temperature = sampling.max_new_tokens, sampling.pad_token_id, sampling.temperature
    top_k, top_p = sampling.top_k, sampling.top_p
    integer("max_new_tokens", max_new_tokens, 1)
    if top_k is not None:
        integer("top_k", top_k, 0)
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(
            f"bridge_ops: top_p must be a number in (0, 1] (1 or None: no nucleus filtering), got {top_p!r}"
        )
    if sampling.do_sample and not (isinstance(temperature, numbers.Real) and 0 < temperature < math.inf):
        raise ValueError(
            f"bridge_ops: temperature must be a finite number > 0 when sampling, got {temperature!r} "
            "(for greedy decoding pass do_sample=False)"
        )
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= integer("pad_token_id", pad) < vocab:
        raise ValueError(
            f"bridge_ops: pad_token_id {pad} is outside the model's vocabulary [0, {vocab}): pass a valid "
            "pad_token_id (e.g. tokenizer.pad_token_id)"
        )
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"bridge_ops: attention_mask must have the shape of input_ids {list(input_ids.shape)}, got "
            f"{list(mask.shape)}"
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"bridge_ops: input_ids must hold integer token ids, got {input_ids.dtype}")
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bool(bad.any()):
        prompt, position = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"bridge_ops: prompt {prompt} holds token id {int(input_ids[prompt, position])} at position "
            f"{position}, outside the model's vocabulary [0, {vocab})"
        )
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("bridge_ops: attention_mask must hold only 0 (padding) and 1 (token)")
    if not bool(mask.any(-1).all()):
        empty = torch.nonzero(~mask.bool().any(-1))[0].item()
        raise ValueError(f"bridge_ops: prompt {empty} has no token (its attention_mask row is all 0)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "bridge_ops: input_ids must be left-padded (attention_mask 0s before the 1s of each row); "
            "set tokenizer.padding_side = 'left'"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = int(mask.sum(-1).max())
    if limit is not None and longest + max_new_tokens - 1 > limit:
        raise ValueError(
            f"bridge_ops: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} passes the "
            f"model's max_position_embeddings ({limit}): shorten the prompt or lower max_new_tokens"
        )


def check_batch_fits(model: nn.Module, rows: int, max_new_tokens: int) -> None:
    """Refuses, before anything is allocated, `rows` sequences (the widths summed over the prompts) whose generated
    tokens and next-token logits alone, a lower bound of what generation allocates, exceed the memory of the model's
    device (an absurd width would otherwise exhaust the machine's memory before failing)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    needed = rows * (max_new_tokens * 8 + model.get_input_embeddings().num_embeddings * 4)
    if needed > total:
        raise ValueError(
            f"bridge_ops: {rows} sequences (width x prompts) of max_new_tokens={max_new_tokens} need at least "
            f"{needed / 2**30:.1f} GiB for their tokens and logits alone, more than the {total / 2**30:.1f} GiB of "
            f"{device}: lower the width"
        )


def _sampler(sampling: SamplingConfig):
    """The logits processing of HF's sampling path (same warpers, same order) and its draw (torch.multinomial's,
    through `ops.sample_categorical`: the same tokens and generator state), so seeded runs agree with it."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    do_sample, top_k, top_p = sampling.do_sample, sampling.top_k, sampling.top_p
    processors = LogitsProcessorList()
    if do_sample:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=int(top_k)))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))

    def pick(tokens_so_far: torch.Tensor, logits: torch.Tensor, batch: "_Batch", generators):
        scores = processors(tokens_so_far, logits)
        if do_sample and generators is not None:  # each group draws from its prompt's own generator
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.cat(
                [
                    sample_categorical(rows, generators[prompt])
                    for prompt, rows in zip(batch.prompts, probs.split(batch.layout.widths))
                ]
            )
        elif do_sample:
            next_tokens = sample_categorical(torch.softmax(scores, dim=-1))
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        return next_tokens, scores

    return pick


class _Batch:
    """The live rows of a generation: which original row each is, its group, and its per-row state."""

    def __init__(
        self, layout: GroupLayout, tokens: torch.Tensor, attention_mask: torch.Tensor, last_position: torch.Tensor
    ):
        device = tokens.device
        self.layout = layout  # the live groups (what each decode step gets; a GroupPrefixCache holds the same object)
        self.prompts = list(range(layout.num_groups))  # prompt index of each live group
        self.rows = torch.arange(layout.num_rows, device=device)  # original row index of each live row
        self.finished = torch.zeros(layout.num_rows, dtype=torch.bool, device=device)
        self.tokens = tokens  # [rows, L + steps]: prompt and sampled tokens (what the logits processors see)
        self.attention_mask = attention_mask  # [rows, L + steps]
        self.last_position = last_position  # [rows]: position id of each row's last fed token

    def finished_groups(self) -> torch.Tensor:
        """[live G] bool: every row of the group has finished."""
        unfinished = torch.zeros(self.layout.num_groups, dtype=torch.long, device=self.finished.device)
        return unfinished.index_add_(0, self.layout.row_group, (~self.finished).long()) == 0

    def drop_finished_groups(self, cache, shared: bool) -> Optional[torch.Tensor]:
        """Removes the groups whose rows have all finished, here and in `cache`; returns the index of the kept live
        rows (None: none finished, nothing changed). The new layout is derived once and a GroupPrefixCache (`shared`)
        takes the same object (`select_rows`); another cache keeps the rows through `batch_select_indices`."""
        done = self.finished_groups()
        if not bool(done.any()):
            return None
        keep = torch.nonzero(~done[self.layout.row_group]).flatten()
        self.layout, kept_groups = self.layout.select(keep)
        if shared:
            cache.select_rows(keep, self.layout, kept_groups)
        else:
            cache.batch_select_indices(keep)
        self.prompts = [self.prompts[g] for g in kept_groups.tolist()]
        self.rows, self.finished = self.rows[keep], self.finished[keep]
        self.tokens, self.attention_mask = self.tokens[keep], self.attention_mask[keep]
        self.last_position = self.last_position[keep]
        return keep

    def append(self, next_tokens: torch.Tensor) -> None:
        """Extends every live row by its sampled token (one more visible position)."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(next_tokens), 1)], 1)
        self.last_position = self.last_position + 1
        self.tokens = torch.cat([self.tokens, next_tokens[:, None]], dim=1)


class _Record:
    """What the step loop writes for every original row: its tokens, and, when asked for, the summed log-probability
    of its tokens and the logits each was drawn from."""

    def __init__(self, rows: int, max_new_tokens: int, vocab: int, pad: int, device, log_probs: bool, logits: bool):
        self.tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(rows, dtype=torch.float64, device=device) if log_probs else None
        self.logits = torch.zeros(rows, max_new_tokens, vocab) if logits else None

    def add(
        self,
        step: int,
        rows: torch.Tensor,
        live: torch.Tensor,
        next_tokens: torch.Tensor,
        scores: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        """Step `step` of the live rows (`rows`: their original indices; `live`: which of them had not finished)."""
        self.tokens[rows[live], step] = next_tokens[live]
        self.lengths[rows[live]] += 1
        if self.log_probs is not None:
            chosen = torch.log_softmax(scores, dim=-1).gather(1, next_tokens[:, None]).squeeze(1)
            self.log_probs[rows[live]] += chosen[live].double()
        if self.logits is not None:
            self.logits[rows[live].cpu(), step] = logits[live].cpu()

    def output(self, widths: List[int], seconds: float) -> "GenerationOutput":
        """The rows regrouped per prompt (its `widths[p]` members are adjacent rows), each cut to its length."""
        sequences, row = [], 0
        log_probs = [] if self.log_probs is not None else None
        logits = [] if self.logits is not None else None
        for w in widths:
            members = range(row, row + w)
            sequences.append([self.tokens[r, : self.lengths[r]].tolist() for r in members])
            if log_probs is not None:
                log_probs.append(self.log_probs[row : row + w].tolist())
            if logits is not None:
                logits.append([self.logits[r, : self.lengths[r]] for r in members])
            row += w
        return GenerationOutput(sequences, log_probs, int(self.lengths.sum()), seconds, logits)


CACHE_KINDS = ("auto", "shared-prefix", "expanded")


@dataclass
class Prefill:
    """The state after the prompts were prefilled once and expanded to the members of their groups."""

    cache: object  # DynamicCache of sum(widths) rows ("expanded"), or GroupPrefixCache of the prompts ("shared-prefix")
    logits: torch.Tensor  # float32 [sum(widths), vocab]: next-token logits of every member
    attention_mask: torch.Tensor  # [sum(widths), L]
    last_position: torch.Tensor  # [sum(widths)]: position id of each row's last prompt token
    expand: torch.Tensor  # [sum(widths)]: prompt index of each row


@torch.no_grad()
def prefill_once(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    widths: List[int],
    cache: str = "expanded",
) -> Prefill:
    """Runs the left-padded prompts [P, L] through the model once, one row per prompt (each its own group, so Bridge
    sees only itself, exactly what it sees among N identical copies). With cache="expanded", the cache rows are then
    copied to the members (a DynamicCache); with "shared-prefix", a GroupPrefixCache keeps them once per group."""
    if cache not in CACHE_KINDS[1:]:
        raise ValueError(f"bridge_ops: cache must be one of {CACHE_KINDS[1:]}, got {cache!r}")
    from transformers import DynamicCache

    from .cache import GroupPrefixCache

    device, prompts_count = input_ids.device, input_ids.shape[0]
    shared = cache == "shared-prefix"
    kv = GroupPrefixCache(widths, attention_mask.sum(-1)) if shared else DynamicCache(config=model.config)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    one_per_prompt = torch.arange(prompts_count + 1, dtype=torch.int32, device=device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_argument(model): kv},
        **_groups_kwargs(model, one_per_prompt, attention_mask.bool(), prompts_count),
    )
    expand = torch.repeat_interleave(torch.arange(prompts_count, device=device), torch.as_tensor(widths, device=device))
    if not shared:
        kv.batch_select_indices(expand)
    return Prefill(kv, out.logits[:, -1].float()[expand], attention_mask[expand], positions[expand, -1], expand)


def _groups_kwargs(model: nn.Module, cu_group_lens: torch.Tensor, key_mask: torch.Tensor, batch_size: int) -> dict:
    """The forward kwargs that give a bridged model the groups of one forward (none for a model without Bridge)."""
    return {GROUPS_KWARG: BridgeGroups(cu_group_lens, key_mask, batch_size)} if is_bridged(model) else {}


def _decode_attention(model: nn.Module, kv):
    """The forward kwargs that give the decode steps their cache, inside the attention mode the cache needs."""
    from .cache import GroupPrefixCache

    if isinstance(kv, GroupPrefixCache):
        return routed_to_cascade(model, kv)
    return contextlib.nullcontext({cache_argument(model): kv})


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Prompts,
    width: Union[int, Sequence[int]] = 4,
    max_new_tokens: Optional[int] = None,
    *,
    sampling: Optional[SamplingConfig] = None,
    attention_mask: Optional[torch.Tensor] = None,
    do_sample: Optional[bool] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    pad_token_id: Optional[int] = None,
    compact: bool = True,
    generators: Optional[Sequence[torch.Generator]] = None,
    cache: str = "auto",
    return_log_probs: bool = False,
    return_logits: bool = False,
    tokenizer=None,
    progress: bool = False,
) -> GenerationOutput:
    """Generates `width` interdependent continuations of every prompt.

    Args:
        model: a HF causal LM, usually with `apply_bridge` (without Bridge the N samples are independent).
        prompts: input_ids [P, L] (left-padded, with `attention_mask`), or P lists of token ids, or P strings (with
            `tokenizer`; one string is one prompt). Token ids must lie in the model's vocabulary, and the longest
            prompt plus max_new_tokens within its max_position_embeddings.
        width: samples per prompt, one int or one per prompt (ragged groups).
        sampling: how tokens are drawn (`SamplingConfig`; default SamplingConfig(): 64 new tokens, sampling at
            temperature 1). The random numbers come from torch's global generator (seed it with torch.manual_seed),
            or from `generators`.
        max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id: a convenience: each one
            given (not None) replaces that field of `sampling` (see `SamplingConfig` for their meaning).
        compact: drop groups whose rows have all finished from the batch and the cache.
        generators: one torch.Generator per prompt (on the model's device): the members of prompt p draw from
            generators[p] only, so a prompt's samples do not depend on which other prompts share the batch (what
            data-parallel training needs to give every rank the rollouts a single process would draw).
        cache: "shared-prefix": a GroupPrefixCache, the prompt's KV once per group, decode attention through the
            cascade op `cascade_attention` (bridge_ops.hf.attention): N times less prompt KV memory and
            1.3-7x faster decode steps on the CPU (bench/test_bench_prefix_cache.py). "expanded": the prompt's KV
            copied to every member (a DynamicCache). "auto" (default): "shared-prefix" unless the model's attention
            has a feature the cascade lacks (`bridge_ops.hf.attention.unsupported_reason`: softcapping, sliding windows,
            non-attention layers, sinks), else "expanded"; it never picks a path that raises.
            Same tokens and logits up to rounding.
        return_log_probs: also return each sequence's summed log-probability under the sampling distribution.
        return_logits: also return the raw logits each token was drawn from (memory: tokens x vocab floats).
        progress: show a tqdm progress bar over decode steps.

    Steps: the arguments are resolved and checked before anything runs; the prompts are prefilled once each and the
    cache expanded to (or shared by) the members of their groups (steps 1-2 of the module docstring); the step loop
    samples, drops finished groups and decodes (steps 3-5); the rows are regrouped per prompt into the output.
    """
    sampling = (sampling or SamplingConfig()).updated(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    request = _resolve_arguments(
        model,
        prompts,
        width,
        sampling,
        attention_mask=attention_mask,
        compact=compact,
        generators=generators,
        cache=cache,
        tokenizer=tokenizer,
        progress=progress,
    )
    start = time.perf_counter()
    # 1-2. Prefill once per prompt, then expand the cache to the groups' members (or share it: `cache`).
    state = prefill_once(model, request.input_ids, request.attention_mask, request.widths, request.cache)
    sampling = request.sampling
    record = _Record(
        sum(request.widths),
        sampling.max_new_tokens,
        state.logits.shape[-1],
        sampling.pad_token_id,
        request.device,
        return_log_probs,
        return_logits,
    )
    # 3-5. Sample, drop finished groups, decode: until every row finished or max_new_tokens.
    _step_loop(model, request, state, record)
    return record.output(request.widths, time.perf_counter() - start)


@dataclass
class _Request:
    """The arguments of `generate`, resolved (defaults from the model's generation config, prompts as a left-padded
    batch on the model's device) and checked."""

    input_ids: torch.Tensor  # [P, L], left-padded
    attention_mask: torch.Tensor  # [P, L]
    widths: List[int]  # members of each prompt's group
    sampling: SamplingConfig  # eos_token_id (a tuple) and pad_token_id resolved
    eos: torch.Tensor  # long [E]: the EOS token ids (none: rows finish at max_new_tokens only)
    cache: str  # "shared-prefix" or "expanded"
    pick: Callable  # the sampler: (tokens so far, logits, batch, generators) -> (next tokens, processed scores)
    generators: Optional[Sequence[torch.Generator]]
    compact: bool
    progress: bool
    device: torch.device


def _resolve_arguments(
    model, prompts, width, sampling: SamplingConfig, *, attention_mask, compact, generators, cache, tokenizer, progress
) -> _Request:
    """Defaults, the prompt batch and every check, before anything runs (see `generate` for the arguments)."""
    config = getattr(model, "generation_config", None)
    eos = sampling.eos_token_id if sampling.eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_ids = token_ids("eos_token_id", eos)
    pad = sampling.pad_token_id if sampling.pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    sampling = dataclasses.replace(sampling, eos_token_id=tuple(eos_ids), pad_token_id=pad)
    device = next(model.parameters()).device
    input_ids, mask = _left_padded(prompts, attention_mask, pad, tokenizer, device)
    widths = _widths(width, input_ids.shape[0])
    _validate_generate_args(model, input_ids, mask, sampling)
    check_batch_fits(model, sum(widths), sampling.max_new_tokens)
    if generators is not None and len(generators) != len(widths):
        raise ValueError(f"bridge_ops: {len(generators)} generators given for {len(widths)} prompts")
    if groups_active(model):
        raise RuntimeError("bridge_ops: generate sets the groups itself; call it outside a groups(...) block")
    if cache not in CACHE_KINDS:
        raise ValueError(f"bridge_ops: cache must be one of {CACHE_KINDS}, got {cache!r}")
    if cache == "auto":
        cache = "expanded" if unsupported_reason(model) else "shared-prefix"
    return _Request(
        input_ids,
        mask,
        widths,
        sampling,
        torch.as_tensor(eos_ids, dtype=torch.long, device=device),
        cache,
        _sampler(sampling),
        generators,
        compact,
        progress,
        device,
    )


@contextlib.contextmanager
def decode_linears(model: nn.Module):
    """Inside the block, every `nn.Linear` of `model` (the exact class: subclasses such as quantized layers keep their
    own forward) computes through `bridge_ops.ops.decode_linear`, the kernel for the few rows of a decode step (it is
    F.linear for anything else). Layers whose forward was already replaced on the instance are left alone."""
    patched = []
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in module.__dict__:
            module.forward = functools.partial(_decode_linear_forward, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _decode_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return decode_linear(x, module.weight, module.bias)


def _step_loop(model: nn.Module, request: _Request, state: Prefill, record: _Record) -> None:
    """Steps 3-5 from the prefilled state, writing every sampled token to `record`."""
    from .cache import GroupPrefixCache

    shared = isinstance(state.cache, GroupPrefixCache)  # then the cache's layout is the step loop's too
    layout = state.cache.layout if shared else GroupLayout.from_widths(request.widths, device=state.logits.device)
    batch = _Batch(layout, request.input_ids[state.expand], state.attention_mask, state.last_position)
    logits, max_new_tokens, pad = state.logits, request.sampling.max_new_tokens, request.sampling.pad_token_id
    fast_step = step_for(model, state.cache)  # the same step without HF's module stack, where the model allows
    with _decode_attention(model, state.cache) as forward_kwargs, decode_linears(model):
        for step in _steps(max_new_tokens, request.progress):
            # 3. Sample one token per live row; finished rows get padding.
            next_tokens, scores = request.pick(batch.tokens, logits, batch, request.generators)
            next_tokens = torch.where(batch.finished, torch.full_like(next_tokens, pad), next_tokens)
            live = ~batch.finished  # a row's EOS position is still a visible key; later positions are not
            record.add(step, batch.rows, live, next_tokens, scores, logits)
            batch.finished = batch.finished | torch.isin(next_tokens, request.eos)
            if bool(batch.finished.all()) or step == max_new_tokens - 1:
                break
            # 4. Groups whose rows have all finished leave the batch and the cache.
            if request.compact:
                keep = batch.drop_finished_groups(state.cache, shared)
                if keep is not None:
                    next_tokens, live = next_tokens[keep], live[keep]
            # 5. One decode step for every live row.
            batch.append(next_tokens)
            groups = _groups_kwargs(model, batch.layout.cu_group_lens, live[:, None], len(next_tokens))
            if fast_step is not None:
                logits = fast_step(next_tokens, batch.last_position, state.cache, groups.get(GROUPS_KWARG))
                continue
            out = model(
                input_ids=next_tokens[:, None],
                attention_mask=batch.attention_mask,
                position_ids=batch.last_position[:, None],
                use_cache=True,
                **forward_kwargs,
                **groups,
            )
            logits = out.logits[:, -1].float()


def _steps(max_new_tokens: int, progress: bool):
    """range(max_new_tokens), with a tqdm progress bar when asked for."""
    if not progress:
        return range(max_new_tokens)
    from tqdm.auto import tqdm

    return tqdm(range(max_new_tokens), desc="bridge_ops.generate", unit="step")
