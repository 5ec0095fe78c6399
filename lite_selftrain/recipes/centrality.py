"""Self-selection by embedding centrality (the llm-jp study, Yoshida et al.; ALGORITHMS.md §4).

    M_0: an instruction-tuned model; prompts (with their original responses) from instruction data
    for t = 1..T (the study ran one round):
        sample n responses per prompt from M_{t-1};
        embed each with the model's OWN hidden states (mean-pooled, L2-normalised) and score it by its mean
        cosine similarity to the other candidates (an MBR choice with cosine utility, lite_selftrain.mbr);
        SFT: the policy picks the new response — (1) original, (2) most central, (3) most central but drop
        the example when the original ranks low, (4) most central but keep the original when it ranks low;
        DPO: chosen = most central, rejected = least central, ties skipped;
        retrain M_0 on the new data → M_t; evaluate on held-out prompts with the judge.

Run: `lite-selftrain centrality --config examples/centrality_central_sft_150m.toml --out runs/x`.
Simplifications: responses are embedded without their prompt; evaluation is the model judging its own
greedy answers (the study used safety and quality benchmarks we cannot ship offline).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from ..errors import UserError
from ..judge import JudgeConfig
from ..mbr import SelectionConfig, dpo_pairs, select
from ..models import ModelConfig, format_prompt
from ..sampling import generate
from ..store import write_jsonl
from ..tasks import get_task
from ..train import TrainConfig
from .common import Iterates, Run, SampleConfig, fit_iterate, judged_eval, read_jsonl


@dataclass
class CentralityConfig:
    data_path: str | None = None  # instruction data with original responses (the `instruct` task's layouts)
    test_path: str | None = None  # held-out instructions; None: the last `eval_size` records
    eval_size: int = 64  # held-out instructions judged per iteration
    limit: int | None = None  # use only the first `limit` training prompts
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    iterations: int = 1  # the study retrained once
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(
        n=8, temperature=0.7, top_k=0, top_p=0.9, max_new_tokens=256, shots=0))  # n candidates per prompt
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # policy, rank threshold, layer, pooling
    objective: str = "sft"  # "sft" on the selected responses, or "dpo" on (most, least) central pairs
    train: TrainConfig = field(default_factory=lambda: TrainConfig(objective="sft"))
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # for evaluation
    seed: int = 0

    def __post_init__(self):
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"objective must be 'sft' or 'dpo', not '{self.objective}'")
        wanted = "sft" if self.objective == "sft" else "dpo_nll"
        if self.train.objective != wanted:  # the objective decides the trainer's loss
            self.train = dataclasses.replace(self.train, objective=wanted,
                                             alpha=self.train.alpha if wanted == "sft" else 0.0)


def build(cfg: CentralityConfig, model, tok, prompts: list[str], originals: list[str], samples: list[dict]):
    """The training records and why each prompt gave one or not."""
    candidates = [[] for _ in prompts]
    for s in sorted(samples, key=lambda s: (s["prompt_index"], s["sample_index"])):
        if s["finish_reason"] != "length":  # an unfinished answer is no candidate
            candidates[s["prompt_index"]].append(s["text"])
    chat = [format_prompt(tok, p) for p in prompts]
    if cfg.objective == "sft":
        decisions = select(model, tok, candidates, originals, cfg.selection)
        records = [{"prompt": chat[d["prompt_index"]], "response": d["response"]} for d in decisions
                   if d["response"] is not None]
    else:
        decisions = dpo_pairs(model, tok, candidates, cfg.selection)
        records = [{"prompt": chat[d["prompt_index"]], "chosen": d["chosen"], "rejected": d["rejected"]}
                   for d in decisions if d["chosen"] is not None]
    info = {"dataset_size": len(records), "decisions": dict(Counter(d["decision"] for d in decisions)),
            "policy": cfg.selection.policy if cfg.objective == "sft" else "dpo"}
    return records, decisions, info


def run(cfg: CentralityConfig, out, *, restart: bool = False, progress: bool = True, recipe: str = "centrality"):
    """Run (or resume) centrality self-selection in `out`; returns (metrics per iteration, the best one)."""
    run = Run(out, recipe, cfg, restart=restart)
    data = get_task("instruct").load("train", cfg.data_path)
    if cfg.test_path:
        test = [r["prompt"] for r in get_task("instruct").load("test", cfg.test_path)][: cfg.eval_size]
    else:
        data, test = data[: -cfg.eval_size], [r["prompt"] for r in data[-cfg.eval_size:]]
    data = data[: cfg.limit] if cfg.limit else data
    if not data:
        raise UserError(f"centrality needs more records than eval_size ({cfg.eval_size})")
    prompts, originals = [r["prompt"] for r in data], [r["response"] for r in data]
    iterates = Iterates(run, cfg.model)
    evaluate = lambda t: judged_eval(*iterates.get(t), test, cfg.judge, cfg.sample)
    run.log_stages(0, {"eval": run.stage(0, "eval", lambda: evaluate(0))}, "eval")
    for t in range(1, cfg.iterations + 1):
        d = run.dir(t)

        def sample_stage():
            model, tok = iterates.get(t - 1)
            groups = generate(model, tok, [format_prompt(tok, p) for p in prompts], n=cfg.sample.n,
                              temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                              max_new_tokens=cfg.sample.max_new_tokens or 256, seed=cfg.seed + t,
                              batch_size=cfg.sample.batch_size, out=d / "samples.jsonl", progress=progress)
            return {"samples": sum(len(g) for g in groups)}

        stages = {"sample": run.stage(t, "sample", sample_stage)}

        def build_stage():
            records, decisions, info = build(cfg, *iterates.get(t - 1), prompts, originals,
                                             read_jsonl(d / "samples.jsonl"))
            write_jsonl(d / "decisions.jsonl", decisions)
            write_jsonl(d / "dataset.jsonl", records)
            return info

        stages["build"] = run.stage(t, "build", build_stage)

        stages["train"] = run.stage(t, "train", lambda: fit_iterate(  # retrain M_0, the DPO reference too
            iterates, t, *iterates.fresh_base(), "current", cfg.train, progress=progress,
            empty=f"empty dataset: {stages['build']['decisions']}"))
        stages["eval"] = run.stage(t, "eval", lambda: evaluate(t))
        run.log_stages(t, stages, "eval", "build", train_note=stages["train"].get("skipped"))
    return run.finish("test_judge_score")
