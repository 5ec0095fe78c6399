"""Self-Rewarding Language Models (Yuan et al. 2024, arXiv 2401.10020): the model is its own judge.

    M_0 = SFT(base, IFT + EFT)   instruction data, and judge-training data ending in "Score: s"
    for t = 1..T:
        write new prompts: 8 prompts drawn from IFT as a few-shot list, the model continues it;
        answer each new prompt N = 4 times (T 0.7, top-p 0.9);
        judge every answer k = 3 times with the additive 5-point rubric (lite_selftrain.judge), average the
        parsable scores (an unparsable judgment is missing, never the lowest score);
        pairs: (highest, lowest) scored answer per prompt, dropped on ties;
        M_t = DPO(M_{t-1}, pairs), β 0.1, the reference being M_{t-1}.
    Evaluation: greedy answers to held-out instructions, judged by the same iterate (the paper used
    AlpacaEval with GPT-4; we have no external judge), plus the share of parsable judgments.

Run: `lite-selftrain self-reward --config examples/self_reward_oasst_150m.toml --out runs/x`.
Simplifications: the new prompt is the first line the model writes after "Task:"; prompts already in
the seed data or written twice are dropped.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from ..data import read_jsonl as read_data
from ..errors import UserError
from ..judge import JudgeConfig, eft_example, judge
from ..models import ModelConfig, format_prompt
from ..sampling import generate
from ..store import write_jsonl
from ..tasks import get_task
from ..train import TrainConfig, train
from .common import (
    Iterates,
    Run,
    SampleConfig,
    by_problem,
    fit_iterate,
    judged_eval,
    read_jsonl,
)

PROMPT_HEADER = "Below are tasks that users asked an assistant to do. Write one more task.\n\n"


@dataclass
class SelfRewardConfig:
    ift_path: str | None = None  # instruction → response seed data (the `instruct` task's layouts)
    eft_path: str | None = None  # judge seed data: prompt, response, justification, score (optional)
    test_path: str | None = None  # held-out instructions; None: the last `eval_size` IFT records
    eval_size: int = 64  # held-out instructions judged per iteration
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(objective="sft", epochs=1))  # M_0
    skip_sft: bool = False  # start from a model that already follows instructions and judges
    iterations: int = 2  # M1 → M2 → M3 in the paper
    new_prompts: int = 512  # prompts written per iteration
    prompt_shots: int = 8  # the paper's 8 IFT prompts per few-shot list
    prompt_max_new_tokens: int = 96  # one instruction line
    respond: SampleConfig = field(default_factory=lambda: SampleConfig(
        n=4, temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=256, shots=0))  # the paper's N 4, T 0.7, p 0.9
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # k 3 judgments averaged
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        objective="dpo_nll", alpha=0.0, beta=0.1))  # plain DPO, β 0.1
    seed: int = 0


def write_prompts(model, tok, seeds: list[str], cfg: SelfRewardConfig, out, iteration: int) -> tuple[list[str], dict]:
    """New instructions from few-shot lists of seed instructions; drops empty, repeated and seed ones."""
    rng = random.Random(f"{cfg.seed}/{iteration}/prompts")
    lists = []
    for _ in range(cfg.new_prompts):
        picked = rng.sample(seeds, min(cfg.prompt_shots, len(seeds)))
        lists.append(PROMPT_HEADER + "".join(f"Task: {' '.join(p.split())}\n" for p in picked) + "Task:")
    groups = generate(model, tok, lists, n=1, temperature=cfg.respond.temperature, top_p=cfg.respond.top_p,
                      max_new_tokens=cfg.prompt_max_new_tokens, stop=("\n",), seed=cfg.seed + iteration,
                      batch_size=cfg.respond.batch_size, out=out)
    known, kept, dropped = set(seeds), [], {"empty": 0, "repeated": 0}
    for (completion,) in groups:
        text = completion.text.strip()
        if not text:
            dropped["empty"] += 1
        elif text in known:
            dropped["repeated"] += 1
        else:
            known.add(text)
            kept.append(text)
    return kept, {"prompts_written": len(lists), "prompts_kept": len(kept), "prompts_dropped": dropped}


def build_pairs(judged: list[dict]) -> tuple[list[dict], dict]:
    """(highest, lowest) judged answer per prompt, with the reason each prompt without a pair has."""
    dropped = {"too_long": 0, "unparsable_judgment": 0, "tie": 0}
    records = []
    for _, group in sorted(by_problem(judged).items()):
        finished = [s for s in group if s["finish_reason"] != "length"]
        scored = [s for s in finished if s["score"] is not None]
        if len(finished) < 2:
            dropped["too_long"] += 1
        elif len(scored) < 2:
            dropped["unparsable_judgment"] += 1
        else:
            best = max(scored, key=lambda s: s["score"])
            worst = min(scored, key=lambda s: s["score"])
            if best["score"] == worst["score"]:
                dropped["tie"] += 1
            else:
                records.append({"prompt": best["prompt"], "chosen": best["text"], "rejected": worst["text"],
                                "score_chosen": best["score"], "score_rejected": worst["score"]})
    return records, {"pairs": len(records), "dataset_size": len(records), "dropped": dropped}


def run(cfg: SelfRewardConfig, out, *, restart: bool = False, progress: bool = True, recipe: str = "self_reward"):
    """Run (or resume) self-rewarding training in `out`; returns (metrics per iteration, the best one)."""
    run = Run(out, recipe, cfg, restart=restart)
    task = get_task("instruct")
    ift = task.load("train", cfg.ift_path)
    if cfg.test_path:
        test = [r["prompt"] for r in task.load("test", cfg.test_path)][: cfg.eval_size]
    else:
        ift, test = ift[: -cfg.eval_size], [r["prompt"] for r in ift[-cfg.eval_size:]]
    if not ift:
        raise UserError(f"self-rewarding needs more IFT records than eval_size ({cfg.eval_size})")
    iterates = Iterates(run, cfg.model)

    def sft():
        model, tok = iterates.get(0)
        eft = [eft_example(r["prompt"], r["response"], r.get("justification", ""), float(r["score"]))
               for r in (read_data(cfg.eft_path) if cfg.eft_path else [])]
        chat = lambda text, on=True: format_prompt(tok, text) if on else text  # as judge() will prompt
        records = [{"prompt": chat(r["prompt"]), "response": r["response"]} for r in ift]
        records += [{"prompt": chat(r["prompt"], cfg.judge.chat), "response": r["response"]} for r in eft]
        summary = train(model, tok, records, cfg.sft, run.dir(0) / "sft", progress=progress)
        iterates.put(0, model, tok)
        return {"ift": len(ift), "eft": len(eft), **summary}

    if not cfg.skip_sft:
        run.stage(0, "sft", sft)
    evaluate = lambda t: judged_eval(*iterates.get(t), test, cfg.judge, cfg.respond)
    run.log_stages(0, {"eval": run.stage(0, "eval", lambda: evaluate(0))}, "eval")
    seeds = [r["prompt"] for r in ift]
    for t in range(1, cfg.iterations + 1):
        d = run.dir(t)

        def prompts_stage():
            kept, info = write_prompts(*iterates.get(t - 1), seeds, cfg, d / "prompts_raw.jsonl", t)
            write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in kept])
            return info

        stages = {"prompts": run.stage(t, "prompts", prompts_stage)}
        new = [r["prompt"] for r in read_jsonl(d / "prompts.jsonl")]

        def respond_stage():
            model, tok = iterates.get(t - 1)
            groups = generate(model, tok, [format_prompt(tok, p) for p in new], n=cfg.respond.n,
                              temperature=cfg.respond.temperature, top_p=cfg.respond.top_p,
                              max_new_tokens=cfg.respond.max_new_tokens, seed=cfg.seed + t,
                              batch_size=cfg.respond.batch_size, out=d / "samples.jsonl", progress=progress)
            return {"responses": sum(len(g) for g in groups)}

        stages["respond"] = run.stage(t, "respond", respond_stage)

        def judge_stage():
            samples = read_jsonl(d / "samples.jsonl")
            verdicts = judge(*iterates.get(t - 1), [(new[s["prompt_index"]], s["text"]) for s in samples],
                             dataclasses.replace(cfg.judge, seed=cfg.judge.seed + t))
            judged = [{**s, "prompt": format_prompt(iterates.get(t - 1)[1], new[s["prompt_index"]]),
                       "score": v.score, "judgments": v.texts} for s, v in zip(samples, verdicts)]
            write_jsonl(d / "judged.jsonl", judged)
            parsed = sum(x is not None for v in verdicts for x in v.scores)
            return {"judgments": len(verdicts) * cfg.judge.k, "judgments_parsable": parsed}

        stages["judge"] = run.stage(t, "judge", judge_stage)

        def build_stage():
            records, info = build_pairs(read_jsonl(d / "judged.jsonl"))
            write_jsonl(d / "dataset.jsonl", records)
            return info

        stages["build"] = run.stage(t, "build", build_stage)

        stages["train"] = run.stage(t, "train", lambda: fit_iterate(  # continue from M_{t-1}, the reference
            iterates, t, *iterates.get(t - 1), "current", cfg.train, progress=progress,
            empty=f"no pairs: {stages['build']['dropped']}"))
        stages["eval"] = run.stage(t, "eval", lambda: evaluate(t))
        run.log_stages(t, stages, "eval", "prompts", "build", judgments_parsable=stages["judge"]["judgments_parsable"],
                       train_note=stages["train"].get("skipped"))
    return run.finish("test_judge_score")
