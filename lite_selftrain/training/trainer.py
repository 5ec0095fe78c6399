"""The M-step trainer: SFT, reward-weighted NLL (ReST-EM) and DPO + NLL (Iterative RPO), resumable.

    summary = train(model, tokenizer, records, TrainConfig(objective="dpo_nll"), out_dir)

`records` are {"prompt", "response", "reward"?} for sft/rwnll and {"prompt", "chosen", "rejected"} for
dpo_nll. The model is trained in place: a peft model (LoRA, QLoRA) or a full one. Sequence log-probs come
from `logprobs.sequence_logprobs`, the fused kernel: no logits are formed. For DPO, reference log-probs
are computed once before the first step (`reference.py`) and cached; chosen and rejected rows of a pair
share one forward. Batches are grouped by length (`batching.py`).

Every `checkpoint_every` steps the trainable weights (all weights of a full model), optimiser, scheduler,
RNG states and data position go to `out_dir/checkpoint.pt`, written atomically. Calling `train` again with
the same `out_dir` resumes there and ends with the same weights, bit for bit, as a run never stopped;
once finished it loads the final weights into `model` and returns the stored summary without training.
A fresh run seeds torch and `random` from `cfg.seed` (dropout, if kept, draws from them).
Metrics go to `out_dir/metrics.jsonl` every `log_every` steps.

Which model starts an iteration is the recipe's choice: ReST-EM passes a fresh adapter on the base model
(reference "adapter_off"); Iterative RPO and self-rewarding pass the previous iteration's adapter and set
`reference="current"`, so that adapter, before any step, is the reference.

Under a launcher (`torchrun --nproc_per_node W`, `accelerate launch`) the same call trains on W ranks with
torch's engines (`parallel.py`): DDP, or FSDP2 for a full model. A step is still batch_size × grad_accum
examples of the same plan; each rank takes every W-th, in micro-batches of batch_size; the loss keeps the
step's whole token and pair totals and is scaled by W against the engines' averaging, so the gradient is
the one-process sum. Rank 0 alone writes the run directory; every rank resumes from its checkpoint.

Simplifications: a step that meets a NaN/inf loss or gradient still consumes its data (it
counts towards `max_steps`), but moves neither the optimiser nor the schedule.
"""

from __future__ import annotations

import io
import math
import random
import resource
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from .. import distributed as dist
from ..config import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, check_fields
from ..errors import UserError
from ..models import autocast_context, is_peft, training_mode
from ..store import JsonlLog, atomic_write_bytes, atomic_write_json, sweep_temporaries, write_jsonl
from .batching import OBJECTIVES, collate, data_fingerprint, encode_records, plan_epoch
from .losses import NLL_NORMS, dpo_nll_loss, reward_weighted_nll
from .parallel import Engine, sum_over_ranks
from .reference import REFERENCES, reference_logps_for

PAIR_METRICS = ("reward_chosen", "reward_rejected", "reward_acc", "margin", "logp_chosen", "logp_rejected")


