"""Bad command lines, as a careless user types them: each one ends in one clear line, never a traceback,
and leaves no file behind (the Python API's cases are in test_bad_api_inputs.py).

Each case runs `python -m lite_selftrain` in this process (runpy, with sys.argv set) and checks exit code
2, exactly one `error:` line on stderr, and that nothing under the test folder changed (no run folder
made, no config bound, no output written). Two cases run as real processes to show that no traceback
reaches a terminal.
"""

import dataclasses
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from lite_selftrain.config import from_dict
from lite_selftrain.errors import UserError
from lite_selftrain.models import ModelConfig
from lite_selftrain.recipes import rest_em
from lite_selftrain.recipes.common import Run
from lite_selftrain.recipes.rest_em import RestEMConfig

EX = Path(__file__).resolve().parents[1] / "examples"
def main(argv: list[str]) -> None:
    """The console entry, in this process: what `python -m lite_selftrain ARGS` runs."""
    old = sys.argv
    sys.argv = ["lite-selftrain", *argv]
    try:
        runpy.run_module("lite_selftrain", run_name="__main__", alter_sys=False)
    finally:
        sys.argv = old


REST, RPO = EX / "rest_em_gsm8k_150m.toml", EX / "rpo_gsm8k_150m.toml"
SR, CEN = EX / "self_reward_oasst_150m.toml", EX / "centrality_central_sft_150m.toml"
SET = ["rest-em", "--config", REST, "--out", "{t}/run", "--set"]  # then one override

FILES = {  # name -> content, written into each case's folder
    "afile": "x\n",
    "samples_noidx.jsonl": '{"sample_index": 0, "text": "1"}\n',
    "samples_stridx.jsonl": '{"prompt_index": "0", "text": "1"}\n',
    "samples_range.jsonl": '{"prompt_index": 0, "text": "1"}\n{"prompt_index": 7, "text": "1"}\n',
    "samples_notext.jsonl": '{"prompt_index": 0}\n',
    "samples_torn.jsonl": '{"prompt_index": 0, "text": "1"}\n{"prompt_index": 0,\n',
    "samples_list.jsonl": '[1, 2]\n',
    "scored_noreward.jsonl": '{"prompt_index": 0, "text": "a", "finish_reason": "eos"}\n',
    "scored_strreward.jsonl": '{"prompt_index": 0, "text": "a", "finish_reason": "eos", "reward": "high"}\n',
    "scored_nofinish.jsonl": '{"prompt_index": 0, "text": "a", "reward": 1.0}\n',
    "scored_negidx.jsonl": '{"prompt_index": -1, "text": "a", "finish_reason": "eos", "reward": 1.0}\n',
    "scored_floatidx.jsonl": '{"prompt_index": 0.5, "text": "a", "finish_reason": "eos", "reward": 1.0}\n',
    "train_noresp.jsonl": '{"prompt": "a"}\n',
    "train_intprompt.jsonl": '{"prompt": 3, "response": "b"}\n',
    "train_strreward.jsonl": '{"prompt": "a", "response": "b", "reward": "x"}\n',
    "train_nochosen.jsonl": '{"prompt": "a", "rejected": "b"}\n',
    "train_empty.jsonl": "",
    "gsm_list.jsonl": '{"question": "q", "answer": ["1"]}\n',
    "gsm_null.jsonl": '{"question": "q", "answer": null}\n',
    "gsm_noanswer.jsonl": '{"question": "q"}\n',
    "plotrun/metrics.jsonl": '{"iteration": 0, "test_pass@1": 0.5}\n',
    "plotrun2/metrics.jsonl": '{"recipe": "r", "iteration": "zero"}\n',
    "invalid.toml": "lr = = 1\n",
    "int_table.toml": "train = 3\n",
    "lr_table.toml": '[train]\nlr = {x = 1}\n',
    "options_list.toml": "task_options = [1, 2]\n",
    "train_bad.toml": "lr = -1\n",
    "train_typo.toml": "lrr = 1e-4\n",
}

