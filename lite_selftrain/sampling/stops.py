"""Where a row ends: the EOS ids of a tokenizer and model, and stop strings found in the generated text."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.tokenizer import decode_continuation


class StopStrings:
    """Finds where a row's text first contains a stop string; decodes only steps where that is possible.

    A token can complete a stop string only if its text holds the string's last character (or part of it,
    for a multi-byte character): a (V,) table of such tokens, built once, marks the steps worth a decode.
    """

    def __init__(self, tokenizer, stops: Sequence[str], vocab_size: int, device):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.window = 4 * max(map(len, self.stops)) + 8  # tokens enough to hold any stop string, bytes or not
        anchor = tokenizer.encode("a", add_special_tokens=False)[:1]  # decode after a letter: keeps leading spaces
        head = tokenizer.decode(anchor)
        known = min(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([anchor + [i] for i in range(known)], skip_special_tokens=True)
        ends = {s[-1] for s in self.stops}
        partial = any(ord(c) > 127 for c in ends)  # only a multi-byte last character can end in a byte token
        flags = [not t.startswith(head) or (partial and "\ufffd" in t) or any(c in t[len(head) :] for c in ends)
                 for t in texts]
        self.can_end = torch.ones(vocab_size, dtype=torch.bool)
        self.can_end[:known] = torch.tensor(flags, dtype=torch.bool)
        self.can_end = self.can_end.to(device)

    def completed_at(self, tokens: list[int], step: int) -> bool:
        """Whether the text of tokens[: step + 1] ends in a stop string that token `step` completed."""
        tail = decode_continuation(self.tokenizer, tokens[max(0, step + 1 - self.window) : step + 1])
        return any(s in tail for s in self.stops)


def eos_table(model, tokenizer, vocab_size: int, device) -> torch.Tensor:
    """(V,) bool: the tokenizer's EOS and every EOS id of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[[i for i in ids if i is not None and 0 <= i < vocab_size]] = True
    return table.to(device)
