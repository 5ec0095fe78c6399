"""The demo's world: its config, the warm start every chain begins from, and the recipe configs of its chains.

The task is the built-in `arith` (sums written as worked solutions, checked by a hidden verifier); the
model a 140k-parameter Llama (`demo` preset) trained from scratch on short sums and 2 % long ones, the only
gold solutions it sees. Every chain then works on fresh long sums with the same sampling, problems and
evaluation. Simplification: full fine-tuning (no LoRA): the model is far too small for adapters to matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Count, Fraction, Name, NonNegativeFloat, PositiveFloat, PositiveInt, check_fields
from ..errors import UserError
from ..evaluate import EvalConfig
from ..models import ModelConfig, build_model, build_tokenizer, save_model
from ..recipes.rest_em import RestEMConfig
from ..recipes.rpo import RPOConfig
from ..sampling import SamplingConfig
from ..sampling.generate import Temperature
from ..tasks import get_task
from ..training import TrainConfig, train

CHAINS = ("rest_em", "rpo", "control", "central", "random_pick", "majority", "self_rewarding", "random_pairs")


@dataclass
class DemoConfig:
    preset: Name = "demo"  # 2 layers, hidden 64: big enough to add, small enough to train in a minute
    warm_terms: list[PositiveInt] = field(default_factory=lambda: [2, 3])  # warm start on short sums (min, max)
    warm_examples: PositiveInt = 4000  # gold worked solutions of the short sums
    warm_long_examples: Count = 80  # 2 % gold at the target length: without any, a model this small never
    # writes a long sum; with them it starts with headroom (docs/demo.md)
    warm_steps: PositiveInt = 800  # ~13 epochs at batch 64: fits the short sums, not the long ones
    warm_lr: PositiveFloat = 3e-3  # a from-scratch model this small tolerates a high rate
    terms: PositiveInt = 4  # the length self-training works on and the test measures
    test_problems: PositiveInt = 300  # held-out pass@1 within about ±3 points
    validation_problems: PositiveInt = 300  # training problems held out to pick each chain's best iteration
    iterations: Count = 4  # gains flatten after 3-4 iterations
    problems_per_iteration: PositiveInt = 1000  # fresh problems each iteration: no over-fitting to a fixed set
    samples: PositiveInt = 8  # pass@8 of the warm start is several times its pass@1: the headroom
    temperature: Temperature = 0.7  # ReST-EM's temperature
    top_k: Count = 40  # ReST-EM's top-k
    rest_steps: PositiveInt = 200  # M-step length for ReST-EM and the control (the same, by design)
    rest_lr: PositiveFloat = 3e-3
    rpo_steps: PositiveInt = 100  # DPO + NLL learns faster per step (it also uses the incorrect samples)
    rpo_lr: PositiveFloat = 1e-3  # lower than SFT's: the DPO term is sharp
    pairs_per_problem: PositiveInt = 4  # K: 8 samples rarely give more distinct (correct, incorrect) pairs
    batch_size: PositiveInt = 64  # examples (pairs for RPO) per step
    central_keep: Fraction = 1.0  # the surest fraction of problems the reward-free selections keep
    central_layer: int = -1  # hidden_states index the central chain embeds with (-1: the final, normed layer)
    central_pooling: Name = "mean"  # "mean" over the sample's tokens, or "last" (the token after the answer)
    eft_problems: PositiveInt = 2000  # self-rewarding's M_0: fresh problems the warm start answers for EFT
    eft_samples: PositiveInt = 4  # answers per EFT problem, each judged by the rubric (about 16 % correct)
    eft_correct_repeat: PositiveInt = 2  # correct EFT answers, twice: the judge learns what a "y" looks like
    judge_set_samples: PositiveInt = 2  # warm-start answers per test problem every iterate's judge grades
    m0_steps: PositiveInt = 1200  # M_0 = the warm start trained on its gold data and the EFT judgments
    m0_lr: PositiveFloat = 3e-3
    judgments: PositiveInt = 3  # k judgments per answer, averaged (the paper's 3)
    sr_alpha: NonNegativeFloat = 1.0  # NLL weight of self-rewarding's DPO, as RPO's; the paper's plain DPO (0)
    # collapsed both chains here (docs/demo.md)
    eval_samples: PositiveInt = 8  # for pass@8 / maj@8
    threads: Count = 0  # torch threads; 0 leaves torch's default
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        if self.central_pooling not in ("mean", "last"):
            raise UserError(f"central_pooling must be mean or last, not '{self.central_pooling}'")


def quick_config() -> DemoConfig:
    """A shortened demo for tests and a first look: the same stages, a fraction of the work."""
    return DemoConfig(warm_examples=3000, warm_long_examples=60, warm_steps=600, iterations=2,
                      problems_per_iteration=500, rest_steps=100, rpo_steps=60, eft_problems=1000, m0_steps=800)


def train_config(cfg: DemoConfig, objective: str, lr: float, steps: int, **more) -> TrainConfig:
    """Every training of the demo: `steps` steps of `batch_size` random examples (no length grouping:
    mixed lengths learn better and pad little at this size), 128 tokens, one seed."""
    more = {"checkpoint_every": 50, "log_every": 25, **more}
    return TrainConfig(objective=objective, lr=lr, max_steps=steps, batch_size=cfg.batch_size, grad_accum=1,
                       max_length=128, group_window=1, seed=cfg.seed, **more)


def gold_records(cfg: DemoConfig) -> list[dict]:
    """The warm start's gold worked solutions (prompt, response): short sums, and a few long ones."""
    short = get_task("arith", terms=tuple(cfg.warm_terms), seed=cfg.seed)
    long = get_task("arith", terms=cfg.terms, seed=cfg.seed)
    gold = [(short, ex) for ex in short.load("train", n=cfg.warm_examples)]
    gold += [(long, ex) for ex in long.load("train", n=cfg.warm_long_examples, seed=cfg.seed + 555)]
    return [{"prompt": task.prompt(ex), "response": task.reference(ex)} for task, ex in gold]


