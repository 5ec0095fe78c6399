"""Malformed stage files, model folders, task options and tensors, each refused in one line before any work;
and the stage commands rerun (`score`, `build`) and resume (`sample`) over an `--out` file of their own kind,
refusing any other file with a line that says why (the wider command-line and API cases are in
test_bad_inputs.py and test_bad_api_inputs.py).
"""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from lite_selftrain.kernels import fused_logprob

from lite_selftrain.config import from_dict
from lite_selftrain.models import ModelConfig, load_model, save_model, save_preset
from lite_selftrain.recipes import self_rewarding
from lite_selftrain.recipes.centrality import CentralityConfig
from lite_selftrain.recipes.rest_em import RestEMConfig
from lite_selftrain.sampling import SamplingConfig, generate
from lite_selftrain.tasks import get_task

EX = Path(__file__).resolve().parents[1] / "examples"
REST = EX / "rest_em_gsm8k_150m.toml"
H, W, T = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))


def main(argv: list[str]) -> None:
    """`python -m lite_selftrain ARGS`, in this process."""
    old, sys.argv = sys.argv, ["lite-selftrain", *map(str, argv)]
    try:
        runpy.run_module("lite_selftrain", run_name="__main__", alter_sys=False)
    finally:
        sys.argv = old


def scored(i, j, reward="1.0", text="a", finish="eos"):
    return (f'{{"prompt_index": {i}, "sample_index": {j}, "text": "{text}", "finish_reason": "{finish}", '
            f'"reward": {reward}}}\n')


FILES = {
    "scored_inf.jsonl": scored(0, 0) + scored(0, 1, "Infinity"),
    "scored_nan.jsonl": scored(0, 0, "NaN"),
    "scored_neginf.jsonl": scored(0, 0, "-Infinity"),
    "scored_twice.jsonl": scored(0, 0) + scored(0, 1, "0.0", "b") + scored(0, 0),
    "scored_finish.jsonl": scored(0, 0, finish="lenght"),
    "scored_ids.jsonl": '{"prompt_index": 0, "sample_index": 0, "text": "a", "finish_reason": "eos", "reward": 1, '
                        '"token_ids": ["x"]}\n',
    "scored_negsample.jsonl": scored(0, -1),
    "samples_hashed.jsonl": scored(0, 0).replace("{", '{"prompt_hash": "0123456789abcdef", ', 1),
    "samples_twice.jsonl": '{"prompt_index": 0, "sample_index": 1, "text": "a"}\n' * 2,
    "apps_badjson.jsonl": '{"question": "q", "input_output": "{not json"}\n',
    "apps_inputs.jsonl": '{"question": "q", "input_output": {"inputs": "1 2", "outputs": ["3"]}}\n',
    "apps_samples.jsonl": '{"prompt_index": 0, "sample_index": 0, "text": "print(3)"}\n',
    "notes.txt": "my notes, not samples\n",
    "dataset.jsonl": '{"prompt": "p", "response": "r", "reward": 1.0}\n',
    "dataset_inf.jsonl": '{"prompt": "p", "response": "r", "reward": Infinity}\n',
    "badmodel/config.json": "[1, 2]",
    "bertmodel/config.json": '{"model_type": "bert"}',
}

