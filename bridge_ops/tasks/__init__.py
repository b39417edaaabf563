"""Verifiable tasks generated from seeds (nothing is downloaded)."""

from .arithmetic import ArithmeticTask, Problem

TASKS = {"arithmetic": ArithmeticTask}


def get_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"bridge_ops: unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["ArithmeticTask", "Problem", "TASKS", "get_task"]
