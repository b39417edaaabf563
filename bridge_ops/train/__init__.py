"""Training Bridge: pretraining a tiny base, the SFT warm-up, GRPO with cross-sample gradients, evaluation at widths.

    data.py         grouped prompt+response batches; teacher-forced token log-probs with the groups of generation
    losses.py       group advantages, the clipped token-level GRPO loss, the SFT loss
    trainer.py      the shared loop: AdamW, clipping, tqdm, metrics.jsonl, checkpoint/resume
    sft.py          SFT on grouped responses; the warm-up data (correct samples grouped by prompt)
    grpo.py         GRPO rollouts and updates
    distributed.py  torchrun / DDP: whole groups per rank
    pmatch.py       the parameter-matched MLP baseline
    evaluate.py     accuracy, all-correct and majority-vote rates at widths 1..16
    task_data.py    a generated task's problems as token ids, with reward and answer extraction
    recipes.py      the pipeline steps the CLI, the demo and the experiment share
"""

from .data import GroupedBatch, grouped_batch, rollout, token_log_probs
from .distributed import DistContext, init_distributed
from .evaluate import evaluate_widths
from .grpo import GRPOConfig, train_grpo
from .losses import GRPOLossConfig, group_advantages, grpo_loss, sft_loss
from .pmatch import ResidualMLP, apply_parameter_matched_mlp
from .sft import SFTConfig, collect_correct_groups, train_sft
from .task_data import TaskData, task_data
from .trainer import TrainConfig, Trainer, select_trainable

__all__ = [
    "DistContext", "GRPOConfig", "GRPOLossConfig", "GroupedBatch", "ResidualMLP", "SFTConfig", "TaskData",
    "TrainConfig", "Trainer", "apply_parameter_matched_mlp", "collect_correct_groups", "evaluate_widths",
    "group_advantages", "grouped_batch", "grpo_loss", "init_distributed", "rollout", "select_trainable",
    "sft_loss", "task_data", "token_log_probs", "train_grpo", "train_sft",
]
