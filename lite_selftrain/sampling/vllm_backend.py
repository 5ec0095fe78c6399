"""The vLLM backend of `sampling.generate`: the same rows as the native engine, from vLLM's engine on a GPU.

    generate(llm, tokenizer, prompts, SamplingConfig(n=8, temperature=0.7, backend="vllm"))   # a vllm.LLM
    generate("path/to/model", tokenizer, prompts, cfg)                                        # or a folder

For users who outgrow the native loop (tensor parallelism, paged attention, continuous batching). The
caller's side is unchanged: `generate` tokenises and checks (or truncates) the prompts, turns rows into
completions and streams them into the same resumable file. The conventions match the native engine:
`token_ids` as vLLM returns them (up to the EOS or the token that completed a stop string), the text
decoded and cut by `generate`, `logprob` the raw model log-prob (vLLM's default "raw_logprobs" mode).

Under a launcher (`torchrun`) every rank builds its own engine on its own GPU in vLLM's external-launcher
data-parallel mode and samples the prompts `generate` deals it; for tensor parallelism pass a `vllm.LLM`
built with `tensor_parallel_size` in one process instead.

Simplifications: a peft model must be merged and saved to a folder first (vLLM loads weights itself);
each prompt gets its own seed, derived from (seed, prompt index), so its samples do not depend on its
batch-mates; prompts go to vLLM in chunks of VLLM_CHUNK so finished chunks reach the file while the
rest runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from collections.abc import Iterator

import torch

from .. import distributed as dist
from ..errors import UserError
from .engine import mix32

VLLM_CHUNK = 1024  # prompts per vLLM call: large enough to keep its scheduler full


def available() -> bool:
    """True when vllm is installed and a CUDA device is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@contextlib.contextmanager
def open_llm(model, tokenizer):
    """A vllm.LLM for `model`: the object itself, a folder, or a plain model saved to a temporary folder."""
    if not available():
        raise UserError("backend 'vllm' needs the vllm package and a CUDA GPU (pip install 'lite-selftrain[vllm]')")
    from vllm import LLM

    if isinstance(model, LLM):
        yield model
        return
    if hasattr(model, "peft_config"):
        raise UserError("backend 'vllm' cannot take a peft model: merge it (merge_and_unload) and save it first")
    with tempfile.TemporaryDirectory(prefix="lite_selftrain_vllm_") as folder:
        if not isinstance(model, str):
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            model = folder
        yield LLM(model=str(model), tokenizer=str(model), seed=0, **launcher_options())


def launcher_options() -> dict:
    """Under torchrun, one vLLM engine per rank, data parallel (vLLM's external-launcher mode): each rank's
    engine takes the prompts `generate` deals to that rank."""
    if dist.world() == 1:
        return {}
    return {"distributed_executor_backend": "external_launcher", "data_parallel_size": dist.world(),
            "tensor_parallel_size": 1}


def context_length(llm) -> int:
    return llm.llm_engine.model_config.max_model_len


def _finish(output) -> str:
    if output.finish_reason == "length":
        return "length"
    return "stop" if isinstance(output.stop_reason, str) else "eos"  # None / a token id: an EOS-like token


def rows(llm, ids: list[list[int]], pending: set[int], cfg, *,
         logprobs: bool = False) -> Iterator[tuple[int, list[tuple[list[int], str, list[float] | None]]]]:
    """Yield (prompt index, its n rows (token ids, finish reason, token log-probs)), a chunk at a time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    todo = sorted(pending)
    for start in range(0, len(todo), VLLM_CHUNK):
        chunk = todo[start : start + VLLM_CHUNK]
        params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_k=cfg.top_k or -1, top_p=cfg.top_p,
                                 max_tokens=cfg.max_new_tokens, stop=list(cfg.stop) or None,
                                 seed=mix32((cfg.seed & 0xFFFFFFFF) ^ mix32(i)),
                                 logprobs=0 if logprobs else None) for i in chunk]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in chunk], params, use_tqdm=False)
        for i, result in zip(chunk, outputs):
            group = []
            for o in sorted(result.outputs, key=lambda o: o.index):
                token_ids = list(o.token_ids)
                lps = None
                if logprobs and o.logprobs is not None:
                    lps = [float(step[t].logprob) for step, t in zip(o.logprobs, token_ids)]
                group.append((token_ids, _finish(o), lps))
            yield i, group
