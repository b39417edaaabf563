"""TRL with LoRA on a real pretrained LLM: `BridgeGRPOTrainer(model=bridged SmolLM2-135M-Instruct,
peft_config=LoraConfig(...))` trains LoRA adapters on the base model and the Bridge blocks in full beside them.

One run serves the tests: chat-formatted addition questions, 2 prompts x 4 samples per step, 2 optimizer steps,
beta 0.04 (the reference model is TRL's adapter-disabled model), gradient checkpointing on (TRL's default), LoRA on
q/k/v/o_proj, names the Bridge blocks' projections share: the trainer keeps the adapters out of the blocks.
"""

import os
import runpy
import sys

import pytest
import torch

pytest.importorskip("trl", reason="bridge_ops[trl] is not installed")
pytest.importorskip("peft", reason="peft is not installed")

from test_real_model import bridged_smollm2  # noqa: E402

import bridge_ops  # noqa: E402
from bridge_ops.hf import bridge_blocks, decoder_layers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH = 4  # trl_worker.grpo_config's num_generations
QUESTIONS = [(17, 25), (8, 5), (33, 9), (14, 28)]


def addition_reward(completions, answer, **kwargs):
    """1 when the completion states the sum (conversational completions: [{"role": "assistant", "content": ...}]),
    less a small length penalty, so that rewards vary within every group and every step has a gradient."""
    return [float(str(a) in c[0]["content"]) - len(c[0]["content"]) / 1000 for c, a in zip(completions, answer)]


@pytest.fixture(scope="module")
def run(smollm2_checkpoint, tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl_worker import grpo_config

    from bridge_ops.integrations.trl import BridgeGRPOTrainer

    model = bridged_smollm2(smollm2_checkpoint)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in QUESTIONS],
            "answer": [a + b for a, b in QUESTIONS],
        }
    )
    args = grpo_config(
        str(tmp_path_factory.mktemp("trl_lora")),
        per_device_train_batch_size=2 * WIDTH,
        max_completion_length=16,
        learning_rate=1e-3,
        beta=0.04,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint, padding_side="left")
    trainer = BridgeGRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.bridge_calls = []  # (rows, cu_group_lens) of every forward, as decoder layer 0 receives them
    decoder_layers(model)[0].register_forward_pre_hook(
        lambda module, args, kwargs: trainer.bridge_calls.append(
            (kwargs["bridge_groups"].batch_size, kwargs["bridge_groups"].cu_group_lens.tolist())
        ),
        with_kwargs=True,
    )
    trainer.train()
    trainer.initial_state = initial
    return trainer


def test_adapters_on_the_base_and_the_bridge_trained_in_full(run):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    trainable = [name for name, p in run.model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    bridge = [n for n in trainable if ".bridge.modules_to_save." in n]
    assert len(lora) == 30 * 4 * 2 and len(bridge) == 30 * 5 and len(trainable) == len(lora) + len(bridge)
    assert not any(".bridge." in n for n in lora)  # q/k/v/o_proj of the Bridge blocks are not LoRA-wrapped
    base = run.model.get_base_model()
    for block in bridge_blocks(base):
        assert isinstance(block, ModulesToSaveWrapper)
        assert not any(isinstance(m, BaseTunerLayer) for m in block.modules())


def test_every_forward_held_whole_groups(run):
    assert len(run.bridge_calls) > 2 * 16  # two rollouts of up to 16 steps, old/reference log-probs, loss, recompute
    for rows, cu in run.bridge_calls:
        assert rows % WIDTH == 0 and cu == list(range(0, rows + 1, WIDTH)), (rows, cu)


def test_kl_is_zero_at_step_one_and_both_parts_learn(run):
    logs = [entry for entry in run.state.log_history if "kl" in entry]
    assert logs[0]["kl"] == 0.0 and logs[1]["kl"] > 0.0
    state = run.model.get_base_model().state_dict()
    moved = {"lora_B": 0, "bridge copy": 0}
    for name, tensor in state.items():
        if ".lora_B." in name:
            moved["lora_B"] += int(tensor.abs().sum() > 0)  # zero-initialized, trained
        elif ".bridge.modules_to_save." in name:
            original = name.replace("modules_to_save.default.", "")
            moved["bridge copy"] += int(not torch.equal(tensor, run.initial_state[original]))
        elif ".bridge.original_module." in name:
            assert torch.equal(tensor, run.initial_state[name.replace("original_module.", "")]), name
        elif ".lora_A." not in name:
            assert torch.equal(tensor, run.initial_state[name.replace(".base_layer", "")]), name  # frozen base
    assert moved == {"lora_B": 120, "bridge copy": 150}


def test_the_reference_is_the_base_with_its_initial_bridge(run, smollm2_checkpoint):
    """TRL's reference log-probs come from the adapter-disabled model: there, every Bridge block has its initial
    weights (not the trained copy), so it is exactly the model training started from."""
    batch = run.processing_class(["What is 17 + 25?"] * WIDTH, return_tensors="pt")
    start = bridged_smollm2(smollm2_checkpoint)
    policy = run.model.get_base_model()
    with torch.no_grad():
        with bridge_ops.groups(start, width=WIDTH):
            expected = start(**batch).logits
        with bridge_ops.groups(policy, width=WIDTH), run.model.disable_adapter():
            reference = run.model(**batch).logits
        with bridge_ops.groups(policy, width=WIDTH):
            trained = run.model(**batch).logits
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert (trained - expected).abs().max() > 1e-3


def test_saved_adapter_and_bridge_restore_the_trained_policy(run, smollm2_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run.save_model(str(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json", "bridge.safetensors"} <= set(os.listdir(tmp_path))
    base = bridge_ops.load_bridge(AutoModelForCausalLM.from_pretrained(smollm2_checkpoint), str(tmp_path))
    restored = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    batch = run.processing_class(["What is 8 + 5?"] * WIDTH, return_tensors="pt")
    with torch.no_grad():
        with bridge_ops.groups(run.model.get_base_model(), width=WIDTH):
            expected = run.model(**batch).logits
        with bridge_ops.groups(base, width=WIDTH):
            assert torch.equal(restored(**batch).logits, expected)


def test_example_runs_smollm2_with_lora(smollm2_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_OPS_CACHE", os.path.dirname(os.path.dirname(smollm2_checkpoint)))
    argv = ["trl_grpo.py", "--model", "smollm2", "--out", str(tmp_path), "--steps", "1", "--max-completion-length", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(HERE, "..", "examples", "trl_grpo.py"), run_name="__main__")
    assert {"adapter_model.safetensors", "bridge.safetensors"} <= set(os.listdir(tmp_path))
