"""Peak GPU memory and hours per iteration of the example configs on one 24 GB card, from the model shapes.

    python bench/estimate_memory.py                  # every examples/*.toml × the sizes its header lists
    python bench/estimate_memory.py --write          # ... and refresh the estimate blocks in examples/
    python bench/estimate_memory.py --gpu rtx3090    # times for an RTX 3090 instead of a 4090
    python bench/estimate_memory.py --measure        # check the activation term on the CPU, append to the CSV

Nothing here runs on a GPU. Every figure is arithmetic on the llm-jp-3 shapes (`lite_selftrain.models.PRESETS`),
the recipe config and the data assumptions in `DATA`, as the package loads and runs a QLoRA model today:

Memory, bytes, per stage (the largest stage is the run's peak; budget 20 GiB of a 24 GiB card, leaving
~1 GiB for the CUDA context and workspaces and ~3 GiB of allocator slack):
- weights: NF4 linears 0.5 B + 0.127 bit per weight (8-bit absmax per 64, fp32 per 256 absmax); embeddings,
  lm_head and norms fp32 (`prepare_model_for_kbit_training` upcasts every non-4-bit weight); LoRA A/B fp32.
  ReST-EM and centrality train a fresh base while the recipe still holds the previous iterate: two copies.
- training, N = rows × T tokens (a DPO pair is two rows; T = the longest sequence the stage can see):
  LoRA grads 4 B + paged AdamW 8-bit states 2 B per LoRA weight. Activations saved for backward:
  A = 31·H + 14·I bytes per token and layer, as the residual stream is fp32 and bitsandbytes returns fp32
  MLP outputs (`--measure`: within 1 % at the 150m and 3.7b shapes), + 6·H + I bytes of boolean LoRA
  dropout masks when dropout is on (not measured: the CPU keeps fp32 masks); with gradient checkpointing
  L·N·4·H (each layer's fp32 input, measured) + one layer's A. Backward working set N·(8·H + 8·I)
  (residual and MLP gradients, fp32; an allowance, not measured). Fused log-prob head: the gathered hidden
  states and their gradient N·8·H plus a 64 MiB logit tile (never the N × V logits). A dequantised bf16
  weight and its transpose 4·H·I + 256 MiB of cuBLAS / kernel workspace.
- forward-only passes (DPO reference log-probs, centrality embeddings): one layer's transient
  N·(12·H + 12·I) plus the head.
- sampling, rows = prompts per batch × n: the policy's merged bf16 copy, 2 B per dense weight, when it fits
  in half of what the stage leaves free (`models.sampling_policy`'s rule); KV cache rows × (longest prompt +
  max_new_tokens) × 2·L·H_kv × 2 B (bf16; 4 B, fp32, when the adapter model is decoded as it is); prefill
  transient prompts × T × (12·H + 12·I); logits and the sampler's sort / softmax buffers rows × V × 8 B
  (top-k), 16 B (full softmax) or 32 B (top-p sort).

Time (hours; an estimate from shapes, not a measurement): each pass costs max(device time, host time).
Training 2·P FLOPs per token forward, 2·P backward (frozen weights: no weight gradients) and 2·P more
with checkpointing, plus attention 4·L·H·T per pass and the head 6·V·H per response token, at `mfu` of
the card's dense bf16 peak. A decode step of the merged copy reads its bf16 linears and lm_head and the
live rows' bf16 KV cache (half a page of masked columns more per row) at `bandwidth_eff` of peak
bandwidth, and is replayed from a CUDA graph: its floor is `graph_layer_s` per layer (kernels back to
back on the device, no Python between them). Where the copy does not fit, a step reads the NF4 weights,
writes and reads their bf16 dequantised copy (bitsandbytes dequantises for every batch of more than one
row: 4.5 B per weight), the fp32 lm_head and an fp32 KV cache, and its floor is the host's `launch_s` per
layer (eager PyTorch + bitsandbytes + peft launch ~100 small kernels per layer). Rows refill as they
finish (continuous refill): a stage's steps are its tokens over the slots (prompts per batch × n) at
`occupancy`, plus the last rows running out (max − mean new tokens). Training passes: `launch_s` per
layer and pass on the host.
Simplifications: no scoring, I/O or model-loading time; data sizes and lengths are the assumptions in
`DATA`; one sampling batch stands for all (sorted by length, the worst batch holds the longest prompts).
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lite_selftrain.config import load_config as load_recipe_config
from lite_selftrain.models.merging import FREE_SHARE  # sampling_policy merges when the copy fits this share
from lite_selftrain.recipes import RECIPES, load_recipe
from lite_selftrain.sampling.engine.static import PAGE  # the CUDA-graph decode reads keys in pages of PAGE
from lite_selftrain.sampling.generate import FREE_TEXT_TOKENS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RESULTS = Path(__file__).parent / "results" / "estimate_memory.csv"
GiB = 2**30
STREAM = 4  # bytes per element of the residual stream (and of an unmerged policy's KV cache): fp32 under QLoRA
BF16 = 2  # bytes per element of the merged sampling copy and its KV cache
BEGIN, END = "# -- estimates (python bench/estimate_memory.py --write) --", "# -- end of estimates --"
TABLE_BEGIN, TABLE_END = "<!-- estimates:begin -->", "<!-- estimates:end -->"


@dataclass
class GPU:
    name: str = "RTX 4090"
    bf16_tflops: float = 165.2  # dense bf16 tensor-core peak with fp32 accumulation
    bandwidth_gbs: float = 1008.0  # GDDR6X peak


GPUS = {"rtx4090": GPU(), "rtx3090": GPU("RTX 3090", 71.0, 936.0)}


@dataclass
class Rates:
    budget_gib: float = 20.0  # of 24 GiB: ~1 GiB CUDA context and workspaces, ~3 GiB allocator slack
    mfu: float = 0.35  # share of bf16 peak that QLoRA matmuls sustain (dequantise, then GEMM)
    bandwidth_eff: float = 0.75  # share of peak bandwidth a decode step's reads reach
    launch_s: float = 1.0e-3  # host time per layer and pass: ~100 small kernels of eager PyTorch, ~10 µs each
    graph_layer_s: float = 3.0e-5  # a replayed decode step, per layer: ~15 kernels ~2 µs apart (assumed, not
    # yet measured: bench/gpu_check.py's sampling parts give the step time that replaces it)
    padding: float = 1.1  # length-grouped batches still carry ~10 % padding
    occupancy: float = 0.875  # busy decode slots: prompts join once a quarter is free (continuous refill)


@dataclass
class DataShape:
    train: int  # training problems / prompts per iteration
    test: int  # held-out problems
    prompt_mean: int  # prompt tokens (llm-jp-3 tokenizer), few-shot block or chat template included
    prompt_max: int  # the longest prompt: it sizes the worst sampling batch
    response_mean: int  # tokens of a sampled completion, on average
    kept_per_problem: float = 3.0  # ReST-EM: correct samples kept per problem (cap 10; small models solve few)
    pairs_per_problem: float = 4.0  # Iterative RPO: pairs per question (K caps it; unsolved questions give 0)


DATA = {  # sizes of the public sets; token lengths are assumptions for llm-jp-3's tokenizer
    "gsm8k": DataShape(train=7473, test=1319, prompt_mean=310, prompt_max=480, response_mean=150),
    "math": DataShape(train=7500, test=5000, prompt_mean=300, prompt_max=1200, response_mean=320),
    "MATH-500": DataShape(train=0, test=500, prompt_mean=300, prompt_max=1200, response_mean=320),
    "oasst1": DataShape(train=9800, test=64, prompt_mean=110, prompt_max=1024, response_mean=220),
    "oasst1-21k-ja": DataShape(train=21200, test=64, prompt_mean=160, prompt_max=1024, response_mean=220),
}
JUDGE_RUBRIC = 220  # tokens of the judge prompt around the (prompt, response) pair


# ----------------------------------------------------------------------------------------------------
# shapes and memory


def shape(name: str) -> dict:
    """The PRESETS shape of an llm-jp-3 model named by hub id, preset or folder (matched on its size)."""
    from lite_selftrain.models import PRESETS

    size = re.search(r"(150m|980m|1\.8b|3\.7b)", name)
    if not size:
        raise ValueError(f"no llm-jp-3 size (150m, 980m, 1.8b, 3.7b) in model name '{name}'")
    s = PRESETS[f"llm-jp-3-{size.group(1)}"]
    H, L = s["hidden_size"], s["num_hidden_layers"]
    kv = s["num_key_value_heads"] * H // s["num_attention_heads"]
    return dict(size=size.group(1), H=H, I=s["intermediate_size"], L=L, V=s["vocab_size"], kv=kv,
                linear=L * (2 * H * H + 2 * H * kv + 3 * H * s["intermediate_size"]))


def lora_params(s: dict, r: int) -> int:
    H, I, kv = s["H"], s["I"], s["kv"]
    return s["L"] * r * (2 * (H + H) + 2 * (H + kv) + 2 * (H + I) + (I + H))  # q, o; k, v; gate, up; down


def weight_bytes(s: dict, r: int) -> float:
    nf4 = s["linear"] * (0.5 + 0.127 / 8)  # 4-bit codes + double-quantised absmax
    dense = (2 * s["V"] * s["H"] + (2 * s["L"] + 1) * s["H"]) * 4  # embeddings, lm_head, norms: fp32
    return nf4 + dense + lora_params(s, r) * 4


def workspace(s: dict) -> float:
    return 4 * s["H"] * s["I"] + 256 * 2**20  # a dequantised bf16 weight and its transpose; cuBLAS, kernels


def train_bytes(s: dict, r: int, rows: int, T: int, ckpt: bool, dropout: bool) -> float:
    """Bytes a training step adds to the weights, for micro-batches of rows × T tokens."""
    H, I, L, N = s["H"], s["I"], s["L"], rows * T
    per_layer = 31 * H + 14 * I + (6 * H + I if dropout else 0)  # saved for backward, per token and layer
    saved = L * N * STREAM * H + N * per_layer if ckpt else L * N * per_layer  # checkpoints keep layer inputs
    optimizer = lora_params(s, r) * 6  # fp32 gradients + 8-bit Adam moments
    backward = N * (8 * H + 8 * I)  # residual and MLP gradients in flight
    head = N * 8 * H + 64 * 2**20  # gathered hidden states and their gradient, one logit tile
    return saved + optimizer + backward + head + workspace(s)


def forward_bytes(s: dict, rows: int, T: int) -> float:
    """Bytes a no-grad forward of rows × T tokens adds: one layer's intermediates at a time, the head."""
    return rows * T * (12 * s["H"] + 12 * s["I"] + 4 * s["H"]) + 64 * 2**20 + workspace(s)


