"""The pipeline steps that the CLI, the demo and the experiments share, at sizes a CPU handles in minutes.

    base = pretrain_base(train, BaseSpec())                              a tiny Llama trained from scratch on a task
    model, log = train_method(base, "bridge-repair", train, MethodSpec())  a method, from a copy of the base
    evaluate_widths(model, test.prompts, ...)                            accuracy at widths 1..16

A method is `<block>[-<warm-up>]`: block `grpo` (nothing added), `pmatch` (a parameter-matched residual MLP per layer,
the paper's P-Match) or `bridge`; warm-up one of `bridge_ops.train.sft.WARMUP_MODES` (SFT on data from the base model's
own samples, of the added block's parameters only, or of every parameter with `MethodSpec.warmup_trains="all"`, which
`grpo-<warm-up>` needs: it has no added block), or none. Every method ends with GRPO on every parameter, the added
blocks at `grpo.added_lr_mult` times the learning rate. Examples: `grpo` ("RLVR only"), `grpo-correct`
(rejection-sampling fine-tuning, then GRPO: the independent baseline with a warm-up), `pmatch-correct` (P-Match with the
paper's warm-up), `bridge-repair` (Bridge warmed up to take answers from its peers), `bridge` (Bridge trained by GRPO
alone).
"""

import copy
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..charlm import tiny_causal_lm
from ..hf import BLOCK_NAME, apply_bridge, parameter_share
from .data import TASK_SAMPLING
from .grpo import GRPOConfig, RewardFn, train_grpo
from .pmatch import BLOCK_NAME as PMATCH_BLOCK_NAME
from .pmatch import apply_parameter_matched_mlp
from .sft import WARMUP_MODES, SFTConfig, draw_warmup_samples, identical_groups, train_sft, warmup_groups_of
from .task_data import TaskData
from .trainer import seed_of, select_trainable

BLOCKS = ("grpo", "pmatch", "bridge")
WARMUP_TRAINS = ("added", "all")


def parse_method(method: str) -> Tuple[str, Optional[str]]:
    """`bridge-repair` -> ("bridge", "repair"); `grpo` -> ("grpo", None)."""
    block, _, warmup = method.partition("-")
    if block not in BLOCKS or (warmup and warmup not in WARMUP_MODES):
        raise ValueError(
            f"bridge_ops: a method is one of {BLOCKS}, optionally followed by -<warm-up>, warm-up one of "
            f"{WARMUP_MODES}, got {method!r}"
        )
    return block, warmup or None


@dataclass
class BaseSpec:
    """The base model and its pretraining (next-token loss on the reference responses of the train problems)."""

    model_type: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: Optional[int] = None  # default hidden_size // 32 (head dim 32)
    num_kv_heads: Optional[int] = None  # default num_heads // 2 (grouped-query attention)
    steps: int = 700
    batch: int = 128
    lr: float = 3e-3
    schedule: str = "cosine"
    seed: int = 0


@dataclass
class MethodSpec:
    """Sizes of the added blocks, the warm-up and GRPO (steps, width, prompts per step, learning rates)."""

    d_bridge: int = 16  # 4.2% of the default base's parameters (the paper: 2.8-5.1%)
    bridge_heads: int = 2
    init_std: Optional[float] = None  # the added blocks' input projections; None: hidden_size ** -0.5
    warmup_samples: int = 8  # samples per prompt for the warm-up data
    warmup_prompts: int = 1024
    warmup_min_correct: int = 2
    # what the warm-up trains: "added" (the paper: the added blocks only) or "all" (every parameter, the added blocks
    # at warmup.added_lr_mult times warmup.lr; a protocol between peers, e.g. the ranked warm-up, needs the layers
    # above a Bridge block to learn to read it)
    warmup_trains: str = "added"
    warmup: SFTConfig = field(default_factory=lambda: SFTConfig(steps=300, lr=3e-3, groups_per_step=16))
    grpo: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(steps=150, lr=3e-5, width=4, prompts_per_step=16, max_new_tokens=6)
    )
    seed: int = 0


