"""`math`: competition mathematics (Hendrycks et al. 2021, MATH), rewarded by symbolic equivalence.

Records have `problem` and `solution` (a worked solution whose final answer is in `\\boxed{}`); `level`
and `type` are kept but unused. The final answer of a completion is its last `\\boxed{}`, else the
text after "final answer is" / "answer is" / "Answer:" (bold marks and `$...$` removed). Answers group
(for maj@k) by the MATH paper's string normalisation (`normalize_answer`: `\\dfrac` -> `\\frac`, no
spaces, units, degrees or `\\left`..., and thousands separators: "3,000" and "3000" are one answer);
equal strings score 1 at once, and the others are checked with the `math-verify` package
(`\\frac{1}{2}` = `0.5`, `2\\sqrt{3}` = `\\sqrt{12}`, `\\{1,2\\}` = `\\{2,1\\}`, `(x+1)^2` = `x^2+2x+1`).

math-verify times itself out with SIGALRM, which works only on a main thread and cannot stop a sympy
call stuck in C; so each check runs in a persistent worker process (whose main thread may use the
alarm) and we kill and replace a worker that overruns our own deadline.

Usage:
    task = MathTask(timeout=5)
    task.rewards(["... so $x = \\boxed{0.5}$."], [{"problem": "...", "solution": "... \\boxed{\\frac12}"}])
    task.close()  # stops the worker processes (also done when the task is garbage-collected)

Simplifications: few-shot exemplars are our own four problems in the Minerva prompt format.
"""

from __future__ import annotations

import collections
import os
import re
import selectors
import subprocess
import sys
import time
import weakref

from ..config import Count, PositiveFloat
from .base import Task, few_shot, last_boxed

EXEMPLARS = [
    ("Problem:\nWhat is the value of $\\frac{3}{4} + \\frac{1}{6}$?\n\nSolution:\n",
     "Over the common denominator 12, $\\frac{3}{4} + \\frac{1}{6} = \\frac{9}{12} + \\frac{2}{12} = "
     "\\boxed{\\frac{11}{12}}$."),
    ("Problem:\nSolve for $x$: $3x - 7 = 11$.\n\nSolution:\n",
     "Adding 7 to both sides gives $3x = 18$, so $x = \\boxed{6}$."),
    ("Problem:\nHow many positive divisors does 36 have?\n\nSolution:\n",
     "Since $36 = 2^2 \\cdot 3^2$, it has $(2+1)(2+1) = \\boxed{9}$ positive divisors."),
    ("Problem:\nFind the distance between the points $(1, 2)$ and $(4, 6)$.\n\nSolution:\n",
     "The distance is $\\sqrt{(4-1)^2 + (6-2)^2} = \\sqrt{9 + 16} = \\boxed{5}$."),
]

_STATED = [re.compile(r"final answer is\s*\$([^$]+)\$", re.I),  # Minerva: "The final answer is $x$."
           re.compile(r"(?<![a-z])answer(?:\s+is)?\s*[:：]?[\s*]*(.+?)\s*$", re.I | re.M)]  # to the line's end
_WRAPPERS = re.compile(r"^(?:\$+|\\\(|\\\[)|(?:\$+|\\\)|\\\])$")  # $...$, \(...\), \[...\] around an answer