@dataclass
class TrainConfig:
    objective: str = "sft"  # "sft", "rwnll" (ReST-EM) or "dpo_nll" (Iterative RPO; alpha=0 is plain DPO)
    lr: PositiveFloat = 1e-4  # QLoRA's rate for LoRA on 7B+ models; full fine-tuning wants ~1e-5 or less
    epochs: PositiveInt = 1  # one pass: the next iteration brings fresh self-generated data anyway
    max_steps: PositiveInt | None = None  # None: epochs × steps per epoch; counts optimiser steps
    batch_size: PositiveInt = 4  # examples (pairs for DPO) per forward; a pair is two rows
    grad_accum: PositiveInt = 4  # 4 × 4 = QLoRA's effective batch of 16
    warmup_ratio: Fraction = 0.03  # QLoRA's warm-up share
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine decay to 0 after warm-up; "constant" keeps the peak
    weight_decay: NonNegativeFloat = 0.0  # QLoRA's value; applied to matrices only, never to norms or biases
    max_grad_norm: NonNegativeFloat = 1.0  # clips only rare spikes (HF Trainer's default); 0 disables clipping
    beta: PositiveFloat = 0.1  # Iterative RPO / Self-Rewarding DPO strength
    alpha: NonNegativeFloat = 1.0  # Iterative RPO NLL weight; 0 gives plain DPO
    nll_norm: str = "sequence"  # RPO paper: per-sequence length-normalised; "token" is TRL/Liger's form
    max_length: PositiveInt = 1024  # prompt + response tokens; covers GSM8K/MATH chain-of-thought solutions
    reference: str = "adapter_off"  # DPO reference: base without adapter, or "current" (previous adapter)
    reference_batch_size: PositiveInt | None = None  # None: 2 × batch_size — no activations are kept without grad
    group_window: PositiveInt = 50  # step batches sorted together by length: little padding, order still random
    checkpoint_every: PositiveInt = 100  # steps between checkpoints: bounds lost work, costs little I/O
    log_every: PositiveInt = 10  # steps per metrics line; each line is one fsynced append
    seed: int = 0  # data order and dropout
    nan_patience: PositiveInt = 5  # consecutive NaN/inf steps tolerated; isolated ones are skipped and counted
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit"] = "auto"  # auto: paged AdamW 8-bit on CUDA, AdamW on CPU
    autocast: bool = True  # bf16 autocast on CUDA (no loss scaling needed); CPU always computes in fp32
    disable_dropout: bool = True  # policy and cached reference must agree at step 0 (TRL does the same)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under a launcher; "fsdp" shards a full model's training state W ways

    def __post_init__(self):
        check_fields(self)
        for name, value, allowed in (("objective", self.objective, OBJECTIVES),
                                     ("nll_norm", self.nll_norm, NLL_NORMS),
                                     ("reference", self.reference, REFERENCES)):
            if value not in allowed:
                raise UserError(f"train.{name} must be one of {', '.join(allowed)}, not '{value}'")


# ----------------------------------------------------------------------------------------------------
# optimiser, schedule, dropout


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps to the peak, then cosine decay to 0 at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(params: list, cfg: TrainConfig, device: torch.device):
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kind = cfg.optimizer
    if kind == "auto":
        kind = "paged_adamw_8bit" if device.type == "cuda" else "adamw"
    if kind == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.lr)  # 2 bytes of state per parameter, paged to host
    fused = all(p.is_floating_point() for p in params) and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)  # one fused kernel: ~3x faster per tiny step


def _disable_dropout(model) -> list:
    """Set every dropout to p=0; returns (module, old p) to restore."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    return saved


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# checkpoints


def _weights(model) -> dict:
    """Trainable parameters of a peft model, the whole state of a full one."""
    if is_peft(model):
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def _load_weights(model, weights: dict) -> None:
    if not is_peft(model):
        model.load_state_dict(weights)
        return
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise UserError(f"checkpoint does not fit this model (e.g. no parameter {missing[0]})")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _trim_metrics(log: JsonlLog, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: those steps run again."""
    records = log.recover()
    keep = [r for r in records if r.get("step", 0) <= last_step]
    if len(keep) != len(records):
        write_jsonl(log.path, keep)


# ----------------------------------------------------------------------------------------------------
# one optimiser step


def _step_loss(engine, examples, step_micro, ref, cfg, pad_id, device):
    """Forward + backward over this rank's share of one step → (loss parts, tokens) of that share; the loss is
    normalised by the whole step's totals, so the parts summed over ranks are the step's."""
    flat = [i for mb in step_micro for i in mb]
    if cfg.objective == "dpo_nll":
        num_pairs = len(flat)
        num_tokens = sum(examples[i].response_lengths()[0] for i in flat)
    else:
        num_tokens = sum(examples[i].response_lengths()[0] for i in flat if examples[i].reward != 0)
    W = dist.world()
    mine = flat[dist.rank()::W]  # every W-th: the step is sorted by length, so shares are alike
    micro = [mine[j:j + cfg.batch_size] for j in range(0, len(mine), cfg.batch_size)]
    n = math.ceil(math.ceil(len(flat) / W) / cfg.batch_size)  # the most any rank runs: all join every one
    micro += [None] * (n - len(micro))  # a rank short of examples runs zero-weighted ones
    totals: dict[str, torch.Tensor] = {}
    tokens = 0
    for j, mb in enumerate(micro):
        keep, mb = (1.0, mb) if mb is not None else (0.0, flat[:1])
        batch = collate([examples[i] for i in mb], pad_id)
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (R, T)
        with autocast_context(device, cfg.autocast):
            sums, _ = engine(ids, attn, batch["loss_mask"].to(device), sync=j == n - 1)  # (R,)
        lengths = batch["lengths"].to(device)  # (R,)
        if cfg.objective == "dpo_nll":
            B = len(mb)
            ref_mb = ref[mb].to(device)  # (B, 2)
            loss, parts = dpo_nll_loss(sums[:B], sums[B:], ref_mb[:, 0], ref_mb[:, 1], lengths[:B],
                                       beta=cfg.beta, alpha=cfg.alpha, nll_norm=cfg.nll_norm,
                                       num_pairs=num_pairs, num_tokens=num_tokens)
            share = B / num_pairs  # pair metrics are batch means: weight them into step means
            parts = {k: v * share if k in PAIR_METRICS else v for k, v in parts.items()}
        else:
            loss = reward_weighted_nll(sums, lengths, batch["rewards"].to(device), num_tokens=num_tokens)
            parts = {"nll": loss.detach()}
        (loss * (keep * W)).backward()  # × W: the engines average gradients over ranks, the step sums them
        parts["loss"] = loss.detach()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v * keep
        tokens += int(batch["attention_mask"].sum()) if keep else 0  # the CPU copy: no device sync
    return totals, tokens


