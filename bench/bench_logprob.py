"""Token log-prob providers side by side: forward+backward time and peak memory, swept over tokens.

    python bench/bench_logprob.py                                  # CPU: naive, chunked (+ CCE, TRL)
    python bench/bench_logprob.py --tokens 4096 --hidden 2048      # the CPU target point alone
    python bench/bench_logprob.py --device cuda --dtype bfloat16   # + our triton strategies, Liger, CCE, TRL
    python bench/bench_logprob.py --device cuda --dtype bfloat16 --tokens 8192 --hidden 3072  # llm-jp-3-3.7b
    python bench/bench_logprob.py --trainable-head                 # lm_head requires grad as well

Shapes are llm-jp-3's (H = 512, 2048, 3072; V = 99,584), fp32 by default (--dtype bfloat16 on GPU).
Each call is a provider's forward, then backward of Σ_n g_n ℓ_n with a random g; the lm_head is frozen
unless --trainable-head (the QLoRA / LoRA case). Our CUDA providers: triton (the GEMM-fold default of
impl="triton": cuBLAS GEMMs, Triton folds; `kernels/triton_gemm.py`), triton_small / triton_large (the same
with [2048 × 4096] / [8192 × 16384] token × vocabulary tiles instead of [4096 × 8192]), triton_tiles (the
all-Triton `tl.dot` kernels, the earlier default) and triton_direction (their frozen-head variant that
forms the gradient in the forward). Outside providers, each when it is importable:
- liger (CUDA): Liger-Kernel's fused linear cross entropy, summed (one scalar, so g is not applied);
- cce: Apple's Cut Cross-Entropy with reduction="none" (minus our log-prob), its Triton kernel with its
  default gradient filtering on CUDA, its `torch_compile` path (compiled naive) on CPU;
- trl: TRL's log-prob autograd function (`_ChunkedLogProbFunction`, what its DPO trainer runs: cuBLAS tiles
  folded by a Triton kernel on CUDA, torch ops elsewhere), which always forms the lm_head gradient.
On CUDA the table adds achieved TFLOP/s (the useful 4·N·H·V flops with a frozen head, 6·N·H·V with a
trainable one, over the time) against the card's dense tensor-core peak (bf16/fp16, or TF32 for fp32;
--peak-tflops overrides the table).

How it measures:
- CPU: every (provider, shape) runs in a fresh child process. The child creates and touches its inputs,
  reads its peak resident set (getrusage ru_maxrss) as the baseline, runs one forward+backward and
  reads the peak again: the difference is the peak memory beyond the inputs. The hidden-state gradient
  (N·H·4 bytes, alive at the peak of both paths) is subtracted for the "beyond inputs and grad_h"
  column the target refers to. Further calls in the child are timed only. Providers alternate over
  --rounds rounds of children so that load from other processes hits both alike; the reported time
  is the minimum over all calls, the CSV also keeps the median.
- CUDA: in-process; CUDA events around each call after one warm-up call; peak memory is
  torch.cuda.max_memory_allocated minus what was allocated after the inputs were created.

Every run appends rows to bench/results/bench_logprob.csv with the device and library versions, and
prints ratios to naive measured in the same run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from lite_selftrain.kernels import fused_logprob

RESULTS = Path(__file__).parent / "results" / "bench_logprob.csv"
VOCAB = 99584  # llm-jp-3
DEFAULT_HIDDEN = {"cpu": [512, 2048, 3072], "cuda": [512, 2048, 3072]}
DEFAULT_TOKENS = {"cpu": [1024, 4096], "cuda": [1024, 2048, 4096, 8192, 16384]}  # CPU: ~15 min on 2 cores


# ----------------------------------------------------------------------------------------------------
# providers: each maps (h, W, t, g) to one forward+backward


def _logprob_step(impl):
    def step(h, w, t, g):
        out = fused_logprob(h, w, t, impl=impl)  # (N,)
        (out * g).sum().backward()

    return step


def _tiles_step(frozen_head="auto"):
    """The all-Triton kernels; frozen_head="direction" differs from "auto" only when the head is frozen."""
    from lite_selftrain.kernels.triton_logprob import TritonConfig, triton_logprob

    cfg = TritonConfig(frozen_head=frozen_head)

    def step(h, w, t, g):
        (triton_logprob(h, w, t, cfg=cfg) * g).sum().backward()

    return step


def _gemm_step(block_n, block_v):
    """The GEMM-fold strategy with other token × vocabulary blocks than its defaults."""
    from lite_selftrain.kernels.triton_gemm import GemmConfig, gemm_logprob

    cfg = GemmConfig(block_n=block_n, block_v=block_v)

    def step(h, w, t, g):
        (gemm_logprob(h, w, t, cfg=cfg) * g).sum().backward()

    return step


def _liger_step():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def step(h, w, t, g):
        loss = loss_fn(w, h, t)
        (loss[0] if isinstance(loss, tuple) else loss).backward()

    return step


def _cce_step(impl):
    from cut_cross_entropy import linear_cross_entropy

    def step(h, w, t, g):
        loss = linear_cross_entropy(h, w, t, reduction="none", impl=impl)  # (N,) = −ℓ
        (-loss.float() * g).sum().backward()

    return step


def _trl_step(chunk_size=4096):
    try:
        from trl.trainer.utils import _ChunkedLogProbFunction
    except ImportError:
        from trl.experimental.async_grpo.chunk_lm_head import _ChunkedLogProbFunction

    with_bias = "bias" in inspect.signature(_ChunkedLogProbFunction.forward).parameters  # trl ≥ 1.16

    def step(h, w, t, g):
        if with_bias:  # (hidden, weight, bias, targets, τ, chunk, softcap, logit scale, optional outputs)
            logp = _ChunkedLogProbFunction.apply(h, w, None, t, 1.0, chunk_size, None, 1.0, ())[0]  # (N,)
        else:
            logp = _ChunkedLogProbFunction.apply(h, w, t, 1.0, chunk_size)[0]  # (N,)
        (logp * g).sum().backward()

    return step


def providers(device: str) -> dict:
    found = {"naive": _logprob_step("naive"), "chunked": _logprob_step("chunked")}
    outside = {"cce": lambda: _cce_step("cce" if device == "cuda" else "torch_compile"), "trl": _trl_step}
    if device == "cuda":
        found["triton"] = _logprob_step("triton")  # the GEMM-fold default
        found["triton_small"] = _gemm_step(2048, 4096)  # its block sizes, measured side by side
        found["triton_large"] = _gemm_step(8192, 16384)
        found["triton_tiles"] = _tiles_step()  # the all-Triton kernels, for comparison
        found["triton_direction"] = _tiles_step("direction")
        outside = {"liger": _liger_step, **outside}
    for name, make in outside.items():
        try:
            found[name] = make()
        except ImportError:
            print(f"{name} not importable: skipping it", file=sys.stderr)
    return found


# dense tensor-core peak in TFLOP/s, (16-bit, TF32), from the vendors' data sheets (SXM parts)
PEAK_TFLOPS = {"H200": (989, 494), "H100": (989, 494), "A100": (312, 156), "L40S": (362, 183),
               "L4": (121, 60), "A10": (125, 62), "RTX 4090": (165, 83), "RTX 3090": (71, 36)}


def peak_tflops(name: str, dtype: torch.dtype, override: float | None) -> float | None:
    if override:
        return override
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


def make_inputs(n, hd, v, dtype, device, trainable):
    """Created in place, in their final dtype and device: no transient copy inflates the memory baseline."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, hd, generator=g, dtype=dtype, device=device).requires_grad_()
    w = torch.randn(v, hd, generator=g, dtype=dtype, device=device).mul_(hd**-0.5).requires_grad_(trainable)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    up = torch.randn(n, generator=g, device=device)
    return h, w, t, up


