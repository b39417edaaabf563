"""Multi-step integer arithmetic with exact-match answers: a verifiable task generated from seeds.

A problem is a chain like `17+4-9+12=`; its answer the decimal result (`24`), followed by EOS. Problems come from
seeded `random.Random` streams, so a (seed, split) pair always yields the same problems, and the train and test
splits are disjoint by construction (a problem's text decides its split through a hash).
"""

import random
from dataclasses import dataclass
from typing import List, Optional

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

    @staticmethod
    def extract_answer(response: str) -> Optional[str]:
        """The answer a response gives: its text up to EOS without spaces, if it is an integer; else None."""
        text = response.strip()
        if text.startswith("-"):
            return text if text[1:].isdigit() else None
        return text if text.isdigit() else None

