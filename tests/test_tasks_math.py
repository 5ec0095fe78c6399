"""The math task: answers from MATH-format solutions, the paper's normalisation, and math-verify
equivalence checked in worker processes (with our own deadline, which a stuck check cannot outlive)."""

from pathlib import Path

import pytest

from lite_selftrain.tasks.math_task import MathTask, MathVerifier, normalize_answer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def task():
    task = MathTask(timeout=5, workers=2)
    yield task
    task.close()


def boxed(answer: str) -> str:
    return f"Some work first, so the answer is $\\boxed{{{answer}}}$."


def test_solutions_give_gold_answers(task):
    examples = task.load("test", str(DATA / "math.jsonl"))
    assert [task.gold_answer(ex) for ex in examples] == [
        "\\frac{5}{6}", "5\\sqrt{2}", "(-2,2)", "9",
        "\\begin{pmatrix}\\frac{1}{2}&0\\0&\\frac{1}{4}\\end{pmatrix}", "4"]
    for ex in examples:
        assert task.extract_answer(task.solution(ex)) == task.gold_answer(ex)
    assert task.rewards([task.solution(ex) for ex in examples], examples) == [1.0] * len(examples)


@pytest.mark.parametrize("raw, normal", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("5 \\text{ cm}", "5"),
    ("x = 5", "5"),
    ("10^\\circ", "10"),
    ("\\$18", "18"),
    ("50\\%", "50"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("\\text{(B)}", "(B)"),
    (".25", "0.25"),
    ("y = 2x + 1", "2x+1"),
    ("3,000", "3000"),  # maj@k groups "3000" and "3,000" together
    ("3{,}000", "3000"),
    ("(1,200)", "(1,200)"),  # a pair, not a thousands separator
])
def test_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize("text, answer", [
    (boxed("\\frac{3}{4}"), "\\frac{3}{4}"),
    ("First \\boxed{2}, then correcting myself: \\boxed{3}.", "3"),
    ("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac{1}{3}"),
    ("Therefore the answer is 12.", "12"),
    ("so the answer is $x = 4$.", "4"),
    ("I stopped at \\boxed{\\frac{1}{2}", None),  # cut off inside the box
    ("No conclusion.", None),
])
def test_extraction(task, text, answer):
    assert task.extract_answer(text) == answer


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "\\dfrac12"), ("\\frac{3}{4}", "\\frac{6}{8}"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("\\{1,2\\}", "\\{2,1\\}"), ("x^2+2x+1", "(x+1)^2"),
    ("\\frac{\\pi}{2}", "\\pi/2"), ("1000", "1,000"), ("4", "x = 4"), ("2x+3", "3+2x"),
]
DIFFERENT = [
    ("3", "4"), ("-3", "3"), ("\\frac{1}{3}", "0.33"), ("[0,1)", "[0,1]"), ("(1,2)", "(2,1)"),
    ("x^2", "y^2"), ("2\\sqrt{3}", "3\\sqrt{2}"), ("\\frac{1}{2}", "2"),
]


def test_symbolic_equivalence(task):
    pairs = EQUIVALENT + DIFFERENT
    examples = [{"problem": "p", "solution": boxed(gold)} for gold, _ in pairs]
    rewards = task.rewards([boxed(pred) for _, pred in pairs], examples)
    got = {pair: r for pair, r in zip(pairs, rewards)}
    assert got == {**dict.fromkeys(EQUIVALENT, 1.0), **dict.fromkeys(DIFFERENT, 0.0)}
    assert task.reward("no answer at all", examples[0]) == 0.0
    assert task.reward(boxed("0.5"), examples[0]) == 1.0  # the one-at-a-time path agrees with the batch


def test_stuck_and_dead_workers_are_replaced():
    """Without math-verify's own alarm, 1 vs 9^(9^7) computes for seconds; our deadline ends it."""
    verifier = MathVerifier(timeout=1.0, workers=1, alarm=False)
    try:
        assert verifier.check_many([("1", "1")]) == [True]
        (old,) = verifier._procs
        assert verifier.check_many([("1", "9^{9^{7}}"), ("2", "\\frac{4}{2}")]) == [False, True]
        assert old.poll() is not None and verifier._procs[0] is not old  # killed, and replaced
        verifier._procs[0].kill()  # a worker that dies while idle is replaced on its next job
        verifier._procs[0].wait()
        assert verifier.check_many([("\\frac{1}{2}", "0.5")]) == [True]
    finally:
        verifier.close()
