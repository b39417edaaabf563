"""Multi-step arithmetic word problems in English, with a checkable integer answer: a task for real pretrained LLMs.

    "Maya has 12 marbles. She buys 7 more marbles. Then she gives away 5 marbles. How many marbles does Maya have now?"
    -> 14 (reference response: "12 + 7 = 19. 19 - 5 = 14. The answer is 14.")

A problem starts with a quantity and applies `steps` operations (additions, subtractions that never go below zero,
and with `operations="+-*"` multiplications by 2 or 3), each told in one of several phrasings, with names and items
drawn from short lists. The answer a response gives is the number after its last "answer is", else its last integer.
Problems come from seeded streams and the splits are disjoint by a hash of the text (bridge_ops.tasks.base).
"""

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .base import GeneratedTask, Problem

NAMES = (("Maya", "she"), ("Liam", "he"), ("Sofia", "she"), ("Omar", "he"), ("Ava", "she"), ("Noah", "he"))
OBJECT = {"she": "her", "he": "him"}
ITEMS = ("marbles", "apples", "stickers", "books", "coins", "pencils", "cards", "shells")
ADD = ("{Pronoun} buys {x} more {items}.", "{Pronoun} finds {x} more {items}.", "A friend gives {obj} {x} {items}.")
SUBTRACT = ("{Pronoun} gives away {x} {items}.", "{Pronoun} loses {x} {items}.", "{Pronoun} sells {x} {items}.")
MULTIPLY = {
    2: "Then {pronoun} doubles the number of {items} {pronoun} has.",
    3: "Then {pronoun} triples the number of {items} {pronoun} has.",
}
_INTEGER = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class WordProblemTask(GeneratedTask):
    """A start quantity in [2, max_operand], then `steps` operations drawn from `operations` ("+", "-", "*")."""

    steps: int = 2
    max_operand: int = 20
    operations: str = "+-"
    name: str = "word-problems"

    def __post_init__(self):
        if self.steps < 1 or self.max_operand < 2 or not set(self.operations) <= set("+-*") or not self.operations:
            raise ValueError(
                f"bridge_ops: WordProblemTask needs steps >= 1, max_operand >= 2 and operations from '+-*', got "
                f"steps={self.steps}, max_operand={self.max_operand}, operations={self.operations!r}"
            )

    def _story(self, rng: random.Random) -> Tuple[str, List[Tuple[str, int, int]]]:
        """(the problem text, the chain as (operator, operand, result) per step)."""
        name, pronoun = rng.choice(NAMES)
        items = rng.choice(ITEMS)
        value = rng.randint(2, self.max_operand)
        sentences, chain = [f"{name} has {value} {items}."], []
        for step in range(self.steps):
            op = rng.choice(self.operations)
            if op == "-" and value == 0:
                op = "+"
            if op == "*":
                x = rng.choice((2, 3))
                template, result = MULTIPLY[x], value * x
            elif op == "+":
                x = rng.randint(1, self.max_operand)
                template, result = rng.choice(ADD), value + x
            else:
                x = rng.randint(1, min(value, self.max_operand))
                template, result = rng.choice(SUBTRACT), value - x
            subject = name if step == 0 else pronoun.capitalize()
            sentence = template.format(Pronoun=subject, pronoun=pronoun, obj=OBJECT[pronoun], x=x, items=items)
            sentences.append(sentence if step == 0 or op == "*" else "Then " + sentence[0].lower() + sentence[1:])
            chain.append((op, x, result))
            value = result
        sentences.append(f"How many {items} does {name} have now?")
        return " ".join(sentences), chain

    def _random_problem(self, rng: random.Random) -> Problem:
        text, chain = self._story(rng)
        start = int(re.search(r"has (\d+)", text).group(1))
        steps, value = [], start
        for op, x, result in chain:
            steps.append(f"{value} {'x' if op == '*' else op} {x} = {result}.")
            value = result
        return Problem(text, str(value), (" ".join(steps) + f" The answer is {value}.",))

    def references(self, problem: Problem) -> List[str]:
        """The worked chain, one equation per step, then "The answer is N."."""
        return list(problem.solutions)

    def repair(self, response: str, problem: Problem) -> Optional[Tuple[str, int, bool]]:
        """The 'repair' warm-up row of a sampled response: (its own text up to its last "answer is", then the correct
        answer and "." ("... The answer is 14."), the length in characters of what follows "answer is" (" 14.",
        tokenized as the model writes it), whether its own answer was correct), or None when it never says "answer
        is" (no chain to keep). A row whose own answer was wrong keeps its chain and must take the answer from its
        peers."""
        at = response.lower().rfind("answer is")
        if at < 0:
            return None
        tail = f" {problem.answer}."
        return response[: at + len("answer is")] + tail, len(tail), self.is_correct(response, problem)

    @staticmethod
    def extract_answer(response: str) -> Optional[str]:
        """The integer after the last "answer is" (any case), else the last integer of the response; None if none."""
        tail = response.lower().rsplit("answer is", 1)
        numbers = _INTEGER.findall(tail[1] if len(tail) == 2 else response)
        candidates = numbers[:1] if len(tail) == 2 else numbers[-1:]
        if not candidates:
            return None
        text = candidates[0].replace(",", "").rstrip(",")
        return text if text.lstrip("-").isdigit() else None
