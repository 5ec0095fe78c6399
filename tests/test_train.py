"""The trainer on the tiny preset: tokenisation and batching, first-step losses against a naive logits
computation, cached reference log-probs, exact resumption (in process and after SIGKILL), the NaN
guard, and a QLoRA DPO+NLL run that separates chosen from rejected."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lite_selftrain.errors import UserError
from lite_selftrain.models import ModelConfig, build_tokenizer, load_model
from lite_selftrain.store import JsonlLog
from lite_selftrain.training.batching import collate, encode_records, plan_epoch
from lite_selftrain.training.logprobs import split_body_head
from lite_selftrain.training.reference import compute_reference_logps
from lite_selftrain.training.trainer import TrainConfig, lr_factor, train

SFT = [{"prompt": f"{a}+{b}=", "response": f"{a + b}" + " ok" * (a % 3), "reward": [1.0, 0.5, 0.0, 2.0][a % 4]}
       for a, b in [(3, 4), (12, 30), (7, 7), (101, 5), (9, 1), (48, 2)]]
PAIRS = [{"prompt": f"Q: {a}+{b}?\nA:", "chosen": f" {a + b}", "rejected": f" {a + b + 1} maybe"}
         for a, b in [(1, 2), (3, 5), (10, 4), (7, 8), (21, 3), (6, 6), (40, 2), (9, 9)]]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(mode="full", seed=0, **kw):
    torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global generator
    return load_model(ModelConfig(name="tiny", mode=mode, **kw))


def _naive_logp(model, tok, prompt, response):
    """Sum of response+EOS token log-probs from the model's full logits, one unpadded sequence."""
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + r])
    was_training = model.training
    model.eval()  # no dropout
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]  # (T-1, V)
    model.train(was_training)
    per_token = logp.gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,)
    return per_token[len(p) - 1:].sum().item(), len(r)


def _metrics(out):
    return JsonlLog(Path(out) / "metrics.jsonl").read()


# ----------------------------------------------------------------------------------------------------
# tokenisation and batching


