"""The optimization loop shared by pretraining, SFT and GRPO: AdamW, clipping, progress, metrics, checkpoints.

Every step's data (which groups, which random draws) is a function of (seed, step) alone, so a run resumed from a
checkpoint repeats exactly what the uninterrupted run would have done: the checkpoint holds the trained parameters,
the optimizer state, the step and torch's and Python's RNG states.

Files in `out_dir` (rank 0 writes them; the directory is checked to be writable before the first step):
    metrics.jsonl    one JSON object per logged step ({"step", "loss", ..., "seconds"}); a resumed run first drops
                     the lines of steps after its checkpoint, so no step is logged twice
    checkpoint.pt    the latest checkpoint (every `checkpoint_every` steps and at the end)
    checkpoint.json  its manifest: sha256 of checkpoint.pt, step, kind of run, the whole config and the fingerprints
                     of the run's inputs
checkpoint.pt and checkpoint.json are one save with one commit point (`bridge_ops.files.publish`): a crash at any
instant leaves the previous checkpoint or the new one, whole.

A run resumes from `out_dir` only if checkpoint.pt matches its recorded sha256, was written by the same kind of run
(trainer description and config class), with the same config (except the fields in `RESUMABLE`) and from the same
inputs: the fingerprints (sha256) of the weights the run started from (`initial_weights`: the frozen base model, and
the reference model of a KL penalty) and of what its caller names (`training_data`, `reward_fn`). Config fields and
fingerprints the new config lists in `allow_resume_changes` may differ; otherwise it refuses with a message naming
the file or what differs. A non-finite loss or gradient norm stops training (FloatingPointError) before the weights
change.
"""

import hashlib
import json
import math
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..files import (
    atomic_write,
    check_fields,
    ensure_writable_dir,
    publish,
    read_json,
    recover,
    sha256_of,
    verify_sha256,
    write_json,
)
from ..hf import BLOCK_NAME
from .distributed import DistContext
from .pmatch import BLOCK_NAME as PMATCH_BLOCK_NAME

CHECKPOINT = "checkpoint.pt"
MANIFEST = "checkpoint.json"
METRICS = "metrics.jsonl"
# config fields a resumed run may change: how long it runs, where and how often it writes, how it reports
RESUMABLE = ("steps", "out_dir", "checkpoint_every", "log_every", "progress", "allow_resume_changes")


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
    allow_resume_changes: Tuple[str, ...] = ()  # config fields and fingerprints that may differ when resuming

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first bad field; runs at construction and again when training starts (a
        config's fields may be set after it was built)."""
        require_integers(self, steps=1, log_every=1, checkpoint_every=0, warmup_steps=0)
        require_number("lr", self.lr, positive=True)
        require_number("weight_decay", self.weight_decay, positive=False)
        require_number("added_lr_mult", self.added_lr_mult, positive=True)
        if self.max_grad_norm is not None:  # None: no clipping
            require_number("max_grad_norm", self.max_grad_norm, positive=True)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"bridge_ops: schedule must be one of {SCHEDULES}, got {self.schedule!r}")


SCHEDULES = ("constant", "cosine")


def require_integers(config, **minimums: int) -> None:
    """ValueError naming the first field of `config` that is not an integer >= its minimum (bools refused)."""
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"bridge_ops: {name} must be an integer >= {minimum}, got {value!r}")