# ----------------------------------------------------------------------------------------------------
# the trainer


def train(model, tokenizer, records: list[dict], cfg: TrainConfig, out_dir: str | Path, *,
          reference_key: str | None = None, reference_cache: str | Path | None = None,
          progress: bool = False) -> dict:
    """Train `model` in place on `records`; resumable from `out_dir`; returns the run's summary.

    `reference_key` names the DPO reference model for the log-prob cache (else the weights are
    fingerprinted); `reference_cache` is the cache file (default `out_dir/reference_logps.pt`; put it
    beside the dataset to share it between runs). Under a launcher, every rank calls it alike.
    """
    out_dir = Path(out_dir)
    main = dist.is_main()
    if main:
        sweep_temporaries(out_dir)  # a checkpoint write a kill cut short
    dist.barrier()
    ckpt_path = out_dir / "checkpoint.pt"
    examples, data_stats = encode_records(tokenizer, records, cfg.objective, cfg.max_length)
    if not examples:
        raise UserError(f"no training example fits max_length={cfg.max_length} ({len(records)} records)")
    if cfg.parallel == "fsdp" and is_peft(model):
        raise UserError("train.parallel fsdp is for full fine-tuning (model.mode full); adapters train with ddp")
    run_id = {"config": asdict(cfg), "data": data_fingerprint(examples)}
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.exists() else None
    if ckpt is not None and ckpt["run"] != run_id:
        raise UserError(f"{out_dir} holds a training run with another config or data; use another directory "
                        "or delete it")
    if ckpt is not None and ckpt["done"]:
        _load_weights(model, ckpt["weights"])
        if main:
            atomic_write_json(out_dir / "summary.json", ckpt["summary"])
        dist.barrier()
        return ckpt["summary"]

    device = next(model.parameters()).device
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("the model has no trainable parameters")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref, ref_source = None, None
    if cfg.objective == "dpo_nll":  # before any checkpoint is loaded: the model is still the reference
        ref, cached = reference_logps_for(
            model, examples, reference=cfg.reference, key=reference_key,
            cache_path=reference_cache or out_dir / "reference_logps.pt",
            batch_size=cfg.reference_batch_size or 2 * cfg.batch_size, pad_id=pad_id, autocast=cfg.autocast,
            progress=progress and main)
        ref_source = "cache" if cached else "computed"
    if ckpt is not None:
        _load_weights(model, ckpt["weights"])  # before the engine: FSDP2 shards a copy of the model
    dropouts = _disable_dropout(model) if cfg.disable_dropout else []
    engine = Engine.wrap(model, cfg.parallel)

    step_size = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(examples) / step_size)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(engine.params(), cfg, device)
    schedule = partial(lr_factor, warmup=math.ceil(cfg.warmup_ratio * total), total=total,
                       schedule=cfg.lr_schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    counters = {"step": 0, "skipped": 0, "bad_streak": 0, "tokens": 0, "elapsed_s": 0.0}
    log = JsonlLog(out_dir / "metrics.jsonl")
    if ckpt is not None:
        engine.load_optimizer_state(optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rngs = ckpt["rng"]  # per rank; another number of ranks continues from rank 0's
        _set_rng_state(rngs[dist.rank()] if len(rngs) == dist.world() else rngs[0])
        counters = ckpt["counters"]
    else:
        torch.manual_seed(cfg.seed + dist.rank())  # dropout, if kept, masks each rank's examples differently
        random.seed(cfg.seed + dist.rank())
    if main:
        _trim_metrics(log, counters["step"])
    resumed_from = counters["step"]

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=counters["step"], desc=f"train {cfg.objective}", unit="step")
    plans: dict[int, list] = {}
    window: dict[str, float] = {}
    w_steps = w_tokens = 0
    w_time = 0.0
    last: dict = {}

    def flush(step: int) -> None:
        nonlocal window, w_steps, w_tokens, w_time, last
        good = max(w_steps, 1)
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4)}
        rec.update({k: v / good for k, v in window.items()})
        rec.update(lr=scheduler.get_last_lr()[0], tokens_per_s=w_tokens / max(w_time, 1e-9),
                   tokens=counters["tokens"], elapsed_s=counters["elapsed_s"], skipped_steps=counters["skipped"],
                   peak_mem_mb=_peak_memory_mb(device))
        if main:
            log.append([rec])
        if bar is not None:
            bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}")
        last, window, w_steps, w_tokens, w_time = rec, {}, 0, 0, 0.0

    try:
        with training_mode(engine.net, True):
            for step in range(counters["step"], total):
                t0 = time.perf_counter()
                epoch, k = divmod(step, steps_per_epoch)
                if epoch not in plans:
                    plans = {epoch: plan_epoch([e.length for e in examples], step_size=step_size,
                                               micro_size=cfg.batch_size, window=cfg.group_window, seed=cfg.seed,
                                               epoch=epoch)}
                parts, tokens = _step_loss(engine, examples, plans[epoch][k], ref, cfg, pad_id, device)
                norm = engine.clip(cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)  # same on every rank
                parts = sum_over_ranks({**parts, "tokens": tokens}, device)  # the whole step's
                tokens = int(parts.pop("tokens"))
                if math.isfinite(norm) and math.isfinite(parts["loss"]):
                    optimizer.step()
                    scheduler.step()
                    counters["bad_streak"] = 0
                    parts["grad_norm"] = norm
                    for name, v in parts.items():
                        window[name] = window.get(name, 0.0) + v
                    w_steps += 1
                else:
                    counters["skipped"] += 1
                    counters["bad_streak"] += 1
                    if counters["bad_streak"] >= cfg.nan_patience:
                        raise UserError(f"training diverged: {counters['bad_streak']} steps in a row with a NaN/inf "
                                        f"loss or gradient (at step {step + 1}); lower train.lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                counters.update(step=step + 1, tokens=counters["tokens"] + tokens,
                                elapsed_s=counters["elapsed_s"] + dt)
                w_tokens, w_time = w_tokens + tokens, w_time + dt
                if bar is not None:
                    bar.update(1)
                at_checkpoint = (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total
                if (step + 1) % cfg.log_every == 0 or at_checkpoint or step + 1 == total:
                    flush(step + 1)
                if at_checkpoint:  # gathered on every rank (FSDP2 holds shards), written by rank 0
                    payload = {"run": run_id, "done": False, "weights": engine.full_weights(_weights),
                               "optimizer": engine.optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
                               "rng": dist.gather(_rng_state()), "counters": counters}  # rng: one per rank
                    if main:
                        _save_checkpoint(ckpt_path, payload)
        engine.close()  # FSDP2: the trained weights back into `model`, on every rank
    finally:
        engine.abandon()  # after an error (else nothing left to do): no collective, the model back on its device
        for m, p in dropouts:
            m.p = p
        if bar is not None:
            bar.close()

    summary = {
        "objective": cfg.objective, "steps": total, "optimizer_steps": total - counters["skipped"],
        "skipped_steps": counters["skipped"], "epochs": round(total / steps_per_epoch, 4),
        **data_stats, "tokens": counters["tokens"], "train_time_s": round(counters["elapsed_s"], 3),
        "tokens_per_s": counters["tokens"] / max(counters["elapsed_s"], 1e-9),
        "peak_mem_mb": _peak_memory_mb(device), "optimizer": type(optimizer).__name__, "reference": ref_source,
        "resumed_from_step": resumed_from,
        "final": {k: v for k, v in last.items() if k in ("loss", "dpo", "nll", "grad_norm", *PAIR_METRICS)},
    }
    if main:
        _save_checkpoint(ckpt_path, {"run": run_id, "done": True, "weights": _weights(model), "summary": summary})
        atomic_write_json(out_dir / "summary.json", summary)
    return dist.broadcast(summary)  # rank 0's, once its files are written
