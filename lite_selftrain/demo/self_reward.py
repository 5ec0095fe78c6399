"""The demo's self-rewarding chain and its control: the model judges its own sums, and learns from it.

    self_rewarding  the Self-Rewarding LM loop built from lite_selftrain.recipes.self_rewarding's stages:
                    M_0 = the warm start trained further on its gold solutions AND on EFT judgments (its
                    own sampled answers, judged by the rubric of `judging`); then each iteration answers
                    fresh problems N times, judges every answer k = 3 times, averages, and trains DPO on
                    the best vs the worst answer of each problem;
    random_pairs    its control: the same loop from the same M_0, DPO on as many pairs of its own answers
                    drawn blind to the judge (random chosen / rejected), the same steps.

Where it differs from the recipe's `run` (which is why it has its own loop): the new problems of each
iteration are drawn fresh from the world's generator (the other chains' problems), not written by the
model (a 140k-parameter model cannot follow a few-shot "write one more task" list, and a problem it wrote
would need the verifier to be posed at all); every iterate is measured by the verifier (pass@1, as every
chain) and its judge against the verifier on a fixed judge set; and each iteration's DPO data gets as many
judge pairs (`judging.judge_pairs`) as answer pairs, where the paper's later iterations train on answer
pairs alone: at this size that trains the judging away within two iterations.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from ..judge import judge
from ..models import ModelConfig
from ..recipes.common import Iterates, Run, model_dir, write_stage
from ..recipes.self_rewarding import SelfRewardConfig, answer, best_vs_worst, judge_answers, sft_records
from ..recipes.shared import Scored, distinct, finished, problems_for, split_validation, task_splits, verifier_eval
from ..sampling import SamplingConfig, generate, group_by_prompt
from ..store import read_jsonl, write_jsonl
from ..tasks import get_task
from .judging import agreement, eft_records, judge_config, judge_pairs, numbers_of, verify
from .world import DemoConfig, train_config


def _chosen_correct(task, records: list[dict]) -> float:
    right = sum(task.reward(r["chosen"], task.make(numbers_of(r["prompt"]))) > 0 for r in records)
    return right / max(len(records), 1)


def judged_pairs(task, eft: list[dict], seed: int):
    """The self-rewarding chain's `build`: the recipe's (best, worst) pairs, as many judge pairs, and how its
    judge agreed with the verifier on this iteration's answers and how often a chosen answer is correct."""

    def build(scored: Scored):
        records, info = best_vs_worst(scored.samples)
        judging = judge_pairs(eft, len(records), seed, scored.iteration)
        return records + judging, {**info, "answer_pairs": len(records), "judge_pairs": len(judging),
                                   "dataset_size": len(records) + len(judging),
                                   **agreement(scored.samples, verify(task, scored.samples), "train_judge_"),
                                   "chosen_correct": _chosen_correct(task, records)}

    return build


def random_pairs(task, eft: list[dict], sizes: list[int], seed: int):
    """The control's `build`: as many answer pairs as the chain had at that iteration (`sizes`), each two
    distinct finished answers to one problem, which is chosen drawn blind to the judge; the same judge pairs."""

    def build(scored: Scored):
        t, judged = scored.iteration, scored.samples
        rng = random.Random(f"{seed}/{t}/random_pairs")
        pool = []
        for _, group in sorted(group_by_prompt(judged).items()):
            answers = distinct(finished(group))
            if len(answers) >= 2:
                pool.append(rng.sample(answers, 2))
        size = sizes[t - 1] if len(sizes) >= t else len(pool)
        kept = rng.sample(pool, min(size, len(pool)))
        records = [{"prompt": a["prompt"], "chosen": a["text"], "rejected": b["text"]} for a, b in kept]
        judging = judge_pairs(eft, size, seed, t)
        return records + judging, {"pairs": len(records), "answer_pairs": len(records), "judge_pairs": len(judging),
                                   "dataset_size": len(records) + len(judging),
                                   "dropped": {"no_two_answers": len(group_by_prompt(judged)) - len(pool)},
                                   **agreement(judged, verify(task, judged), "train_judge_"),
                                   "chosen_correct": _chosen_correct(task, records)}

    return build


def m0_data(cfg: DemoConfig, model, tok, gold: list[dict], folder: Path) -> None:
    """M_0's data in `folder`: ift.jsonl (the gold solutions), eft.jsonl (the warm start's sampled answers to
    `eft_problems` fresh training problems, judged by the rubric, the correct ones `eft_correct_repeat`
    times), and judge_set.jsonl (its answers to the test problems: the fixed set every iterate's judge is
    measured on), the last one marking the folder complete."""
    task = get_task("arith", terms=cfg.terms, seed=cfg.seed)
    knobs = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, batch_size=256).for_task(task)
    for name, examples, n, seed in (
            ("eft", task.load("train", n=cfg.eft_problems, seed=cfg.seed + 777), cfg.eft_samples, 1),
            ("judge_set", task.load("test", n=cfg.test_problems), cfg.judge_set_samples, 2)):
        groups = generate(model, tok, [task.prompt(ex) for ex in examples], knobs.replace(n=n, seed=cfg.seed + seed))
        answers = [{"prompt_index": i, "sample_index": j, "text": c.text, "finish_reason": c.finish_reason}
                   for i, group in enumerate(groups) for j, c in enumerate(group)]
        records = eft_records(examples, task.score_samples(answers, examples)[0])
        if name == "eft":  # about 16 % are correct: repeated, the judge sees more of what a "y" looks like
            records += [r for r in records if r["reward"] > 0] * (cfg.eft_correct_repeat - 1)
            write_jsonl(folder / "ift.jsonl", gold)
        write_jsonl(folder / f"{name}.jsonl", records)


