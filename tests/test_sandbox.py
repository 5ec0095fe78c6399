"""The sandbox runs programs faithfully and contains hostile ones.

Every hostile program prints the right answer only if its attack worked, so "scores 0" means "was
contained". Each must score 0, this process must survive, and nothing outside the sandbox's own
temporary folder may change. The attacks run with the audit-hook guard (the default) and, as root,
without it, to show the OS limits hold on their own. A last test runs the sandbox from a process of an
ordinary user (not root), as someone without root rights would.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lite_selftrain.tasks.apps import AppsTask
from lite_selftrain.tasks.sandbox import RunResult, Sandbox, SandboxConfig

IS_ROOT = os.geteuid() == 0
LIMITS = dict(timeout=3.0, cpu_seconds=1, memory_mb=256, max_processes=8, max_output_bytes=1 << 16, workers=2)
SANDBOX_FILE = Path(__file__).parents[1] / "lite_selftrain" / "tasks" / "sandbox.py"


def example(output: str = "5\n") -> dict:
    return {"question": "Read a and b, print a + b.", "input_output": {"inputs": ["2 3\n"], "outputs": [output]}}


def hostile_programs(outside: list[str], victim: str) -> dict[str, str]:
    """Each prints 5 (the right answer to 2 + 3) only when its attack succeeded."""
    return {
        "infinite_loop": "while True:\n    pass\nprint(5)",
        "fork_bomb": "import os\nwhile True:\n    os.fork()",
        "fork_then_answer": "import os\nkids = 0\nfor _ in range(64):\n    if os.fork() == 0:\n"
                            "        import time\n        time.sleep(60)\n    kids += 1\nprint(5)",
        "memory_hog": "block = bytearray(2 * 1024 ** 3)\nprint(5)",
        "huge_print": "import sys\nprint(5)\nwhile True:\n    sys.stdout.write('5' * 65536)",
        "write_outside": f"hits = 0\nfor path in {outside!r}:\n    try:\n        open(path, 'w').write('pwned')\n"
                         "        hits += 1\n    except OSError:\n        pass\nimport os\ntry:\n"
                         f"    os.remove({victim!r})\n    hits += 1\nexcept OSError:\n    pass\nif hits:\n    print(5)",
        "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint(5)",
        "spawn_shell": "import subprocess\nprint(subprocess.run(['/bin/sh', '-c', 'echo 5'], capture_output=True,"
                       " text=True).stdout)",
        "os_system": "import os\nos.system('echo 5')",
        "exec_shell": "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo 5'])",
    }


SECRET_READER = """import os
secret = os.environ.get("LITE_SELFTRAIN_SECRET", "")
for pid in (os.getppid(), 1):
    try:
        for item in open("/proc/%d/environ" % pid, "rb").read().split(b"\\0"):
            if item.startswith(b"LITE_SELFTRAIN_SECRET="):
                secret = item.split(b"=", 1)[1].decode()
    except OSError:
        pass
