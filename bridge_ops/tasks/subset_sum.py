"""Subset sum: a task with several correct answers, all enumerated, built to measure coordination between samples.

    prompt   2,5,7,9,11,14:21=
    response 7,14           (or 2,5,14 or 5,7,9 ...: any subset of the numbers with the target sum, ascending)

Every problem has at least `min_solutions` correct answers, and `Problem.solutions` lists all of them, so a group's
number of *distinct* correct answers can be compared with what independent samples would reach (the independence
bound of `bridge_ops.train.diagnostics`).

`draw_length > 0` breaks the symmetry between a group's rows. The N rows of a group share one prompt, and Bridge is
permutation-equivariant, so rows with the same prefix always have the same next-token distribution: no exchange
between peers can make two such rows choose different answers. With draws, a response starts with `draw_length`
random letters (drawn uniformly in the references, so a pretrained base samples them uniformly and independently)
before the answer:

    response kc7,14          (draw "kc", answer "7,14")

After the draw the rows differ, and a row that sees its peers' draws can take a share of the answers that depends on
them (`rank`: the row with the k-th smallest draw takes the k-th answer), which a row that sees only itself cannot.
"""

import functools
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .base import GeneratedTask, Problem


@dataclass(frozen=True)
class SubsetSumTask(GeneratedTask):
    """`numbers` distinct integers in [1, max_number] and a target that `min_solutions` or more of their subsets sum
    to (the target is the sum of a random subset of 2..max_subset of them)."""

    numbers: int = 6
    max_number: int = 15
    max_subset: int = 4
    min_solutions: int = 2
    draw_length: int = 0  # random letters before the answer (0: none)
    name: str = "subset-sum"

    draw_letters = "abcdefghijklmnop"

    def __post_init__(self):
        if not 2 <= self.numbers <= self.max_number or not 2 <= self.max_subset <= self.numbers:
            raise ValueError(f"bridge_ops: invalid SubsetSumTask settings: {self}")
        if self.min_solutions < 1:
            raise ValueError(f"bridge_ops: min_solutions must be >= 1, got {self.min_solutions}")
        if self.draw_length < 0:
            raise ValueError(f"bridge_ops: draw_length must be >= 0, got {self.draw_length}")

    @property
    def alphabet(self) -> str:
        return "0123456789,:=" + (self.draw_letters if self.draw_length else "")

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

    def _random_problem(self, rng: random.Random) -> Optional[Problem]:
        """A random problem, or None when the drawn target has fewer than `min_solutions` solutions."""
        numbers = sorted(rng.sample(range(1, self.max_number + 1), self.numbers))
        target = sum(rng.sample(numbers, rng.randint(2, self.max_subset)))
        solutions = self.solutions_of(numbers, target)
        if len(solutions) < self.min_solutions:
            return None
        return Problem(self.prompt_of(numbers, target), solutions[0], tuple(solutions))

    @staticmethod
    def prompt_of(numbers: Sequence[int], target: int) -> str:
        return ",".join(map(str, numbers)) + f":{target}="

    @functools.cache  # noqa: B019 (the task is frozen and hashable, and tasks are few: counted once per task)
    def split_sizes(self) -> Optional[Dict[str, int]]:
        """How many distinct problems each split holds (sets of numbers and the targets of their subsets of 2 to
        max_subset numbers with min_solutions or more solutions), counted when there are at most 10**6 subsets of
        number sets to go through (else None)."""
        if math.comb(self.max_number, self.numbers) * 2**self.numbers > 10**6:
            return None
        sizes = {"train": 0, "test": 0}
        for numbers in itertools.combinations(range(1, self.max_number + 1), self.numbers):
            subsets = [s for size in range(1, self.numbers + 1) for s in itertools.combinations(numbers, size)]
            solutions = Counter(sum(s) for s in subsets)
            for target in {sum(s) for s in subsets if 2 <= len(s) <= self.max_subset}:
                if solutions[target] >= self.min_solutions:
                    sizes[self.split_of(Problem(self.prompt_of(numbers, target), ""))] += 1
        return sizes

    def references(self, problem: Problem) -> List[str]:
        """Every solution (pretraining shows the whole answer set of a problem), each after a draw of letters chosen
        uniformly by a generator seeded from the problem and the solution."""
        out = []
        for solution in problem.solutions:
            rng = random.Random(f"{self.name}-draw-{problem.prompt}{solution}")
            out.append("".join(rng.choice(self.draw_letters) for _ in range(self.draw_length)) + solution)
        return out

    def split_draw(self, response: str) -> Optional[Tuple[str, str]]:
        """(draw, rest) of a response, or None when it does not start with `draw_length` draw letters."""
        response = response.strip()
        draw = response[: self.draw_length]
        if len(draw) < self.draw_length or any(c not in self.draw_letters for c in draw):
            return None
        return draw, response[self.draw_length :]

    def rank(self, responses: List[str]) -> List[str]:
        """The 'ranked' warm-up rows from a group's correct responses: one row per distinct draw and per distinct
        answer, with the answers reassigned so that the row with the k-th smallest draw gives the k-th smallest answer
        as text (so the first answer character rises with the rank): a protocol a row can follow only by comparing its
        draw with its peers'. Needs draw_length > 0."""
        if not self.draw_length:
            raise ValueError("bridge_ops: the ranked warm-up needs SubsetSumTask(draw_length > 0)")
        parts = [(d, self.parse_answer(a)) for d, a in filter(None, map(self.split_draw, responses))]
        draws = sorted({d for d, a in parts if a is not None})
        answers = sorted({a for _, a in parts if a is not None})
        return [d + a for d, a in zip(draws, answers)]

    def extract_answer(self, response: str) -> Optional[str]:
        """The answer when the response is the draw (if any) followed by a strictly ascending list of positive
        integers joined by ',' (no leading zeros), else None."""
        parts = self.split_draw(response)
        return None if parts is None else self.parse_answer(parts[1])

    @staticmethod
    def parse_answer(text: str) -> Optional[str]:
        """`text` when it is a strictly ascending list of positive integers joined by ',' (no leading zeros)."""
        parts = text.split(",")
        if not all(p.isdigit() and p[0] != "0" for p in parts):
            return None
        values = [int(p) for p in parts]
        return ",".join(parts) if all(a < b for a, b in zip(values, values[1:])) else None

    def is_correct(self, response: str, problem: Problem) -> bool:
        return self.extract_answer(response) in problem.solutions
