"""`arith`: multi-step sums of small numbers, with running sums as the worked solution.

A synthetic task with an exact binary reward, for the CPU demo and for tests. A problem is a chain of
`terms` numbers of `digits` digits; the worked solution writes one running sum per step, then `#answer`:

    prompt     "3+5+2+8="
    solution   "8,10,18#18"                 (style "sums": each step adds the next term)
    solution   "3+5=8,8+2=10,10+8=18#18"    (style "steps": each step also writes its operands)

Everything is one character per fact, so with the byte tokenizer every character is one token and
sequences stay short. Problems are drawn from a seeded generator; which split a problem belongs to is
fixed by a hash of its text, so "train" and "test" never share a problem, whatever seeds are used.
`load("train", seed=i)` draws a fresh set per seed (self-training may use new problems each iteration).

Usage:
    task = ArithTask(terms=3)
    ex = task.load("test", n=200)[0]
    task.reward(task.solution(ex), ex)  # 1.0

Simplifications: addition only; the difficulty knob is the number of terms (and digits per term).
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from ..config import Count, PositiveInt, check_fields
from ..errors import UserError
from ..store import read_jsonl
from .base import Task

_ANSWER = re.compile(r"#\s*(-?\d+)")  # the number right after the answer marker
_SPLIT_SALT = {"train": 1, "validation": 2, "test": 3}  # each split draws from its own stream


Terms = Annotated[PositiveInt | tuple[PositiveInt, PositiveInt], Field(description="a count or a [min, max] pair")]


@dataclass
class ArithConfig:
    terms: Terms = 3  # numbers per problem, or an inclusive (min, max) range
    digits: PositiveInt = 1  # one-digit terms: each step is a single-digit carry, learnable by a tiny model
    style: str = "sums"  # "sums" is the shortest worked solution; "steps" spells out each addition
    n_train: PositiveInt = 2000  # problems per call of load("train") when n is not given
    n_test: PositiveInt = 300  # enough held-out problems for a pass@1 within about ±3 points
    test_every: int = 5  # one problem in `test_every` (by hash of its text) belongs to the test split
    seed: int = 0  # fixed seed: the same problems every run

    def __post_init__(self):
        self.terms = tuple(self.terms) if isinstance(self.terms, list) else self.terms  # a TOML list is a pair
        check_fields(self)
        lo, hi = (self.terms, self.terms) if isinstance(self.terms, int) else tuple(self.terms)
        if not 2 <= lo <= hi:
            raise UserError(f"arith terms must be at least 2 (and min <= max), not {self.terms}")
        if self.digits < 1:
            raise UserError(f"arith digits must be at least 1, not {self.digits}")
        if self.style not in ("sums", "steps"):
            raise UserError(f"arith style must be 'sums' or 'steps', not '{self.style}'")
        if self.test_every < 2:
            raise UserError("arith test_every must be at least 2")
        self.terms = (lo, hi)


def solve(numbers: list[int], style: str = "sums") -> str:
    """The worked solution of summing `numbers`: running sums, then `#answer`."""
    total, steps = numbers[0], []
    for x in numbers[1:]:
        steps.append(f"{total}+{x}={total + x}" if style == "steps" else str(total + x))
        total += x
    return ",".join(steps) + f"#{total}"


def split_of(question: str, test_every: int) -> str:
    """The split a problem belongs to, fixed by its text alone (a stable hash, not Python's salted one)."""
    return "test" if zlib.crc32(question.encode()) % test_every == 0 else "train"


class ArithTask(Task):
    """Sums of `terms` numbers; reward 1.0 iff the number after the last `#` equals the sum."""

    name = "arith"
    needs_judge = False
    stop = ("\n",)  # solutions are one line; few-shot examples are separated by newlines

    def __init__(self, terms: Terms | list[int] = 3, digits: PositiveInt = 1, style: str = "sums",
                 seed: int = 0, shots: Count | None = None, **options):
        super().__init__(shots)
        self.config = ArithConfig(terms=terms, digits=digits, style=style, seed=seed, **options)
        self.max_new_tokens = self.longest_solution_len(self.config.terms[1]) + 2  # + margin for end token

    def longest_solution_len(self, terms: int) -> int:
        """Characters of the longest possible solution at `terms` terms (all terms the largest number)."""
        top = 10 ** self.config.digits - 1
        return len(solve([top] * terms, self.config.style))

    # ------------------------------------------------------------------------------------------------
    # problems

    def make(self, numbers: list[int]) -> dict:
        """An example record for the chain `numbers`."""
        return {"question": "+".join(map(str, numbers)) + "=", "numbers": list(numbers),
                "answer": str(sum(numbers))}

    def load(self, split: str = "train", path=None, *, n: int | None = None,
             terms: int | tuple[int, int] | None = None, seed: int | None = None) -> list[dict]:
        """`n` problems of `split`, deterministic in (seed, split, terms); or the records of a JSONL file.

        A JSONL record needs `numbers` (a list of ints) or `question` ("3+5+2=") ; `answer` is recomputed.
        """
        if path is not None:
            return [self._from_record(r, path) for r in read_jsonl(path)]
        cfg = self.config
        if split not in _SPLIT_SALT:
            raise UserError(f"arith has splits {', '.join(_SPLIT_SALT)}, not '{split}'")
        n = n if n is not None else (cfg.n_test if split == "test" else cfg.n_train)
        lo, hi = cfg.terms if terms is None else ArithConfig(terms=terms, digits=cfg.digits).terms
        want = "test" if split == "test" else "train"  # validation problems come from the train side
        rng = random.Random(f"{cfg.seed if seed is None else seed}/{split}/{lo}-{hi}/{cfg.digits}")
        top, out = 10 ** cfg.digits - 1, []
        for _ in range(1000 * max(n, 1)):  # rejection sampling; the bound only guards a tiny problem space
            if len(out) == n:
                break
            nums = [rng.randint(0, top) for _ in range(rng.randint(lo, hi))]
            ex = self.make(nums)
            if split_of(ex["question"], cfg.test_every) == want:
                out.append(ex)
        return out

    def _from_record(self, record: dict, path) -> dict:
        nums = record.get("numbers")
        if nums is None and isinstance(record.get("question"), str):
            nums = re.findall(r"\d+", record["question"])
        try:
            nums = [int(x) for x in nums]
        except (TypeError, ValueError):
            nums = []
        if len(nums) < 2:
            raise UserError(f"{path}: an arith record needs 'numbers' (2 or more ints) or a 'question'")
        return self.make(nums)

    # ------------------------------------------------------------------------------------------------
    # prompts, solutions, rewards

    def prompt(self, example: dict) -> str:
        """The question, after `shots` solved train problems (one per line) when asked."""
        lines = [ex["question"] + self.solution(ex)
                 for ex in self.load("train", n=self.shots, seed=self.config.seed + 10_000)] if self.shots else []
        return "\n".join(lines + [example["question"]])

    def solution(self, example: dict) -> str:
        return solve(example["numbers"], self.config.style)

    def extract_answer(self, text: str) -> str | None:
        """The number after the last `#` of the first line, or None when there is none."""
        found = _ANSWER.findall(text.split("\n", 1)[0])
        return str(int(found[-1])) if found else None

    def gold_answer(self, example: dict) -> str:
        return example["answer"]
