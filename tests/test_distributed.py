"""Several processes under `torchrun` (gloo, on the CPU): the same samples and metrics as one process.

- `generate` under 2 ranks returns every completion of a 1-process run, bit for bit, and writes the same
  records (each rank samples whole engine batches into its own stream; rank 0 merges them);
- a ReST-EM run through the CLI under 2 ranks ends with the metrics, samples and datasets of a 1-process run;
- the same run SIGKILLed (every process) mid-sampling, then resumed under 2 ranks, ends with those metrics
  and exactly one record per (prompt, sample);
- the merge on resume, in one process: streams a killed run left (torn lines, partial prompts, records
  already merged by a kill inside the merge) fold into one record per sample.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lite_selftrain import demo
from lite_selftrain.config import from_dict
from lite_selftrain.models import build_model, build_tokenizer
from lite_selftrain.recipes import rest_em
from lite_selftrain.sampling import SamplingConfig, generate
from lite_selftrain.store import JsonlLog

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PROMPTS = [f"problem {i}: " + "ab" * (i % 7) for i in range(40)]
KNOBS = dict(n=3, temperature=1.0, max_new_tokens=12, seed=9, batch_size=4)

SHARDED_GENERATE = """
import json, sys, torch
torch.set_num_threads(1)
from lite_selftrain import distributed
from lite_selftrain.models import build_model, build_tokenizer
from lite_selftrain.sampling import SamplingConfig, generate
distributed.init()
tok = build_tokenizer()
model = build_model("tiny", vocab_size=len(tok), seed=0)
prompts, knobs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
groups = generate(model, tok, prompts, SamplingConfig(**knobs), out=sys.argv[3], logprobs=True)
in_memory = generate(model, tok, prompts, SamplingConfig(**knobs), logprobs=True)  # no file: gathered
rows = [[c.to_dict() for c in g] for g in groups]
assert rows == [[c.to_dict() for c in g] for g in in_memory]
with open(f"{sys.argv[4]}.{distributed.rank()}", "w") as f:  # what each rank returned
    json.dump({"world": distributed.world(), "groups": rows}, f)
"""


def _env():
    """The children run on the CPU (gloo), also on a GPU machine: one GPU cannot hold two NCCL ranks."""
    return {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def _toml(value) -> str:
    """A config dict as TOML: inline tables and arrays (JSON's strings and numbers are TOML's)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return "true" if value is True else "false" if value is False else json.dumps(value)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metrics(out: Path) -> list[dict]:
    rows = _records(out / "metrics.jsonl")
    for r in rows:
        r.pop("seconds")
    return rows


def _keys(path: Path) -> list[tuple[int, int]]:
    return sorted((r["prompt_index"], r["sample_index"]) for r in _records(path))


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the launcher's workers start their own sessions: a group kill misses them)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def test_sharded_generate_returns_what_one_process_returns(tmp_path):
    tok = build_tokenizer()
    model = build_model("tiny", vocab_size=len(tok), seed=0)
    one = generate(model, tok, PROMPTS, SamplingConfig(**KNOBS), out=tmp_path / "one.jsonl", logprobs=True)
    script = tmp_path / "sharded_generate.py"  # the launcher runs files, not -c
    script.write_text(textwrap.dedent(SHARDED_GENERATE))
    run = subprocess.run([*TORCHRUN, str(script), json.dumps(PROMPTS),
                          json.dumps(KNOBS), str(tmp_path / "two.jsonl"), str(tmp_path / "returned")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = [[c.to_dict() for c in g] for g in one]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"returned.{rank}").read_text())
        assert got["world"] == 2 and got["groups"] == expected  # every rank returns every group
    by_key = lambda path: {(r["prompt_index"], r["sample_index"]): r for r in _records(path)}
    assert by_key(tmp_path / "two.jsonl") == by_key(tmp_path / "one.jsonl")
    assert len(_records(tmp_path / "two.jsonl")) == len(PROMPTS) * KNOBS["n"]
    assert not list(tmp_path.glob("two.jsonl.rank*"))  # merged, then deleted


