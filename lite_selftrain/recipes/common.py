"""Stage plumbing the recipes share: resumable stages, loading iterates, and the sample / score / eval stages.

Every recipe is a loop of stages over a run directory. A stage runs at most once: when it finishes, its
summary is written to the run's state file, and a re-run of the same command skips it. Stages write their
outputs atomically (or, for sampling, as a resumable stream), so a kill at any moment loses at most the
stage in progress, and the sampler and trainer resume even that from where they stopped.

Layout of a run directory (`RunStore`):
    config.json, state.json, metrics.jsonl, accuracy.png
    <recipe>/iter_NN/samples.jsonl     the E-step's completions, streamed
    <recipe>/iter_NN/scored.jsonl      the same with rewards
    <recipe>/iter_NN/dataset.jsonl     what the M-step trains on
    <recipe>/iter_NN/train/            trainer checkpoints and its metrics.jsonl
    <recipe>/iter_NN/model/            the iterate: a peft adapter, or a full model folder
    <recipe>/iter_NN/eval/             per-problem evaluation records
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..models import ModelConfig, load_model, save_model
from ..store import JsonlLog, RunStore, atomic_write_json, write_jsonl


@dataclass
class SampleConfig:
    n: int = 32  # samples per problem: ReST-EM drew 32 per MATH problem
    temperature: float = 0.7  # ReST-EM's E-step temperature
    top_k: int = 40  # ReST-EM's E-step top-k
    top_p: float = 1.0  # no nucleus cut unless a recipe asks (self-rewarding uses 0.9)
    max_new_tokens: int | None = None  # None: the task's own, derived from its longest solution
    batch_size: int = 16  # prompts per batch; each expands to n rows after one shared prefill
    shots: int = 4  # few-shot examples in the prompt, as the papers prompt their base models


@dataclass
class EvalConfig:
    split: str = "test"  # held-out problems, never trained on
    limit: int | None = None  # evaluate on the first `limit` problems (None: all)
    n: int = 8  # samples per problem for pass@k and maj@k
    ks: list[int] = field(default_factory=lambda: [1, 4, 8])  # the k of pass@k / maj@k to report
    temperature: float = 0.7  # sampling temperature for pass@k / maj@k; pass@1 is greedy
    top_k: int = 40
    batch_size: int = 32
    select_on: str = "test_pass@1"  # the metric that picks the best iteration


def policy_config(base: ModelConfig, checkpoint: Path | None) -> ModelConfig:
    """The ModelConfig of an iterate: the base, or the base with a saved adapter / a saved full model."""
    if checkpoint is None:
        return base
    if base.mode == "full":
        return dataclasses.replace(base, name=str(checkpoint), adapter=None)
    return dataclasses.replace(base, adapter=str(checkpoint))


def load_policy(base: ModelConfig, checkpoint: Path | None = None):
    """(model, tokenizer) of an iterate."""
    return load_model(policy_config(base, checkpoint))


def save_policy(model, tokenizer, path: Path) -> Path:
    return save_model(model, path, tokenizer)


class Run:
    """One recipe's run directory: config binding, stage bookkeeping, one metrics record per iteration."""

    def __init__(self, out: str | Path, recipe: str, config: Any, *, restart: bool = False):
        self.store = RunStore(out)
        self.recipe = recipe
        self.store.bind_config({"recipe": recipe, **to_dict(config)}, restart=restart)

    def dir(self, iteration: int) -> Path:
        return self.store.iteration_dir(self.recipe, iteration)

    def stage(self, iteration: int, name: str, fn: Callable[[], dict]) -> dict:
        """Run `fn` unless this stage already finished; its returned summary is kept with its time."""
        key = f"{self.recipe}/{iteration:02d}/{name}"
        if self.store.is_done(key):
            return self.store.done_info(key)
        start = time.perf_counter()
        info = dict(fn())
        info["seconds"] = round(time.perf_counter() - start, 2)
        self.store.mark_done(key, info)
        return info

    def log_iteration(self, record: dict) -> dict:
        """Append the iteration's metrics once (a re-run after a kill finds it already there)."""
        record = {"recipe": self.recipe, **record}
        for old in self.store.metrics.recover():
            if old.get("recipe") == self.recipe and old.get("iteration") == record["iteration"]:
                return old
        self.store.log_metrics(record)
        return record

    def log_stages(self, iteration: int, stages: dict[str, dict], *merge: str, **extra) -> dict:
        """Log an iteration's record: the fields of the `merge` stages' summaries, `extra`, stage times."""
        record = {"iteration": iteration}
        for name in merge:
            record.update({k: v for k, v in stages[name].items() if k != "seconds"})
        record.update(extra)
        record["seconds"] = {k: v.get("seconds") for k, v in stages.items()}
        return self.log_iteration(record)

    def records(self) -> list[dict]:
        return [r for r in self.store.metrics.read() if r.get("recipe") == self.recipe]

    def finish(self, key: str) -> tuple[list[dict], dict | None]:
        """(records, best record by `key` on held-out data); best.json names the best iterate's folder."""
        records = self.records()
        best = best_iteration(records, key)
        if best is not None:
            model = self.dir(best["iteration"]) / "model"
            atomic_write_json(self.store.root / "best.json",
                              {"recipe": self.recipe, "selected_on": key, "iteration": best["iteration"],
                               key: best[key], "model": str(model) if model.exists() else "the starting model"})
        return records, best


