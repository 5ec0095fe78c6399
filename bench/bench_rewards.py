"""Rewards scored per second on CPU: math answers (math-verify) and sandboxed code, side by side.

    python bench/bench_rewards.py                  # both, workers swept over 1 and all cores
    python bench/bench_rewards.py --only math --items 400

Math: `--items` (gold, completion) pairs, a third with the gold answer written the same way (the string
fast path), a third equivalent but written differently (a math-verify check), a third wrong. Providers:
- `inprocess`: math-verify's parse + verify called directly in this process, its timeouts off: the
  fastest possible and the unsafe baseline (a stuck check would hang the caller);
- `workers=W`: `MathTask(workers=W).rewards`, checks in W worker processes under our deadline.

Code: `--items` completions of the APPS and HumanEval fixtures (tests/data), their gold programs,
so every test runs. Providers:
- `bare`: each test's program run with `python -c`, no limits, one at a time: the cost of a process;
- `unsafe,workers=W`: the sandbox's launcher and limits without namespaces (`isolate=False`);
- `workers=W`: `AppsTask` / `HumanEvalTask` rewards through the sandbox, each program in its own
  namespaces (a user id per run under root, a cgroup per run where the machine allows), W at a time.
The difference between the first two sandboxed rows, per run, is what isolation costs.

Worker start-up (sympy imports, the sandbox's probe, recording HumanEval's reference calls once per
problem) is timed apart and left out of the rates.
Rows are appended to bench/results/bench_rewards.csv with the device and versions; ratios are to the
first provider of the same run. Simplification: one repetition per provider (the machine is shared), so
compare ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "bench_rewards.csv"

def math_forms(k: int) -> list[tuple[str, str, str]]:
    """(gold, an equivalent form, a wrong answer) for a parameter k >= 2: distinct for every k, so no
    cache inside math-verify (it memoises parses) helps any provider."""
    return [
        (f"\\frac{{{k}}}{{2}}", f"{k / 2}", f"\\frac{{{k + 1}}}{{2}}"),
        (f"{k}\\sqrt{{3}}", f"\\sqrt{{{3 * k * k}}}", f"{k + 1}\\sqrt{{3}}"),
        (f"x^2+{2 * k}x+{k * k}", f"(x+{k})^2", f"(x-{k})^2"),
        (f"\\frac{{\\pi}}{{{k}}}", f"\\pi/{k}", f"\\pi/{k + 1}"),
        (f"\\{{1,{k}\\}}", f"\\{{{k},1\\}}", f"\\{{1,{k + 1}\\}}"),
        (f"(-{k},{k})", f"(-{k}, {k})", f"[-{k},{k}]"),
        (f"{k}", f"{k}.0", f"{k + 1}"),
    ]


def math_items(n: int) -> tuple[list[str], list[dict]]:
    """n completions: by turns the gold answer as written, an equivalent form, and a wrong answer."""
    completions, examples = [], []
    per_k = 3 * len(math_forms(2))
    for i in range(n):
        gold, equivalent, wrong = math_forms(2 + i // per_k)[i % len(math_forms(2))]
        pred = (gold, equivalent, wrong)[(i // len(math_forms(2))) % 3]
        completions.append(f"Working... so the answer is $\\boxed{{{pred}}}$.")
        examples.append({"problem": "p", "solution": f"The answer is $\\boxed{{{gold}}}$."})
    return completions, examples


def code_items(n: int) -> list[tuple[object, str, dict]]:
    from lite_selftrain.tasks.apps import AppsTask
    from lite_selftrain.tasks.humaneval import HumanEvalTask

    pool = []
    for task, name in ((AppsTask(), "apps"), (HumanEvalTask(), "humaneval")):
        for ex in task.load("test", str(ROOT / "tests" / "data" / f"{name}.jsonl")):
            pool.append((task, task.solution(ex), ex))
    return [pool[i % len(pool)] for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# providers


def run_math(provider: str, completions: list[str], examples: list[dict]) -> tuple[list[float], float, float]:
    """(rewards, seconds, start-up seconds) of one provider."""
    if provider == "inprocess":
        from math_verify import parse, verify

        from lite_selftrain.tasks.base import last_boxed

        start = time.perf_counter()
        verify(parse("$\\frac{1}{4}$"), parse("$0.25$"))  # sympy's parsers load on first use
        startup = time.perf_counter() - start
        start = time.perf_counter()
        rewards = [float(verify(parse("\\boxed{" + last_boxed(ex["solution"]) + "}", parsing_timeout=None),
                                parse(c, parsing_timeout=None), timeout_seconds=None))
                   for c, ex in zip(completions, examples)]
        return rewards, time.perf_counter() - start, startup
    from lite_selftrain.tasks.math_task import MathTask

    task = MathTask(workers=int(provider.split("=")[1]))
    start = time.perf_counter()
    task.verifier.check_many([("1", "2")] * task.verifier.workers)  # start every worker
    startup = time.perf_counter() - start
    start = time.perf_counter()
    rewards = task.rewards(completions, examples)
    seconds = time.perf_counter() - start
    task.close()
    return rewards, seconds, startup


def bare_program(task, program: str, ex: dict, given=None) -> str:
    """What a test runs without the sandbox: HumanEval's original harness (the tests and `check`), or the
    APPS program with a call of its function that prints the result's JSON."""
    if task.name == "humaneval":
        return f"{ex['prompt']}{program}\n\n{ex['test']}\n\ncheck({ex['entry_point']})\n"
    code, fn = task.program(program, ex), ex["input_output"].get("fn_name")
    if given is None or not fn:
        return code
    call = f"Solution().{fn}" if "class Solution" in code else fn
    return f"{code}\nimport json\nprint(json.dumps({call}(*json.loads({json.dumps(given)!r})), default=list))\n"


