"""The Task interface every task follows, and the loading and text helpers the tasks share.

A task turns dataset records into prompts, gold responses and rewards:

    task = get_task("gsm8k", shots=4)                  # the few-shot count is the task's own option
    task.load("test", path="gsm8k_test.jsonl")       # records with the public dataset's field names
    task.prompt(example)                               # few-shot prompt ending where the answer starts
    task.reward(completion, example)                   # 1.0 when the final answer is right, else 0.0
    scored, stats = task.score_samples(samples, examples)   # sample records with a reward each

`extract_answer` returns a normalised string, so majority voting can group equal answers by string.
Simplification: records are plain dicts; a task checks only the fields it reads.
"""

from __future__ import annotations

import functools
import re
import typing

from .. import distributed as dist
from ..config import Count, check_value, from_dict
from ..data import load_records
from ..errors import UserError, UserTypeError
from .sandbox import Sandbox, SandboxConfig

FIELD_KINDS = {"choices": "table", "input_output": "any"}  # the task fields that are not plain text


class Task:
    """Base class: subclasses set the class attributes and the prompt / answer methods."""

    name: str = ""
    max_new_tokens: int = 512  # long enough for the longest gold solution of the task
    stop: tuple[str, ...] = ()  # strings that end a completion during sampling
    needs_judge: bool = False  # True when rewards come from lite_selftrain.judge, not reward()
    default_shots: int = 0  # solved examples before the question; reasoning tasks prompt base models 4-shot
    exemplars: list | None = None  # the fixed few-shot exemplars, where a task has them: shots may not exceed them
    hub: str | None = None  # the public dataset's hub name, used when no path is given
    hub_configs: tuple[str | None, ...] = (None,)  # its configurations (subsets), loaded one after another
    fields: tuple[str, ...] = ()  # the record fields the task reads

    def __init__(self, shots: Count | None = None):
        self.check_options(shots=shots)
        self.shots = self.default_shots if shots is None else shots
        if self.exemplars is not None and self.shots > len(self.exemplars):
            raise UserError(f"task {self.name} has {len(self.exemplars)} few-shot exemplars; shots must be "
                            f"0..{len(self.exemplars)}, not {self.shots}")

    def check_options(self, **options) -> None:
        """Check each option against its annotation in the task's constructor (`timeout: PositiveFloat`):
        the one check of every task option, a wrong type or range named in one line."""
        hints = _init_hints(type(self))
        for key, value in options.items():
            if key in hints:
                try:
                    check_value(value, hints[key], key)
                except UserError as e:
                    raise type(e)(f"task {self.name}: {e}") from None

    # -- data ----------------------------------------------------------------------------------------
    def load(self, split: str, path: str | None = None) -> list[dict]:
        """Records of `split` from a local JSONL file / saved dataset, or from the hub (online only)."""
        if path is None and self.hub is None:
            raise UserError(f"task {self.name} has no public source: pass a local file")
        records: list[dict] = []
        need = {f: FIELD_KINDS.get(f, "string") for f in self.fields}
        for config in ([None] if path is not None else self.hub_configs):
            try:
                records += load_records(path if path is not None else self.hub, split, config=config, need=need)
            except UserError as e:
                raise UserError(f"task {self.name}: {e}") from None
        prepared = []
        for i, record in enumerate(records):
            try:
                prepared.append(self.prepare(record))
            except UserError as e:
                raise type(e)(f"task {self.name}: {path or self.hub} record {i + 1}: {e}") from None
        return prepared

    def prepare(self, record: dict) -> dict:
        """Normalise one loaded record (e.g. decode a JSON-string field); the identity by default."""
        return record

    # -- prompts and answers ---------------------------------------------------------------------------
    def prompt(self, example: dict) -> str:
        """The prompt of one example, after `self.shots` solved examples for the few-shot tasks."""
        raise NotImplementedError

    def solution(self, example: dict) -> str:
        """The gold response text (a worked solution, or a program)."""
        raise NotImplementedError

    def reference(self, example: dict) -> str:
        """The old name of `solution`, kept so that code written against it runs on."""
        return self.solution(example)

    def extract_answer(self, text: str) -> str | None:
        """The normalised final answer of a response, None if it gives none."""
        raise NotImplementedError

    def gold_answer(self, example: dict) -> str:
        raise NotImplementedError

    # -- rewards ---------------------------------------------------------------------------------------
    def reward(self, completion: str, example: dict) -> float:
        answer = self.extract_answer(completion)
        return float(answer is not None and answer == self.gold_answer(example))

    def rewards(self, completions: list[str], examples: list[dict]) -> list[float]:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        return [self.reward(c, ex) for c, ex in zip(completions, examples)]

    def judged(self, completions: list[str], examples: list[dict]) -> list[tuple[float, str | None]]:
        """Each completion's reward, and why judging it failed (then the reward is 0), else None."""
        return [(r, None) for r in self.rewards(completions, examples)]

    def score_samples(self, samples: list[dict], examples: list[dict]) -> tuple[list[dict], dict]:
        """Sample records ({prompt_index, sample_index, text, ...}) with a reward each (and a "reward_error"
        where judging it failed), in prompt order, and {"samples", "train_accuracy" (mean reward),
        "train_coverage" (share of problems solved at least once)}.

        Under a launcher every rank calls it with the same samples, rewards its share and gets them all."""
        for i, s in enumerate(samples):
            if not (isinstance(s.get("prompt_index"), int) and 0 <= s["prompt_index"] < len(examples)
                    and isinstance(s.get("text"), str)):
                raise UserError(f"sample record {i} needs a text and a prompt_index in 0..{len(examples) - 1}")
        samples = sorted(samples, key=lambda r: (r["prompt_index"], r.get("sample_index", 0)))
        pairs = [(s["text"], examples[s["prompt_index"]]) for s in samples]
        judged = dist.map_shards(lambda mine: self.judged([t for t, _ in mine], [ex for _, ex in mine]), pairs)
        scored = [{**s, "reward": float(r), **({"reward_error": why} if why else {})}
                  for s, (r, why) in zip(samples, judged)]
        solved = {s["prompt_index"] for s in scored if s["reward"] > 0}
        return scored, {"samples": len(scored),
                        "train_accuracy": sum(s["reward"] for s in scored) / max(len(scored), 1),
                        "train_coverage": len(solved) / max(len(examples), 1)}


