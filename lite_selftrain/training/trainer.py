"""The M-step trainer: SFT, reward-weighted NLL (ReST-EM) and DPO + NLL (Iterative RPO), resumable.

    summary = train(model, tokenizer, records, TrainConfig(objective="dpo_nll"), out_dir)

`records` are {"prompt", "response", "reward"?} for sft/rwnll and {"prompt", "chosen", "rejected"} for
dpo_nll; the model (a peft model or a full one) is trained in place. Calling `train` again with the same
`out_dir` resumes from its checkpoint (`checkpoint.py`) and ends with the same weights, bit for bit, as a
run never stopped. Under a launcher every rank calls it alike (`parallel.py`). How a step is built, what
is logged, and what it simplifies: docs/training.md.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from .. import distributed as dist
from ..config import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, check_fields
from ..errors import UserError
from ..models import autocast_context, is_peft, training_mode
from ..store import JsonlLog, atomic_write_json, sweep_temporaries
from . import checkpoint
from .batching import OBJECTIVES, collate, data_fingerprint, encode_records, plan_epoch
from .losses import NLL_NORMS, dpo_nll_loss, reward_weighted_nll
from .parallel import ParallelModel, sum_over_ranks
from .progress import Counters, MetricsWindow, peak_memory_mb
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
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)  # one fused kernel instead of a loop over tensors


def _disable_dropout(model) -> list:
    """Set every dropout to p=0; returns (module, old p) to restore."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    return saved


# ----------------------------------------------------------------------------------------------------
# the loop


