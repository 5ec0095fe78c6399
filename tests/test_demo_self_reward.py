"""The demo's self-rewarding chain: its judge data agree with the hidden verifier, and it runs beside its control."""

import json
import random

import pytest

from lite_selftrain.demo import quick_config, run_demo
from lite_selftrain.demo.judging import TEMPLATE, agreement, eft_records, numbers_of, rubric
from lite_selftrain.errors import UserError
from lite_selftrain.judge import JudgeConfig, eft_example, judge_prompt, parse_score
from lite_selftrain.tasks import get_task


def _answers(task, ex, rng):
    """The reference and answers a model gets wrong: a slipped step, a carried slip, a bad total, junk."""
    sums = task.reference(ex).split("#")[0].split(",")
    i = rng.randrange(len(sums))
    slipped = sums[:i] + [str(int(sums[i]) + rng.choice([-2, -1, 1, 10]))] + sums[i + 1:]
    carried = [str(int(s) + (1 if j >= i else 0)) for j, s in enumerate(sums)]
    return [task.reference(ex), ",".join(slipped) + f"#{slipped[-1]}", ",".join(carried) + f"#{carried[-1]}",
            ",".join(sums) + f"#{int(sums[-1]) + 1}", ",".join(sums[:-1]) + f"#{sums[-1]}", "7", ""]


def test_the_judge_training_scores_agree_with_the_hidden_verifier():
    task, rng = get_task("arith", terms=4), random.Random(0)
    examples = task.load("train", n=200)
    scored = [{"prompt_index": i, "text": a, "reward": task.reward(a, ex)}
              for i, ex in enumerate(examples) for a in _answers(task, ex, rng)]
    records = eft_records(examples, scored)
    assert sum(r["reward"] > 0 for r in records) >= 200 and sum(r["reward"] == 0 for r in records) >= 500
    for r in records:
        assert r["score"] == (5 if r["reward"] > 0 else 1 if "#" in r["response"] else 0), r  # the verifier's
        ex = eft_example(r["prompt"], r["response"], r["justification"], r["score"], TEMPLATE)
        assert ex["prompt"] == f"{r['prompt']}{r['response'].strip()}|"
        assert parse_score(ex["response"]) == r["score"]  # what the judge is trained to write, it parses
    assert rubric([3, 5, 2, 8], "8,10,17#17") == ("03+05=08,08+02=10,10+08=18#18/17:11y87n", 1)
    assert rubric([3, 5, 2, 8], "9,12#18") == ("03+05=08,08+02=10,10+08=18#18/18:11y88y", 5)
    assert rubric([3, 5, 2, 8], "8,10") == ("03+05=08,08+02=10,10+08=18#--n", 0)
    assert numbers_of("3+5+2+8=") == [3, 5, 2, 8]


def test_agreement_reports_balanced_accuracy_beside_raw_agreement():
    judged = [{"score": s} for s in (5, 3.7, 3, None, 1, 0, 2.3, 5)]
    verified = [True, False, False, False, False, False, False, False]
    m = agreement(judged, verified)
    # says correct: 5, 3.7, 3, 5 -> one true positive, three false positives of seven negatives
    assert m["judge_agreement"] == pytest.approx(5 / 8)
    assert m["judge_true_positive_rate"] == 1.0 and m["judge_true_negative_rate"] == pytest.approx(4 / 7)
    assert m["judge_balanced_accuracy"] == pytest.approx((1 + 4 / 7) / 2)
    assert agreement(judged[1:], verified[1:])["judge_balanced_accuracy"] is None  # no positive: undefined


def test_a_judge_template_needs_both_fields():
    assert judge_prompt(" 1+2= ", "3#3 ", TEMPLATE) == "1+2=3#3|"
    with pytest.raises(UserError, match="template"):
        JudgeConfig(template="{prompt} only")


@pytest.mark.slow
def test_the_self_rewarding_chain_runs_beside_its_control_and_resumes(tmp_path):
    cfg = quick_config()
    cfg.iterations, cfg.problems_per_iteration, cfg.warm_steps = 1, 200, 300
    cfg.m0_steps, cfg.eft_problems, cfg.rpo_steps = 150, 300, 20
    run = lambda: run_demo(cfg, tmp_path, progress=False, echo=lambda *_: None, chains=("random_pairs",))
    run()  # the control brings the chain whose pair counts it matches
    metrics = (tmp_path / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [(r["recipe"], r["iteration"]) for r in rows] == [
        (c, t) for c in ("self_rewarding", "random_pairs") for t in (0, 1)]
    for r in rows:
        assert 0 <= r["judge_agreement"] <= 1 and 0 <= r["test_pass@1"] <= 1
        assert r["judge_balanced_accuracy"] is None or 0 <= r["judge_balanced_accuracy"] <= 1
    first = {r["recipe"]: r for r in rows if r["iteration"] == 0}
    assert first["self_rewarding"]["test_pass@1"] == first["random_pairs"]["test_pass@1"]  # the same M_0
    last = {r["recipe"]: r for r in rows if r["iteration"] == 1}
    assert last["random_pairs"]["answer_pairs"] == last["self_rewarding"]["answer_pairs"]
    assert last["random_pairs"]["judge_pairs"] == last["self_rewarding"]["judge_pairs"]
    for r in last.values():
        assert 0 <= r["train_judge_agreement"] <= 1 and 0 <= r["chosen_correct"] <= 1
    eft = [json.loads(x) for x in (tmp_path / "self_rewarding" / "m0_data" / "eft.jsonl").read_text().splitlines()]
    task = get_task("arith", terms=cfg.terms)
    assert all((r["score"] == 5) == (task.reward(r["response"], task.make(numbers_of(r["prompt"]))) > 0)
               for r in eft)
    for chain in ("self_rewarding", "random_pairs"):  # best.json names the split the demo chose on
        assert json.loads((tmp_path / chain / "best.json").read_text())["validation_problems"] == \
            cfg.validation_problems
    dataset = tmp_path / "self_rewarding" / "self_rewarding" / "iter_01" / "judged.jsonl"
    stamp = dataset.stat().st_mtime_ns
    run()  # resumed: nothing is redone, nothing logged twice
    assert dataset.stat().st_mtime_ns == stamp
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