# ----------------------------------------------------------------------------------------------------
# one measurement


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def measure_cpu_child(name, n, hd, v, dtype, trainable, calls) -> dict:
    """Runs inside a fresh process: peak memory of the first call, time of every call."""
    step = providers("cpu")[name]
    h, w, t, up = make_inputs(n, hd, v, dtype, "cpu", trainable)
    base = _maxrss_bytes()
    times = []
    for i in range(calls):
        h.grad = w.grad = None
        start = time.perf_counter()
        step(h, w, t, up)
        times.append(time.perf_counter() - start)
        if i == 0:
            peak = _maxrss_bytes() - base
    return dict(times=times, peak=peak)


def measure_cpu(name, n, hd, v, dtype, trainable, calls) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([name, n, hd, v, str(dtype)[6:], trainable, calls])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_cuda(step, n, hd, v, dtype, trainable, calls) -> dict:
    h, w, t, up = make_inputs(n, hd, v, dtype, "cuda", trainable)
    step(h, w, t, up)  # warm-up: Triton compiles, cuBLAS picks its kernels
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(calls):
        h.grad = w.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(h, w, t, up)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return dict(times=times, peak=torch.cuda.max_memory_allocated() - base)


# ----------------------------------------------------------------------------------------------------
# the sweep


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"torch {torch.__version__}; triton {tv}; python {platform.python_version()}"


