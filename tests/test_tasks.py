"""Task registry, loading, and the text tasks (gsm8k, arc, instruct) against hand-written records.

Fixtures in tests/data/ follow each public dataset's own format; the gold solution of every record
must yield its gold answer and a reward of 1.
"""

from pathlib import Path

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.tasks import TASKS, Task, get_task
from lite_selftrain.tasks.base import last_boxed
from lite_selftrain.tasks.gsm8k import normalize_number

DATA = Path(__file__).parent / "data"


# -- registry and loading ------------------------------------------------------------------------------


def test_registry_builds_every_task_with_the_interface():
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert isinstance(task.max_new_tokens, int) and task.max_new_tokens > 0
        assert isinstance(task.stop, tuple) and all(isinstance(s, str) for s in task.stop)
        assert task.needs_judge == (name == "instruct")
        for method in ("load", "prompt", "solution", "extract_answer", "gold_answer", "reward", "rewards"):
            assert callable(getattr(task, method))
    assert isinstance(get_task("gsm8k"), Task)
    assert get_task("arith", terms=4).config.terms == (4, 4)  # options reach the constructor


def test_registry_errors():
    with pytest.raises(UserError, match="known: arith, gsm8k, math, arc, humaneval, apps, instruct"):
        get_task("gsm8k8")
    with pytest.raises(UserError, match=r"task gsm8k has no option .difficulty. \(its options: shots\)"):
        get_task("gsm8k", difficulty=3)
    with pytest.raises(UserError, match="did you mean 'timeout'"):
        get_task("apps", sandbox={"timeot": 3})


