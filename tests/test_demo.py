"""The shortened demo: self-training must raise held-out accuracy more than the reward-blind control."""

import dataclasses
import json

import pytest

from lite_selftrain.demo import gains, quick_config, run_demo
from lite_selftrain.demo.selection import majority_pick, random_pick
from lite_selftrain.errors import UserError
from lite_selftrain.recipes.shared import Scored


@pytest.mark.slow
def test_quick_demo_self_training_beats_the_control(tmp_path):
    result = run_demo(quick_config(), tmp_path, progress=False, echo=lambda *_: None,
                      chains=("rest_em", "rpo", "control"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["recipe"] for r in rows} == {"rest_em", "rpo", "control"}
    assert all(0 <= r["test_pass@1"] <= 1 and isinstance(r["iteration"], int) for r in rows)
    assert [r["iteration"] for r in rows if r["recipe"] == "control"] == [0, 1, 2]
    assert (tmp_path / "accuracy.png").stat().st_size > 1000

    def final_gain(recipe):
        chain = [r for r in rows if r["recipe"] == recipe]
        return 100 * (chain[-1]["test_pass@1"] - chain[0]["test_pass@1"])

    control = final_gain("control")
    assert final_gain("rest_em") > control + 3, rows
    assert final_gain("rpo") > control + 3, rows
    chosen = {r["recipe"]: r for r in rows[::-1] if r["valid_pass@1"] == max(  # the earliest best on validation
        x["valid_pass@1"] for x in rows if x["recipe"] == r["recipe"])}
    for recipe, best in chosen.items():
        assert json.loads((tmp_path / recipe / "best.json").read_text())["iteration"] == best["iteration"]
        assert gains(result["records"])[recipe] == pytest.approx(100 * (best["test_pass@1"] - rows[0]["test_pass@1"]))
    with pytest.raises(UserError, match="different config"):  # the finished demo is refused, not wiped
        run_demo(dataclasses.replace(quick_config(), seed=1), tmp_path, progress=False, echo=lambda *_: None,
                 chains=("rest_em",))
    assert (tmp_path / "warmstart" / "model" / "config.json").exists()


def _sample(p, i, text, reward):
    return {"prompt_index": p, "sample_index": i, "text": text, "finish_reason": "eos", "reward": reward}


def test_majority_pick_keeps_a_sample_with_the_most_common_answer_and_the_surest_problems():
    scored = [_sample(0, 0, "1,2#7", 0.0), _sample(0, 1, "3,5#9", 1.0), _sample(0, 2, "4,5#9", 1.0),
              _sample(1, 0, "1#4", 0.0), _sample(1, 1, "2#5", 1.0), _sample(1, 2, "1#4", 0.0),
              _sample(1, 3, "1#4", 0.0)]
    batch = Scored(1, ["a", "b"], scored)
    records, info = majority_pick("arith", {"terms": 2}, 0, fraction=1.0)(batch)
    assert sorted((r["prompt"], r["response"]) for r in records) == [("a", "3,5#9"), ("b", "1#4")]
    assert (info["dataset_size"], info["correct_kept"]) == (2, 1)
    records, _ = majority_pick("arith", {"terms": 2}, 0, fraction=0.5)(batch)
    assert [r["prompt"] for r in records] == ["b"]  # three votes beat two
    records, info = random_pick([1], 0)(batch)
    assert info["dataset_size"] == 1 and records[0]["response"] in {s["text"] for s in scored}


def test_an_unknown_chain_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="unknown demo chain"):
        run_demo(quick_config(), tmp_path / "run", progress=False, echo=lambda *_: None, chains=("nope",))
    with pytest.raises(UserError, match="none given"):
        run_demo(quick_config(), tmp_path / "run", progress=False, echo=lambda *_: None, chains=())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_selection_chains_run_beside_their_control_and_resume(tmp_path):
    cfg = quick_config()
    cfg.iterations, cfg.problems_per_iteration, cfg.warm_steps = 1, 200, 300
    run = lambda: run_demo(cfg, tmp_path, progress=False, echo=lambda *_: None, chains=("random_pick", "majority"))
    run()  # the random-pick control brings the central chain it matches
    metrics = (tmp_path / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [(r["recipe"], r["iteration"]) for r in rows] == [
        (c, t) for c in ("central", "random_pick", "majority") for t in (0, 1)]
    last = {r["recipe"]: r for r in rows if r["iteration"] == 1}
    assert last["random_pick"]["dataset_size"] == last["central"]["dataset_size"] > 0
    for r in last.values():
        assert 0 <= r["correct_kept"] <= r["dataset_size"] <= cfg.problems_per_iteration
    dataset = tmp_path / "central" / "central" / "iter_01" / "dataset.jsonl"
    stamp = dataset.stat().st_mtime_ns
    result = run()  # resumed: nothing is redone, nothing logged twice
    assert dataset.stat().st_mtime_ns == stamp
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert {r["recipe"] for r in result["records"]} == {"central", "random_pick", "majority"}
