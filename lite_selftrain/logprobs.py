"""Per-sequence log-prob sums straight from a model, through the fused kernel: no caller sees logits.

    sums, counts = sequence_logprobs(model, input_ids, attention_mask, loss_mask)

Runs the transformer body for the final hidden states, then `fused_logprob` with the model's lm_head.
Works on a plain model, a peft model (adapter on, or off inside `models.reference_mode`) and QLoRA.
"""

from __future__ import annotations

import torch

from .kernels import fused_logprob


def split_body_head(model):
    """(transformer body returning hidden states, lm_head Linear) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def token_logprobs(model, input_ids, attention_mask, loss_mask, *, temperature=1.0, impl="auto"):
    """(B, T) inputs → (B, T-1) fp32 log-probs of tokens 1..T-1; 0 where `loss_mask` is False."""
    body, head = split_body_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    targets = input_ids[:, 1:].masked_fill(~loss_mask[:, 1:].bool(), -100)  # (B, T-1)
    return fused_logprob(hidden[:, :-1], head.weight, targets, getattr(head, "bias", None),
                         temperature=temperature, impl=impl)  # (B, T-1)


def sequence_logprobs(model, input_ids, attention_mask, loss_mask, *, temperature=1.0, impl="auto"):
    """(B, T) inputs → (sum of response-token log-probs (B,) fp32, response token counts (B,))."""
    logp = token_logprobs(model, input_ids, attention_mask, loss_mask, temperature=temperature, impl=impl)
    return logp.sum(-1), loss_mask[:, 1:].sum(-1)