def run(args) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    steps = providers(device)
    names = [p for p in steps if p in args.providers]
    rows = []
    for hd in args.hidden or DEFAULT_HIDDEN[device]:
        for n in args.tokens or DEFAULT_TOKENS[device]:
            results = {name: dict(times=[], peak=0) for name in names}
            for _ in range(args.rounds if device == "cpu" else 1):
                for name in names:
                    if device == "cpu":
                        r = measure_cpu(name, n, hd, VOCAB, dtype, args.trainable_head, args.calls)
                    else:
                        r = measure_cuda(steps[name], n, hd, VOCAB, dtype, args.trainable_head, args.calls)
                    results[name]["times"] += r["times"]
                    results[name]["peak"] = max(results[name]["peak"], r["peak"])
            grad_h = n * hd * dtype.itemsize
            naive = results.get("naive")
            flops = (6 if args.trainable_head else 4) * n * hd * VOCAB  # the useful GEMMs, not recomputes
            peak = peak_tflops(device_name(device), dtype, args.peak_tflops) if device == "cuda" else None
            print(f"\nN={n} H={hd} V={VOCAB} {args.dtype} {'trainable' if args.trainable_head else 'frozen'} head, "
                  f"{device_name(device)}" + (f", peak {peak} TFLOP/s" if peak else ""))
            print(f"{'provider':>16} {'time s':>9} {'x naive':>8} {'peak MB':>9} {'-grad_h MB':>11} {'x naive':>8} "
                  f"{'TFLOP/s':>8} {'% peak':>7}")
            for name, r in results.items():
                best, extra = min(r["times"]), r["peak"] - grad_h
                t_ratio = best / min(naive["times"]) if naive else float("nan")
                m_ratio = extra / max(naive["peak"] - grad_h, 1) if naive else float("nan")
                tflops = flops / best / 1e12
                pct = 100 * tflops / peak if peak else float("nan")
                print(f"{name:>16} {best:9.3f} {t_ratio:8.3f} {r['peak'] / 2**20:9.1f} {extra / 2**20:11.1f} "
                      f"{m_ratio:8.4f} {tflops:8.2f} {pct:7.1f}")
                rows.append(dict(
                    time=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device_name(device),
                    versions=versions(), provider=name, dtype=args.dtype, tokens=n, hidden=hd, vocab=VOCAB,
                    head="trainable" if args.trainable_head else "frozen", time_min_s=f"{best:.4f}",
                    time_median_s=f"{statistics.median(r['times']):.4f}", calls=len(r["times"]),
                    peak_mb=f"{r['peak'] / 2**20:.1f}", peak_minus_grad_h_mb=f"{extra / 2**20:.1f}",
                    time_vs_naive=f"{t_ratio:.4f}", peak_minus_grad_h_vs_naive=f"{m_ratio:.4f}",
                    tflops=f"{tflops:.3f}", pct_of_peak=f"{pct:.1f}" if peak else ""))
    return rows


def append_csv(rows: list[dict]) -> None:
    from results_csv import append_rows  # bench/ is on sys.path when this script runs

    append_rows(RESULTS, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, nargs="*", help="token counts N to sweep")
    ap.add_argument("--hidden", type=int, nargs="*", help="hidden sizes H to sweep")
    ap.add_argument("--trainable-head", action="store_true", help="the lm_head weight requires grad too")
    ap.add_argument("--providers", nargs="*", default=["naive", "chunked", "triton", "triton_small", "triton_large",
                                                         "triton_tiles", "triton_direction", "liger", "cce", "trl"])
    ap.add_argument("--peak-tflops", type=float, help="the card's dense peak, when the table does not know it")
    ap.add_argument("--calls", type=int, default=None, help="calls per child (CPU) or per provider (CUDA)")
    ap.add_argument("--rounds", type=int, default=2, help="CPU: alternating rounds of fresh children")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, n, hd, v, dtype, trainable, calls = json.loads(args.child)
        print(json.dumps(measure_cpu_child(name, n, hd, v, getattr(torch, dtype), trainable, calls)))
        return
    args.calls = args.calls or (2 if args.device == "cpu" else 10)
    append_csv(run(args))


if __name__ == "__main__":
    main()