def pretrain_base(
    train: TaskData,
    spec: Optional[BaseSpec] = None,
    progress: bool = True,
    out_dir: Optional[str] = None,
    checkpoint_every: int = 0,
) -> nn.Module:
    """A tiny causal LM trained from scratch on `train`'s reference responses (all parameters); with `out_dir`, it
    checkpoints there and resumes from there like SFT and GRPO. `spec` defaults to BaseSpec()."""
    spec = spec if spec is not None else BaseSpec()
    heads = spec.num_heads or max(1, spec.hidden_size // 32)
    kv_heads = spec.num_kv_heads or max(1, heads // 2)
    model = tiny_causal_lm(
        train.tokenizer, spec.model_type, spec.hidden_size, spec.num_layers, heads, kv_heads, seed=spec.seed
    )
    config = SFTConfig(
        steps=spec.steps,
        lr=spec.lr,
        groups_per_step=spec.batch,
        seed=spec.seed,
        progress=progress,
        max_grad_norm=1.0,
        schedule=spec.schedule,
        warmup_steps=min(100, spec.steps // 10),
        out_dir=out_dir,
        checkpoint_every=checkpoint_every,
    )
    train_sft(model, train.reference_groups(), config, trainable=select_trainable(model, "all"), description="pretrain")
    return model.eval()


def add_block(model: nn.Module, block: str, spec: MethodSpec) -> None:
    """Adds the method's blocks (none for `grpo`), initialized from the method's seed, not torch's global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed_of("blocks", spec.seed))
        if block == "pmatch":
            apply_parameter_matched_mlp(model, spec.d_bridge, init_std=spec.init_std)
        if block == "bridge":
            apply_bridge(model, d_bridge=spec.d_bridge, num_heads=spec.bridge_heads, init_std=spec.init_std)


def warmup_samples(base: nn.Module, train: TaskData, spec: MethodSpec) -> List[List[List[int]]]:
    """The base model's samples that every warm-up mode builds its groups from (`warmup_groups(..., samples=)`)."""
    sampling = TASK_SAMPLING.updated(max_new_tokens=spec.grpo.max_new_tokens, eos_token_id=train.tokenizer.eos_token_id)
    return draw_warmup_samples(base, train.prompts[: spec.warmup_prompts], spec.warmup_samples, sampling, spec.seed)


def warmup_groups(
    base: nn.Module, mode: str, train: TaskData, spec: MethodSpec, samples: Optional[List[List[List[int]]]] = None
):
    """The warm-up data of `mode`, from `samples` (`warmup_samples`; drawn from the base model when None)."""
    samples = samples if samples is not None else warmup_samples(base, train, spec)
    return warmup_groups_of(
        train.prompts[: spec.warmup_prompts],
        samples,
        mode,
        reward_fn=train.reward,
        repair_fn=train.repair,
        rank_fn=train.rank,
        min_correct=spec.warmup_min_correct,
    )


def train_method(
    base: nn.Module,
    method: str,
    train: TaskData,
    spec: Optional[MethodSpec] = None,
    progress: bool = True,
    reward_fn: Optional[RewardFn] = None,
    on_stage: Optional[Callable[[str, nn.Module], None]] = None,
    warmup_data: Optional[list] = None,
) -> Tuple[nn.Module, Dict[str, List[dict]]]:
    """A trained copy of `base` for `method` (see `parse_method`): `warm_up_method`, then `grpo_stage`; returns
    (model, {stage: metrics}).

    reward_fn: GRPO's reward (default `train.reward`; a `GroupReward` scores whole groups). on_stage(stage, model)
    is called after the warm-up ("warm-up") so a caller can measure the model between the stages. warmup_data: the
    warm-up groups when the caller already has them (`warmup_groups(base, mode, train, spec)`: one sample set shared
    by several methods), else they are sampled here. `spec` defaults to MethodSpec().
    """
    spec = spec if spec is not None else MethodSpec()
    model, log = warm_up_method(base, method, train, spec, progress, warmup_data)
    if on_stage is not None and "warmup_groups" in log:
        on_stage("warm-up", model)
    log["grpo"] = grpo_stage(model, train, spec, progress, reward_fn)
    if "output_norm" in log:
        log["output_norm"].append({"stage": "grpo", "norm": output_norm(model)})
    return model.eval(), log


def warm_up_method(
    base: nn.Module,
    method: str,
    train: TaskData,
    spec: MethodSpec,
    progress: bool = True,
    warmup_data: Optional[list] = None,
) -> Tuple[nn.Module, Dict[str, List[dict]]]:
    """A copy of `base` with `method`'s added blocks, warmed up if the method has a warm-up: every stage of
    `train_method` but GRPO (so several GRPO runs can start from one warm-up). Returns (model, {stage: metrics})."""
    block, warmup = parse_method(method)
    if spec.warmup_trains not in WARMUP_TRAINS:
        raise ValueError(f"bridge_ops: MethodSpec.warmup_trains is one of {WARMUP_TRAINS}, got {spec.warmup_trains!r}")
    if block == "grpo" and warmup and spec.warmup_trains != "all":
        raise ValueError(f"bridge_ops: {method!r} has no added block: its warm-up needs MethodSpec.warmup_trains='all'")
    model = copy.deepcopy(base)
    log: Dict[str, List[dict]] = {}
    add_block(model, block, spec)
    if block == "bridge":
        log["share"] = [parameter_share(model)]
    if warmup:
        groups = warmup_data if warmup_data is not None else warmup_groups(base, warmup, train, spec)
        log["warmup_groups"] = [
            {"groups": len(groups), "responses": sum(len(g[1]) for g in groups), "identical": identical_groups(groups)}
        ]
        if groups:
            log["warmup"] = train_sft(
                model,
                groups,
                replace(spec.warmup, seed=spec.seed, progress=progress),
                trainable=select_trainable(model, block if spec.warmup_trains == "added" else "all"),
                description=f"{block} warm-up",
            )
    if block != "grpo":
        log["output_norm"] = [{"stage": "warm-up" if warmup else "start", "norm": output_norm(model)}]
    return model, log


def grpo_stage(
    model: nn.Module,
    train: TaskData,
    spec: MethodSpec,
    progress: bool = True,
    reward_fn: Optional[RewardFn] = None,
) -> List[dict]:
    """A method's last stage: GRPO on every parameter of `model` (in place), the added blocks at
    `spec.grpo.added_lr_mult` times the rate, seeded by `spec.seed`, so it can start from a saved copy of a warmed-up
    model (several GRPO learning rates from one warm-up). Returns GRPO's log."""
    return train_grpo(
        model,
        train.prompts,
        reward_fn or train.reward,
        replace(spec.grpo, seed=spec.seed, progress=progress),
        trainable=select_trainable(model, "all"),
        eos_token_id=train.tokenizer.eos_token_id,
    )


def output_norm(model: nn.Module) -> float:
    """Frobenius norm of the added blocks' zero-initialized output projections (how far they are from inert)."""
    weights = [
        p
        for n, p in model.named_parameters()
        if n.endswith((f"{BLOCK_NAME}.o_proj.weight", f"{PMATCH_BLOCK_NAME}.down.weight"))
    ]
    return float(torch.stack([w.detach().norm() for w in weights]).norm())