def merged_bytes(s: dict) -> float:
    """The merged sampling copy: every linear, the embeddings, the lm_head and the norms in bf16."""
    return (s["linear"] + 2 * s["V"] * s["H"] + (2 * s["L"] + 1) * s["H"]) * BF16


def sample_bytes(s: dict, prompts: int, n: int, prompt_max: int, new: int, top_k: int, top_p: float,
                 kv_bytes: int = BF16) -> float:
    """Bytes a sampling batch adds: its KV cache, then the larger of prefill and the sampler's buffers."""
    rows = prompts * n
    kv = rows * (prompt_max + new) * 2 * s["L"] * s["kv"] * kv_bytes  # (rows, ctx) per layer, K and V
    logits = rows * s["V"] * (8 if top_k else 32 if top_p < 1 else 16)  # top-k / top-p sort / full softmax
    prefill = prompts * prompt_max * (12 * s["H"] + 12 * s["I"])
    return kv + max(logits, prefill) + workspace(s)


# ----------------------------------------------------------------------------------------------------
# stages: memory and time of each step of a recipe


@dataclass
class Stage:
    name: str
    bytes: float  # peak allocated during the stage
    seconds: float
    once: bool = False  # runs once per run, not every iteration


class Card:
    """Memory and time of the passes a recipe makes, for one model shape on one GPU."""

    def __init__(self, s: dict, r: int, hw: GPU, rt: Rates):
        self.s, self.r, self.hw, self.rt = s, r, hw, rt
        self.flops = hw.bf16_tflops * 1e12 * rt.mfu  # sustained FLOP/s
        self.weights = weight_bytes(s, r)

    def train(self, name, cfg_model, train, examples, seq, response, T, copies=1, once=False) -> list[Stage]:
        """The training stage (and DPO's reference pass) on `examples` of `seq` tokens, `response` scored."""
        s, ckpt, dpo = self.s, cfg_model.gradient_checkpointing, train.objective == "dpo_nll"
        dropout = not train.disable_dropout and cfg_model.lora_dropout > 0
        rows, per = train.batch_size * (2 if dpo else 1), 2 if dpo else 1  # a pair is two rows
        stages = [Stage(name, self.weights * copies + train_bytes(s, self.r, rows, T, ckpt, dropout),
                        self.pass_seconds(examples * train.epochs * per, rows, seq, response, 3 if ckpt else 2), once)]
        if dpo:  # reference log-probs: one forward over every pair before the first step
            ref = 2 * (train.reference_batch_size or 2 * train.batch_size)
            stages.append(Stage("reference", self.weights * copies + forward_bytes(s, ref, T),
                                self.pass_seconds(examples * per, ref, seq, response, 1), once))
        return stages

    def pass_seconds(self, sequences, rows, seq, response, passes) -> float:
        """`passes` passes (1 forward-only, 2 forward + backward, 3 with recomputation) over `sequences`."""
        s = self.s
        tokens = sequences * seq * self.rt.padding
        flops = tokens * passes * (2 * s["linear"] + 4 * s["L"] * s["H"] * seq)
        flops += tokens * response / seq * s["V"] * s["H"] * (2 if passes == 1 else 6)  # fused head
        host = math.ceil(sequences / rows) * s["L"] * passes * self.rt.launch_s
        return max(flops / self.flops, host)

    def decode(self, name, prompts, n, batch, prompt_mean, prompt_max, new, mean_new, top_k, top_p) -> Stage:
        """n completions of <= `new` tokens (mean `mean_new`) for each of `prompts` prompts, `batch` at a time."""
        s, rt = self.s, self.rt
        rows, mean_new = min(batch, prompts) * n, min(mean_new, new)
        ctx = prompt_mean + mean_new / 2  # a row's mean context; refill keeps every slot live
        merged = merged_bytes(s) <= FREE_SHARE * (rt.budget_gib * GiB - self.weights)  # sampling_policy's rule
        if merged:  # plain bf16 GEMMs, replayed from a CUDA graph over pages of columns (half a page more read)
            read, kv_bytes, floor = (s["linear"] + s["V"] * s["H"]) * BF16, BF16, s["L"] * rt.graph_layer_s
            ctx += PAGE / 2
        else:  # bitsandbytes + peft, eager
            per_weight = 4.5 if rows > 1 else 0.53  # dequantise-then-GEMM, or bitsandbytes' 4-bit GEMV for one row
            read = s["linear"] * per_weight + s["V"] * s["H"] * 4 + lora_params(s, self.r) * 4
            kv_bytes, floor = STREAM, s["L"] * rt.launch_s
        read += rows * ctx * 2 * s["L"] * s["kv"] * kv_bytes
        flops = rows * (2 * (s["linear"] + s["V"] * s["H"]) + 4 * s["L"] * s["H"] * ctx)
        step = max(read / (self.hw.bandwidth_gbs * 1e9 * rt.bandwidth_eff), flops / self.flops, floor)
        prefill = 2 * s["linear"] * prompts * prompt_mean / self.flops
        memory = self.weights + (merged_bytes(s) if merged else 0)
        memory += sample_bytes(s, min(batch, prompts), n, prompt_max, new, top_k, top_p, kv_bytes)
        steps = prompts * n * mean_new / (rows * rt.occupancy) + new - mean_new  # then the last rows run out
        return Stage(name, memory, steps * step + prefill)


