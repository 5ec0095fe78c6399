"""From training records to padded tensors: tokenisation, length-grouped batch plans, collation.

    examples, stats = encode_records(tokenizer, records, "dpo_nll", max_length=1024)
    plan = plan_epoch([e.length for e in examples], step_size=16, micro_size=4, window=50, seed=0, epoch=0)
    batch = collate([examples[i] for i in plan[0][0]], pad_id=tokenizer.pad_token_id)

A sequence is the prompt's tokens (as the tokenizer gives them, special tokens included) followed by the
response's tokens and EOS; the loss covers the response and EOS only. Sequences longer than `max_length`
lose the end of their response; a record whose prompt leaves no room for a response token is dropped and
counted. A preference pair becomes two rows (chosen, rejected) sharing the prompt; a batch of B pairs is
one (2B, T) tensor, chosen rows first, so both go through one forward.

Batches are grouped by length: each window of `window` optimiser steps' worth of shuffled examples is
sorted by length and cut into step batches, whose order is then shuffled — little padding, still a random
order, all deterministic from (seed, epoch) so a resumed run rebuilds the same plan. Simplification:
prompt and response are tokenised separately (a BPE merge across the boundary is not formed), as TRL does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .errors import UserError

OBJECTIVES = ("sft", "rwnll", "dpo_nll")


@dataclass
class Example:
    rows: list[torch.Tensor]  # one (L,) int64 sequence per response: [response] or [chosen, rejected]
    prompt_len: int  # the loss starts at this position
    reward: float  # rwnll weight; 1 for sft and pairs

    @property
    def length(self) -> int:
        return max(len(r) for r in self.rows)

    def response_lengths(self) -> list[int]:
        return [len(r) - self.prompt_len for r in self.rows]


def _fields(objective: str) -> tuple[str, ...]:
    return ("chosen", "rejected") if objective == "dpo_nll" else ("response",)


def encode_records(tokenizer, records: list[dict], objective: str, max_length: int):
    """Tokenise `records` → (examples, stats); stats counts records, dropped ones, truncated sequences."""
    if objective not in OBJECTIVES:
        raise UserError(f"objective must be one of {', '.join(OBJECTIVES)}, not '{objective}'")
    fields = _fields(objective)
    for i, rec in enumerate(records):
        missing = [k for k in ("prompt", *fields) if not isinstance(rec.get(k), str)]
        if missing:
            raise UserError(f"training record {i} lacks text field(s) {', '.join(missing)} for '{objective}'")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; responses need one to end")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    prompts = tokenizer([r["prompt"] for r in records])["input_ids"]
    responses = {f: tokenizer([r[f] for r in records], add_special_tokens=False)["input_ids"] for f in fields}
    examples, dropped, truncated = [], 0, 0
    for i, rec in enumerate(records):
        prompt = prompts[i] or [start]  # an empty prompt still needs a position to predict the first token
        room = max_length - len(prompt)
        if room < 1:
            dropped += 1
            continue
        rows = []
        for f in fields:
            resp = responses[f][i] + [eos]
            truncated += len(resp) > room
            rows.append(torch.tensor(prompt + resp[:room], dtype=torch.long))  # (L,)
        reward = float(rec.get("reward", 1.0)) if objective == "rwnll" else 1.0
        examples.append(Example(rows, len(prompt), reward))
    stats = {"records": len(records), "examples": len(examples), "dropped_too_long": dropped,
             "truncated": truncated}
    return examples, stats


def data_fingerprint(examples: list[Example]) -> str:
    """A hash of the token ids, prompt lengths and rewards: what the reference log-probs depend on."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.prompt_len},{e.reward!r},{len(e.rows)};".encode())
        for r in e.rows:
            h.update(r.numpy().tobytes())
    return h.hexdigest()[:16]


def plan_epoch(lengths: list[int], *, step_size: int, micro_size: int, window: int, seed: int, epoch: int):
    """A list of optimiser steps, each a list of micro-batches of example indices; covers each index once."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    span = step_size * max(window, 1)
    steps = []
    for lo in range(0, len(order), span):
        chunk = sorted(order[lo:lo + span], key=lambda i: -lengths[i])  # stable: ties keep shuffled order
        steps += [chunk[j:j + step_size] for j in range(0, len(chunk), step_size)]
    steps = [steps[k] for k in torch.randperm(len(steps), generator=gen).tolist()]
    return [[s[j:j + micro_size] for j in range(0, len(s), micro_size)] for s in steps]


def collate(examples: list[Example], pad_id: int) -> dict:
    """Pad a micro-batch to its longest row; rows are [all first responses, then all second responses]."""
    rows = [e.rows[k] for k in range(len(examples[0].rows)) for e in examples]
    starts = [e.prompt_len for e in examples] * len(examples[0].rows)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (R, T), R = B or 2B
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (R, T): response tokens and EOS
    for i, (row, p) in enumerate(zip(rows, starts)):
        input_ids[i, :len(row)] = row
        attention_mask[i, :len(row)] = 1
        loss_mask[i, p:len(row)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "lengths": torch.tensor([len(r) - p for r, p in zip(rows, starts)]),  # (R,)
        "rewards": torch.tensor([e.reward for e in examples]),  # (B,)
    }
