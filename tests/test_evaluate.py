"""pass@k against exact combinatorics, maj@k and accuracy by hand, and an end-to-end evaluation of the
tiny preset whose written records must reproduce its metrics."""

import json
import math
import random
from fractions import Fraction

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.evaluate import accuracy, evaluate, maj_at_k, pass_at_k, score_problems
from lite_selftrain.sampling import SamplingConfig
from lite_selftrain.tasks import Task, get_task


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k), in exact rational arithmetic."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_equals_the_exact_value_on_random_cases():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 200)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-12)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # 7 wrong samples cannot fill 8 slots
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # by hand: 1 - C(3,2)/C(4,2) = 1 - 3/6
    # C(5000, 2500) overflows a float; the product form does not
    assert pass_at_k(5000, 7, 2500) == pytest.approx(float(exact_pass_at_k(5000, 7, 2500)), rel=1e-12)
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_maj_at_k_by_hand():
    answers, rewards = ["4", "4", "5", None, "5", "5"], [1, 1, 0, 0, 0, 0]
    assert maj_at_k(answers, rewards, 1) == 1.0
    assert maj_at_k(answers, rewards, 4) == 1.0  # "4" twice, "5" once, None does not vote
    assert maj_at_k(answers, rewards, 5) == 0.5  # "4" and "5" tie: half credit
    assert maj_at_k(answers, rewards, 6) == 0.0  # "5" three times
    assert maj_at_k([None, None], [0, 0], 2) == 0.0
    assert maj_at_k(["7", "8", "9"], [0, 1, 0], 3) == pytest.approx(1 / 3)


def test_score_problems_by_hand():
    answers = [["1", "1", "2", "3"], ["x", None, "y", "y"]]
    rewards = [[1, 1, 0, 0], [0, 0, 1, 1]]
    metrics, records = score_problems(answers, rewards, [1, 2, 4, 8])  # k = 8 > n is dropped
    assert [r["correct"] for r in records] == [2, 2]
    assert metrics["accuracy"] == 0.5 == accuracy([1, 1, 0, 0, 0, 0, 1, 1])
    assert metrics["pass@1"] == 0.5
    assert metrics["pass@2"] == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6 for both problems
    assert metrics["pass@4"] == 1.0
    assert metrics["maj@1"] == 0.5  # "1" right; "x" wrong
    assert metrics["maj@2"] == 0.5  # problem 1: "1" twice; problem 2: only "x" voted
    assert metrics["maj@4"] == 1.0  # "1" (2 votes) and "y" (2 votes) win
    assert "pass@8" not in metrics and (metrics["problems"], metrics["n"]) == (2, 4)
    with pytest.raises(UserError):
        score_problems(answers, rewards, [5])
    with pytest.raises(ValueError):
        score_problems([["1"], ["1", "2"]], [[1], [1, 0]], [1])


class FirstByteTask(Task):
    """A task a random model solves about half the time: the first character's code point is even."""

    name = "first_byte"
    max_new_tokens = 4
    stop = ()

    def prompt(self, example):
        return example["question"]

    def extract_answer(self, text):
        return "even" if text and ord(text[0]) % 2 == 0 else ("odd" if text else None)

    def gold_answer(self, example):
        return "even"


@pytest.fixture(scope="module")
def tiny():
    from lite_selftrain.models import build_model, build_tokenizer

    tok = build_tokenizer()
    return build_model("tiny", vocab_size=len(tok)).eval(), tok


def test_evaluate_end_to_end_writes_records_that_reproduce_its_metrics(tiny, tmp_path):
    model, tok = tiny
    task = FirstByteTask()
    examples = [{"question": f"{i}+{i}="} for i in range(12)]
    metrics = evaluate(model, tok, task, examples, SamplingConfig(n=4, temperature=1.0, seed=1, batch_size=4),
                       ks=[1, 2, 4], out_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert len(records) == 12 and all(len(r["completions"]) == 4 for r in records)
    for r, ex in zip(records, examples):
        assert r["prompt"] == task.prompt(ex) and r["gold"] == "even"
        assert r["rewards"] == task.rewards(r["completions"], [ex] * 4)
        assert r["answers"] == [task.extract_answer(c) for c in r["completions"]]
    again, _ = score_problems([r["answers"] for r in records], [r["rewards"] for r in records], [1, 2, 4])
    assert {k: metrics[k] for k in again} == again
    assert 0 < metrics["accuracy"] < 1  # a real mix of right and wrong samples
    assert metrics["pass@1"] == pytest.approx(metrics["accuracy"])
    assert metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"]


def test_greedy_evaluation_pass_at_1_is_accuracy(tiny):
    model, tok = tiny
    task = FirstByteTask()
    examples = [{"question": f"{i}*{i}="} for i in range(10)]
    greedy = SamplingConfig(temperature=0.0, batch_size=5)
    metrics = evaluate(model, tok, task, examples, greedy)
    assert metrics["pass@1"] == metrics["accuracy"] == metrics["maj@1"]
    assert evaluate(model, tok, task, examples, greedy) == metrics  # deterministic


def test_evaluate_refuses_judge_tasks(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="judge"):
        evaluate(model, tok, get_task("instruct"), [{"prompt": "hi", "response": "hello"}], SamplingConfig())
