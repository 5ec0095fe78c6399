"""Self-Rewarding Language Models (Yuan et al. 2024, arXiv 2401.10020): the model is its own judge.

    M_0 = SFT(base, IFT + EFT)   instruction data, and judge-training data ending in "Score: s" (the paper's
                                 M1; without EFT data the run stops unless `no_eft` says so)
    for t = 1..T:
        write new prompts: 8 prompts drawn from IFT as a few-shot list, a FIXED model continues it (the
        paper used Llama 2-Chat 70B; here `prompt_model`, a local model or a server's, else M_0);
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
the seed data or written twice are dropped; two answers with the same text never make a pair (their
judgments, sampled, may differ). The fixed judge and the iterate it grades are in memory together.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Count, Name, PositiveInt, check_fields
from ..errors import UserError
from ..judge import Endpoint, EndpointConfig, JudgeConfig, eft_example, judge, rubric
from ..models import ModelConfig, format_prompt
from ..sampling import SamplingConfig, generate, group_by_prompt, sampled
from ..store import COMPLETION_FIELDS, SAMPLE_KEY, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from .common import Iterates, Run, check_trainable, write_stage
from .shared import Scored, finished, instruction_splits, judge_eval, open_endpoint, preference_pair

PROMPT_HEADER = "Below are tasks that users asked an assistant to do. Write one more task.\n\n"


@dataclass
class SelfRewardConfig:
    ift_path: Name | None = None  # instruction → response seed data (the `instruct` task's layouts)
    eft_path: Name | None = None  # judge seed data: prompt, response, justification, score
    no_eft: bool = False  # True: train M_0 without EFT data (it then judges untrained); the explicit opt-out
    prompt_model: Name | None = None  # the fixed model that writes new prompts, or a server's
    # "openai:<model>@<base_url>" (docs/judge_endpoint.md); None: M_0 (never the iterate)
    judge_model: Name | None = None  # the fixed judge of every iterate's held-out answers (a model or a server's
    # model, as prompt_model); None: M_0
    rubrics: tuple[Name, ...] = ()  # more scales to grade held-out answers by ("quality", "safety": the llm-jp
    # study's), beside judge.template; none by default: each costs another k judgments per answer
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)  # key variable, concurrency, retries
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
        objective="dpo_nll", alpha=0.0, beta=0.1, reference="current"))  # plain DPO, β 0.1, reference M_{t-1}
    seed: int = 0  # which seed prompts each few-shot list shows

    def __post_init__(self):
        check_fields(self)
        check_trainable(self.model, ("sft.", self.sft), ("train.", self.train))
        for name in self.rubrics:
            rubric(name)  # an unknown name is refused when the config is read


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
    writing = cfg.write.replace(n=1, seed=cfg.write.seed + iteration)
    if isinstance(model, Endpoint):  # a chat model answers the list: its reply may repeat the "Task:" label
        texts = [(g[0] or "").strip().removeprefix("Task:") for g in model.texts(lists, writing)]
    else:
        texts = [g[0].text for g in generate(model, tok, lists, writing, out=out)]
    known, kept, dropped = set(seeds), [], {"empty": 0, "repeated": 0}
    for text in texts:
        text = text.strip()
        if not text:
            dropped["empty"] += 1
        elif text in known:
            dropped["repeated"] += 1
        else:
            known.add(text)
            kept.append({"prompt": text})
    return kept, {"prompts_written": len(lists), "prompts_kept": len(kept), "prompts_dropped": dropped}


def prompts_stage(job: Run, models: Iterates, writer: Endpoint | None, cfg: SelfRewardConfig, seeds: list[str],
                  t: int) -> dict:
    """Iteration t's prompts (prompts.jsonl), written by the server model `writer` (the tokens it was paid in
    the summary) or else by the local fixed model (`prompt_model`, else M_0)."""
    tokens = dict(writer.tokens) if writer else {}
    kept, info = write_prompts(*((writer, None) if writer else models.other_sampler(cfg.prompt_model, 0)),
                               seeds, cfg, t, job.dir(t) / "prompts_raw.jsonl")
    if writer:
        info["writer_tokens"] = {k: v - tokens.get(k, 0) for k, v in writer.tokens.items()}
    return write_stage(job.dir(t) / "prompts.jsonl", kept, info)


def judge_samples(model, tok, prompts: list[str], samples: list[dict], cfg: JudgeConfig) -> tuple[list, dict]:
    """Every answer with its mean judged score (None when no judgment parsed) and its judgments."""
    verdicts = judge(model, tok, [(prompts[s["prompt_index"]], s["text"]) for s in samples], cfg)
    judged = [{**s, "prompt": format_prompt(tok, prompts[s["prompt_index"]]), "score": v.score,
               "judgments": v.texts} for s, v in zip(samples, verdicts)]
    parsed = sum(x is not None for v in verdicts for x in v.scores)
    return judged, {"judgments": len(verdicts) * cfg.sample.n, "judgments_parsable": parsed}


def answer(job: Run, models: Iterates, respond: SamplingConfig, t: int, *, progress: bool) -> dict:
    """N answers by M_{t-1} to each of iteration t's prompts (prompts.jsonl), in the chat template."""
    model, tok = models.sampler(t - 1)
    prompts = [format_prompt(tok, r["prompt"]) for r in read_jsonl(job.dir(t) / "prompts.jsonl", {"prompt": "string"})]
    return sampled(generate(model, tok, prompts, respond.replace(seed=respond.seed + t),
                            out=job.dir(t) / "samples.jsonl", progress=progress))


