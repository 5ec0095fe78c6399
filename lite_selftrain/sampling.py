"""The E-step sampler: n completions per prompt from a causal LM, fast, reproducible and resumable.

    from lite_selftrain.sampling import generate
    groups = generate(model, tokenizer, prompts, n=8, temperature=0.7, top_k=40, max_new_tokens=64,
                      stop=["\\n\\n"], seed=0, out=store.path("samples.jsonl"), progress=True)
    groups[i][j].text        # sample j of prompt i

How the native engine works:
- prompts are tokenised exactly as given, with the tokenizer's own special tokens (chat templates are the
  caller's job), sorted by length, cut into batches of `batch_size` prompts and left-padded;
- each batch is prefilled ONCE and its KV cache repeated n times along the batch (B = prompts × n rows):
  Hugging Face `generate(num_return_sequences=n)` recomputes every prompt n times;
- the decode loop appends into a preallocated cache (no per-step concatenation), reuses one key mask and
  per-row positions, and computes the lm_head on the last position only; a row ends on EOS, a stop string,
  `max_new_tokens` or the end of the model's context ("length"), and finished rows leave the batch (cache
  index-select) once they are a quarter of it;
- randomness is counter-based: the uniform behind token s of sample j of prompt i is a hash of
  (seed, i, j, s), turned into a token by inverse-CDF sampling. A prompt's samples depend on (seed, its
  index) only: not on its batch-mates, up to float rounding in the model.

Conventions the trainer relies on:
- `text` is the completion decoded with special tokens skipped, without the EOS token and cut right BEFORE
  the first stop string; `token_ids` are the generated ids up to and including the EOS or the token that
  completed the stop string (all `max_new_tokens` of them for "length"). A finished row trains as
  prompt + text + EOS.
- `logprob` (with `logprobs=True`) is the model's own log M(y|x) = Σ over `token_ids` of log_softmax of the
  raw logits (temperature 1, no top-k/top-p), as `logprobs.sequence_logprobs` computes it; `token_logprobs`
  lists the terms. It does not depend on the sampling knobs, greedy included.

Kill safety (`out`): records {"prompt_index", "sample_index", **completion} are appended in whole
prompts, one write and fsync per `batch_size` finished prompts or per second, whichever comes first. On
restart a torn last line is cut off, a prompt with fewer than n records is dropped (the file is rewritten
atomically) and sampled again, finished prompts are not. Batches are a fixed function of the whole prompt
list, and a partly written batch is re-run whole, so a resumed job returns exactly what an uninterrupted
one would.

Simplifications: a prompt's n samples always share one batch (a decode batch holds up to batch_size × n
rows); stop strings are matched in the generated text only, never across the prompt; no repetition
penalty, beam search or speculative decoding. `backend="vllm"` (sampling_vllm.py) hands the same call to
vLLM when it and a GPU are present.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .errors import UserError
from .logprobs import split_body_head
from .store import JsonlLog, write_jsonl

FINISH_CODES = ("length", "eos", "stop")  # index = the per-row code the decode loop stores


@dataclass
class Completion:
    text: str  # decoded, without EOS, cut before the stop string
    token_ids: list[int]  # generated ids, up to and including EOS / the token that completed the stop string
    num_tokens: int  # len(token_ids)
    finish_reason: str  # "eos", "stop" or "length"
    logprob: float | None = None  # log M(y|x) summed over token_ids, when asked for
    token_logprobs: list[float] | None = None  # the per-token terms of `logprob`

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no deep copies

    @classmethod
    def from_dict(cls, record: dict) -> Completion:
        """A completion from a record; extra keys (prompt_index, sample_index, ...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


@dataclass
class SamplingConfig:
    """The sampling knobs, as recipes nest them; `generate(model, tok, prompts, **asdict(cfg))`."""

    n: int = 8  # samples per prompt: enough spread to select from, cheap since the prompt is shared
    temperature: float = 0.7  # ReST-EM and Self-Rewarding both sample at 0.7; 0 means greedy
    top_k: int = 0  # 0 = off; ReST-EM's recipe sets 40
    top_p: float = 1.0  # 1 = off; Self-Rewarding's recipe sets 0.9
    max_new_tokens: int = 128  # derive it from the task: a cut-off answer scores 0
    stop: tuple[str, ...] = ()  # strings that end a completion (not included in its text)
    seed: int = 0  # with the prompt index, fixes every sample
    batch_size: int = 16  # prompts prefilled together; the decode batch holds batch_size × n rows

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        checks = [
            (self.n >= 1, f"n must be at least 1, not {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), not {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), not {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], not {self.top_p}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, not {self.max_new_tokens}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, not {self.batch_size}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty: {self.stop}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# ----------------------------------------------------------------------------------------------------
# counter-based randomness and the token draw

_M32 = 0xFFFFFFFF


def _mix32(x):
    """lowbias32 (C. Wellons), a 32-bit integer hash, on Python ints or int64 tensors without overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B + ((x & 1) << 31)) & _M32  # × 0x846CA68B mod 2^32, every product below 2^63
    return x ^ (x >> 16)


def uniforms(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,), (B,) int64 → (B, steps) float32 in (0, 1): a fixed function of (seed, prompt, sample, step)."""
    lanes = []
    for salt in (0x243F6A88, 0x85A308D3):  # two 32-bit lanes: a 64-bit stream key per row
        h = _mix32(_mix32(_mix32(salt ^ (seed & _M32)) ^ ((seed >> 32) & _M32)))
        h = _mix32(_mix32(h ^ (prompt_index & _M32)) ^ (sample_index & _M32))  # (B,)
        lanes.append(h)
    step = _mix32(torch.arange(steps, device=prompt_index.device) + 0x13198A2E)  # (S,)
    bits = _mix32(_mix32(lanes[0][:, None] ^ step[None, :]) ^ lanes[1][:, None])  # (B, S)
    return ((bits >> 9).float() + 0.5) * 2.0**-23  # 23 bits: exact in float32, never 0 or 1


def draw(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) fp32 logits, (B,) uniforms → (B,) token ids; argmax when temperature is 0.

    Inverse-CDF sampling of softmax(logits / temperature) restricted to the top_k tokens, then to the
    smallest most-likely prefix whose mass reaches top_p: one uniform per row instead of V Gumbel draws.
    """
    if temperature == 0:
        return logits.argmax(-1)
    z, idx = logits, None  # (B, V)
    if top_k and top_k < z.shape[-1]:
        z, idx = z.topk(top_k, dim=-1)  # (B, K), sorted descending; the order is temperature-free
    elif top_p < 1:
        z, idx = z.sort(dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(z / temperature, dim=-1)  # (B, K)
    if top_p < 1:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # keeps at least the top token
    cdf = probs.cumsum(-1)  # (B, K)
    target = (u * cdf[:, -1]).unsqueeze(-1)  # (B, 1), in (0, total]
    pick = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1)  # first cdf >= target: p > 0
    return pick.squeeze(-1) if idx is None else idx.gather(-1, pick).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# the KV cache and stop strings


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer with room for `capacity` positions: appending writes in place instead of torch.cat."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        b, h, _, _ = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_buf = key_states.new_zeros(b, h, self.capacity, key_states.shape[-1])  # (B, heads, cap, d)
        self.v_buf = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        self.k_buf[:, :, start : self.length] = key_states
        self.v_buf[:, :, start : self.length] = value_states
        self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def _reindex(self, rows: torch.Tensor):
        self.k_buf, self.v_buf = self.k_buf.index_select(0, rows), self.v_buf.index_select(0, rows)
        self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int):
        self._reindex(torch.arange(self.k_buf.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        self._reindex(indices)

    def reorder_cache(self, beam_idx: torch.Tensor):
        self._reindex(beam_idx)


def _new_cache(config, capacity: int) -> Cache:
    """Preallocated layers for plain full-attention models; the library's DynamicCache otherwise."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types == {"full_attention"} and not getattr(config, "sliding_window", None):
        return Cache(layers=[_GrowingLayer(capacity) for _ in range(config.num_hidden_layers)])
    return DynamicCache(config=config)


class _StopStrings:
    """Finds rows whose newest token completed a stop string; decodes only rows where that is possible.

    A token can complete a stop string only if its text holds the string's last character (or part of it,
    for a multi-byte character): a (V,) table of such tokens, built once, keeps other rows out of the check.
    """

    def __init__(self, tokenizer, stops: Sequence[str], vocab_size: int, device):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.window = 4 * max(map(len, self.stops)) + 8  # tokens enough to hold any stop string, bytes or not
        anchor = tokenizer.encode("a", add_special_tokens=False)[:1]  # decode after a letter: keeps leading spaces
        head = tokenizer.decode(anchor)
        known = min(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([anchor + [i] for i in range(known)], skip_special_tokens=True)
        ends = {s[-1] for s in self.stops}
        partial = any(ord(c) > 127 for c in ends)  # only a multi-byte last character can end in a byte token
        flags = [not t.startswith(head) or (partial and "\ufffd" in t) or any(c in t[len(head) :] for c in ends)
                 for t in texts]
        self.can_end = torch.ones(vocab_size, dtype=torch.bool)
        self.can_end[:known] = torch.tensor(flags, dtype=torch.bool)
        self.can_end = self.can_end.to(device)

    def completed(self, tokens: torch.Tensor, newest: torch.Tensor, live: torch.Tensor, step: int) -> list[int]:
        """Rows (of the current batch) whose text now contains a stop string. tokens: (B, S), newest: (B,)."""
        rows = (self.can_end[newest] & live).nonzero().flatten().tolist()
        start = max(0, step + 1 - self.window)
        hits = []
        for r in rows:
            tail = self.tokenizer.decode(tokens[r, start : step + 1].tolist(), skip_special_tokens=True)
            if any(s in tail for s in self.stops):
                hits.append(r)
        return hits

    def cut(self, text: str) -> str:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(found)] if found else text


def _eos_table(model, tokenizer, vocab_size: int, device) -> torch.Tensor:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[[i for i in ids if i is not None and 0 <= i < vocab_size]] = True
    return table.to(device)


# ----------------------------------------------------------------------------------------------------
# the decode loop: one batch of prompts, n rows each


def _decode_batch(body, head, prompt_ids: list[list[int]], prompt_index: list[int], cfg: SamplingConfig, *,
                  eos: torch.Tensor, stops: _StopStrings | None, logprobs: bool, pad_id: int, context: int):
    """Yield (position in batch, n rows of (token ids, finish code, token log-probs)) as prompts finish."""
    device, n = head.weight.device, cfg.n
    P, T = len(prompt_ids), max(map(len, prompt_ids))
    caps = [min(cfg.max_new_tokens, context - len(seq)) for seq in prompt_ids]  # prompt + completion fit
    S = max(caps)  # steps this batch can take
    ids = torch.full((P, T), pad_id, dtype=torch.long)
    mask = torch.zeros((P, T), dtype=torch.bool)
    for r, seq in enumerate(prompt_ids):  # left padding: every prompt ends at column T-1
        ids[r, T - len(seq) :] = torch.tensor(seq)
        mask[r, T - len(seq) :] = True
    ids, mask = ids.to(device), mask.to(device)  # (P, T)
    padded = not bool(mask.all())  # without padding the model needs no mask at all (fastest attention)
    cache = _new_cache(body.config, T + S)
    hidden = body(input_ids=ids, attention_mask=mask.long() if padded else None,
                  position_ids=(mask.long().cumsum(-1) - 1).clamp_(min=0), past_key_values=cache,
                  use_cache=True).last_hidden_state  # (P, T, H)
    logits = head(hidden[:, -1]).float().repeat_interleave(n, 0)  # (B, V), B = P × n
    cache.batch_repeat_interleave(n)  # the prompt, computed once, now serves its n rows
    B = P * n
    keymask = torch.ones(B, 1, 1, T + S, dtype=torch.bool, device=device)  # (B, 1, 1, T+S), sliced per step
    keymask[:, 0, 0, :T] = mask.repeat_interleave(n, 0)
    pos = mask.sum(-1).repeat_interleave(n)  # (B,) position of each row's first new token
    cap = torch.tensor(caps, device=device).repeat_interleave(n)  # (B,) tokens each row may generate
    sample = torch.arange(n, device=device).repeat(P)  # (B,)
    u = uniforms(cfg.seed, torch.tensor(prompt_index, device=device).repeat_interleave(n), sample, S)  # (B, S)
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)  # (B, S) drawn tokens
    lps = torch.zeros(B, S, device=device) if logprobs else None  # (B, S) raw-model token log-probs
    live = torch.ones(B, dtype=torch.bool, device=device)  # rows still generating
    rows, alive = list(range(B)), B  # original row of each current row; rows still generating
    left, done = [n] * P, {}  # rows still running per prompt; finished rows by original row
    for s in range(S):
        tok = draw(logits, u[:, s], cfg.temperature, cfg.top_k, cfg.top_p)  # (B,)
        tokens[:, s] = tok
        if lps is not None:
            lps[:, s] = logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
        eos_now = eos[tok] & live  # (B,)
        full = (cap == s + 1) & live  # (B,) rows at their length limit
        ended = {}
        if bool((eos_now | full).any()):  # codes by priority: eos over stop over length
            ended = dict.fromkeys(full.nonzero().flatten().tolist(), 0)
            ended.update(dict.fromkeys(eos_now.nonzero().flatten().tolist(), 1))
        if stops is not None:
            ended.update(dict.fromkeys(stops.completed(tokens, tok, live & ~eos_now, s), 2))
        for r, code in ended.items():
            done[rows[r]] = (tokens[r, : s + 1].tolist(), code, None if lps is None else lps[r, : s + 1].tolist())
            p = rows[r] // n
            left[p] -= 1
            if left[p] == 0:
                yield p, [done.pop(p * n + j) for j in range(n)]
        alive -= len(ended)
        if s == S - 1 or alive == 0:
            return
        if ended:
            live[list(ended)] = False
            if 4 * (len(rows) - alive) >= len(rows):  # prune once a quarter is dead: a copy, not every step
                keep = live.nonzero().flatten()
                cache.batch_select_indices(keep)
                tokens, u, keymask, pos, cap, tok, live = (x[keep] for x in (tokens, u, keymask, pos, cap, tok, live))
                lps = None if lps is None else lps[keep]
                rows = [rows[k] for k in keep.tolist()]
        hidden = body(input_ids=tok[:, None], attention_mask=keymask[..., : T + s + 1] if padded else None,
                      position_ids=(pos + s)[:, None], past_key_values=cache,
                      use_cache=True).last_hidden_state  # (B, 1, H)
        logits = head(hidden[:, -1]).float()  # (B, V)


# ----------------------------------------------------------------------------------------------------
# prompts in, completions out


def tokenize_prompts(tokenizer, prompts: Sequence[str], cfg: SamplingConfig, context: int | None,
                     truncate: bool) -> list[list[int]]:
    """Token ids of each prompt as the tokenizer makes them.

    Without `truncate`, a prompt must leave the context room for at least one new token (its completions
    stop, "length", where the context ends). With `truncate`, prompts are cut from the left (a leading BOS
    is kept) so that prompt + max_new_tokens fit.
    """
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    room = None if context is None else context - cfg.max_new_tokens if truncate else context - 1
    for i, seq in enumerate(ids):
        if not seq:
            raise UserError(f"prompt {i} is empty (no tokens)")
        if room is None or len(seq) <= room:
            continue
        if not truncate:
            raise UserError(f"prompt {i} has {len(seq)} tokens, the model's context {context}: no room to "
                            "generate (shorten it, or pass truncate=True to cut it from the left)")
        if room < 2:
            raise UserError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for prompt {i} in the "
                            f"model's context of {context} tokens")
        bos = seq[:1] if seq[0] == tokenizer.bos_token_id else []
        ids[i] = bos + seq[len(seq) - room + len(bos) :]
    return ids


def _completion(tokenizer, stops: _StopStrings | None, token_ids: list[int], code: int,
                lps: list[float] | None) -> Completion:
    reason = FINISH_CODES[code]
    text = tokenizer.decode(token_ids[:-1] if reason == "eos" else token_ids, skip_special_tokens=True)
    if reason == "stop":
        text = stops.cut(text)
    return Completion(text, token_ids, len(token_ids), reason, None if lps is None else float(sum(lps)), lps)


def _native_stream(model, tokenizer, prompts, pending: set[int], cfg: SamplingConfig, *, logprobs: bool,
                   truncate: bool) -> Iterator[tuple[int, list[Completion]]]:
    """Yield (prompt index, its n completions) for the pending prompts, in the order they finish."""
    body, head = split_body_head(model)
    context = getattr(body.config, "max_position_embeddings", None)
    ids = tokenize_prompts(tokenizer, prompts, cfg, context, truncate)
    vocab, device = head.weight.shape[0], head.weight.device
    eos = _eos_table(model, tokenizer, vocab, device)
    stops = _StopStrings(tokenizer, cfg.stop, vocab, device) if cfg.stop else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))  # similar lengths share a batch
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(order), cfg.batch_size):
                batch = order[b : b + cfg.batch_size]  # fixed by the whole prompt list: resumes re-run it whole
                if pending.isdisjoint(batch):
                    continue
                for p, rows in _decode_batch(body, head, [ids[i] for i in batch], batch, cfg, eos=eos,
                                             stops=stops, logprobs=logprobs, pad_id=pad_id,
                                             context=context or 2**62):
                    if batch[p] in pending:
                        yield batch[p], [_completion(tokenizer, stops, *row) for row in rows]
    finally:
        model.train(was_training)


