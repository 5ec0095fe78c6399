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

`JudgeConfig.template` replaces the rubric prompt for a task with its own (the CPU demo's arithmetic check);
`judged_eval(..., rubrics=("quality", "safety"))` grades the same answers on more scales (rubrics.py). The judge
may be an `Endpoint` (endpoint.py), a model on a server, in place of (model, tokenizer).
Simplifications: one rubric by default (the paper's, in our own words); the model's chat template (when it has one)
wraps the judge prompt, as it wraps every instruction (a server applies its own).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..errors import UserError
from ..models import format_prompt
from ..sampling import SamplingConfig, generate
from .endpoint import Endpoint
from .rubrics import ADDITIVE, rubric

JUDGE_TEMPLATE = ADDITIVE  # the paper's rubric, in our own words (rubrics.py)

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
    texts: list[str | None]  # the k judgments as written; None: the endpoint delivered none
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
    """cfg.sample.n judgments of each (prompt, response) pair by `model` (or an `Endpoint`), parsed and averaged;
    a judgment the endpoint did not deliver is missing (text None), as an unparsable one is."""
    cfg = cfg or JudgeConfig()
    prompts = [judge_prompt(p, r, cfg.template) for p, r in pairs]
    if isinstance(model, Endpoint):  # the server applies its own chat template
        groups = model.texts(prompts, cfg.sample)
    else:
        if cfg.chat:
            prompts = [format_prompt(tokenizer, p) for p in prompts]
        groups = [[c.text for c in group] for group in generate(model, tokenizer, prompts, cfg.sample)]
    out = []
    for texts in groups:
        scores = [parse_score(t) if t is not None else None for t in texts]
        out.append(Judgment(texts=texts, scores=scores, score=average_score(scores)))
    return out


def judged_eval(model, tokenizer, prompts: list[str], cfg: JudgeConfig, answer: SamplingConfig, *,
                judge_with: tuple | None = None, prefix: str = "test_", rubrics: tuple[str, ...] = ()) -> dict:
    """Greedy answers of `model` to held-out prompts (in its chat template), each judged by `judge_with`
    = (judge model, its tokenizer) or (an `Endpoint`, None), or by `model` itself when None. The recipes pass
    one fixed judge for every iterate, so that scores compare across iterations. Metrics are named `prefix` +
    metric (`valid_` for the split that chooses the best iteration); each of `rubrics` (rubrics.RUBRICS names)
    grades the same answers too, as `<prefix><rubric>_score`; an endpoint adds the tokens it was paid."""
    answers = generate(model, tokenizer, [format_prompt(tokenizer, p) for p in prompts],
                       answer.replace(n=1, temperature=0.0))
    judge_model, judge_tokenizer = judge_with or (model, tokenizer)
    before = dict(judge_model.tokens) if isinstance(judge_model, Endpoint) else None
    pairs = [(p, a[0].text) for p, a in zip(prompts, answers)]
    verdicts = judge(judge_model, judge_tokenizer, pairs, cfg)
    parsable = sum(s is not None for v in verdicts for s in v.scores)
    out = {f"{prefix}judge_score": mean_score(verdicts),
           f"{prefix}judge_parsable": parsable / max(len(verdicts) * cfg.sample.n, 1),
           f"{prefix}mean_tokens": sum(a[0].num_tokens for a in answers) / max(len(answers), 1)}
    for name in rubrics:
        graded = judge(judge_model, judge_tokenizer, pairs, dataclasses.replace(cfg, template=rubric(name)))
        out[f"{prefix}{name}_score"] = mean_score(graded)
    if before is not None:
        out[f"{prefix}judge_tokens"] = {k: v - before.get(k, 0) for k, v in judge_model.tokens.items()}
    return out


def mean_score(verdicts: list[Judgment]) -> float | None:
    """The mean of the answers' scores, over the answers that have one."""
    scores = [v.score for v in verdicts if v.score is not None]
    return sum(scores) / len(scores) if scores else None
