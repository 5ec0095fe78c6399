"""The vLLM backend for real, on vLLM's CPU build: the same records as the native engine, recipes end to end.

Runs in the vLLM environment (docs/vllm.md): `pytest -q -m vllm`; without vllm the module is skipped.
Engine starts cost seconds each, so one server is shared by the module's sampling tests.

The greedy comparisons use a trained model (the tiny preset warm-started on sums): with random weights the
top two tokens are often within 1e-3 of each other, and vLLM's kernels sum in another order than torch's,
so a tie may break either way; a trained model's choices are clear.
"""

import json
import math
import shutil
import warnings

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM environment runs these (docs/vllm.md)")

from lite_selftrain.config import from_dict  # noqa: E402
from lite_selftrain.demo import world as demo  # noqa: E402
from lite_selftrain.errors import UserError  # noqa: E402
from lite_selftrain.models import ModelConfig, load_model  # noqa: E402
from lite_selftrain.recipes import rest_em, rpo  # noqa: E402
from lite_selftrain.sampling import SamplingConfig, generate  # noqa: E402
from lite_selftrain.sampling.vllm_backend import VllmServer, cpu_build  # noqa: E402
from lite_selftrain.store import read_jsonl  # noqa: E402
from lite_selftrain.tasks import get_task  # noqa: E402

pytestmark = pytest.mark.vllm
TASK = dict(terms=3, n_train=48, n_test=32, shots=0)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """The tiny preset taught 2-3 term sums: a model whose greedy choices are clear."""
    cfg = demo.DemoConfig(preset="tiny", warm_examples=600, warm_long_examples=0, warm_steps=80, terms=3)
    return str(demo.warm_start(cfg, tmp_path_factory.mktemp("warm"), progress=False))


@pytest.fixture(scope="module")
def native(warm):
    return load_model(ModelConfig(name=warm, mode="full"))


@pytest.fixture(scope="module")
def server(warm, native):
    with VllmServer(tokenizer=native[1], source=warm) as server:
        yield server


def prompts():
    task = get_task("arith", **TASK)
    return [task.prompt(ex) for ex in task.load("test")], task


def test_greedy_records_match_the_native_engine(native, server):
    model, tok = native
    texts, task = prompts()
    cfg = SamplingConfig(n=2, temperature=0, max_new_tokens=24).for_task(task)
    first = generate(model, tok, texts[:1], cfg)[0][0].text
    cfg = cfg.replace(stop=(*cfg.stop, first[3:5]))  # a stop string some completions meet
    want = generate(model, tok, texts, cfg, logprobs=True)
    got = generate(server, tok, texts, cfg.replace(backend="vllm"), logprobs=True)
    assert server.starts == 1
    reasons = set()
    for w_group, g_group in zip(want, got):
        assert len(g_group) == 2
        for w, g in zip(w_group, g_group):
            assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason
            assert g.num_tokens == len(g.token_ids) and g.seeded
            assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-4)
            assert g.logprob == pytest.approx(sum(g.token_logprobs))
            reasons.add(g.finish_reason)
    assert {"stop", "eos"} <= reasons  # a stop string ended some, cut from the text as natively
    short = cfg.replace(max_new_tokens=3, stop=())
    got = generate(server, tok, texts[:4], short.replace(backend="vllm"))
    assert [[(c.token_ids, c.finish_reason) for c in g] for g in got] == [
        [(c.token_ids, c.finish_reason) for c in g] for g in generate(model, tok, texts[:4], short)]
    assert {c.finish_reason for g in got for c in g} == {"length"}
    assert server.starts == 1  # every call on the one engine


def test_samples_per_prompt_and_a_resumed_file(server, native, tmp_path):
    tok = native[1]
    texts, task = prompts()
    cfg = SamplingConfig(n=3, temperature=1.0, max_new_tokens=24, backend="vllm").for_task(task)
    out = tmp_path / "samples.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = generate(server, tok, texts, cfg, out=out, logprobs=True)
    assert [len(g) for g in groups] == [3] * len(texts)
    assert all(c.seeded is not cpu_build() for g in groups for c in g)  # the CPU build draws unseeded
    assert any("takes no seeds" in str(w.message) for w in caught) == cpu_build()
    records = read_jsonl(out)
    assert all(r["seeded"] is not cpu_build() for r in records)
    # a killed job: the first 5 prompts whole, one sample of the 6th, a torn line
    kept = [r for r in records if r["prompt_index"] < 5]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept + [records[15]]) + '{"prompt_index": 7, "te')
    again = generate(server, tok, texts, cfg, out=out, logprobs=True)
    pairs = [(r["prompt_index"], r["sample_index"]) for r in read_jsonl(out)]
    assert sorted(pairs) == [(i, j) for i in range(len(texts)) for j in range(3)]  # one record each
    assert [[c.to_dict() for c in g] for g in again[:5]] == [[c.to_dict() for c in g] for g in groups[:5]]
    assert server.starts == 1


