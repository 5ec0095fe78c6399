"""`chat_arith`: problems in words, split by their numbers, the chat template applied once, answers read from
sentence replies as GSM8K's are."""

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.tasks import get_task


def test_problems_are_deterministic_and_splits_never_share_numbers():
    task = get_task("chat_arith", model="llm-jp-3-150m", ops="+-x", varied=True)
    train, test = task.load("train", n=400), task.load("test", n=200)
    assert task.load("test", n=200) == test and len(test) == 200
    assert not {(e["op"], *e["numbers"]) for e in train} & {(e["op"], *e["numbers"]) for e in test}
    assert {e["op"] for e in test} == {"+", "-", "x"} and len({e["question"].split()[1] for e in test}) > 3
    for e in test:
        a, b = e["numbers"]
        assert int(e["answer"]) == {"+": a + b, "-": a - b, "x": a * b}[e["op"]]
        assert str(a) in e["question"] and str(b) in e["question"] and (e["op"] != "-" or a >= b)
        assert task.reward(task.reference(e), e) == 1.0


@pytest.mark.parametrize("reply, answer", [
    ("To add 27 and 82, we combine them.\n\nThe answer is 27 + 82 = 109.", "109"),
    ("27 plus 82 equals 109.", "109"),
    ("20 + 80 = 100 and 7 + 2 = 9, so the answer is **109**.", "109"),  # the marker wins over the last number
    ("The sum of 27 and 82 is 109.", "109"),
    ("I am not sure.", None),
])
def test_answer_is_read_from_a_sentence_reply(reply, answer):
    task = get_task("chat_arith", model="llm-jp-3-150m")
    assert task.extract_answer(reply) == answer


def test_bad_options_and_a_model_without_template_are_one_line():
    with pytest.raises(UserError, match="ops"):
        get_task("chat_arith", ops="/")
    with pytest.raises(UserError, match="zero-shot"):
        get_task("chat_arith", shots=2)
    with pytest.raises(UserError, match="no chat template"):
        task = get_task("chat_arith", model="tiny")
        task.prompt(task.load("test", n=1)[0])
