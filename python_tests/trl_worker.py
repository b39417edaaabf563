"""BridgeGRPOTrainer (real TRL) on a tiny character-level Llama with Bridge, instrumented. Used in-process by
test_trl.py, and run by it under `torchrun --nproc_per_node 2` (gloo), where each rank checks its own forwards and
writes a summary to `<argv[1]>.rank<r>.json`.

The instruments: a forward pre-hook on the base model of the policy (and of the reference model) records the prompt
of every row of every forward (decode steps inherit the rows of the prompt forward that started their KV cache), and
each Bridge block's `residual` records the groups it is called with, recompute under gradient checkpointing included.
"""

import json
import os
import sys
import zlib

import torch

import bridge_ops
from bridge_ops.charlm import char_tokenizer, tiny_causal_lm
from bridge_ops.hf.runtime import base_model
from bridge_ops.train import DistContext

WIDTH = 4
PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 3), (4, 5), (6, 7)]]
EXTRA_EOS = ".?!"  # with </s>, about 7% of the tokens of the random model end a completion: many rows finish early


def reward(completions, **kwargs):
    """Deterministic, varied within a group (so advantages are not zero), the same on every rank."""
    return [float(zlib.crc32(c.encode()) % 5) for c in completions]


def bridged_tiny_model(directory: str):
    """Base saved to `directory` (TRL reloads the reference model from there), loaded back, Bridge added, with a
    random output projection so that Bridge visibly mixes the rows of a group."""
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    tiny_causal_lm(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1).save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    bridge_ops.apply_bridge(model, d_bridge=16, num_heads=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in bridge_ops.hf.bridge_blocks(model):
            block.o_proj.weight.copy_(torch.randn(block.o_proj.weight.shape, generator=gen) * 0.3)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(EXTRA_EOS))]
    return model, tokenizer


class Recorder:
    """Every forward of one model: the prompt of each row, and the (rows, cu_group_lens, grad) of each Bridge call."""

    def __init__(self, model, tokenizer):
        self.tokenizer, self.forwards, self.rows_of_cache = tokenizer, [], {}
        self.rollout_logits = []  # per generation: the logits of each step, [B, vocab]
        base_model(model).register_forward_pre_hook(self.on_forward, with_kwargs=True)
        model.register_forward_hook(self.on_output)
        for block in bridge_ops.hf.bridge_blocks(model):
            block.residual = self.recording(block.residual)

    def prompt_of(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).split("=")[0] + "="

    def on_forward(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            prompts = self.rows_of_cache[id(cache)]
        else:
            prompts = [self.prompt_of(row) for row in kwargs["input_ids"].tolist()]
            if cache is not None:  # a rollout starts
                self.rows_of_cache[id(cache)] = prompts
                self.rollout_logits.append([])
        self.forwards.append({"prompts": prompts, "calls": [], "cached": cache is not None})

    def on_output(self, module, args, output):
        if getattr(output, "logits", None) is not None:  # generation forwards (training ones return log-probs)
            self.rollout_logits[-1].append(output.logits[:, -1].detach().float().clone())

    def recording(self, residual):
        def record(hidden, cu_group_lens, key_mask=None):
            self.forwards[-1]["calls"].append((hidden.shape[0], cu_group_lens.tolist(), torch.is_grad_enabled()))
            return residual(hidden, cu_group_lens, key_mask)

        return record

    def check_whole_groups(self, width: int, layers: int) -> dict:
        """Asserts that every forward and every Bridge call held whole groups of `width` rows of one prompt."""
        for forward in self.forwards:
            prompts, rows = forward["prompts"], len(forward["prompts"])
            assert rows % width == 0, rows
            assert all(len(set(prompts[g : g + width])) == 1 for g in range(0, rows, width)), prompts
            assert forward["calls"], "a forward without Bridge calls"
            for batch, cu, _ in forward["calls"]:
                assert batch == rows and cu == list(range(0, rows + 1, width)), (batch, cu)
        calls = [len(f["calls"]) for f in self.forwards]
        return {
            "forwards": len(self.forwards),
            "rollout_forwards": sum(f["cached"] for f in self.forwards),
            "recomputed_forwards": sum(n == 2 * layers for n in calls),
            "training_forwards": sum(any(grad for *_, grad in f["calls"]) for f in self.forwards),
        }


def grpo_config(output_dir: str, **settings):
    """The GRPOConfig of these tests: a short CPU run in float32 (TRL's default bf16 autocast is slow on a CPU),
    nothing saved or reported, `settings` on top."""
    from trl import GRPOConfig

    defaults = dict(
        output_dir=output_dir,
        num_generations=WIDTH,
        max_completion_length=10,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    return GRPOConfig(**{**defaults, **settings})


def make_trainer(directory: str, eval_prompts=None, **config):
    """An instrumented BridgeGRPOTrainer (GRPOConfig settings in `config`): records its generation batches, its loss
    micro-batches and, at the first optimizer step, the gradient of every Bridge parameter."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from bridge_ops.integrations.trl import BridgeGRPOTrainer

    class Instrumented(BridgeGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            self.generation_batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
            return batch

        def compute_loss(self, model, inputs, *args, **kwargs):
            self.micro_batches.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return super().compute_loss(model, inputs, *args, **kwargs)

    class FirstGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not trainer.first_gradients:
                blocks = bridge_ops.hf.bridge_blocks(trainer.accelerator.unwrap_model(trainer.model))
                trainer.first_gradients.update(
                    {
                        f"{i}.{n}": p.grad.abs().sum().item()
                        for i, block in enumerate(blocks)
                        for n, p in block.named_parameters()
                    }
                )

    model, tokenizer = bridged_tiny_model(os.path.join(directory, "base"))
    eval_dataset = None if eval_prompts is None else Dataset.from_dict({"prompt": eval_prompts})
    trainer = Instrumented(
        model=model,
        reward_funcs=reward,
        args=grpo_config(os.path.join(directory, "out"), **config),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[FirstGradients()],
    )
    trainer.generation_batches, trainer.micro_batches, trainer.first_gradients = [], [], {}
    trainer.recorders = [Recorder(model, tokenizer)]
    if trainer.ref_model is not None:
        trainer.recorders.append(Recorder(trainer.ref_model, tokenizer))
    return trainer


def main(path: str) -> None:
    """Two ranks: each keeps whole groups in every forward, and together they cover the global generation batch."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    directory = os.path.join(os.path.dirname(path), f"rank{rank}")
    trainer = make_trainer(
        directory, per_device_train_batch_size=WIDTH, steps_per_generation=2, max_steps=2, ddp_backend="gloo"
    )
    trainer.train()
    summary = trainer.recorders[0].check_whole_groups(WIDTH, layers=2)
    prompts = [
        trainer.recorders[0].prompt_of(row)
        for batch in trainer.generation_batches
        for row in batch["prompt_ids"].tolist()
    ]
    summary.update(world_size=trainer.accelerator.num_processes, prompts=prompts)
    with open(f"{path}.rank{rank}.json", "w") as f:
        json.dump(summary, f)
    DistContext(rank, trainer.accelerator.num_processes).finish()  # leave the group before exit (an abort otherwise)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the work is written: skip interpreter teardown, where a gloo rank's threads can still abort it
