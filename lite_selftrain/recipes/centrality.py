"""Self-selection by embedding centrality (the llm-jp study, Yoshida et al.; ALGORITHMS.md §4).

    M_0: an instruction-tuned model; prompts (with their original responses) from instruction data
    for t = 1..T (the study ran one round):
        sample n responses per prompt from M_{t-1};
        embed each with the model's OWN hidden states (mean-pooled, L2-normalised) and score it by its mean
        cosine similarity to the other candidates (an MBR choice with cosine utility, lite_selftrain.mbr);
        SFT: the policy picks the new response — (1) original, (2) most central, (3) most central but drop
        the example when the original ranks low, (4) most central but keep the original when it ranks low;
        DPO: chosen = most central, rejected = least central, ties skipped;
        retrain M_0 on the new data → M_t; evaluate on held-out prompts, every iterate's answers graded by
        one fixed judge (`judge_model`, else M_0); choose the best on prompts held out from training.

Run: `lite-selftrain centrality --config examples/centrality_central_sft_150m.toml --out runs/x`.
Simplifications: responses are embedded without their prompt; evaluation is a model judging greedy
answers (the study used safety and quality benchmarks we cannot ship offline).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from ..config import Count, Name, PositiveInt, check_fields
from ..errors import UserError
from ..judge import JudgeConfig, judged_eval
from ..mbr import SelectionConfig, dpo_pairs, select
from ..models import ModelConfig, format_prompt
from ..sampling import SamplingConfig, generate, sampled
from ..store import COMPLETION_FIELDS, SAMPLE_KEY, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from ..training.batching import sampled_ids
from .common import Iterates, Run, check_trainable, split_validation, write_stage


@dataclass
class CentralityConfig:
    data_path: Name | None = None  # instruction data with original responses (the `instruct` task's layouts)
    test_path: Name | None = None  # held-out instructions; None: the last `eval_size` records
    eval_size: PositiveInt = 64  # held-out instructions judged per iteration
    validation_size: PositiveInt | None = None  # training prompts held out to choose the best iteration on; None:
    # min(eval_size, 10 %): each is answered and judged k times per iteration
    limit: PositiveInt | None = None  # use only the first `limit` training prompts
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="qlora"))
    iterations: Count = 1  # the study retrained once
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig(
        n=8, temperature=0.7, top_p=0.9, max_new_tokens=256))  # n candidates per prompt
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # policy, rank threshold, layer, pooling
    objective: Literal["sft", "dpo"] = "sft"  # "sft" on the selected responses, or "dpo" on (most, least) central pairs
    train: TrainConfig = field(default_factory=lambda: TrainConfig(objective="sft"))
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # for evaluation
    judge_model: Name | None = None  # the fixed judge of every iterate's held-out answers; None: M_0
    def __post_init__(self):
        check_fields(self)
        check_trainable(self.model, ("train.", self.train))
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"objective must be 'sft' or 'dpo', not '{self.objective}'")
        wanted = "sft" if self.objective == "sft" else "dpo_nll"
        if self.train.objective != wanted:  # the objective decides the trainer's loss
            self.train = dataclasses.replace(self.train, objective=wanted,
                                             alpha=self.train.alpha if wanted == "sft" else 0.0)


def build(cfg: CentralityConfig, model, tok, prompts: list[str], originals: list[str], samples: list[dict]):
    """The training records and why each prompt gave one or not."""
    candidates, kept = [[] for _ in prompts], [[] for _ in prompts]  # texts, and their sample records
    for s in sorted(samples, key=lambda s: (s["prompt_index"], s["sample_index"])):
        if s["finish_reason"] != "length":  # an unfinished answer is no candidate
            candidates[s["prompt_index"]].append(s["text"])
            kept[s["prompt_index"]].append(s)
    chat = [format_prompt(tok, p) for p in prompts]
    if cfg.objective == "sft":
        decisions = select(model, tok, candidates, originals, cfg.selection)
        records = [{"prompt": chat[d["prompt_index"]], "response": d["response"],
                    **(sampled_ids("response", kept[d["prompt_index"]][d["index"]]) if d["decision"] == "generated"
                       else {})} for d in decisions if d["response"] is not None]
    else:
        decisions = dpo_pairs(model, tok, candidates, cfg.selection)
        records = [{"prompt": chat[d["prompt_index"]], "chosen": d["chosen"], "rejected": d["rejected"],
                    **sampled_ids("chosen", kept[d["prompt_index"]][d["chosen_index"]]),
                    **sampled_ids("rejected", kept[d["prompt_index"]][d["rejected_index"]])}
                   for d in decisions if d["chosen"] is not None]
    info = {"dataset_size": len(records), "decisions": dict(Counter(d["decision"] for d in decisions)),
            "policy": cfg.selection.policy if cfg.objective == "sft" else "dpo"}
    return records, decisions, info


def run(cfg: CentralityConfig, out, *, restart: bool = False, progress: bool = True, name: str = "centrality"):
    """Run (or resume) centrality self-selection in `out`; returns (metrics per iteration, the best one)."""
    run = Run(out, name, cfg, restart=restart)
    data = get_task("instruct").load("train", cfg.data_path)
    if cfg.test_path:
        test = [r["prompt"] for r in get_task("instruct").load("test", cfg.test_path)][: cfg.eval_size]
    else:
        data, test = data[: -cfg.eval_size], [r["prompt"] for r in data[-cfg.eval_size:]]
    if len(data) < 2:
        raise UserError(f"centrality needs more records than eval_size ({cfg.eval_size}) + 1")
    data, valid = split_validation(data, cfg.validation_size, 0, cap=cfg.eval_size)
    valid = [r["prompt"] for r in valid]
    data = data[: cfg.limit] if cfg.limit else data
    prompts, originals = [r["prompt"] for r in data], [r["response"] for r in data]
    models = Iterates(run, cfg.model)

    def evaluate(t):  # iterate t answers; one fixed judge (judge_model, else M_0) grades every iterate
        model, tok = models.sampler(t)
        fixed = models.other_sampler(cfg.judge_model, 0)
        return {**judged_eval(model, tok, test, cfg.judge, cfg.sample, judge_with=fixed),
                **judged_eval(model, tok, valid, cfg.judge, cfg.sample, judge_with=fixed, prefix="valid_"),
                "judge": cfg.judge_model or "iteration 0"}

    def candidates(t):  # n responses per prompt from M_{t-1}, in the chat template
        model, tok = models.sampler(t - 1)
        return sampled(generate(model, tok, [format_prompt(tok, p) for p in prompts],
                                cfg.sample.replace(seed=cfg.sample.seed + t), out=run.dir(t) / "samples.jsonl",
                                progress=progress))

    def selection(t):  # the most central candidate (or pair) by M_{t-1}'s own embeddings
        samples = read_jsonl(run.dir(t) / "samples.jsonl", COMPLETION_FIELDS, len(prompts), SAMPLE_KEY)
        records, decisions, info = build(cfg, *models.get(t - 1), prompts, originals, samples)
        write_stage(run.dir(t) / "decisions.jsonl", decisions, {})
        return write_stage(run.dir(t) / "dataset.jsonl", records, info)

    run.once(0, "eval", lambda: evaluate(0))
    run.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        run.once(t, "sample", lambda: candidates(t))
        built = run.once(t, "build", lambda: selection(t))
        # retrain M_0 on the selection; for DPO, M_0 is the reference too
        trained = run.once(t, "train", lambda: models.fit(t, *models.fresh_base(), cfg.train, reference="current",
                                                          progress=progress,
                                                          empty=f"empty dataset: {built['decisions']}"))
        run.once(t, "eval", lambda: evaluate(t))
        run.log(t, "eval", "build", train_note=trained.get("skipped"))
    models.close()
    return run.finish("valid_judge_score", validation=len(valid))
