"""The optimization loop shared by pretraining, SFT and GRPO: AdamW, clipping, progress, metrics, checkpoints.

Every step's data (which groups, which random draws) is a function of (seed, step) alone, so a run resumed from a
checkpoint repeats exactly what the uninterrupted run would have done: the checkpoint holds the trained parameters,
the optimizer state, the step and torch's and Python's RNG states.

Files in `out_dir` (rank 0 writes them):
    metrics.jsonl    one JSON object per logged step ({"step", "loss", ..., "seconds"})
    checkpoint.pt    the latest checkpoint (written atomically every `checkpoint_every` steps and at the end)
"""

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .distributed import DistContext

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    out_dir: Optional[str] = None
    checkpoint_every: int = 0  # 0: a checkpoint at the end only (when out_dir is set)
    log_every: int = 1
    progress: bool = True
    added_lr_mult: float = 1.0  # learning-rate multiplier of the added blocks (Bridge, P-Match) among the trainable
    schedule: str = "constant"  # or "cosine": decays every learning rate to 10% of its value at the last step
    warmup_steps: int = 0  # linear learning-rate warm-up over the first steps


SCHEDULES = ("constant", "cosine")


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning-rate multiplier of `step` (1-based): linear warm-up, then constant or cosine down to 0.1."""
    if config.schedule not in SCHEDULES:
        raise ValueError(f"bridge_ops: schedule must be one of {SCHEDULES}, got {config.schedule!r}")
    if step <= config.warmup_steps:
        return step / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_of(*parts) -> int:
    """A 63-bit seed derived from `parts` (e.g. (seed, step, prompt)): the same on every rank and every run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def step_rng(seed: int, step: int) -> random.Random:
    return random.Random(seed_of("step", seed, step))


# step_fn(step, optimizer_step) runs the step's forward and backward passes, calls optimizer_step() after each
# backward (once, or once per minibatch), and returns the step's metrics.
StepFn = Callable[[int, Callable[[], float]], Dict[str, float]]


class Trainer:
    """Runs `step_fn(step, optimizer_step)` for steps 1..config.steps; `optimizer_step()` clips the gradients of
    the `trainable` parameters to `max_grad_norm`, applies AdamW, zeroes them and returns the gradient norm.

    `trainable` maps parameter names (as in model.named_parameters()) to the parameters that train; every other
    parameter of the model is frozen by the caller. Resumes from `out_dir/checkpoint.pt` when it exists.
    """

    def __init__(self, model: nn.Module, trainable: Dict[str, nn.Parameter], config: TrainConfig, step_fn: StepFn,
                 dist: DistContext = DistContext(), description: str = "train"):
        if not trainable:
            raise ValueError("bridge_ops: nothing to train (no trainable parameters)")
        self.model, self.trainable, self.config, self.step_fn = model, trainable, config, step_fn
        self.dist, self.description = dist, description
        self.optimizer = torch.optim.AdamW(parameter_groups(trainable, config.lr, config.added_lr_mult),
                                           weight_decay=config.weight_decay)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        lr_factor(config, 1)  # checks the schedule's name before any work
        self.step = 0
        self.history: List[Dict[str, float]] = []

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "parameters": {name: p.detach().clone() for name, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.trainable) ^ set(state["parameters"])
        if missing:
            raise ValueError(f"bridge_ops: the checkpoint's parameters differ from the trainable ones: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(state["parameters"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]

    def save_checkpoint(self) -> None:
        if self.config.out_dir is None or not self.dist.is_main:
            return
        os.makedirs(self.config.out_dir, exist_ok=True)
        path = os.path.join(self.config.out_dir, CHECKPOINT)
        torch.save(self.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    def maybe_resume(self) -> bool:
        path = os.path.join(self.config.out_dir or "", CHECKPOINT)
        if self.config.out_dir is None or not os.path.exists(path):
            return False
        self.load_state_dict(torch.load(path, weights_only=False))
        return True

    def optimizer_step(self) -> float:
        params = list(self.trainable.values())
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- the loop ------------------------------------------------------------------------------------------------
    def _log(self, metrics: Dict[str, float]) -> None:
        self.history.append(metrics)
        if self.config.out_dir is not None and self.dist.is_main:
            os.makedirs(self.config.out_dir, exist_ok=True)
            with open(os.path.join(self.config.out_dir, METRICS), "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def train(self, resume: bool = True) -> List[Dict[str, float]]:
        """Runs the remaining steps; returns the logged metrics of this call."""
        if resume:
            self.maybe_resume()
        cfg = self.config
        steps = range(self.step + 1, cfg.steps + 1)
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(steps, desc=self.description, unit="step", initial=self.step, total=cfg.steps)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for step in steps:
            start = time.perf_counter()
            norms: List[float] = []

            def optimizer_step() -> float:
                norms.append(self.optimizer_step())
                return norms[-1]

            for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = lr * lr_factor(cfg, step)
            metrics = self.step_fn(step, optimizer_step)
            if not norms:
                raise RuntimeError(f"bridge_ops: step {step} made no optimizer step")
            metrics["grad_norm"] = sum(norms) / len(norms)
            self.step = step
            metrics = {"step": step, **metrics, "seconds": time.perf_counter() - start}
            if step % cfg.log_every == 0 or step == cfg.steps:
                self._log(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "reward")})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.model.eval()
        self.save_checkpoint()
        return self.history


ADDED_BLOCKS = ("bridge", "pmatch")
TRAINABLE = ("all", *ADDED_BLOCKS)


def is_added(name: str) -> bool:
    """Whether a parameter name belongs to an added block (a layer's `.bridge.` or `.pmatch.` submodule)."""
    return any(f".{block}." in name for block in ADDED_BLOCKS)


def parameter_groups(trainable: Dict[str, nn.Parameter], lr: float, added_lr_mult: float = 1.0) -> List[dict]:
    """AdamW parameter groups: the base parameters at `lr`, the added blocks' at `lr * added_lr_mult` (a block that
    starts at zero output moves only as far as its learning rate lets it in a short run)."""
    if added_lr_mult <= 0:
        raise ValueError(f"bridge_ops: added_lr_mult must be > 0, got {added_lr_mult}")
    added = [p for n, p in trainable.items() if is_added(n)]
    base = [p for n, p in trainable.items() if not is_added(n)]
    return [g for g in ({"params": base, "lr": lr}, {"params": added, "lr": lr * added_lr_mult}) if g["params"]]


def select_trainable(model: nn.Module, which: str = "all") -> Dict[str, nn.Parameter]:
    """Freezes every parameter of `model` except `which`: "all", "bridge" (the Bridge blocks) or "pmatch" (the
    parameter-matched MLP blocks); returns the trainable ones by name."""
    if which not in TRAINABLE:
        raise ValueError(f"bridge_ops: trainable must be one of {TRAINABLE}, got {which!r}")
    chosen = {}
    for name, p in model.named_parameters():
        keep = which == "all" or f".{which}." in name
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    if not chosen:
        raise ValueError(f"bridge_ops: the model has no {which} parameters")
    return chosen
