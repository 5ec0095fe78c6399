"""The native sampling engine: its own KV cache, `prefill` and `decode_step`, and the decode loop.

    for prompt_index, rows in engine.rows(model, tokenizer, ids, pending, cfg):   # cfg: a SamplingConfig
        token_ids, finish_reason, token_logprobs = rows[j]                            # sample j of the prompt

`sampling.generate` is the front door (tokenising, resuming, writing); this file only turns token ids into
token ids. How it works:
- prompts are sorted by length and cut into batches of `cfg.batch_size`, left-padded so that every prompt
  ends at column T-1 and every row writes its next key and value at the same cache column;
- the cache is ours (`KVCache`): one (B, heads, T + S, d) buffer per layer, allocated once per batch for
  B = prompts × n rows and S = the most new tokens any row may take. The model's attention layers write into
  it through `KVCache.update`, the one method they call;
- `prefill` runs each prompt ONCE and writes its keys and values into all n of its rows (Hugging Face
  `generate(num_return_sequences=n)` recomputes every prompt n times); `decode_step` feeds one token per
  row; the lm_head runs on the last position only;
- the attention mask is additive and float (0 keep, the dtype's minimum drop), built once per batch:
  eager attention adds it to the scores and sdpa takes it as it is, so both give the same outputs.
  Implementations that cannot take a 4-D mask (flash, flex) are refused with a one-line error;
- ends (EOS, the length limit, the end of the context) are recorded on the device at every step; the host
  looks every `cfg.check_every` steps (one sync), then also finds stop strings in the tokens drawn since its
  last look. A row may so run a few steps past its end; those tokens are dropped, so outputs do not depend
  on `check_every`. Rows leave the batch (a cache copy) once a quarter of it has finished;
- randomness is counter-based: the uniform behind token s of sample j of prompt i is a hash of
  (seed, i, j, s), turned into a token by inverse-CDF sampling. A prompt's samples depend on (seed, its
  index) only: not on its batch-mates or on resuming, up to float rounding in the model.

Simplifications: full-attention decoders only (Llama, llm-jp-3): sliding-window or hybrid models are
refused (the vLLM backend serves them); stop strings are matched in the generated text, never across the
prompt; no repetition penalty, beam search or speculative decoding.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch

from ..errors import UserError
from ..models import split_body_head, training_mode
from ..models.tokenizer import decode_continuation

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
# stop strings and EOS


class StopStrings:
    """Finds where a row's text first contains a stop string; decodes only steps where that is possible.

    A token can complete a stop string only if its text holds the string's last character (or part of it,
    for a multi-byte character): a (V,) table of such tokens, built once, marks the steps worth a decode.
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

    def completed_at(self, tokens: list[int], step: int) -> bool:
        """Whether the text of tokens[: step + 1] ends in a stop string that token `step` completed."""
        tail = decode_continuation(self.tokenizer, tokens[max(0, step + 1 - self.window) : step + 1])
        return any(s in tail for s in self.stops)


