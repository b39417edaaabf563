"""GRPO on a bridged model with TRL: `BridgeGRPOTrainer` in place of `trl.GRPOTrainer`, Bridge blocks on the model.

    pip install "bridge_ops[trl]"
    python examples/trl_grpo.py                        # a tiny character-level Llama built here, a smoke run on a CPU
    python examples/trl_grpo.py --model warm/          # e.g. the output of `bridge-ops train sft` (Bridge loaded)
    torchrun --nproc_per_node 2 examples/trl_grpo.py   # data parallel: each prompt's group stays on one rank

The task is one-digit addition ("3+4=" -> "7"), rewarded for a correct sum and for answering with digits only; a
random tiny model only learns the second within a smoke run, a pretrained base (`bridge-ops train pretrain`) the
first. The trained model, Bridge blocks included, is saved to --out: `AutoModelForCausalLM.from_pretrained(out)` +
`bridge_ops.load_bridge(model, out)` restores it.
"""

import argparse
import os
import random

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

import bridge_ops
from bridge_ops.charlm import save_tiny_model
from bridge_ops.integrations.trl import BridgeGRPOTrainer


def additions(count: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(count)]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


def correct(completions, answer, **kwargs):
    """1 when the completion starts with the sum (TRL passes the dataset's other columns to reward functions)."""
    return [float(completion.strip().startswith(a)) for completion, a in zip(completions, answer)]


def digits_only(completions, **kwargs):
    return [sum(ch.isdigit() for ch in completion) / max(1, len(completion)) for completion in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        help="a causal LM directory (llama, mistral, qwen2, qwen3, ...); default: a tiny "
        "character-level Llama built in <out>/base",
    )
    parser.add_argument("--out", default="trl-grpo-bridge")
    parser.add_argument("--width", type=int, default=4, help="num_generations: samples per prompt, one Bridge group")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 loads a reference model)")
    parser.add_argument("--d-bridge", type=int, default=16, help="Bridge width when the model has no Bridge yet")
    args = parser.parse_args()

    config = GRPOConfig(
        output_dir=args.out,
        num_generations=args.width,
        per_device_train_batch_size=2 * args.width,
        max_completion_length=8,
        max_steps=args.steps,
        learning_rate=1e-3,
        beta=args.beta,
        logging_steps=5,
        save_steps=args.steps,
        report_to="none",
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    path = args.model or os.path.join(args.out, "base")
    with config.main_process_first(desc="building the tiny base model"):
        if args.model is None and not os.path.exists(path):
            save_tiny_model(path, hidden_size=64, num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if getattr(model.config, "bridge", None):  # saved with Bridge blocks
        bridge_ops.load_bridge(model, path)
    else:
        bridge_ops.apply_bridge(model, d_bridge=args.d_bridge)

    trainer = BridgeGRPOTrainer(
        model=model,
        reward_funcs=[correct, digits_only],
        args=config,
        train_dataset=additions(256, seed=0),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.out)


if __name__ == "__main__":
    main()
