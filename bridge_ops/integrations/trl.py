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
   blocks; it gets a copy of the policy's as TRL creates it, before TRL prepares it (and, under FSDP, shards it).
4. Refusals, raised before training: `use_vllm` (vLLM has no Bridge layer and no group scheduling),
   `use_transformers_continuous_batching` (packed `[1, T]` forwards have no batch axis to attend along), `tools`,
   `environment_factory` and `rollout_func` (tool loops and custom rollouts generate rows outside their groups),
   `mask_truncated_completions` (it hides a truncated completion from its peers in training although they saw it
   at rollout), generation without a KV cache or with beam search, vision-language processors (not supported yet),
   `beta > 0` under DeepSpeed (not tested: ZeRO-3 partitions the reference model as it loads) and under FSDP with
   `cpu_ram_efficient_loading` (TRL's reference model would hold zeros on all local ranks but 0).
5. PEFT (`peft_config=LoraConfig(...)`, or a `PeftModel` over a bridged model). The adapters go on the base model;
   the Bridge blocks train in full beside them, as PEFT's `modules_to_save` (added to the config): each block keeps
   its initial weights and trains a copy, so the reference model of `beta > 0` (TRL's adapter-disabled model) is the
   base model with its initial Bridge blocks, and KL is 0 at the first step. A config whose adapters target a Bridge
   module, or a prompt-learning method (virtual tokens in the KV cache), is refused. `save_model(dir)` writes the
   adapter (with the Bridge copies) and `save_bridge`'s files; restore with
   `PeftModel.from_pretrained(bridge_ops.load_bridge(AutoModelForCausalLM.from_pretrained(base), dir), dir)`.

Everything else is TRL's: its config names, rewards, losses, logging and checkpoints. `trainer.save_model(dir)` keeps
the Bridge blocks in the saved model; `from_pretrained(dir)` + `bridge_ops.load_bridge(model, dir)` restores them.
"""

import contextlib
import dataclasses
from typing import Iterator, List, Optional

import torch
import trl.trainer.grpo_trainer as _grpo_trainer
from accelerate.utils import is_peft_model
from torch import nn
from transformers import ProcessorMixin
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import get_config_model_id, split_tensor_dict

from ..hf import BLOCK_NAME, apply_bridge, bridge_blocks, is_bridged
from ..hf.runtime import groups
from ..hf.weights import save_bridge

__all__ = ["BridgeGRPOTrainer", "bridge_peft_config", "shuffle_groups"]


def shuffle_groups(batch: dict, width: int) -> dict:
    """TRL's `shuffle_sequence_dict` over whole groups: the `width` adjacent rows of a group move together, in order."""
    rows = next(len(v) for v in batch.values() if v is not None and not (isinstance(v, torch.Tensor) and v.ndim == 0))
    order = (torch.randperm(rows // width)[:, None] * width + torch.arange(width)).flatten()

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        return value[order] if isinstance(value, torch.Tensor) else [value[i] for i in order]

    return {key: permute(value) for key, value in batch.items()}


def _copy_bridge(policy: nn.Module, reference: nn.Module) -> nn.Module:
    """Gives `reference` (the same base model) Bridge blocks equal to `policy`'s current ones."""
    if not is_bridged(reference):
        apply_bridge(reference, **policy.config.bridge)
    for source, target in zip(bridge_blocks(policy), bridge_blocks(reference)):
        target.load_state_dict(source.state_dict())
    return reference


@contextlib.contextmanager
def _reference_with_bridge(policy: nn.Module) -> Iterator[None]:
    """Inside the block, the model `GRPOTrainer.__init__` creates from a path (with a model instance as the policy,
    only the reference model, `beta > 0` without PEFT) gets `policy`'s Bridge blocks as it is created: before TRL
    disables its dropout, adds its fused LM head and prepares it (`prepare_fsdp` shards it, `accelerator.prepare_model`
    wraps it). Swaps the `create_model_from_path` that TRL's grpo_trainer module calls, for the block only."""
    create = _grpo_trainer.create_model_from_path

    def create_bridged(*args, **kwargs):
        return _copy_bridge(policy, create(*args, **kwargs))

    _grpo_trainer.create_model_from_path = create_bridged
    try:
        yield
    finally:
        _grpo_trainer.create_model_from_path = create


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


def _names_a_bridge_module(targets) -> bool:
    """Whether PEFT `target_modules` / `target_parameters` (a regex string or a list of names) mention the Bridge."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return BLOCK_NAME in targets
    return any(BLOCK_NAME in str(target).split(".") for target in targets)


def bridge_peft_config(peft_config):
    """A copy of `peft_config` under which the Bridge blocks train in full beside the adapters: `"bridge"` added to
    its `modules_to_save` (PEFT then also keeps its adapters out of the blocks). Raises ValueError for a config that
    targets a Bridge module with adapters, a prompt-learning method, or a method without `modules_to_save`; TypeError
    for something that is not a PeftConfig."""
    from peft import PeftConfig

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"bridge_ops: peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {peft_config!r}")
    name = type(peft_config).__name__
    if peft_config.is_prompt_learning:
        raise ValueError(
            f"bridge_ops: {name} is a prompt-learning method, whose virtual tokens enter the KV cache outside the "
            "Bridge groups; use an adapter method such as LoRA"
        )
    if not any(field.name == "modules_to_save" for field in dataclasses.fields(peft_config)):
        raise ValueError(f"bridge_ops: {name} has no modules_to_save, so the Bridge blocks could not train beside it")
    for attribute in ("target_modules", "target_parameters"):
        if _names_a_bridge_module(getattr(peft_config, attribute, None)):
            raise ValueError(
                f"bridge_ops: the {name} targets Bridge modules ({attribute}={getattr(peft_config, attribute)!r}): the "
                "Bridge blocks train in full (PEFT's modules_to_save), so adapters must target base-model modules only"
            )
    modules = list(peft_config.modules_to_save or [])
    return dataclasses.replace(peft_config, modules_to_save=modules + [BLOCK_NAME] * (BLOCK_NAME not in modules))


def _trained_bridge_blocks(peft_model) -> List[nn.Module]:
    """The BridgeBlocks a PEFT model trains (the active copy of each block's `modules_to_save` wrapper); raises
    ValueError unless every block is such a wrapper with no adapter inside."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    blocks = bridge_blocks(peft_model.get_base_model())
    if not all(isinstance(block, ModulesToSaveWrapper) for block in blocks):
        raise ValueError(
            "bridge_ops: this PEFT model does not train its Bridge blocks: create its adapter with "
            f"modules_to_save=[{BLOCK_NAME!r}] (or pass peft_config= to BridgeGRPOTrainer, which adds it)"
        )
    if any(isinstance(module, BaseTunerLayer) for block in blocks for module in block.modules()):
        raise ValueError("bridge_ops: this PEFT model has adapters inside its Bridge blocks; target base modules only")
    return [block.modules_to_save[peft_model.active_adapter] for block in blocks]


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
        if kwargs.get("peft_config") is not None:
            kwargs["peft_config"] = bridge_peft_config(kwargs["peft_config"])
        elif is_peft_model(model):
            _trained_bridge_blocks(model)
        with _reference_with_bridge(model):
            super().__init__(model, reward_funcs, args, **kwargs)
        if kwargs.get("peft_config") is not None:  # what get_peft_model made of it
            _trained_bridge_blocks(self.model)
        if isinstance(self.processing_class, ProcessorMixin):
            raise ValueError(
                "bridge_ops: BridgeGRPOTrainer supports text-only models (a tokenizer as processing_class)"
            )
        if self.ref_model is not None:
            if self.is_deepspeed_enabled:
                raise ValueError(
                    "bridge_ops: beta > 0 under DeepSpeed is not supported yet (ZeRO-3 partitions the reference model "
                    "as it loads); use beta=0.0, FSDP or DDP"
                )
            if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
                raise ValueError(
                    "bridge_ops: beta > 0 under FSDP with cpu_ram_efficient_loading: the reference model TRL loads "
                    "holds zeros on every local rank but 0, and TRL shards it without rank 0's weights"
                )
            if not is_bridged(self._bridged(self.ref_model)):
                raise RuntimeError(
                    "bridge_ops: TRL created the reference model without going through create_model_from_path, so it "
                    "has no Bridge blocks (an unsupported TRL version?)"
                )

    @contextlib.contextmanager
    def _whole_groups(self, width: int) -> Iterator[None]:
        """Every forward of the policy and the reference model inside the block sees groups of `width` adjacent rows,
        a row's keys hidden from its peers after its EOS while it is generated (`bridge_ops.groups`)."""
        models = [self.model] if self.ref_model is None else [self.model, self.ref_model]
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(groups(self._bridged(model), width=width, eos_token_id=self.eos_token_ids))
            yield

    def _bridged(self, model: nn.Module) -> nn.Module:
        """The bridged transformers model inside the accelerate (and PEFT) wrappers of `model`."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        """Trainer._save; a PEFT model also gets `save_bridge`'s files (the trained Bridge blocks and their config)."""
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_bridge(model.get_base_model(), output_dir, blocks=_trained_bridge_blocks(model))

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
