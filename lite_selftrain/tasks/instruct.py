"""`instruct`: open-ended instructions and responses, rewarded by the LLM judge (`lite_selftrain.judge`).

Loads single-turn (prompt, response) pairs from the common public layouts and returns them as
{"prompt", "response", ...the original fields}:

- `prompt` / `response` records;
- Alpaca / Dolly style: `instruction` (+ `input` or `context`) and `output` or `response`;
- chat records: `messages` or `conversations`, a list of {role|from, content|value} turns (the first
  user turn and the assistant turn after it), as in the llm-jp instruction sets;
- OpenAssistant's flat message table (`message_id`, `parent_id`, `role`, `text`, optional `rank`):
  each first-turn prompt with its best-ranked assistant reply.

There is no automatic reward: `needs_judge` tells recipes to score completions with the judge.

Usage:
    task = InstructTask()
    pairs = task.load("train", path="oasst1_train.jsonl")

Simplifications: multi-turn conversations keep only their first exchange; prompts are zero-shot.
"""

from __future__ import annotations

from ..errors import UserError
from .base import Task

_USER = {"user", "human", "prompter"}
_ASSISTANT = {"assistant", "gpt", "bot", "model"}


def _from_chat(turns: list[dict]) -> tuple[str, str] | None:
    role = lambda t: str(t.get("role", t.get("from", ""))).lower()
    text = lambda t: str(t.get("content", t.get("value", "")))
    for i, turn in enumerate(turns[:-1]):
        if role(turn) in _USER and role(turns[i + 1]) in _ASSISTANT:
            return text(turn), text(turns[i + 1])
    return None


def _from_oasst(records: list[dict]) -> list[dict]:
    """First-turn prompts of an OpenAssistant message table, each with its best-ranked reply."""
    roots = {r["message_id"]: r for r in records if r.get("parent_id") is None and r.get("role") == "prompter"}
    best: dict[str, dict] = {}
    for r in records:
        if r.get("role") == "assistant" and r.get("parent_id") in roots:
            rank = r.get("rank") if r.get("rank") is not None else float("inf")
            old = best.get(r["parent_id"])
            if old is None or rank < (old.get("rank") if old.get("rank") is not None else float("inf")):
                best[r["parent_id"]] = r
    return [{**roots[pid], "prompt": roots[pid]["text"], "response": reply["text"]} for pid, reply in best.items()]


def to_pair(record: dict) -> tuple[str, str] | None:
    """(prompt, response) of one record in any of the supported layouts, None if it has none."""
    if "prompt" in record and "response" in record:
        return str(record["prompt"]), str(record["response"])
    if "instruction" in record and ("output" in record or "response" in record):
        extra = record.get("input") or record.get("context") or ""
        prompt = f"{record['instruction']}\n\n{extra}" if extra else str(record["instruction"])
        return prompt, str(record.get("output", record.get("response")))
    turns = record.get("messages") or record.get("conversations")
    return _from_chat(turns) if isinstance(turns, list) else None


class InstructTask(Task):
    name = "instruct"
    max_new_tokens = 1024  # instruction-following answers run to a few paragraphs
    stop = ()  # responses end with the end-of-sequence token
    needs_judge = True
    hub = "OpenAssistant/oasst1"

    def load(self, split: str, path: str | None = None) -> list[dict]:
        records = super().load(split, path)
        if records and "message_id" in records[0] and "parent_id" in records[0]:
            records = _from_oasst(records)
        out = []
        for i, record in enumerate(records):
            pair = to_pair(record)
            if pair is None:
                raise UserError(f"instruct record {i} of {path or self.hub} has no prompt/response fields "
                                "(prompt+response, instruction+output, messages, or an OpenAssistant table)")
            out.append({**record, "prompt": pair[0], "response": pair[1]})
        if not out:
            raise UserError(f"{path or self.hub}: no first-turn prompt with a reply")
        return out

    def prompt(self, example: dict) -> str:
        """Zero-shot, whatever `shots` says."""
        return example["prompt"]

    def solution(self, example: dict) -> str:
        return example["response"]

    def extract_answer(self, text: str) -> str | None:
        return text.strip() or None

    def gold_answer(self, example: dict) -> str:
        return example["response"].strip()

    def reward(self, completion: str, example: dict) -> float:
        raise NotImplementedError("instruct has no automatic reward: score completions with lite_selftrain.judge")

    def rewards(self, completions: list[str], examples: list[dict]) -> list[float]:
        raise NotImplementedError("instruct has no automatic reward: score completions with lite_selftrain.judge")
