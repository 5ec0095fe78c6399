"""Evaluation: pass@k, maj@k and accuracy over a task split, with one record per problem.

- pass@k (Chen et al. 2021): the chance that at least one of k samples drawn without replacement from
  n is correct, given c correct: 1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i)
  so that no huge binomial coefficient is ever formed.
- maj@k: the answer given most often among the first k samples (grouped by the task's normalised
  `extract_answer`; samples without an answer do not vote) is correct. Ties share the credit: with t tied
  answers of which one is correct, the problem scores 1/t (the expected value of a random tie-break).
- accuracy: the mean reward over all samples (with greedy decoding and n = 1 it equals pass@1).

Usage:
    metrics = evaluate(model, tok, task, task.load("test", path), SamplingConfig(n=8, temperature=0.7),
                       ks=[1, 4, 8], out_dir="runs/x/eval")  # writes metrics.json and problems.jsonl there
    metrics = heldout(model, tok, task, test_set, EvalConfig(), "runs/x/eval")  # what the recipes report
    metrics = heldout(model, tok, task, valid_set, EvalConfig(), "runs/x/valid", prefix="valid_")  # what they
    # choose on: training problems held out (validation_count), never trained on

Simplification: maj@k uses the first k samples, not an average over all k-subsets of the n.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import distributed as dist
from .config import Name, PositiveInt, check_fields
from .errors import UserError
from .sampling import SamplingConfig, generate
from .store import atomic_write_json, write_jsonl


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy pass@1, plus pass@k / maj@k from `sample.n` samples per problem."""

    split: Name = "test"  # held-out problems, never trained on
    limit: PositiveInt | None = None  # evaluate on the first `limit` test problems (None: all)
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n=8, temperature=0.7, top_k=40, batch_size=32))  # ReST-EM's sampling knobs; n = 1 skips this part
    ks: list[PositiveInt] = field(default_factory=lambda: [1, 4, 8])  # the k of pass@k / maj@k to report
    validation_size: PositiveInt | None = None  # training problems held out to choose on; None: min(1000, 10 %)
    # (the RPO paper selects on 1k held-out training questions); they are never trained on
    select_on: Name = "valid_pass@1"  # a validation metric picks the best iteration; the test split is only reported

    def __post_init__(self):
        check_fields(self)
        if self.sample.n > 1 and not any(k <= self.sample.n for k in self.ks):  # pass@k needs k of n samples
            raise UserError(f"eval.ks must hold a k of at most eval.sample.n = {self.sample.n} (--n), got {self.ks}")
        if not self.select_on.startswith("valid_"):
            raise UserError(f"eval.select_on must be a validation metric (valid_pass@1, valid_maj@8, ...), not "
                            f"'{self.select_on}': the test split is reported, never used to choose")
        if self.select_on not in self.metric_names():
            raise UserError(f"eval.select_on must name a metric this evaluation reports "
                            f"({', '.join(self.metric_names())}), not '{self.select_on}'")

    def metric_names(self) -> list[str]:
        """The validation metrics `heldout` can report with this config: the ones `select_on` may name."""
        ks = [k for k in self.ks if k <= self.sample.n] if self.sample.n > 1 else []
        sampled = ["valid_sampled_pass@1"] + [f"valid_pass@{k}" for k in ks if k != 1] + [f"valid_maj@{k}" for k in ks]
        return ["valid_pass@1", *sampled * (self.sample.n > 1)]


