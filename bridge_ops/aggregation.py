"""Post-hoc aggregation of a group's N responses: majority vote over extracted answers, and best-of-N."""

from collections import Counter
from typing import Callable, Hashable, Iterable, Optional, Sequence, TypeVar

T = TypeVar("T")


def majority_vote(answers: Iterable[Optional[Hashable]]) -> Optional[Hashable]:
    """The most frequent answer; None answers (nothing extracted) do not vote; ties go to the earliest answer.
    Returns None when no answer was extracted at all."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in counts if counts[a] == best)  # Counter keeps first-seen order


def best_of_n(candidates: Sequence[T], score: Callable[[T], float]) -> T:
    """The candidate with the highest score (the first one on ties)."""
    if not candidates:
        raise ValueError("bridge_ops: best_of_n needs at least one candidate")
    return max(candidates, key=score)
