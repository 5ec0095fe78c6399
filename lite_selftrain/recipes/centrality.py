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
        one fixed judge (`judge_model`, else M_0) with the additive rubric and the study's quality and safety
        scales (`rubrics`); choose the best on prompts held out from training.

Run: `lite-selftrain centrality --config examples/centrality_central_sft_150m.toml --out runs/x`.
Simplifications: responses are embedded without their prompt; evaluation is a model judging greedy
answers (the study used safety and quality benchmarks we cannot ship offline). DPO is the study's plain
DPO by default (`train.alpha` 0, the one field that sets α; `objective` sets only the loss).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from ..config import Count, Name, PositiveInt, check_fields
from ..judge import EndpointConfig, JudgeConfig, rubric
from ..mbr import SelectionConfig, dpo_pairs, select
from ..models import ModelConfig, format_prompt
from ..sampling import SamplingConfig, generate, sampled
from ..store import COMPLETION_FIELDS, SAMPLE_KEY, read_jsonl
from ..tasks import get_task
from ..training import TrainConfig
from ..training.batching import sampled_ids
from .common import Iterates, Run, check_trainable, write_stage
from .shared import finished, instruction_splits, judge_eval, preference_pair


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
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        objective="sft", alpha=0.0, reference="current"))  # DPO's α 0: plain DPO; its reference is M_0
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # for evaluation
    judge_model: Name | None = None  # the fixed judge of every iterate's held-out answers: a model, or a server's
    # "openai:<model>@<base_url>" (docs/judge_endpoint.md); None: M_0
    rubrics: tuple[Name, ...] = ("quality", "safety")  # the llm-jp study's two scales, judged beside judge.template
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)  # key variable, concurrency, retries
    seed: int = 0  # which training prompts the validation split holds out

    def __post_init__(self):
        check_fields(self)
        check_trainable(self.model, ("train.", self.train))
        for name in self.rubrics:
            rubric(name)  # an unknown name is refused when the config is read
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"objective must be 'sft' or 'dpo', not '{self.objective}'")
        loss = "sft" if self.objective == "sft" else "dpo_nll"
        if self.train.objective != loss:  # `objective` decides the trainer's loss; train.alpha decides α
            self.train = dataclasses.replace(self.train, objective=loss)


def candidates_of(samples: list[dict], prompts: int) -> list[list[dict]]:
    """Each prompt's finished samples, in sample order: the candidates a selection chooses among."""
    out = [[] for _ in range(prompts)]
    for s in sorted(finished(samples), key=lambda s: (s["prompt_index"], s["sample_index"])):
        out[s["prompt_index"]].append(s)
    return out


def build(cfg: CentralityConfig, model, tok, prompts: list[str], originals: list[str], samples: list[dict]):
    """The training records, the per-prompt decisions, and a summary of them."""
    kept = candidates_of(samples, len(prompts))
    texts = [[s["text"] for s in group] for group in kept]
    chat = [format_prompt(tok, p) for p in prompts]
    if cfg.objective == "sft":
        decisions = select(model, tok, texts, originals, cfg.selection)
        records = [{"prompt": chat[d["prompt_index"]], "response": d["response"],
                    **(sampled_ids("response", kept[d["prompt_index"]][d["index"]]) if d["decision"] == "generated"
                       else {})} for d in decisions if d["response"] is not None]
    else:
        decisions = dpo_pairs(model, tok, texts, cfg.selection)
        records = [preference_pair(chat[d["prompt_index"]], kept[d["prompt_index"]][d["chosen_index"]],
                                   kept[d["prompt_index"]][d["rejected_index"]])
                   for d in decisions if d["chosen"] is not None]
    info = {"dataset_size": len(records), "decisions": dict(Counter(d["decision"] for d in decisions)),
            "policy": cfg.selection.policy if cfg.objective == "sft" else "dpo"}
    return records, decisions, info


def run(cfg: CentralityConfig, out, *, restart: bool = False, progress: bool = True, name: str = "centrality"):
    """Run (or resume) centrality self-selection in `out`; returns (metrics per iteration, the best one)."""
    job = Run(out, name, cfg, restart=restart)
    task = get_task("instruct")
    data, valid, test = instruction_splits(
        task.load("train", cfg.data_path), task.load("test", cfg.test_path) if cfg.test_path else None,
        eval_size=cfg.eval_size, validation_size=cfg.validation_size, seed=cfg.seed, recipe="centrality")
    data = data[: cfg.limit] if cfg.limit else data
    prompts, originals = [r["prompt"] for r in data], [r["response"] for r in data]
    models = Iterates(job, cfg.model)
    evaluate = judge_eval(models, cfg.judge_model, cfg.judge, cfg.sample, valid, test, rubrics=cfg.rubrics,
                          endpoint=cfg.endpoint)

    def sample(t):  # n responses per prompt from M_{t-1}, in the chat template
        model, tok = models.sampler(t - 1)
        return sampled(generate(model, tok, [format_prompt(tok, p) for p in prompts],
                                cfg.sample.replace(seed=cfg.sample.seed + t), out=job.dir(t) / "samples.jsonl",
                                progress=progress))

    def select_central(t):  # the most central candidate (or pair) by M_{t-1}'s own embeddings
        samples = read_jsonl(job.dir(t) / "samples.jsonl", COMPLETION_FIELDS, len(prompts), SAMPLE_KEY)
        records, decisions, info = build(cfg, *models.get(t - 1), prompts, originals, samples)
        write_stage(job.dir(t) / "decisions.jsonl", decisions, {})
        return write_stage(job.dir(t) / "dataset.jsonl", records, info)

    def retrain(t):  # M_0 afresh on the selection; for DPO, M_0 is the reference too
        empty = f"empty dataset: {job.summaries[t]['build']['decisions']}"
        return models.fit(t, *models.fresh_base(), cfg.train, progress=progress, empty=empty)

    job.once(0, "eval", evaluate)
    job.log(0, "eval")
    for t in range(1, cfg.iterations + 1):
        job.once(t, "sample", sample)
        job.once(t, "build", select_central)
        trained = job.once(t, "train", retrain)
        job.once(t, "eval", evaluate)
        job.log(t, "eval", "build", train_note=trained.get("skipped"))
    models.close()
    return job.finish("valid_judge_score", validation=len(valid))
