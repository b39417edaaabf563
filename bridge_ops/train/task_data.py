"""A task's problems as token ids, with the reward and answer extraction the trainers and the evaluation call."""

from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..tasks import Problem
from .grpo import GroupReward


@dataclass
class TaskData:
    """`prompts[i]` are the token ids (BOS + prompt) of `problems[i]`; responses are token id lists (EOS included)."""

    task: object
    tokenizer: object
    problems: List[Problem]
    prompts: List[List[int]]

    def text(self, response: List[int]) -> str:
        return self.tokenizer.decode(response, skip_special_tokens=True)

    def reward(self, index: int, response: List[int]) -> float:
        """1.0 when response (ids) answers problem `index` exactly and ends with EOS, else 0.0."""
        if not response or response[-1] != self.tokenizer.eos_token_id:
            return 0.0
        return self.task.reward(self.text(response), self.problems[index])

    def extract_answer(self, response: List[int]) -> Optional[str]:
        return self.task.extract_answer(self.text(response))

    def distinct_reward(self) -> GroupReward:
        """A group reward for multi-answer tasks: a correct response earns 1 / (how many responses of its group give
        the same answer), so a group is paid for the distinct correct answers it finds."""

        def score(index: int, responses: List[List[int]]) -> List[float]:
            answers = [self.extract_answer(r) if self.reward(index, r) > 0 else None for r in responses]
            counts = Counter(answers)
            return [0.0 if a is None else 1.0 / counts[a] for a in answers]

        return GroupReward(score)

    def repair(self, index: int, response: List[int]) -> Optional[Tuple[List[int], List[bool], bool]]:
        """The 'repair' warm-up row of a sampled response (tasks with a `repair` method): (the response's own chain
        with the correct answer and EOS, its loss mask: every token when the chain was right, else the answer and
        EOS only, whether the chain was right), or None when the response has no chain to keep."""
        fixed = self.task.repair(self.text(response), self.problems[index])
        if fixed is None:
            return None
        text, answer_chars, chain_ok = fixed
        head = self.tokenizer(text[:-answer_chars], add_special_tokens=False)["input_ids"]
        tail = self.encode(text[-answer_chars:])
        return head + tail, [chain_ok] * len(head) + [True] * len(tail), chain_ok

    def rank(self, index: int, responses: List[List[int]]) -> List[List[int]]:
        """The 'ranked' warm-up group of a prompt's distinct correct responses (tasks with a `rank` method, e.g.
        SubsetSumTask with draws): the row with the k-th smallest draw gives the k-th answer."""
        if not hasattr(self.task, "rank"):
            raise ValueError(f"bridge_ops: the ranked warm-up needs a task with draws (SubsetSumTask), not {self.task}")
        return [self.encode(text) for text in self.task.rank([self.text(r) for r in responses])]

    @property
    def answers(self) -> List[str]:
        return [p.answer for p in self.problems]

    def encode(self, text: str) -> List[int]:
        """Token ids of a response text, EOS appended."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def reference_groups(self):
        """(prompt ids, [reference response ids + EOS, ...]) per problem: the supervised data of pretraining."""
        return [
            (prompt, [self.encode(r) for r in self.task.references(p)])
            for prompt, p in zip(self.prompts, self.problems)
        ]


def task_data(task, tokenizer, split: str, count: int, seed: int = 0, skip: int = 0) -> TaskData:
    """The problems `skip` .. `skip + count` of `task.problems(split, ..., seed)` (skip: e.g. a validation set drawn
    after the test set of the same split, disjoint from it)."""
    problems = task.problems(split, skip + count, seed)[skip:]
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    return TaskData(task, tokenizer, problems, prompts)
