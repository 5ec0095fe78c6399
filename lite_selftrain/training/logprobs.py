"""Per-sequence log-prob sums straight from a model, through the fused kernel: no caller sees logits.

    sums, counts = sequence_logprobs(model, input_ids, attention_mask, loss_mask)   # (B,), (B,)
    logp = token_logprobs(model, input_ids, attention_mask, loss_mask)             # (B, T-1)

Runs the transformer body for the final hidden states, keeps only the positions whose next token is
in the loss (prompt and padding never reach the lm_head), and hands them to `fused_logprob` with the
weight the lm_head applies right now:
- a plain Linear: its weight and bias;
- a bitsandbytes 4-bit / 8-bit Linear: the dequantised weight (V × H, far smaller than the logits);
- a peft LoRA layer on the lm_head: base weight + the active adapters' deltas (B·A·scale), none when the
  adapter is disabled (`models.reference_mode`) or merged; a `modules_to_save` copy when peft keeps one.
LoRA layers elsewhere in the body need nothing here: they act inside the body's forward.

Simplifications: logits are assumed to be `lm_head(hidden)` (true of Llama, the only architecture the
presets build; no logit soft-capping or scaling); LoRA dropout on the lm_head itself is not applied.
"""

from __future__ import annotations

import torch

from ..kernels import fused_logprob
from ..models import split_body_head


def _linear_weight(linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, H), bias (V,) or None) of a Linear, dequantised when bitsandbytes quantised it."""
    weight = linear.weight
    if type(weight) not in (torch.nn.Parameter, torch.Tensor):  # Params4bit / Int8Params
        from peft.utils.integrations import dequantize_module_weight

        weight = dequantize_module_weight(linear)  # (V, H) in the compute dtype
    return weight, linear.bias


def head_weight(head) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) that `head` applies in its current adapter state, differentiable where trainable."""
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # peft's trainable copy
        active = head.active_adapters[0] if head.active_adapters else None
        if head.disable_adapters or active not in head.modules_to_save:
            return head_weight(head.original_module)
        return head_weight(head.modules_to_save[active])
    if hasattr(head, "base_layer") and hasattr(head, "get_delta_weight"):  # a peft LoRA layer
        weight, bias = head_weight(head.base_layer)
        if head.disable_adapters or head.merged:
            return weight, bias
        for name in head.active_adapters:
            if name in head.lora_A:
                if getattr(head, "use_dora", {}).get(name):
                    raise NotImplementedError("DoRA on the lm_head is not supported by the fused log-prob")
                weight = weight + head.get_delta_weight(name).to(weight.dtype)  # (V, H)
        return weight, bias
    return _linear_weight(head)


def token_logprobs(model, input_ids, attention_mask, loss_mask, *, temperature=1.0, impl="auto"):
    """(B, T) inputs → (B, T-1) fp32 log-probs of tokens 1..T-1; 0 where `loss_mask` is False."""
    body, head = split_body_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
    keep = loss_mask[:, 1:].bool()  # (B, T-1): position t predicts token t+1
    weight, bias = head_weight(head)
    logp = fused_logprob(hidden[:, :-1][keep], weight, input_ids[:, 1:][keep], bias,
                         temperature=temperature, impl=impl)  # (M,) only the response tokens
    return torch.zeros(keep.shape, dtype=torch.float32, device=logp.device).masked_scatter(keep, logp)


def sequence_logprobs(model, input_ids, attention_mask, loss_mask, *, temperature=1.0, impl="auto"):
    """(B, T) inputs → (sum of response-token log-probs (B,) fp32, response token counts (B,))."""
    logp = token_logprobs(model, input_ids, attention_mask, loss_mask, temperature=temperature, impl=impl)
    return logp.sum(-1), loss_mask[:, 1:].sum(-1)