QUESTIONS = ["Hi!", "What is 2 + 3?", "Name a colour.", "Say yes or no: is the sky blue?",
             "Write one short sentence about a cat that likes to sleep in the sun all afternoon.",
             "What is 27 plus 82? Answer with a number."]


def test_smollm2_greedy_matches_the_native_engine():
    """After the tests on the module's server: closing an engine ends vLLM's process-wide state (see
    `VllmServer.close`).
    A real model (SmolLM2-135M-Instruct, fp32, in its chat template): the same greedy tokens, the same
    end-of-turn stops, the same log-probs to float rounding."""
    from lite_selftrain.models import format_prompt, gguf

    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct", mode="full", device="cpu"))
    texts = [format_prompt(tok, q) for q in QUESTIONS]
    cfg = SamplingConfig(temperature=0, max_new_tokens=24, stop=("\n\n",))
    want = generate(model, tok, texts, cfg, logprobs=True)
    with VllmServer(tokenizer=tok, source=str(gguf.resolve("smollm2-135m-instruct"))) as server:
        got = generate(server, tok, texts, cfg.replace(backend="vllm"), logprobs=True)
    assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]
    assert [g[0].text for g in got] == [w[0].text for w in want]
    assert [g[0].finish_reason for g in got] == [w[0].finish_reason for w in want]
    assert {w[0].finish_reason for w in want} >= {"eos", "length"}
    for g, w in zip(got, want):
        assert g[0].token_logprobs == pytest.approx(w[0].token_logprobs, abs=1e-3)


