"""sequence_logprobs against log_softmax of the model's own logits, values and gradients.

    pytest tests/test_logprobs.py

Every case runs the "tiny" preset: plain (full fine-tuning, trainable lm_head), LoRA with a non-zero
adapter, the same with the adapter disabled, QLoRA, a 4-bit lm_head, and LoRA on the lm_head itself.
The reference is `model(...).logits` → log_softmax → gather → masked sum, through ordinary autograd.
"""

import pytest
import torch

from lite_selftrain.models import ModelConfig, load_model, reference_mode
from lite_selftrain.training.logprobs import sequence_logprobs, token_logprobs

B, T = 3, 14


def _batch(vocab: int, seed: int = 0):
    """(input_ids, attention_mask, loss_mask) (B, T): prompts of varied length, right padding in row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, -4:] = 0
    ids[1, -4:] = 0
    loss = attn.clone()
    for row, prompt in enumerate((5, 3, 8)):
        loss[row, :prompt] = 0
    return ids, attn, loss


def _reference(model, ids, attn, loss, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=attn).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * loss[:, 1:]).sum(-1)  # (B,)


def _perturb_lora(model, seed: int = 1):
    """LoRA's B starts at zero (the adapter is then a no-op): make it matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _check(model, temperature=1.0, tol=1e-5):
    """Values and gradients (non-unit upstream) of sequence_logprobs equal the reference's."""
    model.eval()  # no dropout: both paths see the same function
    ids, attn, loss = _batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the case must have something to differentiate"
    upstream = torch.tensor([0.7, -1.3, 2.0])
    ref = _reference(model, ids, attn, loss, temperature)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    sums, counts = sequence_logprobs(model, ids, attn, loss, temperature=temperature)
    grads = torch.autograd.grad((sums * upstream).sum(), params)
    assert sums.dtype == torch.float32 and sums.shape == (B,)
    assert counts.tolist() == loss[:, 1:].sum(-1).tolist()
    torch.testing.assert_close(sums, ref, atol=tol * 10, rtol=tol)
    for p, g, r in zip(params, grads, ref_grads):
        assert r.abs().max() > 0 or p.ndim == 0
        torch.testing.assert_close(g, r, atol=tol * max(1.0, r.abs().max().item()), rtol=tol * 10)


def test_plain_model_trainable_head():
    model, _ = load_model(ModelConfig(name="tiny", mode="full"))
    _check(model)
    _check(model, temperature=0.7)


def test_lora_model_adapter_on():
    model, _ = load_model(ModelConfig(name="tiny", mode="lora"))
    _perturb_lora(model)
    _check(model)


def test_lora_model_adapter_disabled():
    model, _ = load_model(ModelConfig(name="tiny", mode="lora"))
    _perturb_lora(model)
    ids, attn, loss = _batch(model.config.vocab_size)
    on, _ = sequence_logprobs(model, ids, attn, loss)
    for p in model.parameters():  # with the adapter off nothing trainable is used...
        p.requires_grad_(False)
    model.get_base_model().model.norm.weight.requires_grad_(True)  # ...so open a path through the body
    with reference_mode(model):
        _check(model)
        off, _ = sequence_logprobs(model, ids, attn, loss)
    assert (on - off).abs().max() > 1e-3  # the adapter really was switched off


def test_qlora_model():
    model, _ = load_model(ModelConfig(name="tiny", mode="qlora"))
    _perturb_lora(model)
    _check(model, tol=1e-4)


def test_four_bit_lm_head_is_dequantised():
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_model(ModelConfig(name="tiny", mode="lora"))
    _perturb_lora(model)
    base = model.get_base_model()
    lin = base.lm_head
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                          quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    base.lm_head = q.to("cpu")
    _check(model)


def test_lora_on_the_lm_head():
    from peft import LoraConfig, get_peft_model

    from lite_selftrain.models import build_model

    model = get_peft_model(build_model("tiny"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    _perturb_lora(model)
    _check(model)  # the head's effective weight is trainable: the recompute path
    ids, attn, loss = _batch(model.config.vocab_size)
    with torch.no_grad(), reference_mode(model):
        torch.testing.assert_close(sequence_logprobs(model, ids, attn, loss)[0],
                                   _reference(model, ids, attn, loss), atol=1e-4, rtol=1e-5)


def test_lm_head_in_modules_to_save():
    from peft import LoraConfig, get_peft_model

    from lite_selftrain.models import build_model

    model = get_peft_model(build_model("tiny"), LoraConfig(r=4, target_modules=["q_proj"],
                                                           modules_to_save=["lm_head"]))
    _perturb_lora(model)
    _check(model)


def test_token_logprobs_zero_outside_the_loss_mask():
    model, _ = load_model(ModelConfig(name="tiny", mode="full"))
    ids, attn, loss = _batch(model.config.vocab_size)
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn, loss)  # (B, T-1)
    assert logp.shape == (B, T - 1)
    assert (logp[loss[:, 1:] == 0] == 0).all()
    assert (logp[loss[:, 1:] == 1] < 0).all()
