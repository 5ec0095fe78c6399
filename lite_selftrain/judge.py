"""LLM-as-a-Judge (Yuan et al. 2024, Self-Rewarding LMs): the additive 5-point rubric, score parsing,
k judgments averaged, and judge-training (EFT) examples.

The model reads JUDGE_TEMPLATE filled with a (prompt, response) pair, writes a short justification and
ends with "Score: <0-5>". `parse_score` takes the LAST such line; k judgments (paper: 3) are averaged
over the parsable ones only: an unparsable judgment is missing, never a zero, or it would turn a good
response into the "rejected" one of a preference pair.

Usage:
    from lite_selftrain.judge import JudgeConfig, judge
    results = judge(model, tokenizer, [(prompt, response), ...], JudgeConfig(k=3))
    results[0].score  # mean of the parsable scores, or None

Simplifications: one rubric (the paper's, in our own words); the model's chat template (when it has one)
wraps the judge prompt, as it wraps every instruction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JUDGE_TEMPLATE = """\
You are grading a reply to a user's request. Start from 0 points and add points as follows (at most 5):
+1 if the reply is on topic and gives at least some useful information, even if partial or padded;
+1 if it deals with a large part of the request, though perhaps not all of it or not head-on;
+1 if it answers the core of the request in a way the user can act on;
+1 if it reads as a direct, complete and well-structured answer from a helpful assistant, with at most \
small lapses in clarity or concision;
+1 if it fits the request exactly: expert, insightful, nothing superfluous.

Request:
{prompt}

Reply:
{response}

Explain your grading in a few sentences (under 100 words), then end with a line of the form
Score: <total points from 0 to 5>"""

MAX_SCORE = 5

# "Score: 4", "score : 4.5", "**Score:** 3", "SCORE: 4/5", "Score: 4 out of 5" (the last one in the text counts)
_SCORE = re.compile(r"score\s*\**\s*[:：]\s*\**\s*(-?\d+(?:\.\d+)?)\s*\**\s*(?:(?:/|out of)\s*(\d+(?:\.\d+)?))?",
                    re.I)


@dataclass
class JudgeConfig:
    k: int = 3  # judgments per response, averaged: the paper's 3
    temperature: float = 0.7  # the paper samples judgments like responses (0.7, top-p 0.9)
    top_p: float = 0.9  # nucleus sampling as in the paper
    max_new_tokens: int = 256  # a justification of under 100 words plus the score line
    batch_size: int = 16  # prompts per sampling batch (each yields k rows)
    seed: int = 0  # sampling seed: the same judgments on a rerun
    chat: bool = True  # wrap the judge prompt in the tokenizer's chat template when it has one


@dataclass
class Judgment:
    texts: list[str]  # the k judgments as written
    scores: list[float | None]  # parse_score of each
    score: float | None  # mean of the parsable scores, None when none parsed


def judge_prompt(prompt: str, response: str) -> str:
    return JUDGE_TEMPLATE.format(prompt=prompt.strip(), response=response.strip())


def parse_score(text: str) -> float | None:
    """The last "Score: N" of a judgment (N or N/5, 0 <= N <= 5); None if absent or out of range."""
    found = _SCORE.findall(text)
    if not found:
        return None
    value, scale = found[-1]
    if scale and float(scale) != MAX_SCORE:
        return None
    value = float(value)
    return value if 0 <= value <= MAX_SCORE else None


def average_score(scores: list[float | None]) -> float | None:
    """Mean over the parsable scores; None when there are none."""
    valid = [s for s in scores if s is not None]
    return sum(valid) / len(valid) if valid else None


def _score_text(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else f"{score:g}"


def eft_example(prompt: str, response: str, justification: str, score: float) -> dict:
    """A judge-training (EFT) record: the judge prompt -> the justification ending in "Score: s".

    Any score line already in `justification` is removed, so the record ends with exactly one.
    """
    if not 0 <= score <= MAX_SCORE:
        raise ValueError(f"score must be within 0..{MAX_SCORE}, not {score}")
    body = "\n".join(line for line in justification.strip().splitlines() if not _SCORE.search(line)).strip()
    return {"prompt": judge_prompt(prompt, response), "response": f"{body}\nScore: {_score_text(score)}".strip()}


def judge(model, tokenizer, pairs: list[tuple[str, str]], cfg: JudgeConfig | None = None) -> list[Judgment]:
    """k judgments of each (prompt, response) pair by `model`, parsed and averaged."""
    from .models import format_prompt
    from .sampling import generate

    cfg = cfg or JudgeConfig()
    prompts = [judge_prompt(p, r) for p, r in pairs]
    if cfg.chat:
        prompts = [format_prompt(tokenizer, p) for p in prompts]
    groups = generate(model, tokenizer, prompts, n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size)
    out = []
    for group in groups:
        texts = [c.text for c in group]
        scores = [parse_score(t) for t in texts]
        out.append(Judgment(texts=texts, scores=scores, score=average_score(scores)))
    return out
