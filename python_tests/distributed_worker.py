"""Run by test_train_distributed.py, alone or under `torchrun --nproc_per_node 2`: Bridge SFT then GRPO on a tiny
model with a toy reward; rank 0 saves the final parameters to argv[1]."""

import os
import sys

import torch
from hf_models import EOS, bridged_model

from bridge_ops.train import (
    GRPOConfig,
    GRPOLossConfig,
    SFTConfig,
    init_distributed,
    select_trainable,
    train_grpo,
    train_sft,
)

PROMPTS = [
    [1, 5, 6, 7],
    [1, 9, 10],
    [1, 11, 12, 13, 14],
    [1, 20, 21],
    [1, 30],
    [1, 31, 32, 33],
    [1, 40, 41],
    [1, 50, 51, 52],
]
SFT_GROUPS = [(p, [[3 + i, 4, EOS], [5 + i, EOS]][: 1 + i % 2] + [[7, EOS]]) for i, p in enumerate(PROMPTS)]


def reward(index, response):
    return float(bool(response) and response[0] % 2 == 0)


def main(path: str) -> None:
    dist = init_distributed()
    torch.set_num_threads(1)
    model = bridged_model()
    train_sft(
        model,
        SFT_GROUPS,
        SFTConfig(steps=2, lr=1e-2, groups_per_step=4, progress=False),
        trainable=select_trainable(model, "bridge"),
        dist=dist,
    )
    config = GRPOConfig(
        steps=2,
        lr=1e-2,
        width=3,
        prompts_per_step=4,
        max_new_tokens=4,
        minibatches=2,
        loss=GRPOLossConfig(beta=0.1),
        progress=False,
    )
    history = train_grpo(
        model, PROMPTS, reward, config, trainable=select_trainable(model, "all"), eos_token_id=EOS, dist=dist
    )
    if dist.is_main:
        torch.save({"parameters": dict(model.named_parameters()), "history": history}, path)
    dist.finish()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the work is written: skip interpreter teardown, where a gloo rank's threads can still abort it
