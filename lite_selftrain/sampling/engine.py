"""The native sampling engine: its own KV cache, `prefill` and `decode_step`, and the decode loop.

    for prompt_index, rows in engine.rows(model, tokenizer, ids, pending, cfg):   # cfg: a SamplingConfig
        token_ids, finish_reason, token_logprobs = rows[j]                            # sample j of the prompt

`sampling.generate` is the front door (tokenising, resuming, writing); this file only turns token ids into
token ids: one prefill per prompt shared by its n rows, then one token per row per step, drawn with
counter-based randomness so that a prompt's samples depend on (seed, its index) only. How it works and
what it simplifies (full-attention decoders only; no beam search): docs/engine.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models import sampling_policy, split_body_head, training_mode
from .stops import StopStrings, eos_table

SERVED_ATTENTION = ("eager", "sdpa")  # both take an additive 4-D float mask
FINISH = ("length", "eos", "stop")  # index = the per-row code the decode loop keeps

# ----------------------------------------------------------------------------------------------------
# counter-based randomness and the token draw

_M32 = 0xFFFFFFFF


def mix32(x):
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
        h = mix32(mix32(mix32(salt ^ (seed & _M32)) ^ ((seed >> 32) & _M32)))
        h = mix32(mix32(h ^ (prompt_index & _M32)) ^ (sample_index & _M32))  # (B,)
        lanes.append(h)
    step = mix32(torch.arange(steps, device=prompt_index.device) + 0x13198A2E)  # (S,)
    bits = mix32(mix32(lanes[0][:, None] ^ step[None, :]) ^ lanes[1][:, None])  # (B, S)
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
# the KV cache, the masks, prefill and decode_step


class KVCache:
    """Every layer's keys and values in preallocated (rows, heads, capacity, d) buffers, filled left to right.

    `length` positions are filled, the same for every row (left padding). The first `update` of a layer is
    the prefill: its (P, heads, T, d) keys go into each prompt's `repeats` rows, and attention runs on the
    P prompt rows themselves.
    """

    def __init__(self, rows: int, capacity: int, repeats: int):
        self.rows, self.capacity, self.repeats = rows, capacity, repeats
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new positions of one layer; return its keys and values so far. key: (rows, heads, q, d)."""
        end = self.length + key.shape[-2]
        if self.length == 0:  # prefill: columns never written are never returned, so no zeroing
            P, heads, T, d = key.shape
            k = key.new_empty(self.rows, heads, self.capacity, d)  # (P × n, heads, cap, d)
            v = value.new_empty(self.rows, heads, self.capacity, value.shape[-1])
            k.view(P, self.repeats, heads, self.capacity, d)[:, :, :, :T] = key[:, None]  # one copy per row
            v.view(P, self.repeats, heads, self.capacity, -1)[:, :, :, :T] = value[:, None]
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return key, value
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[:, :, self.length : end] = key
        v[:, :, self.length : end] = value
        return k[:, :, :end], v[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a copy of every buffer): finished rows leave the batch."""
        for i in self.keys:
            self.keys[i], self.values[i] = self.keys[i][rows], self.values[i][rows]
        self.rows = len(rows)


def prefill_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, T) bool, True on prompt tokens → (P, 1, T, T) additive mask: causal, padding dropped.

    A padding query still sees itself, so no row of the softmax is empty (its output is never used).
    """
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()  # (T, T)
    keep = causal & (valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=valid.device))  # (P, T, T)
    mask = torch.zeros(keep.shape, dtype=dtype, device=valid.device).masked_fill_(~keep, torch.finfo(dtype).min)
    return mask[:, None]  # (P, 1, T, T)


