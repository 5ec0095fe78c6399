"""Prompts in, rows out: which prompts run together, which decode loop runs them (`decode.Decoder`, the
growing cache, or `static.StaticDecoder`, fixed shapes and CUDA graphs), and the policy they decode with."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from ...models import is_peft, sampling_policy, split_body_head, training_mode
from ..stops import StopStrings, eos_table
from .decode import FINISH, Decoder, cache_keyword, check_served
from .static import StaticDecoder


def context_length(model) -> int | None:
    """The model's context (positions), None when its config does not say."""
    return getattr(split_body_head(model)[0].config, "max_position_embeddings", None)


def batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """The prompt indices of each batch `rows` runs: longest prompts first, so similar lengths share one."""
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def _decoder(policy, cfg):
    """The decode loop for `cfg.decode`: "auto" takes CUDA graphs for a plain model on a GPU, and the
    growing cache elsewhere (a CPU has no graphs to replay; bitsandbytes and peft layers stay out of them)."""
    cuda = policy.get_input_embeddings().weight.device.type == "cuda"
    mode = cfg.decode
    if mode == "auto":
        plain = not is_peft(policy) and all(getattr(p, "quant_state", None) is None for p in policy.parameters())
        mode = "graph" if cuda and plain else "eager"
    return functools.partial(StaticDecoder, graphs=cuda) if mode == "graph" else Decoder


def rows(model, tokenizer, ids: list[list[int]], pending: set[int], cfg, *,
         logprobs: bool = False) -> Iterator[tuple[int, list[tuple[list[int], str, list[float] | None]]]]:
    """Yield (prompt index, its n rows (token ids, finish reason, token log-probs)) for the pending prompts.

    `ids` are every prompt's token ids (already checked against the context); `cfg` is a
    `sampling.SamplingConfig` with `max_new_tokens` set. Batches are a fixed function of the whole prompt
    list, so a resumed job re-runs a partly written batch whole and gets what an uninterrupted one got.
    A LoRA / QLoRA `model` is decoded as a merged copy when `cfg.merge` and memory allow (`sampling_policy`).
    """
    order = [i for batch in batches(ids, cfg.batch_size) if not pending.isdisjoint(batch) for i in batch]
    if not order:  # nothing to decode (e.g. a rank whose share is empty): no merge, no decoder
        return
    policy = sampling_policy(model, cfg.merge)  # one merge per call: the training copy stays as it is
    body, head = split_body_head(policy)
    check_served(body.config)
    context = context_length(model) or 2**62
    vocab, device = head.weight.shape[0], head.weight.device
    eos = eos_table(model, tokenizer, vocab, device)
    stops = StopStrings(tokenizer, cfg.stop, vocab, device) if cfg.stop else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keyword = cache_keyword(body)
    with training_mode(policy, False), torch.inference_mode():
        decoder = _decoder(policy, cfg)(body, head, [ids[i] for i in order], order, cfg, eos=eos, stops=stops,
                                        logprobs=logprobs, pad_id=pad_id, context=context, keyword=keyword)
        for p, group in decoder.run():
            if order[p] in pending:
                yield order[p], [(token_ids, FINISH[c], row_lps) for token_ids, c, row_lps in group]