def run_bare(items: list) -> list[float]:
    """Each test's program run with `python -c`, no limits, no isolation, one at a time."""
    from lite_selftrain.tasks.apps import same_call_result, same_output, stdin_text

    rewards = []
    for task, program, ex in items:
        if task.name == "humaneval":
            proc = subprocess.run([sys.executable, "-c", bare_program(task, program, ex)], capture_output=True)
            rewards.append(float(proc.returncode == 0))
            continue
        tests, ok, fn = ex["input_output"], True, ex["input_output"].get("fn_name")
        for given, want in zip(tests["inputs"], tests["outputs"]):
            code = bare_program(task, program, ex, given)
            stdin = "" if fn else stdin_text(given)
            out = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True).stdout
            ok = ok and (same_call_result(json.loads(out.splitlines()[-1]), want) if fn
                         else same_output(out, stdin_text(want)))
        rewards.append(float(ok))
    return rewards


def run_code(provider: str, items: list) -> tuple[list[float], float, float]:
    """(rewards, seconds, start-up seconds) of one provider: `bare`, `unsafe,workers=W` (the sandbox's
    limits without namespaces) or `workers=W` (isolated)."""
    if provider == "bare":
        start = time.perf_counter()
        rewards = run_bare(items)
        return rewards, time.perf_counter() - start, 0.0
    unsafe, workers = provider.startswith("unsafe"), int(provider.split("=")[1])
    sandbox = {"workers": workers, "isolate": not unsafe, "unsafe": unsafe}
    tasks = {}
    for task, _, _ in items:
        tasks.setdefault(task.name, type(task)(sandbox=sandbox))
    start = time.perf_counter()
    for task in tasks.values():
        task.sandbox.run("pass")  # the probe that finds the isolation
        if task.name == "humaneval":  # each problem's gold calls are recorded once, ahead of training
            task.sandbox.map(task.expected, [ex for t, _, ex in items if t.name == "humaneval"])
    startup = time.perf_counter() - start
    start = time.perf_counter()
    by_task: dict[str, list[int]] = {}
    for i, (task, _, _) in enumerate(items):
        by_task.setdefault(task.name, []).append(i)
    rewards = [0.0] * len(items)
    for name, idx in by_task.items():
        got = tasks[name].rewards([items[i][1] for i in idx], [items[i][2] for i in idx])
        for i, r in zip(idx, got):
            rewards[i] = r
    return rewards, time.perf_counter() - start, startup


