"""ReST-EM (Singh et al. 2023, "Beyond Human Data", arXiv 2312.06585): expectation-maximisation with a
binary reward.

    for t = 1..T:
        E-step: draw N solutions per training problem from M_{t-1} (top-k 40, T 0.7), score them 0/1,
                keep the correct ones, at most 10 per problem (so easy problems do not dominate);
        M-step: fine-tune the BASE model (not M_{t-1}) on that data with the reward-weighted NLL
                J(θ) = Σ r(x, y) · log p_θ(y | x), loss on the response only → M_t;
        evaluate M_t on the test split (reported) and on a validation split held out from the training
        problems; keep the iteration best on validation (small sets over-fit after a few).

Run: `lite-selftrain rest-em --config examples/rest_em_gsm8k_150m.toml --out runs/x`.
Simplification: unfinished (length-capped) samples are dropped before the reward.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import Count, Name, PositiveInt, check_fields
from ..errors import UserError
from ..evaluate import EvalConfig
from ..models import ModelConfig
from ..sampling import SamplingConfig, generate, group_by_prompt, sampled
from ..store import SAMPLE_FIELDS, SAMPLE_KEY, SCORED_FIELDS, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from ..training.batching import sampled_ids
from .common import Iterates, Run, check_trainable, write_stage
from .shared import Scored, finished, problems_for, sampler_metrics, task_splits, verifier_eval


@dataclass
class RestEMConfig:
    task: Name = "gsm8k"
    task_options: dict = field(default_factory=dict)  # passed to get_task: shots (reasoning tasks: 4), terms, ...
    train_path: Name | None = None  # local data file; None: the task's own source
    test_path: Name | None = None
    problems_per_iteration: PositiveInt | None = None  # None: every training problem each iteration
    iterations: Count = 3  # the paper's MATH gains came in 3 iterations; APPS peaked after 1
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n=32, temperature=0.7, top_k=40))  # the paper's E-step: N 32, T 0.7, top-k 40; iteration t adds t to seed
    max_per_problem: PositiveInt = 10  # the paper's cap per problem
    train: TrainConfig = field(default_factory=lambda: TrainConfig(objective="rwnll"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # which problems each iteration draws, which correct samples the cap keeps

    def __post_init__(self):
        check_fields(self)
        check_trainable(self.model, ("train.", self.train))
        if self.train.objective not in ("rwnll", "sft"):
            raise UserError("ReST-EM trains with objective 'rwnll' (or 'sft')")


def keep_correct(scored: Scored, max_per_problem: int, seed: int) -> tuple[list[dict], dict]:
    """(training records, summary): at most `max_per_problem` correct, finished samples per problem."""
    rng = random.Random(f"{seed}/{scored.iteration}/build")
    groups = group_by_prompt(finished(scored.samples))
    kept = []
    for _, group in sorted(groups.items()):
        correct = [s for s in group if s["reward"] > 0]
        kept += rng.sample(correct, min(len(correct), max_per_problem))
    records = [{"prompt": scored.prompts[s["prompt_index"]], "response": s["text"], "reward": s["reward"],
                **sampled_ids("response", s)} for s in kept]
    too_long = len(scored.samples) - sum(len(g) for g in groups.values())
    no_correct = sum(1 for g in groups.values() if not any(s["reward"] > 0 for s in g))
    return records, {"dataset_size": len(records), "problems_kept": len({s["prompt_index"] for s in kept}),
                     "dropped": {"too_long": too_long, "no_correct": no_correct}}


def run(cfg: RestEMConfig, out, *, restart: bool = False, progress: bool = True, name: str = "rest_em",
        build=None):
    """Run (or resume) ReST-EM in `out`; returns (one metrics record per iteration, the best one).

    `build(scored: Scored) -> (records, summary)` replaces `keep_correct`: the one place a caller changes
    what the M-step trains on (the demo's controls pick blind). `name` names the folder and the records.
    """
    job = Run(out, name, cfg, restart=restart)
    task = get_task(cfg.task, **cfg.task_options)
    train_set, valid_set, test_set = task_splits(task, cfg)
    sampling = cfg.sample.for_task(task)
    models = Iterates(job, cfg.model)
    evaluate = verifier_eval(job, models, task, valid_set, test_set, cfg.eval)
    build = build or (lambda scored: keep_correct(scored, cfg.max_per_problem, cfg.seed))

    def problems(t):
        return problems_for(train_set, t, cfg.problems_per_iteration, cfg.seed)

    def sample(t):  # N solutions per problem from M_{t-1}
        prompts = [task.prompt(p) for p in problems(t)]
        return sampled(generate(*models.sampler(t - 1), prompts, sampling.replace(seed=sampling.seed + t),
                                out=job.dir(t) / "samples.jsonl", progress=progress))

    def score(t):  # the 0/1 reward of each
        samples = read_jsonl(job.dir(t) / "samples.jsonl", SAMPLE_FIELDS, len(problems(t)), SAMPLE_KEY)
        scored, info = task.score_samples(samples, problems(t))
        return write_stage(job.dir(t) / "scored.jsonl", scored, info)

    def keep(t):  # the correct ones, at most max_per_problem per problem
        prompts = [task.prompt(p) for p in problems(t)]
        samples = read_jsonl(job.dir(t) / "scored.jsonl", SCORED_FIELDS, len(prompts), SAMPLE_KEY)
        scored = Scored(t, prompts, samples, sampler=lambda: models.get(t - 1))
        return write_stage(job.dir(t) / "dataset.jsonl", *build(scored))

    def m_step(t):  # the BASE model, afresh, trained on them with the reward-weighted NLL
        return models.fit(t, *models.fresh_base(), cfg.train, progress=progress)

    job.once(0, "eval", evaluate)
    job.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        job.once(t, "sample", sample)  # E-step
        job.once(t, "score", score)
        job.once(t, "build", keep)
        job.once(t, "train", m_step)  # M-step
        job.once(t, "eval", evaluate)
        job.log(t, "eval", "build", **sampler_metrics(job.summaries[t]["score"]))
    models.close()
    return job.finish(cfg.eval.select_on, validation=len(valid_set))