def test_encode_layout_truncation_and_dropping():
    tok = build_tokenizer()
    recs = [{"prompt": "abc", "response": "xy"}, {"prompt": "p" * 10, "response": "r"},
            {"prompt": "abcd", "response": "long response"}]
    examples, stats = encode_records(tok, recs, "rwnll", max_length=8)
    assert stats == {"records": 3, "examples": 2, "dropped_too_long": 1, "truncated": 1}
    first = examples[0]
    expected = tok("abc")["input_ids"] + tok("xy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert first.rows[0].tolist() == expected and first.prompt_len == 3 and first.reward == 1.0
    assert len(examples[1].rows[0]) == 8 and examples[1].response_lengths() == [4]  # cut at max_length

    batch = collate(examples, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["loss_mask"][0].tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 2
    assert batch["input_ids"][0, 6:].tolist() == [tok.pad_token_id] * 2
    assert batch["lengths"].tolist() == [3, 4]


def test_pairs_collate_chosen_rows_first():
    tok = build_tokenizer()
    examples, _ = encode_records(tok, PAIRS[:3], "dpo_nll", max_length=64)
    batch = collate(examples, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    for i, rec in enumerate(PAIRS[:3]):
        for row, field in ((i, "chosen"), (i + 3, "rejected")):
            n = int(batch["attention_mask"][row].sum())
            assert tok.decode(batch["input_ids"][row, :n]) == rec["prompt"] + rec[field] + tok.eos_token


def test_bad_records_and_configs_are_user_errors():
    tok = build_tokenizer()
    with pytest.raises(UserError, match="record 1 lacks"):
        encode_records(tok, [PAIRS[0], {"prompt": "x", "chosen": "y"}], "dpo_nll", max_length=64)
    with pytest.raises(UserError, match="objective"):
        TrainConfig(objective="ppo")
    with pytest.raises(UserError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_plan_covers_every_example_once_deterministically_with_little_padding():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 300, (203,), generator=gen).tolist()
    kw = dict(step_size=8, micro_size=4, window=5, seed=3)
    plan = plan_epoch(lengths, epoch=0, **kw)
    flat = [i for step in plan for mb in step for i in mb]
    assert sorted(flat) == list(range(203))
    assert all(len(mb) <= 4 for step in plan for mb in step) and all(len(s) <= 2 for s in plan)
    assert plan == plan_epoch(lengths, epoch=0, **kw)
    assert plan != plan_epoch(lengths, epoch=1, **kw)

    def padding(p):
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for s in p for mb in s)

    unsorted = plan_epoch(lengths, epoch=0, step_size=8, micro_size=4, window=0, seed=3)
    perm = torch.randperm(203, generator=gen).tolist()
    shuffled = [[perm[j:j + 4]] for j in range(0, 203, 4)]  # plain random batches of the same size
    assert padding(plan) < 0.25 * padding(shuffled)
    assert padding(unsorted) < padding(shuffled)  # window 0 still sorts within each step


def test_lr_schedule():
    assert [lr_factor(s, warmup=2, total=6, schedule="cosine") for s in range(2)] == [0.5, 1.0]
    assert lr_factor(2, warmup=2, total=6, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(4, warmup=2, total=6, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(6, warmup=2, total=6, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(5, warmup=2, total=6, schedule="constant") == 1.0


# ----------------------------------------------------------------------------------------------------
# first-step losses against full logits


@pytest.mark.parametrize("objective", ["sft", "rwnll"])
def test_first_step_nll_matches_naive_logits(tmp_path, objective):
    model, tok = _model()
    naive = [_naive_logp(model, tok, r["prompt"], r["response"]) for r in SFT]
    rewards = [r["reward"] if objective == "rwnll" else 1.0 for r in SFT]
    expected = -sum(w * lp for w, (lp, _) in zip(rewards, naive)) / sum(n for w, (_, n) in zip(rewards, naive) if w)
    cfg = TrainConfig(objective=objective, max_steps=1, batch_size=4, grad_accum=2, log_every=1)
    summary = train(model, tok, SFT, cfg, tmp_path)  # one step of 2 micro-batches covers all 6 records
    assert summary["steps"] == 1 and summary["tokens"] == sum(len(tok(r["prompt"] + r["response"])["input_ids"]) + 1
                                                              for r in SFT)
    assert _metrics(tmp_path)[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_first_step_dpo_nll_matches_naive_logits(tmp_path):
    model, tok = _model("lora")
    chosen = [_naive_logp(model, tok, r["prompt"], r["chosen"]) for r in PAIRS]  # adapter starts at zero
    nll = sum(-lp / n for lp, n in chosen) / len(PAIRS)
    cfg = TrainConfig(objective="dpo_nll", max_steps=1, batch_size=3, grad_accum=3, log_every=1)
    train(model, tok, PAIRS, cfg, tmp_path)
    first = _metrics(tmp_path)[0]
    assert first["dpo"] == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item(), abs=1e-5)  # log 2
    assert first["nll"] == pytest.approx(nll, rel=1e-5)
    assert first["loss"] == pytest.approx(first["dpo"] + first["nll"], rel=1e-6)
    assert first["logp_chosen"] == pytest.approx(sum(lp for lp, _ in chosen) / len(PAIRS), rel=1e-5)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    firsts = []
    for i, (bs, ga) in enumerate([(2, 4), (8, 1)]):
        model, tok = _model("lora")
        cfg = TrainConfig(objective="dpo_nll", nll_norm="token", max_steps=1, batch_size=bs, grad_accum=ga,
                          log_every=1)
        train(model, tok, PAIRS, cfg, tmp_path / str(i), reference_cache=tmp_path / "ref.pt")
        firsts.append(_metrics(tmp_path / str(i))[0])
    for key in ("loss", "dpo", "nll", "grad_norm", "margin", "logp_chosen"):
        assert firsts[0][key] == pytest.approx(firsts[1][key], rel=1e-5, abs=1e-7), key


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    norms = []
    for ckpt in (False, True):
        model, tok = _model("lora", gradient_checkpointing=ckpt)
        cfg = TrainConfig(objective="sft", max_steps=1, batch_size=6, grad_accum=1, log_every=1)
        train(model, tok, SFT, cfg, tmp_path / str(ckpt))
        norms.append(_metrics(tmp_path / str(ckpt))[0]["grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# reference log-probs


class _CountForwards:
    def __init__(self, model):
        self.calls = 0
        self.handle = split_body_head(model)[0].register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


def test_reference_logps_are_exact_cached_and_reused(tmp_path):
    model, tok = _model("lora")
    with torch.no_grad():  # give the adapter weight so "adapter_off" and "current" differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    cache = tmp_path / "pairs.ref.pt"
    counter = _CountForwards(model)
    ref = compute_reference_logps(model, tok, PAIRS, batch_size=3, cache_path=cache)
    assert counter.calls == 3 and cache.exists()
    with model.disable_adapter():
        naive = [[_naive_logp(model, tok, r["prompt"], r[f])[0] for f in ("chosen", "rejected")] for r in PAIRS]
    torch.testing.assert_close(ref, torch.tensor(naive), rtol=1e-5, atol=1e-4)

    counter.calls = 0
    again = compute_reference_logps(model, tok, PAIRS, batch_size=3, cache_path=cache)
    assert counter.calls == 0 and torch.equal(again, ref)  # no reference pass the second time

    current = compute_reference_logps(model, tok, PAIRS, reference="current", batch_size=8, cache_path=cache)
    assert counter.calls == 1  # another key: computed again, with the adapter on
    naive_on = [[_naive_logp(model, tok, r["prompt"], r[f])[0] for f in ("chosen", "rejected")] for r in PAIRS]
    torch.testing.assert_close(current, torch.tensor(naive_on), rtol=1e-5, atol=1e-4)
    assert (current - ref).abs().max() > 1e-2
    counter.handle.remove()


def test_second_training_run_takes_reference_from_cache(tmp_path):
    cfg = TrainConfig(objective="dpo_nll", max_steps=2, batch_size=4, grad_accum=1)
    summaries, calls = [], []
    for run in ("a", "b"):
        model, tok = _model("lora")
        counter = _CountForwards(model)
        summaries.append(train(model, tok, PAIRS, cfg, tmp_path / run, reference_key="tiny-base",
                               reference_cache=tmp_path / "pairs.ref.pt"))
        calls.append(counter.calls)
    assert [s["reference"] for s in summaries] == ["computed", "cache"]
    assert calls == [1 + 2, 2]  # one reference batch (8 pairs) + 2 steps; then the 2 steps only


# ----------------------------------------------------------------------------------------------------
# checkpoints and resumption


class _Crash(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    cfg = TrainConfig(objective="rwnll", lr=3e-3, max_steps=7, batch_size=2, grad_accum=1, checkpoint_every=3,
                      log_every=2, warmup_ratio=0.3)
    model, tok = _model()
    done = train(model, tok, SFT, cfg, tmp_path / "whole")
    whole = {k: v.clone() for k, v in model.state_dict().items()}

    model, tok = _model()
    calls = {"n": 0}

    def crash(*_):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5, after the checkpoint of step 3
            raise _Crash

    handle = split_body_head(model)[0].register_forward_hook(crash)
    with pytest.raises(_Crash):
        train(model, tok, SFT, cfg, tmp_path / "cut")
    handle.remove()
    assert not (tmp_path / "cut" / "summary.json").exists()
    model, tok = _model()  # a fresh process would start from the initial weights again
    resumed = train(model, tok, SFT, cfg, tmp_path / "cut")
    assert resumed["resumed_from_step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, whole[k]), k
    logged = [(r["step"], r["loss"]) for r in _metrics(tmp_path / "cut")]
    assert logged == [(r["step"], r["loss"]) for r in _metrics(tmp_path / "whole")]
    assert [step for step, _ in logged] == [2, 3, 4, 6, 7]  # every 2 steps, at checkpoints, at the end

    model, tok = _model()  # a finished run: no training, final weights loaded, same summary
    counter = _CountForwards(model)
    assert train(model, tok, SFT, cfg, tmp_path / "cut") == resumed
    assert counter.calls == 0 and all(torch.equal(v, whole[k]) for k, v in model.state_dict().items())
    assert resumed["final"] == done["final"]
    with pytest.raises(UserError, match="another config"):
        train(model, tok, SFT, TrainConfig(objective="rwnll", max_steps=8), tmp_path / "cut")


_KILL_CFG = dict(objective="dpo_nll", lr=2e-3, max_steps=16, batch_size=2, grad_accum=2, checkpoint_every=4,
                 log_every=4)
_SCRIPT = textwrap.dedent(f"""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from lite_selftrain.training.logprobs import split_body_head
    from lite_selftrain.models import ModelConfig, load_model
    from lite_selftrain.training import TrainConfig, train

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name="tiny", mode="full"))
    split_body_head(model)[0].register_forward_hook(lambda *a: time.sleep(0.05))  # slow enough to kill mid-run
    train(model, tok, json.load(open(sys.argv[2])), TrainConfig(**{_KILL_CFG!r}), sys.argv[1])
""")


def test_sigkilled_run_resumes_to_identical_weights(tmp_path):
    script, data, cut = tmp_path / "run.py", tmp_path / "pairs.json", tmp_path / "cut"
    script.write_text(_SCRIPT)
    data.write_text(json.dumps(PAIRS))
    proc = subprocess.Popen([sys.executable, str(script), str(cut), str(data)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (cut / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (cut / "summary.json").exists()
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert not state["done"] and 4 <= state["counters"]["step"] < 16

    cfg = TrainConfig(**_KILL_CFG)  # resume here, as a fresh process would: initial weights, same data
    model, tok = _model()
    resumed = train(model, tok, PAIRS, cfg, cut)
    model_whole, tok = _model()
    train(model_whole, tok, PAIRS, cfg, tmp_path / "whole")
    whole = model_whole.state_dict()
    assert all(torch.equal(v, whole[k]) for k, v in model.state_dict().items())
    assert resumed["reference"] == "cache" and resumed["resumed_from_step"] >= 4  # not recomputed mid-run
    assert [r["step"] for r in _metrics(cut)] == [4, 8, 12, 16]
    assert [r["loss"] for r in _metrics(cut)] == [r["loss"] for r in _metrics(tmp_path / "whole")]


# ----------------------------------------------------------------------------------------------------
# NaN guard


def _poison(model, bad_calls):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] in bad_calls:
            output.last_hidden_state.mul_(float("nan"))
        return output

    return split_body_head(model)[0].register_forward_hook(hook)


def test_nan_step_is_skipped_and_counted(tmp_path):
    model, tok = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _poison(model, {1})
    cfg = TrainConfig(objective="sft", max_steps=1, batch_size=6, grad_accum=1)
    summary = train(model, tok, SFT, cfg, tmp_path / "one")
    assert summary["skipped_steps"] == 1 and summary["optimizer_steps"] == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing moved

    model, tok = _model()
    _poison(model, {2})
    cfg = TrainConfig(objective="sft", max_steps=4, batch_size=2, grad_accum=1, log_every=4, nan_patience=2)
    summary = train(model, tok, SFT, cfg, tmp_path / "few")
    assert summary["skipped_steps"] == 1 and summary["optimizer_steps"] == 3
    last = _metrics(tmp_path / "few")[-1]
    assert last["skipped_steps"] == 1 and torch.isfinite(torch.tensor(last["loss"]))


def test_nan_streak_stops_with_a_clear_error(tmp_path):
    model, tok = _model()
    _poison(model, {2, 3, 4})
    cfg = TrainConfig(objective="sft", max_steps=6, batch_size=2, grad_accum=1, nan_patience=3)
    with pytest.raises(UserError, match="3 steps in a row"):
        train(model, tok, SFT, cfg, tmp_path)


# ----------------------------------------------------------------------------------------------------
# QLoRA DPO + NLL learns the preference


def test_qlora_dpo_nll_raises_the_margin(tmp_path):
    model, tok = _model("qlora")
    assert any("4bit" in type(m).__name__ for m in model.modules())
    cfg = TrainConfig(objective="dpo_nll", lr=5e-3, max_steps=24, batch_size=4, grad_accum=1, log_every=4,
                      warmup_ratio=0.0)
    summary = train(model, tok, PAIRS, cfg, tmp_path, progress=True)
    ref = torch.load(tmp_path / "reference_logps.pt", weights_only=True)["logps"]  # (N, 2)
    model.eval()
    policy = torch.tensor([[_naive_logp(model, tok, r["prompt"], r[f])[0] for f in ("chosen", "rejected")]
                           for r in PAIRS])
    margin = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])  # log-ratio margin per pair
    assert margin.mean() > 1.0 and (margin > 0).all()
    assert policy[:, 0].mean() > ref[:, 0].mean()  # with the NLL term the chosen log-prob rises
    logged = _metrics(tmp_path)
    assert logged[-1]["margin"] > logged[0]["margin"] and summary["final"]["reward_acc"] == 1.0


@pytest.mark.gpu
def test_cuda_bf16_lora_dpo_nll_with_paged_8bit_adamw(tmp_path):
    model, tok = _model("lora", device="cuda")  # bf16 weights on CUDA, fp32 adapter, bf16 autocast
    cfg = TrainConfig(objective="dpo_nll", lr=5e-3, max_steps=12, batch_size=4, grad_accum=1, log_every=4,
                      warmup_ratio=0.0)
    summary = train(model, tok, PAIRS, cfg, tmp_path)
    logged = _metrics(tmp_path)
    assert summary["skipped_steps"] == 0 and summary["peak_mem_mb"] > 0
    assert summary["optimizer"] == "PagedAdamW8bit"
    assert logged[-1]["margin"] > logged[0]["margin"] and logged[-1]["reward_acc"] >= 0.75