def _data(name: str | None, default: str) -> DataShape:
    """The DATA entry whose key appears in `name` (a task, hub id or path), else `default`'s."""
    key = next((k for k in sorted(DATA, key=len, reverse=True) if name and k in name), default)
    return DATA[key]


def verified_stages(recipe: str, cfg, c: Card) -> list[Stage]:
    """ReST-EM and Iterative RPO: sample, train (ReST-EM: a fresh base beside the held iterate), evaluate."""
    from lite_selftrain.tasks import get_task

    d, sm, ev = _data(cfg.task, cfg.task), cfg.sample, cfg.eval
    new = sm.max_new_tokens or get_task(cfg.task).max_new_tokens
    problems, test = cfg.problems_per_iteration or d.train, ev.limit or _data(cfg.test_path, cfg.task).test
    lengths = (d.prompt_mean, d.prompt_max, new, d.response_mean)
    stages = [c.decode("sample", problems, sm.n, sm.batch_size, *lengths, sm.top_k, sm.top_p)]
    examples = problems * (d.kept_per_problem if recipe == "rest-em" else d.pairs_per_problem)
    T = min(cfg.train.max_length, d.prompt_max + new + 1)
    stages += c.train("train", cfg.model, cfg.train, examples, d.prompt_mean + d.response_mean, d.response_mean, T,
                      copies=2 if recipe == "rest-em" else 1)
    stages.append(c.decode("eval greedy", test, 1, ev.sample.batch_size, *lengths, 1, 1.0))
    if ev.sample.n > 1:
        stages.append(c.decode("eval sampled", test, ev.sample.n, ev.sample.batch_size, *lengths, ev.sample.top_k,
                               ev.sample.top_p))
    return stages


