"""The argparse types of the `bridge-ops` commands (bridge_ops.cli and bridge_ops.train.commands), and the errors that
a command reports as one line instead of a traceback."""

import argparse
import math
from typing import List

# what a user's input or files can cause: one line, exit status 2 (anything else is a bug: a traceback)
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def _finite_float(minimum: float, strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {text}"
            )
        return value

    return parse


positive_float, non_negative_float = _finite_float(0, strict=True), _finite_float(0, strict=False)


def int_list(text: str) -> List[int]:
    """'1,2,4' -> [1, 2, 4], every entry >= 1."""
    return [positive_int(part) for part in text.split(",")]
