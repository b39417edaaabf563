"""One optimizer step of BridgeGRPOTrainer on the tiny bridged Llama of trl_worker.py, as a plain single process or
under FSDP2 (accelerate, gloo on the CPU, any number of ranks); test_trl.py runs both and compares the weights.

    python fsdp_worker.py plain OUT.pt BETA
    python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_worker.py fsdp OUT.pt BETA

Both train on the same global generation batch of 16 rows (4 prompts x 4 samples: 1 rank x 16 rows, or 2 ranks x 8),
SGD at lr 1e-2, gradient checkpointing on. TRL seeds each rank differently and draws one batch at a time, so the
rollouts of a prompt would depend on the world size; here each group is sampled in its own `generate` call under a
seed made of its prompt and the step (the sampling distribution is TRL's; only the random stream changes). Rank 0
writes OUT.pt: the full state dict before and after the step (FSDP: gathered), TRL's log history, whether FSDP
sharded the decoder layers (their parameters are DTensors), and the Bridge weights `load_bridge` restores from
`save_model`'s directory.

accelerate 1.15 turns FSDP on for accelerator devices only, so a CPU run needs cpu_fsdp.enable() (a test shim; on a
GPU the same GRPOConfig needs none).
"""

import os
import sys
import zlib

import torch
import torch.nn.functional as F
from trl_worker import WIDTH

from bridge_ops.train import DistContext


def per_prompt_seeded(model, pad_id: int, step) -> None:
    """The bridged model's generate runs each group of WIDTH rows alone, seeded by its prompt and `step()`."""
    generate = model._bridge_base_generate

    def grouped(input_ids, attention_mask, **kwargs):
        outputs = []
        for g in range(0, input_ids.shape[0], WIDTH):
            ids, mask = input_ids[g : g + WIDTH], attention_mask[g : g + WIDTH]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(repr((ids[0][mask[0].bool()].tolist(), step())).encode()))
                outputs.append(generate(input_ids=ids, attention_mask=mask, **kwargs))
        length = max(o.shape[1] for o in outputs)
        return torch.cat([F.pad(o, (0, length - o.shape[1]), value=pad_id) for o in outputs])

    model._bridge_base_generate = grouped


def main(mode: str, path: str, beta: float) -> None:
    from datasets import Dataset
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM
    from trl_worker import PROMPTS, bridged_tiny_model, grpo_config, reward

    import bridge_ops
    from bridge_ops.integrations.trl import BridgeGRPOTrainer

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    directory = os.path.dirname(path)
    model, tokenizer = bridged_tiny_model(os.path.join(directory, f"base-{mode}-{rank}"))
    settings = dict(per_device_train_batch_size=16 // world, optim="sgd", beta=beta, max_steps=1)
    if mode == "fsdp":
        import cpu_fsdp

        cpu_fsdp.enable()
        layer = type(bridge_ops.hf.decoder_layers(model)[0]).__name__
        settings.update(
            ddp_backend="gloo",
            fsdp=True,
            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [layer], "state_dict_type": "FULL_STATE_DICT"},
        )
    trainer = BridgeGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=grpo_config(os.path.join(directory, f"out-{mode}"), **settings),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    per_prompt_seeded(model, tokenizer.pad_token_id, lambda: trainer.state.global_step)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train()
    sharded = [isinstance(p, DTensor) for p in trainer.model.parameters()]
    after = trainer.accelerator.get_state_dict(trainer.model)  # FSDP: gathered on rank 0
    saved = os.path.join(directory, f"saved-{mode}")
    trainer.save_model(saved)
    if trainer.accelerator.is_main_process:
        restored = bridge_ops.load_bridge(AutoModelForCausalLM.from_pretrained(saved), saved).state_dict()
        result = {
            "world": trainer.accelerator.num_processes,
            "fsdp": trainer.is_fsdp_enabled,
            "all_sharded": all(sharded),
            "reference_bridged": trainer.ref_model is not None and bridge_ops.hf.is_bridged(trainer.ref_model),
            "kl": [entry["kl"] for entry in trainer.state.log_history if "kl" in entry],
            "before": before,
            "after": {k: v.detach().clone() for k, v in after.items()},
            "restored_bridge": {k: v for k, v in restored.items() if ".bridge." in k},
        }
        torch.save(result, path)
    DistContext(rank, world).finish()  # wait for every rank, then leave the group before exit (an abort otherwise)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the work is written: skip interpreter teardown, where a gloo rank's threads can still abort it
