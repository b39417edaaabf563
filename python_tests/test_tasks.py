"""The generated arithmetic task: seeded, disjoint splits, exact-match rewards; its token-id view for trainers."""

import itertools

import pytest

from bridge_ops.charlm import char_tokenizer
from bridge_ops.tasks import ArithmeticTask, Problem, ScratchpadSumTask, SubsetSumTask, get_task
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


def test_scratchpad_chain_is_aligned_and_answer_is_the_last_sum():
    task = ScratchpadSumTask()
    problem = Problem("37+85+12+64=", "198")
    assert task.references(problem) == ["122,134,198>198"]
    assert task.running_sums(problem) == [122, 134, 198]
    problems = task.problems("train", 300, seed=0)
    lengths = {len(task.references(p)[0]) for p in problems}
    assert lengths == {len("122,134,198>198")}  # every step at the same position in every response
    for p in problems:
        assert int(p.answer) == sum(int(x) for x in p.prompt[:-1].split("+"))
        assert task.reward(task.references(p)[0], p) == 1.0 and task.chain_is_correct(task.references(p)[0], p)
    assert task.reward("122,134,198>199", problem) == 0.0 and task.extract_answer("122,134,198") is None
    assert task.extract_answer("1,2>98") is None  # not zero-padded to the sum width


def test_scratchpad_repair_keeps_the_chain_and_fixes_the_answer():
    task, problem = ScratchpadSumTask(), Problem("37+85+12+64=", "198")
    assert task.repair("122,134,198>198", problem) == ("122,134,198>198", 3, True)
    assert task.repair("122,135,199>199", problem) == ("122,135,199>198", 3, False)
    assert task.repair("122,135", problem) is None  # no answer marker: nothing to repair


def test_scratchpad_filler_misaligns_and_is_ignored_by_the_checks():
    task = ScratchpadSumTask(max_filler=2)
    problems = task.problems("train", 200, seed=0)
    assert len({len(task.references(p)[0]) for p in problems}) > 1
    problem = Problem("37+85+12+64=", "198")
    assert task.chain_is_correct("..122,134,.198>198", problem) and task.reward(".122,134,198>198", problem) == 1.0
    with pytest.raises(ValueError, match="invalid"):
        ScratchpadSumTask(terms=1)


def test_subset_sum_enumerates_every_solution():
    assert SubsetSumTask.solutions_of([1, 4, 5, 7, 11, 12], 23) == ["1,4,7,11", "11,12", "4,7,12", "5,7,11"]
    task = SubsetSumTask()
    problems = task.problems("train", 300, seed=0)
    for p in problems:
        numbers = [int(x) for x in p.prompt.split(":")[0].split(",")]
        target = int(p.prompt.split(":")[1].rstrip("="))
        brute = {
            ",".join(map(str, c)) for r in range(1, 7) for c in itertools.combinations(numbers, r) if sum(c) == target
        }
        assert set(p.solutions) == brute and len(brute) >= task.min_solutions and p.answer in brute
        assert all(task.reward(s, p) == 1.0 for s in p.solutions)
    test = task.problems("test", 300, seed=0)
    assert not {p.prompt for p in problems} & {p.prompt for p in test}


def test_subset_sum_rewards_only_ascending_valid_subsets():
    task = SubsetSumTask()
    problem = task.problems("test", 1, seed=0)[0]
    first = problem.solutions[0].split(",")
    assert task.reward(problem.solutions[0], problem) == 1.0
    if len(first) > 1:
        assert task.reward(",".join(reversed(first)), problem) == 0.0  # not ascending
    assert all(task.extract_answer(text) is None for text in ("3,3", "03,5", ""))
    assert task.reward("1,2,3,4,5,6,7", problem) == 0.0


def test_subset_sum_draws_prefix_every_reference_and_are_stripped_from_the_answer():
    task = SubsetSumTask(draw_length=2)
    assert set(task.alphabet) == set("0123456789,:=" + task.draw_letters) and "a" not in SubsetSumTask().alphabet
    problems = task.problems("train", 300, seed=0)
    draws = []
    for p in problems:
        for reference, solution in zip(task.references(p), p.solutions):
            assert reference[2:] == solution and task.split_draw(reference) == (reference[:2], solution)
            assert task.reward(reference, p) == 1.0 and task.extract_answer(reference) == solution
            draws.append(reference[:2])
    assert task.references(problems[0]) == task.references(problems[0])  # seeded by the problem
    counts = [sum(d[0] == c for d in draws) for c in task.draw_letters]
    assert min(counts) > 0.5 * len(draws) / 16 and max(counts) < 1.5 * len(draws) / 16  # about uniform
    p = problems[0]
    assert task.reward(p.solutions[0], p) == 0.0  # no draw: not an answer of this format
    assert task.extract_answer("z1" + p.solutions[0]) is None and task.extract_answer("ab") is None
    with pytest.raises(ValueError, match="draw_length"):
        SubsetSumTask(draw_length=-1)


def test_subset_sum_rank_pairs_sorted_draws_with_sorted_answers():
    task = SubsetSumTask(draw_length=2)
    # answers sort as text ("11,12" < "2,5,14" < "7,14"); a repeated draw or answer is one row; bad rows dropped
    ranked = task.rank(["kc7,14", "ab11,12", "kd7,14", "pa2,5,14", "zz1", "kc2,5,14", "bb5,3"])
    assert ranked == ["ab11,12", "kc2,5,14", "kd7,14"]
    assert task.rank(["ab7,14", "ac7,14"]) == ["ab7,14"]  # one answer: one row
    with pytest.raises(ValueError, match="draw_length"):
        SubsetSumTask().rank(["7,14"])