def _resume(log: JsonlLog, num_prompts: int, n: int) -> dict[int, list[Completion]]:
    """Completed prompts already in `log`; a torn line, partial prompts and duplicates are removed."""
    records = log.recover()  # cuts a torn last line
    by_prompt: dict[int, dict[int, dict]] = {}
    for r in records:
        i, j = r.get("prompt_index"), r.get("sample_index")
        if not (isinstance(i, int) and isinstance(j, int) and 0 <= i < num_prompts and 0 <= j < n):
            raise UserError(f"{log.path}: a record for prompt {i}, sample {j} does not fit this job "
                            f"({num_prompts} prompts, n={n}); was the file written by another sampling job?")
        by_prompt.setdefault(i, {}).setdefault(j, r)  # a duplicate keeps its first copy
    complete = {i: got for i, got in by_prompt.items() if len(got) == n}
    if len(complete) * n != len(records):  # partial prompts or duplicates: keep complete prompts only
        write_jsonl(log.path, [complete[i][j] for i in sorted(complete) for j in range(n)])
    return {i: [Completion.from_dict(got[j]) for j in range(n)] for i, got in complete.items()}


def _consume(stream, done: dict, log: JsonlLog | None, total: int, progress: bool, flush_prompts: int,
             flush_s: float = 1.0):
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
                buffer += [{"prompt_index": i, "sample_index": j, **c.to_dict()} for j, c in enumerate(completions)]
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


