"""The sandbox runs programs faithfully, ends runaway ones, returns call results as data, and refuses to
run code without isolation unless told to. The attacks themselves are in test_sandbox_attacks.py."""

import json
import os

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.tasks.sandbox import RunResult, Sandbox, SandboxConfig, decode, encode
from lite_selftrain.tasks.sandbox_child import dumps

LIMITS = dict(timeout=3.0, cpu_seconds=1, memory_mb=256, max_processes=8, max_output_bytes=1 << 16, workers=2)


@pytest.fixture(scope="module")
def box():
    box = Sandbox(SandboxConfig(**LIMITS))
    try:
        assert box.isolation.startswith("isolated")
    except UserError as e:
        pytest.skip(f"no OS isolation on this machine: {e}")
    return box


def test_programs_run_faithfully(box, monkeypatch):
    monkeypatch.setenv("LITE_SELFTRAIN_SECRET", "hidden")
    r = box.run("import sys\nprint(sum(map(int, sys.stdin.read().split())), 'é')", stdin="1 2\n3\n")
    assert (r.stdout, r.returncode, r.isolated, r.outcome(True)) == ("6 é\n", 0, True, "pass")
    big = "\n".join(map(str, range(200_000))) + "\n"  # over a megabyte of stdin
    assert box.run("import sys\nprint(len(sys.stdin.read()))", stdin=big).stdout == f"{len(big)}\n"
    r = box.run("import os\nprint(os.getcwd(), os.listdir('.'), os.listdir('/tmp'), sorted(os.environ))")
    assert r.stdout.startswith("/work [] [] ") and "LITE_SELFTRAIN_SECRET" not in r.stdout and "PATH" not in r.stdout
    r = box.run("open('notes.txt', 'w').write('ok')\nprint(open('notes.txt').read())")
    assert r.stdout == "ok\n"  # its own folder is writable
    r = box.run("import hashlib, fractions, subprocess\nprint(hashlib.md5(b'x').hexdigest()[:6], "
                "subprocess.run(['sh', '-c', 'echo $((6 * 7))'], capture_output=True, text=True).stdout)")
    if "one process" in box.isolation:  # no cgroup to bound a run's processes: it may start none
        assert "BlockingIOError" in r.stderr
    else:
        assert r.stdout == "9dd4e4 42\n\n", r.stderr  # the standard library and a shell work inside
    assert box.run("exit(3)").returncode == 3  # exit() exists although `site` is not loaded


def test_what_a_program_sees(box):
    r = box.run("import os\nprint(os.getpid(), sorted(os.listdir('/')), sorted(p for p in os.listdir('/proc') "
                "if p.isdigit()))\nopen('/usr/lite_selftrain_probe', 'w')")
    pid, rest = r.stdout.split(" ", 1)
    assert pid == "1" and "'work'" in rest and "'home'" not in rest  # its own PID namespace and root
    assert "Read-only file system" in r.stderr or "Permission denied" in r.stderr
    assert not os.path.exists("/usr/lite_selftrain_probe")


def test_call_results_are_typed_data(box):
    code = "def f(x):\n    return [x, (x,), {x: {1, 2}}, b'\\x00', None, 1.5, True]"
    r = box.run(code, calls=("f", [[1], ["a"]]))
    assert r.values == [[1, (1,), {1: {1, 2}}, b"\x00", None, 1.5, True], ["a", ("a",), {"a": {1, 2}}, b"\x00",
                                                                              None, 1.5, True]]
    r = box.run("class Solution:\n    def add(self, a, b):\n        return a + b", calls=("add", [[2, 3], [[1], [2]]]))
    assert r.values == [5, [1, 2]]  # a LeetCode-style method
    r = box.run("def f():\n    print(5)\n    return 1", calls=("f", [[]]))
    assert (r.values, r.stdout) == ([1], "5\n")  # prints do not mix with results
    for forged in ("class A:\n    def __eq__(self, o):\n        return True\ndef f():\n    return A()",
                   "class S(str):\n    pass\ndef f():\n    return S('x')"):
        r = box.run(forged, calls=("f", [[]]))
        assert r.values == [] and "TypeError" in r.stderr and r.outcome(False) == "error"
    r = box.run("def f(x):\n    return x\nimport sys\nsys.exit(0)", calls=("f", [[1]]))
    assert r.ok and r.values == []  # it ended before the calls: no result


