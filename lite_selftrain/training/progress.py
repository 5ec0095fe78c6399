"""What a training run has done so far: its counters (checkpointed) and the window behind each metrics line.

A metrics line (`out_dir/metrics.jsonl`) holds the means of the good steps since the previous line, the
learning rate, throughput, the run's totals and the peak memory.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

import torch


@dataclass
class Counters:
    """The run's totals so far: saved in every checkpoint, restored on resume."""

    step: int = 0  # steps done, skipped ones included
    skipped: int = 0  # steps whose loss or gradient was NaN/inf: data consumed, no update
    bad_streak: int = 0  # such steps in a row, against `nan_patience`
    tokens: int = 0  # tokens of every step so far, padding excluded
    elapsed_s: float = 0.0  # seconds spent in steps, over this run and the ones it resumed

    def as_dict(self) -> dict:
        return asdict(self)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsWindow:
    """The steps since the last metrics line: the good steps' summed metrics, and every step's tokens and time."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.good_steps = 0
        self.tokens = 0
        self.seconds = 0.0

    def add(self, parts: dict | None, tokens: int, seconds: float) -> None:
        """One step: its metrics (None for a skipped step), its tokens and its time."""
        if parts is not None:
            for name, v in parts.items():
                self.sums[name] = self.sums.get(name, 0.0) + v
            self.good_steps += 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    def line(self, step: int, steps_per_epoch: int, lr: float, counters: Counters, device) -> dict:
        """The metrics line at `step`: means over the window's good steps, throughput over all of them."""
        good = max(self.good_steps, 1)
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4)}
        rec.update({k: v / good for k, v in self.sums.items()})
        rec.update(lr=lr, tokens_per_s=self.tokens / max(self.seconds, 1e-9), tokens=counters.tokens,
                   elapsed_s=counters.elapsed_s, skipped_steps=counters.skipped, peak_mem_mb=peak_memory_mb(device))
        return rec
