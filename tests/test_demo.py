"""The shortened demo: self-training must raise held-out accuracy more than the reward-blind control."""

import json

import pytest

from lite_selftrain.recipes.demo import gains, quick_config, run_demo


@pytest.mark.slow
def test_quick_demo_self_training_beats_the_control(tmp_path):
    result = run_demo(quick_config(), tmp_path, progress=False, echo=lambda *_: None)
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
