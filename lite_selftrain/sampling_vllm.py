"""The vLLM backend of `sampling.generate`: the same call, run by vLLM's engine on a GPU.

    generate(llm, tokenizer, prompts, n=8, temperature=0.7, backend="vllm")   # llm: a vllm.LLM (reuse it)
    generate("path/to/model", tokenizer, prompts, ..., backend="vllm")         # or a model folder

For users who outgrow the native loop (tensor parallelism, paged attention, continuous batching). The
caller's side is unchanged: the prompts are tokenised and checked (or truncated) by the same code, results
stream into the same resumable file with the same record format, and the conventions match the native
engine: `text` without EOS and cut before the stop string, `token_ids` as vLLM returns them, `logprob` the
raw model log-prob (vLLM's default "raw_logprobs" mode) summed over the tokens.

Simplifications: a peft model must be merged and saved to a folder first (vLLM loads weights itself);
each prompt gets its own seed, derived from (seed, prompt index), so its samples do not depend on its
batch-mates; prompts go to vLLM in chunks of `vllm_chunk` so finished chunks reach the file while the
rest runs.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator

import torch

from .errors import UserError
from .sampling import Completion, SamplingConfig, _mix32, tokenize_prompts

VLLM_CHUNK = 1024  # prompts per vLLM call: large enough to keep its scheduler full


def available() -> bool:
    """True when vllm is installed and a CUDA device is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _engine(model, tokenizer, keep: list):
    """A vllm.LLM for `model`: the object itself, a folder, or a plain model saved to a temporary folder."""
    from vllm import LLM

    if isinstance(model, LLM):
        return model
    if hasattr(model, "peft_config"):
        raise UserError("backend 'vllm' cannot take a peft model: merge it (merge_and_unload) and save it first")
    if not isinstance(model, str):
        folder = tempfile.TemporaryDirectory(prefix="lite_selftrain_vllm_")
        keep.append(folder)  # removed when the stream ends
        model.save_pretrained(folder.name)
        tokenizer.save_pretrained(folder.name)
        model = folder.name
    return LLM(model=str(model), tokenizer=str(model), seed=0)


def _finish(output) -> str:
    if output.finish_reason == "length":
        return "length"
    return "stop" if isinstance(output.stop_reason, str) else "eos"  # None / a token id: an EOS-like token


def vllm_stream(model, tokenizer, prompts, pending: set[int], cfg: SamplingConfig, *, logprobs: bool,
                truncate: bool) -> Iterator[tuple[int, list[Completion]]]:
    """Yield (prompt index, its n completions) for the pending prompts, a chunk at a time."""
    if not available():
        raise UserError("backend 'vllm' needs the vllm package and a CUDA GPU (pip install 'lite-selftrain[vllm]')")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    keep: list = []
    llm = _engine(model, tokenizer, keep)
    context = llm.llm_engine.model_config.max_model_len
    ids = tokenize_prompts(tokenizer, prompts, cfg, context, truncate)
    todo = sorted(pending)
    try:
        for start in range(0, len(todo), VLLM_CHUNK):
            chunk = todo[start : start + VLLM_CHUNK]
            params = [SamplingParams(n=cfg.n, temperature=cfg.temperature, top_k=cfg.top_k or -1, top_p=cfg.top_p,
                                     max_tokens=cfg.max_new_tokens, stop=list(cfg.stop) or None,
                                     seed=_mix32((cfg.seed & 0xFFFFFFFF) ^ _mix32(i)),
                                     logprobs=0 if logprobs else None) for i in chunk]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in chunk], params, use_tqdm=False)
            for i, result in zip(chunk, outputs):
                group = []
                for o in sorted(result.outputs, key=lambda o: o.index):
                    token_ids = list(o.token_ids)
                    lps = None
                    if logprobs and o.logprobs is not None:
                        lps = [float(step[t].logprob) for step, t in zip(o.logprobs, token_ids)]
                    group.append(Completion(o.text, token_ids, len(token_ids), _finish(o),
                                            None if lps is None else sum(lps), lps))
                yield i, group
    finally:
        for folder in keep:
            folder.cleanup()