CLI_CASES = [  # (id, command line with {t} for the case's folder, text the one error line must contain)
    ("unsafe-sandbox-not-table", ["rest-em", "--config", REST, "--out", "{t}/run", "--unsafe-sandbox", "--set",
                                  "task='apps'", "--set", "task_options={sandbox=5}"],
     "task_options.sandbox must be a table, got 5"),
    ("build-inf-reward", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                          "{t}/scored_inf.jsonl", "--out", "{t}/d.jsonl"],
     "scored_inf.jsonl:2: 'reward' must be a finite number, got Infinity"),
    ("build-nan-reward", ["build", "--recipe", "rpo", "--task", "arith", "--limit", "2", "--scored",
                          "{t}/scored_nan.jsonl", "--out", "{t}/d.jsonl"],
     "scored_nan.jsonl:1: 'reward' must be a finite"),
    ("build-neginf-reward", ["build", "--recipe", "rpo", "--task", "arith", "--limit", "2", "--scored",
                             "{t}/scored_neginf.jsonl", "--out", "{t}/d.jsonl"], "scored_neginf.jsonl:1"),
    ("build-duplicate", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                         "{t}/scored_twice.jsonl", "--out", "{t}/d.jsonl"],
     "scored_twice.jsonl:3: a second record for prompt_index 0, sample_index 0 (the first is line 1)"),
    ("build-finish-typo", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                           "{t}/scored_finish.jsonl", "--out", "{t}/d.jsonl"], "'finish_reason' must be one of"),
    ("build-ids", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                   "{t}/scored_ids.jsonl", "--out", "{t}/d.jsonl"], "'token_ids' must be a list of token ids"),
    ("build-negative-sample", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                               "{t}/scored_negsample.jsonl", "--out", "{t}/d.jsonl"], "'sample_index' must be"),
    ("score-other-prompts", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_hashed.jsonl",
                             "--out", "{t}/s.jsonl"], "samples_hashed.jsonl: prompt 0 of the file is not this job's"),
    ("build-other-prompts", ["build", "--recipe", "rpo", "--task", "arith", "--limit", "2", "--scored",
                             "{t}/samples_hashed.jsonl", "--out", "{t}/d.jsonl"], "is not this job's prompt 0"),
    ("score-duplicate", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_twice.jsonl",
                         "--out", "{t}/s.jsonl"], "samples_twice.jsonl:2: a second record"),
    ("score-apps-json", ["score", "--task", "apps", "--data", "{t}/apps_badjson.jsonl", "--samples",
                         "{t}/apps_samples.jsonl", "--out", "{t}/s.jsonl"], "input_output is not valid JSON"),
    ("score-apps-inputs", ["score", "--task", "apps", "--data", "{t}/apps_inputs.jsonl", "--samples",
                           "{t}/apps_samples.jsonl", "--out", "{t}/s.jsonl"], "input_output.inputs must be a list"),
    ("score-over-samples", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/apps_samples.jsonl",
                            "--out", "{t}/apps_samples.jsonl"], "exists and is not a scored samples file"),
    ("score-over-notes", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/apps_samples.jsonl",
                          "--out", "{t}/notes.txt"], "notes.txt exists and is not a scored samples file"),
    ("build-over-scored", ["build", "--recipe", "rpo", "--task", "arith", "--limit", "2", "--scored",
                           "{t}/scored_nan.jsonl", "--out", "{t}/scored_inf.jsonl"], "is not a rpo training set"),
    ("build-over-other-recipe", ["build", "--recipe", "rpo", "--task", "arith", "--limit", "2", "--scored",
                                 "{t}/scored_twice.jsonl", "--out", "{t}/dataset.jsonl"], "has no 'chosen'"),
    ("sample-over-notes", ["sample", "--task", "arith", "--limit", "2", "--out", "{t}/notes.txt"],
     "notes.txt:1: malformed JSON line"),
    ("sample-over-scored", ["sample", "--task", "arith", "--limit", "2", "--out", "{t}/scored_nan.jsonl"],
     "scored_nan.jsonl:1"),
    ("recipe-fsdp-lora", ["rest-em", "--config", REST, "--out", "{t}/run", "--set", "train.parallel='fsdp'"],
     "train.parallel fsdp is for full fine-tuning (model.mode full), not model.mode qlora"),
    ("train-fsdp-lora", ["train", "--data", "{t}/dataset.jsonl", "--set", "parallel='fsdp'", "--out", "{t}/run"],
     "parallel fsdp is for full fine-tuning"),
    ("train-inf-reward", ["train", "--data", "{t}/dataset_inf.jsonl", "--set", "objective='rwnll'", "--out",
                          "{t}/run"], "dataset_inf.jsonl:1: 'reward' must be a finite number"),
    ("recipe-model-config", ["rest-em", "--config", REST, "--out", "{t}/run", "--set", "model.name='{t}/badmodel'"],
     "badmodel/config.json must hold a JSON object of settings, not list"),
    ("recipe-judge-model", ["self-reward", "--config", EX / "self_reward_oasst_150m.toml", "--out", "{t}/run",
                            "--set", "no_eft=true", "--set", "judge_model='{t}/bertmodel'"],
     'model_type "bert" is not an architecture'),
    ("sample-model-type", ["sample", "--task", "arith", "--model", "{t}/bertmodel", "--out", "{t}/s.jsonl"],
     'model_type "bert"'),
    ("eval-ks-past-n", ["eval", "--task", "arith", "--n", "4", "--k", "8", "--out", "{t}/run"],
     "eval.ks must hold a k of at most eval.sample.n = 4"),
    ("sample-full-adapter", ["sample", "--task", "arith", "--mode", "full", "--adapter", "{t}/badmodel", "--out",
                             "{t}/s.jsonl"], "model.adapter needs model.mode lora or qlora"),
    ("recipe-shots-bool", ["rest-em", "--config", REST, "--out", "{t}/run", "--set", "task_options={shots=true}"],
     "task gsm8k: shots must be an integer >= 0, got true"),
    ("recipe-math-timeout", ["rest-em", "--config", REST, "--out", "{t}/run", "--set", "task='math'", "--set",
                             "task_options={timeout=-1}"], "task math: timeout must be a positive number, got -1"),
    ("recipe-scratch", ["rest-em", "--config", REST, "--out", "{t}/run", "--set", "task='apps'", "--set",
                        "task_options={sandbox={scratch_mb=0}}"], "sandbox.scratch_mb must be a positive integer"),
]


