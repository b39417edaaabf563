"""Multi-step integer arithmetic with exact-match answers: a verifiable task generated from seeds.

A problem is a chain like `17+4-9+12=`; its answer the decimal result (`24`), followed by EOS. Problems come from
`numpy`-free seeded `random.Random` streams, so a (seed, split) pair always yields the same problems, and the train
and test splits are disjoint by construction (a problem's text decides its split through a hash).
"""

import functools
import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

ALPHABET = "0123456789+-="


@dataclass(frozen=True)
class Problem:
    prompt: str  # e.g. "17+4-9="
    answer: str  # e.g. "12"


@dataclass(frozen=True)
class ArithmeticTask:
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

    @staticmethod
    def split_of(problem: Problem) -> str:
        """'test' for about one problem in five, decided by the problem's text: the splits never share a problem."""
        digest = hashlib.sha256(problem.prompt.encode()).digest()
        return "test" if digest[0] < 52 else "train"

    @functools.lru_cache(maxsize=None)  # the task is frozen (hashable): counted once per task
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

    def problems(self, split: str, count: int, seed: int = 0) -> List[Problem]:
        """`count` distinct problems of `split` ('train' or 'test'), the same for the same seed."""
        if split not in ("train", "test"):
            raise ValueError(f"bridge_ops: split must be 'train' or 'test', got {split!r}")
        available = (self.split_sizes() or {}).get(split)
        if available is not None and count > available:
            raise ValueError(f"bridge_ops: the {split} split of {self} has {available} distinct problems, fewer "
                             f"than the {count} asked for")
        rng, seen, out = random.Random(f"{self.name}-{split}-{seed}"), set(), []
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 200 * count + 1000:
                raise ValueError(f"bridge_ops: the {split} split of {self} has fewer than {count} distinct problems")
            problem = self._random_problem(rng)
            if problem.prompt not in seen and self.split_of(problem) == split:
                seen.add(problem.prompt)
                out.append(problem)
        return out

    @staticmethod
    def extract_answer(response: str) -> Optional[str]:
        """The answer a response gives: its text up to EOS without spaces, if it is an integer; else None."""
        text = response.strip()
        if text.startswith("-"):
            return text if text[1:].isdigit() else None
        return text if text.isdigit() else None

    def reward(self, response: str, problem: Problem) -> float:
        """1.0 for an exactly correct answer, else 0.0."""
        return float(self.extract_answer(response) == problem.answer)


def corpus(problems: Sequence[Problem]) -> List[str]:
    """Training texts `prompt + answer` (the tokenizer adds BOS; the trainer appends EOS)."""
    return [p.prompt + p.answer for p in problems]