def _judge(c: Card, name, judge, answers, d: DataShape, new) -> Stage:
    mean, longest = JUDGE_RUBRIC + d.prompt_mean + d.response_mean, JUDGE_RUBRIC + d.prompt_max + new
    js = judge.sample
    return c.decode(name, answers, js.n, js.batch_size, mean, longest, js.max_new_tokens, 120, js.top_k, js.top_p)


def judged_eval_stages(cfg, c: Card, d: DataShape, respond) -> list[Stage]:
    """Greedy answers to the held-out prompts, each judged k times by the same model, once per rubric."""
    new = respond.max_new_tokens or FREE_TEXT_TOKENS
    judged = cfg.eval_size * (1 + len(cfg.rubrics))  # judge.template, then each of `rubrics`
    return [c.decode("eval answers", cfg.eval_size, 1, respond.batch_size, d.prompt_mean, d.prompt_max, new,
                     d.response_mean, 1, 1.0), _judge(c, "eval judge", cfg.judge, judged, d, new)]


def self_reward_stages(cfg, c: Card) -> list[Stage]:
    """SFT once, then per iteration: write prompts, answer, judge, DPO, evaluate."""
    d, sm = _data(cfg.ift_path, "oasst1"), cfg.respond
    new, seq = sm.max_new_tokens or FREE_TEXT_TOKENS, d.prompt_mean + d.response_mean
    stages = [] if cfg.skip_sft else c.train("sft", cfg.model, cfg.sft, d.train, seq, d.response_mean,
                                             cfg.sft.max_length, once=True)
    listing, wr = cfg.prompt_shots * d.prompt_mean + 20, cfg.write  # a header, then one line per seed instruction
    stages.append(c.decode("prompts", cfg.new_prompts, 1, wr.batch_size, listing, 2 * listing,
                           wr.max_new_tokens, wr.max_new_tokens, wr.top_k, wr.top_p))
    kept = int(0.9 * cfg.new_prompts)  # empty and repeated prompts are dropped
    stages.append(c.decode("respond", kept, sm.n, sm.batch_size, d.prompt_mean, d.prompt_max, new, d.response_mean,
                           sm.top_k, sm.top_p))
    stages.append(_judge(c, "judge", cfg.judge, kept * sm.n, d, new))
    T = min(cfg.train.max_length, d.prompt_max + new + 1)
    stages += c.train("train", cfg.model, cfg.train, int(0.7 * kept), seq, d.response_mean, T)  # ties: no pair
    return stages + judged_eval_stages(cfg, c, d, sm)