def test_task_data_rank_encodes_the_ranked_group_and_names_tasks_without_draws():
    task = SubsetSumTask(draw_length=2)
    tok = char_tokenizer(task.alphabet)
    data = task_data(task, tok, "test", 2)
    rows = [data.encode(text) for text in ("kc7,14", "ab11,12")]
    assert [data.text(r) for r in data.rank(0, rows)] == ["ab11,12", "kc7,14"]
    plain = task_data(ArithmeticTask(max_operand=9), char_tokenizer(ArithmeticTask.alphabet), "test", 2)
    with pytest.raises(ValueError, match="ranked warm-up needs a task with draws"):
        plain.rank(0, rows)


def test_word_problems_are_seeded_correct_and_parse_answers():
    from bridge_ops.tasks import WordProblemTask

    task = WordProblemTask(steps=3, operations="+-*")
    train = task.problems("train", 300, seed=0)
    assert train == task.problems("train", 300, seed=0) and train != task.problems("train", 300, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in task.problems("test", 300, seed=0)}
    for problem in train:
        (reference,) = task.references(problem)
        assert problem.prompt.endswith("have now?") and task.reward(reference, problem) == 1.0
        value = None  # the chain is worked out step by step and reaches the answer
        for equation in reference.split(". ")[:-1]:
            left, result = equation.rstrip(".").split(" = ")
            a, op, b = left.split(" ")
            assert value is None or int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
            assert value == int(result) and value >= 0
        assert str(value) == problem.answer
        assert problem.prompt.count(". ") == 1 + task.steps  # the start, then one sentence per step
    assert {"x" in task.references(p)[0] for p in train} == {True, False}
    extract = task.extract_answer
    assert extract("12 + 7 = 19. 19 - 5 = 14. The answer is 14.") == "14"
    assert extract("The answer is: 1,234 apples, not 12.") == "1234" and extract("She has 9 now, then 10") == "10"
    assert extract("I do not know.") is None and extract("The answer is unknown, 5") == "5"
    with pytest.raises(ValueError, match="operations"):
        WordProblemTask(operations="+/")


def test_word_problem_repair_keeps_the_chain_and_writes_the_correct_answer():
    from bridge_ops.tasks import WordProblemTask

    task = WordProblemTask(steps=2)
    problem = task.problems("train", 1, seed=0)[0]
    (reference,) = task.references(problem)
    assert task.repair(reference, problem) == (reference, len(f" {problem.answer}."), True)
    wrong = "1 + 1 = 3. The Answer is 3, I think."
    fixed, tail, own_ok = task.repair(wrong, problem)
    assert fixed == f"1 + 1 = 3. The Answer is {problem.answer}." and fixed[-tail:] == f" {problem.answer}."
    assert not own_ok and task.reward(fixed, problem) == 1.0
    assert task.repair("1 + 1 = 2.", problem) is None  # no "answer is": no chain to keep


@pytest.mark.parametrize(
    "task, count, message",
    [
        (SubsetSumTask(min_solutions=100), 1, "has 0 distinct problems, fewer than the 1 asked for"),
        (SubsetSumTask(draw_length=2), 1_000_000, "has 74641 distinct problems, fewer than the 1000000"),
        (ScratchpadSumTask(min_operand=1, max_operand=9), 1_000_000, "has 5185 distinct problems, fewer than"),
        (SubsetSumTask(numbers=6, max_number=40, min_solutions=10**6), 2, "has fewer than 2 distinct problems"),
    ],
    ids=["subset-sum without problems", "subset-sum", "scratchpad-sum", "subset-sum too large to count"],
)
def test_asking_for_more_problems_than_exist_fails_at_once(task, count, message):
    """Counted where the task can count them; a bounded number of draws where it cannot (a draw whose target has too
    few solutions counts as one, instead of drawing forever)."""
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        task.problems("train", count)
    assert time.perf_counter() - start < 20


def test_subset_sum_problems_are_those_of_before_the_counting():
    """Rejected draws moved from `_random_problem` to `problems`: the same random stream, the same problems."""
    assert [p.prompt for p in SubsetSumTask(draw_length=2).problems("train", 5)] == [
        "1,4,5,7,11,12:23=",
        "1,3,5,8,14,15:26=",
        "2,3,4,6,8,15:28=",
        "1,5,8,9,11,13:19=",
        "2,4,7,9,13,15:39=",
    ]
    assert [p.prompt for p in SubsetSumTask(min_solutions=3).problems("test", 5, seed=4)] == [
        "1,3,4,7,8,13:8=",
        "6,8,9,12,13,15:36=",
        "1,6,7,9,10,14:17=",
        "3,7,8,9,11,15:18=",
        "2,4,6,10,11,12:18=",
    ]


@pytest.mark.guarantee
def test_arithmetic_task_refuses_more_problems_than_exist_at_once():
    import time

    from bridge_ops.tasks import ArithmeticTask

    start = time.perf_counter()
    with pytest.raises(ValueError, match="train split of .* has 3321 distinct problems, fewer than the 100000"):
        ArithmeticTask(max_operand=9).problems("train", 100_000)
    assert time.perf_counter() - start < 5
