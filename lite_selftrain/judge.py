"""LLM-as-a-Judge (Yuan et al. 2024, Self-Rewarding LMs): the additive 5-point rubric, score parsing,
k judgments averaged, and judge-training (EFT) examples.

The model reads JUDGE_TEMPLATE filled with a (prompt, response) pair, writes a short justification and
ends with "Score: <0-5>". `parse_score` takes the LAST such line; k judgments (paper: 3) are averaged
over the parsable ones only: an unparsable judgment is missing, never a zero, or it would turn a good
response into the "rejected" one of a preference pair.

Usage:
    from lite_selftrain.judge import JudgeConfig, judge
    results = judge(model, tokenizer, [(prompt, response), ...], JudgeConfig())   # k = sample.n = 3
    results[0].score  # mean of the parsable scores, or None
    metrics = judged_eval(model, tokenizer, prompts, JudgeConfig(), answer=SamplingConfig(max_new_tokens=256),
                          judge_with=(judge_model, judge_tokenizer))   # one fixed judge for every iterate

`JudgeConfig.template` replaces the rubric prompt for a task with its own (the CPU demo's arithmetic check).
Simplifications: one rubric by default (the paper's, in our own words); the model's chat template (when it has one)
wraps the judge prompt, as it wraps every instruction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UserError
from .models import format_prompt
from .sampling import SamplingConfig, generate

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
    # k = sample.n judgments per response, averaged (the paper's 3), sampled like responses (T 0.7, top-p
    # 0.9); 256 new tokens hold a justification of under 100 words plus the score line
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n=3, temperature=0.7, top_p=0.9, max_new_tokens=256, batch_size=16))
    chat: bool = True  # wrap the judge prompt in the tokenizer's chat template when it has one
    template: str = JUDGE_TEMPLATE  # the judge prompt, with {prompt} and {response}: the paper's rubric, or a
    # task's own (the CPU demo's compact arithmetic rubric)

    def __post_init__(self):
        if "{prompt}" not in self.template or "{response}" not in self.template:
            raise UserError("judge.template must contain {prompt} and {response}")


@dataclass
class Judgment:
    texts: list[str]  # the k judgments as written
    scores: list[float | None]  # parse_score of each
    score: float | None  # mean of the parsable scores, None when none parsed


def judge_prompt(prompt: str, response: str, template: str = JUDGE_TEMPLATE) -> str:
    return template.format(prompt=prompt.strip(), response=response.strip())


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


def eft_example(prompt: str, response: str, justification: str, score: float,
                template: str = JUDGE_TEMPLATE) -> dict:
    """A judge-training (EFT) record: the judge prompt -> the justification ending in "Score: s".

    Any score line already in `justification` is removed, so the record ends with exactly one.
    """
    if not 0 <= score <= MAX_SCORE:
        raise ValueError(f"score must be within 0..{MAX_SCORE}, not {score}")
    body = "\n".join(line for line in justification.strip().splitlines() if not _SCORE.search(line)).strip()
    return {"prompt": judge_prompt(prompt, response, template),
            "response": f"{body}\nScore: {_score_text(score)}".strip()}


def judge(model, tokenizer, pairs: list[tuple[str, str]], cfg: JudgeConfig | None = None) -> list[Judgment]:
    """cfg.sample.n judgments of each (prompt, response) pair by `model`, parsed and averaged."""
    cfg = cfg or JudgeConfig()
    prompts = [judge_prompt(p, r, cfg.template) for p, r in pairs]
    if cfg.chat:
        prompts = [format_prompt(tokenizer, p) for p in prompts]
    groups = generate(model, tokenizer, prompts, cfg.sample)
    out = []
    for group in groups:
        texts = [c.text for c in group]
        scores = [parse_score(t) for t in texts]
        out.append(Judgment(texts=texts, scores=scores, score=average_score(scores)))
    return out


def judged_eval(model, tokenizer, prompts: list[str], cfg: JudgeConfig, answer: SamplingConfig, *,
                judge_with: tuple | None = None, prefix: str = "test_") -> dict:
    """Greedy answers of `model` to held-out prompts (in its chat template), each judged by `judge_with`
    = (judge model, its tokenizer), or by `model` itself when None. The recipes pass one fixed judge for
    every iterate, so that scores compare across iterations. Metrics are named `prefix` + metric (`valid_`
    for the split that chooses the best iteration)."""
    answers = generate(model, tokenizer, [format_prompt(tokenizer, p) for p in prompts],
                       answer.replace(n=1, temperature=0.0))
    judge_model, judge_tokenizer = judge_with or (model, tokenizer)
    verdicts = judge(judge_model, judge_tokenizer, [(p, a[0].text) for p, a in zip(prompts, answers)], cfg)
    scores = [v.score for v in verdicts if v.score is not None]
    parsable = sum(s is not None for v in verdicts for s in v.scores)
    return {f"{prefix}judge_score": sum(scores) / len(scores) if scores else None,
            f"{prefix}judge_parsable": parsable / max(len(verdicts) * cfg.sample.n, 1),
            f"{prefix}mean_tokens": sum(a[0].num_tokens for a in answers) / max(len(answers), 1)}
