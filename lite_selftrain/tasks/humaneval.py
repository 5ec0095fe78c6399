"""`humaneval`: Python function completion (Chen et al. 2021), rewarded by the results of the tests' calls.

Records have `task_id`, `prompt` (a signature and docstring), `canonical_solution` (the body),
`test` (a `check(candidate)` function of asserts) and `entry_point`. The completion continues the
prompt; a completion that restates the whole function (or wraps it in a ```python block) works too.

The tests never enter a candidate's sandbox. Once per problem, the gold solution runs `check` in
the sandbox with a recording stand-in for the candidate, which keeps each call's arguments and the
gold solution's result (`expected`). A candidate's program (the prompt and its completion, no tests) then
runs in the sandbox, its function is called on the same arguments, and each result comes back as plain
typed JSON (`Sandbox.run(calls=...)`), compared here with the gold solution's (`same_value`). An object
whose `__eq__` always says yes is not plain data and fails; so does a program that exits early.

Usage:
    task = HumanEvalTask(sandbox={"timeout": 5})
    task.rewards(completions, examples)  # programs run in parallel across cores

Simplifications: zero-shot only, as in the Codex paper (a `shots` option is ignored); the stop strings are the
Codex paper's. A test that checks a property of the result rather than its value (HumanEval/32 asks for
any root of a polynomial) becomes a check against the gold solution's result, within 1e-6 where a float
is involved, exact otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from ..config import Count
from ..errors import UserError
from .base import CodeTask, code_block, normalize_code
from .sandbox import SandboxConfig

# appended to the gold program: runs the tests on a stand-in that records every call
_RECORDER = """

def __record_calls():
    import copy
    calls = []

    def candidate(*args):
        calls.append([copy.deepcopy(args), None])
        result = {entry}(*args)
        calls[-1][1] = copy.deepcopy(result)
        return result

    check(candidate)
    return calls
"""


def _close(a: int | float, b: int | float) -> bool:
    """Within 1e-6 (relative or absolute), as floats; an integer beyond every float is near none."""
    try:
        x, y = float(a), float(b)
    except OverflowError:
        return False
    return x == y or math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)


def same_value(got, want) -> bool:
    """Python's `==` on plain data, exact but where a float is involved: a bool equals only a bool, and a
    float agrees with a number within 1e-6 (as the tests' own float checks allow). Dicts are compared
    by looking `got`'s keys up in `want`, never the other way: `got`'s may all hash alike."""
    if isinstance(got, bool) or isinstance(want, bool):
        return type(got) is type(want) and got == want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        return _close(got, want) if float in (type(got), type(want)) else got == want
    if type(got) is not type(want):
        return False
    if isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(map(same_value, got, want))
    if isinstance(want, dict):
        return len(got) == len(want) and all(k in want and same_value(v, want[k]) for k, v in got.items())
    return got == want  # str, bytes, None; sets: `got == want` looks `got`'s elements up in `want`


class HumanEvalTask(CodeTask):
    name = "humaneval"
    max_new_tokens = 512  # the longest canonical solutions are about 250 tokens
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # a new top-level statement ends the function
    hub = "openai/openai_humaneval"  # one split, "test"
    fields = ("prompt", "canonical_solution", "test", "entry_point")

    def __init__(self, sandbox: SandboxConfig | dict | None = None, shots: Count | None = None):
        super().__init__(sandbox, shots)
        self._expected: dict[str, tuple[list, list]] = {}  # problem key -> (argument lists, gold results)

    def prompt(self, example: dict) -> str:
        """Zero-shot, whatever `shots` says."""
        return example["prompt"]

    def solution(self, example: dict) -> str:
        return example["canonical_solution"]

    def gold_answer(self, example: dict) -> str:
        return normalize_code(example["canonical_solution"])

    def program(self, completion: str, example: dict) -> str:
        """The prompt completed: its helpers and the function, without the tests."""
        code = code_block(completion)
        whole = re.search(rf"^def {re.escape(example['entry_point'])}\(", code, re.M)
        # a restated function follows the prompt's stub (a docstring is a valid body) and replaces it
        return example["prompt"] + ("\n" if whole else "") + code + "\n"

    def _key(self, example: dict) -> str:
        return hashlib.sha256(json.dumps([example[f] for f in self.fields]).encode()).hexdigest()

    def expected(self, example: dict) -> tuple[list, list]:
        """(argument lists of the tests' calls, the gold solution's result of each), recorded once per problem."""
        key = self._key(example)
        if key not in self._expected:
            source = (example["prompt"] + example["canonical_solution"] + "\n\n" + example["test"]
                      + _RECORDER.format(entry=example["entry_point"]))
            # a generous deadline: a slow moment of a busy machine must not fail the gold solution
            run = self.sandbox.run(source, calls=("__record_calls", [[]]), timeout=4 * self.sandbox.cfg.timeout)
            if not (run.ok and len(run.values) == 1 and run.values[0]):  # no calls: nothing would be checked
                last = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}", "no calls"])[-1]
                raise UserError(f"humaneval {example.get('task_id', '')}: the gold solution's test calls "
                                f"could not be recorded ({'timeout' if run.timed_out else last})")
            calls = run.values[0]
            self._expected[key] = ([list(args) for args, _ in calls], [result for _, result in calls])
        return self._expected[key]

    def outcomes(self, completion: str, example: dict) -> list[str]:
        args, want = self.expected(example)
        run = self.sandbox.run(self.program(completion, example), calls=(example["entry_point"], args))
        passed = len(run.values) == len(want) and all(map(same_value, run.values, want))
        return [run.outcome(passed)]

    def judged(self, completions: list[str], examples: list[dict]) -> list[tuple[float, str | None]]:
        """Each problem's gold calls are recorded first (in parallel), then the programs run."""
        self.sandbox.map(self.expected, list({self._key(ex): ex for ex in examples}.values()))
        return super().judged(completions, examples)