def centrality_stages(cfg, c: Card) -> list[Stage]:
    """Sample from M0, embed every candidate (and original), retrain a fresh M0 beside the held one, evaluate."""
    d, sm = _data(cfg.data_path, "oasst1"), cfg.sample
    prompts = min(cfg.limit or d.train, d.train - (0 if cfg.test_path else cfg.eval_size))
    new = sm.max_new_tokens or FREE_TEXT_TOKENS
    stages = [c.decode("sample", prompts, sm.n, sm.batch_size, d.prompt_mean, d.prompt_max, new, d.response_mean,
                       sm.top_k, sm.top_p)]
    rows = cfg.selection.batch_size
    stages.append(Stage("embed", c.weights + forward_bytes(c.s, rows, new + 1),
                        c.pass_seconds(prompts * (sm.n + 1), rows, d.response_mean, 0, 1)))
    keeps_original = cfg.objective == "sft" and cfg.selection.policy in ("original", "central_or_original")
    T = cfg.train.max_length if keeps_original else min(cfg.train.max_length, d.prompt_max + new + 1)
    examples = prompts // 2 if cfg.objective == "sft" and cfg.selection.policy == "central_or_drop" else prompts
    stages += c.train("train", cfg.model, cfg.train, examples, d.prompt_mean + d.response_mean, d.response_mean, T,
                      copies=2)
    return stages + judged_eval_stages(cfg, c, d, sm)