# (id, command line with {t} for the case's folder, text the one error line must contain)
CLI_CASES = [
    # recipe configs: types, nested tables, ranges, names
    ("lr-table", ["rest-em", "--config", "{t}/lr_table.toml", "--out", "{t}/run"],
     "lr_table.toml: train.lr must be a positive number, got {x = 1}"),
    ("int-for-table", ["rest-em", "--config", "{t}/int_table.toml", "--out", "{t}/run"],
     "train must be a table, got 3"),
    ("options-list", ["rest-em", "--config", "{t}/options_list.toml", "--out", "{t}/run"],
     "task_options must be a table, got [1, 2]"),
    ("garbage-toml", ["rest-em", "--config", "{t}/garbage.toml", "--out", "{t}/run"], "not a UTF-8 text file"),
    ("invalid-toml", ["rest-em", "--config", "{t}/invalid.toml", "--out", "{t}/run"], "invalid TOML"),
    ("missing-toml", ["rest-em", "--config", "{t}/nope.toml", "--out", "{t}/run"], "config file not found"),
    ("iterations", [*SET, "iterations=-1"],
     "iterations must be an integer >= 0, got -1"),
    ("problems", [*SET, "problems_per_iteration=-5"],
     "problems_per_iteration must be a positive integer, got -5"),
    ("eval-limit", [*SET, "eval.limit=-1"], "eval.limit must be"),
    ("lr-neg", [*SET, "train.lr=-1e-5"], "train.lr must be"),
    ("lr-str", [*SET, "train.lr='1e-5'"], 'got "1e-5"'),
    ("lr-nan", [*SET, "train.lr=nan"], "got nan"),
    ("warmup", [*SET, "train.warmup_ratio=1.5"],
     "train.warmup_ratio must be a number in [0, 1]"),
    ("grad-norm", [*SET, "train.max_grad_norm=-1"],
     "train.max_grad_norm must be"),
    ("epochs", [*SET, "train.epochs=0"], "train.epochs must be"),
    ("epochs-float", [*SET, "train.epochs=1.5"],
     "train.epochs must be a positive integer, got 1.5"),
    ("batch-bool", [*SET, "train.batch_size=true"],
     "train.batch_size must be a positive integer, got true"),
    ("max-new-tokens", [*SET, "sample.max_new_tokens=0"],
     "sample.max_new_tokens must be"),
    ("sample-n", [*SET, "sample.n=0"], "sample.n must be"),
    ("sample-temp", [*SET, "sample.temperature=-0.5"],
     "sample.temperature must be a number >= 0 (0 = greedy)"),
    ("sample-temp-nan", [*SET, "sample.temperature=nan"],
     "sample.temperature"),
    ("top-p", [*SET, "sample.top_p=0"], "sample.top_p must be"),
    ("top-k", [*SET, "sample.top_k=-1"], "sample.top_k must be"),
    ("stop-int", [*SET, "sample.stop=[1]"], "sample.stop[0]"),
    ("backend", [*SET, "sample.backend='tpu'"],
     "sample.backend must be 'native' or 'vllm'"),
    ("select-on", [*SET, "eval.select_on='valid_accuracy'"],
     "eval.select_on must name a metric"),
    ("select-on-test", [*SET, "eval.select_on='test_pass@1'"],
     "eval.select_on must be a validation metric"),
    ("ks-zero", [*SET, "eval.ks=[0]"], "eval.ks[0] must be"),
    ("ks-str", [*SET, "eval.ks='1,4'"], "eval.ks must be a list"),
    ("max-per-problem", [*SET, "max_per_problem=-1"],
     "max_per_problem must be"),
    ("device", [*SET, "model.device='tpu'"],
     "model.device must be auto, cpu, cuda, cuda:N or mps"),
    ("lora-r", [*SET, "model.lora_r=0"], "model.lora_r must be"),
    ("dropout", [*SET, "model.lora_dropout=2"], "model.lora_dropout"),
    ("mode", [*SET, "model.mode='int4'"], "model.mode must be"),
    ("dtype", [*SET, "model.dtype='fp8'"], "model.dtype must be"),
    ("objective", [*SET, "train.objective='dpo_nll'"],
     "ReST-EM trains with objective"),
    ("schedule", [*SET, "train.lr_schedule='linear'"],
     "train.lr_schedule must be"),
    ("unknown-key", [*SET, "iteratons=2"], "did you mean 'iterations'"),
    ("unknown-nested", [*SET, "train.lrr=2"], "'train.lrr'"),
    ("set-no-equals", [*SET, "iterations"], "--set expects key=value"),
    ("set-clash", [*SET, "train=1", "--set", "train.lr=1"],
     "given both a value and a table"),
    ("task-name", [*SET, "task='chess'"], "unknown task 'chess'"),
    ("task-option", [*SET, "task_options={shots=-1}"], "shots"),
    ("task-option-key", [*SET, "task_options={colour=1}"],
     "task gsm8k has no option 'colour'"),
    ("arith-terms", [*SET, "task='arith'", "--set", "task_options={terms='x'}"],
     'terms must be a count or a [min, max] pair, got "x"'),
    ("arith-digits", [*SET, "task='arith'", "--set", "task_options={digits=0}"], "digits must be a positive integer"),
    ("apps-sandbox", [*SET, "task='apps'", "--set", "task_options={sandbox={timeout=-1}}"],
     "sandbox.timeout must be a positive number"),
    ("train-path", [*SET, "train_path='{t}/missing.jsonl'"],
     "not found"),
    ("gsm-list-answer", [*SET, "train_path='{t}/gsm_list.jsonl'"],
     "gsm_list.jsonl:1: 'answer' must be a string"),
    ("gsm-null-answer", [*SET, "train_path='{t}/gsm_null.jsonl'"],
     "gsm_null.jsonl:1: 'answer' must be a string, got null"),
    ("out-in-file", ["rest-em", "--config", REST, "--out", "{t}/afile/run"], "is a file"),
    ("out-is-file", ["rest-em", "--config", REST, "--out", "{t}/afile"], "afile' is a file"),
    ("rpo-pairs", ["rpo", "--config", RPO, "--out", "{t}/run", "--set", "pairs_per_problem=-1"], "pairs_per_problem"),
    ("rpo-temps", ["rpo", "--config", RPO, "--out", "{t}/run", "--set", "temperatures=[0.8, -1]"], "temperatures[1]"),
    ("rpo-beta", ["rpo", "--config", RPO, "--out", "{t}/run", "--set", "train.beta=0"], "train.beta must be"),
    ("sr-prompts", ["self-reward", "--config", SR, "--out", "{t}/run", "--set", "new_prompts=0"], "new_prompts"),
    ("sr-judge", ["self-reward", "--config", SR, "--out", "{t}/run", "--set", "judge.sample.n=0"], "judge.sample.n"),
    ("cen-objective", ["centrality", "--config", CEN, "--out", "{t}/run", "--set", "objective='ppo'"], "objective"),
    ("cen-threshold", ["centrality", "--config", CEN, "--out", "{t}/run", "--set", "selection.rank_threshold=2"],
     "selection.rank_threshold must be a number in [0, 1]"),
    ("cen-policy", ["centrality", "--config", CEN, "--out", "{t}/run", "--set", "selection.policy='best'"], "policy"),
    ("demo-iterations", ["demo", "--out", "{t}/run", "--set", "iterations=-1"], "iterations must be"),
    ("demo-lr", ["demo", "--out", "{t}/run", "--set", "warm_lr=0"], "warm_lr must be a positive number"),
    ("demo-samples", ["demo", "--out", "{t}/run", "--set", "samples='8'"],
     'samples must be a positive integer, got "8"'),
    ("demo-out", ["demo", "--out", "{t}/afile/demo"], "is a file"),
    # stage commands
    ("sample-limit", ["sample", "--task", "arith", "--limit", "-1", "--out", "{t}/run/s.jsonl"], "--limit"),
    ("sample-n", ["sample", "--task", "arith", "--n", "0", "--out", "{t}/run/s.jsonl"], "n must be"),
    ("sample-n-str", ["sample", "--task", "arith", "--n", "two", "--out", "{t}/run/s.jsonl"], "--n"),
    ("sample-temp", ["sample", "--task", "arith", "--temperature", "nan", "--out", "{t}/run/s.jsonl"], "temperature"),
    ("sample-temp-neg", ["sample", "--task", "arith", "--temperature", "-1", "--out", "{t}/run/s.jsonl"],
     "temperature"),
    ("sample-top-p", ["sample", "--task", "arith", "--top-p", "1.5", "--out", "{t}/run/s.jsonl"], "top_p"),
    ("sample-task", ["sample", "--task", "chess", "--out", "{t}/run/s.jsonl"], "unknown task"),
    ("sample-shots", ["sample", "--task", "gsm8k", "--shots", "-2", "--out", "{t}/run/s.jsonl"], "shots"),
    ("sample-out-dir", ["sample", "--task", "arith", "--out", "{t}/run"], "--out"),
    ("sample-out-in-file", ["sample", "--task", "arith", "--out", "{t}/afile/s.jsonl"], "is a file"),
    ("sample-mode", ["sample", "--task", "arith", "--mode", "int8", "--out", "{t}/run/s.jsonl"], "--mode"),
    ("score-noidx", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_noidx.jsonl",
                     "--out", "{t}/run/x.jsonl"], "samples_noidx.jsonl:1: the record has no 'prompt_index'"),
    ("score-stridx", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_stridx.jsonl",
                      "--out", "{t}/run/x.jsonl"], "samples_stridx.jsonl:1: 'prompt_index' must be an integer"),
    ("score-range", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_range.jsonl",
                     "--out", "{t}/run/x.jsonl"], "samples_range.jsonl:2: prompt_index 7 is outside"),
    ("score-notext", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_notext.jsonl",
                      "--out", "{t}/run/x.jsonl"], "samples_notext.jsonl:1: the record has no 'text'"),
    ("score-torn", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_torn.jsonl",
                    "--out", "{t}/run/x.jsonl"], "samples_torn.jsonl:2: malformed JSON"),
    ("score-list", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_list.jsonl",
                    "--out", "{t}/run/x.jsonl"], "expected a JSON object"),
    ("score-missing", ["score", "--task", "arith", "--samples", "{t}/nope.jsonl", "--out", "{t}/run/x.jsonl"],
     "--samples"),
    ("score-out-in-file", ["score", "--task", "arith", "--limit", "2", "--samples", "{t}/samples_range.jsonl",
                           "--out", "{t}/afile/x.jsonl"], "is a file"),
    ("score-gsm", ["score", "--task", "gsm8k", "--data", "{t}/gsm_noanswer.jsonl", "--samples",
                   "{t}/samples_range.jsonl", "--out", "{t}/run/x.jsonl"], "gsm_noanswer.jsonl:1: the record has no"),
    ("build-noreward", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                        "{t}/scored_noreward.jsonl", "--out", "{t}/run/d.jsonl"], "has no 'reward'"),
    ("build-strreward", ["build", "--recipe", "rpo", "--task", "arith", "--limit", "2", "--scored",
                         "{t}/scored_strreward.jsonl", "--out", "{t}/run/d.jsonl"], "'reward' must be a number"),
    ("build-nofinish", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                        "{t}/scored_nofinish.jsonl", "--out", "{t}/run/d.jsonl"], "has no 'finish_reason'"),
    ("build-negidx", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                      "{t}/scored_negidx.jsonl", "--out", "{t}/run/d.jsonl"], "prompt_index -1 is outside"),
    ("build-floatidx", ["build", "--recipe", "rest-em", "--task", "arith", "--limit", "2", "--scored",
                        "{t}/scored_floatidx.jsonl", "--out", "{t}/run/d.jsonl"], "must be an integer index"),
    ("build-cap", ["build", "--recipe", "rest-em", "--task", "arith", "--max-per-problem", "-1", "--scored",
                   "{t}/scored_noreward.jsonl", "--out", "{t}/run/d.jsonl"], "--max-per-problem"),
    ("build-pairs", ["build", "--recipe", "rpo", "--task", "arith", "--pairs-per-problem", "-1", "--scored",
                     "{t}/scored_noreward.jsonl", "--out", "{t}/run/d.jsonl"], "--pairs-per-problem"),
    ("build-recipe", ["build", "--recipe", "ppo", "--task", "arith", "--scored", "{t}/scored_noreward.jsonl",
                      "--out", "{t}/run/d.jsonl"], "--recipe"),
    ("train-noresp", ["train", "--data", "{t}/train_noresp.jsonl", "--out", "{t}/run"], "train_noresp.jsonl:1"),
    ("train-intprompt", ["train", "--data", "{t}/train_intprompt.jsonl", "--out", "{t}/run"],
     "'prompt' must be a string, got 3"),
    ("train-strreward", ["train", "--data", "{t}/train_strreward.jsonl", "--set", "objective='rwnll'", "--out",
                         "{t}/run"], "'reward' must be a number"),
    ("train-nochosen", ["train", "--data", "{t}/train_nochosen.jsonl", "--set", "objective='dpo_nll'", "--out",
                        "{t}/run"], "has no 'chosen'"),
    ("train-empty", ["train", "--data", "{t}/train_empty.jsonl", "--out", "{t}/run"], "is empty"),
    ("train-config", ["train", "--data", "{t}/train_noresp.jsonl", "--config", "{t}/train_bad.toml", "--out",
                      "{t}/run"], "train_bad.toml: lr must be a positive number, got -1"),
    ("train-typo", ["train", "--data", "{t}/train_noresp.jsonl", "--config", "{t}/train_typo.toml", "--out",
                    "{t}/run"], "did you mean 'lr'"),
    ("train-objective", ["train", "--data", "{t}/train_noresp.jsonl", "--set", "objective='ppo'", "--out", "{t}/run"],
     "objective"),
    ("train-out-in-file", ["train", "--data", "{t}/train_noresp.jsonl", "--out", "{t}/afile/t"], "is a file"),
    ("eval-k", ["eval", "--task", "arith", "--k", "0", "--out", "{t}/run"], "ks[0] must be"),
    ("eval-n", ["eval", "--task", "arith", "--n", "0", "--out", "{t}/run"], "n must be"),
    ("eval-temp", ["eval", "--task", "arith", "--temperature", "nan", "--out", "{t}/run"], "temperature"),
    ("eval-limit", ["eval", "--task", "arith", "--limit", "-3", "--out", "{t}/run"], "--limit"),
    ("eval-out-in-file", ["eval", "--task", "arith", "--out", "{t}/afile/e"], "is a file"),
    ("plot-norecipe", ["plot", "{t}/plotrun"], "metrics.jsonl:1: the record has no 'recipe'"),
    ("plot-iteration", ["plot", "{t}/plotrun2"], "'iteration' must be an integer index"),
    ("plot-missing", ["plot", "{t}/nowhere"], "nowhere"),
    ("no-command", ["fly"], "No such command"),
    ("no-option", ["sample", "--task", "arith", "--colour", "red", "--out", "{t}/run/s.jsonl"], "--colour"),
]


