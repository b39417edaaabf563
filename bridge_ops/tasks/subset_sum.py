"""Subset sum: a task with several correct answers, all enumerated, built to measure coordination between samples.

    prompt   2,5,7,9,11,14:21=
    response 7,14           (or 2,5,14 or 5,7,9 ...: any subset of the numbers with the target sum, ascending)

Every problem has at least `min_solutions` correct answers, and `Problem.solutions` lists all of them, so a group's
number of *distinct* correct answers can be compared with what independent samples would reach (the independence
bound of `bridge_ops.train.diagnostics`).
"""

import itertools
import random
from dataclasses import dataclass
from typing import List, Optional

from .base import GeneratedTask, Problem


@dataclass(frozen=True)
class SubsetSumTask(GeneratedTask):
    """`numbers` distinct integers in [1, max_number] and a target that `min_solutions` or more of their subsets sum
    to (the target is the sum of a random subset of 2..max_subset of them)."""

    numbers: int = 6
    max_number: int = 15
    max_subset: int = 4
    min_solutions: int = 2
    name: str = "subset-sum"

    alphabet = "0123456789,:="

    def __post_init__(self):
        if not 2 <= self.numbers <= self.max_number or not 2 <= self.max_subset <= self.numbers:
            raise ValueError(f"bridge_ops: invalid SubsetSumTask settings: {self}")
        if self.min_solutions < 1:
            raise ValueError(f"bridge_ops: min_solutions must be >= 1, got {self.min_solutions}")

    @staticmethod
    def solutions_of(numbers: List[int], target: int) -> List[str]:
        """Every subset of `numbers` (distinct) summing to `target`, written ascending and joined by ',', sorted."""
        found = [
            ",".join(map(str, subset))
            for size in range(1, len(numbers) + 1)
            for subset in itertools.combinations(sorted(numbers), size)
            if sum(subset) == target
        ]
        return sorted(found)

    def _random_problem(self, rng: random.Random) -> Problem:
        while True:
            numbers = sorted(rng.sample(range(1, self.max_number + 1), self.numbers))
            target = sum(rng.sample(numbers, rng.randint(2, self.max_subset)))
            solutions = self.solutions_of(numbers, target)
            if len(solutions) >= self.min_solutions:
                prompt = ",".join(map(str, numbers)) + f":{target}="
                return Problem(prompt, solutions[0], tuple(solutions))

    def references(self, problem: Problem) -> List[str]:
        """Every solution: pretraining shows the whole answer set of a problem."""
        return list(problem.solutions)

    @staticmethod
    def extract_answer(response: str) -> Optional[str]:
        """The response as an answer when it is a strictly ascending list of positive integers joined by ',' (no
        leading zeros), else None."""
        parts = response.strip().split(",")
        if not all(p.isdigit() and p[0] != "0" for p in parts):
            return None
        values = [int(p) for p in parts]
        return ",".join(parts) if all(a < b for a, b in zip(values, values[1:])) else None

    def is_correct(self, response: str, problem: Problem) -> bool:
        return self.extract_answer(response) in problem.solutions
