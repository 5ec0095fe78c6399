"""The arith task: gold solutions score 1, wrong or missing answers 0, splits are disjoint and deterministic."""

import json

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.tasks.arith import ArithTask, solve


@pytest.mark.parametrize("style", ["sums", "steps"])
def test_solution_answers_are_extracted_and_rewarded(style):
    task = ArithTask(terms=(2, 5), digits=2, style=style, seed=3)
    examples = task.load("train", n=200) + task.load("test", n=100)
    for ex in examples:
        gold = task.solution(ex)
        assert task.extract_answer(gold) == task.gold_answer(ex) == str(sum(ex["numbers"]))
        assert task.reward(gold, ex) == 1.0
        assert len(gold) + 1 <= task.max_new_tokens  # the solution and an end token always fit


def test_worked_solution_by_hand():
    assert solve([3, 5, 2, 8]) == "8,10,18#18"
    assert solve([3, 5, 2, 8], "steps") == "3+5=8,8+2=10,10+8=18#18"
    assert solve([12, 30], "steps") == "12+30=42#42"


def test_wrong_missing_and_malformed_answers_score_zero():
    task = ArithTask(terms=3)
    ex = task.make([3, 5, 2])
    assert task.reward("8,10#10", ex) == 1.0
    assert task.reward("8,10", ex) == 0.0  # no answer marker
    assert task.reward("8,11#11", ex) == 0.0
    assert task.reward("", ex) == 0.0
    assert task.reward("#", ex) == 0.0
    assert task.reward("8,10#100", ex) == 0.0  # a longer number is not a prefix match
    assert task.reward("#7,#10", ex) == 1.0  # the last marker counts
    assert task.reward("8,12#12\n#10", ex) == 0.0  # text after the first line is ignored
    assert task.rewards(["#10", "#9"], [ex, ex]) == [1.0, 0.0]
    assert task.extract_answer("no number here") is None


def test_determinism_per_seed_and_fresh_draws():
    a, b = ArithTask(terms=4, seed=1), ArithTask(terms=4, seed=1)
    assert a.load("train", n=50) == b.load("train", n=50)
    assert a.load("test", n=50) == b.load("test", n=50)
    assert a.load("train", n=50) != ArithTask(terms=4, seed=2).load("train", n=50)
    assert a.load("train", n=50, seed=7) != a.load("train", n=50)  # a fresh draw per iteration


def test_splits_are_disjoint():
    task = ArithTask(terms=3, seed=0)
    train = {ex["question"] for ex in task.load("train", n=2000)}
    test = {ex["question"] for ex in task.load("test", n=300)}
    other_seed = {ex["question"] for ex in ArithTask(terms=3, seed=5).load("train", n=2000)}
    assert train and test and not train & test and not other_seed & test


def test_difficulty_knob():
    task = ArithTask(terms=(2, 3), digits=1)
    counts = {len(ex["numbers"]) for ex in task.load("train", n=300)}
    assert counts == {2, 3}
    longer = task.load("test", n=50, terms=5)
    assert all(len(ex["numbers"]) == 5 for ex in longer)
    assert all(max(ex["numbers"]) < 10 for ex in longer)
    wide = ArithTask(terms=2, digits=3).load("train", n=200)
    assert max(max(ex["numbers"]) for ex in wide) >= 100
    # max_new_tokens grows with the difficulty and is derived from the longest possible reference
    short, long = ArithTask(terms=3), ArithTask(terms=6)
    assert short.max_new_tokens < long.max_new_tokens
    assert long.max_new_tokens == len(solve([9] * 6)) + 2


def test_prompt_with_shots():
    task = ArithTask(terms=3)
    ex = task.make([1, 2, 3])
    assert task.prompt(ex) == "1+2+3="
    lines = ArithTask(terms=3, shots=2).prompt(ex).split("\n")
    assert len(lines) == 3 and lines[-1] == "1+2+3="
    for line in lines[:2]:
        question, _, solution = line.partition("=")
        assert task.reward(solution, task.make([int(x) for x in question.split("+")])) == 1.0


def test_local_jsonl_and_bad_input(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"numbers": [4, 4, 1]}) + "\n" + json.dumps({"question": "7+8="}) + "\n")
    task = ArithTask()
    recs = task.load("test", path=path)
    assert [r["answer"] for r in recs] == ["9", "15"]
    path.write_text(json.dumps({"question": "seven"}) + "\n")
    with pytest.raises(UserError):
        task.load("test", path=path)
    with pytest.raises(UserError):
        task.load("dev")
    with pytest.raises(UserError):
        ArithTask(terms=1)
    with pytest.raises(UserError):
        ArithTask(style="words")
