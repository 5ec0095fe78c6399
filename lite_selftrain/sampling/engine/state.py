"""The decode loop's per-row state (`Rows`), and what the host does when it looks: stop strings, finished rows.

A row is sample j of one prompt. Rows join the decode batch at a global step (`born`) and keep their own
step count s - born, so a row's tokens, uniforms and ends are those it would have in a batch of its own:
rows that join later (continuous refill) draw exactly what they would have drawn in the first batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..stops import StopStrings
from .draws import uniforms

FIELDS = ("tokens", "u", "start", "pos0", "born", "cap", "end", "code", "lps", "maybe_stop", "last")


@dataclass
class Rows:
    """Every row's state, in the batch's current row order (dim 0 of every tensor)."""

    origin: list[int]  # each row's place in the whole stream: prompt × n + sample
    live: list[bool]  # rows still generating, as the host last saw them
    tokens: torch.Tensor  # (B, W) drawn tokens, column = the row's own step
    u: torch.Tensor  # (B, W) the uniforms they are drawn with
    start: torch.Tensor  # (B,) cache column of the row's first prompt token (columns before it are masked)
    pos0: torch.Tensor  # (B,) prompt length - born: position of the token fed at global step s is pos0 + s
    born: torch.Tensor  # (B,) global step at which the row drew its first token
    cap: torch.Tensor  # (B,) tokens the row may generate
    end: torch.Tensor  # (B,) the row's own step of its EOS / limit; W: none yet
    code: torch.Tensor  # (B,) index into FINISH: 1 = EOS, 0 = length (2 = stop, found on the host)
    lps: torch.Tensor | None  # (B, W) raw-model token log-probs, when asked for
    maybe_stop: torch.Tensor | None  # (B, W) steps whose token may complete a stop string, not yet looked at
    last: torch.Tensor | None = None  # (B,) the token of the latest step
    keymask: torch.Tensor | None = None  # (B, 1, 1, capacity) additive, set by `mask`

    @classmethod
    def fresh(cls, lengths: list[int], caps: list[int], prompt_index: list[int], origin: list[int], columns: int,
              born: int, width: int, cfg, device, *, logprobs: bool, stops: bool) -> Rows:
        """n rows per prompt of a left-padded prefill `columns` wide; they draw their first token at step `born`."""
        n, P = cfg.n, len(lengths)
        B = P * n
        rep = lambda xs: torch.tensor(xs, device=device).repeat_interleave(n)  # noqa: E731  (P,) → (B,)
        sample = torch.arange(n, device=device).repeat(P)  # (B,)
        return cls(origin=[o * n + j for o in origin for j in range(n)], live=[True] * B,
                   tokens=torch.zeros(B, width, dtype=torch.long, device=device),
                   u=uniforms(cfg.seed, rep(prompt_index), sample, width),
                   start=columns - rep(lengths), pos0=rep(lengths) - born,
                   born=torch.full((B,), born, dtype=torch.long, device=device), cap=rep(caps),
                   end=torch.full((B,), width, dtype=torch.long, device=device),
                   code=torch.zeros(B, dtype=torch.long, device=device),
                   lps=torch.zeros(B, width, device=device) if logprobs else None,
                   maybe_stop=torch.zeros(B, width, dtype=torch.bool, device=device) if stops else None)

    def step_of(self, s: int | torch.Tensor) -> torch.Tensor:
        """(B,) each row's own step at global step s (a finished row running on stays in the last column)."""
        return (s - self.born).clamp_(max=self.tokens.shape[1] - 1)

    def record(self, s: int | torch.Tensor, tok: torch.Tensor, logits: torch.Tensor, eos: torch.Tensor, stops) -> None:
        """Global step s drew (B,) `tok` from (B, V) `logits`: keep it, mark rows it ends (EOS outranks length)."""
        col, index = self.step_of(s), torch.arange(len(tok), device=tok.device)
        self.tokens[index, col] = tok
        self.last = tok
        if self.lps is not None:
            self.lps[index, col] = logits.gather(-1, tok[:, None]).squeeze(-1) - logits.logsumexp(-1)
        is_eos = eos[tok]  # (B,)
        new = (self.end == self.tokens.shape[1]) & (is_eos | (self.cap == col + 1))  # rows ending at this step
        self.code.copy_(torch.where(new, is_eos.long(), self.code))  # in place: the static decoder's buffers
        self.end.copy_(torch.where(new, col, self.end))
        if self.maybe_stop is not None:
            self.maybe_stop[index, col] = stops.can_end[tok]

    def keep(self, rows: torch.Tensor) -> Rows:
        """Only `rows` (indices of current rows, all live): finished rows leave the batch."""
        picked = {f: None if getattr(self, f) is None else getattr(self, f)[rows] for f in FIELDS}
        origin = [self.origin[r] for r in rows.tolist()]
        return dataclasses.replace(self, origin=origin, live=[True] * len(origin), keymask=None, **picked)

    def cat(self, other: Rows) -> Rows:
        """These rows, then `other`'s."""
        joined = {f: None if getattr(self, f) is None else torch.cat([getattr(self, f), getattr(other, f)])
                  for f in FIELDS}
        return dataclasses.replace(self, origin=self.origin + other.origin, live=self.live + other.live,
                                   keymask=None, **joined)

    def mask(self, capacity: int, dtype: torch.dtype) -> None:
        """The (B, 1, 1, capacity) additive key mask: each row sees its columns from `start` on."""
        columns = torch.arange(capacity, device=self.start.device)
        drop = columns[None, :] < self.start[:, None]  # (B, capacity)
        self.keymask = torch.zeros(drop.shape, dtype=dtype, device=drop.device).masked_fill_(
            drop, torch.finfo(dtype).min)[:, None, None]


def find_stops(rows: Rows, stops: StopStrings, ends: list[int], codes: list[int]) -> None:
    """End each live row at the first stop string its steps since the last look complete, if that comes before
    its EOS or length limit (EOS at the same step outranks it). `ends` and `codes` are the host's copies, set
    in place; the steps looked at are cleared."""
    hits = rows.maybe_stop.nonzero().tolist()  # (row, its own step), row-major
    rows.maybe_stop.zero_()
    hits = [(r, k) for r, k in hits if rows.live[r]]
    if not hits:
        return
    candidates = sorted({r for r, _ in hits})
    text_of = dict(zip(candidates, rows.tokens[candidates].tolist()))
    resolved = set()
    for r, step in hits:
        if r in resolved or step > ends[r] or (step == ends[r] and codes[r] == 1):
            continue
        if stops.completed_at(text_of[r], step):
            ends[r], codes[r] = step, 2
            resolved.add(r)


def finish(rows: Rows, finished: list[int], ends: list[int], codes: list[int], n: int, left: dict[int, int],
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
