"""What the recipes do the same way: split the problems, evaluate an iterate, and the small rules of turning
samples into training records.

    train, valid, test = task_splits(task, cfg)             ReST-EM, RPO: a task with a verifier
    evaluate = verifier_eval(job, models, task, valid, test, cfg.eval)      pass@k on test and validation
    train, valid, test = instruction_splits(records, cfg, task)             the judged recipes' prompts
    evaluate = judge_eval(models, judge_model, judge, answer, valid, test)  one fixed judge for every iterate
                                       (a model, or a server's: open_endpoint checks it before the run)
    Scored(t, prompts, samples, sampler)                    what a dataset builder (a `build=` hook) reads

`finished`, `distinct` and `preference_pair` are the rules every builder shares: a length-capped sample
is never training data, a repeated text counts once, and two identical texts never make a pair.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from ..evaluate import EvalConfig, heldout, validation_count
from ..judge import Endpoint, EndpointConfig, JudgeConfig, is_endpoint, judged_eval
from ..sampling import SamplingConfig
from ..training.batching import sampled_ids
from .common import Iterates, Run

# ----------------------------------------------------------------------------------------------------
# the rules of building a dataset


@dataclass
class Scored:
    """Iteration t's scored samples: what a dataset builder reads (`rest_em.run(..., build=)`)."""

    iteration: int
    prompts: list[str]  # iteration t's training prompts, by prompt_index
    samples: list[dict]  # {prompt_index, sample_index, text, finish_reason, reward, ...}
    sampler: Callable[[], tuple] | None = None  # () -> (model, tokenizer) of M_{t-1}, which drew them


def finished(samples: list[dict]) -> list[dict]:
    """The samples that ended on their own: a length-capped one is cut mid-answer, never training data."""
    return [s for s in samples if s["finish_reason"] != "length"]


def distinct(samples: list[dict]) -> list[dict]:
    """One sample per text (in first-seen order): a repeated text would weigh, or pair, twice."""
    return list({s["text"]: s for s in samples}.values())


def preference_pair(prompt: str, chosen: dict, rejected: dict, **extra) -> dict | None:
    """A DPO record of two samples, with the sampler's token ids; None when their texts are the same (the
    DPO margin of identical texts is zero whatever the weights: the pair teaches nothing)."""
    if chosen["text"] == rejected["text"]:
        return None
    return {"prompt": prompt, "chosen": chosen["text"], "rejected": rejected["text"], **extra,
            **sampled_ids("chosen", chosen), **sampled_ids("rejected", rejected)}


def sampler_metrics(score_summary: dict) -> dict:
    """The score stage's summary for iteration t's metrics record, named for whose accuracy it is: the
    samples were drawn by M_{t-1}, so `sampler_accuracy` (older run folders logged it as `train_accuracy`)."""
    names = {"train_accuracy": "sampler_accuracy", "train_coverage": "sampler_coverage"}
    return {names.get(k, k): v for k, v in score_summary.items() if k != "seconds"}


# ----------------------------------------------------------------------------------------------------
# splits


def split_validation(problems: list, size: int | None, seed: int, cap: int = 1000) -> tuple[list, list]:
    """(training problems, validation problems): a seeded draw of `validation_count` problems is held out
    to choose the best iteration on; the rest, in their order, are trained on."""
    count = validation_count(len(problems), size, cap)
    held = set(random.Random(f"{seed}/validation").sample(range(len(problems)), count))
    return ([p for i, p in enumerate(problems) if i not in held],
            [p for i, p in enumerate(problems) if i in held])


def problems_for(train_set: list[dict], iteration: int, per_iteration: int | None, seed: int) -> list[dict]:
    """The training problems of an iteration: all of them, or a fresh slice of a seeded shuffle."""
    if not per_iteration:
        return train_set
    order = list(range(len(train_set)))
    random.Random(seed).shuffle(order)
    start = ((iteration - 1) * per_iteration) % max(len(train_set), 1)
    return [train_set[order[(start + i) % len(order)]] for i in range(min(per_iteration, len(order)))]