def test_typed_json_round_trip():
    value = [1, 2.5, "s", None, True, (1, "a"), {1: [2]}, {3}, frozenset({4}), b"\xff", 10**30, -0.0, 5e-324]
    assert decode(encode(value)) == value and type(decode(encode((1,)))) is tuple
    text = dumps(encode(value + ["\x00\n\"\\é😀\ud800", float("inf"), float("-inf"), {"tuple": []}]))
    assert "\n" not in text and json.loads(text) == json.loads(json.dumps(encode(value + [
        "\x00\n\"\\é😀\ud800", float("inf"), float("-inf"), {"tuple": []}])))  # the json module's own reading
    assert decode(json.loads(text))[:len(value)] == value and dumps(float("nan")) == "NaN"
    for bad in ({"tuple": 1}, {"a": [], "b": []}, {"code": []}):
        with pytest.raises(ValueError):
            decode(bad)
    with pytest.raises(TypeError):
        encode(object())


def test_how_runaway_programs_end(box):
    loop = box.run("while True:\n    pass")
    assert loop.outcome(True) == "timeout"
    flood = box.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert flood.output_exceeded and len(flood.stdout) <= LIMITS["max_output_bytes"]
    assert flood.outcome(True) == "error"
    hog = box.run("block = bytearray(2 * 1024 ** 3)")
    assert "MemoryError" in hog.stderr and hog.outcome(True) == "error"
    bomb = box.run("import os\nwhile True:\n    os.fork()")
    assert "BlockingIOError" in bomb.stderr  # RLIMIT_NPROC; every copy writes to the same pipe
    big = box.run("open('big', 'wb').write(b'x' * (200 << 20))")
    assert big.returncode != 0 and big.outcome(True) != "pass"  # the file size limit
    if "one process" not in box.isolation:
        sleepers = box.run("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(60)\n"
                           "print('parent done')")
        assert sleepers.ok and sleepers.stdout == "parent done\n" and sleepers.seconds < LIMITS["timeout"]
        hogs = box.run("import os\nfor _ in range(3):\n    os.fork()\nblock = b'x' * (200 << 20)\n"
                       "__import__('time').sleep(1)")  # 8 processes of 200 MiB each: the run's cgroup ends it
        assert hogs.memory_exceeded and hogs.outcome(True) == "error"


def test_early_exit_is_not_a_result(box):
    for code in ("import sys\nsys.exit(0)\nprint(1)", "import os\nos._exit(0)", "raise SystemExit"):
        r = box.run(code, calls=("f", [[]]))
        assert r.returncode == 0 and r.values == []
    r = box.run("assert 1 == 2")
    assert r.returncode == 1 and r.outcome(False) == "fail" and "AssertionError" in r.stderr
    r = box.run("1 / 0")
    assert r.outcome(False) == "error" and "ZeroDivisionError" in r.stderr
    r = box.run("def f(:\n    pass")
    assert r.outcome(False) == "error" and "SyntaxError" in r.stderr


def test_batches_run_side_by_side(box):
    code = "import time\nprint(time.time())\ntime.sleep(1.0)\nprint(time.time())"
    spans = [[float(x) for x in r.stdout.split()] for r in box.map(box.run, [code, code])]
    assert max(s[0] for s in spans) < min(s[1] for s in spans)  # both were running at once


def test_no_isolation_is_refused_unless_unsafe(capsys):
    with pytest.raises(UserError, match="--unsafe-sandbox"):
        Sandbox(SandboxConfig(isolate=False, **LIMITS)).run("print(1)")
    unsafe = Sandbox(SandboxConfig(isolate=False, unsafe=True, **LIMITS))
    assert unsafe.isolation.startswith("not isolated")
    assert capsys.readouterr().err.count("\n") == 1  # said once, in one line
    r = unsafe.run("import os\nprint(sorted(os.listdir('.')))\ndef f(x):\n    return x * 2", calls=("f", [[4]]))
    assert (r.stdout, r.values, r.isolated) == ("[]\n", [8], False)
    assert unsafe.run("while True:\n    pass").outcome(True) == "timeout"  # the limits still hold


def test_outcome_names():
    base = dict(stdout="", stderr="", timed_out=False, output_exceeded=False, seconds=0.1)
    assert RunResult(returncode=0, **base).outcome(True) == "pass"
    assert RunResult(returncode=0, **base).outcome(False) == "fail"
    assert RunResult(returncode=-24, **base).outcome(True) == "timeout"  # SIGXCPU: the CPU limit
    assert RunResult(returncode=-9, **dict(base, timed_out=True)).outcome(True) == "timeout"
    assert RunResult(returncode=-9, **dict(base, output_exceeded=True)).outcome(True) == "error"
    assert RunResult(returncode=1, **dict(base, stderr="Traceback\nValueError: x\n")).outcome(True) == "error"