def test_streams_a_killed_run_left_are_folded_in_once(tmp_path):
    """What a killed 2-rank run can leave: the merged file written but the streams not yet deleted (a kill
    inside the merge), plus streams with a partial prompt and a torn last line."""
    tok = build_tokenizer()
    model = build_model("tiny", vocab_size=len(tok), seed=0)
    whole = tmp_path / "whole.jsonl"
    expected = generate(model, tok, PROMPTS, SamplingConfig(**KNOBS), out=whole)
    records = sorted(_records(whole), key=lambda r: (r["prompt_index"], r["sample_index"]))
    n, out = KNOBS["n"], tmp_path / "samples.jsonl"
    JsonlLog(out).append(records[: 6 * n])  # prompts 0-5, merged
    JsonlLog(out.with_name("samples.jsonl.rank0")).append(records[3 * n : 9 * n] + records[20 * n : 20 * n + 1])
    JsonlLog(out.with_name("samples.jsonl.rank1")).append(records[12 * n : 14 * n])
    with open(out.with_name("samples.jsonl.rank1"), "a") as f:
        f.write(json.dumps(records[14 * n])[:40])  # torn
    got = generate(model, tok, PROMPTS, SamplingConfig(**KNOBS), out=out)
    assert got == expected
    assert _keys(out) == [(i, j) for i in range(len(PROMPTS)) for j in range(n)]
    assert not list(tmp_path.glob("samples.jsonl.rank*"))


@pytest.fixture(scope="module")
def rest_config(tmp_path_factory):
    """A tiny ReST-EM on arith, from a briefly warm-started model (some sums right: real data to train on)."""
    cfg = demo.DemoConfig(warm_examples=600, warm_long_examples=0, warm_steps=80, terms=3)
    model = demo.warm_start(cfg, tmp_path_factory.mktemp("warm"), progress=False)
    train = {"max_steps": 3, "batch_size": 4, "grad_accum": 1, "checkpoint_every": 1, "log_every": 1,
             "objective": "rwnll", "lr": 1e-3}
    return {"task": "arith", "task_options": {"terms": 3, "n_train": 40, "n_test": 12, "shots": 0}, "iterations": 2,
            "problems_per_iteration": 20, "model": {"name": str(model), "mode": "full"},
            "sample": {"n": 6, "batch_size": 1}, "eval": {"sample": {"n": 2, "batch_size": 8}, "ks": [1, 2]},
            "train": train}


def _launch(cfg: dict, out: Path, tmp_path: Path) -> subprocess.Popen:
    config = tmp_path / "rest_em.toml"
    config.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in cfg.items()))
    return subprocess.Popen([*TORCHRUN, "-m", "lite_selftrain", "rest-em", "--config", str(config), "--out", str(out)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_rest_em_under_two_ranks_matches_one_process_and_resumes_after_a_kill(rest_config, tmp_path):
    one = tmp_path / "one"
    rest_em.run(from_dict(rest_em.RestEMConfig, rest_config), one, progress=False)
    assert any(r.get("dataset_size") for r in _metrics(one))  # something was trained on

    two = _launch(rest_config, tmp_path / "two", tmp_path)
    stdout, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    assert stdout.count("best iteration:") == 1  # rank 0 alone prints
    assert _metrics(tmp_path / "two") == _metrics(one)
    for t in (1, 2):
        for name in ("samples.jsonl", "scored.jsonl", "dataset.jsonl"):
            a, b = (sorted(json.dumps(r, sort_keys=True) for r in _records(d / "rest_em" / f"iter_{t:02d}" / name))
                    for d in (one, tmp_path / "two"))
            assert a == b, (t, name)

    # every process SIGKILLed while iteration 1 samples: its streams hold some lines
    killed = tmp_path / "killed"
    proc = _launch(rest_config, killed, tmp_path)
    streams = lambda: list((killed / "rest_em" / "iter_01").glob("samples.jsonl.rank*"))
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in streams() if p.exists()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for pid in [*_descendants(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert streams(), "the kill came after the sampling stage had merged its streams"

    resumed = _launch(rest_config, killed, tmp_path)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert _metrics(killed) == _metrics(one)
    n = rest_config["sample"]["n"]
    for t in (1, 2):
        assert _keys(killed / "rest_em" / f"iter_{t:02d}" / "samples.jsonl") == [
            (i, j) for i in range(rest_config["problems_per_iteration"]) for j in range(n)]
    assert not list(killed.rglob("*.rank*"))
