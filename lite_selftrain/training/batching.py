"""From training records to padded tensors: tokenisation, length-grouped batch plans, collation.

    examples, stats = encode_records(tokenizer, records, "dpo_nll", max_length=1024)
    plan = plan_epoch([e.length for e in examples], step_size=16, micro_size=4, window=50, seed=0, epoch=0)
    batch = collate([examples[i] for i in plan[0][0]], pad_id=tokenizer.pad_token_id)

A sequence is the prompt's tokens (as the tokenizer gives them, special tokens included, one BOS) followed
by the response's tokens and EOS; the loss covers the response and EOS only. The response is tokenised
together with its prompt (what the model saw when it wrote it), or taken as the sampled ids themselves
when the record carries them (`response_ids`, `chosen_ids`, `rejected_ids`). Sequences longer than `max_length`
lose the end of their response; a record whose prompt leaves no room for a response token is dropped and
counted. A preference pair becomes two rows (chosen, rejected) sharing the prompt; a batch of B pairs is
one (2B, T) tensor, chosen rows first, so both go through one forward.

Batches are grouped by length: each window of `window` optimiser steps' worth of shuffled examples is
sorted by length and cut into step batches, whose order is then shuffled — little padding, still a random
order, all deterministic from (seed, epoch) so a resumed run rebuilds the same plan. Simplification: a
pair whose two rows split their prompt differently (a piece across the boundary) is dropped and counted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models.tokenizer import decode_continuation, encode

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


def _response_tokens(tokenizer, prompt: str, prompt_ids: list[int], text: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of prompt + text tokenised TOGETHER, split where the prompt ends.

    Tokenised apart, a SentencePiece tokenizer would put its dummy prefix `▁` before the response, and the
    trained tokens would not be the ones the model produced after the prompt. When the prompt's own ids are
    not a prefix of the whole (a piece across the boundary), the tokens lying wholly inside the prompt are
    the prompt.
    """
    if not prompt_ids:  # an empty prompt: the response after the start token
        return prompt_ids, tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = whole["input_ids"], whole["offset_mapping"]
    if len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_token_id:  # one BOS, as `encode` gives
        ids, offsets = ids[1:], offsets[1:]
    if ids[: len(prompt_ids)] == prompt_ids:
        cut = len(prompt_ids)
    else:
        cut = next((k for k, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    return ids[:cut], ids[cut:]


def encode_records(tokenizer, records: list[dict], objective: str, max_length: int):
    """Tokenise `records` → (examples, stats); stats counts records, dropped ones, truncated sequences.

    A response with `<field>_ids` (e.g. `response_ids`: the ids the sampler produced, ending in EOS) is
    trained on exactly those ids after the prompt's; others are tokenised together with their prompt.
    """
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
    prompts = encode(tokenizer, [r["prompt"] for r in records])
    examples, dropped, truncated = [], 0, 0
    for i, rec in enumerate(records):
        rows, prompt = [], prompts[i]
        for f in fields:
            given = rec.get(f"{f}_ids")
            if given is not None:
                if not given or given[-1] != eos or decode_continuation(tokenizer, given[:-1]) != rec[f]:
                    raise UserError(f"training record {i}: {f}_ids must be the ids of its {f} followed by EOS")
                resp = list(given)
            else:
                prompt, resp = _response_tokens(tokenizer, rec["prompt"], prompts[i], rec[f])
                resp = resp + [eos]
            rows.append((prompt or [start], resp))  # an empty prompt still needs a position to predict from
        prompt_len = max(len(p) for p, _ in rows)  # a pair's rows share their prompt
        room = max_length - prompt_len
        if room < 1 or any(len(p) != prompt_len for p, _ in rows):
            dropped += 1
            continue
        truncated += sum(len(r) > room for _, r in rows)
        tensors = [torch.tensor(p + r[:room], dtype=torch.long) for p, r in rows]  # (L,)
        reward = float(rec.get("reward", 1.0)) if objective == "rwnll" else 1.0
        examples.append(Example(tensors, prompt_len, reward))
    stats = {"records": len(records), "examples": len(examples), "dropped_too_long": dropped,
             "truncated": truncated}
    return examples, stats


def sampled_ids(field: str, sample: dict) -> dict:
    """{"<field>_ids": the sampler's token ids} for a sample that ended with EOS, else {}: a record trains on
    the very tokens the model produced (a stop-string or unfinished sample has no EOS of its own)."""
    ids = sample.get("token_ids")
    return {f"{field}_ids": ids} if sample.get("finish_reason") == "eos" and ids else {}


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
