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
from ..evaluate import EvalConfig, heldout
from ..models import ModelConfig
from ..sampling import SamplingConfig, generate, group_by_prompt, sampled
from ..store import SAMPLE_FIELDS, SAMPLE_KEY, SCORED_FIELDS, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from ..training.batching import sampled_ids
from .common import Iterates, Run, check_trainable, problems_for, split_validation, write_stage


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


def keep_correct(cfg: RestEMConfig, prompts: list[str], scored: list[dict], iteration: int):
    """(training records, summary): at most max_per_problem correct, finished samples per problem."""
    rng = random.Random(f"{cfg.seed}/{iteration}/build")
    finished = [s for s in scored if s["finish_reason"] != "length"]
    groups = group_by_prompt(finished)
    kept = []
    for _, group in sorted(groups.items()):
        correct = [s for s in group if s["reward"] > 0]
        kept += rng.sample(correct, min(len(correct), cfg.max_per_problem))
    records = [{"prompt": prompts[s["prompt_index"]], "response": s["text"], "reward": s["reward"],
                **sampled_ids("response", s)} for s in kept]
    info = {"dataset_size": len(records), "problems_kept": len({s["prompt_index"] for s in kept}),
            "dropped": {"too_long": len(scored) - len(finished),
                        "no_correct": sum(1 for g in groups.values() if not any(s["reward"] > 0 for s in g))}}
    return records, info


def run(cfg: RestEMConfig, out, *, restart: bool = False, progress: bool = True, name: str = "rest_em",
        keep=keep_correct):
    """Run (or resume) ReST-EM in `out`; returns (one metrics record per iteration, the best one).

    `keep(cfg, prompts, scored, t)` turns an iteration's scored samples into training records (the demo's
    control passes a reward-blind pick); `name` names the run's folder and its metrics records.
    """
    run = Run(out, name, cfg, restart=restart)
    task = get_task(cfg.task, **cfg.task_options)
    train_set, test_set = task.load("train", cfg.train_path), task.load(cfg.eval.split, cfg.test_path)
    train_set, valid_set = split_validation(train_set, cfg.eval.validation_size, cfg.seed)  # chooses the best
    sampling = cfg.sample.for_task(task)
    models = Iterates(run, cfg.model)
    evaluate = lambda t: {**heldout(*models.sampler(t), task, test_set, cfg.eval, run.dir(t) / "eval"),
                          **heldout(*models.sampler(t), task, valid_set, cfg.eval, run.dir(t) / "eval" / "valid",
                                    prefix="valid_")}

    run.once(0, "eval", lambda: evaluate(0))
    run.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        d, problems = run.dir(t), problems_for(train_set, t, cfg.problems_per_iteration, cfg.seed)
        prompts = [task.prompt(p) for p in problems]
        # E-step: N samples per problem from M_{t-1}, each scored 0/1, the correct ones kept
        run.once(t, "sample", lambda: sampled(generate(*models.sampler(t - 1), prompts, sampling.replace(
            seed=sampling.seed + t), out=d / "samples.jsonl", progress=progress)))
        run.once(t, "score", lambda: write_stage(d / "scored.jsonl", *task.score_samples(
            read_jsonl(d / "samples.jsonl", SAMPLE_FIELDS, len(problems), SAMPLE_KEY), problems)))
        run.once(t, "build", lambda: write_stage(d / "dataset.jsonl", *keep(
            cfg, prompts, read_jsonl(d / "scored.jsonl", SCORED_FIELDS, len(prompts), SAMPLE_KEY), t)))
        # M-step: the BASE model, afresh, trained on them with the reward-weighted NLL
        run.once(t, "train", lambda: models.fit(t, *models.fresh_base(), cfg.train, reference="adapter_off",
                                                progress=progress))
        run.once(t, "eval", lambda: evaluate(t))
        run.log(t, "eval", "build", "score")
    models.close()
    return run.finish(cfg.eval.select_on, validation=len(valid_set))
