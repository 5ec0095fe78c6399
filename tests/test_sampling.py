"""The sampling engine against a naive reference: one prompt, one sample, no cache, no padding.

The reference recomputes the whole sequence at every step and draws with the same counter-based uniforms,
so shared-prefix batched sampling must reproduce its tokens exactly and its log-probs to float rounding,
under eager and sdpa attention alike and however often the engine looks for finished rows.
"""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lite_selftrain.errors import UserError
from lite_selftrain.models import ModelConfig, build_model, build_tokenizer, load_model, reference_mode
from lite_selftrain.sampling import Completion, SamplingConfig, generate
from lite_selftrain.sampling.engine import draw, mix32, uniforms
from lite_selftrain.store import JsonlLog

PROMPTS = ["The cat sat", "1+2=", "a much longer prompt about nothing", "hi", "x y z"]


def sample(model, tok, prompts, *, out=None, logprobs=False, truncate=False, progress=False, **knobs):
    """`generate` with the knobs of one SamplingConfig given as keywords."""
    return generate(model, tok, prompts, SamplingConfig(**knobs), out=out, logprobs=logprobs, truncate=truncate,
                    progress=progress)


# ----------------------------------------------------------------------------------------------------
# the naive reference


def naive_draw(logits, u, temperature, top_k, top_p):
    """One row: the rule `draw` implements, written out in float64 Python."""
    z = logits.double().tolist()
    if temperature == 0:
        return max(range(len(z)), key=lambda i: z[i])
    order = list(range(len(z)))
    if (top_k and top_k < len(z)) or top_p < 1:  # filtered: most likely first
        order = sorted(order, key=lambda i: -z[i])[: top_k or None]
    top = max(z[i] for i in order)
    p = [math.exp((z[i] - top) / temperature) for i in order]
    p = [x / sum(p) for x in p]
    kept, mass = [], 0.0
    for pi in p:  # nucleus: the most likely tokens until their mass reaches top_p
        kept.append(pi if top_p == 1 or mass < top_p else 0.0)
        mass += pi
    target, cum = float(u) * sum(kept), 0.0
    for i, pi in enumerate(kept):
        cum += pi
        if cum >= target and pi > 0:
            return order[i]
    return order[max(i for i, pi in enumerate(kept) if pi > 0)]


def naive_generate(model, tok, prompts, *, n, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16, stop=(),
                   seed=0, eos_ids=(2,)):
    out, device = [], next(model.parameters()).device  # the reference draws on the CPU, the model runs where it is
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = tok(prompt)["input_ids"]
            group = []
            for j in range(n):
                u = uniforms(seed, torch.tensor([i]), torch.tensor([j]), max_new_tokens)[0]
                gen, lps, reason = [], [], "length"
                for s in range(max_new_tokens):
                    logits = model(input_ids=torch.tensor([ids + gen], device=device)).logits[0, -1].float().cpu()
                    t = naive_draw(logits, u[s], temperature, top_k, top_p)
                    lps.append(float(torch.log_softmax(logits.double(), 0)[t]))
                    gen.append(t)
                    if t in eos_ids:
                        reason = "eos"
                        break
                    if any(st in tok.decode(gen, skip_special_tokens=True) for st in stop):
                        reason = "stop"
                        break
                text = tok.decode(gen[:-1] if reason == "eos" else gen, skip_special_tokens=True)
                if reason == "stop":
                    text = text[: min(text.find(st) for st in stop if st in text)]
                group.append(Completion(text, gen, len(gen), reason, sum(lps), lps))
            out.append(group)
    return out