def validation_count(num_problems: int, size: int | None, cap: int = 1000) -> int:
    """How many training problems the validation split takes: `size`, or min(cap, 10 %), at least 1."""
    if num_problems < 2:
        raise UserError(f"{num_problems} training problem(s): a validation split needs at least 2")
    count = size if size is not None else min(cap, max(1, num_problems // 10))
    if count >= num_problems:
        raise UserError(f"validation_size {count} leaves none of the {num_problems} training problems to train on")
    return count


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (numerically stable product form)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(answers: list[str | None], rewards: list[float], k: int) -> float:
    """Reward of the majority answer among the first k samples; ties share the credit; 0 if none answered."""
    if len(answers) != len(rewards):
        raise ValueError("one reward per answer")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [a for a, v in votes.items() if v == top]
    reward_of = {}
    for a, r in zip(answers[:k], rewards[:k]):
        reward_of.setdefault(a, r)  # samples with the same answer share its reward
    return sum(reward_of[a] for a in winners) / len(winners)


def accuracy(rewards: list[float]) -> float:
    return sum(rewards) / len(rewards) if rewards else 0.0


def score_problems(answers: list[list[str | None]], rewards: list[list[float]], ks: list[int]
                   ) -> tuple[dict, list[dict]]:
    """Metrics over problems and one record per problem, from each problem's answers and rewards."""
    if not rewards:
        raise ValueError("no problems to score")
    n = len(rewards[0])
    if any(len(r) != n for r in rewards) or [len(a) for a in answers] != [len(r) for r in rewards]:
        raise ValueError("every problem needs the same number n of samples, with one answer per reward")
    ks = sorted({k for k in ks if k <= n})
    if not ks:
        raise UserError(f"no k in ks is at most n = {n}")
    records = []
    for index, (ans, rew) in enumerate(zip(answers, rewards)):
        correct = sum(r > 0 for r in rew)
        record = {"index": index, "n": n, "correct": correct}
        record.update({f"pass@{k}": pass_at_k(n, correct, k) for k in ks})
        record.update({f"maj@{k}": maj_at_k(ans, rew, k) for k in ks})
        records.append(record)
    metrics = {"problems": len(records), "n": n, "accuracy": accuracy([r for rew in rewards for r in rew])}
    for key in [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks]:
        metrics[key] = sum(r[key] for r in records) / len(records)
    return metrics, records


def evaluate(model, tokenizer, task, examples: list[dict], cfg: SamplingConfig, *, ks: Sequence[int] = (1,),
             out_dir: str | Path | None = None) -> dict:
    """Sample cfg.n completions per example (with the task's stop strings and length), reward them with the
    task, and return the metrics.

    With `out_dir`, writes metrics.json and problems.jsonl (prompt, gold answer, completions, answers,
    rewards and metrics of every problem) there. Under a launcher every rank calls it: sampling and rewards
    are sharded, every rank returns the metrics, rank 0 writes the files.
    """
    if task.needs_judge:
        raise UserError(f"task {task.name} has no automatic reward; evaluate it with the judge")
    if not examples:
        raise UserError("no examples to evaluate")
    n = cfg.n
    prompts = [task.prompt(ex) for ex in examples]
    groups = generate(model, tokenizer, prompts, cfg.for_task(task))
    flat = [(c, ex) for group, ex in zip(groups, examples) for c in group]
    flat_rewards = dist.map_shards(lambda mine: task.rewards([c.text for c, _ in mine], [ex for _, ex in mine]),
                                   flat)  # under a launcher each rank rewards its share
    rewards = [flat_rewards[i * n:(i + 1) * n] for i in range(len(examples))]
    answers = [[task.extract_answer(c.text) for c in group] for group in groups]
    metrics, records = score_problems(answers, rewards, list(ks))
    completions = [c for group in groups for c in group]
    metrics["mean_tokens"] = sum(c.num_tokens for c in completions) / len(completions)
    metrics["truncated"] = sum(c.finish_reason == "length" for c in completions) / len(completions)
    if out_dir is not None and dist.is_main():  # every rank has the metrics; rank 0 writes them
        out = Path(out_dir)
        for record, prompt, ex, group, ans, rew in zip(records, prompts, examples, groups, answers, rewards):
            record.update(prompt=prompt, gold=task.gold_answer(ex), completions=[c.text for c in group],
                          answers=ans, rewards=rew, finish_reasons=[c.finish_reason for c in group])
        write_jsonl(out / "problems.jsonl", records)
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def heldout(model, tokenizer, task, examples: list[dict], cfg: EvalConfig, out_dir: str | Path, *,
            prefix: str = "test_") -> dict:
    """The recipes' held-out metrics: greedy pass@1 plus sampled pass@k / maj@k, named `prefix` + metric.

    For the validation split (`prefix="valid_"`) the sampled part runs only when `cfg.select_on` needs it.
    """
    examples = examples[: cfg.limit] if cfg.limit and prefix == "test_" else examples
    out_dir = Path(out_dir)
    greedy = evaluate(model, tokenizer, task, examples, cfg.sample.replace(n=1, temperature=0.0), ks=[1],
                      out_dir=out_dir / "greedy")
    metrics = {f"{prefix}pass@1": greedy["pass@1"]}
    if cfg.sample.n > 1 and (prefix == "test_" or cfg.select_on != "valid_pass@1"):
        sampled = evaluate(model, tokenizer, task, examples, cfg.sample, ks=cfg.ks, out_dir=out_dir / "sampled")
        metrics.update({f"{prefix}{k}": v for k, v in sampled.items() if k.startswith(("pass@", "maj@"))
                        and k != "pass@1"})
        metrics[f"{prefix}sampled_pass@1"] = sampled["pass@1"]
    return metrics