def eos_table(model, tokenizer, vocab_size: int, device) -> torch.Tensor:
    """(V,) bool: the tokenizer's EOS and every EOS id of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[[i for i in ids if i is not None and 0 <= i < vocab_size]] = True
    return table.to(device)


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


def _decode_batch(body, head, prompt_ids: list[list[int]], prompt_index: list[int], cfg, *, eos: torch.Tensor,
                  stops: StopStrings | None, logprobs: bool, pad_id: int, context: int, keyword: str):
    """Yield (position in batch, n rows of (token ids, finish code, token log-probs)) as prompts finish."""
    device, n = head.weight.device, cfg.n
    ids, valid = _left_pad(prompt_ids, pad_id, device)  # (P, T)
    P, T = ids.shape
    caps = [min(cfg.max_new_tokens, context - len(seq)) for seq in prompt_ids]  # prompt + completion fit
    S, B = max(caps), P * n  # steps this batch can take; rows
    cache = KVCache(B, T + S, repeats=n)
    logits = head(prefill(body, ids, valid, cache, keyword)).float().repeat_interleave(n, 0)  # (B, V)
    dtype = body.get_input_embeddings().weight.dtype
    keymask = torch.zeros(B, 1, 1, T + S, dtype=dtype, device=device)  # (B, 1, 1, T+S), sliced per step
    keymask[:, 0, 0, :T].masked_fill_(~valid.repeat_interleave(n, 0), torch.finfo(dtype).min)
    pos = valid.sum(-1).repeat_interleave(n)  # (B,) position of each row's first new token
    cap = torch.tensor(caps, device=device).repeat_interleave(n)  # (B,) tokens each row may generate
    sample = torch.arange(n, device=device).repeat(P)  # (B,)
    u = uniforms(cfg.seed, torch.tensor(prompt_index, device=device).repeat_interleave(n), sample, S)  # (B, S)
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)  # (B, S) drawn tokens
    lps = torch.zeros(B, S, device=device) if logprobs else None  # (B, S) raw-model token log-probs
    end = torch.full((B,), S, dtype=torch.long, device=device)  # (B,) step of a row's EOS / limit; S: none yet
    code = torch.zeros(B, dtype=torch.long, device=device)  # (B,) 1 = EOS, 0 = length
    maybe_stop = torch.zeros(B, S, dtype=torch.bool, device=device) if stops else None  # (B, S)
    rows = list(range(B))  # original row of each current row
    live = [True] * B  # current rows still generating, as the host last saw them
    left, done, looked = [n] * P, {}, 0  # rows running per prompt; finished rows; steps the host has seen
    for s in range(S):
        tok = draw(logits, u[:, s], cfg.temperature, cfg.top_k, cfg.top_p)  # (B,)
        tokens[:, s] = tok
        if lps is not None:
            lps[:, s] = logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
        is_eos = eos[tok]  # (B,)
        new = (end == S) & (is_eos | (cap == s + 1))  # rows ending at this step: EOS outranks length
        code = torch.where(new, is_eos.long(), code)
        end = torch.where(new, s, end)
        if maybe_stop is not None:
            maybe_stop[:, s] = stops.can_end[tok]
        if (s + 1) % cfg.check_every == 0 or s == S - 1:  # the host looks: one sync
            ends, codes = end.tolist(), code.tolist()
            if maybe_stop is not None:  # the first stop string within each row's end; EOS outranks stop
                hits = maybe_stop[:, looked : s + 1].nonzero().tolist()  # (row, step - looked), row-major
                candidates = sorted({r for r, _ in hits})
                text_of = dict(zip(candidates, tokens[candidates, : s + 1].tolist())) if hits else {}
                resolved = set()
                for r, k in hits:
                    step = looked + k
                    if r in resolved or not live[r] or step > ends[r] or (step == ends[r] and codes[r] == 1):
                        continue
                    if stops.completed_at(text_of[r], step):
                        ends[r], codes[r] = step, 2
                        resolved.add(r)
            finished = [r for r in range(len(rows)) if live[r] and ends[r] <= s]
            if finished:
                out = tokens[finished].tolist()
                out_lps = lps[finished].tolist() if lps is not None else [None] * len(finished)
                for r, row_tokens, row_lps in zip(finished, out, out_lps):
                    e = ends[r] + 1
                    done[rows[r]] = (row_tokens[:e], codes[r], None if row_lps is None else row_lps[:e])
                    live[r] = False
                    p = rows[r] // n
                    left[p] -= 1
                    if left[p] == 0:
                        yield p, [done.pop(p * n + j) for j in range(n)]
            looked = s + 1
            alive = sum(live)
            if alive == 0:
                return
            if 4 * (len(rows) - alive) >= len(rows):  # prune once a quarter is dead: a copy, not every step
                keep = torch.tensor([r for r in range(len(rows)) if live[r]], device=device)
                cache.select(keep)
                tokens, u, keymask, pos, cap, tok, end, code = (
                    x[keep] for x in (tokens, u, keymask, pos, cap, tok, end, code))
                lps = None if lps is None else lps[keep]
                maybe_stop = None if maybe_stop is None else maybe_stop[keep]
                rows = [rows[r] for r in keep.tolist()]
                live = [True] * len(rows)
        if s == S - 1:
            return
        positions = (pos + s).clamp_(max=context - 1)  # a row past its end may run on; its tokens are dropped
        hidden = decode_step(body, tok, positions, keymask[..., : T + s + 1], cache, keyword)  # (B, H)
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
    """
    body, head = split_body_head(model)
    check_served(body.config)
    context = context_length(model) or 2**62
    vocab, device = head.weight.shape[0], head.weight.device
    eos = eos_table(model, tokenizer, vocab, device)
    stops = StopStrings(tokenizer, cfg.stop, vocab, device) if cfg.stop else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keyword = _cache_keyword(body)
    with training_mode(model, False), torch.inference_mode():
        for batch in batches(ids, cfg.batch_size):
            if pending.isdisjoint(batch):
                continue
            for p, group in _decode_batch(body, head, [ids[i] for i in batch], batch, cfg, eos=eos, stops=stops,
                                          logprobs=logprobs, pad_id=pad_id, context=context, keyword=keyword):
                if batch[p] in pending:
                    yield batch[p], [(token_ids, FINISH[c], row_lps) for token_ids, c, row_lps in group]
