"""`arc`: AI2 Reasoning Challenge (Clark et al. 2018), multiple choice, rewarded by the chosen letter.

Records have `question`, `choices` = {"text": [...], "label": [...]} and `answerKey`. Some questions
label their choices 1-4 instead of A-D: prompts always show letters A, B, C, ... in the given order and
the gold letter is the answer key's position, so answers are always letters.

The chosen letter is the last one stated: "answer is (B)", "The answer is: B", "Answer: **B**", "the correct
answer is option B", "I choose B", "B is correct", `\\boxed{B}`; else that of a completion starting with
the letter ("B", "(B)", "B." or "B) ..."); otherwise there is no answer. Only capitals count unless in
parentheses, so the article in "the answer is a gas" is no answer.

Usage:
    task = ArcTask()
    task.reward("The coat traps body heat. The answer is B.", example)

Simplification: ARC has no worked solutions, so the gold response is the bare answer sentence.
"""

from __future__ import annotations

import re
import string

from .base import Task, few_shot, last_boxed

_LETTER = r"[\s*(\[{]*(?:\\text\{)?(?:\(([A-Za-z])\)|([A-Z]))(?![A-Za-z0-9])"  # "B", "(B)", "(b)", "**B**"
_VERB = r"(?:\s+(?:is|was|would be|should be|must be|will be))"
_STATED = [  # each finds a stated letter; the last one in the text wins. "answer" needs a verb or a colon
    # ("To answer A..." states nothing); "option B" / "choice B" stand alone
    re.compile(r"(?i:\b(?:answer(?:" + _VERB + r"|\s*[:：=-])|(?:choice|option)" + _VERB + r"?)[\s:：*=-]*"
               r"(?:(?:option|choice|letter)\b)?)" + _LETTER),
    re.compile(r"(?i:\bI(?:'d| would)?\s+(?:choose|pick|select|go with))(?i:\s+option|\s+choice)?" + _LETTER),
    re.compile(r"(?:^|[\s*(])\(?([A-Z])\)?\**\s+(?i:is\s+(?:the\s+)?(?:correct|right|best)\b)"),
]
_LEADING = re.compile(r"\s*(?:\*\*)?(?:\(([A-Z])\)|([A-Z])(?:[.):]|\**\s*$))", re.M)  # "(B) ...", "B. ...", "B"

EXEMPLARS = [
    ("Question: Which form of energy does a plant mainly capture for photosynthesis?\n"
     "A. sound\nB. light\nC. heat\nD. electricity\nAnswer:\n",
     "Plants use chlorophyll to absorb sunlight. The answer is B."),
    ("Question: A student mixes salt into water until no more dissolves. What has she made?\n"
     "A. a saturated solution\nB. a pure substance\nC. an element\nD. a gas\nAnswer:\n",
     "When no more salt dissolves, the water holds all it can. The answer is A."),
    ("Question: Which tool is best for measuring the mass of a rock?\n"
     "A. a ruler\nB. a thermometer\nC. a balance\nD. a graduated cylinder\nAnswer:\n",
     "Mass is measured by comparing against known masses on a balance. The answer is C."),
    ("Question: Why does a metal spoon feel colder than a wooden spoon at the same temperature?\n"
     "A. metal is always colder\nB. wood makes heat\nC. metal is heavier\nD. metal conducts heat away from "
     "the hand faster\nAnswer:\n",
     "Both are at room temperature, but metal carries heat away from the skin quickly. The answer is D."),
]


class ArcTask(Task):
    name = "arc"
    max_new_tokens = 256  # a few sentences of reasoning and the answer sentence
    stop = ("\nQuestion:",)  # the next few-shot block would begin here
    hub, hub_configs = "allenai/ai2_arc", ("ARC-Challenge",)
    fields = ("question", "choices", "answerKey")
    default_shots = 4  # the papers prompt base models 4-shot
    exemplars = EXEMPLARS

    def prompt(self, example: dict) -> str:
        options = "".join(f"{letter}. {text}\n" for letter, text in zip(string.ascii_uppercase,
                                                                          example["choices"]["text"]))
        return few_shot(EXEMPLARS, self.shots, self.name) + f"Question: {example['question']}\n{options}Answer:\n"

    def solution(self, example: dict) -> str:
        return f"The answer is {self.gold_answer(example)}."

    def extract_answer(self, text: str) -> str | None:
        stated = [(m.start(), next(g for g in m.groups() if g)) for p in _STATED for m in p.finditer(text)]
        boxed = last_boxed(text)
        inner = re.sub(r"\\text(?:bf)?\{([^}]*)\}", r"\1", boxed or "").strip("() ")
        if re.fullmatch(r"[A-Za-z]", inner):  # "\boxed{C}", "\boxed{\text{(C)}}"
            stated.append((text.rfind("\\boxed"), inner))
        if stated:
            return max(stated)[1].upper()
        m = _LEADING.match(text)
        return (m.group(1) or m.group(2)) if m else None

    def gold_answer(self, example: dict) -> str:
        labels = [str(x) for x in example["choices"]["label"]]
        return string.ascii_uppercase[labels.index(str(example["answerKey"]))]
