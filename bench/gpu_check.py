"""Everything that needs CUDA, in one or two runs of under 8 minutes on one GPU, written to one report file.

    python bench/gpu_check.py                          # every part → bench/results/gpu_check.md
    python bench/gpu_check.py --only tests,qlora       # some parts
    python bench/gpu_check.py --report /tmp/gpu.md     # the report elsewhere
    python bench/gpu_check.py --only sampling,sampling_3.7b,sampling_qlora --report /tmp/e_step.md   # under 8 min
    python bench/gpu_check.py --only tests,logprob,logprob_trainable,dpo,qlora,vllm     # the rest, under 7 min

Parts, each in its own process under its own time limit, so one that fails or hangs leaves the others:
- tests:    the GPU-marked tests (`pytest -m gpu`);
- logprob:  the fused log-prob kernels (the GEMM-fold default at three block sizes, the all-Triton
            kernels and their direction variant) against naive, chunked, Liger, CCE and TRL (those
            importable) at llm-jp-3-3.7b's shape (N 8192, H 3072, V 99,584, bf16), frozen head, then
            trainable head (`--only logprob,logprob_trainable`: these two alone, about 2 minutes);
- sampling, sampling_3.7b, sampling_qlora: the native engine (CUDA-graph steps) against Hugging Face
            generate and against the memory-bandwidth roofline (`bench_sampling.py --roofline`): 64 prompts x
            256 tokens, n = 8, 256 new tokens, 16 prompts per batch, bf16, at the llm-jp-3-1.8b and 3.7b
            shapes, and a QLoRA policy of 1.8b (the engine decodes its merged copy); Hugging Face on the first
            16 (3.7b: 8) prompts; at 1.8b also the engine's eager steps (`decode="eager"`), side by side;
- dpo:      a DPO + NLL step of this trainer against TRL's (`bench_dpo.py`, llm-jp-3-1.8b shape, bf16 LoRA);
- qlora:    QLoRA DPO + NLL training steps of the llm-jp-3-1.8b and 3.7b shapes (random weights, written
            once as a bf16 model folder, then loaded by the package's own 4-bit path), 4 pairs × 1024 tokens,
            gradient checkpointing: seconds per step and torch's measured peak memory;
- vllm:     the vLLM tests (tests/test_vllm.py, -m vllm: recipes with backend vllm; skipped without vLLM).
Without CUDA every part writes "no GPU: skipped" and the script exits 0, so it can run anywhere.
The report holds the commit it measured (`git rev-parse HEAD`, "+ changes" when the tree differs from it,
"unknown" outside a git checkout), each part's command, exit status, time and the tail of its output.
A run without a GPU (CI, a user without one) never replaces a report measured on a GPU: it says so and
leaves that report as it was; a GPU run replaces any report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "results" / "gpu_check.md"
PY = sys.executable

SAMPLING = ["--dtype", "bfloat16", "--prompts", "64", "--batch-size", "16", "--n", "8", "--prompt-len", "256",
            "--new-tokens", "256", "--roofline"]  # an E-step: 64 prompts x n 8, 256-token prompts and replies
PARTS = {  # name: (command, seconds allowed); the three sampling parts take under 8 minutes together, the rest too
    "tests": ([PY, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "tests"], 90),
    "logprob": ([PY, "bench/bench_logprob.py", "--device", "cuda", "--dtype", "bfloat16", "--tokens", "8192",
                 "--hidden", "3072"], 75),
    "logprob_trainable": ([PY, "bench/bench_logprob.py", "--device", "cuda", "--dtype", "bfloat16", "--tokens",
                           "8192", "--hidden", "3072", "--trainable-head"], 65),
    "sampling": ([PY, "bench/bench_sampling.py", "--preset", "llm-jp-3-1.8b", *SAMPLING, "--hf-prompts", "16",
                  "--providers", "native,eager,hf"], 170),
    "sampling_3.7b": ([PY, "bench/bench_sampling.py", "--preset", "llm-jp-3-3.7b", *SAMPLING, "--hf-prompts", "8"],
                      150),
    "sampling_qlora": ([PY, "bench/bench_sampling.py", "--preset", "llm-jp-3-1.8b", *SAMPLING, "--hf-prompts", "8",
                        "--qlora"], 150),
    "dpo": ([PY, "bench/bench_dpo.py", "--device", "cuda", "--preset", "llm-jp-3-1.8b", "--pairs", "4",
             "--steps", "3", "--threads", "4", "--providers", "lite,trl"], 100),
    "qlora": ([PY, __file__, "--qlora-child"], 90),
    "vllm": ([PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "vllm", "tests/test_vllm.py",
              "tests/test_sampling.py"], 20),
}


# ----------------------------------------------------------------------------------------------------
# the qlora part: a child process of this script


def _qlora_steps(preset: str, folder: Path, *, pairs=4, seq=1024, steps=3) -> dict:
    """Write `preset`'s random bf16 model to `folder`, load it as QLoRA, train `steps` DPO + NLL steps."""
    import torch

    from lite_selftrain.models import ModelConfig, build_model, load_model, preset_tokenizer
    from lite_selftrain.training import TrainConfig, train

    t0 = time.perf_counter()
    with torch.device("cuda"):  # random init on the GPU: seconds, not minutes
        model = build_model(preset, seed=0, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    preset_tokenizer(preset).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    model, tok = load_model(ModelConfig(name=str(folder), mode="qlora", gradient_checkpointing=True,
                                        lora_dropout=0.0))
    load_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    words = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
             "from", "his", "her", "which"]
    text = lambda k, s: " ".join(words[(i * 7 + s) % len(words)] for i in range(k))
    records = [{"prompt": text(40, i), "chosen": text(2000, i + 1), "rejected": text(2000, i + 2)}
               for i in range(pairs * steps)]  # responses are cut to fill `seq` exactly
    cfg = TrainConfig(objective="dpo_nll", max_steps=steps, batch_size=pairs, grad_accum=1, max_length=seq,
                      log_every=1, checkpoint_every=10_000, warmup_ratio=0.0)
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, tok, records, cfg, out)
    return {"preset": preset, "pairs": pairs, "seq": seq, "load_s": round(load_s, 1),
            "step_s": round(summary["train_time_s"] / steps, 3), "tokens_per_s": round(summary["tokens_per_s"]),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "optimizer": summary["optimizer"], "loss": summary["final"].get("loss")}