def few_shot(exemplars: list[tuple[str, str]], shots: int, task: str) -> str:
    """The first `shots` (prompt, response) exemplars, each followed by a blank line."""
    if not 0 <= shots <= len(exemplars):
        raise UserError(f"task {task} has {len(exemplars)} few-shot exemplars; shots must be 0..{len(exemplars)}")
    return "".join(p + r + "\n\n" for p, r in exemplars[:shots])


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed N`), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("{", 1)
    head = re.match(r"\\(?:boxed|fbox) +([^\s$]+)", text[start:])
    if head and "{" not in head.group(0):  # "\boxed 5": the argument without braces
        return head.group(1)
    if len(rest) < 2:
        return None
    depth = 1
    for i, ch in enumerate(rest[1]):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1][:i]
    return None  # unbalanced: the completion was cut off inside the box


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.S | re.I)


def code_block(text: str) -> str:
    """The first fenced code block of `text` (chat models wrap code in ```python), else `text` itself."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def normalize_code(code: str) -> str:
    """A program with trailing spaces and blank edge lines removed (equal programs compare equal)."""
    return "\n".join(line.rstrip() for line in code.strip("\n").splitlines())


@functools.cache
def _init_hints(cls: type) -> dict:
    return typing.get_type_hints(cls.__init__, include_extras=True)


class CodeTask(Task):
    """A task whose reward runs the program against tests in the sandbox: 1.0 iff every test passes."""

    def __init__(self, sandbox: SandboxConfig | dict | None = None, shots: Count | None = None):
        super().__init__(shots)  # accepted for a uniform interface; the code tasks prompt zero-shot
        cfg = from_dict(SandboxConfig, sandbox, where="sandbox") if isinstance(sandbox, dict) else sandbox
        if not isinstance(cfg, (SandboxConfig, type(None))):
            raise UserTypeError(f"sandbox must be a SandboxConfig or a dict of its fields, not {type(cfg).__name__}")
        self.sandbox = Sandbox(cfg)  # limits, user and parallelism of the program runs

    def outcomes(self, completion: str, example: dict) -> list[str]:
        """Per test "pass", "fail", "timeout" or "error"; may stop after the first test that does not pass."""
        raise NotImplementedError

    def extract_answer(self, text: str) -> str | None:
        code = normalize_code(code_block(text))
        return code or None

    def reward(self, completion: str, example: dict) -> float:
        results = self.outcomes(completion, example)
        return float(bool(results) and all(r == "pass" for r in results))

    def judge(self, completion: str, example: dict) -> tuple[float, str | None]:
        """`reward`, or 0 and why, for any error judging the program (its data are the program's doing)."""
        try:
            return self.reward(completion, example), None
        except UserError:  # the task's own data is wrong (say, a gold solution whose calls cannot be recorded)
            raise
        except Exception as e:  # noqa: BLE001 - one sample's fault, never the batch's
            return 0.0, f"{type(e).__name__}: {e}"[:300]

    def judged(self, completions: list[str], examples: list[dict]) -> list[tuple[float, str | None]]:
        """Programs run in parallel, `sandbox.workers` at a time; an error scores its sample 0, with a reason."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        return self.sandbox.map(lambda pair: self.judge(*pair), zip(completions, examples))

    def rewards(self, completions: list[str], examples: list[dict]) -> list[float]:
        return [r for r, _ in self.judged(completions, examples)]

    def score_samples(self, samples: list[dict], examples: list[dict]) -> tuple[list[dict], dict]:
        """As for every task, plus how the programs were isolated ("sandbox"), for the run's records."""
        isolation = self.sandbox.isolation  # refuses here, before any work, where programs may not run
        scored, stats = super().score_samples(samples, examples)
        return scored, {**stats, "sandbox": isolation}
