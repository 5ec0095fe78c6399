"""Reference log-probs for DPO, computed once before training and cached beside the dataset.

    ref = compute_reference_logps(model, tokenizer, pairs, reference="adapter_off", cache_path=p)  # (N, 2)

One no-grad pass over the pairs with the model as it is before the first step: adapter switched off
(`models.reference_mode`) when the reference is the base model, or as-is (`reference="current"`) when the
run continues from the previous iteration's adapter, which is then the reference. No second model is
kept in memory and no reference forward happens during training. The result is stored in one file keyed
by (model, data): the model part is the caller's `key` or a fingerprint of the weights the reference
uses; the data part is a hash of the token ids. A second run, or a resumed one, finds the file and skips
the pass. Under a launcher each rank computes every W-th pair (longest first, so shares cost alike), the
shares are gathered on every rank, and rank 0 alone reads and writes the cache.
Simplification: one entry per file; a different key recomputes and replaces it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import torch

from .. import distributed as dist
from ..errors import UserError
from ..models import autocast_context, reference_mode, training_mode
from ..store import atomic_write_bytes
from .batching import collate, data_fingerprint, encode_records
from .logprobs import sequence_logprobs

REFERENCES = ("adapter_off", "current")


def model_fingerprint(model, reference: str = "current") -> str:
    """A hash of the weights the reference uses (adapter weights left out for "adapter_off").

    Per tensor: name, shape, dtype, its sum and a strided sample of at most 4096 values — one reduction
    per tensor, no copy of the model, and different for any two checkpoints met in practice.
    """
    h = hashlib.sha256(reference.encode())
    for name, t in model.state_dict().items():
        if reference == "adapter_off" and "lora_" in name:
            continue
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel() == 0:
            continue
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        h.update(sample.numpy().tobytes())
        h.update(repr(flat.sum().item()).encode())  # in the tensor's own dtype: no full-size copy
    return h.hexdigest()[:16]


def _reference_pass(model, examples, *, batch_size, pad_id, reference, autocast, progress):
    """(N, 2) fp32 [chosen, rejected] log-prob sums, longest pairs first to bound padding; this rank's share
    computed here, the others' gathered."""
    device = next(model.parameters()).device
    order = dist.shard(sorted(range(len(examples)), key=lambda i: -examples[i].length))
    out = torch.zeros(len(examples), 2)  # (N, 2)
    ctx = reference_mode(model) if reference == "adapter_off" else contextlib.nullcontext()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="reference log-probs", unit="pair")
    try:  # eval mode, no dropout: the reference is the deterministic policy
        with torch.no_grad(), training_mode(model, False), ctx, autocast_context(device, autocast):
            for lo in range(0, len(order), batch_size):
                idx = order[lo:lo + batch_size]
                batch = collate([examples[i] for i in idx], pad_id)
                sums, _ = sequence_logprobs(model, batch["input_ids"].to(device),
                                            batch["attention_mask"].to(device), batch["loss_mask"].to(device))
                out[idx] = sums.float().cpu().view(2, len(idx)).t()  # (2B,) → (B, 2)
                if bar is not None:
                    bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    if dist.active():
        for idx, logps in dist.gather((order, out[order])):  # (n_r,), (n_r, 2) per rank
            out[idx] = logps
    return out


def _read_cache(path: Path, key: str, n: int):
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: say which, do not guess
        raise UserError(f"{path}: not a reference log-prob cache ({type(e).__name__}); delete it") from None
    logps = stored.get("logps") if isinstance(stored, dict) else None
    if stored.get("key") != key or logps is None or tuple(logps.shape) != (n, 2):
        return None
    return logps


def reference_logps_for(model, examples, *, reference="adapter_off", cache_path=None, key=None,
                        batch_size=8, pad_id=0, autocast=True, progress=False):
    """Reference log-probs of encoded pairs → ((N, 2) tensor, whether it came from the cache)."""
    if reference not in REFERENCES:
        raise UserError(f"reference must be one of {', '.join(REFERENCES)}, not '{reference}'")
    full_key = f"{reference}|{key or model_fingerprint(model, reference)}|{data_fingerprint(examples)}"
    if cache_path is not None:
        cached = dist.main_first(_read_cache, Path(cache_path), full_key, len(examples))
        if cached is not None:
            return cached, True
    logps = _reference_pass(model, examples, batch_size=batch_size, pad_id=pad_id, reference=reference,
                            autocast=autocast, progress=progress)
    if cache_path is not None and dist.is_main():
        buf = io.BytesIO()
        torch.save({"key": full_key, "logps": logps}, buf)
        atomic_write_bytes(cache_path, buf.getvalue())
    return logps, False


def compute_reference_logps(model, tokenizer, records, *, max_length=1024, batch_size=8, reference="adapter_off",
                            cache_path=None, key=None, autocast=True, progress=False):
    """(N, 2) fp32 reference log-prob sums [chosen, rejected] of the pairs kept after tokenisation.

    `records` hold "prompt", "chosen", "rejected"; rows follow `encode_records` (pairs whose prompt
    alone exceeds `max_length` are left out). With `cache_path`, a matching cache is reused.
    """
    examples, _ = encode_records(tokenizer, records, "dpo_nll", max_length)
    logps, _ = reference_logps_for(model, examples, reference=reference, cache_path=cache_path, key=key,
                                   batch_size=batch_size, pad_id=tokenizer.pad_token_id, autocast=autocast,
                                   progress=progress)
    return logps
