"""The demo's self-rewarding chain and its control: the model judges its own sums, and learns from it.

    self_rewarding  lite_selftrain.recipes.self_rewarding on the demo world: M_0 = the warm start trained
                    further on its gold solutions AND on EFT judgments (its own sampled answers, each with
                    the rubric check below and the score the hidden verifier gives); then each iteration
                    answers fresh problems N times, judges every answer k = 3 times, averages, and trains
                    DPO on the best vs the worst answer of each problem;
    random_pairs    its control: the same loop from the same M_0, DPO on as many pairs of its own answers
                    drawn blind to the judge (random chosen / rejected), the same steps.

Both add to each iteration's DPO data as many judge pairs (`judge_pairs`: an EFT judgment against the same
check with the opposite verdict) as answer pairs: a deviation from the paper, whose later iterations train
on answer pairs alone; at this size that trains the judging away within two iterations.

The judging task is made learnable at this size by asking about a property the model can check: is the
final number the sum? The judge prompt is the problem and the answer ("3+5+2+8=8,10,17#17|"); the judgment
re-computes the sum one explicit addition at a time, sets the total beside the answer's final number,
then compares them digit by digit, each digit of the total beside the answer's and a mark (y/n):

    03+05=08,08+02=10,10+08=18#18/17:11y87n
    Score: 1

Every number is written in two digits and every compared pair is adjacent: equality of two neighbouring
tokens is what a model this small learns; comparing whole numbers at a distance it did not (measured:
true-positive rate near 0 after 800 steps).
The rubric (ours, additive, 0-5): +1 the answer ends in a final number, +4 if it is the sum. So the EFT
score is exactly the hidden verifier's verdict (5 or at most 1), with the verifier's own check as the
justification. Not checked: the answer's running sums (the warm start often writes wrong ones and still
the right total, which the verifier passes). A mean of the k judged scores at or above `CORRECT_AT` is the
judge saying "correct"; `agreement` compares that with the verifier (balanced accuracy too: most answers
are wrong, so raw agreement flatters a judge that always says "wrong").

Simplification: the new problems of each iteration are drawn fresh from the world's generator (the same
problems the other chains train on), not written by the model: a 140k-parameter model cannot follow a
few-shot "write one more task" list, and a problem it wrote would need the verifier to be posed at all.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

from ..evaluate import heldout
from ..judge import JudgeConfig, eft_example, judge
from ..models import ModelConfig, load_model
from ..sampling import SamplingConfig, generate, group_by_prompt
from ..store import RunStore, read_jsonl, write_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from . import self_rewarding
from .common import problems_for, split_validation
from .self_rewarding import build_pairs

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
    train the judging away: measured on seed 1, balanced accuracy 81 % at M_0, 59 % after one iteration,
    50 % (chance) after two."""
    rng = random.Random(f"{seed}/{iteration}/judge_pairs")
    out = []
    for r in rng.sample(eft, min(count, len(eft))):
        good = eft_example(r["prompt"], r["response"], r["justification"], r["score"], TEMPLATE)
        bad = eft_example(r["prompt"], r["response"], r["justification"], 1 if r["score"] == 5 else 5, TEMPLATE)
        out.append({"prompt": good["prompt"], "chosen": good["response"], "rejected": bad["response"]})
    return out


def judged_pairs(task, eft: list[dict], seed: int):
    """`pairs` of the self-rewarding chain: the recipe's (best, worst) pairs, as many judge pairs, and how
    its judge agreed with the verifier on this iteration's answers and how often a chosen answer is correct."""

    def pairs(judged: list[dict], iteration: int):
        records, info = build_pairs(judged)
        right = sum(task.reward(r["chosen"], task.make(numbers_of(r["prompt"]))) > 0 for r in records)
        judging = judge_pairs(eft, len(records), seed, iteration)
        return records + judging, {**info, "answer_pairs": len(records), "judge_pairs": len(judging),
                                   "dataset_size": len(records) + len(judging),
                                   **agreement(judged, verify(task, judged), "train_judge_"),
                                   "chosen_correct": right / max(len(records), 1)}

    return pairs


def random_pairs(task, eft: list[dict], sizes: list[int], seed: int):
    """`pairs` of the control: as many answer pairs as the chain had at that iteration (`sizes`), each two
    distinct finished answers to one problem, which is chosen drawn blind to the judge; the same judge pairs."""

    def pairs(judged: list[dict], iteration: int):
        rng = random.Random(f"{seed}/{iteration}/random_pairs")
        pool = []
        for _, group in sorted(group_by_prompt(judged).items()):
            distinct = list({s["text"]: s for s in group if s["finish_reason"] != "length"}.values())
            if len(distinct) >= 2:
                pool.append(rng.sample(distinct, 2))
        size = sizes[iteration - 1] if len(sizes) >= iteration else len(pool)
        kept = rng.sample(pool, min(size, len(pool)))
        records = [{"prompt": a["prompt"], "chosen": a["text"], "rejected": b["text"]} for a, b in kept]
        right = sum(task.reward(r["chosen"], task.make(numbers_of(r["prompt"]))) > 0 for r in records)
        judging = judge_pairs(eft, size, seed, iteration)
        return records + judging, {"pairs": len(records), "answer_pairs": len(records), "judge_pairs": len(judging),
                                   "dataset_size": len(records) + len(judging),
                                   "dropped": {"no_two_answers": len(group_by_prompt(judged)) - len(pool)},
                                   **agreement(judged, verify(task, judged), "train_judge_"),
                                   "chosen_correct": right / max(len(records), 1)}

    return pairs


