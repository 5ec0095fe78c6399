"""The decode loop over fixed shapes: a cache that never moves while rows decode, and steps that a CUDA graph
can replay (`graphs.py`). The same loop as `decode.Decoder` (same rows, same draws, same refill); only where
the state lives differs:

    dynamic (Decoder)                                  static (StaticDecoder)
    the cache grows a column a step, right-aligned     row r's position p is column p of its slot
    each rebuild allocates a new cache and new rows    buffers allocated once; a rebuild copies into them
    attention reads the columns written so far         attention reads `columns`, a bucket of PAGE columns
    B rows                                             B rows and padding up to a bucket of rows

so a step's tensors have the same shapes and addresses from one step to the next, for as long as the
buckets stay. On a GPU the step is captured once per bucket and replayed; on a CPU it runs as it is, which
is how the tests check it against the dynamic loop.
"""

from __future__ import annotations

import dataclasses

import torch

from .decode import Decoder, KVCache, decode_step
from .graphs import StepGraphs
from .state import FIELDS, Rows

PAGE = 128  # columns are read in buckets of PAGE: fewer graphs, at most PAGE - 1 masked columns read a step
ROW_STEP = 32  # rows buckets: powers of two up to ROW_STEP, then multiples of it (at most ROW_STEP - 1 idle)
# what a padding row holds: it has ended (end 0 < width), draws nothing that is kept, reads finite keys
PADDING = {"u": 0.5, "cap": 1, "end": 0}


