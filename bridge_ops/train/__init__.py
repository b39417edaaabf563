"""Training Bridge: pretraining a tiny base, the SFT warm-up, GRPO with cross-sample gradients, evaluation at widths.

data.py         grouped prompt+response batches; teacher-forced token log-probs with the groups of generation
losses.py       group advantages, the clipped token-level GRPO loss, the SFT loss
trainer.py      the shared loop: AdamW, clipping, tqdm, metrics.jsonl, checkpoint/resume
sft.py          SFT on grouped responses (loss masks); the warm-up data (correct, distinct or repaired samples)
grpo.py         GRPO rollouts and updates; per-response or whole-group rewards, k groups per prompt
distributed.py  torchrun / DDP: whole groups per rank
pmatch.py       the parameter-matched MLP baseline
evaluate.py     accuracy, all-correct and majority-vote rates at widths 1..16, with peers or solo
diagnostics.py  peers vs solo (KL, answer loss), Bridge attention entropy, gradients, independence bound, bootstrap
task_data.py    a generated task's problems as token ids, with reward and answer extraction
recipes.py      the pipeline steps the CLI, the demo and the experiment share
"""

from .data import GroupedBatch, grouped_batch, rollout, token_log_probs
from .diagnostics import (
    answer_loss,
    attention_stats,
    bridge_gradient_norms,
    distinct_answers,
    independence_bound,
    paired_bootstrap,
    peer_kl,
)
from .distributed import DistContext, init_distributed
from .evaluate import evaluate_widths
from .grpo import GroupReward, GRPOConfig, train_grpo
from .losses import GRPOLossConfig, group_advantages, grpo_loss, sft_loss
from .pmatch import ResidualMLP, apply_parameter_matched_mlp, remove_parameter_matched_mlp
from .sft import WARMUP_MODES, Group, SFTConfig, collect_warmup_groups, train_sft, warmup_groups_of
from .task_data import TaskData, task_data
from .trainer import TrainConfig, Trainer, select_trainable

__all__ = [
    "DistContext",
    "GRPOConfig",
    "GRPOLossConfig",
    "Group",
    "GroupReward",
    "GroupedBatch",
    "ResidualMLP",
    "SFTConfig",
    "TaskData",
    "TrainConfig",
    "Trainer",
    "WARMUP_MODES",
    "answer_loss",
    "apply_parameter_matched_mlp",
    "attention_stats",
    "bridge_gradient_norms",
    "collect_warmup_groups",
    "warmup_groups_of",
    "distinct_answers",
    "evaluate_widths",
    "group_advantages",
    "grouped_batch",
    "grpo_loss",
    "independence_bound",
    "init_distributed",
    "paired_bootstrap",
    "peer_kl",
    "remove_parameter_matched_mlp",
    "rollout",
    "select_trainable",
    "sft_loss",
    "task_data",
    "token_log_probs",
    "train_grpo",
    "train_sft",
]