def m0_data(cfg, warm: Path, gold: list[dict], folder: Path) -> Path:
    """M_0's data in `folder`, written once: ift.jsonl (the gold solutions), eft.jsonl (the warm start's
    sampled answers to `eft_problems` fresh training problems, judged by the rubric, the correct ones
    `eft_correct_repeat` times), and judge_set.jsonl (its answers to the test problems: the fixed set every
    iterate's judge is measured on), the last one marking the folder complete."""
    if not (folder / "judge_set.jsonl").exists():
        task = get_task("arith", terms=cfg.terms, seed=cfg.seed)
        model, tok = load_model(ModelConfig(name=str(warm), mode="full"))
        knobs = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, batch_size=256).for_task(task)
        for name, examples, n, seed in (
                ("eft", task.load("train", n=cfg.eft_problems, seed=cfg.seed + 777), cfg.eft_samples, 1),
                ("judge_set", task.load("test", n=cfg.test_problems), cfg.judge_set_samples, 2)):
            groups = generate(model, tok, [task.prompt(ex) for ex in examples],
                              knobs.replace(n=n, seed=cfg.seed + seed))
            answers = [{"prompt_index": i, "sample_index": j, "text": c.text, "finish_reason": c.finish_reason}
                       for i, group in enumerate(groups) for j, c in enumerate(group)]
            records = eft_records(examples, task.score_samples(answers, examples)[0])
            if name == "eft":  # about 16 % are correct: repeated, the judge sees more of what a "y" looks like
                records += [r for r in records if r["reward"] > 0] * (cfg.eft_correct_repeat - 1)
                write_jsonl(folder / "ift.jsonl", gold)
            write_jsonl(folder / f"{name}.jsonl", records)
    return folder


def run_chain(cfg, name: str, out: Path, warm: Path, gold: list[dict], base, *, sizes: list[int],
              progress: bool = True):
    """Run (or resume) the `self_rewarding` chain or its `random_pairs` control in out/name, on the same
    problems, sampling and held-out evaluation as `base` (the demo's ReST-EM config)."""
    task = get_task(base.task, **base.task_options)
    train_set, valid_set = split_validation(task.load("train"), base.eval.validation_size, cfg.seed)
    test_set = task.load("test")
    data = m0_data(cfg, warm, gold, out / "self_rewarding" / "m0_data")
    judge_set = read_jsonl(data / "judge_set.jsonl")
    grading = judge_config(cfg.judgments, cfg.seed)
    chain_out = out / name

    def prompts(t):  # fresh problems from the world's generator, the other chains' problems
        problems = problems_for(train_set, t, cfg.problems_per_iteration, cfg.seed)
        return [{"prompt": task.prompt(p)} for p in problems], {"prompts_kept": len(problems)}

    def evaluate(model, tok, t):  # held-out pass@1 as every chain, and this iterate's judge on a fixed set
        d = RunStore(chain_out).iteration_dir(name, t) / "eval"
        verdicts = judge(model, tok, [(r["prompt"], r["response"]) for r in judge_set], grading)
        return {**heldout(model, tok, task, test_set, base.eval, d),
                **heldout(model, tok, task, valid_set, base.eval, d / "valid", prefix="valid_"),
                **agreement([{"score": v.score} for v in verdicts], [r["reward"] > 0 for r in judge_set])}

    m0 = RunStore(out / "self_rewarding").iteration_dir("self_rewarding", 0) / "model"
    recipe = self_rewarding.SelfRewardConfig(
        ift_path=str(data / "ift.jsonl"), eft_path=str(data / "eft.jsonl"), eval_size=1,
        skip_sft=name != "self_rewarding",  # the control starts from the chain's M_0
        model=ModelConfig(name=str(warm if name == "self_rewarding" else m0), mode="full"),
        sft=TrainConfig(objective="sft", lr=cfg.m0_lr, max_steps=cfg.m0_steps, batch_size=cfg.batch_size,
                        grad_accum=1, max_length=128, checkpoint_every=100, log_every=50, group_window=1,
                        seed=cfg.seed),
        iterations=cfg.iterations,
        respond=dataclasses.replace(base.sample.for_task(task), n=cfg.samples),
        judge=grading,
        train=TrainConfig(objective="dpo_nll", lr=cfg.rpo_lr, max_steps=cfg.rpo_steps, batch_size=cfg.batch_size,
                          grad_accum=1, max_length=128, checkpoint_every=50, log_every=25, beta=0.1,
                          alpha=cfg.sr_alpha, group_window=1, seed=cfg.seed),
        seed=cfg.seed)
    eft = read_jsonl(data / "eft.jsonl")
    pairs = judged_pairs(task, eft, cfg.seed) if name == "self_rewarding" else random_pairs(task, eft, sizes, cfg.seed)
    return self_rewarding.run(recipe, chain_out, progress=progress, name=name, prompts=prompts, pairs=pairs,
                              evaluate=evaluate, select_on="valid_pass@1", validation=len(valid_set))
