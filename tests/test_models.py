"""Models: presets, the local tokenizer, full / LoRA / QLoRA loading, adapters in peft format."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite_selftrain.errors import UserError
from lite_selftrain.models import (
    PRESETS,
    ModelConfig,
    build_model,
    build_tokenizer,
    format_prompt,
    load_model,
    padding_side,
    reference_mode,
    save_merged,
    save_model,
    save_preset,
)


def _batch(tok):
    return tok(["12+7=19", "a longer line, 日本語"], padding=True, return_tensors="pt")


def test_tokenizer_round_trips_and_loads_with_auto(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "x = 3*4 → 12\n日本語"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.pad_token == "<pad>" and tok.eos_token_id == 2 and len(tok) == 260
    with padding_side(tok, "left"):
        assert tok(["a", "abc"], padding=True).input_ids[0][:2] == [0, 0]
    assert tok.padding_side == "right"
    assert format_prompt(tok, "hi") == "hi"  # no chat template: the raw text


@pytest.mark.parametrize(
    "preset, params",
    [("llm-jp-3-150m", 152e6), ("llm-jp-3-980m", 990e6), ("llm-jp-3-1.8b", 1.87e9), ("llm-jp-3-3.7b", 3.78e9)],
)
def test_llm_jp_presets_have_the_published_sizes(preset, params):
    with torch.device("meta"):
        model = build_model(preset)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.03
    assert model.lm_head.weight.shape == (99584, PRESETS[preset]["hidden_size"])


def test_qlora_step_changes_only_lora_parameters():
    model, tok = load_model(ModelConfig(name="tiny", mode="qlora"))
    import bitsandbytes as bnb

    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    b = _batch(tok)
    with torch.no_grad():
        model(**b)  # bitsandbytes repacks 4-bit weights for the CPU on the first forward: snapshot after it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**b, labels=b.input_ids.masked_fill(b.attention_mask == 0, -100)).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)


def _perturbed_lora(mode):
    model, tok = load_model(ModelConfig(name="tiny", mode=mode, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.eval(), tok


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapter_save_load_round_trip_reproduces_logits(tmp_path, mode):
    model, tok = _perturbed_lora(mode)
    b = _batch(tok)
    with torch.no_grad():
        logits = model(**b).logits
        with reference_mode(model):
            ref = model(**b).logits
    assert not torch.allclose(logits, ref)  # the adapter matters, and disabling it removes it
    save_model(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    again, _ = load_model(ModelConfig(name="tiny", mode=mode, adapter=str(tmp_path / "adapter")))
    with torch.no_grad():
        assert torch.equal(again.eval()(**b).logits, logits)


def test_adapter_works_with_plain_peft_and_merge(tmp_path):
    from peft import PeftModel

    model, tok = _perturbed_lora("lora")
    b = _batch(tok)
    with torch.no_grad():
        logits = model(**b).logits
    save_model(model, tmp_path / "adapter")
    save_preset("tiny", tmp_path / "base")
    base = build_model("tiny")
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**b).logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_merged_folder_is_the_policy_that_trained(tmp_path, mode):
    """What vLLM is handed: a plain folder whose logits are the adapter model's (QLoRA: over its dequantized
    base, not the float base), and the model in memory still a peft model with its adapter on."""
    from transformers import AutoModelForCausalLM

    model, tok = _perturbed_lora(mode)
    b = _batch(tok)
    with torch.no_grad():
        logits = model(**b).logits
    save_merged(model, tmp_path / "policy", tok)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert not hasattr(plain.config, "quantization_config") and plain.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(**b).logits, logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model(**b).logits, logits)  # unchanged


def test_full_mode_and_local_folder(tmp_path):
    save_preset("tiny", tmp_path / "m", seed=3)
    model, tok = load_model(ModelConfig(name=str(tmp_path / "m"), mode="full"))
    ref = build_model("tiny", seed=3)
    b = _batch(tok)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, ref(**b).logits)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(ModelConfig(name="./no/such/model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        load_model(ModelConfig(name=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="offline"):
        load_model(ModelConfig(name="llm-jp/llm-jp-3-150m", mode="full"))
    with pytest.raises(UserError, match="mode"):
        ModelConfig(mode="int8")
    with pytest.raises(UserError, match="adapter"):
        load_model(ModelConfig(name="tiny", adapter=str(tmp_path / "empty")))


def test_package_installs_no_top_level_kernels_module():
    """Our kernels/ is lite_selftrain.kernels; `kernels` (if installed) stays the PyPI package transformers uses."""
    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util as u, lite_selftrain.kernels as k; s = u.find_spec('kernels'); "
            "print(k.__name__, s.origin if s else None)")
    for cwd in ("/", root):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=True)
        name, origin = out.stdout.split()
        assert name == "lite_selftrain.kernels" and not origin.startswith(str(root / "kernels"))
    for cmd in ([sys.executable, "-m", "lite_selftrain", "--help"], ["lite-selftrain", "--help"]):
        assert "Usage" in subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root).stdout