# ----------------------------------------------------------------------------------------------------
# stages


def read_jsonl(path: Path) -> list[dict]:
    return JsonlLog(path).read()


def sample_problems(model, tokenizer, task, examples: list[dict], cfg: SampleConfig, out: Path, *,
                    temperature: float | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Draw cfg.n completions per problem into `out` (resumable); returns counts."""
    from ..sampling import generate

    prompts = [task.prompt(ex, shots=cfg.shots) for ex in examples]
    done = generate(model, tokenizer, prompts, n=cfg.n,
                    temperature=cfg.temperature if temperature is None else temperature,
                    top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens or task.max_new_tokens,
                    stop=task.stop, seed=seed, batch_size=cfg.batch_size, out=out, progress=progress)
    return {"problems": len(done), "samples": sum(len(c) for c in done)}


def score_samples(task, examples: list[dict], samples_path: Path, out: Path) -> dict:
    """Rewards for every sample, written with the sample: {prompt_index, sample_index, text, reward, ...}."""
    samples = sorted(read_jsonl(samples_path), key=lambda r: (r["prompt_index"], r["sample_index"]))
    rewards = task.rewards([s["text"] for s in samples], [examples[s["prompt_index"]] for s in samples])
    scored = [{**s, "reward": float(r)} for s, r in zip(samples, rewards)]
    write_jsonl(out, scored)
    solved = {s["prompt_index"] for s in scored if s["reward"] > 0}
    return {"samples": len(scored),
            "train_accuracy": sum(s["reward"] for s in scored) / max(len(scored), 1),
            "train_coverage": len(solved) / max(len(examples), 1)}


def by_problem(scored: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for s in scored:
        groups.setdefault(s["prompt_index"], []).append(s)
    return groups


def evaluate_policy(model, tokenizer, task, examples: list[dict], cfg: EvalConfig, shots: int, out_dir: Path,
                    *, seed: int = 0) -> dict:
    """Held-out metrics: greedy pass@1 plus sampled pass@k / maj@k, prefixed `test_`."""
    from ..evaluate import evaluate

    examples = examples[: cfg.limit] if cfg.limit else examples
    greedy = evaluate(model, tokenizer, task, examples, n=1, ks=[1], temperature=0.0, shots=shots,
                      batch_size=cfg.batch_size, seed=seed, out_dir=out_dir / "greedy")
    metrics = {"test_pass@1": greedy["pass@1"]}
    if cfg.n > 1:
        sampled = evaluate(model, tokenizer, task, examples, n=cfg.n, ks=cfg.ks, temperature=cfg.temperature,
                           top_k=cfg.top_k, shots=shots, batch_size=cfg.batch_size, seed=seed,
                           out_dir=out_dir / "sampled")
        metrics.update({f"test_{k}": v for k, v in sampled.items() if k.startswith(("pass@", "maj@"))
                        and k != "pass@1"})
        metrics["test_sampled_pass@1"] = sampled["pass@1"]
    return metrics


def judged_eval(model, tokenizer, prompts: list[str], judge_cfg, respond: SampleConfig) -> dict:
    """Greedy answers to held-out prompts, judged by the same model (no external judge is at hand)."""
    from ..judge import judge
    from ..models import format_prompt
    from ..sampling import generate

    answers = generate(model, tokenizer, [format_prompt(tokenizer, p) for p in prompts], n=1, temperature=0.0,
                       max_new_tokens=respond.max_new_tokens or 256, batch_size=respond.batch_size)
    verdicts = judge(model, tokenizer, [(p, a[0].text) for p, a in zip(prompts, answers)], judge_cfg)
    scores = [v.score for v in verdicts if v.score is not None]
    parsable = sum(s is not None for v in verdicts for s in v.scores)
    return {"test_judge_score": sum(scores) / len(scores) if scores else None,
            "test_judge_parsable": parsable / max(len(verdicts) * judge_cfg.k, 1),
            "test_mean_tokens": sum(a[0].num_tokens for a in answers) / max(len(answers), 1)}


def best_iteration(records: list[dict], key: str) -> dict | None:
    """The iteration with the highest `key` (earliest on ties): self-training can over-fit later.

    None when no iteration has the metric (e.g. a judge that never gave a parsable score).
    """
    scored = [r for r in records if r.get(key) is not None]
    return max(scored, key=lambda r: (r[key], -r["iteration"])) if scored else None


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


class Iterates:
    """The model of each iteration, loaded lazily from the run directory and kept while current.

    Iteration 0 is the base model (or what a recipe's warm-up stage saved as iteration 0); iteration
    t ≥ 1 is what iteration t's train stage saved.
    """

    def __init__(self, run: Run, base: ModelConfig):
        self.run, self.base = run, base
        self.current: tuple[int, Any, Any] | None = None

    def path(self, iteration: int) -> Path | None:
        """Where iteration's model lives; None for an iteration 0 that is the base model itself."""
        path = self.run.dir(iteration) / "model"
        return None if iteration == 0 and not path.exists() else path

    def get(self, iteration: int):
        """(model, tokenizer) of `iteration`, loaded unless it is the one in memory."""
        if self.current is None or self.current[0] != iteration:
            self.current = None  # let the old one go before loading the next
            self.current = (iteration, *load_policy(self.base, self.path(iteration)))
        return self.current[1], self.current[2]

    def fresh_base(self):
        """The base model, loaded afresh (a new adapter), after letting the iterate in memory go."""
        self.current = None
        return load_policy(self.base)

    def put(self, iteration: int, model, tokenizer) -> None:
        save_policy(model, tokenizer, self.run.dir(iteration) / "model")
        self.current = (iteration, model, tokenizer)


def problems_for(train_set: list[dict], iteration: int, per_iteration: int | None, seed: int) -> list[dict]:
    """The training problems of an iteration: all of them, or a fresh slice of a seeded shuffle."""
    if not per_iteration:
        return train_set
    order = shuffled(range(len(train_set)), seed)
    start = ((iteration - 1) * per_iteration) % max(len(train_set), 1)
    picked = [train_set[order[(start + i) % len(order)]] for i in range(min(per_iteration, len(order)))]
    return picked


def fit_iterate(iterates: Iterates, t: int, model, tokenizer, reference: str, train_cfg, *, progress: bool,
                empty: str) -> dict:
    """Train `model` on iteration t's dataset.jsonl and save it as iterate t (untrained when the set is empty).

    `reference` is the DPO reference: "current" (the model as it starts) or "adapter_off" (the base);
    its log-probs are cached beside the dataset, so a resumed run does no second reference pass.
    """
    from ..train import train

    d = iterates.run.dir(t)
    records = read_jsonl(d / "dataset.jsonl")
    summary = {"skipped": empty}
    if records:
        summary = train(model, tokenizer, records, dataclasses.replace(train_cfg, reference=reference), d / "train",
                        reference_cache=d / "dataset.ref_logps.pt", progress=progress)
    iterates.put(t, model, tokenizer)
    return summary


def verified_loop(run: Run, cfg, *, build, start, temperatures=None, progress: bool = True):
    """The loop of the recipes with a verifiable reward (ReST-EM, Iterative RPO, the control).

    Per iteration t: sample from M_{t-1} → score → build(task, problems, scored, t) → train from the model
    `start(iterates, t)` returns → evaluate M_t. Returns (records, best record).
    """
    from ..tasks import get_task

    task = get_task(cfg.task, **cfg.task_options)
    train_set, test_set = task.load("train", cfg.train_path), task.load(cfg.eval.split, cfg.test_path)
    iterates = Iterates(run, cfg.model)

    def evaluate(t):
        model, tok = iterates.get(t)
        return evaluate_policy(model, tok, task, test_set, cfg.eval, cfg.sample.shots, run.dir(t) / "eval",
                               seed=cfg.seed)

    run.log_stages(0, {"eval": run.stage(0, "eval", lambda: evaluate(0))}, "eval")
    for t in range(1, cfg.iterations + 1):
        d, problems = run.dir(t), problems_for(train_set, t, cfg.problems_per_iteration, cfg.seed)
        temperature = temperatures[min(t, len(temperatures)) - 1] if temperatures else None
        stages = {"sample": run.stage(t, "sample", lambda: sample_problems(
            *iterates.get(t - 1), task, problems, cfg.sample, d / "samples.jsonl", temperature=temperature,
            seed=cfg.seed + t, progress=progress))}
        stages["score"] = run.stage(t, "score", lambda: score_samples(
            task, problems, d / "samples.jsonl", d / "scored.jsonl"))

        def build_stage():
            records, info = build(task, problems, read_jsonl(d / "scored.jsonl"), t)
            write_jsonl(d / "dataset.jsonl", records)
            return info

        stages["build"] = run.stage(t, "build", build_stage)

        stages["train"] = run.stage(t, "train", lambda: fit_iterate(
            iterates, t, *start(iterates, t), cfg.train, progress=progress,
            empty="empty dataset: the iterate is its starting model"))
        stages["eval"] = run.stage(t, "eval", lambda: evaluate(t))
        run.log_stages(t, stages, "eval", "build", train_accuracy=stages["score"]["train_accuracy"],
                       train_coverage=stages["score"]["train_coverage"],
                       temperature=temperature or cfg.sample.temperature)
    return run.finish(cfg.eval.select_on)
