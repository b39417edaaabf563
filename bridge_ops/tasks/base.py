"""What every generated task shares: problems drawn from seeded streams, and train/test splits disjoint by construction.

A task is a frozen dataclass that draws one random problem from a `random.Random` (`_random_problem`) and scores
response texts (`reward`, `extract_answer`). `problems(split, count, seed)` returns `count` distinct problems of one
split; a problem's split is decided by a hash of its prompt, so the two splits never share a problem and a
(seed, split) pair always yields the same list. Asking for more problems than a split holds fails at once where the
task counts them (`split_sizes`), and after a bounded number of draws otherwise.
"""

import hashlib
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Problem:
    """prompt: e.g. "17+4-9="; answer: the reference answer (what a correct response votes for); solutions: every
    correct response text (without EOS) when the task enumerates them (several for multi-answer tasks), else ()."""

    prompt: str
    answer: str
    solutions: Tuple[str, ...] = ()


TEST_SHARE = 52 / 256  # about one problem in five is a test problem


class GeneratedTask:
    """Base of the generated tasks: seeded problem lists and hash-decided splits (subclasses are frozen dataclasses
    with a `name` and implement `_random_problem`, `references`, `extract_answer` and `reward`)."""

    name = "task"

    def _random_problem(self, rng: random.Random) -> Optional[Problem]:
        """One random problem, or None when the draw is not one the task allows (`problems` draws again, counting
        it: a task whose settings allow no problem fails instead of looping forever)."""
        raise NotImplementedError

    @staticmethod
    def split_of(problem: Problem) -> str:
        """'test' for about one problem in five, decided by the problem's text: the splits never share a problem."""
        digest = hashlib.sha256(problem.prompt.encode()).digest()
        return "test" if digest[0] < TEST_SHARE * 256 else "train"

    def split_sizes(self) -> Optional[Dict[str, int]]:
        """How many distinct problems each split holds, where the task can count them cheaply (else None)."""
        return None

    def problems(self, split: str, count: int, seed: int = 0) -> List[Problem]:
        """`count` distinct problems of `split` ('train' or 'test'), the same for the same seed."""
        if split not in ("train", "test"):
            raise ValueError(f"bridge_ops: split must be 'train' or 'test', got {split!r}")
        available = (self.split_sizes() or {}).get(split)
        if available is not None and count > available:
            raise ValueError(
                f"bridge_ops: the {split} split of {self} has {available} distinct problems, fewer "
                f"than the {count} asked for"
            )
        rng, seen, out = random.Random(f"{self.name}-{split}-{seed}"), set(), []
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 200 * count + 1000:
                raise ValueError(f"bridge_ops: the {split} split of {self} has fewer than {count} distinct problems")
            problem = self._random_problem(rng)
            if problem is not None and problem.prompt not in seen and self.split_of(problem) == split:
                seen.add(problem.prompt)
                out.append(problem)
        return out

    def references(self, problem: Problem) -> List[str]:
        """The responses (texts without EOS) a base model is pretrained on for `problem`."""
        raise NotImplementedError

    def extract_answer(self, response: str) -> Optional[str]:
        raise NotImplementedError

    def reward(self, response: str, problem: Problem) -> float:
        """1.0 for a correct response, else 0.0."""
        return float(self.extract_answer(response) is not None and self.is_correct(response, problem))

    def is_correct(self, response: str, problem: Problem) -> bool:
        return self.extract_answer(response) == problem.answer
