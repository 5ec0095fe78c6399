"""Iterative Reasoning Preference Optimization (Pang et al. 2024, arXiv 2404.19733).

    for t = 1..T:
        sample N chain-of-thought solutions per training question from M_{t-1} (N 30 GSM8K / ARC, 20 MATH),
        at that iteration's temperature (GSM8K 0.8, 0.8, 1.3, 1.3); reward 1 iff the final answer is right;
        pairs: winner a correct sample, loser an incorrect one, K per question (10 GSM8K, 20 ARC, 15 MATH);
        questions without a correct or without an incorrect sample give none; unfinished samples are dropped;
        train M_t from M_{t-1} (its log-probs, computed once, are the reference) with
            L = −log σ(β·[log M_θ(w|x)/M_{t-1}(w|x) − log M_θ(l|x)/M_{t-1}(l|x)]) + α·(−log M_θ(w|x)/|w|)
        with β 0.1, α 1; evaluate M_t on held-out questions and keep the best iteration.

Run: `lite-selftrain rpo --config examples/rpo_gsm8k_150m.toml --out runs/x`.
Simplifications: the K pairs are drawn at random among all (winner, loser) combinations of a question's
distinct texts.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from ..models import ModelConfig
from ..train import TrainConfig
from .common import EvalConfig, Run, SampleConfig, by_problem, verified_loop


@dataclass
class RPOConfig:
    task: str = "gsm8k"
    task_options: dict = field(default_factory=dict)  # passed to get_task
    train_path: str | None = None  # local data file; None: the task's own source
    test_path: str | None = None
    problems_per_iteration: int | None = None  # None: every training question each iteration
    iterations: int = 4  # the paper ran 4 on GSM8K (gains flattened at the 4th)
    temperatures: list[float] = field(default_factory=lambda: [0.8, 0.8, 1.3, 1.3])  # GSM8K's schedule
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(n=30, top_k=0))  # N 30, no top-k
    pairs_per_problem: int = 10  # K for GSM8K
    train: TrainConfig = field(default_factory=lambda: TrainConfig(objective="dpo_nll", beta=0.1, alpha=1.0))
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def __post_init__(self):
        if self.train.objective != "dpo_nll":
            raise ValueError("Iterative RPO trains with objective 'dpo_nll' (alpha = 0 gives plain DPO)")


def build_pairs(cfg: RPOConfig, task, problems: list[dict], scored: list[dict], iteration: int):
    """Up to K (correct, incorrect) pairs per question, with the reason every question without pairs has."""
    rng = random.Random(f"{cfg.seed}/{iteration}/pairs")
    finished = [s for s in scored if s["finish_reason"] != "length"]
    dropped = {"too_long": len(scored) - len(finished), "no_correct": 0, "no_incorrect": 0}
    records = []
    for index, group in sorted(by_problem(finished).items()):
        wins = list({s["text"]: s for s in group if s["reward"] > 0}.values())  # distinct texts only:
        losses = list({s["text"]: s for s in group if s["reward"] <= 0}.values())  # a repeated pair teaches nothing
        if not wins or not losses:
            dropped["no_correct" if not wins else "no_incorrect"] += 1
            continue
        combos = list(itertools.product(range(len(wins)), range(len(losses))))
        prompt = task.prompt(problems[index], shots=cfg.sample.shots)
        for w, l in rng.sample(combos, min(cfg.pairs_per_problem, len(combos))):
            records.append({"prompt": prompt, "chosen": wins[w]["text"], "rejected": losses[l]["text"]})
    return records, {"dataset_size": len(records), "pairs": len(records),
                     "problems_kept": len({r["prompt"] for r in records}), "dropped": dropped}


def run(cfg: RPOConfig, out, *, restart: bool = False, progress: bool = True, recipe: str = "rpo"):
    """Run (or resume) Iterative RPO in `out`; returns (one metrics record per iteration, the best one)."""
    run = Run(out, recipe, cfg, restart=restart)
    # continue from the last iterate; its log-probs before the first step are the reference
    return verified_loop(run, cfg, build=lambda *a: build_pairs(cfg, *a),
                         start=lambda iterates, t: (*iterates.get(t - 1), "current"),
                         temperatures=cfg.temperatures, progress=progress)
