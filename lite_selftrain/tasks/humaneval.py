"""`humaneval`: Python function completion (Chen et al. 2021), rewarded by running the unit tests.

Records have `task_id`, `prompt` (a signature and docstring), `canonical_solution` (the body),
`test` (a `check(candidate)` function of asserts) and `entry_point`. The completion continues the
prompt; a completion that restates the whole function (or wraps it in a ```python block) works too.
The program `prompt + completion + test + check(entry_point)` runs in the sandbox; it passes only if
the launcher's end marker shows that `check` returned, so `sys.exit(0)` in a completion scores 0.

Usage:
    task = HumanEvalTask(sandbox={"timeout": 5})
    task.rewards(completions, examples)  # programs run in parallel across cores

Simplifications: zero-shot only, as in the Codex paper (a `shots` option is ignored); the stop strings are the
Codex paper's.
"""

from __future__ import annotations

import re

from .base import CodeTask, code_block, normalize_code


class HumanEvalTask(CodeTask):
    name = "humaneval"
    max_new_tokens = 512  # the longest canonical solutions are about 250 tokens
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # a new top-level statement ends the function
    hub = "openai/openai_humaneval"  # one split, "test"
    fields = ("prompt", "canonical_solution", "test", "entry_point")

    def prompt(self, example: dict) -> str:
        """Zero-shot, whatever `shots` says."""
        return example["prompt"]

    def reference(self, example: dict) -> str:
        return example["canonical_solution"]

    def gold_answer(self, example: dict) -> str:
        return normalize_code(example["canonical_solution"])

    def program(self, completion: str, example: dict) -> str:
        """The prompt completed, then the tests and the call that runs them."""
        code = code_block(completion)
        whole = re.search(rf"^def {re.escape(example['entry_point'])}\(", code, re.M)
        # a restated function follows the prompt's stub (a docstring is a valid body) and replaces it
        head = example["prompt"] + ("\n" if whole else "")
        return f"{head}{code}\n\n{example['test']}\n\ncheck({example['entry_point']})\n"

    def outcomes(self, completion: str, example: dict) -> list[str]:
        result = self.sandbox.run(self.program(completion, example))
        return [result.outcome(result.completed)]
