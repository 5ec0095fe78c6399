"""The four recipes end to end on tiny models, and each one killed mid-run then resumed.

A killed-and-resumed run must end with exactly the metrics of an uninterrupted one: stages that finished
are skipped, the sampler and the trainer pick up where they stopped, and every random draw is seeded.
"""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lite_selftrain import demo
from lite_selftrain.config import from_dict, to_dict
from lite_selftrain.demo.selection import blind_pick
from lite_selftrain.errors import UserError
from lite_selftrain.recipes import RECIPES, load_recipe, rest_em, rpo, self_rewarding
from lite_selftrain.recipes.shared import Scored, split_validation
from lite_selftrain.tasks import get_task

NAMES = {"rest-em": "rest_em", "rpo": "rpo", "self-reward": "self_reward", "centrality": "centrality"}  # folders

RUNNER = """
import json, sys
from lite_selftrain.config import from_dict
from lite_selftrain.recipes import load_recipe
module, cls = load_recipe(sys.argv[1])
module.run(from_dict(cls, json.loads(sys.argv[2])), sys.argv[3], progress=False)
"""

# The same, but the process SIGKILLs itself the first time a temporary is about to be renamed over a file
# or folder called sys.argv[4]: the moment a kill leaves a finished temporary behind.
KILLED_INSIDE_A_WRITE = """
import json, os, signal, sys
from pathlib import Path
rename = os.replace
def replace(src, dst, *args, **kwargs):
    if Path(dst).name == sys.argv[4] and Path(src).name.startswith(".lite-tmp."):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.replace = replace
from lite_selftrain.config import from_dict
from lite_selftrain.recipes import load_recipe
module, cls = load_recipe(sys.argv[1])
module.run(from_dict(cls, json.loads(sys.argv[2])), sys.argv[3], progress=False)
"""

SMALL_TRAIN = {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "checkpoint_every": 1, "log_every": 1}


@pytest.fixture(scope="module")
def arith_model(tmp_path_factory):
    """The demo's warm start, shortened: a small model that gets some 3-term sums right."""
    cfg = demo.DemoConfig(warm_examples=600, warm_long_examples=0, warm_steps=80, terms=3)
    return str(demo.warm_start(cfg, tmp_path_factory.mktemp("warm"), progress=False))


@pytest.fixture(scope="module")
def instruct_file(tmp_path_factory):
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yam", "oat", "rye", "bean", "corn"]
    path = tmp_path_factory.mktemp("data") / "instruct.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w} twice.", "response": f"{w} {w}"}) + "\n" for w in words))
    return str(path)


def _arith_config(name, model, mode):
    cfg = {"task": "arith", "task_options": {"terms": 3, "n_train": 24, "n_test": 16, "shots": 0}, "iterations": 2,
           "problems_per_iteration": 12, "model": {"name": model, "mode": mode},
           "sample": {"n": 6, "batch_size": 8},
           "eval": {"sample": {"n": 2, "batch_size": 16}, "ks": [1, 2]},
           "train": {**SMALL_TRAIN, "objective": "rwnll" if name == "rest-em" else "dpo_nll", "lr": 1e-3}}
    if name == "rpo":
        cfg["pairs_per_problem"] = 2
    return cfg


def _instruct_config(name, path):
    tiny = {"name": "tiny", "mode": "lora", "lora_dropout": 0.0}
    judge = {"sample": {"n": 2, "max_new_tokens": 8}}
    sample = {"n": 3, "max_new_tokens": 10, "top_k": 0, "top_p": 0.9, "batch_size": 8}
    if name == "self-reward":
        return {"ift_path": path, "eval_size": 2, "no_eft": True, "model": tiny, "judge": judge, "new_prompts": 4,
                "write": {"max_new_tokens": 12}, "respond": sample, "iterations": 2,
                "sft": {**SMALL_TRAIN, "objective": "sft"}, "train": {**SMALL_TRAIN, "objective": "dpo_nll"}}
    return {"data_path": path, "eval_size": 2, "model": tiny, "judge": judge, "sample": sample, "iterations": 2,
            "objective": "sft", "selection": {"policy": "central"}, "train": {**SMALL_TRAIN, "objective": "sft"},
            "rubrics": []}  # the llm-jp scales would triple the judging: test_judge_endpoint.py covers them


def _config(name, arith_model, instruct_file):
    if name in ("rest-em", "rpo"):
        return _arith_config(name, arith_model, "full" if name == "rest-em" else "lora")
    return _instruct_config(name, instruct_file)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def _start(name, cfg, out, *, runner=RUNNER, extra=()):
    return subprocess.Popen([sys.executable, "-c", runner, name, json.dumps(cfg), str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".lite-tmp.*"))


