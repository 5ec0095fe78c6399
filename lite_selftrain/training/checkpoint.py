"""The trainer's checkpoint: one file, `out_dir/checkpoint.pt`, written atomically by rank 0.

A checkpoint holds the run's identity (config and data fingerprint), the trainable weights (all weights of
a full model), the optimiser, the scheduler, every rank's RNG states and the step counters; a finished run
holds its weights and summary instead. `resume` puts them all back, so a resumed run ends bit for bit
where an uninterrupted one would.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from .. import distributed as dist
from ..errors import UserError
from ..models import is_peft
from ..store import JsonlLog, atomic_write_bytes, write_jsonl
from .progress import Counters

FILE = "checkpoint.pt"


def weights(model) -> dict:
    """Trainable parameters of a peft model, the whole state of a full one."""
    if is_peft(model):
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def load_weights(model, saved: dict) -> None:
    if not is_peft(model):
        model.load_state_dict(saved)
        return
    params = dict(model.named_parameters())
    missing = [n for n in saved if n not in params]
    if missing:
        raise UserError(f"checkpoint does not fit this model (e.g. no parameter {missing[0]})")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(out_dir: Path, run_id: dict) -> dict | None:
    """The checkpoint in `out_dir`, None when there is none; an error when it is another run's."""
    path = out_dir / FILE
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["run"] != run_id:
        raise UserError(f"{out_dir} holds a training run with another config or data; use another directory "
                        "or delete it")
    return saved


def _write(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_progress(out_dir: Path, run_id: dict, wrapped, optimizer, scheduler, counters: Counters) -> None:
    """Checkpoint an unfinished run: gathered on every rank (FSDP2 holds shards), written by rank 0."""
    payload = {"run": run_id, "done": False, "weights": wrapped.full_weights(weights),
               "optimizer": wrapped.optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
               "rng": dist.gather(rng_state()), "counters": counters.as_dict()}  # rng: one per rank
    if dist.is_main():
        _write(out_dir / FILE, payload)


def save_done(out_dir: Path, run_id: dict, model, summary: dict) -> None:
    """Mark the run finished (rank 0): its final weights and summary, for a call that comes again."""
    _write(out_dir / FILE, {"run": run_id, "done": True, "weights": weights(model), "summary": summary})


def resume(saved: dict, wrapped, optimizer, scheduler) -> Counters:
    """Put the optimiser, scheduler and this rank's RNG back as saved → the counters to go on from."""
    wrapped.load_optimizer_state(optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rngs = saved["rng"]  # per rank; another number of ranks continues from rank 0's
    set_rng_state(rngs[dist.rank()] if len(rngs) == dist.world() else rngs[0])
    return Counters(**saved["counters"])


def trim_metrics(log: JsonlLog, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: those steps run again."""
    records = log.recover()
    keep = [r for r in records if r.get("step", 0) <= last_step]
    if len(keep) != len(records):
        write_jsonl(log.path, keep)