def _cache_keyword(body) -> str:
    """The name under which this transformers version takes a cache ("cache" since 5.x, else the older name)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def prefill(body, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache, keyword: str) -> torch.Tensor:
    """(P, T) left-padded prompt ids → (P, H) hidden state at each prompt's last position."""
    dtype = body.get_input_embeddings().weight.dtype
    positions = (valid.long().cumsum(-1) - 1).clamp_(min=0)  # (P, T): padding does not count
    hidden = body(input_ids=ids, attention_mask=prefill_mask(valid, dtype), position_ids=positions,
                  use_cache=True, **{keyword: cache}).last_hidden_state  # (P, T, H)
    cache.length += ids.shape[1]
    return hidden[:, -1]


def decode_step(body, tokens: torch.Tensor, positions: torch.Tensor, keymask: torch.Tensor, cache: KVCache,
                keyword: str) -> torch.Tensor:
    """(B,) tokens at (B,) positions → (B, H) hidden states; keymask: (B, 1, 1, length + 1) additive."""
    hidden = body(input_ids=tokens[:, None], attention_mask=keymask, position_ids=positions[:, None],
                  use_cache=True, **{keyword: cache}).last_hidden_state  # (B, 1, H)
    cache.length += 1
    return hidden[:, -1]


def check_served(config) -> None:
    """A one-line error for models this engine cannot serve exactly."""
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in SERVED_ATTENTION:
        raise UserError(f"the sampling engine runs attention {' or '.join(SERVED_ATTENTION)}, not '{attention}': "
                        "load the model with attn_implementation='sdpa' (or sample with backend='vllm')")
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(config, "sliding_window", None):
        raise UserError(f"the sampling engine serves full-attention models, not layers {sorted(types)} / "
                        "sliding windows: sample this model with backend='vllm'")


# ----------------------------------------------------------------------------------------------------
# the decode loop: one batch of prompts, n rows each


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P, T = len(prompt_ids), max(map(len, prompt_ids))
    ids = torch.full((P, T), pad_id, dtype=torch.long)
    valid = torch.zeros((P, T), dtype=torch.bool)
    for r, seq in enumerate(prompt_ids):  # every prompt ends at column T-1
        ids[r, T - len(seq) :] = torch.tensor(seq)
        valid[r, T - len(seq) :] = True
    return ids.to(device), valid.to(device)  # (P, T), (P, T)


