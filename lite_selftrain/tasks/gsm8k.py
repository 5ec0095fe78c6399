"""`gsm8k`: grade-school math word problems (Cobbe et al. 2021), rewarded by the final number.

Records have `question` and `answer`; the answer is a worked solution with calculator annotations
(`<<48/2=24>>`, removed from the reference) ending in `#### 72`. The final answer of a completion is
taken from, in order of preference: `#### N`, `The answer is N`, `A: N`, `\\boxed{N}`, else the last
number in the text. Numbers compare by value: `1,200`, `$1200.00` and `1200 dollars` are all `1200`.

Usage:
    task = GSM8KTask()
    ex = task.load("test", path="gsm8k_test.jsonl")[0]
    task.reward("She has 3 + 4 = 7 apples.\\n#### 7", ex)

Simplification: the exemplars are our own short problems in the dataset's format.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .base import Task, few_shot, last_boxed

_NUM = r"-?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # 1,200 | 1200 | $12.50 | -3
_NUMBER = re.compile(_NUM)
_PATTERNS = [  # a marker and the number right after it, most explicit first; its last occurrence wins
    re.compile(r"####\s*(" + _NUM + ")"),
    re.compile(r"answer is[\s:*]*(" + _NUM + ")", re.I),
    re.compile(r"^\s*A:\s*(" + _NUM + ")", re.M),
]

EXEMPLARS = [
    ("Question: A baker makes 24 rolls in the morning and 18 in the afternoon. He sells 35 of them. "
     "How many rolls are left?\nAnswer:\n",
     "The baker makes 24 + 18 = 42 rolls.\nAfter selling 35, 42 - 35 = 7 rolls are left.\n#### 7"),
    ("Question: Mia reads 15 pages a day. How many days does she need for a book of 120 pages?\nAnswer:\n",
     "She needs 120 / 15 = 8 days.\n#### 8"),
    ("Question: A ticket costs $12 and a drink costs $3. Four friends each buy a ticket and a drink. "
     "How much do they spend in all?\nAnswer:\n",
     "Each friend spends 12 + 3 = $15.\nFour friends spend 4 * 15 = $60.\n#### 60"),
    ("Question: A garden has 6 rows of 9 tulips. A rabbit eats a third of them. How many tulips remain?\n"
     "Answer:\n",
     "The garden has 6 * 9 = 54 tulips.\nThe rabbit eats 54 / 3 = 18 tulips.\n54 - 18 = 36 tulips remain.\n"
     "#### 36"),
]


def normalize_number(text: str) -> str | None:
    """The first number in `text` as a canonical string ("1,200.50" -> "1200.5"), None if none."""
    m = _NUMBER.search(text)
    if not m:
        return None
    raw = re.sub(r"[\s$,]", "", m.group(0))
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    value = value.normalize()
    if value == value.to_integral_value():
        return str(int(value))
    return format(value, "f")


class GSM8KTask(Task):
    name = "gsm8k"
    max_new_tokens = 512  # the longest GSM8K solutions are about 400 tokens of a 100k-word vocabulary
    stop = ("\nQuestion:",)  # the next few-shot block would begin here
    hub, hub_configs = "openai/gsm8k", ("main",)
    fields = ("question", "answer")
    default_shots = 4  # the papers prompt base models 4-shot

    def prompt(self, example: dict) -> str:
        return few_shot(EXEMPLARS, self.shots, self.name) + f"Question: {example['question']}\nAnswer:\n"

    def reference(self, example: dict) -> str:
        return re.sub(r"<<[^>]*>>", "", example["answer"]).strip()

    def extract_answer(self, text: str) -> str | None:
        for pattern in _PATTERNS:
            found = [normalize_number(tail) for tail in pattern.findall(text)]
            found = [x for x in found if x is not None]
            if found:
                return found[-1]
        boxed = last_boxed(text)
        if boxed is not None and normalize_number(boxed) is not None:
            return normalize_number(boxed)
        numbers = _NUMBER.findall(text)
        return normalize_number(numbers[-1]) if numbers else None

    def gold_answer(self, example: dict) -> str:
        return normalize_number(example["answer"].split("####")[-1]) or ""
