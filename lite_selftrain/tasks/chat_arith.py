"""`chat_arith`: arithmetic asked in words, for instruction models, in the model's own chat template.

    task = get_task("chat_arith", model="smollm2-135m-instruct", ops="+")
    ex = task.load("test")[0]            # {"question": "What is 27 plus 82?", "numbers": [27, 82], "op": "+", ...}
    task.prompt(ex)                      # the question as a user turn of the model's chat template, zero-shot
    task.reward("To add 27 and 82 ... The answer is 109.", ex)    # 1.0

A problem is two numbers and an operation (`+`: two `digits`-digit numbers; `-`: the larger first; `x`: a
`digits`-digit number times a one-digit one), asked plainly ("What is 27 + 82?") or, with `varied`, in
one of several phrasings ("Add 27 and 82.", "If you have 27 apples and get 82 more, ..."). The prompt is the
question alone, wrapped as a user turn by the chat template of `model` (any `model.name`: its tokenizer
is loaded once, on the first prompt); the model replies in its own words and the reply ends at its
end-of-turn token. The answer is read as GSM8K's is (`tasks/gsm8k.py`): `#### N`, `\\boxed{N}`,
"The answer is N" (an arithmetic chain after it gives its result), else the last number of the reply.
Which split a problem belongs to is fixed by a hash of its question, as in `arith`.

Simplifications: one operation per problem; the reference reply (a sentence) is for checks, not training.
"""

from __future__ import annotations

import random
import zlib

from ..errors import UserError
from .gsm8k import GSM8KTask

PHRASINGS = {  # {a} and {b} are the numbers; the first of each is the plain one, the rest come with varied=True
    "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
          "Compute {a} + {b}.", "If you have {a} apples and get {b} more, how many apples do you have?"],
    "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.",
          "What is the difference between {a} and {b}?", "If you have {a} apples and give away {b}, how many "
                                                         "are left?"],
    "x": ["What is {a} x {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
          "What is the product of {a} and {b}?", "If {a} boxes hold {b} pens each, how many pens are there?"],
}
_SPLITS = ("train", "validation", "test")


def value(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class ChatArithTask(GSM8KTask):
    """Two-number arithmetic in words; reward 1.0 iff the reply's final number is the result."""

    name = "chat_arith"
    stop = ()  # the reply ends at the model's end-of-turn token
    hub, hub_configs, fields, default_shots = None, (None,), (), 0

    def __init__(self, model: str = "smollm2-135m-instruct", ops: str = "+", digits: int = 2,
                 varied: bool = False, max_new_tokens: int = 64, n_train: int = 2000, n_test: int = 300,
                 test_every: int = 5, seed: int = 0, shots: int = 0):
        super().__init__(shots)
        if self.shots:
            raise UserError("chat_arith is zero-shot (shots = 0): the chat model answers the question alone")
        bad = sorted(set(ops) - set(PHRASINGS))
        if not ops or bad:
            raise UserError(f"chat_arith ops must be characters of '+-x', not '{ops}'")
        for key, v in (("digits", digits), ("max_new_tokens", max_new_tokens), ("n_train", n_train),
                       ("n_test", n_test)):
            if not isinstance(v, int) or v < 1:
                raise UserError(f"chat_arith {key} must be a positive integer, not {v!r}")
        if not isinstance(test_every, int) or test_every < 2:
            raise UserError(f"chat_arith test_every must be an integer >= 2, not {test_every!r}")
        if not isinstance(varied, bool):
            raise UserError(f"chat_arith varied must be true or false, not {varied!r}")
        self.model, self.ops, self.digits, self.seed, self.varied = model, ops, digits, seed, varied
        self.max_new_tokens = max_new_tokens  # a sentence or two: the model's usual reply to such a question
        self.n_train, self.n_test, self.test_every = n_train, n_test, test_every
        self._tokenizer = None

    # -- problems ----------------------------------------------------------------------------------------
    def make(self, op: str, a: int, b: int, phrasing: int) -> dict:
        question = PHRASINGS[op][phrasing % len(PHRASINGS[op])].format(a=a, b=b)
        return {"question": question, "numbers": [a, b], "op": op, "answer": str(value(op, a, b))}

    def draw(self, rng: random.Random) -> dict:
        op = rng.choice(self.ops)
        low, top = 10 ** (self.digits - 1), 10**self.digits - 1
        a, b = rng.randint(low, top), rng.randint(low, top) if op != "x" else rng.randint(2, 9)
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        return self.make(op, a, b, rng.randrange(len(PHRASINGS[op])) if self.varied else 0)

    def load(self, split: str = "train", path=None, *, n: int | None = None) -> list[dict]:
        """`n` problems of `split`, deterministic in (seed, split); validation comes from the train side."""
        if path is not None:
            raise UserError("chat_arith draws its own problems: it takes no data file")
        if split not in _SPLITS:
            raise UserError(f"chat_arith has splits {', '.join(_SPLITS)}, not '{split}'")
        n = n if n is not None else (self.n_test if split == "test" else self.n_train)
        rng = random.Random(f"{self.seed}/{split}/{self.ops}/{self.digits}")
        want, out, seen = "test" if split == "test" else "train", [], set()
        for _ in range(1000 * max(n, 1)):  # rejection sampling; the bound only guards a tiny problem space
            if len(out) == n:
                break
            ex = self.draw(rng)
            key = (ex["op"], *ex["numbers"])
            is_test = zlib.crc32(repr(key).encode()) % self.test_every == 0  # by numbers: phrasings never leak
            if (is_test == (want == "test")) and (key, ex["question"]) not in seen:
                seen.add((key, ex["question"]))
                out.append(ex)
        return out

    # -- prompts and answers -----------------------------------------------------------------------------
    def prompt(self, example: dict) -> str:
        from ..models import format_prompt, load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model)
        if not getattr(self._tokenizer, "chat_template", None):
            raise UserError(f"chat_arith: model '{self.model}' has no chat template (it is for instruction models)")
        return format_prompt(self._tokenizer, example["question"])

    def reference(self, example: dict) -> str:
        a, b = example["numbers"]
        sign = {"+": "+", "-": "-", "x": "×"}[example["op"]]
        return f"{a} {sign} {b} = {example['answer']}. The answer is {example['answer']}."

    def gold_answer(self, example: dict) -> str:
        return example["answer"]
