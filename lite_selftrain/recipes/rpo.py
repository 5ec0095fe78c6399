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
Simplifications: the K pairs are drawn at random among all (winner, loser) combinations of a question's
distinct texts.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from ..config import Count, Name, PositiveInt, check_fields
from ..errors import UserError
from ..evaluate import EvalConfig, heldout
from ..models import ModelConfig
from ..sampling.generate import SamplingConfig, Temperature, generate, group_by_prompt, sampled
from ..store import SAMPLE_FIELDS, SAMPLE_KEY, SCORED_FIELDS, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from ..training.batching import sampled_ids
from .common import Iterates, Run, check_trainable, problems_for, split_validation, write_stage


@dataclass
class RPOConfig:
    task: Name = "gsm8k"
    task_options: dict = field(default_factory=dict)  # passed to get_task: shots (reasoning tasks: 4), ...
    train_path: Name | None = None  # local data file; None: the task's own source
    test_path: Name | None = None
    problems_per_iteration: PositiveInt | None = None  # None: every training question each iteration
    iterations: Count = 4  # the paper ran 4 on GSM8K (gains flattened at the 4th)
    temperatures: list[Temperature] = field(default_factory=lambda: [0.8, 0.8, 1.3, 1.3])  # GSM8K's; [] keeps sample's
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n=30, temperature=0.8))  # N 30, no top-k; temperatures (when set) replace its temperature
    pairs_per_problem: PositiveInt = 10  # K for GSM8K
    train: TrainConfig = field(default_factory=lambda: TrainConfig(objective="dpo_nll", beta=0.1, alpha=1.0))
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # which problems each iteration draws, which pairs are kept

    def __post_init__(self):
        check_fields(self)
        check_trainable(self.model, ("train.", self.train))
        if self.train.objective != "dpo_nll":
            raise UserError("Iterative RPO trains with objective 'dpo_nll' (alpha = 0 gives plain DPO)")

    def temperature(self, iteration: int) -> float:
        """Iteration's sampling temperature: the schedule's, its last one past its end."""
        return self.temperatures[min(iteration, len(self.temperatures)) - 1] if self.temperatures else \
            self.sample.temperature


def build_pairs(cfg: RPOConfig, prompts: list[str], scored: list[dict], iteration: int):
    """(up to K (correct, incorrect) pairs per question, summary with why each question gave none)."""
    rng = random.Random(f"{cfg.seed}/{iteration}/pairs")
    finished = [s for s in scored if s["finish_reason"] != "length"]
    dropped = {"too_long": len(scored) - len(finished), "no_correct": 0, "no_incorrect": 0}
    records = []
    for index, group in sorted(group_by_prompt(finished).items()):
        wins = list({s["text"]: s for s in group if s["reward"] > 0}.values())  # distinct texts only:
        losses = list({s["text"]: s for s in group if s["reward"] <= 0}.values())  # a repeated pair teaches nothing
        if not wins or not losses:
            dropped["no_correct" if not wins else "no_incorrect"] += 1
            continue
        combos = list(itertools.product(range(len(wins)), range(len(losses))))
        for w, l in rng.sample(combos, min(cfg.pairs_per_problem, len(combos))):
            records.append({"prompt": prompts[index], "chosen": wins[w]["text"], "rejected": losses[l]["text"],
                            **sampled_ids("chosen", wins[w]), **sampled_ids("rejected", losses[l])})
    return records, {"dataset_size": len(records), "pairs": len(records),
                     "problems_kept": len({r["prompt"] for r in records}), "dropped": dropped}


def run(cfg: RPOConfig, out, *, restart: bool = False, progress: bool = True, name: str = "rpo"):
    """Run (or resume) Iterative RPO in `out`; returns (one metrics record per iteration, the best one)."""
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
        at_t = sampling.replace(temperature=cfg.temperature(t), seed=sampling.seed + t)
        # N chains of thought per question from M_{t-1}, scored, paired correct vs incorrect
        run.once(t, "sample", lambda: sampled(generate(*models.sampler(t - 1), prompts, at_t, out=d / "samples.jsonl",
                                                       progress=progress)))
        run.once(t, "score", lambda: write_stage(d / "scored.jsonl", *task.score_samples(
            read_jsonl(d / "samples.jsonl", SAMPLE_FIELDS, len(problems), SAMPLE_KEY), problems)))
        run.once(t, "build", lambda: write_stage(d / "dataset.jsonl", *build_pairs(
            cfg, prompts, read_jsonl(d / "scored.jsonl", SCORED_FIELDS, len(prompts), SAMPLE_KEY), t)))
        # DPO + NLL from M_{t-1}, whose log-probs before the first step are the reference
        run.once(t, "train", lambda: models.fit(t, *models.get(t - 1), cfg.train, reference="current",
                                                progress=progress))
        run.once(t, "eval", lambda: evaluate(t))
        run.log(t, "eval", "build", "score", temperature=at_t.temperature)
    models.close()
    return run.finish(cfg.eval.select_on, validation=len(valid_set))
