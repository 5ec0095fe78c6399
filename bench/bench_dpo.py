"""DPO + NLL training-step throughput and peak memory: this trainer against TRL's DPOTrainer, on CPU.

    python bench/bench_dpo.py                       # llm-jp-3-150m shapes, LoRA r=16, 2 pairs × 256 tokens
    python bench/bench_dpo.py --steps 2 --response-len 64 --providers lite,trl
    python bench/bench_dpo.py --device cuda --preset llm-jp-3-1.8b --pairs 4   # bf16 on a GPU: + peak GPU memory

Same model (random weights, the preset's 99,584-token vocabulary), same LoRA (r, alpha, all linear
layers but lm_head, no dropout), same pairs (random letters, all one length so neither side pads), same
batch and objective: sigmoid DPO + token-mean NLL on the chosen response, TRL's
`loss_type=["sigmoid", "sft"]`, `loss_weights=[1, 1]`. Each provider runs in a fresh subprocess, so its
peak RSS is its own; the first `--warmup` steps are not timed. Providers:

- `lite`: `lite_selftrain.train` (reference log-probs from one pass before training, cached);
- `trl`: DPOTrainer as configured by default (reference = adapter switched off, one extra forward a step);
- `trl_precompute`: DPOTrainer with `precompute_ref_log_probs=True`, the closest TRL gets to our setup.

Rows are appended to bench/results/bench_dpo.csv with the device and library versions. Finally prints an
estimate, from the shapes alone, of the peak GPU memory of a QLoRA DPO step of llm-jp-3-3.7b.
Simplifications: a handful of steps (the machine is shared), so ratios are what to compare; on CUDA the
model is bf16 (both providers), and the peak is torch's allocated peak, not the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench_dpo.csv"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pairs(n: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(string.ascii_letters) for _ in range(k))
    return [{"prompt": text(prompt_len), "chosen": text(response_len), "rejected": text(response_len)}
            for _ in range(n)]


# ----------------------------------------------------------------------------------------------------
# workers: one provider per fresh process


def _model(args):
    import torch
    from peft import LoraConfig, get_peft_model

    from lite_selftrain.models import build_model, build_tokenizer

    tok = build_tokenizer()
    tok.padding_side = "right"
    base = build_model(args.preset, seed=0)  # the preset's own vocabulary (99,584 for llm-jp-3)
    if args.device == "cuda":
        base = base.to("cuda", torch.bfloat16)  # both providers train a bf16 base, TRL with bf16=True
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **LORA)), tok


def _run_lite(args, model, tok, pairs, out: Path) -> dict:
    from lite_selftrain.store import JsonlLog
    from lite_selftrain.training import TrainConfig, train

    cfg = TrainConfig(objective="dpo_nll", nll_norm="token", lr=1e-5, max_steps=args.warmup + args.steps,
                      batch_size=args.pairs, grad_accum=1, log_every=1, checkpoint_every=10_000,
                      max_length=args.prompt_len + args.response_len + 1, warmup_ratio=0.0)
    t0 = time.perf_counter()
    summary = train(model, tok, pairs, cfg, out)
    wall = time.perf_counter() - t0
    logs = JsonlLog(out / "metrics.jsonl").read()
    first, last = logs[args.warmup - 1] if args.warmup else {"elapsed_s": 0.0, "tokens": 0}, logs[-1]
    return {"step_s": (last["elapsed_s"] - first["elapsed_s"]) / args.steps,
            "tokens_per_step": (last["tokens"] - first["tokens"]) / args.steps,
            "setup_s": wall - summary["train_time_s"]}  # the one-off reference pass (and data preparation)


def _run_trl(args, model, tok, pairs, out: Path, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_step_begin(self, *a, **k):
            self.starts.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

    cfg = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
                    max_steps=args.warmup + args.steps, learning_rate=1e-5, lr_scheduler_type="cosine",
                    loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], beta=0.1,
                    max_length=args.prompt_len + args.response_len + 1, precompute_ref_log_probs=precompute,
                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                    bf16=args.device == "cuda",
                    dataloader_num_workers=0, disable_dropout=True, seed=0)
    clock = Clock()
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         callbacks=[clock])
    setup = time.perf_counter() - t0
    trainer.train()
    timed = [e - s for s, e in zip(clock.starts, clock.ends)][args.warmup:]
    return {"step_s": sum(timed) / len(timed), "tokens_per_step": 2 * args.pairs * (args.prompt_len +
                                                                                   args.response_len + 1),
            "setup_s": setup}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, tok = _model(args)
    rss_model = _rss_mb()
    pairs = _pairs(args.pairs * (args.warmup + args.steps), args.prompt_len, args.response_len)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "lite":
            res = _run_lite(args, model, tok, pairs, Path(tmp))
        else:
            res = _run_trl(args, model, tok, pairs, Path(tmp), precompute=args.worker == "trl_precompute")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if args.device == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res.update(provider=args.worker, tokens_per_s=res["tokens_per_step"] / res["step_s"], peak_rss_mb=peak,
               model_rss_mb=rss_model, peak_over_model_mb=peak - rss_model)
    print("RESULT " + json.dumps(res))


# ----------------------------------------------------------------------------------------------------
# the estimate for a 24 GB card


def qlora_dpo_estimate(preset="llm-jp-3-3.7b", seq=1024, pairs=4, r=16, checkpointing=True) -> dict:
    """Peak GPU memory (GiB) of one QLoRA DPO step with the fused log-prob head, from the shapes alone.

    The terms come from bench/estimate_memory.py, whose per-token activation and weight formulas were
    checked against what the package allocates on the CPU: NF4 linears with double quantisation, fp32
    embeddings / lm_head / norms (peft's k-bit preparation upcasts them), LoRA weights, fp32 gradients and
    8-bit Adam moments, saved activations (only layer inputs with checkpointing), the fused head's one
    logit tile. Reference log-probs come from the cache: no second model.
    """
    import estimate_memory as em  # bench/ is on sys.path when this script runs

    s = em.shape(preset)
    rows, GiB = 2 * pairs, 2**30  # chosen and rejected rows in one forward
    parts = {"weights (nf4 + fp32 embeddings/head + LoRA)": em.weight_bytes(s, r) / GiB,
             "training step (activations, grads, Adam, head, workspace)":
                 em.train_bytes(s, r, rows, seq, checkpointing, dropout=False) / GiB}
    parts["total"] = sum(parts.values())
    parts["full logits, for comparison"] = rows * seq * s["V"] * 4 / GiB
    return parts


# ----------------------------------------------------------------------------------------------------
# driver


def _device_name(device: str = "cpu") -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def one(p):
        try:
            return f"{p}={version(p)}"
        except PackageNotFoundError:
            return f"{p}=none"

    return " ".join(one(p) for p in ("torch", "transformers", "peft", "trl", "lite-selftrain"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llm-jp-3-150m")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step (rows = 2 × pairs)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=191, help="tokens before EOS; 64+191+1 = 256")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per provider")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="1: on a shared CPU more threads thrash")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--providers", default="lite,trl,trl_precompute")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    results = {}
    for provider in args.providers.split(","):
        cmd = [sys.executable, __file__, "--worker", provider] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "providers")]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{provider} failed:\n{proc.stderr[-3000:]}")
        results[provider] = json.loads(line[len("RESULT "):])
        r = results[provider]
        print(f"{provider:15s} {r['tokens_per_s']:8.1f} tok/s  {r['step_s']:7.2f} s/step  peak RSS "
              f"{r['peak_rss_mb']:7.0f} MB ({r['peak_over_model_mb']:+6.0f} MB over the loaded model)  "
              f"setup {r['setup_s']:.1f} s" + (f"  peak GPU {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""),
              flush=True)

    base = results.get("trl")
    if base and "lite" in results:
        lite = results["lite"]
        print(f"lite vs trl: {lite['tokens_per_s'] / base['tokens_per_s']:.2f}x throughput, "
              f"{lite['peak_rss_mb'] / base['peak_rss_mb']:.2f}x peak RSS, "
              f"{lite['peak_over_model_mb'] / base['peak_over_model_mb']:.2f}x RSS over the model")
    from results_csv import append_rows  # bench/ is on sys.path when this script runs

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    append_rows(RESULTS, [
        {"time": now, "device": _device_name(args.device), "threads": args.threads, "versions": _versions(),
         "preset": args.preset, "pairs": args.pairs, "seq_len": args.prompt_len + args.response_len + 1,
         "steps": args.steps, "provider": p, "tokens_per_s": f"{r['tokens_per_s']:.2f}",
         "step_s": f"{r['step_s']:.3f}", "peak_rss_mb": f"{r['peak_rss_mb']:.0f}",
         "peak_over_model_mb": f"{r['peak_over_model_mb']:.0f}",
         "peak_cuda_mb": f"{r['peak_cuda_mb']:.0f}" if "peak_cuda_mb" in r else "",
         "throughput_vs_trl": f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}" if base else ""}
        for p, r in results.items()])

    est = qlora_dpo_estimate()
    print("\nestimated peak GPU memory, QLoRA DPO step of llm-jp-3-3.7b, seq 1024, 4 pairs (8 rows), "
          "gradient checkpointing, fused log-probs:")
    for k, v in est.items():
        print(f"  {k:58s} {v:6.2f} GiB")
    fits = est["total"] < 24 * 0.9  # leave ~10 % for the CUDA context and fragmentation
    print(f"  fits a 24 GB card: {'yes' if fits else 'NO'}; without checkpointing the step alone would be "
          f"{qlora_dpo_estimate(checkpointing=False)['training step (activations, grads, Adam, head, workspace)']:.1f}"
          " GiB")


if __name__ == "__main__":
    main()
