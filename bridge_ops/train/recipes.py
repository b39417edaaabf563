"""The pipeline steps that the CLI, the demo and the experiment share, at sizes a CPU handles in minutes.

    base = pretrain_base(train, BaseSpec())                       a tiny Llama trained from scratch on the task
    model, log = train_method(base, "bridge", train, MethodSpec())  one of METHODS, from a copy of the base
    evaluate_widths(model, test.prompts, ...)                       accuracy at widths 1..16

Methods (the paper's comparison, Table 2 of arXiv 2510.01143, plus two ablations):
    grpo             GRPO on every parameter of the base ("RLVR only")
    pmatch           a parameter-matched residual MLP per layer, then GRPO on everything ("P-Match + RLVR")
    bridge           Bridge blocks, an SFT warm-up of the Bridge parameters on groups of the base model's own correct
                     samples, then GRPO on everything ("Bridge")
    pmatch-warmup    ablation: P-Match with the same warm-up (its MLP parameters on the same correct samples), which
                     separates "fine-tuning on correct samples" from "samples that read each other"
    bridge-nowarmup  ablation: Bridge blocks trained by GRPO alone
"""

import copy
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..charlm import tiny_causal_lm
from ..hf.patch import apply_bridge, parameter_share
from .grpo import GRPOConfig, train_grpo
from .pmatch import apply_parameter_matched_mlp
from .sft import SFTConfig, collect_correct_groups, train_sft
from .task_data import TaskData
from .trainer import seed_of, select_trainable

METHODS = ("grpo", "pmatch", "bridge", "pmatch-warmup", "bridge-nowarmup")


@dataclass
class BaseSpec:
    """The base model and its pretraining (next-token loss on the answer tokens of the train problems)."""

    model_type: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: Optional[int] = None  # default hidden_size // 32 (head dim 32)
    num_kv_heads: Optional[int] = None  # default num_heads // 2 (grouped-query attention)
    steps: int = 700
    batch: int = 128
    lr: float = 3e-3
    seed: int = 0


@dataclass
class MethodSpec:
    """Sizes of the added blocks, the warm-up and GRPO (steps, width, prompts per step, lr)."""

    d_bridge: int = 16  # 4.2% of the default base's parameters (the paper: 2.8-5.1%)
    bridge_heads: int = 2
    warmup_samples: int = 8  # samples per prompt for the warm-up data; prompts with >= 2 correct are kept
    warmup_prompts: int = 1024
    warmup: SFTConfig = field(default_factory=lambda: SFTConfig(steps=150, lr=1e-3, groups_per_step=16))
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(steps=150, lr=1e-4, width=4, prompts_per_step=16,
                                                               max_new_tokens=6))
    seed: int = 0


def pretrain_base(train: TaskData, spec: BaseSpec = BaseSpec(), progress: bool = True, out_dir: Optional[str] = None,
                  checkpoint_every: int = 0) -> nn.Module:
    """A tiny causal LM trained from scratch on `train`'s reference answers (all parameters); with `out_dir`, it
    checkpoints there and resumes from there like SFT and GRPO."""
    heads = spec.num_heads or max(1, spec.hidden_size // 32)
    kv_heads = spec.num_kv_heads or max(1, heads // 2)
    model = tiny_causal_lm(train.tokenizer, spec.model_type, spec.hidden_size, spec.num_layers, heads, kv_heads,
                           seed=spec.seed)
    config = SFTConfig(steps=spec.steps, lr=spec.lr, groups_per_step=spec.batch, seed=spec.seed, progress=progress,
                       max_grad_norm=1.0, out_dir=out_dir, checkpoint_every=checkpoint_every)
    train_sft(model, train.reference_groups(), config, trainable=select_trainable(model, "all"),
              description="pretrain")
    return model.eval()


def _with_seed(config, seed: int, progress: bool):
    return replace(config, seed=seed, progress=progress)


def train_method(
    base: nn.Module, method: str, train: TaskData, spec: MethodSpec = MethodSpec(), progress: bool = True
) -> Tuple[nn.Module, Dict[str, List[dict]]]:
    """A trained copy of `base` for `method` (one of METHODS); returns (model, {stage: metrics})."""
    if method not in METHODS:
        raise ValueError(f"bridge_ops: method must be one of {METHODS}, got {method!r}")
    model = copy.deepcopy(base)
    eos, log = train.tokenizer.eos_token_id, {}
    block = method.split("-")[0]
    with torch.random.fork_rng():  # the added blocks' initialization is a function of the method's seed
        torch.manual_seed(seed_of("blocks", spec.seed))
        if block == "pmatch":
            apply_parameter_matched_mlp(model, spec.d_bridge)
        if block == "bridge":
            apply_bridge(model, d_bridge=spec.d_bridge, num_heads=spec.bridge_heads)
    if block == "bridge":
        log["share"] = [parameter_share(model)]
    if method in ("bridge", "pmatch-warmup"):
        groups = collect_correct_groups(
            base, train.prompts[: spec.warmup_prompts], train.reward, spec.warmup_samples,
            max_new_tokens=spec.grpo.max_new_tokens, seed=spec.seed, eos_token_id=eos,
        )
        log["warmup_groups"] = [{"groups": len(groups), "responses": sum(len(g[1]) for g in groups)}]
        if groups:
            log["warmup"] = train_sft(model, groups, _with_seed(spec.warmup, spec.seed, progress),
                                      trainable=select_trainable(model, block), description=f"{block} warm-up")
    if block != "grpo":
        log["output_norm"] = [{"stage": "start" if "warmup" not in log else "warm-up", "norm": _output_norm(model)}]
    log["grpo"] = train_grpo(model, train.prompts, train.reward, _with_seed(spec.grpo, spec.seed, progress),
                             trainable=select_trainable(model, "all"), eos_token_id=eos)
    if block != "grpo":
        log["output_norm"].append({"stage": "grpo", "norm": _output_norm(model)})
    return model.eval(), log


def _output_norm(model: nn.Module) -> float:
    """Frobenius norm of the added blocks' zero-initialized output projections (how far they are from inert)."""
    weights = [p for n, p in model.named_parameters() if n.endswith(("bridge.o_proj.weight", "pmatch.down.weight"))]
    return float(torch.stack([w.detach().norm() for w in weights]).norm())
