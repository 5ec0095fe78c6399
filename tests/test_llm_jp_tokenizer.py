"""The real llm-jp-3 tokenizer through the whole pipeline: one BOS whatever the chat template writes, the
trained tokens equal to the sampled ones, Japanese stop strings that end in byte-fallback pieces, and
centrality embeddings pooled over content tokens only.

The model is a `tiny` Llama with llm-jp-3's padded vocabulary (99,584), trained here for a few seconds on
Japanese answers that hold 龘 (not in the vocabulary: three byte-fallback pieces) so that its samples
split characters into bytes, end with EOS and contain the stop strings.
"""

import random

import pytest
import torch

from lite_selftrain.mbr import embed
from lite_selftrain.models import build_model, format_prompt, load_tokenizer
from lite_selftrain.models.tokenizer import LLM_JP_MODEL, build_llm_jp_tokenizer, decode_continuation, encode
from lite_selftrain.sampling.generate import SamplingConfig, generate, tokenize_prompts
from lite_selftrain.training import TrainConfig, train
from lite_selftrain.training.batching import encode_records, sampled_ids

RARE = "龘"  # U+9F98: no piece of its own, so it is written as the byte pieces <0xE9> <0xBE> <0x98>
QUESTIONS = ["日本の首都は？", "富士山の高さは？", "一番大きい湖は？", "好きな漢字は？"]
ANSWERS = [f" 答えは{RARE}です。", f"{RARE}{RARE}は 難しい字です。", f" 東京と{RARE}です。", f"{RARE}です。"]


@pytest.fixture(scope="module")
def jp_tok():
    return build_llm_jp_tokenizer()


@pytest.fixture(scope="module")
def jp_model(jp_tok, tmp_path_factory):
    """A tiny model that has learnt to answer the questions in the instruct chat template."""
    model = build_model("tiny", vocab_size=99584, seed=0)
    records = [{"prompt": format_prompt(jp_tok, q), "response": a} for q in QUESTIONS for a in ANSWERS]
    cfg = TrainConfig(objective="sft", lr=1e-2, max_steps=60, batch_size=16, grad_accum=1, max_length=64,
                      warmup_ratio=0.0, checkpoint_every=1000, log_every=1000)
    train(model, jp_tok, records, cfg, tmp_path_factory.mktemp("jp_train"))
    return model


def test_tokenizer_matches_sentencepiece_and_the_published_settings(jp_tok):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(LLM_JP_MODEL))
    rng = random.Random(0)
    alphabet = "ab XY 09 日本語のテキスト、。！？ ﾃｽﾄ 𠮷😀龘\n\t#$\\{}"
    texts = ["Hello world", "日本の首都は東京です。", "  two  spaces", " leading", "trailing ", "\n\n### 応答:\n"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for text in texts:
        ids = jp_tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text  # BOS, then exactly SentencePiece's pieces
        assert jp_tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]) == text
    assert len(jp_tok) == sp.get_piece_size() == 99574
    assert (jp_tok.bos_token_id, jp_tok.eos_token_id, jp_tok.pad_token_id, jp_tok.unk_token_id) == (1, 2, 4, 0)
    assert jp_tok.pad_token == "<PAD|LLM-jp>" and jp_tok.convert_ids_to_tokens(8) == "<0x00>"
    assert jp_tok("は" + RARE, add_special_tokens=False)["input_ids"][-3:] == [8 + 0xE9, 8 + 0xBE, 8 + 0x98]
    assert load_tokenizer("llm-jp-3-150m").get_vocab() == jp_tok.get_vocab()  # what the presets load
    assert load_tokenizer("tiny").convert_ids_to_tokens(4) != "<PAD|LLM-jp>"  # tiny presets keep bytes


def test_one_bos_whatever_the_chat_template_writes(jp_tok):
    prompt = format_prompt(jp_tok, QUESTIONS[0])
    assert prompt.startswith("<s>")  # the template's {{bos_token}}
    assert jp_tok(prompt)["input_ids"][:2] == [1, 1]  # the trap: special tokens added once more
    ids = encode(jp_tok, [prompt, QUESTIONS[0]])
    assert [seq[:2].count(1) for seq in ids] == [1, 1]
    sampler = tokenize_prompts(jp_tok, [prompt], max_new_tokens=8, context=4096, truncate=False)[0]
    (trained,), _ = encode_records(jp_tok, [{"prompt": prompt, "response": "東京です。"}], "sft", 64)
    assert sampler == ids[0] == trained.rows[0][: trained.prompt_len].tolist()
    assert trained.rows[0].tolist().count(1) == 1