def qlora_child() -> None:
    import shutil

    for preset in ("llm-jp-3-1.8b", "llm-jp-3-3.7b"):
        folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        try:
            print(json.dumps(_qlora_steps(preset, folder)), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# the driver


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def commit() -> str:
    """The checkout's commit, "+ changes" when its tracked files differ from it; "unknown" outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" + changes" if changed else "")


def measured_on(report: Path) -> str | None:
    """The GPU a report at `report` was measured on; None when there is none, or it was a run without a GPU."""
    try:
        text = report.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("- device: "):
            device = line[len("- device: ") :].split(";")[0].strip()
            return None if device == "no GPU" else device
    return None


def run_part(name: str, cmd: list[str], limit: int) -> tuple[str, float, str]:
    """(status, seconds, output tail) of one part."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cmd[1] == "-m":  # `python -m` puts the checkout on sys.path, where kernels/ would shadow PyPI's `kernels`
        env["PYTHONSAFEPATH"] = "1"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status, out = f"exit {proc.returncode}", proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit} s"
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    lines = [ln for ln in out.strip().splitlines() if "it/s]" not in ln and "s/it]" not in ln]  # progress bars
    return status, time.perf_counter() - t0, "\n".join(lines[-40:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of: {', '.join(PARTS)}")
    ap.add_argument("--report", type=Path, default=REPORT)
    ap.add_argument("--qlora-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.qlora_child:
        qlora_child()
        return 0
    parts = [p for p in args.only.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    gpu = _gpu()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# GPU check, {now}", "", f"- device: {gpu or 'no GPU'}; host {platform.node()}, "
             f"python {platform.python_version()}", f"- commit: {commit()}", ""]
    start = time.perf_counter()
    for name in parts:
        cmd, limit = PARTS[name]
        if gpu is None:
            line = f"{name}: no GPU: skipped"
            print(line, flush=True)
            lines += [f"## {name}", "", line, ""]
            continue
        status, seconds, tail = run_part(name, cmd, limit)
        print(f"{name}: {status} in {seconds:.0f} s", flush=True)
        shown = " ".join(c if c != __file__ else "bench/gpu_check.py" for c in cmd[1:])
        lines += [f"## {name}: {status}, {seconds:.0f} s", "", f"`python {shown}`", "", "```", tail, "```", ""]
    lines.append(f"total {time.perf_counter() - start:.0f} s")
    kept = measured_on(args.report) if gpu is None else None
    if kept:  # the record of a GPU run outlives CI and every machine without one
        print(f"report: {args.report} kept (measured on {kept}); a run without a GPU does not replace it")
        return 0
    from lite_selftrain.store import atomic_write_bytes

    args.report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.report, ("\n".join(lines) + "\n").encode())  # a killed run leaves the old report
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