@dataclass
class _Loop:
    """What every step shares: the model, its optimiser and schedule, the data, and where the run writes."""

    cfg: TrainConfig
    wrapped: ParallelModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    examples: list  # encoded records (batching.Example)
    ref: torch.Tensor | None  # (N, 2) DPO reference log-probs of each pair's chosen and rejected; None otherwise
    pad_id: int
    device: torch.device
    steps_per_epoch: int
    total: int  # steps of the whole run
    out_dir: Path
    run_id: dict  # config and data fingerprint, checked on resume
    counters: Counters
    window: MetricsWindow = field(default_factory=MetricsWindow)
    last: dict = field(default_factory=dict)  # the latest metrics line

    def run(self, progress: bool) -> None:
        """Every step from `counters.step` to `total`: metrics lines, checkpoints, the progress bar."""
        cfg, plans, bar = self.cfg, {}, None
        log = JsonlLog(self.out_dir / "metrics.jsonl")
        if progress and dist.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total, initial=self.counters.step, desc=f"train {cfg.objective}", unit="step")
        try:
            with training_mode(self.wrapped.net, True):
                for step in range(self.counters.step, self.total):
                    t0 = time.perf_counter()
                    epoch, k = divmod(step, self.steps_per_epoch)
                    if epoch not in plans:
                        plans = {epoch: self.plan(epoch)}
                    self.step(step, plans[epoch][k], t0)
                    if bar is not None:
                        bar.update(1)
                    at_checkpoint = (step + 1) % cfg.checkpoint_every == 0 and step + 1 < self.total
                    if (step + 1) % cfg.log_every == 0 or at_checkpoint or step + 1 == self.total:
                        self.log_line(log, step + 1, bar)
                    if at_checkpoint:
                        checkpoint.save_progress(self.out_dir, self.run_id, self.wrapped, self.optimizer,
                                                 self.scheduler, self.counters)
        finally:
            if bar is not None:
                bar.close()

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's steps, each a list of micro-batches of example indices: a function of (seed, epoch)."""
        cfg = self.cfg
        return plan_epoch([e.length for e in self.examples], step_size=cfg.batch_size * cfg.grad_accum,
                          micro_size=cfg.batch_size, window=cfg.group_window, seed=cfg.seed, epoch=epoch)

    def step(self, step: int, step_micro: list[list[int]], t0: float) -> None:
        """One optimiser step over `step_micro` (micro-batches of example indices); NaN/inf steps are skipped."""
        cfg, counters = self.cfg, self.counters
        parts, tokens = self.forward_backward(step_micro)
        norm = self.wrapped.clip(cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)  # same on every rank
        parts = sum_over_ranks({**parts, "tokens": tokens}, self.device)  # the whole step's
        tokens = int(parts.pop("tokens"))
        good = math.isfinite(norm) and math.isfinite(parts["loss"])
        if good:
            self.optimizer.step()
            self.scheduler.step()
            counters.bad_streak = 0
            parts["grad_norm"] = norm
        else:
            counters.skipped += 1
            counters.bad_streak += 1
            if counters.bad_streak >= cfg.nan_patience:
                raise UserError(f"training diverged: {counters.bad_streak} steps in a row with a NaN/inf "
                                f"loss or gradient (at step {step + 1}); lower train.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        counters.step, counters.tokens, counters.elapsed_s = step + 1, counters.tokens + tokens, counters.elapsed_s + dt
        self.window.add(parts if good else None, tokens, dt)

    def forward_backward(self, step_micro: list[list[int]]) -> tuple[dict, int]:
        """Forward + backward over this rank's share of one step → (loss parts, tokens) of that share; the loss
        is normalised by the whole step's totals, so the parts summed over ranks are the step's."""
        cfg, examples, device = self.cfg, self.examples, self.device
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
            batch = collate([examples[i] for i in mb], self.pad_id)
            ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)  # (R, T)
            with autocast_context(device, cfg.autocast):
                sums, _ = self.wrapped(ids, attn, batch["loss_mask"].to(device), sync=j == n - 1)  # (R,)
            lengths = batch["lengths"].to(device)  # (R,)
            if cfg.objective == "dpo_nll":
                B = len(mb)
                ref_mb = self.ref[mb].to(device)  # (B, 2)
                loss, parts = dpo_nll_loss(sums[:B], sums[B:], ref_mb[:, 0], ref_mb[:, 1], lengths[:B],
                                           beta=cfg.beta, alpha=cfg.alpha, nll_norm=cfg.nll_norm,
                                           num_pairs=num_pairs, num_tokens=num_tokens)
                share = B / num_pairs  # pair metrics are batch means: weight them into step means
                parts = {k: v * share if k in PAIR_METRICS else v for k, v in parts.items()}
            else:
                loss = reward_weighted_nll(sums, lengths, batch["rewards"].to(device), num_tokens=num_tokens)
                parts = {"nll": loss.detach()}
            (loss * (keep * W)).backward()  # × W: DDP and FSDP2 average gradients over ranks, the step sums them
            parts["loss"] = loss.detach()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v * keep
            tokens += int(batch["attention_mask"].sum()) if keep else 0  # the CPU copy: no device sync
        return totals, tokens

    def log_line(self, log: JsonlLog, step: int, bar) -> None:
        """The metrics line at `step`, appended by rank 0; the window starts again."""
        self.last = self.window.line(step, self.steps_per_epoch, self.scheduler.get_last_lr()[0], self.counters,
                                     self.device)
        self.window = MetricsWindow()
        if dist.is_main():
            log.append([self.last])
        if bar is not None:
            bar.set_postfix(loss=f"{self.last.get('loss', float('nan')):.4f}")

    def summary(self, data_stats: dict, ref_source: str | None, resumed_from: int) -> dict:
        """The finished run: its totals, the data's counts and the last line's losses."""
        c = self.counters
        return {
            "objective": self.cfg.objective, "steps": self.total, "optimizer_steps": self.total - c.skipped,
            "skipped_steps": c.skipped, "epochs": round(self.total / self.steps_per_epoch, 4),
            **data_stats, "tokens": c.tokens, "train_time_s": round(c.elapsed_s, 3),
            "tokens_per_s": c.tokens / max(c.elapsed_s, 1e-9),
            "peak_mem_mb": peak_memory_mb(self.device), "optimizer": type(self.optimizer).__name__,
            "reference": ref_source, "resumed_from_step": resumed_from,
            "final": {k: v for k, v in self.last.items() if k in ("loss", "dpo", "nll", "grad_norm", *PAIR_METRICS)},
        }


# ----------------------------------------------------------------------------------------------------
# the trainer: set-up, the loop, the summary


def _encode(model, tokenizer, records: list[dict], cfg: TrainConfig) -> tuple[list, dict]:
    """The records as training examples, and their counts; errors for what cannot train at all."""
    examples, data_stats = encode_records(tokenizer, records, cfg.objective, cfg.max_length)
    if not examples:
        raise UserError(f"no training example fits max_length={cfg.max_length} ({len(records)} records)")
    if cfg.parallel == "fsdp" and is_peft(model):
        raise UserError("train.parallel fsdp is for full fine-tuning (model.mode full); adapters train with ddp")
    return examples, data_stats


