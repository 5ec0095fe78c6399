"""Answer extraction on how chat models actually end their answers: bold, LaTeX boxes and delimiters,
"Answer:", "option B", trailing units, arithmetic before the answer, ranges and signs.

tests/data/phrasings_<task>.jsonl holds one {"text", "answer"} per phrasing (answer null: the text gives
none); MATH answers are written as a gold `\\boxed{}` would hold them. Each phrasing must give its answer,
and a reward of 1 against a record whose gold answer it is.
"""

import json
from pathlib import Path

import pytest

from lite_selftrain.tasks import get_task
from lite_selftrain.tasks.math_task import normalize_answer

DATA = Path(__file__).parent / "data"
TASKS = ("gsm8k", "math", "arc")


def _cases():
    for name in TASKS:
        for i, line in enumerate((DATA / f"phrasings_{name}.jsonl").read_text().splitlines()):
            row = json.loads(line)
            yield pytest.param(name, row["text"], row["answer"], id=f"{name}-{i}")


def _gold_record(name: str, answer: str) -> dict:
    if name == "gsm8k":
        return {"question": "q", "answer": f"work\n#### {answer}"}
    if name == "math":
        return {"problem": "p", "solution": f"work, so $\\boxed{{{answer}}}$."}
    return {"question": "q", "choices": {"label": list("ABCD"), "text": list("wxyz")}, "answerKey": answer}


@pytest.fixture(scope="module")
def tasks():
    built = {name: get_task(name) for name in TASKS}
    yield built
    built["math"].close()


def test_each_task_has_at_least_sixty_phrasings():
    for name in TASKS:
        assert len((DATA / f"phrasings_{name}.jsonl").read_text().splitlines()) >= 60, name


@pytest.mark.parametrize("name, text, answer", list(_cases()))
def test_phrasing_gives_its_answer(tasks, name, text, answer):
    task = tasks[name]
    expected = normalize_answer(answer) if name == "math" and answer is not None else answer
    assert task.extract_answer(text) == expected
    if answer is not None:
        assert task.reward(text, _gold_record(name, answer)) == 1.0