def _clean_stated(answer: str) -> str:
    """A stated answer without bold marks, math delimiters, a closing period or "I hope it is correct"."""
    answer = re.sub(r"\.?\s*I hope it is correct\.?$", "", answer.replace("**", "").strip())
    answer = answer.strip().rstrip(".").strip()
    for _ in range(2):  # "$\(x\)$" has two layers
        answer = _WRAPPERS.sub("", answer).strip()
    return answer


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`."""
    return re.sub(r"\\frac(\{[^{}]*\}|\w)(\{[^{}]*\}|\w)",
                  lambda m: "\\frac" + "".join(p if p.startswith("{") else "{" + p + "}" for p in m.groups()), s)


def normalize_answer(answer: str) -> str:
    """The MATH paper's answer normalisation: equal strings after it are the same answer."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s+[^}]*\}\s*$", "", s)  # units: "5 \text{ cm}" -> "5"
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:  # "x = 5" -> "5"
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"^(-?[\d.,{}]+)\s*(?:\\(?:text|mbox|mathrm)\{[^}]*\}|[a-zA-Z]{2,}(?: [a-zA-Z]+)*)(\^[23])?$",
               r"\1", s)  # "12 cm", "12 square units", "12\text{cm}^2" -> "12"
    s = s.replace("°", "").replace(" ", "").rstrip(".").replace("{,}", ",")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # "3,000" -> "3000" (but "(1,2)" stays)
        s = s.replace(",", "")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d+/\d+", s):  # "1/2" -> "\frac{1}{2}"
        num, den = s.split("/")
        s = f"{'-' if num.startswith('-') else ''}\\frac{{{num.lstrip('-')}}}{{{den}}}"
    if s.startswith("."):
        s = "0" + s
    if s == "0.5":
        s = "\\frac{1}{2}"
    return s


# ----------------------------------------------------------------------------------------------------
# equivalence checks in worker processes

_WORKER = r"""
import resource, sys
memory = int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))  # a huge power fails with MemoryError, not OOM
from math_verify import parse, verify
limit = int(sys.argv[1]) or None  # 0: no alarm of its own
print("ready", flush=True)
for line in sys.stdin:
    gold, pred = line.rstrip("\n").split("\t")
    try:
        g = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=limit)
        ok = bool(g) and bool(p) and verify(g, p, timeout_seconds=limit)
    except BaseException:  # math-verify's own timeout, sympy recursion, anything: not equivalent
        ok = False
    print(1 if ok else 0, flush=True)
"""


def _stop_workers(procs: list) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


class MathVerifier:
    """math-verify equivalence checks in `workers` processes, each check within `timeout` seconds."""

    def __init__(self, timeout: float = 5.0, workers: int = 0, alarm: bool = True, memory_mb: int = 2048):
        self.timeout = timeout
        self.workers = workers or os.cpu_count() or 1
        self.alarm = alarm  # math-verify's own SIGALRM timeout first: cheaper than killing a worker
        self.memory_mb = memory_mb  # address space per worker (one uses about 100 MB)
        self._procs: list[subprocess.Popen] = []
        weakref.finalize(self, _stop_workers, self._procs)

    def _start(self, count: int) -> list[subprocess.Popen]:
        """`count` new workers, started together (each takes about a second to import sympy)."""
        inner = max(1, int(self.timeout / 2)) if self.alarm else 0  # our kill is the backstop
        command = [sys.executable, "-c", _WORKER, str(inner), str(self.memory_mb)]
        procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, bufsize=1) for _ in range(count)]
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a math-verify worker did not start (is math-verify installed?)")
        return procs

    def _replace(self, proc: subprocess.Popen) -> subprocess.Popen:
        _stop_workers([proc])
        (new,) = self._start(1)
        self._procs[self._procs.index(proc)] = new
        return new

    def _send(self, proc: subprocess.Popen, line: str) -> subprocess.Popen:
        """Give `proc` a job and return it, or its replacement if it had died while idle."""
        try:
            proc.stdin.write(line)
            proc.stdin.flush()
        except BrokenPipeError:
            proc = self._replace(proc)
            proc.stdin.write(line)
            proc.stdin.flush()
        return proc

    def check_many(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Whether each (gold, prediction) pair is equivalent; a check past the deadline counts as False."""
        results = [False] * len(pairs)
        todo = collections.deque(i for i, (g, p) in enumerate(pairs) if g.strip() and p.strip())
        self._procs += self._start(min(self.workers, len(todo)) - len(self._procs))
        idle, busy = list(self._procs), {}  # busy: proc -> (pair index, deadline)
        with selectors.DefaultSelector() as sel:
            while todo or busy:
                while todo and idle:
                    proc, i = idle.pop(), todo.popleft()
                    gold, pred = (" ".join(x.split()) for x in pairs[i])  # one line, no tabs
                    proc = self._send(proc, f"{gold}\t{pred}\n")
                    busy[proc] = (i, time.monotonic() + self.timeout)
                    sel.register(proc.stdout, selectors.EVENT_READ, proc)
                wait = min(d for _, d in busy.values()) - time.monotonic()
                for key, _ in sel.select(timeout=max(wait, 0)):
                    proc = key.data
                    sel.unregister(proc.stdout)
                    i, _ = busy.pop(proc)
                    line = proc.stdout.readline()
                    results[i] = line.strip() == "1"
                    idle.append(proc if line else self._replace(proc))  # "" : the worker died
                now = time.monotonic()
                for proc, (_, deadline) in list(busy.items()):
                    if now >= deadline:  # stuck: kill it, start a fresh one
                        sel.unregister(proc.stdout)
                        del busy[proc]
                        idle.append(self._replace(proc))
        return results

    def close(self) -> None:
        _stop_workers(self._procs)
        self._procs.clear()


# ----------------------------------------------------------------------------------------------------
# the task


class MathTask(Task):
    name = "math"
    max_new_tokens = 1024  # MATH's longest worked solutions run to several hundred tokens
    stop = ("\nProblem:",)  # the next few-shot block would begin here
    hub = "EleutherAI/hendrycks_math"  # the original hendrycks/competition_math is no longer on the hub
    hub_configs = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                   "number_theory", "prealgebra", "precalculus")
    fields = ("problem", "solution")
    default_shots = 4  # the papers prompt base models 4-shot
    exemplars = EXEMPLARS

    def __init__(self, timeout: PositiveFloat = 5.0, workers: Count = 0, shots: Count | None = None):
        super().__init__(shots)
        self.check_options(timeout=timeout, workers=workers)
        self.timeout = timeout  # seconds per equivalence check; math-verify's own default
        self.workers = workers  # checking processes; 0 = one per CPU core
        self._verifier: MathVerifier | None = None  # started on the first check that needs it

    @property
    def verifier(self) -> MathVerifier:
        if self._verifier is None:
            self._verifier = MathVerifier(self.timeout, self.workers)
        return self._verifier

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()

    def prompt(self, example: dict) -> str:
        return few_shot(EXEMPLARS, self.shots, self.name) + f"Problem:\n{example['problem']}\n\nSolution:\n"

    def solution(self, example: dict) -> str:
        return example["solution"]

    def raw_answer(self, text: str) -> str | None:
        """The final answer as written (before normalisation), None if there is none."""
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
        for pattern in _STATED:
            found = [a for a in map(_clean_stated, pattern.findall(text)) if a]
            if found:
                return found[-1]
        return None

    def extract_answer(self, text: str) -> str | None:
        raw = self.raw_answer(text)
        return normalize_answer(raw) if raw is not None else None

    def gold_answer(self, example: dict) -> str:
        return normalize_answer(last_boxed(example["solution"]) or "")

    def rewards(self, completions: list[str], examples: list[dict]) -> list[float]:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        out, pending = [], []
        for i, (completion, example) in enumerate(zip(completions, examples)):
            raw, gold = self.raw_answer(completion), last_boxed(example["solution"]) or ""
            same = raw is not None and normalize_answer(raw) == normalize_answer(gold) != ""
            out.append(float(same))
            if raw is not None and not same:
                pending.append((i, gold, raw))
        checked = self.verifier.check_many([(g, r) for _, g, r in pending]) if pending else []
        for (i, _, _), ok in zip(pending, checked):
            out[i] = float(ok)
        return out

    def reward(self, completion: str, example: dict) -> float:
        return self.rewards([completion], [example])[0]
