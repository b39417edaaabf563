"""Train a bridged model with TRL's `GRPOTrainer` (`pip install "bridge_ops[trl]"`).

    from bridge_ops.integrations.trl import BridgeGRPOTrainer      # instead of trl.GRPOTrainer
    trainer = BridgeGRPOTrainer(model=bridge_ops.apply_bridge(model), reward_funcs=..., args=GRPOConfig(...), ...)

A Bridge group is the `num_generations` completions of one prompt, which TRL's `RepeatSampler` lays out as adjacent
rows. `GRPOTrainer` alone breaks such groups in four places; `BridgeGRPOTrainer` changes exactly those:

1. Forwards. Every forward of the policy and of the reference model inside a training or evaluation step (the
   rollout's `generate`, the old and reference log-probs, the loss, and its gradient-checkpointing recompute) runs
   inside `bridge_ops.groups(model, width=num_generations, eos_token_id=<TRL's EOS ids>)`. At rollout a row's keys
   leave its peers' Bridge attention after its EOS; the training forwards hide the same positions, because TRL's
   attention mask ends each completion at its first EOS. So TRL trains on the log-probs the completions were sampled
   from.
2. Micro-batches. TRL shuffles the rows of a generation batch and cuts it into micro-batches; here whole groups are
   shuffled. `per_device_train_batch_size` (and `per_device_eval_batch_size`, given an eval set) must be a multiple
   of `num_generations` (`num_generations_eval`), so that every micro-batch, every chunk of old or reference
   log-probs and each rank's share of a generation batch holds whole groups. Each generation batch is checked
   before its first forward.
3. Reference model. With `beta > 0` TRL reloads the reference model from the policy's path, which has no Bridge
   blocks; it gets a copy of the policy's.
4. Refusals, raised before training: `use_vllm` (vLLM has no Bridge layer and no group scheduling),
   `use_transformers_continuous_batching` (packed `[1, T]` forwards have no batch axis to attend along), `tools`,
   `environment_factory` and `rollout_func` (tool loops and custom rollouts generate rows outside their groups),
   `mask_truncated_completions` (it hides a truncated completion from its peers in training although they saw it
   at rollout), generation without a KV cache or with beam search, PEFT and vision-language processors (not
   supported yet), and `beta > 0` under DeepSpeed or FSDP (the reference model is sharded before its Bridge blocks
   can be added).

Everything else is TRL's: its config names, rewards, losses, logging and checkpoints. `trainer.save_model(dir)` keeps
the Bridge blocks in the saved model; `from_pretrained(dir)` + `bridge_ops.load_bridge(model, dir)` restores them.
"""

import contextlib
from typing import Iterator, List

import torch
from accelerate.utils import is_peft_model
from torch import nn
from transformers import ProcessorMixin
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import get_config_model_id, split_tensor_dict

from ..hf.patch import apply_bridge, bridge_blocks, is_bridged
from ..hf.runtime import groups

__all__ = ["BridgeGRPOTrainer", "shuffle_groups"]


