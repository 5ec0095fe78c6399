"""ReST-EM (Singh et al. 2023, "Beyond Human Data", arXiv 2312.06585): expectation-maximisation with a
binary reward.

    for t = 1..T:
        E-step: draw N solutions per training problem from M_{t-1} (top-k 40, T 0.7), score them 0/1,
                keep the correct ones, at most 10 per problem (so easy problems do not dominate);
        M-step: fine-tune the BASE model (not M_{t-1}) on that data with the reward-weighted NLL
                J(θ) = Σ r(x, y) · log p_θ(y | x), loss on the response only → M_t;
        evaluate M_t on held-out problems; keep the best iteration (small sets over-fit after a few).

Run: `lite-selftrain rest-em --config examples/rest_em_gsm8k_150m.toml --out runs/x`.
Simplifications: unfinished (length-capped) samples are dropped before the reward; with `selection =
"random"` the same loop is the demo's control (samples kept without looking at the reward).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..models import ModelConfig
from ..train import TrainConfig
from .common import EvalConfig, Run, SampleConfig, by_problem, verified_loop


@dataclass
class RestEMConfig:
    task: str = "gsm8k"
    task_options: dict = field(default_factory=dict)  # passed to get_task (e.g. arith's terms)
    train_path: str | None = None  # local data file; None: the task's own source
    test_path: str | None = None
    problems_per_iteration: int | None = None  # None: every training problem each iteration
    iterations: int = 3  # the paper's MATH gains came in 3 iterations; APPS peaked after 1
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    sample: SampleConfig = field(default_factory=SampleConfig)  # N 32, T 0.7, top-k 40
    max_per_problem: int = 10  # the paper's cap per problem
    selection: str = "reward"  # "reward" (ReST-EM) or "random" (the control: ignore the reward)
    dataset_sizes: list[int] = field(default_factory=list)  # for "random": the size to draw per iteration
    train: TrainConfig = field(default_factory=lambda: TrainConfig(objective="rwnll"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def __post_init__(self):
        if self.selection not in ("reward", "random"):
            raise ValueError(f"selection must be 'reward' or 'random', not '{self.selection}'")
        if self.train.objective not in ("rwnll", "sft"):
            raise ValueError("ReST-EM trains with objective 'rwnll' (or 'sft')")


def build_dataset(cfg: RestEMConfig, task, problems: list[dict], scored: list[dict], iteration: int):
    """Keep ≤ max_per_problem correct, finished samples per problem (or, for the control, random ones)."""
    rng = random.Random(f"{cfg.seed}/{iteration}/build")
    finished = [s for s in scored if s["finish_reason"] != "length"]
    groups = by_problem(finished)
    if cfg.selection == "reward":
        kept = []
        for _, group in sorted(groups.items()):
            correct = [s for s in group if s["reward"] > 0]
            kept += rng.sample(correct, min(len(correct), cfg.max_per_problem))
    else:  # the control: as many samples as ReST-EM kept, drawn blind to the reward
        size = cfg.dataset_sizes[iteration - 1] if len(cfg.dataset_sizes) >= iteration else 0
        pool = [s for _, g in sorted(groups.items()) for s in rng.sample(g, min(len(g), cfg.max_per_problem))]
        kept = rng.sample(pool, min(size, len(pool)))
    records = [{"prompt": task.prompt(problems[s["prompt_index"]], shots=cfg.sample.shots),
                "response": s["text"], "reward": s["reward"] if cfg.selection == "reward" else 1.0}
               for s in kept]
    solved = {s["prompt_index"] for s in kept}
    info = {"dataset_size": len(records), "problems_kept": len(solved),
            "dropped": {"too_long": len(scored) - len(finished),
                        "no_correct": sum(1 for g in groups.values() if not any(s["reward"] > 0 for s in g))}}
    return records, info


def run(cfg: RestEMConfig, out, *, restart: bool = False, progress: bool = True, recipe: str = "rest_em"):
    """Run (or resume) ReST-EM in `out`; returns (one metrics record per iteration, the best one)."""
    run = Run(out, recipe, cfg, restart=restart)
    return verified_loop(run, cfg, build=lambda *a: build_dataset(cfg, *a),
                         start=lambda iterates, t: (*iterates.fresh_base(), "adapter_off"),  # the base, afresh
                         progress=progress)