def require_number(name: str, value, positive: bool) -> None:
    """ValueError naming `name` unless `value` is a finite number > 0 (positive) or >= 0."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or value < 0 or (positive and value == 0):
        raise ValueError(f"bridge_ops: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


def lr_factor(config: TrainConfig, step: int) -> float:
    """The learning-rate multiplier of `step` (1-based): linear warm-up, then constant or cosine down to 0.1."""
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


# step_fn(step, optimizer_step) runs the step's forward and backward passes, calls optimizer_step(loss) after each
# backward (once, or once per minibatch), and returns the step's metrics.
StepFn = Callable[[int, Callable[[Optional[torch.Tensor]], float]], Dict[str, float]]


class Trainer:
    """Runs `step_fn(step, optimizer_step)` for steps 1..config.steps; `optimizer_step()` clips the gradients of
    the `trainable` parameters to `max_grad_norm`, applies AdamW, zeroes them and returns the gradient norm.

    `trainable` maps parameter names (as in model.named_parameters()) to the parameters that train; every other
    parameter of the model is frozen by the caller. Resumes from `out_dir/checkpoint.pt` when it exists.
    `fingerprints`: what the run depends on besides its config and initial weights, by name (e.g. the sha256 of the
    training data and the reward function's name), recorded in the checkpoint and checked when resuming.
    """

    def __init__(
        self,
        model: nn.Module,
        trainable: Dict[str, nn.Parameter],
        config: TrainConfig,
        step_fn: StepFn,
        dist: DistContext = DistContext(),
        description: str = "train",
        fingerprints: Optional[Dict[str, str]] = None,
    ):
        if not trainable:
            raise ValueError("bridge_ops: nothing to train (no trainable parameters)")
        config.validate()
        self.model, self.trainable, self.config, self.step_fn = model, trainable, config, step_fn
        self.dist, self.description = dist, description
        self.fingerprints = dict(fingerprints or {})
        if config.out_dir is not None:  # only a run that checkpoints needs it (a sha256 of every weight)
            self.fingerprints["initial_weights"] = weights_fingerprint(model)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(trainable, config.lr, config.added_lr_mult), weight_decay=config.weight_decay
        )
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.step = 0
        self.history: List[Dict[str, float]] = []

    # -- checkpoints ---------------------------------------------------------------------------------------------
    @property
    def run(self) -> str:
        """What kind of run this is (a checkpoint of another kind is never resumed)."""
        return f"{self.description} ({type(self.config).__name__})"

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "parameters": {name: p.detach().clone() for name, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a checkpoint; checks every parameter (names, shapes, dtypes, finite values) before changing any."""
        saved = state["parameters"]
        problems = [f"{name} missing" for name in sorted(self.trainable.keys() - saved.keys())]
        problems += [f"{name} unexpected" for name in sorted(saved.keys() - self.trainable.keys())]
        for name in sorted(self.trainable.keys() & saved.keys()):
            p, t = self.trainable[name], saved[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                problems.append(
                    f"{name} is {t.dtype} {list(t.shape)} in the checkpoint, {p.dtype} {list(p.shape)} in the model"
                )
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{name} holds NaN or infinite values")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(
                f"bridge_ops: the checkpoint does not fit the trainable parameters: {'; '.join(problems[:5])}{more}"
            )
        self.optimizer.load_state_dict(state["optimizer"])  # checks the parameter groups before changing anything
        for group in self.optimizer.param_groups:  # the config's values (changed only where allow_resume_changes)
            group.update(lr=self.config.lr, weight_decay=self.config.weight_decay)
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(saved[name])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]

    def save_checkpoint(self) -> None:
        if self.config.out_dir is None or not self.dist.is_main:
            return
        state = self.state_dict()

        def write(directory: str) -> None:
            path = os.path.join(directory, CHECKPOINT)
            torch.save(state, path)
            manifest = {
                "file": CHECKPOINT,
                "sha256": sha256_of(path),
                "step": self.step,
                "run": self.run,
                "config": _comparable(self.config),
                "fingerprints": self.fingerprints,
            }
            write_json(os.path.join(directory, MANIFEST), manifest)

        publish(self.config.out_dir, write)

    def _check_manifest(self, path: str) -> None:
        """The checkpoint at `path` is intact and was written by a run of this kind, with this config, from these
        inputs."""
        manifest_path = os.path.join(self.config.out_dir, MANIFEST)
        if not os.path.exists(manifest_path):
            raise ValueError(
                f"bridge_ops: {path} has no {MANIFEST} beside it (an older bridge_ops wrote it, or the "
                "manifest was deleted): its integrity and configuration cannot be checked; move it away "
                "to start over"
            )
        manifest = read_json(manifest_path)
        check_fields(manifest, manifest_path, sha256=str, step=int, run=str, config=dict, fingerprints=dict)
        verify_sha256(path, manifest.get("sha256"), manifest_path)
        if manifest.get("run") != self.run:
            raise ValueError(
                f"bridge_ops: {self.config.out_dir} holds the checkpoint of a {manifest.get('run')} run, "
                f"not of this {self.run} run: use another output directory"
            )
        ignored = set(RESUMABLE) | set(self.config.allow_resume_changes)
        changed = _differences(_flat(manifest.get("config", {})), _flat(_comparable(self.config)), ignored)
        changed += _differences(manifest.get("fingerprints", {}), self.fingerprints, ignored)
        if changed:
            raise ValueError(
                f"bridge_ops: the checkpoint in {self.config.out_dir} was written with another "
                f"configuration: {', '.join(changed)}; resume with the same settings, use another "
                "output directory, or name the fields in allow_resume_changes to resume anyway"
            )

    def maybe_resume(self) -> bool:
        if self.config.out_dir is None:
            return False
        recover(self.config.out_dir)
        path = os.path.join(self.config.out_dir, CHECKPOINT)
        if not os.path.exists(path):
            return False
        self._check_manifest(path)
        try:
            state = torch.load(path, weights_only=False)
        except (EOFError, pickle.UnpicklingError, RuntimeError) as e:
            raise ValueError(f"bridge_ops: cannot read the checkpoint {path}: {e}") from None
        self.load_state_dict(state)
        if self.dist.is_main:
            self._drop_metrics_after(self.step)
        return True

    def _drop_metrics_after(self, step: int) -> None:
        """Removes the metrics.jsonl lines of steps after `step` (logged after the checkpoint a run resumes from, they
        are logged again), and a line a crash cut short."""
        path = os.path.join(self.config.out_dir, METRICS)
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.read().splitlines()
        kept = [line for line in lines if _logged_step(line) <= step]

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(line + "\n" for line in kept)

        if len(kept) != len(lines):
            atomic_write(path, write)

    def optimizer_step(self, loss: Optional[torch.Tensor] = None) -> float:
        """Clips, applies AdamW and zeroes the gradients; returns the gradient norm. Raises FloatingPointError without
        updating anything if `loss` (on any rank) or the gradient norm is not finite."""
        params = list(self.trainable.values())
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf")))
        bad_loss = self.dist.sum(float(loss is not None and not bool(torch.isfinite(loss.detach()).all()))) > 0
        if bad_loss or not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            what = "the loss" if bad_loss else f"the gradient norm ({norm})"
            raise FloatingPointError(
                f"bridge_ops: step {self.step + 1}: {what} is not finite; training stopped before the update (the "
                f"weights are those of step {self.step}, the last checkpoint is intact): check the rewards, the data "
                "and the learning rate"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- the loop ------------------------------------------------------------------------------------------------
    def _log(self, metrics: Dict[str, float]) -> None:
        self.history.append(metrics)
        if self.config.out_dir is not None and self.dist.is_main:
            os.makedirs(self.config.out_dir, exist_ok=True)
            with open(os.path.join(self.config.out_dir, METRICS), "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def train(self, resume: bool = True) -> List[Dict[str, float]]:
        """Runs the remaining steps; returns the logged metrics of this call."""
        if self.config.out_dir is not None and self.dist.is_main:
            ensure_writable_dir(self.config.out_dir)
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

            def optimizer_step(loss: Optional[torch.Tensor] = None) -> float:  # called within this step only
                norms.append(self.optimizer_step(loss))  # noqa: B023
                return norms[-1]  # noqa: B023

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


def _comparable(config) -> dict:
    """The config as JSON values (tuples become lists), as the manifest stores it."""
    return json.loads(json.dumps(asdict(config), default=repr))


def _differences(saved: dict, current: dict, ignored: set) -> List[str]:
    """'<key> <saved> (checkpoint) vs <current> (now)' for every key whose values differ, except the `ignored` ones
    (a dotted key is ignored with its first part)."""
    return [
        f"{k} {saved.get(k, '(absent)')!r} (checkpoint) vs {current.get(k, '(absent)')!r} (now)"
        for k in sorted(saved.keys() | current.keys())
        if k not in ignored and k.split(".")[0] not in ignored and saved.get(k) != current.get(k)
    ]


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line (infinity for a line that is not a logged step, e.g. one a crash cut)."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def weights_fingerprint(model: nn.Module) -> str:
    """The sha256 of every parameter of `model` (shapes, dtypes and bytes, in order)."""
    digest = hashlib.sha256()
    for p in model.parameters():
        t = p.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{list(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested configs as dotted keys: {"loss": {"beta": 0.1}} -> {"loss.beta": 0.1}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


ADDED_BLOCKS = (BLOCK_NAME, PMATCH_BLOCK_NAME)  # the submodule names of the added blocks
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
