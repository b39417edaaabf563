"""The generated arithmetic task: seeded, disjoint splits, exact-match rewards; its token-id view for trainers."""

import pytest

from bridge_ops.charlm import char_tokenizer
from bridge_ops.tasks import ArithmeticTask, Problem, get_task
from bridge_ops.train import task_data


def test_problems_are_seeded_distinct_correct_and_splits_disjoint():
    task = ArithmeticTask(max_operand=9)
    train, again = task.problems("train", 500, seed=0), task.problems("train", 500, seed=0)
    assert train == again and train != task.problems("train", 500, seed=1)
    test = task.problems("test", 200, seed=0)
    assert len({p.prompt for p in train}) == 500
    assert not {p.prompt for p in train} & {p.prompt for p in task.problems("test", 800, seed=3)}
    for p in train + test:
        assert p.prompt.endswith("=") and eval(p.prompt[:-1]) == int(p.answer)  # noqa: S307 (digits and +- only)
        assert 2 <= p.prompt.count("+") + p.prompt.count("-") + 1 <= 3


def test_reward_and_answer_extraction():
    task, problem = ArithmeticTask(), Problem("3-5=", "-2")
    assert task.reward("-2", problem) == 1.0 and task.reward(" -2 ", problem) == 1.0
    assert task.reward("2", problem) == 0.0 and task.reward("-2x", problem) == 0.0 and task.reward("", problem) == 0.0
    assert task.extract_answer("17") == "17" and task.extract_answer("1-") is None and task.extract_answer("-") is None


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().problems("valid", 3)
    with pytest.raises(ValueError, match="fewer than"):
        ArithmeticTask(max_terms=2, max_operand=1).problems("train", 50)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sudoku")


def test_task_data_rewards_need_eos():
    task = ArithmeticTask(max_operand=9)
    tok = char_tokenizer(task.alphabet)
    data = task_data(task, tok, "test", 4)
    problem = data.problems[0]
    assert data.prompts[0] == tok(problem.prompt)["input_ids"] and data.prompts[0][0] == tok.bos_token_id
    answer = tok(problem.answer, add_special_tokens=False)["input_ids"]
    assert data.reward(0, answer + [tok.eos_token_id]) == 1.0
    assert data.reward(0, answer) == 0.0  # cut off before EOS: not an answer
    assert data.extract_answer(answer + [tok.eos_token_id]) == problem.answer
    prompt, [target] = data.reference_groups()[0]
    assert prompt == data.prompts[0] and target == answer + [tok.eos_token_id]