def chain_config(cfg: DemoConfig, name: str, out: Path, warm: Path, respond: SamplingConfig) -> SelfRewardConfig:
    """The chain's recipe config: M_0 from the warm start (the control starts from the chain's M_0)."""
    data = out / "self_rewarding" / "m0_data"
    start = warm if name == "self_rewarding" else model_dir(out / "self_rewarding", "self_rewarding", 0)
    return SelfRewardConfig(
        ift_path=str(data / "ift.jsonl"), eft_path=str(data / "eft.jsonl"), skip_sft=name != "self_rewarding",
        model=ModelConfig(name=str(start), mode="full"),
        sft=train_config(cfg, "sft", cfg.m0_lr, cfg.m0_steps, checkpoint_every=100, log_every=50),
        iterations=cfg.iterations, respond=respond, judge=judge_config(cfg.judgments, cfg.seed),
        train=train_config(cfg, "dpo_nll", cfg.rpo_lr, cfg.rpo_steps, beta=0.1, alpha=cfg.sr_alpha,
                           reference="current"),
        seed=cfg.seed)


def run_chain(cfg: DemoConfig, name: str, out: Path, warm: Path, gold: list[dict], base, *, sizes: list[int],
              progress: bool = True):
    """Run (or resume) the `self_rewarding` chain or its `random_pairs` control in out/name, on the same
    problems, sampling and held-out evaluation as `base` (the demo's ReST-EM config)."""
    task = get_task(base.task, **base.task_options)
    train_set, valid_set, test_set = task_splits(task, base)
    recipe = chain_config(cfg, name, out, warm, dataclasses.replace(base.sample.for_task(task), n=cfg.samples))
    job = Run(out / name, name, recipe)
    models = Iterates(job, recipe.model)
    data = Path(recipe.ift_path).parent
    if name == "self_rewarding" and not (data / "judge_set.jsonl").exists():  # the control runs after it
        m0_data(cfg, *models.other(str(warm)), gold, data)
    judge_set, eft = read_jsonl(data / "judge_set.jsonl"), read_jsonl(data / "eft.jsonl")
    heldout = verifier_eval(job, models, task, valid_set, test_set, base.eval)
    build = judged_pairs(task, eft, cfg.seed) if name == "self_rewarding" else random_pairs(task, eft, sizes, cfg.seed)

    def evaluate(t):  # held-out pass@1 as every chain, and this iterate's judge on the fixed judge set
        model, tok = models.get(t)
        verdicts = judge(model, tok, [(r["prompt"], r["response"]) for r in judge_set], recipe.judge)
        judged = agreement([{"score": v.score} for v in verdicts], [r["reward"] > 0 for r in judge_set])
        return {**heldout(t), **judged}

    def sft_data(t):  # the gold solutions less two (the last and one by the seed), as the published runs had it
        ift = split_validation(get_task("instruct").load("train", recipe.ift_path)[:-1], 1, cfg.seed)[0]
        return write_stage(job.dir(0) / "dataset.jsonl", *sft_records(recipe, models.get(0)[1], ift))

    def sft(t):  # M_0: the warm start on its gold solutions and the EFT judgments
        return models.fit(0, *models.get(0), recipe.sft, progress=progress)

    def new_problems(t):  # fresh problems from the world's generator, the other chains' problems
        problems = problems_for(train_set, t, cfg.problems_per_iteration, cfg.seed)
        return write_stage(job.dir(t) / "prompts.jsonl", [{"prompt": task.prompt(p)} for p in problems],
                           {"prompts_kept": len(problems)})

    def respond(t):
        return answer(job, models, recipe.respond, t, progress=progress)

    def judge_own(t):
        return judge_answers(job, models, recipe.judge, t)

    def pair(t):
        return write_stage(job.dir(t) / "dataset.jsonl", *build(Scored(t, [], read_jsonl(job.dir(t) / "judged.jsonl"))))

    def dpo(t):
        empty = f"no pairs: {job.summaries[t]['build']['dropped']}"
        return models.fit(t, *models.get(t - 1), recipe.train, progress=progress, empty=empty)

    if not recipe.skip_sft:
        job.once(0, "build", sft_data)
        job.once(0, "train", sft)
    job.once(0, "eval", evaluate)
    job.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        for stage, fn in (("prompts", new_problems), ("respond", respond), ("judge", judge_own), ("build", pair)):
            job.once(t, stage, fn)
        trained = job.once(t, "train", dpo)
        job.once(t, "eval", evaluate)
        job.log(t, "eval", "prompts", "build", judgments_parsable=job.summaries[t]["judge"]["judgments_parsable"],
                train_note=trained.get("skipped"))
    return job.finish("valid_pass@1", validation=len(valid_set))
