"""Self-Rewarding Language Models (Yuan et al. 2024, arXiv 2401.10020): the model is its own judge.

    M_0 = SFT(base, IFT + EFT)   instruction data, and judge-training data ending in "Score: s" (the paper's
                                 M1; without EFT data the run stops unless `no_eft` says so)
    for t = 1..T:
        write new prompts: 8 prompts drawn from IFT as a few-shot list, a FIXED model continues it (the
        paper used Llama 2-Chat 70B; here `prompt_model`, else M_0);
        answer each new prompt N = 4 times (T 0.7, top-p 0.9);
        judge every answer k = 3 times with the additive 5-point rubric (lite_selftrain.judge), average the
        parsable scores (an unparsable judgment is missing, never the lowest score);
        pairs: (highest, lowest) scored answer per prompt, dropped on ties;
        M_t = DPO(M_{t-1}, pairs), β 0.1, the reference being M_{t-1}.
    Evaluation: greedy answers to held-out instructions, judged by ONE fixed judge for every iterate
    (`judge_model`, else M_0), so scores compare across iterations (the paper used AlpacaEval with GPT-4),
    plus the share of parsable judgments; the best iterate is chosen on IFT prompts held out from training.

Run: `lite-selftrain self-reward --config examples/self_reward_oasst_150m.toml --out runs/x`.
Simplifications: the new prompt is the first line the model writes after "Task:"; prompts already in
the seed data or written twice are dropped. The fixed judge and the iterate it grades are in memory together.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Count, Name, PositiveInt, check_fields
from ..errors import UserError
from ..judge import JudgeConfig, eft_example, judge, judged_eval
from ..models import ModelConfig, format_prompt
from ..sampling import SamplingConfig, generate, group_by_prompt, sampled
from ..store import COMPLETION_FIELDS, SAMPLE_KEY, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from ..training.batching import sampled_ids
from .common import Iterates, Run, check_trainable, split_validation, write_stage

PROMPT_HEADER = "Below are tasks that users asked an assistant to do. Write one more task.\n\n"


@dataclass
class SelfRewardConfig:
    ift_path: Name | None = None  # instruction → response seed data (the `instruct` task's layouts)
    eft_path: Name | None = None  # judge seed data: prompt, response, justification, score
    no_eft: bool = False  # True: train M_0 without EFT data (it then judges untrained); the explicit opt-out
    prompt_model: Name | None = None  # the fixed model that writes new prompts; None: M_0 (never the iterate)
    judge_model: Name | None = None  # the fixed judge of every iterate's held-out answers; None: M_0
    test_path: Name | None = None  # held-out instructions; None: the last `eval_size` IFT records
    eval_size: PositiveInt = 64  # held-out instructions judged per iteration
    validation_size: PositiveInt | None = None  # IFT prompts held out to choose the best iteration on; None:
    # min(eval_size, 10 %): each is answered and judged k times per iteration
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(objective="sft", epochs=1))  # M_0
    skip_sft: bool = False  # start from a model that already follows instructions and judges
    iterations: Count = 2  # M1 → M2 → M3 in the paper
    new_prompts: PositiveInt = 512  # prompts written per iteration
    prompt_shots: PositiveInt = 8  # the paper's 8 IFT prompts per few-shot list
    write: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        temperature=0.7, top_p=0.9, max_new_tokens=96, stop=("\n",)))  # one instruction line per list
    respond: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n=4, temperature=0.7, top_p=0.9, max_new_tokens=256))  # the paper's N 4, T 0.7, top-p 0.9
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # k 3 judgments averaged
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        objective="dpo_nll", alpha=0.0, beta=0.1))  # plain DPO, β 0.1
    seed: int = 0  # which seed prompts each few-shot list shows

    def __post_init__(self):
        check_fields(self)
        check_trainable(self.model, ("sft.", self.sft), ("train.", self.train))


EFT_FIELDS = {"prompt": "string", "response": "string", "score": "number", "justification?": "string"}
JUDGED_FIELDS = {**COMPLETION_FIELDS, "prompt": "string", "score": "number|null"}  # what pairing reads


def eft_examples(cfg: SelfRewardConfig) -> list[dict]:
    """The EFT data as judge-training records, every line checked (fields, a score within the rubric's
    range): read with the other inputs, before the run starts, a bad line names its file and line."""
    if not cfg.eft_path:
        return []
    records = read_jsonl(cfg.eft_path, EFT_FIELDS)
    text = Path(cfg.eft_path).read_text(encoding="utf-8")
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]  # read_jsonl skips blanks
    out = []
    for r, lineno in zip(records, lines):
        try:
            out.append(eft_example(r["prompt"], r["response"], r.get("justification", ""), float(r["score"]),
                                   cfg.judge.template))
        except ValueError as e:
            raise UserError(f"{cfg.eft_path}:{lineno}: {e}") from None
    return out


def sft_records(cfg: SelfRewardConfig, tok, ift: list[dict], eft: list[dict] | None = None) -> tuple[list[dict], dict]:
    """M_0's data: IFT in the chat template, and EFT judge prompts (`eft_examples`) as `judge()` will prompt them."""
    eft = eft_examples(cfg) if eft is None else eft
    records = [{"prompt": format_prompt(tok, r["prompt"]), "response": r["response"]} for r in ift]
    records += [{"prompt": format_prompt(tok, r["prompt"]) if cfg.judge.chat else r["prompt"],
                 "response": r["response"]} for r in eft]
    return records, {"ift": len(ift), "eft": len(eft), "dataset_size": len(records)}