def task_splits(task, cfg) -> tuple[list, list, list]:
    """(training, validation, test) problems of a recipe on a task with a verifier: the validation split is
    held out of the training problems (`cfg.eval.validation_size`, by `cfg.seed`) and alone picks the best
    iteration; the test split only reports."""
    train_set, test_set = task.load("train", cfg.train_path), task.load(cfg.eval.split, cfg.test_path)
    train_set, valid_set = split_validation(train_set, cfg.eval.validation_size, cfg.seed)
    return train_set, valid_set, test_set


def instruction_splits(records: list[dict], tests: list[dict] | None, *, eval_size: int,
                       validation_size: int | None, seed: int, recipe: str) -> tuple[list, list, list]:
    """(training records, validation prompts, test prompts) of a judged recipe: the test prompts are the
    first `eval_size` of `tests`, else the last `eval_size` records; the validation prompts a seeded draw of
    the rest (min(eval_size, 10 %) unless `validation_size`), each answered and judged every iteration."""
    if tests is not None:
        test = [r["prompt"] for r in tests][:eval_size]
    else:
        records, test = records[:-eval_size], [r["prompt"] for r in records[-eval_size:]]
    if len(records) < 2:
        raise UserError(f"{recipe} needs more records than eval_size ({eval_size}) + 1")
    records, valid = split_validation(records, validation_size, seed, cap=eval_size)
    return records, [r["prompt"] for r in valid], test


# ----------------------------------------------------------------------------------------------------
# evaluation of an iterate


def verifier_eval(job: Run, models: Iterates, task, valid_set: list, test_set: list, cfg: EvalConfig):
    """`evaluate(t)`: iterate t's greedy pass@1 and sampled pass@k / maj@k on the test split (reported) and
    the validation split (`valid_` metrics, which choose), per-problem records under iter_NN/eval/."""

    def evaluate(t: int) -> dict:
        model, tok = models.sampler(t)
        folder = job.dir(t) / "eval"
        return {**heldout(model, tok, task, test_set, cfg, folder),
                **heldout(model, tok, task, valid_set, cfg, folder / "valid", prefix="valid_")}

    return evaluate


def open_endpoint(job: Run, name: str | None, cfg: EndpointConfig, ledger: str) -> Endpoint | None:
    """The server model `name` names ("openai:<model>@<base_url>"), checked before anything is paid for, its
    replies kept in the run folder's `ledger`; None for a local model."""
    if not is_endpoint(name):
        return None
    endpoint = Endpoint(name, cfg, ledger=job.store.root / ledger)
    endpoint.check()
    return endpoint


def judge_eval(models: Iterates, judge_model: str | None, judge: JudgeConfig, answer: SamplingConfig,
               valid: list[str], test: list[str], *, rubrics: tuple[str, ...] = (),
               endpoint: EndpointConfig | None = None):
    """`evaluate(t)`: iterate t's greedy answers to the test and validation prompts, every iterate graded by
    ONE fixed judge (the model or endpoint `judge_model`, else M_0), so that scores compare across iterations;
    `rubrics` grade the same answers too. An endpoint is checked here, before the run samples anything, and
    its judgments are kept in the run folder's judgments.jsonl."""
    remote = open_endpoint(models.run, judge_model, endpoint or EndpointConfig(), "judgments.jsonl")

    def evaluate(t: int) -> dict:
        model, tok = models.sampler(t)
        fixed = (remote, None) if remote else models.other_sampler(judge_model, 0)
        return {**judged_eval(model, tok, test, judge, answer, judge_with=fixed, rubrics=rubrics),
                **judged_eval(model, tok, valid, judge, answer, judge_with=fixed, prefix="valid_", rubrics=rubrics),
                "judge": remote.id if remote else judge_model or "iteration 0"}

    return evaluate
