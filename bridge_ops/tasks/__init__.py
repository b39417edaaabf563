"""Verifiable tasks generated from seeds (nothing is downloaded).

ArithmeticTask     `7+3-5=` -> `5`: one short answer
ScratchpadSumTask  `37+85+12+64=` -> `122,134,198>198`: aligned running sums, then the answer (consensus)
SubsetSumTask      `2,5,7,9,11,14:21=` -> `7,14`: several correct answers, all enumerated (coordination); with
                   draws, `kc7,14`: random letters first, which break the symmetry between a group's rows
WordProblemTask    "Maya has 12 marbles. She buys 7 more marbles. ... How many marbles does Maya have now?" -> `14`:
                   multi-step arithmetic in English, for real pretrained LLMs (their own tokenizers: not in TASKS)
"""

from .arithmetic import ArithmeticTask
from .base import GeneratedTask, Problem
from .scratchpad import ScratchpadSumTask
from .subset_sum import SubsetSumTask
from .word_problems import WordProblemTask

# the tasks of the character-level pipeline (the CLI's --task; each has the `alphabet` of its tokenizer)
TASKS = {task.name: task for task in (ArithmeticTask, ScratchpadSumTask, SubsetSumTask)}


def get_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"bridge_ops: unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = [
    "ArithmeticTask",
    "GeneratedTask",
    "Problem",
    "ScratchpadSumTask",
    "SubsetSumTask",
    "TASKS",
    "WordProblemTask",
    "get_task",
]