def _kill_when(proc, path: Path, timeout=300.0):
    """SIGKILL `proc` as soon as `path` exists (mid-stage); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# where to pull the plug: inside iteration 1's training (a trainer checkpoint exists, training goes on)
KILL_AT = {
    "rest-em": "rest_em/iter_01/train/checkpoint.pt",
    "rpo": "rpo/iter_01/train/checkpoint.pt",
    "self-reward": "self_reward/iter_00/train/checkpoint.pt",
    "centrality": "centrality/iter_01/samples.jsonl",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_runs_and_a_killed_run_resumes_to_the_same_metrics(name, arith_model, instruct_file, tmp_path):
    module, cls = load_recipe(name)
    cfg = _config(name, arith_model, instruct_file)
    records, best = module.run(from_dict(cls, cfg), tmp_path / "whole", progress=False)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert (tmp_path / "whole" / NAMES[name] / "iter_02" / "model").exists()

    proc = _start(name, cfg, tmp_path / "killed")
    _kill_when(proc, tmp_path / "killed" / KILL_AT[name])
    resumed = _start(name, cfg, tmp_path / "killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "whole")

    if name in ("rest-em", "rpo"):  # a warm-started model gives real data to learn from
        assert all(r["dataset_size"] > 0 for r in records[1:])
        assert best is not None and 0 <= best["test_pass@1"] <= 1 and 0 <= best["valid_pass@1"] <= 1
    chosen = json.loads((tmp_path / "whole" / "best.json").read_text()) if best is not None else None
    if name in ("rest-em", "rpo"):
        assert chosen["iteration"] == best["iteration"] == max(records, key=lambda r: r["valid_pass@1"])["iteration"]
        assert chosen["selected_on"] == "valid_pass@1" and chosen["validation_problems"] == 2  # 10 % of 24
        assert chosen["test"]["test_pass@1"] == best["test_pass@1"]  # reported beside, never chosen on
    if chosen is not None:
        assert chosen["split"] == "validation" and chosen["selected_on"].startswith("valid_")
    if name == "self-reward":  # a random tiny model writes no parsable judgment: the loop says so
        assert all(r["pairs"] == 0 and r["train_note"].startswith("no pairs") for r in records[1:])
        assert best is None


@pytest.mark.slow
def test_kills_inside_saves_leave_nothing_behind(arith_model, tmp_path):
    """Killed inside the reference-cache write, then inside a trainer checkpoint write, then inside the
    model save: each resume removes what the kill left, and the run ends as an uninterrupted one."""
    cfg = _arith_config("rpo", arith_model, "lora")  # DPO: a reference cache, checkpoints and an adapter
    rpo.run(from_dict(rpo.RPOConfig, cfg), tmp_path / "whole", progress=False)
    out = tmp_path / "killed"
    left = {}
    for target in ("dataset.ref_logps.pt", "checkpoint.pt", "model"):
        proc = _start("rpo", cfg, out, runner=KILLED_INSIDE_A_WRITE, extra=[target])
        assert proc.wait(timeout=600) == -signal.SIGKILL, proc.stderr.read()[-3000:]
        left[target] = _temporaries(out)
        assert any(target in name for name in left[target]), left  # the kill left the finished temporary
    resumed = _start("rpo", cfg, out)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert "temporary entries a stopped run left" in resumed.stderr.read()
    assert _temporaries(out) == []
    assert _metrics(out) == _metrics(tmp_path / "whole")


def test_run_directory_refuses_a_different_config(arith_model, tmp_path):
    cfg = _arith_config("rest-em", arith_model, "full")
    cfg["iterations"] = 0
    rest_em.run(from_dict(rest_em.RestEMConfig, cfg), tmp_path, progress=False)
    cfg["seed"] = 1
    with pytest.raises(UserError, match="different config"):
        rest_em.run(from_dict(rest_em.RestEMConfig, cfg), tmp_path, progress=False)
    rest_em.run(from_dict(rest_em.RestEMConfig, cfg), tmp_path, progress=False, restart=True)


def test_build_rules_on_hand_made_samples():
    task = get_task("arith", terms=2)
    problems = [task.make([1, 2]), task.make([3, 4]), task.make([5, 5])]

    def s(p, i, text, reward, finish="eos"):
        return {"prompt_index": p, "sample_index": i, "text": text, "reward": reward, "finish_reason": finish}

    scored = [s(0, 0, "3#3", 1.0), s(0, 1, "3#3", 1.0), s(0, 2, "4#4", 0.0), s(0, 3, "3#3", 1.0, "length"),
              s(1, 0, "7#7", 1.0), s(1, 1, "7#7", 1.0), s(2, 0, "9#9", 0.0)]
    prompts = [task.prompt(p) for p in problems]
    batch = Scored(1, prompts, scored)
    records, info = rest_em.keep_correct(batch, max_per_problem=1, seed=0)
    assert [r["response"] for r in records] == ["3#3", "7#7"]  # the cap, and correct finished samples only
    assert [r["prompt"] for r in records] == ["1+2=", "3+4="]
    assert info["dropped"] == {"too_long": 1, "no_correct": 1}
    pairs, info = rpo.correct_vs_incorrect(batch, pairs_per_problem=5, seed=0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("3#3", "4#4")]  # distinct texts: one pair
    assert info["dropped"] == {"too_long": 1, "no_correct": 1, "no_incorrect": 1}
    blind, info = blind_pick([2], max_per_problem=1, seed=0)(batch)  # the demo's control
    assert len(blind) == 2 and all(r["reward"] == 1.0 for r in blind)
    assert info["correct_kept"] == sum(r["response"] != "4#4" and r["response"] != "9#9" for r in blind)


def test_self_reward_pairs_skip_ties_and_unparsable():
    def s(p, i, score, finish="eos"):
        return {"prompt_index": p, "sample_index": i, "text": f"a{p}{i}", "prompt": f"q{p}", "score": score,
                "finish_reason": finish}

    judged = [s(0, 0, 4.0), s(0, 1, None), s(0, 2, 1.5),  # pair (4.0, 1.5); the unparsable one is ignored
              s(1, 0, 3.0), s(1, 1, 3.0),  # tie
              s(2, 0, None), s(2, 1, 2.0),  # one parsable judgment only
              s(3, 0, 5.0, "length"), s(3, 1, 1.0)]  # one finished answer only
    pairs, info = self_rewarding.best_vs_worst(judged)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a00", "a02")]
    assert info["dropped"] == {"too_long": 1, "unparsable_judgment": 1, "tie": 1, "same_text": 0}
    same = [{**s(4, 0, 5.0), "text": "x"}, {**s(4, 1, 1.0), "text": "x"}]  # one text judged twice, differently
    pairs, info = self_rewarding.best_vs_worst(same)
    assert pairs == [] and info["dropped"]["same_text"] == 1


def test_validation_split_is_carved_from_training_problems():
    problems = list(range(50_000))
    train, valid = split_validation(problems, None, seed=0)
    assert len(valid) == 1000 and len(train) == 49_000 and not set(train) & set(valid)  # min(1000, 10 %)
    train, valid = split_validation(list(range(200)), None, seed=0)
    assert len(valid) == 20 and sorted(train + valid) == list(range(200))
    assert split_validation(list(range(200)), 7, seed=0)[1] == split_validation(list(range(200)), 7, seed=0)[1]
    assert len(split_validation(list(range(200)), 7, seed=0)[1]) == 7  # configurable, seeded
    assert len(split_validation(list(range(30)), None, seed=0, cap=2)[1]) == 2  # judged recipes cap it
    with pytest.raises(UserError, match="leaves none"):
        split_validation(list(range(5)), 5, seed=0)
    with pytest.raises(UserError, match="never used to choose"):
        from_dict(rest_em.RestEMConfig, {"eval": {"select_on": "test_pass@1"}})


def test_self_reward_without_eft_data_stops_unless_told(instruct_file, tmp_path):
    cfg = _instruct_config("self-reward", instruct_file)
    cfg["no_eft"] = False
    with pytest.raises(UserError, match="EFT data: set eft_path .* or no_eft = true"):
        self_rewarding.run(from_dict(self_rewarding.SelfRewardConfig, cfg), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()  # stopped before anything was written


@pytest.fixture(scope="module")
def scoring_judge(tmp_path_factory, instruct_file):
    """A tiny model trained to answer every judge prompt with "Score: 4" (a random one never scores)."""
    from lite_selftrain.judge import judge_prompt
    from lite_selftrain.models import build_model, build_tokenizer, save_model
    from lite_selftrain.training import TrainConfig, train

    tok = build_tokenizer()
    model = build_model("tiny", vocab_size=len(tok), seed=3)
    words = [json.loads(line)["prompt"] for line in Path(instruct_file).read_text().splitlines()]
    records = [{"prompt": judge_prompt(w, a), "response": "Score: 4"} for w in words for a in ("x", "yy", "a b")]
    train(model, tok, records, TrainConfig(objective="sft", lr=1e-2, max_steps=120, batch_size=8, grad_accum=1,
                                           max_length=1200, warmup_ratio=0.0, checkpoint_every=1000),
          tmp_path_factory.mktemp("judge_train"))
    return str(save_model(model, tmp_path_factory.mktemp("judge") / "model", tok))


def test_one_fixed_judge_scores_every_iterate_and_a_fixed_model_writes_prompts(instruct_file, scoring_judge,
                                                                              tmp_path):
    """The iterates (random tiny models) never write a parsable score; the named judge always does, so every
    iteration's held-out scores come from it, not from the iterate judging itself."""
    cfg = {**_instruct_config("self-reward", instruct_file), "iterations": 1}
    own = self_rewarding.run(from_dict(self_rewarding.SelfRewardConfig, cfg), tmp_path / "a", progress=False)[0]
    assert [r["judge"] for r in own] == ["iteration 0"] * 2  # M_0 judges every iterate by default
    cfg_b = {**cfg, "judge_model": scoring_judge, "prompt_model": scoring_judge}
    fixed = self_rewarding.run(from_dict(self_rewarding.SelfRewardConfig, cfg_b), tmp_path / "b", progress=False)[0]
    assert [(r["judge"], r["test_judge_score"], r["valid_judge_score"]) for r in fixed] == [(scoring_judge, 4, 4)] * 2
    assert [r["test_judge_score"] for r in own] == [None, None]
    prompts = [(tmp_path / run / "self_reward/iter_01/prompts_raw.jsonl").read_text() for run in ("a", "b")]
    assert prompts[0] != prompts[1]  # the writer is the named model, not the iterate
    cfg_c = {**_instruct_config("centrality", instruct_file), "iterations": 1, "judge_model": scoring_judge,
             "rubrics": ["quality"]}
    central = load_recipe("centrality")[0].run(from_dict(load_recipe("centrality")[1], cfg_c), tmp_path / "c",
                                               progress=False)[0]
    assert [(r["judge"], r["valid_judge_score"]) for r in central] == [(scoring_judge, 4)] * 2
    assert all("test_quality_score" in r and "valid_quality_score" in r for r in central)  # the same judge, graded
    # on the llm-jp quality scale too


