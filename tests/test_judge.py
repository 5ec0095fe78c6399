"""The judge: the rubric prompt, parse_score on messy outputs, averaging that skips unparsable
judgments, EFT formatting, and k judgments sampled from the tiny preset."""

import pytest

from lite_selftrain.judge import (
    JUDGE_TEMPLATE,
    JudgeConfig,
    average_score,
    eft_example,
    judge,
    judge_prompt,
    parse_score,
)


@pytest.mark.parametrize("text, score", [
    ("The reply is relevant and complete.\nScore: 4", 4.0),
    ("Good answer.\nscore:3.5", 3.5),
    ("SCORE :  5/5", 5.0),
    ("Score: 4 / 5", 4.0),
    ("**Score:** 2", 2.0),
    ("Score: **3**", 3.0),
    ("Final score: 1", 1.0),
    ("Score: 4 out of 5 points.", 4.0),
    ("Score：4", 4.0),  # a full-width colon
    ("Score: 0", 0.0),
    ("It earns the first two points.\nScore: 2.", 2.0),
    ("Score: 2\nOn reflection it deserves more.\nScore: 4", 4.0),  # the last one counts
    ("Score: 3\nScore: 9", None),  # the last one is out of range: no fallback to an earlier one
    ("Score: 7", None),
    ("Score: -1", None),
    ("Score: 8/10", None),  # another scale
    ("Score: five", None),
    ("I would give it a 4.", None),
    ("", None),
])
def test_parse_score_on_messy_judgments(text, score):
    assert parse_score(text) == score


def test_the_template_itself_has_no_score():
    assert parse_score(JUDGE_TEMPLATE) is None  # a judgment that only echoes the prompt is missing
    prompt = judge_prompt("  How do I boil an egg?\n", "Put it in boiling water for 8 minutes.  ")
    assert "Request:\nHow do I boil an egg?\n\nReply:\nPut it in boiling water for 8 minutes.\n" in prompt
    assert prompt.count("+1 ") == 5 and prompt.endswith("Score: <total points from 0 to 5>")
    assert parse_score(prompt) is None


def test_average_skips_missing_judgments():
    assert average_score([4.0, None, 2.0]) == 3.0
    assert average_score([None, 5.0, None]) == 5.0
    assert average_score([None, None, None]) is None
    assert average_score([]) is None
    assert average_score([0.0, 0.0]) == 0.0  # a real zero is not missing


def test_eft_examples_end_with_one_score_line():
    ex = eft_example("Name a prime.", "7", "The reply is correct and direct.\nScore: 2\n", 4)
    assert ex["prompt"] == judge_prompt("Name a prime.", "7")
    assert ex["response"] == "The reply is correct and direct.\nScore: 4"
    half = eft_example("q", "r", "Partly useful.", 2.5)
    assert half["response"].endswith("\nScore: 2.5") and parse_score(half["response"]) == 2.5
    assert parse_score(ex["response"]) == 4.0  # the judge's own training target parses back
    with pytest.raises(ValueError):
        eft_example("q", "r", "x", 6)


def test_judge_samples_k_judgments_per_pair():
    from lite_selftrain.models import build_model, build_tokenizer
    from lite_selftrain.sampling import SamplingConfig

    tok = build_tokenizer()
    model = build_model("tiny", vocab_size=len(tok)).eval()
    model.config.max_position_embeddings = 2048  # byte tokens: the judge prompt alone is ~750 of them
    pairs = [("What is 2 + 2?", "4"), ("Say hi.", "hi")]
    cfg = JudgeConfig(sample=SamplingConfig(n=3, temperature=0.7, top_p=0.9, max_new_tokens=6, seed=5))
    results = judge(model, tok, pairs, cfg)
    assert len(results) == 2
    for r in results:
        assert len(r.texts) == 3 and r.scores == [parse_score(t) for t in r.texts]
        assert r.score == average_score(r.scores)
    assert [r.texts for r in judge(model, tok, pairs, cfg)] == [r.texts for r in results]  # seeded
