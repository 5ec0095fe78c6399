"""`apps`: programming problems (Hendrycks et al. 2021, APPS), rewarded by passing every test case.

Records have `question`, `input_output` (a JSON string on the hub, or a dict) = {"inputs": [...],
"outputs": [...]} plus `fn_name` for call-based problems, `solutions` (a JSON list of programs) and
`starter_code`. Two kinds of tests, as in the APPS harness:

- standard input: each input is fed to the program's stdin; its stdout must equal the output up to
  whitespace (tokens compared in order), numeric tokens within numpy.allclose's default tolerance;
- call-based: `fn_name` (a method of `Solution` when the starter code is LeetCode style) is called
  with each input's argument list; the JSON of its result must equal the output, or the output's only
  element (APPS wraps many outputs in a list).

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
import secrets

from .base import CodeTask, code_block, normalize_code

# the APPS harness runs every program after these imports (numpy left out: the sandbox's Python may lack it)
_HEADER = ("import sys\nimport time\nimport itertools\nfrom itertools import accumulate, product, permutations, "
           "combinations\nimport collections\nfrom collections import Counter, OrderedDict, deque, defaultdict, "
           "ChainMap\nfrom functools import lru_cache\nimport math\nfrom math import sqrt, sin, cos, tan, ceil, "
           "fabs, floor, gcd, exp, log, log2\nimport fractions\nfrom typing import List, Tuple\nimport random\n"
           "import heapq\nfrom heapq import *\n")

# runs after the program: calls the function on one test's arguments and prints the JSON of the result
_CALL = """

import json as _json
_fn = Solution().{fn} if "Solution" in globals() else {fn}  # LeetCode-style starter code wraps a class
print({marker!r} + _json.dumps(_fn(*_json.loads({args!r})), default=list))
"""


def _as_text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _close(a: str, b: str) -> bool:
    """numpy.allclose's default test |a - b| <= 1e-8 + 1e-5 * |b|, for two numeric tokens."""
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return abs(x - y) <= 1e-8 + 1e-5 * abs(y)


def same_output(got: str, want: str) -> bool:
    """Equal up to whitespace, numbers up to a small tolerance."""
    a, b = got.split(), want.split()
    return len(a) == len(b) and all(x == y or _close(x, y) for x, y in zip(a, b))


def same_result(got, want) -> bool:
    """A call's JSON result against the expected output, or its only element."""
    return got == want or (isinstance(want, list) and len(want) == 1 and got == want[0])


class AppsTask(CodeTask):
    name = "apps"
    max_new_tokens = 1024  # most APPS solutions fit in a few hundred tokens; long ones in a thousand
    stop = ("\nQUESTION:",)  # a new problem would begin here
    hub = "codeparrot/apps"
    fields = ("question", "input_output")

    def prepare(self, record: dict) -> dict:
        """Decode the JSON-string fields of the hub version."""
        record = dict(record)
        for key, empty in (("input_output", {}), ("solutions", [])):
            value = record.get(key)
            if isinstance(value, str):
                record[key] = json.loads(value) if value.strip() else empty
        return record

    def prompt(self, example: dict) -> str:
        """Zero-shot, whatever `shots` says."""
        starter = example.get("starter_code") or ""
        call = example["input_output"].get("fn_name") or starter
        kind = "\nUse Call-Based format" if call else "\nUse Standard Input format"
        return f"\nQUESTION:\n{example['question']}\n{starter}{kind}\nANSWER:\n"

    def reference(self, example: dict) -> str:
        solutions = example.get("solutions") or []
        return solutions[0] if solutions else ""

    def gold_answer(self, example: dict) -> str:
        return normalize_code(self.reference(example))

    def outcomes(self, completion: str, example: dict) -> list[str]:
        tests = example["input_output"]
        program, fn = _HEADER + code_block(completion), tests.get("fn_name")
        results = []
        for given, want in zip(tests.get("inputs", []), tests.get("outputs", [])):
            if fn:
                marker = secrets.token_hex(8)
                run = self.sandbox.run(program + _CALL.format(fn=fn, marker=marker, args=json.dumps(given)))
                line = [x for x in run.stdout.splitlines() if x.startswith(marker)]
                try:
                    passed = bool(line) and same_result(json.loads(line[-1][len(marker):]), want)
                except json.JSONDecodeError:
                    passed = False
            else:
                run = self.sandbox.run(program, stdin=_as_text(given))
                passed = same_output(run.stdout, _as_text(want))
            results.append(run.outcome(passed))
            if results[-1] != "pass":
                break
        return results
