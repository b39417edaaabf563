"""A task's problems as token ids, with the reward and answer extraction the trainers and the evaluation call."""

from dataclasses import dataclass
from typing import List, Optional

from ..tasks import Problem


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

    @property
    def answers(self) -> List[str]:
        return [p.answer for p in self.problems]

    def reference_groups(self):
        """(prompt ids, [answer ids + EOS]) per problem: the supervised data of pretraining."""
        eos = self.tokenizer.eos_token_id
        return [(prompt, [self.tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [eos]])
                for prompt, p in zip(self.prompts, self.problems)]


def task_data(task, tokenizer, split: str, count: int, seed: int = 0) -> TaskData:
    problems = task.problems(split, count, seed)
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    return TaskData(task, tokenizer, problems, prompts)