def _snapshot(tmp: Path) -> set:
    return {(str(p.relative_to(tmp)), p.stat().st_size if p.is_file() else -1) for p in tmp.rglob("*")}


@pytest.mark.parametrize("args, expected", [pytest.param(a, e, id=i) for i, a, e in CLI_CASES])
def test_cli_bad_stage_input(tmp_path, capsys, args, expected):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([str(a).replace("{t}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing made, written over or cut


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_resumes_from_its_out_and_score_and_build_rerun(tmp_path, capsys):
    out, sample = tmp_path / "s.jsonl", ["sample", "--mode", "full", "--task", "arith", "--limit", "3", "--n", "2"]
    main([*sample, "--out", out])
    whole = out.read_text()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 6
    main([*sample, "--out", out])  # nothing left to do: the file is this job's own
    assert out.read_text() == whole
    out.write_text("".join(lines[:3]) + lines[3][:20])  # killed: prompt 1 half written, a torn line
    main([*sample, "--out", out])
    assert out.read_text() == whole  # resumed to what the uninterrupted run wrote
    capsys.readouterr()
    with pytest.raises(SystemExit):  # another n: refused, the file untouched
        main([*sample[:-1], "3", "--out", out])
    assert "another sampling job" in capsys.readouterr().err and out.read_text() == whole
    with pytest.raises(SystemExit):  # other prompts (the test split's), as many: refused, the file untouched
        main([*sample, "--split", "test", "--out", out])
    assert "is not this job's prompt 0" in capsys.readouterr().err and out.read_text() == whole
    scored, built = tmp_path / "sc.jsonl", tmp_path / "d.jsonl"
    for _ in range(2):  # the second run replaces its own output
        main(["score", "--task", "arith", "--limit", "3", "--samples", out, "--out", scored])
        main(["build", "--recipe", "rpo", "--task", "arith", "--limit", "3", "--scored", scored, "--out", built])
    assert [r["sample_index"] for r in _records(scored)] == [0, 1] * 3
    assert built.exists()


def test_sample_refuses_a_one_line_foreign_file_without_cutting_it(tmp_path, capsys):
    """A file without a newline is not a torn record: resuming would have truncated it to nothing."""
    out = tmp_path / "notes.jsonl"
    out.write_text("dear diary")
    with pytest.raises(SystemExit):
        main(["sample", "--task", "arith", "--limit", "1", "--out", out])
    assert "not a record cut short" in capsys.readouterr().err and out.read_text() == "dear diary"


# ----------------------------------------------------------------------------------------------------
# the Python API


def _model_type(tmp, model_type, **fields):
    save_preset("tiny", tmp / "m")
    config = json.loads((tmp / "m" / "config.json").read_text())
    (tmp / "m" / "config.json").write_text(json.dumps({**config, "model_type": model_type, **fields}))
    return lambda: load_model(ModelConfig(name=str(tmp / "m"), mode="full"))


def _config_text(tmp, text, name="config.json"):
    save_preset("tiny", tmp / "m")
    (tmp / "m" / name).write_text(text)
    return lambda: load_model(ModelConfig(name=str(tmp / "m"), mode="full"))


def _missing_weight(tmp):
    from safetensors.torch import load_file, save_file

    save_preset("tiny", tmp / "m")
    weights = load_file(tmp / "m" / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, tmp / "m" / "model.safetensors", metadata={"format": "pt"})
    return lambda: load_model(ModelConfig(name=str(tmp / "m"), mode="full"))


def _adapter_field(tmp, key, value):
    model, tok = load_model(ModelConfig(name="tiny"))
    save_model(model, tmp / "a", tok)
    config = json.loads((tmp / "a" / "adapter_config.json").read_text())
    (tmp / "a" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    return lambda: load_model(ModelConfig(name="tiny", adapter=str(tmp / "a")))


def _adapter_missing_weight(tmp):
    from safetensors.torch import load_file, save_file

    model, tok = load_model(ModelConfig(name="tiny"))
    save_model(model, tmp / "a", tok)
    weights = load_file(tmp / "a" / "adapter_model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, tmp / "a" / "adapter_model.safetensors", metadata={"format": "pt"})
    return lambda: load_model(ModelConfig(name="tiny", adapter=str(tmp / "a")))


def _resume_from(tmp, change):
    """A samples file from a real job, its first record changed by `change`, resumed."""
    model, tok = load_model(ModelConfig(name="tiny", mode="full"))
    path = tmp / "s.jsonl"
    generate(model, tok, ["1+1=", "2+2="], SamplingConfig(n=2, max_new_tokens=4), out=path)
    records = _records(path)
    change(records[0])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return lambda: generate(model, tok, ["1+1=", "2+2="], SamplingConfig(n=2, max_new_tokens=4), out=path)


def _eft(tmp, score):
    (tmp / "e.jsonl").write_text('{"prompt": "p", "response": "r", "score": 3}\n\n'
                                 f'{{"prompt": "p", "response": "r", "score": {score}}}\n')
    (tmp / "i.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(9)))
    cfg = self_rewarding.SelfRewardConfig(eft_path=str(tmp / "e.jsonl"), ift_path=str(tmp / "i.jsonl"), eval_size=2)
    return lambda: self_rewarding.run(cfg, tmp / "run", progress=False)


API_CASES = [  # (id, callable or factory of tmp_path, exception type, text of the message)
    ("model-type-gpt2", lambda t: _model_type(t, "gpt2"), ValueError, "its weights do not match its config"),
    ("model-type-bert", lambda t: _model_type(t, "bert"), ValueError,
     'model_type "bert" is not an architecture the sampling engine serves'),
    ("model-type-missing", lambda t: _model_type(t, None), ValueError, "model_type null"),
    ("model-missing-weight", _missing_weight, ValueError, "1 missing keys, e.g. model.norm.weight"),
    ("model-config-list", lambda t: _config_text(t, "[1, 2]"), ValueError, "must hold a JSON object"),
    ("model-config-string", lambda t: _config_text(t, '"llama"'), ValueError, "must hold a JSON object"),
    ("model-field-type", lambda t: _model_type(t, "llama", hidden_size="64"), ValueError,
     "config.json: a damaged model config"),
    ("model-heads", lambda t: _model_type(t, "llama", num_attention_heads=3), ValueError, "a damaged model config"),
    ("model-dtype", lambda t: _model_type(t, "llama", dtype="float99", torch_dtype="float99"), ValueError,
     "a damaged model config"),
    ("model-vocab", lambda t: _model_type(t, "llama", vocab_size=10), ValueError, "could not load model"),
    ("model-generation-config", lambda t: _config_text(t, "[1]", "generation_config.json"), ValueError,
     "generation_config.json must hold a JSON object"),
    ("model-tokenizer-config", lambda t: _config_text(t, "[1]", "tokenizer_config.json"), ValueError,
     "tokenizer_config.json must hold a JSON object"),
    ("model-special-tokens", lambda t: _config_text(t, "7", "special_tokens_map.json"), ValueError,
     "special_tokens_map.json must hold a JSON object"),
    ("adapter-r-string", lambda t: _adapter_field(t, "r", "sixteen"), ValueError,
     'a damaged peft adapter folder (r must be a positive integer, got "sixteen")'),
    ("adapter-missing-weight", _adapter_missing_weight, ValueError, "a damaged peft adapter folder (1 missing weights"),
    ("adapter-alpha", lambda t: _adapter_field(t, "lora_alpha", -2), ValueError, "lora_alpha"),
    ("adapter-dropout", lambda t: _adapter_field(t, "lora_dropout", 3), ValueError, "lora_dropout"),
    ("resume-no-token-ids", lambda t: _resume_from(t, lambda r: r.pop("token_ids")), ValueError,
     "s.jsonl:1: the record has no 'token_ids'"),
    ("resume-int-text", lambda t: _resume_from(t, lambda r: r.update(text=5)), ValueError,
     "s.jsonl:1: 'text' must be a string, got 5"),
    ("resume-str-index", lambda t: _resume_from(t, lambda r: r.update(sample_index="0")), ValueError,
     "'sample_index' must be an integer index"),
    ("resume-num-tokens", lambda t: _resume_from(t, lambda r: r.update(num_tokens=99)), ValueError,
     "another sampling job"),
    ("resume-other-prompt", lambda t: _resume_from(t, lambda r: r.update(prompt_hash="0" * 16)), ValueError,
     "s.jsonl: prompt 0 of the file is not this job's prompt 0"),
    ("resume-duplicate", lambda t: _resume_from(t, lambda r: r.update(sample_index=1)), ValueError,
     "s.jsonl:2: a second record for prompt_index 0, sample_index 1"),
    ("eft-score-7", lambda t: _eft(t, 7), ValueError, "e.jsonl:3: score must be within 0..5, not 7"),
    ("eft-score-nan", lambda t: _eft(t, "NaN"), ValueError, "e.jsonl:3: 'score' must be a finite number"),
    ("logprob-meta-weight", lambda: fused_logprob(H, W.to("meta"), T), ValueError, "weight on meta"),
    ("logprob-meta-hidden", lambda: fused_logprob(H.to("meta"), W, T, impl="naive"), ValueError, "hidden on meta"),
    ("logprob-meta-targets", lambda: fused_logprob(H, W, T.to("meta")), ValueError, "targets on meta"),
    ("logprob-float8", lambda: fused_logprob(H.to(torch.float8_e4m3fn), W, T), TypeError, "float8"),
    ("logprob-triton-cpu", lambda: fused_logprob(H, W, T, impl="triton"), ValueError, "needs CUDA tensors"),
    ("logprob-ignore-index", lambda: fused_logprob(H, W, T, ignore_index="pad"), TypeError, "ignore_index"),
    ("logprob-ignore-float", lambda: fused_logprob(H, W, T, ignore_index=0.5), TypeError, "ignore_index"),
    ("generate-out-folder", lambda t: lambda: generate(None, None, ["a"], out=t), ValueError,
     "exists and is a folder, not a file"),
    ("task-shots-past-exemplars", lambda: get_task("arc", shots=5), ValueError, "task arc has 4 few-shot exemplars"),
    ("task-math-shots", lambda: get_task("math", shots=9), ValueError, "shots must be 0..4, not 9"),
    ("task-shots-bool", lambda: get_task("arith", shots=True), TypeError, "task arith: shots must be an integer"),
    ("task-shots-float", lambda: get_task("gsm8k", shots=2.0), TypeError, "shots"),
    ("task-math-timeout", lambda: get_task("math", timeout=-1), ValueError, "timeout must be a positive number"),
    ("task-math-timeout-nan", lambda: get_task("math", timeout=math.nan), ValueError, "timeout"),
    ("task-math-workers", lambda: get_task("math", workers=-2), ValueError, "workers must be an integer >= 0"),
    ("sandbox-workers", lambda: get_task("apps", sandbox={"workers": -3}), ValueError, "sandbox.workers"),
    ("sandbox-scratch", lambda: get_task("humaneval", sandbox={"scratch_mb": 0}), ValueError, "sandbox.scratch_mb"),
    ("sandbox-cpus", lambda: get_task("apps", sandbox={"cpus": 0}), ValueError, "sandbox.cpus must be a positive"),
    ("recipe-fsdp-lora", lambda: from_dict(CentralityConfig, {"train": {"parallel": "fsdp"}}), ValueError,
     "train.parallel fsdp is for full fine-tuning"),
    ("recipe-sft-fsdp", lambda: from_dict(self_rewarding.SelfRewardConfig, {"sft": {"parallel": "fsdp"}}),
     ValueError, "sft.parallel fsdp"),
]


@pytest.mark.parametrize("make, kind, expected", [pytest.param(m, k, e, id=i) for i, m, k, e in API_CASES])
def test_api_bad_stage_input(tmp_path, make, kind, expected):
    call = make(tmp_path) if make.__code__.co_argcount == 1 else make
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and expected in message, message
    assert not (tmp_path / "run").exists()  # refused before a run folder was made


def test_a_recipe_refuses_a_bad_task_option_before_its_run_folder(tmp_path):
    from lite_selftrain.recipes import rest_em

    cfg = from_dict(RestEMConfig, {"task": "arith", "task_options": {"shots": True}, "iterations": 0})
    with pytest.raises(TypeError, match="task arith: shots must be an integer"):
        rest_em.run(cfg, tmp_path / "run", progress=False)


def test_a_resumed_file_without_logprobs_is_refused_when_they_are_asked_for(tmp_path):
    model, tok = load_model(ModelConfig(name="tiny", mode="full"))
    generate(model, tok, ["1+1="], n=2, max_new_tokens=3, out=tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match="has no logprob"):
        generate(model, tok, ["1+1="], n=2, max_new_tokens=3, out=tmp_path / "s.jsonl", logprobs=True)


def test_every_served_architecture_samples_what_transformers_decodes(tok):
    """The architectures the loader accepts are those whose engine output equals transformers' greedy
    decoding (left padding, the cache, positions): a type added to SERVED_MODEL_TYPES is checked here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lite_selftrain.models import SERVED_MODEL_TYPES

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
    ids = dict(vocab_size=len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    prompts = ["hello world, ", "1+2+3="]  # two lengths: the shorter is left-padded
    for model_type in SERVED_MODEL_TYPES:
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256) if model_type == "gpt2" else dict(shape)
        config = AutoConfig.for_model(model_type, **kw, **ids)
        config.sliding_window = None
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        got = generate(model, tok, prompts, SamplingConfig(temperature=0, max_new_tokens=8, stop=()))
        for prompt, (completion,) in zip(prompts, got):
            x = tok(prompt, return_tensors="pt").input_ids
            want = model.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)[0, x.shape[1]:]
            assert completion.token_ids == want.tolist()[: completion.num_tokens], model_type