def shuffle_groups(batch: dict, width: int) -> dict:
    """TRL's `shuffle_sequence_dict` over whole groups: the `width` adjacent rows of a group move together, in order."""
    rows = next(len(v) for v in batch.values() if v is not None and not (isinstance(v, torch.Tensor) and v.ndim == 0))
    order = (torch.randperm(rows // width)[:, None] * width + torch.arange(width)).flatten()

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        return value[order] if isinstance(value, torch.Tensor) else [value[i] for i in order]

    return {key: permute(value) for key, value in batch.items()}


def _refusals(model: nn.Module, args: GRPOConfig, kwargs: dict) -> List[str]:
    """The settings under which a prompt's group would be split, or training would not see what rollout saw."""
    width, eval_width = args.num_generations, args.num_generations_eval or args.num_generations
    generation = args.generation_kwargs or {}
    checks = [
        (args.use_vllm, "use_vllm=True: vLLM has no Bridge layer and does not keep a prompt's samples in one batch"),
        (
            args.use_transformers_continuous_batching,
            "use_transformers_continuous_batching=True: packed [1, T] forwards have no batch axis for Bridge",
        ),
        (
            kwargs.get("tools") or kwargs.get("environment_factory") is not None,
            "tools / environment_factory: the tool-call loop generates again for the rows that called a tool only",
        ),
        (
            kwargs.get("rollout_func") is not None,
            "rollout_func: a custom rollout samples outside the groups, so training would not see what sampling saw",
        ),
        (kwargs.get("peft_config") is not None or is_peft_model(model), "PEFT models: not supported yet"),
        (
            args.per_device_train_batch_size % width != 0,
            f"per_device_train_batch_size={args.per_device_train_batch_size} is not a multiple of num_generations="
            f"{width}: micro-batches would split a prompt's group",
        ),
        (
            kwargs.get("eval_dataset") is not None and args.per_device_eval_batch_size % eval_width != 0,
            f"per_device_eval_batch_size={args.per_device_eval_batch_size} is not a multiple of num_generations_eval="
            f"{eval_width}: evaluation batches would split a prompt's group",
        ),
        (
            args.mask_truncated_completions,
            "mask_truncated_completions=True: it hides a truncated completion from its peers in the training forward, "
            "although they saw it at rollout",
        ),
        (
            generation.get("use_cache") is False,
            "generation_kwargs use_cache=False: finished rows are hidden from their peers along the KV cache",
        ),
        ((generation.get("num_beams") or 1) > 1, "generation_kwargs num_beams > 1: beam search reorders rows"),
    ]
    return [reason for failed, reason in checks if failed]


class BridgeGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` for a model with Bridge blocks: every forward sees whole groups of one prompt's
    `num_generations` rows (see the module docstring for what changes and what is refused). Same arguments."""

    _tag_names = ["trl", "grpo", "bridge"]

    def __init__(self, model: nn.Module, reward_funcs=None, args: GRPOConfig = None, **kwargs):
        if not isinstance(model, nn.Module) or not is_bridged(model):
            raise ValueError(
                "bridge_ops: BridgeGRPOTrainer trains a model instance with Bridge blocks: load the model, add them "
                "with bridge_ops.apply_bridge(model) (or bridge_ops.load_bridge(model, dir)) and pass the model"
            )
        if args is None:  # GRPOTrainer's default
            args = GRPOConfig(f"{get_config_model_id(model.config).split('/')[-1]}-GRPO")
        refused = _refusals(model, args, kwargs)
        if refused:
            raise ValueError("bridge_ops: BridgeGRPOTrainer cannot train with\n- " + "\n- ".join(refused))
        super().__init__(model, reward_funcs, args, **kwargs)
        if isinstance(self.processing_class, ProcessorMixin):
            raise ValueError(
                "bridge_ops: BridgeGRPOTrainer supports text-only models (a tokenizer as processing_class)"
            )
        if self.ref_model is not None:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(
                    "bridge_ops: beta > 0 under DeepSpeed or FSDP: the reference model is sharded before its Bridge "
                    "blocks can be added; use beta=0.0, or DDP"
                )
            self._bridge_the_reference()

    def _bridge_the_reference(self) -> None:
        """The reference model TRL loaded from the policy's path gets the policy's (initial) Bridge blocks."""
        policy = self.accelerator.unwrap_model(self.model)
        reference = self.accelerator.unwrap_model(self.ref_model)
        if not is_bridged(reference):
            apply_bridge(reference, **policy.config.bridge)
        for source, target in zip(bridge_blocks(policy), bridge_blocks(reference)):
            target.load_state_dict(source.state_dict())

    @contextlib.contextmanager
    def _whole_groups(self, width: int) -> Iterator[None]:
        """Every forward of the policy and the reference model inside the block sees groups of `width` adjacent rows,
        a row's keys hidden from its peers after its EOS while it is generated (`bridge_ops.groups`)."""
        models = [self.model] if self.ref_model is None else [self.model, self.ref_model]
        with contextlib.ExitStack() as stack:
            for model in models:
                bridged = self.accelerator.unwrap_model(model)
                stack.enter_context(groups(bridged, width=width, eos_token_id=self.eos_token_ids))
            yield

    def training_step(self, model, inputs, num_items_in_batch):
        with self._whole_groups(self.num_generations):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with self._whole_groups(self.num_generations_eval):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _prepare_inputs(self, generation_batch):
        """GRPOTrainer._prepare_inputs, with the generation batch shuffled by whole groups instead of rows."""
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)  # evaluation: one batch, not shuffled
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = shuffle_groups(self._generate_and_score_completions(generation_batch), self.num_generations)
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _generate_and_score_completions(self, inputs):
        width = self.num_generations if self.model.training else self.num_generations_eval
        prompts = [example.get("prompt") for example in inputs]
        if len(prompts) % width or any(prompts[i] != prompts[i - i % width] for i in range(len(prompts))):
            raise RuntimeError(
                f"bridge_ops: this rank's generation batch of {len(prompts)} rows is not made of whole groups of "
                f"{width} adjacent rows of one prompt, so Bridge would mix samples of different prompts"
            )
        return super()._generate_and_score_completions(inputs)