def test_a_killed_sample_command_resumes(warm, tmp_path):
    """`lite-selftrain sample --backend vllm`, SIGKILLed once its file has records, then run again."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s.jsonl"
    cmd = [sys.executable, "-m", "lite_selftrain", "sample", "--model", warm, "--mode", "full", "--backend", "vllm",
           "--task", "arith", "--limit", "400", "--n", "4", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.stat().st_size > 2000):
        time.sleep(0.2)
    finished_first = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished_first, "the job ended before it could be killed: give it more prompts"
    partial = len(read_jsonl(out)) if out.exists() else 0
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pairs = [(r["prompt_index"], r["sample_index"]) for r in read_jsonl(out)]
    assert sorted(pairs) == [(i, j) for i in range(400) for j in range(4)]
    assert 0 < partial < 1600  # it was killed part-way, and resumed from there


def test_errors_are_one_line(warm, native, tmp_path):
    tok = native[1]
    bad = tmp_path / "unknown"
    shutil.copytree(warm, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    cfg = SamplingConfig(max_new_tokens=4, backend="vllm")
    with pytest.raises(UserError, match="vLLM cannot serve the model in") as e:
        generate(str(bad), tok, ["1+2="], cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="too little memory for the KV cache") as e:
        generate(warm, tok, ["1+2="], cfg.replace(kv_cache_gib=1e-4))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# recipes end to end: vLLM against the native backend


def recipe_config(name, warm, mode, backend):
    sample = {"n": 6, "temperature": 1.0, "batch_size": 8, "backend": backend}
    cfg = {"task": "arith", "task_options": TASK, "iterations": 1, "problems_per_iteration": 24,
           "model": {"name": warm, "mode": mode, "lora_dropout": 0.0}, "sample": sample,
           "eval": {"sample": {"n": 1, "batch_size": 32, "backend": backend}, "validation_size": 8},
           "train": {"max_steps": 6, "batch_size": 8, "grad_accum": 1, "checkpoint_every": 3, "log_every": 1,
                     "objective": "rwnll" if name == "rest_em" else "dpo_nll", "lr": 1e-3}}
    if name == "rpo":
        cfg |= {"pairs_per_problem": 2, "temperatures": []}
    return cfg


def noise(p: float, n: int) -> float:
    """Three standard errors of a difference of two proportions near p over n draws each, plus one draw."""
    return 3 * math.sqrt(2 * max(p * (1 - p), 0.05) / n) + 1 / n


@pytest.mark.parametrize("name, mode", [("rest_em", "lora"), ("rpo", "qlora")])
def test_recipe_with_vllm_matches_native_within_noise(name, mode, warm, tmp_path, monkeypatch):
    module, cls = {"rest_em": (rest_em, rest_em.RestEMConfig), "rpo": (rpo, rpo.RPOConfig)}[name]
    started, real = [], vllm.LLM

    def counted(**options):  # vLLM's own class, each start noted
        started.append(options["model"])
        return real(**options)

    monkeypatch.setattr(vllm, "LLM", counted)
    runs = {}
    for backend in ("native", "vllm"):
        cfg = from_dict(cls, recipe_config(name, warm, mode, backend))
        runs[backend] = module.run(cfg, tmp_path / backend, progress=False)[0]
    # one engine per iterate, on its merged weights: M_0's served its evaluation and the E-step, M_1's its own
    assert started == [str(tmp_path / "vllm" / name / f"iter_0{t}" / "policy") for t in (0, 1)]
    folder = tmp_path / "vllm" / name
    assert (folder / "iter_00" / "policy" / "config.json").exists() and (folder / "iter_01" / "policy").exists()
    native, served = runs["native"], runs["vllm"]
    assert served[0]["test_pass@1"] == native[0]["test_pass@1"]  # the same policy, greedy
    samples = read_jsonl(folder / "iter_01" / "samples.jsonl")
    assert len(samples) == 24 * 6 and all(r["seeded"] is not cpu_build() for r in samples)
    scored = {b: read_jsonl(tmp_path / b / name / "iter_01" / "scored.jsonl") for b in runs}
    rate = {b: sum(r["reward"] > 0 for r in s) / len(s) for b, s in scored.items()}
    assert abs(rate["vllm"] - rate["native"]) <= noise(rate["native"], len(samples))
    p = native[1]["test_pass@1"]
    assert abs(served[1]["test_pass@1"] - p) <= noise(p, TASK["n_test"])
    assert served[1]["dataset_size"] > 0 and native[1]["dataset_size"] > 0


DATA_PARALLEL = """
import json, sys
from lite_selftrain import distributed
from lite_selftrain.models import load_model, ModelConfig
from lite_selftrain.sampling import SamplingConfig, generate
from lite_selftrain.sampling.vllm_backend import VllmServer
distributed.init()
model, tok = load_model(ModelConfig(name=sys.argv[1], mode="full"))
prompts = json.loads(sys.argv[2])
cfg = SamplingConfig(n=2, temperature=0, max_new_tokens=int(sys.argv[3]), backend="vllm")
with VllmServer(model, tok, folder=sys.argv[4] + "/policy") as server:
    groups = generate(server, tok, prompts, cfg, out=sys.argv[4] + "/s.jsonl")
distributed.barrier()  # the launcher's group outlives the engines
with open(f"{sys.argv[4]}/rank{distributed.rank()}.json", "w") as f:
    json.dump([[c.token_ids for c in g] for g in groups], f)
"""


def test_data_parallel_under_torchrun(warm, native, tmp_path):
    """Two processes, each its own engine in vLLM's external-launcher mode: on GPUs every rank returns every
    prompt's greedy samples and one file holds one record per (prompt, sample); vLLM's CPU build is refused
    in one line (its data-parallel ranks hang at random there)."""
    import os
    import subprocess
    import sys

    model, tok = native
    texts = prompts()[0][:7]  # odd: the ranks get unequal shares and step together
    want = generate(model, tok, texts, SamplingConfig(n=2, temperature=0, max_new_tokens=16))
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "dp.py"), warm, json.dumps(texts), "16", str(tmp_path)]
    (tmp_path / "dp.py").write_text(DATA_PARALLEL)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if cpu_build():
        assert done.returncode != 0 and "under torchrun needs GPUs" in done.stderr, done.stderr[-3000:]
        return
    assert done.returncode == 0, done.stderr[-3000:]
    expected = [[c.token_ids for c in g] for g in want]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
    pairs = sorted((r["prompt_index"], r["sample_index"]) for r in read_jsonl(tmp_path / "s.jsonl"))
    assert pairs == [(i, j) for i in range(7) for j in range(2)]