def test_load_errors_name_the_problem(tmp_path):
    task = get_task("gsm8k")
    with pytest.raises(UserError, match="not found"):
        task.load("test", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "solution": "s"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: the record has no .answer."):
        task.load("test", str(bad))
    with pytest.raises(UserError, match="pass a local file"):  # the tests run offline
        task.load("test")


# -- gsm8k ----------------------------------------------------------------------------------------------


def test_gsm8k_solutions_give_gold_answers():
    task = get_task("gsm8k")
    examples = task.load("test", str(DATA / "gsm8k.jsonl"))
    assert [task.gold_answer(ex) for ex in examples] == ["27", "6", "1200", "7.5"]
    for ex in examples:
        gold = task.solution(ex)
        assert "<<" not in gold and gold.endswith("#### " + ex["answer"].split("#### ")[-1])
        assert task.extract_answer(gold) == task.gold_answer(ex)
        assert task.reference(ex) == gold  # the old name still answers
    assert task.rewards([task.solution(ex) for ex in examples], examples) == [1.0] * 4


@pytest.mark.parametrize("text, answer", [
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,200", "1200"),
    ("#### $1,200.00", "1200"),
    ("She pays 5 dollars.\nThe answer is 18.", "18"),
    ("The answer is $18.50.", "18.5"),
    ("The final answer is: 18 dollars", "18"),
    ("Q: how many?\nA: 42", "42"),
    ("so the total is \\boxed{1,024}", "1024"),
    ("it costs 3 then 12 and finally 18.0", "18"),
    ("the temperature fell to -4 degrees", "-4"),
    ("#### 12\nQuestion: next one has 99", "12"),  # an explicit marker beats later numbers
    ("The answer is 5. Later: #### 6", "6"),  # #### is the most explicit marker
    ("no number here", None),
    ("", None),
])
def test_gsm8k_extraction(text, answer):
    assert get_task("gsm8k").extract_answer(text) == answer


def test_gsm8k_numeric_equivalence():
    task = get_task("gsm8k")
    ex = {"question": "q", "answer": "work\n#### 18"}
    for same in ("#### 18.0", "#### 18.000", "#### $18", "The answer is 18 apples.", "#### 0018"):
        assert task.reward(same, ex) == 1.0, same
    for other in ("#### 18.5", "#### 180", "#### 1.8", "#### -18", "The answer is 81", "nothing"):
        assert task.reward(other, ex) == 0.0, other
    assert normalize_number("7,500.250") == "7500.25" and normalize_number("0.50") == "0.5"


def test_gsm8k_prompts():
    task = get_task("gsm8k", shots=0)
    ex = {"question": "How many legs do 3 cats have?", "answer": "#### 12"}
    assert task.prompt(ex) == "Question: How many legs do 3 cats have?\nAnswer:\n"
    two = get_task("gsm8k", shots=2).prompt(ex)
    assert two.count("Question:") == 3 and two.count("####") == 2 and two.endswith(task.prompt(ex))
    assert get_task("gsm8k").prompt(ex).count("####") == 4  # 4-shot unless told otherwise, as the papers
    assert all(stop not in task.solution(ex) for stop in task.stop)
    with pytest.raises(UserError, match="shots"):
        get_task("gsm8k", shots=99).prompt(ex)
    with pytest.raises(UserError, match="shots"):
        get_task("gsm8k", shots=-1)


# -- arc ------------------------------------------------------------------------------------------------


def test_arc_solutions_and_letters():
    task = get_task("arc", shots=0)
    examples = task.load("test", str(DATA / "arc.jsonl"))
    assert [task.gold_answer(ex) for ex in examples] == ["A", "B", "D"]  # answerKey "2" is the 2nd choice: B
    for ex in examples:
        assert task.extract_answer(task.solution(ex)) == task.gold_answer(ex)
    assert task.rewards([task.solution(ex) for ex in examples], examples) == [1.0] * 3
    prompt = task.prompt(examples[1])
    assert "A. friction\nB. gravity\nC. magnetism\nD. electricity\nAnswer:\n" in prompt and "1." not in prompt
    assert "E. uranium" in task.prompt(examples[2])
    four = get_task("arc").prompt(examples[0])  # the task's default
    assert four.count("Question:") == 5 and four.count("The answer is") == 4


@pytest.mark.parametrize("text, letter", [
    ("Gravity pulls objects down. The answer is B.", "B"),
    ("The answer is (C)", "C"),
    ("Answer: D", "D"),
    ("Answer: **A**", "A"),
    ("I first thought A, but the answer is B.", "B"),
    ("\\boxed{C}", "C"),
    ("B", "B"),
    ("(D) wind", "D"),
    ("C. natural gas", "C"),
    ("A plant needs light.", None),  # the article "A" is not an answer
    ("The answer is a renewable resource", None),
    ("I am not sure.", None),
])
def test_arc_extraction(text, letter):
    assert get_task("arc").extract_answer(text) == letter


# -- instruct -------------------------------------------------------------------------------------------


def test_instruct_reads_the_common_layouts():
    task = get_task("instruct")
    pairs = [(r["prompt"], r["response"]) for r in task.load("train", str(DATA / "instruct.jsonl"))]
    assert pairs == [
        ("Summarise the text in one sentence.\n\nThe cat sat on the mat all afternoon, watching birds.",
         "A cat spent the afternoon on a mat watching birds."),
        ("Name a primary colour.", "Red."),
        ("Say hello in French.", "Bonjour."),
    ]


def test_instruct_reads_an_openassistant_table():
    task = get_task("instruct")
    records = task.load("train", str(DATA / "oasst1.jsonl"))
    pairs = [(r["prompt"], r["response"]) for r in records]
    assert pairs == [  # first-turn prompts only, each with its best-ranked reply
        ("What is a good way to learn a new language?",
         "Practice a little every day: read, listen, and speak with native speakers."),
        ("日本の首都はどこですか？", "日本の首都は東京です。"),
    ]
    assert task.prompt(records[1]) == "日本の首都はどこですか？"
    assert task.solution(records[1]) == "日本の首都は東京です。"
    with pytest.raises(NotImplementedError, match="judge"):
        task.reward("anything", records[0])


def test_instruct_rejects_records_without_pairs(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"title": "no pair here"}\n')
    with pytest.raises(UserError, match="no prompt/response"):
        get_task("instruct").load("train", str(path))


# -- shared helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, inner", [
    ("so $x = \\boxed{5}$", "5"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\boxed 7 is it", "7"),
    ("\\fbox{x^2}", "x^2"),
    ("\\boxed{\\frac{1}{2}", None),  # cut off inside the box
    ("no box", None),
])
def test_last_boxed(text, inner):
    assert last_boxed(text) == inner
