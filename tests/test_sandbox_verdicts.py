"""Verdicts from program data are exact and cannot be made to crash or stall the judge.

Integers, bools, strings and containers of them compare exactly, with a tolerance only where a float is
involved; a result beyond every float is simply unequal; a values line built to make decoding quadratic
(a set of integers that all hash alike) is given up at a deadline; and an error while judging one
sample scores that sample 0 with the reason in its record, the rest of the batch scored as usual.
"""

import json

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.tasks.apps import AppsTask
from lite_selftrain.tasks.humaneval import HumanEvalTask, same_value
from lite_selftrain.tasks.sandbox_values import values

LIMITS = dict(timeout=3.0, cpu_seconds=1, memory_mb=256, max_processes=8, max_output_bytes=1 << 16, workers=2)
TIMES = {"task_id": "t/0", "prompt": "def f(x):\n", "canonical_solution": "    return x * 1000003\n",
         "test": "def check(candidate):\n    assert candidate(7) == 7000021\n    assert candidate(10) == 10000030\n",
         "entry_point": "f"}
THIRD = {"task_id": "t/1", "prompt": "def g(x):\n", "canonical_solution": "    return x / 3\n",
         "test": "def check(candidate):\n    assert abs(candidate(1.0) - 1 / 3) < 1e-6\n", "entry_point": "g"}
COLLIDING = [i * ((1 << 61) - 1) for i in range(42_000)]  # every one hashes to 0


@pytest.fixture(scope="module")
def humaneval():
    task = HumanEvalTask(sandbox=LIMITS)
    try:
        assert task.sandbox.isolation.startswith("isolated")
    except UserError as e:
        pytest.skip(f"no OS isolation on this machine: {e}")
    return task


def test_same_value_is_exact_but_where_a_float_is_involved():
    assert not same_value(7000022, 7000021) and same_value(7000021, 7000021)
    assert not same_value(10**400, 1.5) and not same_value(1.5, 10**400) and not same_value(10**400, 10**400 + 1)
    assert same_value(7000021.0, 7000021) and same_value([1, 0.30000000000000004], [1, 0.3])
    assert not same_value(True, 1) and not same_value([1, "a"], [1, "b"]) and not same_value((1,), [1])
    assert same_value({1: 2.0000000001}, {1: 2.0}) and not same_value({1: 2}, {1: 2, 3: 4})


def test_integer_results_score_exactly_and_huge_ones_do_not_abort_the_batch(humaneval):
    completions = ["    return x * 1000003 + 1\n", "    return 10 ** 400\n", "    return x * 1000003\n",
                   "    return float(x * 1000003)\n", "    return x / 3 + 1e-9\n", "    return 10 ** 400\n"]
    examples = [TIMES] * 4 + [THIRD] * 2
    assert humaneval.rewards(completions, examples) == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_colliding_hashes_are_given_up_at_a_deadline():
    line = json.dumps({"set": COLLIDING}).encode() + b"\n"
    assert values(line) == []  # decoding would take the parent many seconds of CPU
    assert values(b'[1, {"set": [2, 3]}]\n{"dict": [[1, 2]]}\n[cut') == [[1, {2, 3}], {1: 2}]


def test_a_program_writing_colliding_values_itself_scores_zero():
    apps = AppsTask(sandbox=dict(LIMITS, max_output_bytes=1 << 21))
    line = json.dumps({"set": COLLIDING[:1000]})[:-2]  # the program writes the rest itself
    writer = ("import os\nline = " + repr(line) + " + ''.join(',%d' % (i * ((1 << 61) - 1)) for i in "
              "range(1000, 42000)) + ']}\\n'\nfor fd in range(3, 1024):\n    try:\n"
              "        os.write(fd, line.encode())\n    except OSError:\n        pass\ndef f(x):\n    return x + 1\n")
    call = {"question": "q", "input_output": {"fn_name": "f", "inputs": [[1]], "outputs": [[2]]}}
    scored, _ = apps.score_samples([{"prompt_index": 0, "text": writer}], [call])
    assert scored[0]["reward"] == 0.0 and "reward_error" not in scored[0]


def test_an_error_judging_one_sample_scores_it_zero_with_a_reason():
    apps = AppsTask(sandbox=LIMITS)
    good = {"question": "q", "input_output": {"fn_name": "f", "inputs": [[1]], "outputs": [[2]]}}
    bad = {"question": "q", "input_output": {"fn_name": "f", "inputs": [1], "outputs": [2]}}  # 1: no argument list
    samples = [{"prompt_index": i, "text": "def f(x):\n    return x + 1"} for i in (0, 1, 0)]
    scored, stats = apps.score_samples(samples, [good, bad])
    assert [s["reward"] for s in scored] == [1.0, 1.0, 0.0] and stats["samples"] == 3
    assert [s.get("reward_error", "")[:10] for s in scored] == ["", "", "TypeError:"]
