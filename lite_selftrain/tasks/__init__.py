"""Tasks by name: `get_task("gsm8k")`, `get_task("arith", terms=4)`, `get_task("apps", sandbox={...})`.

Each task lives in its own module, imported only when asked for (the math task's checker and the
sandbox cost nothing until used). Options are passed to the task's constructor.
Simplification: a fixed table of tasks; a new task is one module plus one line here.
"""

from __future__ import annotations

import importlib
import inspect

from ..errors import UserError, UserTypeError
from .base import CodeTask, Task

# name -> (module, class); modules are imported on first use
TASKS: dict[str, tuple[str, str]] = {
    "arith": ("arith", "ArithTask"),
    "gsm8k": ("gsm8k", "GSM8KTask"),
    "math": ("math_task", "MathTask"),
    "arc": ("arc", "ArcTask"),
    "humaneval": ("humaneval", "HumanEvalTask"),
    "apps": ("apps", "AppsTask"),
    "instruct": ("instruct", "InstructTask"),
    "chat_arith": ("chat_arith", "ChatArithTask"),
}


def get_task(name: str, **options) -> Task:
    """The task called `name`, built with `options`; unknown names and options raise `UserError`."""
    if not isinstance(name, str):
        raise UserTypeError(f"the task name must be a string (one of {', '.join(TASKS)}), not {type(name).__name__}")
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    module, cls = TASKS[name]
    task_class = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    params = inspect.signature(task_class).parameters
    unknown = [k for k in options if k not in params]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise UserError(f"task {name} has no option '{unknown[0]}' (its options: {', '.join(params)})")
    try:
        return task_class(**options)
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"bad options for task {name}: {e}") from None


__all__ = ["TASKS", "CodeTask", "Task", "get_task"]
