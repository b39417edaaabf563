"""Running sums on a scratchpad: a task whose responses are aligned chains, built for interdependent generation.

    prompt   37+85+12+64=
    response 122,134,198>198

The response writes every running sum (zero-padded to one width), then `>` and the answer. Every step has the same
number of characters, so position s of every sample of a problem holds the same step: at each position the N
samples of a group are doing the same sub-computation, which is what Bridge (sharing only the current position)
needs to compare them. The answer is the last running sum written again, so a sample whose own chain went wrong can
still answer correctly by reading its peers' chains: `repair` makes that warm-up data.

`slip_rate > 0` puts slips into the references a base model is pretrained on: each running sum is, with that
probability, off by 1-3 and the chain continues from the wrong value (the answer repeats the last, wrong, sum). A
base trained on them makes slips of its own when sampled: independent errors of the kind majority voting (and
consensus between peers) can fix. A base that is merely undertrained errs systematically (its samples of a problem
tend to share one wrong chain), which no vote can fix.

`max_filler > 0` is the ablation that breaks the alignment: before each running sum, 0..max_filler filler characters
`.` of a length drawn per problem (in references) or by the model (in samples), so the same position holds different
steps in different samples.
"""

import functools
import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .base import GeneratedTask, Problem

FILLER = "."


@dataclass(frozen=True)
class ScratchpadSumTask(GeneratedTask):
    """Sums of `terms` operands in [min_operand, max_operand], answered through their running sums."""

    terms: int = 4
    min_operand: int = 10
    max_operand: int = 99
    max_filler: int = 0
    slip_rate: float = 0.0
    name: str = "scratchpad-sum"

    alphabet = "0123456789+=,>" + FILLER

    def __post_init__(self):
        if (
            self.terms < 2
            or not 0 <= self.min_operand <= self.max_operand
            or self.max_filler < 0
            or not 0.0 <= self.slip_rate < 1.0
        ):
            raise ValueError(f"bridge_ops: invalid ScratchpadSumTask settings: {self}")

    @property
    def digits(self) -> int:
        """The width every running sum is zero-padded to."""
        return len(str(self.terms * self.max_operand))

    def running_sums(self, problem: Problem) -> List[int]:
        operands = [int(x) for x in problem.prompt.rstrip("=").split("+")]
        sums, total = [], operands[0]
        for x in operands[1:]:
            total += x
            sums.append(total)
        return sums

    def _random_problem(self, rng: random.Random) -> Problem:
        operands = [rng.randint(self.min_operand, self.max_operand) for _ in range(self.terms)]
        return Problem(self.prompt_of(operands), f"{sum(operands):0{self.digits}d}")

    @staticmethod
    def prompt_of(operands: Sequence[int]) -> str:
        return "+".join(map(str, operands)) + "="

    @functools.cache  # noqa: B019 (the task is frozen and hashable, and tasks are few: counted once per task)
    def split_sizes(self) -> Optional[Dict[str, int]]:
        """How many distinct problems each split holds, counted when there are at most a million in all (else None)."""
        operands = range(self.min_operand, self.max_operand + 1)
        if len(operands) ** self.terms > 10**6:
            return None
        sizes = {"train": 0, "test": 0}
        for chosen in itertools.product(operands, repeat=self.terms):
            sizes[self.split_of(Problem(self.prompt_of(chosen), ""))] += 1
        return sizes

    def chain(self, problem: Problem, filler: Tuple[int, ...] = (), sums: Optional[List[int]] = None) -> str:
        """The running sums (default the correct ones) joined by ',' with filler[i] filler characters before sum i."""
        filler = filler or (0,) * (self.terms - 1)
        sums = self.running_sums(problem) if sums is None else sums
        return ",".join(FILLER * f + f"{s:0{self.digits}d}" for f, s in zip(filler, sums))

    def references(self, problem: Problem) -> List[str]:
        """The pretraining response: the correct chain, or with `slip_rate` a chain with slips; filler lengths and
        slips are drawn from a hash of the prompt (fixed per problem)."""
        rng = random.Random(hashlib.sha256(problem.prompt.encode()).digest())
        filler = tuple(rng.randint(0, self.max_filler) for _ in range(self.terms - 1)) if self.max_filler else ()
        operands = [int(x) for x in problem.prompt.rstrip("=").split("+")]
        sums, total, largest = [], operands[0], 10**self.digits - 1
        for x in operands[1:]:
            total += x
            if self.slip_rate and rng.random() < self.slip_rate:
                total = min(largest, max(0, total + rng.choice((-3, -2, -1, 1, 2, 3))))
            sums.append(total)
        return [self.chain(problem, filler, sums) + ">" + f"{sums[-1]:0{self.digits}d}"]

    def extract_answer(self, response: str) -> Optional[str]:
        """The text after the last `>` when it is a number of `digits` digits, else None."""
        if ">" not in response:
            return None
        answer = response.rsplit(">", 1)[1].strip()
        return answer if len(answer) == self.digits and answer.isdigit() else None

    def chain_is_correct(self, response: str, problem: Problem) -> bool:
        """Whether the running sums before `>` (filler ignored) are exactly the correct ones."""
        if ">" not in response:
            return False
        return response.split(">", 1)[0].replace(FILLER, "") == self.chain(problem)

    def repair(self, response: str, problem: Problem) -> Optional[Tuple[str, int, bool]]:
        """(the response with its own chain and the correct answer, the answer's length in characters, whether the
        chain itself is correct), or None when the response has no `>` (no chain to keep)."""
        if ">" not in response:
            return None
        chain = response.split(">", 1)[0]
        return chain + ">" + problem.answer, len(problem.answer), self.chain_is_correct(response, problem)