def isolation_cost(n: int = 40) -> tuple[float, str]:
    """Median extra milliseconds of an isolated run of `pass` over the same run with the limits only,
    the two taken in turns so that both see the same load."""
    from lite_selftrain.tasks.sandbox import Sandbox, SandboxConfig

    boxes = [Sandbox(SandboxConfig(isolate=isolate, unsafe=not isolate)) for isolate in (True, False)]
    for box in boxes:
        box.run("pass")
    cost = statistics.median(boxes[0].run("pass").seconds - boxes[1].run("pass").seconds for _ in range(n))
    return 1000 * cost, boxes[0].isolation


def count_tests(items: list) -> int:
    return sum(1 if task.name == "humaneval" else len(ex["input_output"]["inputs"]) for task, _, ex in items)


# ----------------------------------------------------------------------------------------------------
# main


def environment() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"device": f"cpu: {cpu}", "cpus": os.cpu_count(), "python": platform.python_version(),
            "math_verify": version("math-verify"), "sympy": version("sympy"), "uid": os.geteuid(),
            "load_1min": round(os.getloadavg()[0], 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["math", "code"], default=None)
    parser.add_argument("--items", type=int, default=None, help="completions per provider (math 210, code 24)")
    parser.add_argument("--workers", type=str, default=f"1,{os.cpu_count()}", help="worker counts to sweep")
    args = parser.parse_args()
    workers = sorted({int(w) for w in args.workers.split(",")})
    env, rows = environment(), []
    print(json.dumps(env))
    for kind in ("math", "code"):
        if args.only not in (None, kind):
            continue
        providers = (["inprocess"] if kind == "math" else ["bare", f"unsafe,workers={workers[0]}"])
        providers += [f"workers={w}" for w in workers]
        n = args.items or (210 if kind == "math" else 24)
        if kind == "math":
            completions, examples = math_items(n)
            results = {p: run_math(p, completions, examples) for p in providers}
            units = n
        else:
            items = code_items(n)
            results = {p: run_code(p, items) for p in providers}
            units = count_tests(items)
        base = n / results[providers[0]][1]
        baseline = results[providers[-1]][0]
        print(f"\n{kind}: {n} completions ({units} {'checks' if kind == 'math' else 'tests'})")
        print(f"{'provider':<17} {'seconds':>8} {'rewards/s':>10} {'ratio':>7} {'start-up s':>11}  agrees")
        for p in providers:
            rewards, seconds, startup = results[p]
            rate = n / seconds
            agrees = rewards == baseline
            print(f"{p:<17} {seconds:8.2f} {rate:10.1f} {rate / base:7.2f} {startup:11.2f}  {agrees}")
            rows.append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": kind,
                         "provider": p, "items": n, "units": units, "seconds": round(seconds, 4),
                         "rewards_per_s": round(rate, 2), "ratio_to_first": round(rate / base, 3),
                         "startup_s": round(startup, 3), "mean_reward": round(sum(rewards) / n, 4),
                         "agrees_with_last": agrees, **env})
    if args.only in (None, "code"):
        cost, how = isolation_cost()
        print(f"\nisolation costs {cost:.1f} ms a run ({how}; the median of 40 pairs)")
        rows.append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": "isolation",
                     "provider": f"{how} - limits only", "items": 40, "units": 40, "seconds": round(cost / 1000, 5),
                     **env})
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\nlargest child process: {children_mb:.0f} MB resident")
    from results_csv import append_rows  # bench/ is on sys.path when this script runs

    append_rows(RESULTS, rows)


if __name__ == "__main__":
    main()
