"""The demo's judging task: a rubric a 140k-parameter model can learn, and how its judge agrees with the verifier.

The judge prompt is the problem and the answer ("3+5+2+8=8,10,17#17|"); the judgment re-computes the sum
one explicit addition at a time, sets the total beside the answer's final number, then compares them digit
by digit, each digit of the total beside the answer's and a mark (y/n):

    03+05=08,08+02=10,10+08=18#18/17:11y87n
    Score: 1

Every number is written in two digits and every compared pair is adjacent: equality of two neighbouring
tokens is what a model this small learns (docs/demo.md). The rubric (additive, 0-5): +1 the answer ends in
a final number, +4 if it is the sum; so an EFT score is exactly the hidden verifier's verdict (5 or at most
1), with the verifier's own check as the justification. Not checked: the answer's running sums. A mean of
the k judged scores at or above `CORRECT_AT` is the judge saying "correct"; `agreement` compares that with
the verifier (balanced accuracy too: most answers are wrong, so raw agreement flatters a judge that always
says "wrong").
"""

from __future__ import annotations

import random
import re

from ..judge import JudgeConfig, eft_example

TEMPLATE = "{prompt}{response}|"  # the judge prompt: the problem, the answer, a separator
CORRECT_AT = 3.0  # a mean judged score at or above it says "correct" (5 for a correct answer, else 0 or 1)
_FINAL = re.compile(r"#\s*(-?\d+)")  # the final number, after the answer marker (as the task reads it)


def numbers_of(question: str) -> list[int]:
    """The terms of a problem from its prompt ("3+5+2+8=" -> [3, 5, 2, 8])."""
    return [int(x) for x in re.findall(r"\d+", question.split("=", 1)[0])]


def rubric(numbers: list[int], response: str) -> tuple[str, int]:
    """(the judgment's check written out, its 0-5 score) of `response` to the sum of `numbers`."""
    steps, total = [], numbers[0]
    for term in numbers[1:]:
        steps.append(f"{total:02d}+{term:02d}={total + term:02d}")
        total += term
    found = _FINAL.findall(response.split("\n", 1)[0])
    if not found:
        return ",".join(steps) + "#--n", 0
    final = int(found[-1])
    width = max(2, len(str(final)), len(str(total)))
    pairs = [f"{a}{b}{'y' if a == b else 'n'}" for a, b in zip(f"{total:0{width}d}", f"{final:0{width}d}")]
    return ",".join(steps) + f"#{total:02d}/{final:02d}:{''.join(pairs)}", 1 + 4 * (final == total)


def eft_records(examples: list[dict], scored: list[dict]) -> list[dict]:
    """Judge-training records (prompt, response, justification, score) of sampled answers to `examples`."""
    out = []
    for s in scored:
        ex = examples[s["prompt_index"]]
        justification, score = rubric(ex["numbers"], s["text"])
        out.append({"prompt": ex["question"], "response": s["text"], "justification": justification,
                    "score": score, "reward": s["reward"]})
    return out


def judge_config(k: int, seed: int) -> JudgeConfig:
    """k judgments per answer, sampled as the recipe's judge (T 0.7, top-p 0.9), long enough for a check."""
    cfg = JudgeConfig(template=TEMPLATE, chat=False)
    cfg.sample = cfg.sample.replace(n=k, max_new_tokens=64, batch_size=256, seed=seed)
    return cfg


def agreement(judged: list[dict], verified: list[bool], prefix: str = "judge_") -> dict:
    """How the judge's verdicts (mean score >= CORRECT_AT) agree with the hidden verifier's."""
    says = [j["score"] is not None and j["score"] >= CORRECT_AT for j in judged]
    pos = [s for s, v in zip(says, verified) if v]
    neg = [not s for s, v in zip(says, verified) if not v]
    tpr = sum(pos) / len(pos) if pos else None
    tnr = sum(neg) / len(neg) if neg else None
    return {f"{prefix}agreement": sum(s == v for s, v in zip(says, verified)) / max(len(says), 1),
            f"{prefix}balanced_accuracy": (tpr + tnr) / 2 if pos and neg else None,
            f"{prefix}true_positive_rate": tpr, f"{prefix}true_negative_rate": tnr,
            f"{prefix}answers_correct": len(pos) / max(len(says), 1)}


def verify(task, judged: list[dict]) -> list[bool]:
    """The hidden verifier's verdict on each judged answer (its problem read back from its prompt)."""
    return [task.reward(j["text"], task.make(numbers_of(j["prompt"]))) > 0 for j in judged]


def judge_pairs(eft: list[dict], count: int, seed: int, iteration: int) -> list[dict]:
    """`count` EFT records as DPO pairs, drawn afresh each iteration: chosen the verifier's judgment,
    rejected the same check ending in the opposite verdict (5 <-> 1). Without them the answer pairs alone
    train the judging away within two iterations (docs/demo.md)."""
    rng = random.Random(f"{seed}/{iteration}/judge_pairs")
    out = []
    for r in rng.sample(eft, min(count, len(eft))):
        good = eft_example(r["prompt"], r["response"], r["justification"], r["score"], TEMPLATE)
        bad = eft_example(r["prompt"], r["response"], r["justification"], 1 if r["score"] == 5 else 5, TEMPLATE)
        out.append({"prompt": good["prompt"], "chosen": good["response"], "rejected": bad["response"]})
    return out