def generate(model, tokenizer, prompts: Sequence[str], *, n: int = 1, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, max_new_tokens: int = 128, stop: str | Sequence[str] = (), seed: int = 0,
             batch_size: int = 16, logprobs: bool = False, truncate: bool = False,
             out: str | Path | JsonlLog | None = None, progress: bool = False,
             backend: str = "native") -> list[list[Completion]]:
    """n completions of each prompt: a list with one entry per prompt, each the list of its n completions.

    temperature 0 is greedy; top_k 0 and top_p 1 are off. A prompt that fills the model's context is an
    error, or with `truncate` is cut from the left to leave room for max_new_tokens. `out` (a path or
    JsonlLog) receives the records as prompts finish; prompts it already holds completely are not sampled
    again and come back from it.
    backend: "native" (this engine) or "vllm" (needs vllm and a GPU; see sampling_vllm.py).
    """
    cfg = SamplingConfig(n=n, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                         stop=stop, seed=seed, batch_size=batch_size)
    if backend not in ("native", "vllm"):
        raise UserError(f"backend must be native or vllm, not {backend!r}")
    prompts = list(prompts)
    if not prompts:
        return []
    log = out if isinstance(out, JsonlLog) or out is None else JsonlLog(out)
    done = _resume(log, len(prompts), cfg.n) if log is not None else {}
    pending = set(range(len(prompts))) - set(done)
    if pending:
        if backend == "vllm":
            from .sampling_vllm import vllm_stream

            stream = vllm_stream(model, tokenizer, prompts, pending, cfg, logprobs=logprobs, truncate=truncate)
        else:
            stream = _native_stream(model, tokenizer, prompts, pending, cfg, logprobs=logprobs, truncate=truncate)
        _consume(stream, done, log, len(pending) * cfg.n, progress, flush_prompts=cfg.batch_size)
    return [done[i] for i in range(len(prompts))]