def test_prompt_and_response_are_tokenised_together(jp_tok):
    prompt, response = format_prompt(jp_tok, QUESTIONS[1]), " The answer is 3776 m."
    (ex,), _ = encode_records(jp_tok, [{"prompt": prompt, "response": response}], "sft", 64)
    whole = encode(jp_tok, [prompt + response])[0] + [jp_tok.eos_token_id]
    apart = encode(jp_tok, [prompt])[0] + jp_tok(response, add_special_tokens=False)["input_ids"]
    assert ex.rows[0].tolist() == whole != apart + [jp_tok.eos_token_id]  # apart: "▁" dummy prefix differs
    assert decode_continuation(jp_tok, ex.rows[0][ex.prompt_len : -1].tolist()) == response  # space kept


def test_training_tokens_equal_the_sampled_tokens(jp_model, jp_tok):
    prompts = [format_prompt(jp_tok, q) for q in QUESTIONS]
    groups = generate(jp_model, jp_tok, prompts, SamplingConfig(n=8, temperature=1.0, max_new_tokens=24, seed=1))
    finished = [(p, c) for p, g in zip(prompts, groups) for c in g if c.finish_reason == "eos"]
    assert len(finished) >= 8, [c.text for g in groups for c in g]
    split = [c for _, c in finished if 8 + 0xE9 in c.token_ids]
    assert split  # samples that write a character as byte pieces
    records = [{"prompt": p, "response": c.text, **sampled_ids("response", c.to_dict())} for p, c in finished]
    examples, stats = encode_records(jp_tok, records, "sft", max_length=128)
    assert stats["examples"] == len(records)
    for (p, c), ex in zip(finished, examples):
        assert ex.rows[0].tolist() == encode(jp_tok, [p])[0] + c.token_ids  # prompt ids as sampled, then its ids
        assert ex.prompt_len == len(encode(jp_tok, [p])[0])


def test_japanese_stop_strings_and_byte_pieces(jp_model, jp_tok):
    prompts = [format_prompt(jp_tok, q) for q in QUESTIONS]
    kw = dict(n=8, temperature=1.0, max_new_tokens=24, seed=2)
    free = generate(jp_model, jp_tok, prompts, SamplingConfig(**kw))
    stopped = generate(jp_model, jp_tok, prompts, SamplingConfig(stop=[RARE, "す。"], **kw))
    reasons = []
    for group_free, group in zip(free, stopped):
        for f, c in zip(group_free, group):
            reasons.append((c.finish_reason, c.token_ids[-1] if c.token_ids else None))
            assert f.token_ids[: c.num_tokens] == c.token_ids  # the same draws, cut where the stop completes
            if c.finish_reason == "stop":
                whole = decode_continuation(jp_tok, c.token_ids)
                assert (RARE in whole or "す。" in whole) and RARE not in c.text and "す。" not in c.text
                before = decode_continuation(jp_tok, c.token_ids[:-1])
                assert RARE not in before and "す。" not in before  # the last token completed it
                assert c.text == whole[: min(whole.find(s) for s in (RARE, "す。") if s in whole)]
    assert (("stop", 8 + 0x98) in reasons), reasons  # a stop completed by the character's last byte piece
    assert decode_continuation(jp_tok, [8 + 0xE9, 8 + 0xBE]).endswith("\ufffd")  # half a character


def test_embeddings_pool_only_content_tokens(jp_model, jp_tok):
    texts = ["東京です。", f"答えは{RARE}です。東京と富士山"]
    got = embed(jp_model, jp_tok, texts)
    body = jp_model.get_decoder()
    for text, e in zip(texts, got):
        ids = torch.tensor([jp_tok(text)["input_ids"]])  # (1, T), BOS first
        with torch.no_grad():
            hidden = body(input_ids=ids).last_hidden_state[0]  # (T, H)
        content = torch.nn.functional.normalize(hidden[1:].mean(0), dim=-1)
        with_bos = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
        assert torch.allclose(e, content, atol=1e-5) and not torch.allclose(e, with_bos, atol=1e-3)
    last = embed(jp_model, jp_tok, texts, pooling="last")
    assert last.shape == got.shape and embed(jp_model, jp_tok, [""]).abs().sum() == 0  # no content: zeros