def judge_answers(job: Run, models: Iterates, cfg: JudgeConfig, t: int) -> dict:
    """k judgments of every answer of iteration t by M_{t-1} itself, averaged (judged.jsonl)."""
    prompts = [r["prompt"] for r in read_jsonl(job.dir(t) / "prompts.jsonl", {"prompt": "string"})]
    judging = dataclasses.replace(cfg, sample=cfg.sample.replace(seed=cfg.sample.seed + t))
    samples = read_jsonl(job.dir(t) / "samples.jsonl", COMPLETION_FIELDS, len(prompts), SAMPLE_KEY)
    return write_stage(job.dir(t) / "judged.jsonl", *judge_samples(*models.sampler(t - 1), prompts, samples, judging))


def best_vs_worst(judged: list[dict]) -> tuple[list[dict], dict]:
    """(highest, lowest) judged answer per prompt, with the reason each prompt without a pair has."""
    dropped = {"too_long": 0, "unparsable_judgment": 0, "tie": 0, "same_text": 0}
    records = []
    for _, group in sorted(group_by_prompt(judged).items()):
        done = finished(group)
        scored = [s for s in done if s["score"] is not None]
        if len(done) < 2:
            dropped["too_long"] += 1
        elif len(scored) < 2:
            dropped["unparsable_judgment"] += 1
        else:
            best = max(scored, key=lambda s: s["score"])
            worst = min(scored, key=lambda s: s["score"])
            pair = preference_pair(best["prompt"], best, worst, score_chosen=best["score"],
                                   score_rejected=worst["score"])
            if best["score"] == worst["score"]:
                dropped["tie"] += 1
            elif pair is None:
                dropped["same_text"] += 1
            else:
                records.append(pair)
    return records, {"pairs": len(records), "dataset_size": len(records), "dropped": dropped}


def run(cfg: SelfRewardConfig, out, *, restart: bool = False, progress: bool = True, name: str = "self_reward",
        build=None):
    """Run (or resume) self-rewarding training in `out`; returns (metrics per iteration, the best one).

    `build(scored: Scored) -> (records, summary)` replaces `best_vs_worst` on iteration t's judged answers
    (`scored.samples`, each with its mean `score`): the one place a caller changes what DPO trains on.
    """
    if not (cfg.eft_path or cfg.no_eft or cfg.skip_sft):
        raise UserError("self-rewarding trains its judge on EFT data: set eft_path (prompt, response, "
                        "justification, score), or no_eft = true to train M_0 on instructions alone")
    eft = eft_examples(cfg)  # every input is checked before the run folder is bound
    job = Run(out, name, cfg, restart=restart)
    task = get_task("instruct")
    ift, valid, test = instruction_splits(
        task.load("train", cfg.ift_path), task.load("test", cfg.test_path) if cfg.test_path else None,
        eval_size=cfg.eval_size, validation_size=cfg.validation_size, seed=cfg.seed, recipe="self-rewarding")
    seeds = [r["prompt"] for r in ift]
    models = Iterates(job, cfg.model)
    evaluate = judge_eval(models, cfg.judge_model, cfg.judge, cfg.respond, valid, test, rubrics=cfg.rubrics,
                          endpoint=cfg.endpoint)
    writer = open_endpoint(job, cfg.prompt_model, cfg.endpoint, "prompts_written.jsonl")  # checked now
    build = build or (lambda scored: best_vs_worst(scored.samples))

    def sft_data(t):  # M_0's data, tokenised as judge() and generate() will prompt
        return write_stage(job.dir(0) / "dataset.jsonl", *sft_records(cfg, models.get(0)[1], ift, eft))

    def sft(t):  # M_0: SFT of the base model on IFT + EFT
        return models.fit(0, *models.get(0), cfg.sft, progress=progress)

    def new_prompts(t):  # a fixed model (prompt_model, else M_0) continues few-shot lists of seed prompts
        return prompts_stage(job, models, writer, cfg, seeds, t)

    def respond(t):  # M_{t-1} answers each new prompt N times
        return answer(job, models, cfg.respond, t, progress=progress)

    def judge_own(t):  # M_{t-1} judges every answer k times
        return judge_answers(job, models, cfg.judge, t)

    def pair(t):  # (best, worst) judged answer per prompt
        prompts = [r["prompt"] for r in read_jsonl(job.dir(t) / "prompts.jsonl")]
        judged = read_jsonl(job.dir(t) / "judged.jsonl", JUDGED_FIELDS, unique=SAMPLE_KEY)
        scored = Scored(t, prompts, judged, sampler=lambda: models.get(t - 1))
        return write_stage(job.dir(t) / "dataset.jsonl", *build(scored))

    def dpo(t):  # from M_{t-1}, which is the reference
        empty = f"no pairs: {job.summaries[t]['build']['dropped']}"
        return models.fit(t, *models.get(t - 1), cfg.train, progress=progress, empty=empty)

    if not cfg.skip_sft:
        job.once(0, "build", sft_data)
        job.once(0, "train", sft)
    job.once(0, "eval", evaluate)
    job.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        job.once(t, "prompts", new_prompts)
        job.once(t, "respond", respond)
        job.once(t, "judge", judge_own)
        job.once(t, "build", pair)
        trained = job.once(t, "train", dpo)
        job.once(t, "eval", evaluate)
        job.log(t, "eval", "prompts", "build", judgments_parsable=job.summaries[t]["judge"]["judgments_parsable"],
                train_note=trained.get("skipped"))
    models.close()
    return job.finish("valid_judge_score", validation=len(valid))
