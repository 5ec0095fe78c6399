"""Iterative Reasoning Preference Optimization (Pang et al. 2024, arXiv 2404.19733).

    for t = 1..T:
        sample N chain-of-thought solutions per training question from M_{t-1} (N 30 GSM8K / ARC, 20 MATH),
        at that iteration's temperature (GSM8K 0.8, 0.8, 1.3, 1.3); reward 1 iff the final answer is right;
        pairs: winner a correct sample, loser an incorrect one, K per question (10 GSM8K, 20 ARC, 15 MATH);
        questions without a correct or without an incorrect sample give none; unfinished samples are dropped;
        train M_t from M_{t-1} (its log-probs, computed once, are the reference) with
            L = −log σ(β·[log M_θ(w|x)/M_{t-1}(w|x) − log M_θ(l|x)/M_{t-1}(l|x)]) + α·(−log M_θ(w|x)/|w|)
        with β 0.1, α 1; evaluate M_t on the test split (reported) and keep the iteration best on 1k
        questions held out from training (the validation split; min(1000, 10 %) by default).

Run: `lite-selftrain rpo --config examples/rpo_gsm8k_150m.toml --out runs/x`.
Defaults: iterations, temperatures and K follow the task (`PAPER`: GSM8K, ARC, MATH; any other task gets
GSM8K's); N is 30 for every task (MATH's 20 is set by examples/rpo_math_150m.toml).
Simplification: the K pairs are drawn at random among all (winner, loser) combinations of a question's
distinct texts.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from ..config import Count, Name, PositiveInt, check_fields
from ..errors import UserError
from ..evaluate import EvalConfig
from ..models import ModelConfig
from ..sampling.generate import SamplingConfig, Temperature, generate, group_by_prompt, sampled
from ..store import SAMPLE_FIELDS, SAMPLE_KEY, SCORED_FIELDS, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from .common import Iterates, Run, check_trainable, write_stage
from .shared import (
    Scored,
    distinct,
    finished,
    preference_pair,
    problems_for,
    sampler_metrics,
    task_splits,
    verifier_eval,
)

# the paper's schedule per task (ALGORITHMS.md §2): iterations, temperature per iteration, K pairs
PAPER = {"gsm8k": {"iterations": 4, "temperatures": [0.8, 0.8, 1.3, 1.3], "pairs_per_problem": 10},
         "arc": {"iterations": 3, "temperatures": [0.8, 0.8, 1.3], "pairs_per_problem": 20},
         "math": {"iterations": 3, "temperatures": [0.8, 0.8, 1.0], "pairs_per_problem": 15}}


@dataclass
class RPOConfig:
    task: Name = "gsm8k"
    task_options: dict = field(default_factory=dict)  # passed to get_task: shots (reasoning tasks: 4), ...
    train_path: Name | None = None  # local data file; None: the task's own source
    test_path: Name | None = None
    problems_per_iteration: PositiveInt | None = None  # None: every training question each iteration
    iterations: Count | None = None  # None: the paper's for the task (PAPER; GSM8K's 4 for other tasks)
    temperatures: list[Temperature] | None = None  # per iteration; None: the paper's; [] keeps sample's
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n=30, temperature=0.8))  # N 30, no top-k; temperatures (when set) replace its temperature
    pairs_per_problem: PositiveInt | None = None  # K; None: the paper's for the task
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        objective="dpo_nll", beta=0.1, alpha=1.0, reference="current"))  # the reference is M_{t-1}
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # which problems each iteration draws, which pairs are kept

    def __post_init__(self):
        for key, value in PAPER.get(self.task, PAPER["gsm8k"]).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_fields(self)
        check_trainable(self.model, ("train.", self.train))
        if self.train.objective != "dpo_nll":
            raise UserError("Iterative RPO trains with objective 'dpo_nll' (alpha = 0 gives plain DPO)")

    def temperature(self, iteration: int) -> float:
        """Iteration's sampling temperature: the schedule's, its last one past its end."""
        return self.temperatures[min(iteration, len(self.temperatures)) - 1] if self.temperatures else \
            self.sample.temperature


def correct_vs_incorrect(scored: Scored, pairs_per_problem: int, seed: int) -> tuple[list[dict], dict]:
    """(up to K (correct, incorrect) pairs per question, summary with why each question gave none)."""
    rng = random.Random(f"{seed}/{scored.iteration}/pairs")
    done = finished(scored.samples)
    dropped = {"too_long": len(scored.samples) - len(done), "no_correct": 0, "no_incorrect": 0}
    records = []
    for index, group in sorted(group_by_prompt(done).items()):
        wins = distinct([s for s in group if s["reward"] > 0])
        losses = distinct([s for s in group if s["reward"] <= 0])
        if not wins or not losses:
            dropped["no_correct" if not wins else "no_incorrect"] += 1
            continue
        combos = list(itertools.product(range(len(wins)), range(len(losses))))
        pairs = [preference_pair(scored.prompts[index], wins[w], losses[l])
                 for w, l in rng.sample(combos, min(pairs_per_problem, len(combos)))]
        records += [p for p in pairs if p is not None]  # a text both right and wrong (a flaky check) pairs never
    return records, {"dataset_size": len(records), "pairs": len(records),
                     "problems_kept": len({r["prompt"] for r in records}), "dropped": dropped}


def run(cfg: RPOConfig, out, *, restart: bool = False, progress: bool = True, name: str = "rpo", build=None):
    """Run (or resume) Iterative RPO in `out`; returns (one metrics record per iteration, the best one).

    `build(scored: Scored) -> (records, summary)` replaces `correct_vs_incorrect`: the one place a caller
    changes what DPO trains on. `name` names the run's folder and its metrics records.
    """
    job = Run(out, name, cfg, restart=restart)
    task = get_task(cfg.task, **cfg.task_options)
    train_set, valid_set, test_set = task_splits(task, cfg)
    sampling = cfg.sample.for_task(task)
    models = Iterates(job, cfg.model)
    evaluate = verifier_eval(job, models, task, valid_set, test_set, cfg.eval)
    build = build or (lambda scored: correct_vs_incorrect(scored, cfg.pairs_per_problem, cfg.seed))

    def problems(t):
        return problems_for(train_set, t, cfg.problems_per_iteration, cfg.seed)

    def sample(t):  # N chains of thought per question from M_{t-1}, at iteration t's temperature
        prompts = [task.prompt(p) for p in problems(t)]
        at_t = sampling.replace(temperature=cfg.temperature(t), seed=sampling.seed + t)
        return sampled(generate(*models.sampler(t - 1), prompts, at_t, out=job.dir(t) / "samples.jsonl",
                                progress=progress))

    def score(t):  # reward 1 iff the final answer is right
        samples = read_jsonl(job.dir(t) / "samples.jsonl", SAMPLE_FIELDS, len(problems(t)), SAMPLE_KEY)
        scored, info = task.score_samples(samples, problems(t))
        return write_stage(job.dir(t) / "scored.jsonl", scored, info)

    def pair(t):  # (correct, incorrect) pairs, K per question
        prompts = [task.prompt(p) for p in problems(t)]
        samples = read_jsonl(job.dir(t) / "scored.jsonl", SCORED_FIELDS, len(prompts), SAMPLE_KEY)
        scored = Scored(t, prompts, samples, sampler=lambda: models.get(t - 1))
        return write_stage(job.dir(t) / "dataset.jsonl", *build(scored))

    def dpo_nll(t):  # from M_{t-1}, whose log-probs before the first step are the reference
        return models.fit(t, *models.get(t - 1), cfg.train, progress=progress)

    job.once(0, "eval", evaluate)
    job.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        job.once(t, "sample", sample)
        job.once(t, "score", score)
        job.once(t, "build", pair)
        job.once(t, "train", dpo_nll)
        job.once(t, "eval", evaluate)
        job.log(t, "eval", "build", **sampler_metrics(job.summaries[t]["score"]), temperature=cfg.temperature(t))
    models.close()
    return job.finish(cfg.eval.select_on, validation=len(valid_set))