def estimate(recipe: str, cfg, hw: GPU | None = None, rt: Rates | None = None) -> dict:
    """{size, peak_gib, peak_stage, fits, stages: {name: (GiB, hours)}, iteration_h, once_h, run_h}."""
    hw, rt = hw or GPU(), rt or Rates()
    s = shape(cfg.model.name)
    c = Card(s, cfg.model.lora_r, hw, rt)
    if recipe in ("rest-em", "rpo"):
        stages = verified_stages(recipe, cfg, c)
    else:
        stages = self_reward_stages(cfg, c) if recipe == "self-reward" else centrality_stages(cfg, c)
    peak = max(stages, key=lambda st: st.bytes)
    iteration = sum(st.seconds for st in stages if not st.once) / 3600
    once = sum(st.seconds for st in stages if st.once) / 3600
    eval0 = sum(st.seconds for st in stages if st.name.startswith("eval")) / 3600  # iteration 0 is evaluated
    return {"size": s["size"], "peak_gib": peak.bytes / GiB, "peak_stage": peak.name,
            "fits": peak.bytes / GiB <= rt.budget_gib,
            "stages": {st.name: (st.bytes / GiB, st.seconds / 3600) for st in stages},
            "iteration_h": iteration, "once_h": once, "run_h": once + eval0 + cfg.iterations * iteration}


# ----------------------------------------------------------------------------------------------------
# the example files: "# recipe: NAME" and "# size SIZE: --set ..." header lines