@dataclass
class _Rows:
    """The decode loop's per-row state, in the batch's current row order (dim 0 of every tensor)."""

    origin: list[int]  # each row's place in the whole batch: prompt × n + sample
    live: list[bool]  # rows still generating, as the host last saw them
    tokens: torch.Tensor  # (B, S) drawn tokens
    u: torch.Tensor  # (B, S) the uniforms they are drawn with
    keymask: torch.Tensor  # (B, 1, 1, T+S) additive, sliced per step
    pos: torch.Tensor  # (B,) position of each row's first new token
    cap: torch.Tensor  # (B,) tokens each row may generate
    end: torch.Tensor  # (B,) step of a row's EOS / limit; S: none yet
    code: torch.Tensor  # (B,) index into FINISH: 1 = EOS, 0 = length (2 = stop, found on the host)
    lps: torch.Tensor | None  # (B, S) raw-model token log-probs, when asked for
    maybe_stop: torch.Tensor | None  # (B, S) steps whose token may complete a stop string, when there are any
    last: torch.Tensor | None = None  # (B,) the token of the latest step

    @classmethod
    def start(cls, valid: torch.Tensor, caps: list[int], prompt_index: list[int], cfg, dtype, *, logprobs: bool,
              stops: bool) -> _Rows:
        """n rows per prompt of a (P, T) left-padded batch; caps: the tokens each prompt's rows may take."""
        (P, T), n, S, device = valid.shape, cfg.n, max(caps), valid.device
        B = P * n
        keymask = torch.zeros(B, 1, 1, T + S, dtype=dtype, device=device)
        keymask[:, 0, 0, :T].masked_fill_(~valid.repeat_interleave(n, 0), torch.finfo(dtype).min)
        sample = torch.arange(n, device=device).repeat(P)  # (B,)
        return cls(origin=list(range(B)), live=[True] * B,
                   tokens=torch.zeros(B, S, dtype=torch.long, device=device),
                   u=uniforms(cfg.seed, torch.tensor(prompt_index, device=device).repeat_interleave(n), sample, S),
                   keymask=keymask, pos=valid.sum(-1).repeat_interleave(n),
                   cap=torch.tensor(caps, device=device).repeat_interleave(n),
                   end=torch.full((B,), S, dtype=torch.long, device=device),
                   code=torch.zeros(B, dtype=torch.long, device=device),
                   lps=torch.zeros(B, S, device=device) if logprobs else None,
                   maybe_stop=torch.zeros(B, S, dtype=torch.bool, device=device) if stops else None)

    def record(self, s: int, tok: torch.Tensor, logits: torch.Tensor, eos: torch.Tensor, stops) -> None:
        """Step s drew (B,) `tok` from (B, V) `logits`: keep it, and mark rows it ends (EOS outranks length)."""
        self.tokens[:, s] = tok
        self.last = tok
        if self.lps is not None:
            self.lps[:, s] = logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
        is_eos = eos[tok]  # (B,)
        new = (self.end == self.tokens.shape[1]) & (is_eos | (self.cap == s + 1))  # rows ending at this step
        self.code = torch.where(new, is_eos.long(), self.code)
        self.end = torch.where(new, s, self.end)
        if self.maybe_stop is not None:
            self.maybe_stop[:, s] = stops.can_end[tok]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices of current rows, all live): finished rows leave the batch."""
        for name in ("tokens", "u", "keymask", "pos", "cap", "end", "code", "lps", "maybe_stop", "last"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x[rows])
        self.origin = [self.origin[r] for r in rows.tolist()]
        self.live = [True] * len(self.origin)


def _find_stops(rows: _Rows, stops: StopStrings, looked: int, s: int, ends: list[int], codes: list[int]) -> None:
    """End each live row at the first stop string its steps looked..s complete, if that comes before its EOS or
    length limit (EOS at the same step outranks it). `ends` and `codes` are the host's copies, set in place."""
    hits = rows.maybe_stop[:, looked : s + 1].nonzero().tolist()  # (row, step - looked), row-major
    if not hits:
        return
    candidates = sorted({r for r, _ in hits})
    text_of = dict(zip(candidates, rows.tokens[candidates, : s + 1].tolist()))
    resolved = set()
    for r, k in hits:
        step = looked + k
        if r in resolved or not rows.live[r] or step > ends[r] or (step == ends[r] and codes[r] == 1):
            continue
        if stops.completed_at(text_of[r], step):
            ends[r], codes[r] = step, 2
            resolved.add(r)


def _finish(rows: _Rows, finished: list[int], ends: list[int], codes: list[int], n: int, left: list[int],
            done: dict) -> list[tuple[int, list]]:
    """Take the finished rows out of play into `done`; return each prompt whose n rows are now all done."""
    out = rows.tokens[finished].tolist()
    out_lps = rows.lps[finished].tolist() if rows.lps is not None else [None] * len(finished)
    ready = []
    for r, row_tokens, row_lps in zip(finished, out, out_lps):
        e = ends[r] + 1
        done[rows.origin[r]] = (row_tokens[:e], codes[r], None if row_lps is None else row_lps[:e])
        rows.live[r] = False
        p = rows.origin[r] // n
        left[p] -= 1
        if left[p] == 0:
            ready.append((p, [done.pop(p * n + j) for j in range(n)]))
    return ready


