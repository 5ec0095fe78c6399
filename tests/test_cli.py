"""The command line: help everywhere, one-line errors with exit code 2, and the stages chained by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["demo", "rest-em", "rpo", "self-reward", "centrality", "sample", "score", "build", "train", "eval",
            "plot"]


ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    """`python -m lite_selftrain ...` as a user runs it in the checkout: its working directory first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, "-m", "lite_selftrain", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_help_on_every_command():
    top = cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in COMMANDS)
    for command in COMMANDS:
        out = cli(command, "--help")
        assert out.returncode == 0 and "Usage" in out.stdout, command


def _one_line_error(out, pattern):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], out.stderr


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    _one_line_error(cli("rest-em", "--config", tmp_path / "nope.toml", "--out", tmp_path / "r"), "not found")
    (tmp_path / "typo.toml").write_text('task = "arith"\niteratons = 2\n')
    _one_line_error(cli("rest-em", "--config", tmp_path / "typo.toml", "--out", tmp_path / "r"),
                    "unknown config key 'iteratons' (did you mean 'iterations'?)")
    _one_line_error(cli("rpo", "--set", "task=chess", "--set", "iterations=0", "--out", tmp_path / "r2"),
                    "unknown task 'chess'")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    _one_line_error(cli("train", "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "t"), "bad.jsonl:2")
    _one_line_error(cli("eval", "--task", "arith", "--model", "./no/model", "--out", tmp_path / "e"),
                    "model path not found")


def test_a_run_directory_refuses_another_config_unless_restarted(tmp_path):
    base = ["rest-em", "--set", "task=arith", "--set", "iterations=0", "--set", "model.name=tiny",
            "--set", "model.mode=full", "--set", "eval.sample.n=1", "--set", "eval.limit=4", "--out", tmp_path / "r"]
    assert cli(*base).returncode == 0
    _one_line_error(cli(*base, "--set", "seed=3"), "different config")
    assert cli(*base, "--set", "seed=3", "--restart").returncode == 0


@pytest.mark.slow
def test_stages_chain_by_hand(tmp_path):
    common = ["--task", "arith", "--limit", "6", "--shots", "0"]
    out = cli("sample", "--model", "tiny", "--mode", "full", *common, "--n", "4", "--out", tmp_path / "s.jsonl")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["samples"] == 24
    before = (tmp_path / "s.jsonl").read_text()
    again = cli("sample", "--model", "tiny", "--mode", "full", *common, "--n", "4", "--out", tmp_path / "s.jsonl")
    assert again.returncode == 0 and (tmp_path / "s.jsonl").read_text() == before, again.stderr  # resumes: done
    out = cli("score", *common[:4], "--samples", tmp_path / "s.jsonl", "--out", tmp_path / "scored.jsonl")
    assert out.returncode == 0, out.stderr
    # a hand-made pair set trains regardless of what the random model sampled
    pairs = [{"prompt": "1+2=", "chosen": "3#3", "rejected": "4#4"}, {"prompt": "2+2=", "chosen": "4#4",
                                                                       "rejected": "5#5"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = cli("build", "--recipe", "rpo", *common[:4], "--scored", tmp_path / "scored.jsonl",
              "--out", tmp_path / "built.jsonl")
    assert out.returncode == 0 and (tmp_path / "built.jsonl").exists(), out.stderr
    out = cli("train", "--model", "tiny", "--data", tmp_path / "pairs.jsonl", "--set", "objective='dpo_nll'",
              "--set", "max_steps=2", "--set", "batch_size=2", "--set", "grad_accum=1", "--out", tmp_path / "t")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "t" / "model" / "adapter_config.json").exists()
    out = cli("eval", "--model", "tiny", "--adapter", tmp_path / "t" / "model", *common, "--n", "2", "--k", "1",
              "--k", "2", "--out", tmp_path / "e")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["test_pass@1"] <= 1 and "test_maj@2" in metrics