def read_header(path: Path) -> tuple[str, dict[str, list[str]]]:
    """(recipe, {size: [key=value overrides]}) from an example's header comments."""
    text = path.read_text()
    recipe = re.search(r"^# recipe: (\S+)\s*$", text, re.M)
    if not recipe or recipe.group(1) not in RECIPES:
        raise ValueError(f"{path.name}: no '# recipe: <{' | '.join(RECIPES)}>' line")
    sizes = {}
    for size, args in re.findall(r"^# size (\S+):(.*)$", text, re.M):
        words = shlex.split(args.split("#")[0])
        if words[::2] != ["--set"] * (len(words) // 2) or len(words) % 2:
            raise ValueError(f"{path.name}: size {size}: expected '--set key=value' pairs, got {args.strip()!r}")
        sizes[size] = words[1::2]
    return recipe.group(1), sizes


def load_config(recipe: str, path: Path, overrides: list[str]):
    """The recipe config the CLI would build from `path` and `--set` overrides."""
    return load_recipe_config(load_recipe(recipe)[1], path, overrides)


def example_files() -> list[Path]:
    """examples/*.toml in recipe order (as RECIPES lists them), then by name."""
    order = list(RECIPES)
    return sorted(EXAMPLES.glob("*.toml"), key=lambda p: (order.index(read_header(p)[0]), p.name))


def example_estimates(path: Path, hw: GPU, rt: Rates) -> list[dict]:
    recipe, sizes = read_header(path)
    return [{"file": path.name, "recipe": recipe, **estimate(recipe, load_config(recipe, path, over), hw, rt)}
            for over in sizes.values()]


def _hours(h: float) -> str:
    return f"{h:.1f}" if h < 10 else f"{h:.0f}"


def render_block(rows: list[dict], hw: GPU, rt: Rates) -> str:
    """The comment block an example file carries: per size, peak GiB and hours (per iteration, whole run)."""
    lines = [BEGIN, f"# Expected on one {hw.name} (24 GB), estimated from the shapes, not measured. Peak: the",
             f"# allocated GiB of the largest stage (budget {rt.budget_gib:g}); hours per iteration and per run.",
             "#   size   peak GiB (stage)         h/iteration (largest stages)                       h/run"]
    for e in rows:
        top = ", ".join(f"{k} {h:.1f}" for k, (_, h) in sorted(e["stages"].items(), key=lambda kv: -kv[1][1])[:3])
        lines.append(f"#   {e['size']:5s}  {e['peak_gib']:5.1f}    ({e['peak_stage'] + ')':15s} "
                     f"{e['iteration_h']:6.1f}      ({top + ')':39s} {_hours(e['run_h']):>6s}")
    return "\n".join(lines + [END])


def render_table(rows: list[dict], hw: GPU) -> str:
    """Two markdown tables, one row per example: peak GiB (stage) and hours per iteration (whole run)."""
    sizes = list(dict.fromkeys(e["size"] for e in rows))
    files = list(dict.fromkeys(e["file"] for e in rows))
    cell = {(e["file"], e["size"]): e for e in rows}
    head = "| example | " + " | ".join(sizes) + " |\n|---|" + "---|" * len(sizes)
    peak = lambda e: f"{e['peak_gib']:.1f} ({e['peak_stage']})"
    hours = lambda e: f"{e['iteration_h']:.1f} ({_hours(e['run_h'])})"
    out = [TABLE_BEGIN, "", f"Estimated for one {hw.name} from the shapes (`python bench/estimate_memory.py`); "
           "not measured."]
    for title, fmt in (("Peak allocated GiB (the stage that reaches it):", peak),
                       ("Hours per iteration (whole run: iteration 0's evaluation and one-off stages included):",
                        hours)):
        out += ["", title, "", head]
        out += [f"| `{f}` | " + " | ".join(fmt(cell[f, s]) if (f, s) in cell else "" for s in sizes) + " |"
                for f in files]
    return "\n".join(out + ["", TABLE_END])


def refreshed(text: str, begin: str, end: str, block: str) -> str:
    """`text` with the part from `begin` to `end` replaced by `block`."""
    a, b = text.find(begin), text.find(end)
    if a < 0 or b < a:
        raise ValueError(f"no '{begin}' ... '{end}' block")
    return text[:a] + block + text[b + len(end):]


# ----------------------------------------------------------------------------------------------------
# --measure: the activation term against the bytes autograd really saves (CPU, bf16 autocast)


def measure_saved(preset: str, layers: int, tokens: int = 256, checkpointing: bool = False) -> int:
    """Bytes of distinct non-parameter tensors saved for backward by one forward of a QLoRA model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lite_selftrain.models import PRESETS, ModelConfig, build_tokenizer, load_model
    from lite_selftrain.training.logprobs import sequence_logprobs

    spec = {**PRESETS[preset], "num_hidden_layers": layers, "vocab_size": 260}  # the vocabulary is outside layers
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(LlamaConfig(**spec, tie_word_embeddings=False)).to(torch.bfloat16).save_pretrained(folder)
        build_tokenizer(folder)
        cfg = ModelConfig(name=folder, mode="qlora", dtype="bfloat16", device="cpu", lora_dropout=0.0,
                          gradient_checkpointing=checkpointing)  # no dropout: the CPU keeps fp32 masks
        model, _ = load_model(cfg)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(3, 260, (2, tokens // 2))  # (B, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        sequence_logprobs(model, ids, torch.ones_like(ids), torch.ones_like(ids))
    return sum(saved.values())


def measure_weights(preset: str) -> int:
    """Bytes of a QLoRA model's parameters and 4-bit quantisation constants, as `load_model` leaves them."""
    from lite_selftrain.models import ModelConfig, load_model

    model, _ = load_model(ModelConfig(name=preset, mode="qlora", dtype="bfloat16", device="cpu"))
    total = sum(p.untyped_storage().nbytes() for p in model.parameters())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: absmax, and its own absmax when nested
        if qs is not None:
            total += qs.absmax.nbytes + (qs.state2.absmax.nbytes if qs.nested else 0)
    return total


def measure(presets: list[str]) -> None:
    """Each memory term against what the package really allocates (CPU), printed and appended to the CSV."""
    from importlib.metadata import version

    versions = " ".join(f"{p}={version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes"))
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    device = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
                  platform.machine())
    new = not RESULTS.exists() or RESULTS.stat().st_size == 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["time", "device", "versions", "preset", "term", "measured", "formula", "measured_over_formula"])

        def row(preset, term, got, formula):
            print(f"{preset:15s} {term:40s} measured {got:12.0f}  formula {formula:12.0f}  ratio {got / formula:.3f}",
                  flush=True)
            w.writerow([datetime.now(timezone.utc).isoformat(timespec="seconds"), device, versions, preset, term,
                        f"{got:.0f}", f"{formula:.0f}", f"{got / formula:.3f}"])

        for preset in presets:
            s, N = shape(preset), 256
            if preset == "llm-jp-3-150m":  # the whole model: larger presets take minutes to build on a CPU
                row(preset, "weights, bytes (LoRA r 16)", measure_weights(preset), weight_bytes(s, 16))
            for term, ckpt, formula in (("saved activations, bytes/token/layer", False, 31 * s["H"] + 14 * s["I"]),
                                        ("checkpoint input, bytes/token/layer", True, STREAM * s["H"])):
                one_layer = (measure_saved(preset, 2, N, ckpt) - measure_saved(preset, 1, N, ckpt)) / N
                row(preset, term, one_layer, formula)