def assert_same(got, want, atol=1e-4):
    assert len(got) == len(want)
    for g_group, w_group in zip(got, want):
        assert len(g_group) == len(w_group)
        for g, w in zip(g_group, w_group):
            assert (g.token_ids, g.text, g.finish_reason, g.num_tokens) == (w.token_ids, w.text, w.finish_reason,
                                                                            w.num_tokens)
            if w.token_logprobs is not None and g.token_logprobs is not None:
                torch.testing.assert_close(torch.tensor(g.token_logprobs, dtype=torch.float64),
                                           torch.tensor(w.token_logprobs, dtype=torch.float64), atol=atol, rtol=0)
                assert g.logprob == pytest.approx(w.logprob, abs=atol * g.num_tokens)


# ----------------------------------------------------------------------------------------------------
# randomness and the draw


def test_mix32_matches_32bit_arithmetic():
    def ref(x):  # lowbias32 with Python's unbounded ints, reduced mod 2^32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = torch.randint(0, 2**32, (1000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    xs[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    assert mix32(xs).tolist() == [ref(x) for x in xs.tolist()]


def test_uniforms_are_per_row_streams():
    p, s = torch.tensor([0, 0, 1, 7]), torch.tensor([0, 1, 0, 3])
    u = uniforms(5, p, s, 64)  # (4, 64)
    assert u.shape == (4, 64) and bool((u > 0).all() and (u < 1).all())
    torch.testing.assert_close(uniforms(5, p[2:], s[2:], 64), u[2:], atol=0, rtol=0)  # batch-mates irrelevant
    assert not torch.equal(uniforms(6, p, s, 64), u)  # the seed matters
    assert len(set(u.flatten().tolist())) == u.numel()  # rows and steps differ
    big = uniforms(0, torch.arange(200).repeat_interleave(50), torch.arange(50).repeat(200), 20).flatten()
    assert abs(float(big.mean()) - 0.5) < 0.01 and abs(float(big.var()) - 1 / 12) < 0.005
    hist = torch.histc(big, bins=10, min=0, max=1) / big.numel()
    assert float((hist - 0.1).abs().max()) < 0.01


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                       (0.5, 12, 0.6), (1.0, 400, 1.0)])
def test_draw_follows_the_filtered_distribution(temperature, top_k, top_p):
    logits = torch.randn(3, 301, generator=torch.Generator().manual_seed(1)) * 2
    N = 4000
    u = (torch.arange(N, dtype=torch.float32) + 0.5) / N  # a stratified grid: counts are exact up to ±1
    for row in range(3):
        got = draw(logits[row].expand(N, -1), u, temperature, top_k, top_p)
        freq = torch.bincount(got, minlength=301).double() / N
        some = range(0, N, 20)  # the naive rule picks the very same tokens
        assert [int(got[k]) for k in some] == [naive_draw(logits[row], u[k], temperature, top_k, top_p)
                                               for k in some]
        z = logits[row].double() / temperature
        order = z.argsort(descending=True)[: top_k or None]
        p = torch.softmax(z[order], 0)
        keep = (p.cumsum(0) - p) < top_p
        exact = torch.zeros(301, dtype=torch.float64)
        exact[order[keep]] = p[keep] / p[keep].sum()
        assert float((freq - exact).abs().max()) <= 2 / N
        assert set(freq.nonzero().flatten().tolist()) <= set(exact.nonzero().flatten().tolist())


def test_draw_greedy_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(draw(logits, torch.rand(4), 0.0, 3, 0.5), logits.argmax(-1))


# ----------------------------------------------------------------------------------------------------
# shared-prefix sampling equals unshared sampling


def test_greedy_equals_reference_with_padding_and_batches(model, tok):
    want = naive_generate(model, tok, PROMPTS, n=1, temperature=0, max_new_tokens=12)
    got = sample(model, tok, PROMPTS, n=3, temperature=0, max_new_tokens=12, batch_size=2, logprobs=True)
    assert_same(got, [w * 3 for w in want])  # every sample of a prompt is its one greedy continuation


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 20, 1.0), (1.2, 0, 0.9)])
def test_sampling_equals_reference(model, tok, temperature, top_k, top_p):
    kw = dict(n=3, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=10, seed=3)
    want = naive_generate(model, tok, PROMPTS, **kw)
    got = sample(model, tok, PROMPTS, batch_size=2, logprobs=True, **kw)
    assert_same(got, want)
    assert len({tuple(c.token_ids) for c in got[0]}) > 1  # samples of one prompt differ