def _decode_batch(body, head, prompt_ids: list[list[int]], prompt_index: list[int], cfg, *, eos: torch.Tensor,
                  stops: StopStrings | None, logprobs: bool, pad_id: int, context: int, keyword: str):
    """Yield (position in batch, n rows of (token ids, finish code, token log-probs)) as prompts finish."""
    device, n = head.weight.device, cfg.n
    ids, valid = _left_pad(prompt_ids, pad_id, device)  # (P, T)
    P, T = ids.shape
    caps = [min(cfg.max_new_tokens, context - len(seq)) for seq in prompt_ids]  # prompt + completion fit
    S = max(caps)  # steps this batch can take
    cache = KVCache(P * n, T + S, repeats=n)
    logits = head(prefill(body, ids, valid, cache, keyword)).float().repeat_interleave(n, 0)  # (B, V)
    rows = _Rows.start(valid, caps, prompt_index, cfg, body.get_input_embeddings().weight.dtype, logprobs=logprobs,
                       stops=stops is not None)
    left, done, looked = [n] * P, {}, 0  # rows running per prompt; finished rows; steps the host has seen
    for s in range(S):
        rows.record(s, draw(logits, rows.u[:, s], cfg.temperature, cfg.top_k, cfg.top_p), logits, eos, stops)
        if (s + 1) % cfg.check_every == 0 or s == S - 1:  # the host looks: one sync
            ends, codes = rows.end.tolist(), rows.code.tolist()
            if stops is not None:
                _find_stops(rows, stops, looked, s, ends, codes)
            finished = [r for r in range(len(rows.live)) if rows.live[r] and ends[r] <= s]
            if finished:
                yield from _finish(rows, finished, ends, codes, n, left, done)
            looked = s + 1
            alive = sum(rows.live)
            if alive == 0:
                return
            if 4 * (len(rows.live) - alive) >= len(rows.live):  # prune once a quarter is dead: a copy, not every step
                keep = torch.tensor([r for r in range(len(rows.live)) if rows.live[r]], device=device)
                cache.select(keep)
                rows.keep(keep)
        if s == S - 1:
            return
        positions = (rows.pos + s).clamp_(max=context - 1)  # a row past its end may run on; its tokens are dropped
        hidden = decode_step(body, rows.last, positions, rows.keymask[..., : T + s + 1], cache, keyword)  # (B, H)
        logits = head(hidden).float()  # (B, V)


# ----------------------------------------------------------------------------------------------------
# prompts in, rows out


def context_length(model) -> int | None:
    """The model's context (positions), None when its config does not say."""
    return getattr(split_body_head(model)[0].config, "max_position_embeddings", None)


def batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """The prompt indices of each batch `rows` runs: longest prompts first, so similar lengths share one."""
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def rows(model, tokenizer, ids: list[list[int]], pending: set[int], cfg, *,
         logprobs: bool = False) -> Iterator[tuple[int, list[tuple[list[int], str, list[float] | None]]]]:
    """Yield (prompt index, its n rows (token ids, finish reason, token log-probs)) for the pending prompts.

    `ids` are every prompt's token ids (already checked against the context); `cfg` is a
    `sampling.SamplingConfig` with `max_new_tokens` set. Batches are a fixed function of the whole prompt
    list, so a resumed job re-runs a partly written batch whole and gets what an uninterrupted one got.
    A LoRA / QLoRA `model` is decoded as a merged copy when `cfg.merge` and memory allow (`sampling_policy`).
    """
    policy = sampling_policy(model, cfg.merge)  # one merge per call: the training copy stays as it is
    body, head = split_body_head(policy)
    check_served(body.config)
    context = context_length(model) or 2**62
    vocab, device = head.weight.shape[0], head.weight.device
    eos = eos_table(model, tokenizer, vocab, device)
    stops = StopStrings(tokenizer, cfg.stop, vocab, device) if cfg.stop else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keyword = _cache_keyword(body)
    with training_mode(policy, False), torch.inference_mode():
        for batch in batches(ids, cfg.batch_size):
            if pending.isdisjoint(batch):
                continue
            for p, group in _decode_batch(body, head, [ids[i] for i in batch], batch, cfg, eos=eos, stops=stops,
                                          logprobs=logprobs, pad_id=pad_id, context=context, keyword=keyword):
                if batch[p] in pending:
                    yield batch[p], [(token_ids, FINISH[c], row_lps) for token_ids, c, row_lps in group]