def _setup(tmp: Path) -> set[tuple[str, int]]:
    for name, text in FILES.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    (tmp / "garbage.toml").write_bytes(b"\xff\xfe\x00\x81 lr = 1\n")
    (tmp / "run").mkdir()
    return _snapshot(tmp)


def _snapshot(tmp: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(tmp)), p.stat().st_size if p.is_file() else -1) for p in tmp.rglob("*")}


@pytest.mark.parametrize("args, expected", [pytest.param(a, e, id=i) for i, a, e in CLI_CASES])
def test_cli_bad_input(tmp_path, capsys, args, expected):
    before = _setup(tmp_path)
    argv = [str(a).replace("{t}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.replace("{t}", str(tmp_path)) in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # nothing made, bound or half-written


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write a read-only folder")
def test_cli_read_only_out(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(SystemExit) as stop:
        main(["rest-em", "--config", str(REST), "--out", str(tmp_path / "ro" / "run")])
    assert stop.value.code == 2 and "is not writable" in capsys.readouterr().err
    assert list((tmp_path / "ro").iterdir()) == []


def test_cli_a_rejected_config_leaves_the_run_usable(tmp_path, capsys):
    """A fixed command runs after a rejected one: the rejected config was never bound to the folder."""
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "arith"\ntrain_path = "nowhere.jsonl"\n')
    with pytest.raises(SystemExit):
        main(["rest-em", "--config", str(bad), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_run_that_failed_on_its_first_stage_takes_a_corrected_config(tmp_path):
    """Bound at its first stage, which failed (no such model): the corrected config needs no --restart."""
    cfg = from_dict(RestEMConfig, {"task": "arith", "iterations": 1, "model": {"name": str(tmp_path / "nomodel")}})
    with pytest.raises(UserError, match="nomodel"):
        rest_em.run(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "config.json").exists()
    fixed = dataclasses.replace(cfg, model=ModelConfig(name="tiny"))
    Run(tmp_path / "run", "rest_em", fixed).bind()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["name"] == "tiny"
    with pytest.raises(UserError, match="different config"):  # a run with a finished stage still refuses
        Run(tmp_path / "run", "rest_em", fixed).store.mark_done("rest_em/00/eval", {})
        Run(tmp_path / "run", "rest_em", cfg)
    assert Run(tmp_path / "run", "rest_em", fixed).store.is_done("rest_em/00/eval")


def test_real_processes_print_no_traceback(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nlr = {x = 1}\n")
    for args, expected in ((["rest-em", "--config", tmp_path / "c.toml", "--out", tmp_path / "r"],
                            "c.toml: train.lr must be a positive number, got {x = 1}"),
                           (["sample", "--task", "arith", "--limit", "-1", "--out", tmp_path / "s.jsonl"], "--limit")):
        out = subprocess.run([sys.executable, "-m", "lite_selftrain", *map(str, args)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().splitlines() == [out.stderr.strip()] and expected in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_enough_cases():
    assert len(CLI_CASES) >= 100