def _finished(model, saved: dict, out_dir: Path) -> dict:
    """A run found finished: its weights into `model`, its summary back."""
    checkpoint.load_weights(model, saved["weights"])
    if dist.is_main():
        atomic_write_json(out_dir / "summary.json", saved["summary"])
    dist.barrier()
    return saved["summary"]


def _reference_logps(model, examples: list, cfg: TrainConfig, pad_id: int, cache_path: str | Path, key: str | None,
                     progress: bool) -> tuple[torch.Tensor | None, str | None]:
    """DPO's (N, 2) reference log-probs and where they came from ("cache" or "computed"); None for other objectives."""
    if cfg.objective != "dpo_nll":
        return None, None
    ref, cached = reference_logps_for(model, examples, reference=cfg.reference, key=key, cache_path=cache_path,
                                      batch_size=cfg.reference_batch_size or 2 * cfg.batch_size, pad_id=pad_id,
                                      autocast=cfg.autocast, progress=progress)
    return ref, "cache" if cached else "computed"


def _start(wrapped: ParallelModel, saved: dict | None, cfg: TrainConfig, total: int, device) -> tuple:
    """(optimiser, scheduler, counters): fresh, seeding torch and `random`, or as `saved` left them."""
    optimizer = build_optimizer(wrapped.params(), cfg, device)
    schedule = partial(lr_factor, warmup=math.ceil(cfg.warmup_ratio * total), total=total,
                       schedule=cfg.lr_schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if saved is not None:
        return optimizer, scheduler, checkpoint.resume(saved, wrapped, optimizer, scheduler)
    torch.manual_seed(cfg.seed + dist.rank())  # dropout, if kept, masks each rank's examples differently
    random.seed(cfg.seed + dist.rank())
    return optimizer, scheduler, Counters()


def train(model, tokenizer, records: list[dict], cfg: TrainConfig, out_dir: str | Path, *,
          reference_key: str | None = None, reference_cache: str | Path | None = None,
          progress: bool = False) -> dict:
    """Train `model` in place on `records`; resumable from `out_dir`; returns the run's summary.

    `reference_key` names the DPO reference model for the log-prob cache (else the weights are
    fingerprinted); `reference_cache` is the cache file (default `out_dir/reference_logps.pt`; put it
    beside the dataset to share it between runs). Under a launcher, every rank calls it alike.
    """
    out_dir, main = Path(out_dir), dist.is_main()
    if main:
        sweep_temporaries(out_dir)  # a checkpoint write a kill cut short
    dist.barrier()
    examples, data_stats = _encode(model, tokenizer, records, cfg)
    run_id = {"config": asdict(cfg), "data": data_fingerprint(examples)}
    saved = checkpoint.load(out_dir, run_id)
    if saved is not None and saved["done"]:
        return _finished(model, saved, out_dir)

    device = next(model.parameters()).device
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("the model has no trainable parameters")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # before any checkpoint is loaded: the model is still the reference
    ref, ref_source = _reference_logps(model, examples, cfg, pad_id, reference_cache or out_dir / "reference_logps.pt",
                                       reference_key, progress and main)
    if saved is not None:
        checkpoint.load_weights(model, saved["weights"])  # before wrapping: FSDP2 shards a copy of the model
    dropouts = _disable_dropout(model) if cfg.disable_dropout else []
    wrapped = ParallelModel.wrap(model, cfg.parallel)
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer, scheduler, counters = _start(wrapped, saved, cfg, total, device)
    if main:
        checkpoint.trim_metrics(JsonlLog(out_dir / "metrics.jsonl"), counters.step)
    resumed_from = counters.step
    loop = _Loop(cfg, wrapped, optimizer, scheduler, examples, ref, pad_id, device, steps_per_epoch, total, out_dir,
                 run_id, counters)
    try:
        loop.run(progress)
        wrapped.close()  # FSDP2: the trained weights back into `model`, on every rank
    finally:
        wrapped.abandon()  # after an error (else nothing left to do): no collective, the model back on its device
        for m, p in dropouts:
            m.p = p

    summary = loop.summary(data_stats, ref_source, resumed_from)
    if main:
        checkpoint.save_done(out_dir, run_id, model, summary)
        atomic_write_json(out_dir / "summary.json", summary)
    return dist.broadcast(summary)  # rank 0's, once its files are written