def row_bucket(rows: int, slots: int) -> int:
    """The number of rows a step runs for `rows` live ones: the next power of two up to ROW_STEP, then the
    next multiple of ROW_STEP, never more than `slots`."""
    bucket = 1
    while bucket < min(rows, ROW_STEP):
        bucket *= 2
    if rows > ROW_STEP:
        bucket = -(-rows // ROW_STEP) * ROW_STEP
    return min(bucket, slots)


class SlotCache:
    """Every layer's keys and values in (slots, heads, capacity, d) buffers allocated once, zeros first (a
    masked column must be finite: 0 × inf would be NaN). Row r's key at position p is column p of slot r.

    A decode step sets `write`, ((b,) slots, (b,) columns) where the first b rows write, and `columns`, how
    many columns attention reads; `update` writes in place and returns views, so shapes depend on (b,
    columns) only.
    """

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.write: tuple[torch.Tensor, torch.Tensor] | None = None
        self.columns = capacity

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value: (b, heads, 1, d) → this layer's (b, heads, columns, d) keys and values, the new ones in."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        slots, column = self.write
        k[slots, :, column] = key[:, :, 0]  # (b, heads, d) into column column[r] of slot r
        v[slots, :, column] = value[:, :, 0]
        b = key.shape[0]
        return k[:b, :, : self.columns], v[:b, :, : self.columns]

    def move(self, keep: torch.Tensor | None, prefilled: KVCache | None, shift: torch.Tensor | None) -> None:
        """Compact and refill: slots 0..K-1 take the rows `keep` (old slot indices), the next ones the rows of
        `prefilled`, a left-padded prefill whose row r starts at column shift[r]; they go to columns 0.."""
        kept = 0 if keep is None else len(keep)
        for bufs, new in ((self.keys, prefilled and prefilled.keys), (self.values, prefilled and prefilled.values)):
            for i in (new or bufs):
                if i not in bufs:
                    _, heads, _, d = new[i].shape
                    bufs[i] = new[i].new_zeros(self.slots, heads, self.capacity, d)
                buf = bufs[i]
                if kept:
                    buf[:kept] = buf[keep]  # the right side is a copy first: no overlap
                if new is not None:
                    x = new[i]  # (R, heads, T, d)
                    T = x.shape[2]
                    src = (torch.arange(T, device=x.device)[None] + shift[:, None]).clamp_(max=T - 1)  # (R, T)
                    buf[kept : kept + len(x), :, :T] = x.gather(2, src[:, None, :, None].expand_as(x))


class StaticDecoder(Decoder):
    """`Decoder` over fixed shapes (see the module's docstring); `graphs`: replay the step as CUDA graphs."""

    def __init__(self, *args, graphs: bool, **kwargs):
        super().__init__(*args, **kwargs)
        cols = max(len(ids) + cap for ids, cap in zip(self.prompt_ids, self.caps))  # a row's prompt and tokens
        self.cache = SlotCache(self.slots, cols + self.cfg.check_every + 1)
        self.buffers: dict[str, torch.Tensor] = {}  # each Rows field, (slots, ...)
        self.step_count = torch.zeros((), dtype=torch.long, device=self.device)  # s, on the device
        self.host: tuple[list[int], list[int]] = ([], [])  # per row: position fed at step `placed_at`, prompt + cap
        self.placed_at = 0  # the step of the latest rebuild
        self.bucket = (1, PAGE)  # (rows, columns) of the next steps
        self.graphs = StepGraphs(self._step) if graphs else None

    def place(self, s: int, rows: Rows, keep: torch.Tensor | None, new_cache: KVCache | None) -> Rows:
        """The kept rows to the first slots, the new rows' prompts after them at columns 0..; every Rows field
        copied into its buffer, padding rows after the B real ones."""
        kept = 0 if keep is None else len(keep)
        self.cache.move(keep, new_cache, rows.start[kept:] if new_cache is not None else None)
        B = len(rows.origin)
        for f in FIELDS:
            x = getattr(rows, f)
            if x is None:
                continue
            if f not in self.buffers:
                self.buffers[f] = x.new_zeros(self.slots, *x.shape[1:])
            self.buffers[f][:B] = x
            self.buffers[f][B:] = PADDING.get(f, 0)
        self.host = ((rows.pos0 + s).tolist(), (rows.pos0 + rows.born + rows.cap).tolist())
        self.placed_at = s
        return dataclasses.replace(rows, **{f: self.buffers[f][:B] for f in FIELDS if getattr(rows, f) is not None})

    def plan(self, s: int) -> None:
        """Buckets for the steps from s to the next look (at most check_every of them): enough columns for
        every live row's positions until then, or until its last token, whichever comes first."""
        moved = s - self.placed_at
        need = max((min(p + moved + self.cfg.check_every, end) for p, end, alive
                    in zip(*self.host, self.rows.live) if alive), default=1)  # the highest column written
        columns = min(-(-(need + 1) // PAGE) * PAGE, self.cache.capacity)
        self.bucket = (row_bucket(len(self.rows.origin), self.slots), columns)

    def step(self, s: int) -> None:
        if self.graphs is None:
            self._step(*self.bucket)
        else:
            self.graphs(*self.bucket)

    def _step(self, b: int, columns: int) -> None:
        """One decode step of the first b slots over `columns` columns, all of it on the device: shapes and
        addresses depend on (b, columns) only, and the step counter is a tensor, so a graph can replay it."""
        rows = dataclasses.replace(self.rows, **{f: buf[:b] for f, buf in self.buffers.items()})
        positions = rows.pos0 + self.step_count  # (b,)
        visible = torch.arange(columns, device=self.device)[None, :] <= positions[:, None]  # (b, columns)
        keymask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~visible, torch.finfo(self.dtype).min)[:, None, None]  # (b, 1, 1, columns)
        slots = torch.arange(b, device=self.device)  # once a step, not once a layer
        self.cache.write, self.cache.columns = (slots, positions.clamp(max=columns - 1)), columns  # ended rows run on
        hidden = decode_step(self.body, rows.last, positions.clamp(max=self.context - 1), keymask, self.cache,
                             self.keyword)  # (b, H)
        self.step_count += 1
        self._draw(rows, self.step_count, self.head(hidden).float())
        self.buffers["last"][:b].copy_(rows.last)