def test_config_round_trips_through_dicts():
    for name in RECIPES:
        _, cls = load_recipe(name)
        cfg = cls()
        assert from_dict(cls, to_dict(cfg)) == cfg


@pytest.mark.parametrize("name, objective", [("rpo", None), ("centrality", "sft"), ("centrality", "dpo")])
def test_a_run_folder_made_before_config_version_resumes(tmp_path, name, objective):
    """Version 1 wrote no config_version, replaced train.reference by the recipe's own when training (its
    stored value did nothing), ignored alpha under SFT, and centrality had no seed: such a folder resumes
    with the config that does what it did, keeps its config.json, and still refuses a different one."""
    from lite_selftrain.recipes.centrality import CentralityConfig
    from lite_selftrain.recipes.common import Run
    from lite_selftrain.store import RunStore, atomic_write_json

    cfg = rpo.RPOConfig(task="arith") if name == "rpo" else CentralityConfig(objective=objective)
    old = json.loads(json.dumps({"recipe": name, **to_dict(cfg)}))
    old["train"]["reference"] = "adapter_off"  # version 1's TrainConfig default, never used by these recipes
    if name == "centrality":
        del old["seed"]
        old["train"]["alpha"] = 1.0 if objective == "sft" else 0.0  # dpo: version 1 stored the α it forced
    atomic_write_json(tmp_path / "config.json", old)
    RunStore(tmp_path).mark_done(f"{name}/00/eval", {})
    Run(tmp_path, name, cfg).bind()
    assert json.loads((tmp_path / "config.json").read_text()) == old
    with pytest.raises(UserError, match="different config"):
        Run(tmp_path, name, dataclasses.replace(cfg, iterations=cfg.iterations + 1))
    if name == "centrality" and objective == "dpo":  # a run that trained with α 1 does not resume with α 0
        old["train"]["alpha"] = 1.0
        atomic_write_json(tmp_path / "config.json", old)
        with pytest.raises(UserError, match="different config"):
            Run(tmp_path, name, cfg)


def test_rpo_defaults_follow_the_task_and_explicit_values_win():
    assert (rpo.RPOConfig(task="arc").iterations, rpo.RPOConfig(task="arc").pairs_per_problem) == (3, 20)
    assert rpo.RPOConfig(task="math").temperatures == [0.8, 0.8, 1.0]
    assert rpo.RPOConfig(task="arith").temperatures == [0.8, 0.8, 1.3, 1.3]  # other tasks: GSM8K's
    assert from_dict(rpo.RPOConfig, {"task": "arc", "pairs_per_problem": 5}).pairs_per_problem == 5
    assert from_dict(rpo.RPOConfig, {"task": "arc", "temperatures": []}).temperature(2) == 0.8  # sample's
