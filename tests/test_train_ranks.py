"""The trainer under `torchrun --nproc_per_node 2` on CPU (gloo): DDP with LoRA for rwnll and dpo_nll, and
FSDP2 on a full model, each reaching the weights and step metrics of one process on the same global batch;
a 2-process FSDP2 run SIGKILLed after a checkpoint resumes to the uninterrupted run's weights, bit for bit
(and, from the same checkpoint, in one process to within fp32 tolerance).

The runs are in tests/train_ranks.py: one launch trains all three; its one-process twins run here.
Steps are chosen so a rank sometimes has no example (it joins with a zero-weighted micro-batch) and
sometimes two micro-batches (gradient sync on the last only). The logged grad_norm catches a wrong
scale, which Adam and clipping would hide in the weights.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("train_ranks", HERE / "train_ranks.py")
train_ranks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_ranks)

pytestmark = pytest.mark.slow


def _launch(out: Path, *names: str, kill: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "KILL_AFTER_CHECKPOINT": "1" if kill else "0"}
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "train_ranks.py"), str(out), *names]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    proc = _launch(out, "rwnll", "dpo", "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", ["rwnll", "dpo", "fsdp"])
def test_two_ranks_reach_the_one_process_weights(two_ranks, tmp_path, name):
    torch.set_num_threads(1)
    one, summary = train_ranks.run(name, tmp_path / name)
    for rank in (0, 1):
        two = torch.load(two_ranks / f"{name}.rank{rank}.pt", weights_only=True)
        assert two.keys() == one.keys()
        diff = max((two[k] - one[k]).abs().max().item() for k in one)
        assert diff < 2e-5, f"{name} rank {rank}: max weight difference {diff:.2e}"
    m1, m2 = _metrics(tmp_path / name), _metrics(two_ranks / name)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] and len(m1) == summary["steps"]
    for a, b in zip(m1, m2):
        assert b["tokens"] == a["tokens"]
        for key in ("loss", "grad_norm", *(("reward_acc", "margin") if name == "dpo" else ())):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    saved = json.loads((two_ranks / name / "summary.json").read_text())
    assert saved["steps"] == summary["steps"] and saved["tokens"] == summary["tokens"]
    if name == "dpo":
        assert saved["reference"] == "computed"
        ref_one = torch.load(tmp_path / name / "reference_logps.pt", weights_only=True)["logps"]
        ref_two = torch.load(two_ranks / name / "reference_logps.pt", weights_only=True)["logps"]
        assert torch.allclose(ref_two, ref_one, atol=1e-5)  # gathered from both ranks' shares


def test_sigkilled_two_rank_fsdp_run_resumes_to_the_same_weights(two_ranks, tmp_path):
    killed = _launch(tmp_path, "fsdp", kill=True)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    run_dir = tmp_path / "fsdp"
    assert not (run_dir / "summary.json").exists()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert not state["done"] and state["counters"]["step"] == 2 and len(state["rng"]) == 2

    single = tmp_path / "single"  # the same checkpoint resumed by one process: shards were gathered
    shutil.copytree(run_dir, single)
    one, _ = train_ranks.run("fsdp", single)
    whole = torch.load(two_ranks / "fsdp.rank0.pt", weights_only=True)
    assert max((one[k] - whole[k]).abs().max().item() for k in whole) < 2e-5

    resumed = _launch(tmp_path, "fsdp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == 2
    for rank in (0, 1):
        got = torch.load(tmp_path / f"fsdp.rank{rank}.pt", weights_only=True)
        whole = torch.load(two_ranks / f"fsdp.rank{rank}.pt", weights_only=True)
        assert all(torch.equal(got[k], whole[k]) for k in whole)
    fields = ("step", "loss", "grad_norm", "tokens", "lr")
    assert [[r[k] for k in fields] for r in _metrics(run_dir)] == [[r[k] for k in fields]
                                                                   for r in _metrics(two_ranks / "fsdp")]


@pytest.mark.parametrize("mode, parallel, message", [("lora", "fsdp", "fsdp is for full fine-tuning"),
                                                     ("full", "zero", "parallel")])
def test_bad_parallel_settings_are_user_errors(tmp_path, mode, parallel, message):
    from lite_selftrain.errors import UserError
    from lite_selftrain.models import ModelConfig, load_model
    from lite_selftrain.training import TrainConfig, train

    with pytest.raises(UserError, match=message):
        model, tok = load_model(ModelConfig(name="tiny", mode=mode))
        train(model, tok, train_ranks.RECORDS, TrainConfig(objective="rwnll", parallel=parallel), tmp_path)
