"""Multi-step integer arithmetic with exact-match answers: a verifiable task generated from seeds.

A problem is a chain like `17+4-9+12=`; its answer the decimal result (`24`), followed by EOS. Problems come from
seeded `random.Random` streams, so a (seed, split) pair always yields the same problems, and the train and test
splits are disjoint by construction (a problem's text decides its split through a hash).
"""

import functools
import itertools
import random
from dataclasses import dataclass
from typing import Dict, List, Optional

from .base import GeneratedTask, Problem

ALPHABET = "0123456789+-="


@dataclass(frozen=True)
class ArithmeticTask(GeneratedTask):
    """Chains of `min_terms`..`max_terms` operands in [0, max_operand] joined by + or -."""

    min_terms: int = 2
    max_terms: int = 3
    max_operand: int = 19
    name: str = "arithmetic"

    alphabet = ALPHABET

    def _random_problem(self, rng: random.Random) -> Problem:
        terms = [rng.randint(0, self.max_operand) for _ in range(rng.randint(self.min_terms, self.max_terms))]
        ops = [rng.choice("+-") for _ in terms[1:]]
        value, text = terms[0], str(terms[0])
        for op, term in zip(ops, terms[1:]):
            value = value + term if op == "+" else value - term
            text += f"{op}{term}"
        return Problem(text + "=", str(value))

    def references(self, problem: Problem) -> List[str]:
        return [problem.answer]

    @functools.cache  # noqa: B019 (the task is frozen and hashable, and tasks are few: counted once per task)
    def split_sizes(self) -> Optional[Dict[str, int]]:
        """How many distinct problems each split holds, counted when there are at most a million in all (else None)."""
        shapes = range(self.min_terms, self.max_terms + 1)
        if sum((self.max_operand + 1) ** t * 2 ** (t - 1) for t in shapes) > 10**6:
            return None
        sizes = {"train": 0, "test": 0}
        for terms in shapes:
            for operands in itertools.product(range(self.max_operand + 1), repeat=terms):
                for ops in itertools.product("+-", repeat=terms - 1):
                    text = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:])) + "="
                    sizes[self.split_of(Problem(text, ""))] += 1
        return sizes

    @staticmethod
    def extract_answer(response: str) -> Optional[str]:
        """The answer a response gives: its text up to EOS without spaces, if it is an integer; else None."""
        text = response.strip()
        if text.startswith("-"):
            return text if text[1:].isdigit() else None
        return text if text.isdigit() else None
