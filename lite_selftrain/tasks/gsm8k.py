"""`gsm8k`: grade-school math word problems (Cobbe et al. 2021), rewarded by the final number.

Records have `question` and `answer`; the answer is a worked solution with calculator annotations
(`<<48/2=24>>`, removed from the gold solution) ending in `#### 72`. The final answer of a completion is
taken from, in order of preference: `#### N`, `\\boxed{N}`, `The answer is N` (also "Answer: **N**"),
`A: N`, else the last number in the text. After a marker, an arithmetic chain gives its result: "The
answer is 45 - 5 = 40" is 40, "The answer is 20 - 15" is 5. A "-" is a sign only where it cannot be a
subtraction or a range ("so 3-5 apples" ends in 5). Numbers compare by value: `1,200`, `$1200.00` and
`1200 dollars` are all `1200`.

Usage:
    task = GSM8KTask()
    ex = task.load("test", path="gsm8k_test.jsonl")[0]
    task.reward("She has 3 + 4 = 7 apples.\\n#### 7", ex)

Simplification: the exemplars are our own short problems in the dataset's format.
"""

from __future__ import annotations

import ast
import operator
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from .base import Task, few_shot, last_boxed

_NUM = r"(?:\$\s*)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"  # 1,200 | 1200 | $12.50 | 3.5 (a sign is read apart)
_SIGNED = re.compile(r"(-?)(" + _NUM + ")")
_OPS = r"\s*[-+*/×÷=]\s*"
_CHAIN = "-?" + _NUM + "(?:" + _OPS + "-?" + _NUM + ")*"  # "45 - 5 = 40", "20 - 15", "$3 * 4 = $12"
_PATTERNS = [  # a marker and the number (or arithmetic) right after it, most explicit first; its last one wins
    re.compile(r"####\s*(" + _CHAIN + ")"),
    re.compile(r"(?<![a-z])answer(?:\s+(?:is|was|would be|should be)\s*[:=]?|\s*[:=])[\s*$\\(]*(" + _CHAIN + ")", re.I),
    re.compile(r"^\s*A:\s*(" + _CHAIN + ")", re.M),
]
_MINUS = str.maketrans({"−": "-", "–": "-", "＄": "$", "，": ","})  # typographic minus and dash; full-width signs

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


def _numbers(text: str) -> list[str]:
    """Every number of `text` as written; a "-" is a sign only when it is not a subtraction or a range:
    "20 - 15" and "3-5 apples" hold 15 and 5, "fell to -4" and "x = -4" hold -4."""
    out = []
    for m in _SIGNED.finditer(text.translate(_MINUS)):
        touching = text[m.start() - 1 : m.start()]  # the character right before the "-"
        spaced = text[: m.start()].rstrip()[-1:]  # the last one before it, spaces skipped
        minus = m.group(1) and not (touching.isalnum() or (touching and touching in ")]%$")
                                    or spaced.isdigit() or (spaced and spaced in ")]%"))
        out.append(("-" if minus else "") + m.group(2))
    return out


def _canonical(raw: str) -> str | None:
    try:
        value = Decimal(re.sub(r"[\s$,]", "", raw)).normalize()
    except InvalidOperation:
        return None
    return str(int(value)) if value == value.to_integral_value() else format(value, "f")


def normalize_number(text: str) -> str | None:
    """The first number in `text` as a canonical string ("1,200.50" -> "1200.5"), None if none."""
    numbers = _numbers(text)
    return _canonical(numbers[0]) if numbers else None


def _evaluate(expression: str) -> str | None:
    """The value of plain arithmetic ("20 - 15" -> "5"), None when it is anything else."""
    text = re.sub(r"(?<=\d),(?=\d{3})|\$|\s", "", expression).replace("×", "*").replace("÷", "/")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:[-+*/]-?\d+(?:\.\d+)?)*", text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
        return ops[type(node.op)](value(node.left), value(node.right))

    try:
        result = value(tree.body)
    except (ZeroDivisionError, KeyError):
        return None
    return _canonical(str(Decimal(result.numerator) / Decimal(result.denominator)))


def answer_of(chain: str) -> str | None:
    """The answer an arithmetic chain states: after its last "=", or its value ("45 - 5 = 40" -> 40)."""
    last = chain.translate(_MINUS).split("=")[-1]
    return _evaluate(last) or normalize_number(last)


class GSM8KTask(Task):
    name = "gsm8k"
    max_new_tokens = 512  # the longest GSM8K solutions are about 400 tokens of a 100k-word vocabulary
    stop = ("\nQuestion:",)  # the next few-shot block would begin here
    hub, hub_configs = "openai/gsm8k", ("main",)
    fields = ("question", "answer")
    default_shots = 4  # the papers prompt base models 4-shot
    exemplars = EXEMPLARS

    def prompt(self, example: dict) -> str:
        return few_shot(EXEMPLARS, self.shots, self.name) + f"Question: {example['question']}\nAnswer:\n"

    def solution(self, example: dict) -> str:
        return re.sub(r"<<[^>]*>>", "", example["answer"]).strip()

    def extract_answer(self, text: str) -> str | None:
        text = text.translate(_MINUS).replace("**", "")  # bold marks sit between a marker and its number
        boxed = last_boxed(text)
        boxed = answer_of(boxed.replace("\\$", "$").replace("{,}", ",")) if boxed is not None else None
        for i, pattern in enumerate(_PATTERNS):
            found = [x for x in map(answer_of, pattern.findall(text)) if x is not None]
            if found:
                return found[-1]
            if i == 0 and boxed is not None:  # after "####", a \boxed{} answer is the most explicit
                return boxed
        numbers = _numbers(text)
        return _canonical(numbers[-1]) if numbers else None

    def gold_answer(self, example: dict) -> str:
        return normalize_number(example["answer"].split("####")[-1]) or ""