# ----------------------------------------------------------------------------------------------------
# driver


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", choices=sorted(GPUS), default="rtx4090")
    ap.add_argument("--write", action="store_true", help="rewrite the estimate blocks of examples/")
    ap.add_argument("--measure", nargs="*", metavar="PRESET", help="check the activation term on these presets "
                    "(default llm-jp-3-150m llm-jp-3-3.7b; slow on a CPU)")
    args = ap.parse_args(argv)
    if args.write and args.gpu != "rtx4090":
        ap.error("--write records the RTX 4090 figures (the ones tests/test_examples.py checks)")
    if args.measure is not None:
        return measure(args.measure or ["llm-jp-3-150m", "llm-jp-3-3.7b"])
    hw, rt = GPUS[args.gpu], Rates()
    everything = []
    for path in example_files():
        rows = example_estimates(path, hw, rt)
        everything += rows
        block = render_block(rows, hw, rt)
        print(f"{path.name}\n{block}\n")
        if args.write:
            path.write_text(refreshed(path.read_text(), BEGIN, END, block))
    readme = EXAMPLES / "README.md"
    if args.write:
        readme.write_text(refreshed(readme.read_text(), TABLE_BEGIN, TABLE_END, render_table(everything, hw)))
    over = [f"{e['file']} {e['size']}" for e in everything if not e["fits"]]
    print("all fit the budget" if not over else f"over the {rt.budget_gib:g} GiB budget: {', '.join(over)}")
    if over:
        sys.exit(1)


if __name__ == "__main__":
    main()
