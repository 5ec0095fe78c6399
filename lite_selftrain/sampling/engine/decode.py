"""The decode loop: the engine's own KV cache, `prefill` and `decode_step`, and the stream of prompts through
`batch_size × n` row slots with continuous refill (`Decoder`). `stream.rows` is the entry point."""

from __future__ import annotations

import inspect
from collections import deque

import torch

from ...errors import UserError
from .draws import draw
from .state import Rows, find_stops, finish

SERVED_ATTENTION = ("eager", "sdpa")  # both take an additive 4-D float mask
FINISH = ("length", "eos", "stop")  # index = the per-row code the decode loop keeps

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

    @classmethod
    def joined(cls, old: KVCache | None, keep: torch.Tensor | None, lo: int, new: KVCache | None, width: int,
               capacity: int) -> KVCache:
        """A cache of `capacity` columns, `width` filled: rows `keep` of `old` (its columns lo..length), then
        every row of `new` (a prefilled cache), both moved to end at column `width`. The columns before a row's
        keys are zero (masked, but finite: 0 × -inf would be NaN)."""
        parts = [(c, idx, start) for c, idx, start in ((old, keep, lo), (new, None, 0)) if c is not None]
        cache = cls(sum(c.rows if idx is None else len(idx) for c, idx, _ in parts), capacity, repeats=1)
        cache.length = width
        for i in parts[0][0].keys:
            for src, dst in (("keys", cache.keys), ("values", cache.values)):
                pieces = [getattr(c, src)[i][:, :, start : c.length] if idx is None
                          else getattr(c, src)[i][idx, :, start : c.length] for c, idx, start in parts]
                heads, d = pieces[0].shape[1], pieces[0].shape[-1]
                buf = pieces[0].new_zeros(cache.rows, heads, capacity, d)  # (B, heads, capacity, d)
                row = 0
                for x in pieces:  # (b, heads, columns, d), right-aligned at `width`
                    buf[row : row + x.shape[0], :, width - x.shape[2] : width] = x
                    row += x.shape[0]
                dst[i] = buf
        return cache


def prefill_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, T) bool, True on prompt tokens → (P, 1, T, T) additive mask: causal, padding dropped.

    A padding query still sees itself, so no row of the softmax is empty (its output is never used).
    """
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()  # (T, T)
    keep = causal & (valid[:, None, :] | torch.eye(T, dtype=torch.bool, device=valid.device))  # (P, T, T)
    mask = torch.zeros(keep.shape, dtype=dtype, device=valid.device).masked_fill_(~keep, torch.finfo(dtype).min)
    return mask[:, None]  # (P, 1, T, T)


def cache_keyword(body) -> str:
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


def decode_step(body, tokens: torch.Tensor, positions: torch.Tensor, keymask: torch.Tensor, cache,
                keyword: str) -> torch.Tensor:
    """(B,) tokens at (B,) positions → (B, H) hidden states; keymask: (B, 1, 1, keys) additive. The cache
    (a `KVCache` or a `SlotCache`) stores the new keys; its bookkeeping is the caller's."""
    hidden = body(input_ids=tokens[:, None], attention_mask=keymask, position_ids=positions[:, None],
                  use_cache=True, **{keyword: cache}).last_hidden_state  # (B, 1, H)
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