def write_prompts(model, tok, seeds: list[str], cfg: SelfRewardConfig, iteration: int, out) -> tuple[list, dict]:
    """New instructions from few-shot lists of seed instructions; drops empty, repeated and seed ones."""
    rng = random.Random(f"{cfg.seed}/{iteration}/prompts")
    lists = []
    for _ in range(cfg.new_prompts):
        picked = rng.sample(seeds, min(cfg.prompt_shots, len(seeds)))
        lists.append(PROMPT_HEADER + "".join(f"Task: {' '.join(p.split())}\n" for p in picked) + "Task:")
    groups = generate(model, tok, lists, cfg.write.replace(n=1, seed=cfg.write.seed + iteration), out=out)
    known, kept, dropped = set(seeds), [], {"empty": 0, "repeated": 0}
    for (completion,) in groups:
        text = completion.text.strip()
        if not text:
            dropped["empty"] += 1
        elif text in known:
            dropped["repeated"] += 1
        else:
            known.add(text)
            kept.append({"prompt": text})
    return kept, {"prompts_written": len(lists), "prompts_kept": len(kept), "prompts_dropped": dropped}


def judge_samples(model, tok, prompts: list[str], samples: list[dict], cfg: JudgeConfig) -> tuple[list, dict]:
    """Every answer with its mean judged score (None when no judgment parsed) and its judgments."""
    verdicts = judge(model, tok, [(prompts[s["prompt_index"]], s["text"]) for s in samples], cfg)
    judged = [{**s, "prompt": format_prompt(tok, prompts[s["prompt_index"]]), "score": v.score,
               "judgments": v.texts} for s, v in zip(samples, verdicts)]
    parsed = sum(x is not None for v in verdicts for x in v.scores)
    return judged, {"judgments": len(verdicts) * cfg.sample.n, "judgments_parsable": parsed}


def build_pairs(judged: list[dict]) -> tuple[list[dict], dict]:
    """(highest, lowest) judged answer per prompt, with the reason each prompt without a pair has."""
    dropped = {"too_long": 0, "unparsable_judgment": 0, "tie": 0}
    records = []
    for _, group in sorted(group_by_prompt(judged).items()):
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
                                "score_chosen": best["score"], "score_rejected": worst["score"],
                                **sampled_ids("chosen", best), **sampled_ids("rejected", worst)})
    return records, {"pairs": len(records), "dataset_size": len(records), "dropped": dropped}