print(secret)
"""


def group_gone(pgid: int, within: float = 5.0) -> bool:
    """Whether process group `pgid` is empty (killed processes linger as zombies until reaped)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def attack_setup(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    tag = uuid.uuid4().hex
    outside = [str(tmp_path / "pwned.txt"), f"/tmp/lite_selftrain_pwned_{tag}", f"../lite_selftrain_pwned_{tag}"]
    yield outside, str(victim)
    for path in outside[1:]:  # clean up after a failure so /tmp stays tidy
        Path("/tmp", Path(path).name).unlink(missing_ok=True)


@pytest.mark.parametrize("guard", [True, False] if IS_ROOT else [True])
def test_hostile_programs_score_zero_and_change_nothing(guard, attack_setup, tmp_path, monkeypatch):
    outside, victim = attack_setup
    programs = hostile_programs(outside if guard else outside[:1], victim)
    if not guard:  # without the guard, only the OS stands: a shell, or /tmp, are open to any user
        for name in ("spawn_shell", "os_system", "exec_shell"):
            del programs[name]
    secret = uuid.uuid4().hex
    monkeypatch.setenv("LITE_SELFTRAIN_SECRET", secret)
    programs["parent_env"] = SECRET_READER
    task = AppsTask(sandbox=dict(LIMITS, guard=guard))
    before = snapshot(tmp_path)
    examples = [example(secret + "\n") if name == "parent_env" else example() for name in programs]
    rewards = task.rewards(list(programs.values()), examples)
    assert dict(zip(programs, rewards)) == dict.fromkeys(programs, 0.0)
    assert snapshot(tmp_path) == before  # the victim is intact, nothing new appeared
    assert not any(Path("/tmp", Path(p).name).exists() for p in outside[1:])


@pytest.mark.parametrize("guard", [True, False] if IS_ROOT else [True])
def test_how_each_attack_ends(guard):
    box = Sandbox(SandboxConfig(**dict(LIMITS, guard=guard)))
    loop = box.run("while True:\n    pass")
    assert loop.outcome(True) == "timeout" and not loop.completed
    flood = box.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert flood.output_exceeded and len(flood.stdout) <= LIMITS["max_output_bytes"]
    assert flood.outcome(True) == "error"
    hog = box.run("block = bytearray(2 * 1024 ** 3)")
    assert "MemoryError" in hog.stderr and hog.outcome(True) == "error"
    bomb = box.run("import os\nwhile True:\n    os.fork()")
    assert ("PermissionError" if guard else "BlockingIOError") in bomb.stderr
    sleepers = box.run("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(60)\n"
                       "print('parent done')") if not guard else None
    for result in (loop, flood, hog, bomb) + ((sleepers,) if sleepers else ()):
        assert group_gone(result.pid)  # the whole group is gone, children included
        assert not os.path.exists(result.workdir)
    if sleepers:
        assert sleepers.ok and sleepers.stdout == "parent done\n"


def test_programs_run_faithfully(monkeypatch):
    monkeypatch.setenv("LITE_SELFTRAIN_SECRET", "hidden")
    box = Sandbox(SandboxConfig(**LIMITS))
    r = box.run("import sys\nprint(sum(map(int, sys.stdin.read().split())), 'é')", stdin="1 2\n3\n")
    assert (r.stdout, r.returncode, r.completed, r.outcome(True)) == ("6 é\n", 0, True, "pass")
    big = "\n".join(map(str, range(200_000))) + "\n"  # over a megabyte of stdin
    r = box.run("import sys\nprint(len(sys.stdin.read()))", stdin=big)
    assert r.stdout == f"{len(big)}\n"
    r = box.run("import os\nprint(sorted(os.listdir('.')), sorted(os.environ))")
    assert r.stdout.startswith("[] ") and "LITE_SELFTRAIN_SECRET" not in r.stdout and "PATH" not in r.stdout
    r = box.run("open('notes.txt', 'w').write('ok')\nprint(open('notes.txt').read())")
    assert r.stdout == "ok\n" and not os.path.exists(r.workdir)  # its own folder is writable, then removed


def test_early_exit_is_not_completion():
    box = Sandbox(SandboxConfig(**LIMITS))
    for code in ("import sys\nsys.exit(0)\nprint(1)", "import os\nos._exit(0)", "raise SystemExit"):
        r = box.run(code)
        assert r.returncode == 0 and not r.completed and r.outcome(r.completed) == "fail"
    r = box.run("assert 1 == 2")
    assert r.returncode == 1 and r.outcome(False) == "fail" and "AssertionError" in r.stderr
    r = box.run("1 / 0")
    assert r.outcome(False) == "error" and "ZeroDivisionError" in r.stderr
    r = box.run("def f(:\n    pass")
    assert r.outcome(False) == "error" and "SyntaxError" in r.stderr


def test_batches_run_side_by_side():
    box = Sandbox(SandboxConfig(**LIMITS))
    code = "import time\nprint(time.time())\ntime.sleep(1.0)\nprint(time.time())"
    spans = [[float(x) for x in r.stdout.split()] for r in box.map(box.run, [code, code])]
    assert max(s[0] for s in spans) < min(s[1] for s in spans)  # both were running at once


HELPER = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("sandbox_alone", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox_alone"] = sandbox
spec.loader.exec_module(sandbox)
limits = json.loads(sys.argv[2])
mine = os.path.join(os.getcwd(), "mine.txt")
out = {"uid": os.getuid()}
for guard in (True, False):
    box = sandbox.Sandbox(sandbox.SandboxConfig(**dict(limits, guard=guard)))
    bomb = box.run("import os\\nwhile True:\\n    os.fork()")
    out["bomb_%s" % guard] = [bomb.returncode, bomb.stderr.strip().splitlines()]
box = sandbox.Sandbox(sandbox.SandboxConfig(**limits))
out["python"] = box._target()[0]
out["kill"] = box.run("import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)\\nprint(5)").stdout
out["env"] = box.run(sys.argv[3]).stdout
out["write"] = box.run("open(%r, 'w').write('x')\\nprint(5)" % mine).stdout
out["wrote"] = os.path.exists(mine)
print(json.dumps(out))
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start a process as an ordinary user")
def test_contained_when_run_by_an_ordinary_user(tmp_path):
    """As a normal user (here `nobody`, on a Python it can read) the same attacks are contained."""
    import pwd
    import shutil
    import tempfile

    user = pwd.getpwnam("nobody")
    python = Sandbox(SandboxConfig(**LIMITS))._target()[0]  # an interpreter `nobody` can run
    home = tempfile.mkdtemp(prefix="sandbox-user-")
    os.chown(home, user.pw_uid, user.pw_gid)
    secret = uuid.uuid4().hex
    try:
        run = subprocess.run([python, "-c", HELPER, str(SANDBOX_FILE), json.dumps(LIMITS), SECRET_READER],
                             user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=home,
                             env={"LITE_SELFTRAIN_SECRET": secret, "PATH": os.defpath}, capture_output=True,
                             text=True, timeout=60)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert run.returncode == 0, run.stderr  # the helper, parent of every program, survived
    out = json.loads(run.stdout)
    assert out["uid"] == user.pw_uid
    assert "PermissionError" in out["bomb_True"][1][-1]  # the guard refuses the first fork: one traceback
    # RLIMIT_NPROC is enforced for ordinary users; every forked copy prints its own traceback into the same
    # pipe, so the error can sit on any line of the interleaved output, not only the last
    assert any("BlockingIOError" in line for line in out["bomb_False"][1]), out["bomb_False"]
    assert out["kill"] == "" and out["write"] == "" and not out["wrote"]
    assert secret not in out["env"]


def test_outcome_names():
    base = dict(stdout="", stderr="", timed_out=False, output_exceeded=False, completed=True, seconds=0.1,
                pid=1, workdir="/nonexistent")
    assert RunResult(returncode=0, **base).outcome(True) == "pass"
    assert RunResult(returncode=0, **base).outcome(False) == "fail"
    assert RunResult(returncode=-24, **base).outcome(True) == "timeout"  # SIGXCPU: the CPU limit
    assert RunResult(returncode=-9, **dict(base, timed_out=True)).outcome(True) == "timeout"
    assert RunResult(returncode=-9, **dict(base, output_exceeded=True)).outcome(True) == "error"
    assert RunResult(returncode=1, **dict(base, stderr="Traceback\nValueError: x\n")).outcome(True) == "error"


def test_runs_from_this_interpreter_when_not_root():
    if IS_ROOT:
        assert Sandbox(SandboxConfig(user=""))._target() == (sys.executable, None, None)
    else:
        assert Sandbox()._target() == (sys.executable, None, None)
