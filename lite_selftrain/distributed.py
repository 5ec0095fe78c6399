"""Several processes under a launcher (`torchrun`, `accelerate launch`): who this process is, and the few
collectives the stages need. Everything here is a no-op in one process.

    from lite_selftrain import distributed as dist
    dist.init()                          # once per process; reads RANK / WORLD_SIZE / LOCAL_RANK from the launcher
    mine = dist.shard(range(n))          # this rank's share of n items: items r, r + W, r + 2W, ...
    rewards = dist.map_shards(score, xs) # score(list) of each rank's share, every result on every rank
    if dist.is_main(): write(...)        # rank 0 alone writes the run directory
    dist.barrier()                       # the others wait, then read what it wrote

The launcher sets the environment; `init` picks NCCL when CUDA is present (each process on its LOCAL_RANK
GPU) and gloo otherwise, so the same commands run on CPUs, as the tests do. One node, one shared filesystem:
every rank reads the run directory rank 0 writes.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from .errors import UserError

T = TypeVar("T")
TIMEOUT_MIN = 60  # a collective waits this long for the other ranks: a long rank-0 stage (eval) must fit


def launched() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def init() -> bool:
    """Join the process group the launcher describes (once; later calls do nothing); True when several ranks."""
    if not launched() or not tdist.is_available():
        return False
    if not tdist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # before the group: NCCL binds each process to its own GPU
            torch.cuda.set_device(local_gpu())
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=TIMEOUT_MIN))
        atexit.register(_close)  # left to interpreter teardown, the group's threads may abort the process
    return active()


def _close() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def local_gpu() -> int:
    """This process's GPU index: the launcher's LOCAL_RANK (0 alone); one that has no GPU of its own is an error."""
    local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= gpus:
        raise UserError(f"local rank {local} has no GPU of its own ({gpus} visible): start at most {gpus} "
                        "processes per node (--nproc_per_node), or hide the GPUs to run on the CPU")
    return local


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        tdist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: every world()-th one from its rank on (strided, so long and short items mix)."""
    return list(items[rank() :: world()])


def map_shards(fn: Callable[[list[T]], Sequence[Any]], items: Sequence[T]) -> list[Any]:
    """`fn` of all `items` (one result per item, in order), each rank computing `fn` of its `shard` only.

    For per-item work that is worth splitting (rewards, code runs): every rank gets every result.
    """
    mine = list(fn(shard(items)))
    if not active():
        return mine
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(gather(mine)):  # rank r held items r, r + W, ...
        out[r :: world()] = part
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (also returned)."""
    if active():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects; small ones: they travel pickled)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    tdist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(fn, *args, **kwargs):
    """Run `fn` on rank 0, then hand its result (or its exception, re-raised) to every rank.

    For what rank 0 alone should do (binding the run folder, folding a killed run's sample streams, a
    metrics line): the others wait for rank 0's answer instead of redoing it, and an error stops every
    rank, not only the one that hit it. Never around a call that is itself collective (`generate`).
    """
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e
    result, error = broadcast((result, error))
    if error is not None:
        raise error
    return result
