"""Training on several ranks under a launcher with torch's own DDP, or FSDP2 for full fine-tuning: no code
of ours moves gradients.

    wrapped = ParallelModel.wrap(model, "ddp")  # several ranks: DDP; one process: the model itself
    sums, counts = wrapped(ids, attn, mask, sync=last_micro_batch)
    wrapped.clip(max_norm); optimizer.step() ...
    wrapped.full_weights(select)                # the whole model on rank 0 (checkpoints)
    wrapped.close()                             # the model as it was, trained: plain tensors, hooks gone

Both average gradients over ranks; the trainer scales each rank's loss by W so that the sum is the
one-process gradient. How the wrapping works and what it simplifies: docs/multi_gpu.md.
"""

from __future__ import annotations

import copy

import torch

from .. import distributed as dist
from ..models import split_body_head
from .logprobs import sequence_logprobs

PARALLEL = ("ddp", "fsdp")


class LogprobModule(torch.nn.Module):
    """`sequence_logprobs(model, ...)` as a module's forward, so DDP's and FSDP2's forward hooks see the call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, loss_mask):  # (R, T) each → (R,), (R,)
        return sequence_logprobs(self.model, input_ids, attention_mask, loss_mask)


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class ParallelModel:
    """The model as it trains on this rank: itself (one process), DDP-wrapped, or an FSDP2-sharded copy."""

    def __init__(self, model, kind: str, net, module, parallel: str):
        self.model = model  # the caller's model
        self.kind = kind  # "single", "ddp" or "fsdp"
        self.by_name = parallel == "fsdp"  # optimiser state keyed by parameter name, whatever the world size
        self.net = net  # what trains: the model itself, or its sharded copy (FSDP2)
        self.module = module  # what is called: LogprobModule, DDP-wrapped or FSDP2's root

    @classmethod
    def wrap(cls, model, parallel: str) -> ParallelModel:
        if not dist.active():
            return cls(model, "single", model, LogprobModule(model), parallel)
        device = next(model.parameters()).device
        if parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            return cls(model, "ddp", model, DDP(LogprobModule(model), device_ids=ids), parallel)
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 kept FSDP2 under its composable name
            from torch.distributed._composable.fsdp import fully_shard

        model.to("cpu")  # frees the device for the shards; `close` brings it back
        net = copy.deepcopy(model)
        mesh = init_device_mesh(device.type, (dist.world(),))
        for layer in split_body_head(net)[0].layers:  # one group per decoder layer, moved to `device` and sharded
            fully_shard(layer, mesh=mesh)
        root = fully_shard(LogprobModule(net), mesh=mesh)  # the rest: embeddings, final norm, lm_head
        wrapped = cls(model, "fsdp", net, root, parallel)
        wrapped.device = device
        return wrapped

    def params(self) -> list:
        return [p for p in self.net.parameters() if p.requires_grad]

    def __call__(self, ids, attn, mask, *, sync: bool = True):
        if self.kind == "ddp" and not sync:
            with self.module.no_sync():
                return self.module(ids, attn, mask)
        return self.module(ids, attn, mask)

    def clip(self, max_norm: float) -> float:
        """Clip the (synchronised) gradients to `max_norm` → their total norm before clipping, on every rank."""
        norm = torch.nn.utils.clip_grad_norm_(self.params(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor summed over the shards
            norm = norm.full_tensor()
        return float(norm)

    # checkpoints: one file, whole tensors, whatever the wrapping (collectives: every rank calls these)

    def full_weights(self, select) -> dict:
        """`select(model)`'s dict ({name: tensor}) on rank 0 — for FSDP2 the whole state, gathered."""
        if self.kind != "fsdp":
            return select(self.net) if dist.is_main() else {}
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.net, options=_state_options(cpu_offload=True))

    def optimizer_state(self, optimizer) -> dict:
        """The optimiser's state on rank 0; by parameter name for "fsdp", so any number of ranks resumes it."""
        if not self.by_name:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        options = _state_options(cpu_offload=True) if self.kind == "fsdp" else None
        return get_optimizer_state_dict(self.net, optimizer, options=options)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        if not self.by_name:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        options = _state_options() if self.kind == "fsdp" else None  # whole tensors, sharded on load
        set_optimizer_state_dict(self.net, optimizer, optim_state_dict=state, options=options)

    def close(self) -> None:
        """Unwrap; after FSDP2, the caller's model holds the trained weights, on its device, on every rank."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            full = get_model_state_dict(self.net, options=_state_options())  # every rank: whole tensors
            self.model.load_state_dict({k: v.cpu() for k, v in full.items()})
            del full
            self.model.to(self.device)
        self.module = self.net = None  # DDP's reducer removes its gradient hooks when it is freed

    def abandon(self) -> None:
        """After an error: no collective (another rank may be gone); the caller's model back on its device."""
        if self.kind == "fsdp" and self.net is not None:
            self.model.to(self.device)
        self.module = self.net = None


def sum_over_ranks(values: dict, device) -> dict[str, float]:
    """{name: number or 0-dim tensor} summed over ranks in one all-reduce → {name: float}."""
    names = sorted(values)
    vec = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in names])
    return dict(zip(names, dist.all_reduce_sum(vec).tolist()))