class Decoder:
    """One stream of prompts through `batch_size × n` row slots: each prompt is prefilled once for its n rows;
    rows leave as they finish, and the next prompts join in their slots (continuous refill) once a quarter of
    the slots is free. A row's draws depend on (seed, prompt, sample, its own step) only, so refill changes
    no sample."""

    def __init__(self, body, head, prompt_ids: list[list[int]], prompt_index: list[int], cfg, *, eos, stops,
                 logprobs: bool, pad_id: int, context: int, keyword: str):
        self.body, self.head, self.cfg, self.eos, self.stops = body, head, cfg, eos, stops
        self.prompt_ids, self.prompt_index, self.logprobs = prompt_ids, prompt_index, logprobs
        self.pad_id, self.context, self.keyword = pad_id, context, keyword
        self.n, self.slots, self.device = cfg.n, cfg.batch_size * cfg.n, head.weight.device
        self.caps = [min(cfg.max_new_tokens, context - len(seq)) for seq in prompt_ids]  # prompt + completion fit
        self.width = max(self.caps) + cfg.check_every  # a row's token columns: its steps, then running on
        self.dtype = body.get_input_embeddings().weight.dtype
        self.queue = deque(range(len(prompt_ids)))
        self.rows: Rows | None = None
        self.cache: KVCache | None = None
        self.last_end = 0  # global step by which every row has ended
        self.left: dict[int, int] = {}  # rows still running per prompt
        self.done: dict[int, tuple] = {}  # finished rows of prompts not yet whole

    def _prefill(self, batch: list[int], s: int) -> tuple[KVCache, Rows]:
        """The prompts `batch` prefilled (one row each, cached n times), their rows drawing step s's token."""
        ids, valid = _left_pad([self.prompt_ids[p] for p in batch], self.pad_id, self.device)  # (P, T)
        cache = KVCache(len(batch) * self.n, ids.shape[1], repeats=self.n)
        logits = self.head(prefill(self.body, ids, valid, cache, self.keyword)).float()  # (P, V)
        logits = logits.repeat_interleave(self.n, 0)  # (B, V)
        rows = Rows.fresh([len(self.prompt_ids[p]) for p in batch], [self.caps[p] for p in batch],
                          [self.prompt_index[p] for p in batch], batch, ids.shape[1], s, self.width, self.cfg,
                          self.device, logprobs=self.logprobs, stops=self.stops is not None)
        self._draw(rows, s, logits)
        for p in batch:
            self.left[p] = self.n
        return cache, rows

    def _draw(self, rows: Rows, s: int, logits: torch.Tensor) -> None:
        u = rows.u.gather(1, rows.step_of(s)[:, None]).squeeze(1)  # (B,)
        rows.record(s, draw(logits, u, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p), logits, self.eos,
                    self.stops)

    def rebuild(self, s: int) -> None:
        """Finished rows leave; the next prompts that fit take their slots, drawing their first token at step s."""
        keep, old = None, None
        if self.rows is not None and any(self.rows.live):
            keep = torch.tensor([r for r, alive in enumerate(self.rows.live) if alive], device=self.device)
            old = self.rows.keep(keep)
        free = self.slots - (len(old.origin) if old is not None else 0)
        joining = [self.queue.popleft() for _ in range(min(len(self.queue), free // self.n))]
        new_cache, new = self._prefill(joining, s) if joining else (None, None)
        rows = new if old is None else old if new is None else old.cat(new)
        self.last_end = int((rows.born + rows.cap).max()) - 1
        self.rows = self.place(s, rows, keep, new_cache)

    def place(self, s: int, rows: Rows, keep: torch.Tensor | None, new_cache: KVCache | None) -> Rows:
        """A new cache: the kept rows' columns (`keep`: their old row indices, first in `rows`), then the new
        rows' prefill, right-aligned at one width and sized to the last step any of them can reach."""
        kept = 0 if keep is None else len(keep)
        lo = int(rows.start[:kept].min()) if kept else 0  # columns before every kept row's first key are dropped
        width = max(self.cache.length - lo if kept else 0, new_cache.length if new_cache is not None else 0)
        if kept:
            rows.start[:kept] += width - self.cache.length  # the kept columns move right by width - (length - lo)
        if new_cache is not None:
            rows.start[kept:] += width - new_cache.length
        capacity = width + self.last_end - s + self.cfg.check_every + 1
        self.cache = KVCache.joined(self.cache if kept else None, keep, lo, new_cache, width, capacity)
        rows.mask(capacity, self.dtype)
        return rows

    def look(self, s: int):
        """The host's look after step s (one sync): stop strings, then finished rows out; prompts now whole."""
        rows, none = self.rows, self.rows.tokens.shape[1]
        ends, codes = rows.end.tolist(), rows.code.tolist()
        if self.stops is not None:
            find_stops(rows, self.stops, ends, codes)
        finished = [r for r in range(len(rows.live)) if rows.live[r] and ends[r] != none]
        return finish(rows, finished, ends, codes, self.n, self.left, self.done) if finished else []

    def _wants_rebuild(self) -> bool:
        live = self.rows.live
        alive = sum(live)
        free = self.slots - alive
        joinable = min(len(self.queue), free // self.n)
        return alive == 0 or (joinable > 0 and 4 * free >= self.slots) or 4 * (len(live) - alive) >= len(live)

    def run(self):
        """Yield (position in the stream, n rows of (token ids, finish code, token log-probs)) as prompts finish."""
        s = 0
        self.rebuild(s)
        self.plan(s)
        while True:
            if (s + 1) % self.cfg.check_every == 0 or s >= self.last_end:  # the host looks: one sync
                yield from self.look(s)
                if not any(self.rows.live) and not self.queue:
                    return
                if self._wants_rebuild():  # a quarter free: one copy of the cache, not one every step
                    self.rebuild(s)
                self.plan(s)
            self.step(s)
            s += 1

    def plan(self, s: int) -> None:
        """Before the steps from s to the next look (the static decoder picks its shapes for them here)."""

    def step(self, s: int) -> None:
        """Global step s: each row's last token in, its token of step s + 1 drawn and recorded."""
        rows, cache = self.rows, self.cache
        positions = (rows.pos0 + s).clamp_(max=self.context - 1)  # a row past its end runs on, tokens dropped
        hidden = decode_step(self.body, rows.last, positions, rows.keymask[..., : cache.length + 1], cache,
                             self.keyword)  # (B, H)
        cache.length += 1
        self._draw(rows, s + 1, self.head(hidden).float())
