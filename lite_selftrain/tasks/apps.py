"""`apps`: programming problems (Hendrycks et al. 2021, APPS), rewarded by passing every test case.

Records have `question`, `input_output` = {"inputs": [...], "outputs": [...]} plus `fn_name` for
call-based problems (a JSON string on the hub, or a dict: `reward` takes either), `solutions` (a JSON list
of programs) and `starter_code`. Two kinds of tests, as in the APPS harness:

- standard input: each input is fed to the program's stdin; its stdout must equal the output up to
  whitespace (tokens compared in order), numeric tokens within numpy.allclose's default tolerance;
- call-based: `fn_name` (a method of `Solution` when the starter code is LeetCode style) is called
  in the sandbox with each input's argument list; its result comes back as data (`Sandbox.run(calls=)`)
  and, as JSON, must equal the output, or the output's only element (APPS wraps many outputs in a list).
  The expected outputs never enter the sandbox, and nothing the program prints counts.

Programs run after the harness's standard imports (typing's List, collections, math, heapq...). Each
test runs in its own sandboxed process with the per-test limits (the APPS harness gives each test
4 s); the tests of one program stop at the first that does not pass, since the reward needs them all.

Usage:
    task = AppsTask(sandbox={"timeout": 4})
    task.outcomes(program, example)  # e.g. ["pass", "pass", "fail"]

Simplifications: the prompt is the APPS paper's zero-shot format (a `shots` option is ignored); the harness's
looser fallbacks (comparing lines as unordered sets) are left out, so order matters.
"""

from __future__ import annotations

import json

from ..errors import UserError
from .base import CodeTask, code_block, normalize_code

# the APPS harness runs every program after these imports (numpy left out: programs see the standard library only)
_HEADER = ("import sys\nimport time\nimport itertools\nfrom itertools import accumulate, product, permutations, "
           "combinations\nimport collections\nfrom collections import Counter, OrderedDict, deque, defaultdict, "
           "ChainMap\nfrom functools import lru_cache\nimport math\nfrom math import sqrt, sin, cos, tan, ceil, "
           "fabs, floor, gcd, exp, log, log2\nimport fractions\nfrom typing import List, Tuple\nimport random\n"
           "import heapq\nfrom heapq import *\n")


def stdin_text(value) -> str:
    """A test's input or output as text: the lines of a list, or the string itself."""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _close(a: str, b: str) -> bool:
    """numpy.allclose's default test |a - b| <= 1e-8 + 1e-5 * |b|, for two numeric tokens."""
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return abs(x - y) <= 1e-8 + 1e-5 * abs(y)


def _json_field(example: dict, key: str, default):
    """A field the hub stores as a JSON string, decoded (an empty string is `default`)."""
    value = example.get(key)
    if not isinstance(value, str):
        return default if value is None else value
    try:
        return json.loads(value) if value.strip() else default
    except json.JSONDecodeError as e:
        name = example.get("problem_id", str(example.get("question", ""))[:40])
        raise UserError(f"apps problem {name!r}: {key} is not valid JSON ({e.msg})") from None


def tests_of(example: dict) -> dict:
    """The record's `input_output` ({"inputs": [...], "outputs": [...], "fn_name"?}), decoded when it is the
    hub's JSON string; anything else is one `UserError`."""
    tests = _json_field(example, "input_output", {})
    if not isinstance(tests, dict):
        raise UserError(f"apps: input_output must be a JSON object, not {type(tests).__name__}")
    for key, kind in (("inputs", list), ("outputs", list), ("fn_name", str)):
        if tests.get(key) is not None and not isinstance(tests[key], kind):
            raise UserError(f"apps: input_output.{key} must be a {kind.__name__}, not {type(tests[key]).__name__}")
    return tests


def same_output(got: str, want: str) -> bool:
    """Equal up to whitespace, numbers up to a small tolerance."""
    a, b = got.split(), want.split()
    return len(a) == len(b) and all(x == y or _close(x, y) for x, y in zip(a, b))


def same_result(got, want) -> bool:
    """A call's JSON result against the expected output, or its only element."""
    return got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])


def same_call_result(got, want) -> bool:
    """`same_result` after a round trip through JSON, as the APPS harness saw results (tuples and sets as
    lists); a result JSON cannot hold fails."""
    try:
        got = json.loads(json.dumps(got, default=list))
    except (TypeError, ValueError):
        return False
    return same_result(got, want)


class AppsTask(CodeTask):
    name = "apps"
    max_new_tokens = 1024  # most APPS solutions fit in a few hundred tokens; long ones in a thousand
    stop = ("\nQUESTION:",)  # a new problem would begin here
    hub = "codeparrot/apps"
    fields = ("question", "input_output")

    def prepare(self, record: dict) -> dict:
        """Decode the JSON-string fields of the hub version."""
        record = dict(record)
        record["input_output"] = tests_of(record)
        record["solutions"] = _json_field(record, "solutions", [])
        if not (isinstance(record["solutions"], list) and all(isinstance(x, str) for x in record["solutions"])):
            raise UserError("apps: solutions must be a list of programs (strings)")
        return record

    def prompt(self, example: dict) -> str:
        """Zero-shot, whatever `shots` says."""
        starter = example.get("starter_code") or ""
        call = tests_of(example).get("fn_name") or starter
        kind = "\nUse Call-Based format" if call else "\nUse Standard Input format"
        return f"\nQUESTION:\n{example['question']}\n{starter}{kind}\nANSWER:\n"

    def solution(self, example: dict) -> str:
        solutions = _json_field(example, "solutions", [])
        return solutions[0] if solutions else ""

    def gold_answer(self, example: dict) -> str:
        return normalize_code(self.solution(example))

    def program(self, completion: str, example: dict) -> str:
        """The completion's code after the harness's imports: what runs for every test."""
        return _HEADER + code_block(completion)

    def outcomes(self, completion: str, example: dict) -> list[str]:
        tests = tests_of(example)
        program, fn = self.program(completion, example), tests.get("fn_name")
        results = []
        for given, want in zip(tests.get("inputs", []), tests.get("outputs", [])):
            if fn:  # the result comes back as data; what it must equal stays here
                run = self.sandbox.run(program, calls=(fn, [given]))
                passed = len(run.values) == 1 and same_call_result(run.values[0], want)
            else:
                run = self.sandbox.run(program, stdin=stdin_text(given))
                passed = same_output(run.stdout, stdin_text(want))
            results.append(run.outcome(passed))
            if results[-1] != "pass":
                break
        return results