def test_outputs_depend_on_seed_and_prompt_index_only(model, tok):
    kw = dict(n=2, temperature=1.0, max_new_tokens=8, seed=11)
    a = sample(model, tok, PROMPTS, batch_size=2, **kw)
    assert a == sample(model, tok, PROMPTS, batch_size=2, **kw)  # same call, same outputs
    assert a == sample(model, tok, PROMPTS, batch_size=5, **kw)  # batch-mates do not matter
    assert a[:2] == sample(model, tok, PROMPTS[:2], batch_size=1, **kw)
    assert a != sample(model, tok, PROMPTS, batch_size=2, **{**kw, "seed": 12})


@pytest.mark.parametrize("check_every", [1, 4, 7])
def test_stop_strings_and_eos_end_rows_in_a_mixed_batch(model, tok, check_every):
    """EOS, a stop string and the length limit end different rows of one batch, pruned mid-way, whether the
    engine looks for finished rows every step or every few (rows then run past their end, dropped)."""
    free = naive_generate(model, tok, PROMPTS[:3], n=4, temperature=1.0, max_new_tokens=24, seed=5)
    row = free[0][0].token_ids  # make sample 0 of prompt 0 hit the EOS at step 4 ...
    eos = next(t for k, t in enumerate(row) if k >= 4 and t not in row[:k] and t > 3)
    text = tok.decode(free[1][2].token_ids, skip_special_tokens=True)  # ... and sample 2 of prompt 1 a stop
    stop = next(text[k : k + 2] for k in range(5, 20)  # string around step 6
                if text[k : k + 2].isprintable() and text[k : k + 2] not in text[: k + 1])
    model.generation_config.eos_token_id = [2, eos]
    try:
        kw = dict(n=4, temperature=1.0, max_new_tokens=24, seed=5, stop=[stop, "\x00never"])
        want = naive_generate(model, tok, PROMPTS[:3], eos_ids=(2, eos), **kw)
        got = sample(model, tok, PROMPTS[:3], batch_size=3, logprobs=True, check_every=check_every, **kw)
    finally:
        model.generation_config.eos_token_id = 2
    assert_same(got, want)
    reasons = [c.finish_reason for group in got for c in group]
    assert {"eos", "stop", "length"} <= set(reasons)
    assert reasons.count("length") <= len(reasons) - 3  # a quarter ends early: the batch gets pruned
    for c in (c for group in got for c in group):
        full = tok.decode(c.token_ids, skip_special_tokens=True)
        if c.finish_reason == "eos":
            assert c.token_ids[-1] == eos and c.text == tok.decode(c.token_ids[:-1])
        if c.finish_reason == "stop":
            assert stop in full and stop not in c.text and full.startswith(c.text)
            assert stop not in tok.decode(c.token_ids[:-1])  # the last token completed it
        if c.finish_reason == "length":
            assert c.num_tokens == 24 and stop not in c.text


@pytest.fixture(scope="module")
def by_attention(tok):
    """The same tiny weights under each attention implementation the engine serves."""
    models = {}
    for impl in ("eager", "sdpa"):
        models[impl] = build_model("tiny", vocab_size=len(tok), seed=0)
        models[impl].set_attn_implementation(impl)
    return models


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eager_and_sdpa_give_the_no_cache_reference_on_a_padded_batch(by_attention, tok, temperature):
    """Eager attention adds the mask to the scores, sdpa applies it: the engine's float mask serves both."""
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)  # one batch, every row padded but one
    kw = dict(n=2, temperature=temperature, max_new_tokens=12, seed=7)
    want = naive_generate(by_attention["sdpa"], tok, PROMPTS, **kw)  # no cache, no padding
    assert_same(naive_generate(by_attention["eager"], tok, PROMPTS, **kw), want)
    for model in by_attention.values():
        got = sample(model, tok, PROMPTS, batch_size=len(PROMPTS), logprobs=True, **kw)
        assert_same(got, want)