def run(cfg: SelfRewardConfig, out, *, restart: bool = False, progress: bool = True, name: str = "self_reward",
        prompts=None, pairs=None, evaluate=None, select_on: str = "valid_judge_score", validation: int | None = None):
    """Run (or resume) self-rewarding training in `out`; returns (metrics per iteration, the best one).

    Seams for a task with a hidden verifier (the CPU demo): `prompts(t)` gives iteration t's new prompts as
    (records, summary) instead of the fixed model writing them; `pairs(judged, t)` builds the DPO pairs
    instead of `build_pairs` (a control pairs blind); `evaluate(model, tokenizer, t)` gives an iterate's
    held-out metrics instead of the fixed judge's, `select_on` naming the one that chooses the best and
    `validation` how many problems that metric is measured on (default: the held-out instructions).
    """
    if not (cfg.eft_path or cfg.no_eft or cfg.skip_sft):
        raise UserError("self-rewarding trains its judge on EFT data: set eft_path (prompt, response, "
                        "justification, score), or no_eft = true to train M_0 on instructions alone")
    eft = eft_examples(cfg)  # every input is checked before the run folder is bound
    run = Run(out, name, cfg, restart=restart)
    task = get_task("instruct")
    ift = task.load("train", cfg.ift_path)
    if cfg.test_path:
        test = [r["prompt"] for r in task.load("test", cfg.test_path)][: cfg.eval_size]
    else:
        ift, test = ift[: -cfg.eval_size], [r["prompt"] for r in ift[-cfg.eval_size:]]
    if len(ift) < 2:
        raise UserError(f"self-rewarding needs more IFT records than eval_size ({cfg.eval_size}) + 1")
    ift, valid = split_validation(ift, cfg.validation_size, cfg.seed, cap=cfg.eval_size)
    valid = [r["prompt"] for r in valid]
    seeds = [r["prompt"] for r in ift]
    models = Iterates(run, cfg.model)

    def evaluate_judged(t):  # iterate t answers; one fixed judge (judge_model, else M_0) grades every iterate
        model, tok = models.sampler(t)
        fixed = models.other_sampler(cfg.judge_model, 0)
        return {**judged_eval(model, tok, test, cfg.judge, cfg.respond, judge_with=fixed),
                **judged_eval(model, tok, valid, cfg.judge, cfg.respond, judge_with=fixed, prefix="valid_"),
                "judge": cfg.judge_model or "iteration 0"}

    def sft_data():  # M_0's data, tokenised as judge() and generate() will prompt
        return write_stage(run.dir(0) / "dataset.jsonl", *sft_records(cfg, models.get(0)[1], ift, eft))

    def respond(t):  # N answers to each new prompt, in the chat template
        model, tok = models.sampler(t - 1)
        new = read_jsonl(run.dir(t) / "prompts.jsonl", {"prompt": "string"})
        prompts = [format_prompt(tok, r["prompt"]) for r in new]
        return sampled(generate(model, tok, prompts, cfg.respond.replace(seed=cfg.respond.seed + t),
                                out=run.dir(t) / "samples.jsonl", progress=progress))

    def judge_answers(t):  # k judgments of every answer by M_{t-1} itself
        new = [r["prompt"] for r in read_jsonl(run.dir(t) / "prompts.jsonl", {"prompt": "string"})]
        judging = dataclasses.replace(cfg.judge, sample=cfg.judge.sample.replace(seed=cfg.judge.sample.seed + t))
        samples = read_jsonl(run.dir(t) / "samples.jsonl", COMPLETION_FIELDS, len(new), SAMPLE_KEY)
        return write_stage(run.dir(t) / "judged.jsonl", *judge_samples(*models.sampler(t - 1), new, samples, judging))

    measure = (lambda t: evaluate(*models.sampler(t), t)) if evaluate else evaluate_judged
    write = prompts or (lambda t: write_prompts(*models.other_sampler(cfg.prompt_model, 0), seeds, cfg, t,
                                                run.dir(t) / "prompts_raw.jsonl"))
    pair = pairs or (lambda judged, t: build_pairs(judged))
    if not cfg.skip_sft:  # M_0: SFT of the base model on IFT + EFT
        run.once(0, "build", sft_data)
        run.once(0, "train", lambda: models.fit(0, *models.get(0), cfg.sft, reference="current", progress=progress))
    run.once(0, "eval", lambda: measure(0))
    run.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        d = run.dir(t)
        # a fixed model writes new prompts; M_{t-1} answers each N times and judges every answer k times
        run.once(t, "prompts", lambda: write_stage(d / "prompts.jsonl", *write(t)))
        run.once(t, "respond", lambda: respond(t))
        run.once(t, "judge", lambda: judge_answers(t))
        built = run.once(t, "build", lambda: write_stage(d / "dataset.jsonl", *pair(
            read_jsonl(d / "judged.jsonl", JUDGED_FIELDS, unique=SAMPLE_KEY), t)))
        # DPO on (best, worst) from M_{t-1}, which is the reference
        trained = run.once(t, "train", lambda: models.fit(t, *models.get(t - 1), cfg.train, reference="current",
                                                          progress=progress, empty=f"no pairs: {built['dropped']}"))
        run.once(t, "eval", lambda: measure(t))
        run.log(t, "eval", "prompts", "build", judgments_parsable=run.summaries[t]["judge"]["judgments_parsable"],
                train_note=trained.get("skipped"))
    models.close()
    return run.finish(select_on, validation=len(valid) if validation is None else validation)