def warm_start(cfg: DemoConfig, out: Path, *, progress: bool = True) -> Path:
    """Train the preset from scratch on gold worked solutions; save it as a model folder; resumable."""
    path = out / "warmstart" / "model"
    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer()
    model = build_model(cfg.preset, vocab_size=len(tokenizer), seed=cfg.seed)
    warm = train_config(cfg, "sft", cfg.warm_lr, cfg.warm_steps, warmup_ratio=0.03, checkpoint_every=100,
                        log_every=50)
    train(model, tokenizer, gold_records(cfg), warm, out / "warmstart" / "train", progress=progress)
    return save_model(model, path, tokenizer)


def arith_options(cfg: DemoConfig) -> dict:
    """The task options every chain shares: long sums, enough fresh training problems for every iteration
    and the validation split, and the test problems."""
    return {"terms": cfg.terms, "seed": cfg.seed,
            "n_train": cfg.iterations * cfg.problems_per_iteration + cfg.validation_problems,
            "n_test": cfg.test_problems}


def chain_configs(cfg: DemoConfig, warm: Path) -> dict:
    """The recipe config of each ReST-EM-loop chain and of RPO, sharing the task, problems, sampling and
    evaluation; all but `rpo` are ReST-EM's loop (the others differ in what they keep, not in the config)."""
    knobs = dict(temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, batch_size=256)
    common = dict(
        task="arith", task_options=arith_options(cfg),
        problems_per_iteration=cfg.problems_per_iteration, iterations=cfg.iterations,
        model=ModelConfig(name=str(warm), mode="full"), sample=SamplingConfig(n=cfg.samples, **knobs),
        eval=EvalConfig(sample=SamplingConfig(n=cfg.eval_samples, **knobs), ks=[1, cfg.eval_samples],
                        validation_size=cfg.validation_problems),
        seed=cfg.seed)
    sft = train_config(cfg, "rwnll", cfg.rest_lr, cfg.rest_steps)
    dpo = train_config(cfg, "dpo_nll", cfg.rpo_lr, cfg.rpo_steps, beta=0.1, alpha=1.0, reference="current")
    return {"rpo": RPOConfig(**common, train=dpo, pairs_per_problem=cfg.pairs_per_problem,
                             temperatures=[cfg.temperature]),
            **{name: RestEMConfig(**common, train=sft) for name in CHAINS if name != "rpo"}}