def test_refuses_models_it_cannot_serve(tok):
    model = build_model("tiny", vocab_size=len(tok), seed=0)
    model.config._attn_implementation = "flex_attention"  # takes a BlockMask, not the engine's float mask
    with pytest.raises(UserError, match="attention eager or sdpa, not 'flex_attention'"):
        sample(model, tok, PROMPTS, max_new_tokens=2)
    model = build_model("tiny", vocab_size=len(tok), seed=0)
    model.config.sliding_window = 8
    with pytest.raises(UserError, match="full-attention models.*backend='vllm'"):
        sample(model, tok, PROMPTS, max_new_tokens=2)


def test_peft_adapter_on_and_off(tok):
    from peft import LoraConfig, get_peft_model

    base = build_model("tiny", vocab_size=len(tok), seed=1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    kw = dict(n=2, temperature=0.9, max_new_tokens=8, seed=1)
    on = sample(model, tok, PROMPTS, batch_size=2, logprobs=True, **kw)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert_same(on, naive_generate(model, tok, PROMPTS, **kw))
    with reference_mode(model):
        off = sample(model, tok, PROMPTS, batch_size=2, logprobs=True, **kw)
        assert_same(off, naive_generate(model, tok, PROMPTS, **kw))
    assert [c.token_ids for g in on for c in g] != [c.token_ids for g in off for c in g]


def test_qlora_model(tmp_path):
    model, tok = load_model(ModelConfig(name="tiny", mode="qlora", lora_dropout=0.0))
    model.eval()
    kw = dict(n=2, temperature=0.0, max_new_tokens=6)
    got = sample(model, tok, PROMPTS[:3], batch_size=2, logprobs=True, **kw)
    assert_same(got, naive_generate(model, tok, PROMPTS[:3], **kw), atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# streaming, resume and kill safety


def read_records(path):
    return [json.loads(line) for line in open(path)]


def test_resume_drops_torn_and_partial_prompts(model, tok, tmp_path):
    kw = dict(n=3, temperature=1.0, max_new_tokens=8, seed=2, batch_size=2)
    path = tmp_path / "samples.jsonl"
    want = sample(model, tok, PROMPTS, out=path, **kw)
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 15 and want == sample(model, tok, PROMPTS, **kw)
    by_prompt = {}
    for line in lines:
        by_prompt.setdefault(json.loads(line)["prompt_index"], []).append(line)
    sentinel = json.loads(by_prompt[0][1])
    sentinel["text"] = "KEPT FROM FILE"
    # a job killed mid-append: prompt 0 complete (with a marker), prompt 3 with 2 of 3 lines, a torn line
    damaged = [by_prompt[0][0], json.dumps(sentinel) + "\n", by_prompt[0][2], *by_prompt[3][:2],
               by_prompt[4][0][: len(by_prompt[4][0]) // 2]]
    path.write_text("".join(damaged))
    got = sample(model, tok, PROMPTS, out=path, **kw)
    assert got[0][1].text == "KEPT FROM FILE"  # a finished prompt is not sampled again
    assert got[0][::2] == want[0][::2] and got[1:] == want[1:]  # the rest is what the uninterrupted run gave
    records = read_records(path)
    keys = [(r["prompt_index"], r["sample_index"]) for r in records]
    assert sorted(keys) == [(i, j) for i in range(5) for j in range(3)]
    assert sample(model, tok, PROMPTS, out=JsonlLog(path), **kw) == got  # nothing left to do


def test_resume_refuses_a_file_from_another_job(model, tok, tmp_path):
    path = tmp_path / "samples.jsonl"
    sample(model, tok, PROMPTS, n=3, max_new_tokens=4, out=path)
    with pytest.raises(UserError, match="another sampling job"):
        sample(model, tok, PROMPTS, n=2, max_new_tokens=4, out=path)


KILLED_JOB = """
import sys, torch
torch.set_num_threads(1)
from lite_selftrain.models import build_model, build_tokenizer
from lite_selftrain.sampling import SamplingConfig, generate
tok = build_tokenizer()
model = build_model("tiny", vocab_size=len(tok), seed=0)
prompts = [f"problem {i}: " + "ab" * (i % 7) for i in range(160)]
print("ready", flush=True)
cfg = SamplingConfig(n=3, temperature=1.0, max_new_tokens=10, seed=9, batch_size=4)
generate(model, tok, prompts, cfg, out=sys.argv[1])
"""


def test_killed_job_resumes_with_one_record_per_sample(model, tok, tmp_path):
    path = tmp_path / "samples.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    job = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_JOB), str(path)], env=env,
                           stdout=subprocess.PIPE, start_new_session=True)
    assert job.stdout.readline().strip() == b"ready"
    deadline = time.time() + 60
    while (not path.exists() or path.stat().st_size == 0) and time.time() < deadline and job.poll() is None:
        time.sleep(0.005)
    os.killpg(job.pid, signal.SIGKILL)  # right after (or during) the first append
    job.wait()
    before = len(path.read_text().splitlines()) if path.exists() else 0
    prompts = [f"problem {i}: " + "ab" * (i % 7) for i in range(160)]
    kw = dict(n=3, temperature=1.0, max_new_tokens=10, seed=9, batch_size=4)
    got = sample(model, tok, prompts, out=path, **kw)
    keys = [(r["prompt_index"], r["sample_index"]) for r in read_records(path)]
    assert sorted(keys) == [(i, j) for i in range(160) for j in range(3)]
    assert 0 < before < len(keys)  # the kill really cut the job short
    assert got == sample(model, tok, prompts, **kw)


def test_progress_bar_reports_samples_and_tokens(model, tok, capsys):
    sample(model, tok, PROMPTS, n=2, max_new_tokens=4, progress=True)
    err = capsys.readouterr().err
    assert "10/10" in err and "tok/s" in err


# ----------------------------------------------------------------------------------------------------
# bad input


def test_bad_input(model, tok):
    assert sample(model, tok, [], n=4) == []
    for kwargs, message in [(dict(n=0), "n must"), (dict(temperature=-0.1), "temperature"),
                            (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                            (dict(stop=[""]), "stop"), (dict(backend="tgi"), "backend")]:
        with pytest.raises(UserError, match=message):
            sample(model, tok, PROMPTS, **kwargs)
    with pytest.raises(UserError, match="prompt 1 is empty"):
        sample(model, tok, ["ok", ""])


@pytest.fixture(scope="module")
def short(tok):
    """The tiny model with a 64-position context (RoPE does not depend on it): long prompts stay cheap."""
    model = build_model("tiny", vocab_size=len(tok), seed=0)
    model.config.max_position_embeddings = 64
    return model


def test_prompt_longer_than_the_context(short, tok):
    with pytest.raises(UserError, match="prompt 2 has 64 tokens"):
        sample(short, tok, ["a", "b", "y" * 64])
    with pytest.raises(UserError, match="leaves no room"):
        sample(short, tok, ["y" * 70], max_new_tokens=63, truncate=True)


def test_completions_stop_where_the_context_ends(short, tok):
    kw = dict(n=2, temperature=1.0, seed=4)
    got = sample(short, tok, ["z" * 58, "short"], max_new_tokens=20, batch_size=2, logprobs=True, **kw)
    assert [c.num_tokens for c in got[0]] == [6, 6] and [c.num_tokens for c in got[1]] == [20, 20]
    assert {c.finish_reason for g in got for c in g} == {"length"}
    assert_same(got[:1], sample(short, tok, ["z" * 58], max_new_tokens=6, logprobs=True, **kw))


def test_truncate_keeps_the_end_of_the_prompt(short, tok):
    long = "".join(chr(97 + i % 26) for i in range(100))
    kw = dict(n=2, temperature=1.0, max_new_tokens=12, seed=4)
    got = sample(short, tok, [long, "ok"], truncate=True, **kw)
    assert got == sample(short, tok, [long[-52:], "ok"], **kw)  # 52 + 12 = 64 positions


def test_completion_round_trip():
    c = Completion("hi", [1, 2], 2, "eos", -1.5, [-1.0, -0.5])
    assert Completion.from_dict({"prompt_index": 3, "sample_index": 0, **c.to_dict()}) == c
    assert SamplingConfig(stop="\n").stop == ("\n",)


def test_stop_none_means_no_stop_strings(model, tok):
    """As in vLLM and Hugging Face: `stop=None` passed to generate (or to a config) ends rows only at EOS
    or the length limit; keyword options replace the config's fields; unknown ones are refused."""
    kw = dict(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    plain = generate(model, tok, PROMPTS, SamplingConfig(**kw))
    stop = plain[0][0].text[4:6]  # a string sample 0 of prompt 0 writes: that row stops there
    stopped = generate(model, tok, PROMPTS, SamplingConfig(stop=[stop], **kw))
    assert stopped[0][0].finish_reason == "stop"
    free = generate(model, tok, PROMPTS, SamplingConfig(stop=[stop], **kw), stop=None)
    assert free == plain
    assert "stop" not in {c.finish_reason for g in free for c in g}
    assert SamplingConfig(stop=None).stop == () and SamplingConfig().for_task(type("T", (), dict(
        stop=None, max_new_tokens=5))()).stop == ()
    assert generate(model, tok, PROMPTS[:1], None, n=3, max_new_tokens=2)[0][2].num_tokens <= 2
    with pytest.raises(UserError, match="unknown sampling option"):
        generate(model, tok, PROMPTS, stop_strings=None)


# ----------------------------------------------------------------------------------------------------
# other backends and devices


@pytest.mark.gpu
def test_cuda_matches_reference(tok):
    model = build_model("tiny", vocab_size=len(tok), seed=0).cuda()
    kw = dict(n=2, temperature=0.0, max_new_tokens=10)
    got = sample(model, tok, PROMPTS, batch_size=2, logprobs=True, **kw)
    assert_same(got, naive_generate(model, tok, PROMPTS, **kw), atol=1e-3)


@pytest.mark.gpu
def test_vllm_backend(tmp_path):
    vllm = pytest.importorskip("vllm")
    from lite_selftrain.models import save_preset

    folder = save_preset("tiny", tmp_path / "tiny")
    llm = vllm.LLM(model=str(folder), gpu_memory_utilization=0.3)
    tok = build_tokenizer()
    kw = dict(n=3, temperature=1.0, max_new_tokens=8, seed=1, stop=["\n"], logprobs=True)
    got = sample(llm, tok, PROMPTS, backend="vllm", out=tmp_path / "s.jsonl", **kw)
    assert [len(g) for g in got] == [3] * len(PROMPTS)
    for c in (c for g in got for c in g):
        assert c.finish_reason in ("eos", "stop", "length") and c.num_tokens == len(c.token_ids) <= 8
        assert "\n" not in c.text and c.logprob == pytest.approx(sum(c.token_logprobs))
    assert sample(llm, tok, PROMPTS, backend="vllm", **kw) == got  # per-prompt seeds: reproducible
    assert sample(llm, tok, PROMPTS, backend="vllm", out=tmp_path / "s.jsonl", **kw) == got  # resumed
