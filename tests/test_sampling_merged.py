"""Sampling a LoRA / QLoRA policy from a merged copy (`models.sampling_policy`): the same greedy tokens as the
adapter model itself, the adapter model left exactly as it was, and the adapter model kept when memory is short."""

import pytest
import torch

from lite_selftrain.models import ModelConfig, is_peft, load_model, merged_copy, reference_mode, sampling_policy
from lite_selftrain.sampling import SamplingConfig, generate

PROMPTS = ["The cat sat", "1+2=", "a much longer prompt about nothing", "hi", "x y z"]


def _trained(mode):
    """A tiny LoRA / QLoRA model whose adapter changes its outputs (B != 0, as after training)."""
    model, tok = load_model(ModelConfig(name="tiny", mode=mode, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model, tok


def _tokens(model, tok, **knobs):
    cfg = SamplingConfig(n=2, temperature=0.0, max_new_tokens=10, batch_size=2, **knobs)
    return [[c.token_ids for c in group] for group in generate(model, tok, PROMPTS, cfg)]


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_merged_policy_samples_the_adapter_models_greedy_tokens(mode, capsys):
    model, tok = _trained(mode)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = _tokens(model, tok)
    assert "a merged float32 copy of the adapter model" in capsys.readouterr().err
    unmerged = _tokens(model, tok, merge=False)
    assert merged == unmerged
    with reference_mode(model):  # the adapter matters: without it the tokens differ, merged or not
        base = _tokens(model, tok)
        assert base == _tokens(model, tok, merge=False)
    assert base != merged
    assert is_peft(model) and model.training  # the training copy: still the adapter model, in its mode
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == before[n].dtype for n in before)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_merged_copy_computes_the_adapter_models_logits(mode):
    model, tok = _trained(mode)
    model.eval()
    ids = tok(PROMPTS[2], return_tensors="pt")["input_ids"]
    copy = merged_copy(model)
    assert not is_peft(copy) and not any("lora" in n for n, _ in copy.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        with reference_mode(model):
            torch.testing.assert_close(merged_copy(model)(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_adapter_model_stays_when_memory_is_short(capsys):
    model, _ = _trained("lora")
    dense = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) * 4  # fp32 bytes
    assert sampling_policy(model, free=dense) is model  # the copy may take half the free memory, not all
    assert "the adapter model as it is (a merged float32 copy needs" in capsys.readouterr().err
    policy = sampling_policy(model, free=2 * dense)
    assert policy is not model and not is_peft(policy)
    assert sampling_policy(model, merge=False) is model
