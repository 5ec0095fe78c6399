"""Hostile programs score 0 and leave nothing behind; correct programs beside them still score 1.

Each attack runs as an APPS answer to "print a + b" (2 3 -> 5) or to a problem whose expected output is a
secret "needle" the program can only print by finding it. Programs that print 5 do so only when their
attack worked. Every attack carries a unique tag in the names of what it tries to leave behind (files,
processes, SysV IPC keys), and after the runs the host is searched for that tag: in /tmp, /var/tmp,
/run/lock and /dev/shm, in every process's command line, and in /proc/sysvipc. A listener on
127.0.0.1 and on an abstract unix socket must have accepted no connection. Some attacks go for the
run's bounds (memory through SysV shared memory or many processes, keyrings, kernel interfaces, the
process budget): the correct program beside each starts a thread, which a shared budget would refuse.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.tasks.apps import AppsTask
from lite_selftrain.tasks.humaneval import HumanEvalTask

LIMITS = dict(timeout=3.0, cpu_seconds=1, memory_mb=256, max_processes=8, max_output_bytes=1 << 16, workers=2)
ROOT = Path(__file__).resolve().parents[1]
SLEEPER = "[sys.executable, '-c', 'import time; time.sleep(30)', 'TAG']"  # a process we can find by its tag

ATTACKS = {  # name -> program; TAG, KEY, PORT are filled in per run
    "files_outside": """import os, socket, stat
for d in ("/tmp", "/var/tmp", "/run/lock", "/dev/shm", "/", "/work"):
    for make in (lambda p: os.close(os.open(os.path.basename(p), os.O_CREAT | os.O_WRONLY, dir_fd=os.open(d, 0))),
                 os.mkfifo, lambda p: os.mknod(p, stat.S_IFIFO | 0o666),
                 lambda p: os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3)),
                 lambda p: socket.socket(socket.AF_UNIX).bind(p),
                 lambda p: (open(p, "w").close(), os.chmod(p, 0o4755))):
        try:
            make("%s/TAG-%d" % (d, id(make)))
        except OSError:
            pass
try:
    import _posixshmem
    _posixshmem.shm_open("/TAG-shm", os.O_CREAT | os.O_RDWR, 0o666)
except OSError:
    pass
try:
    os.rename(os.getcwd(), "/tmp/TAG-work")
except OSError:
    pass
""",
    "shell_out": """import _posixsubprocess, os, subprocess, sys
subprocess.run(["sh", "-c", "touch /tmp/TAG-sh /dev/shm/TAG-sh; (sleep 30 &)"])
argv = [sys.executable.encode(), b"-c", b"open('/tmp/TAG-fe', 'w'); import time; time.sleep(30)", b"TAG"]
args = [argv, [argv[0]], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), True, True, -1, None, None,
        None, -1, None]
try:
    _posixsubprocess.fork_exec(*args)
except TypeError:  # Python 3.12 added an argument
    _posixsubprocess.fork_exec(*args, False)
""",
    "double_fork_setsid": """import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, SLEEPER)
    os._exit(0)
time.sleep(0.2)
""",
    "spawned_setsid": """import subprocess, sys, time
subprocess.Popen(["setsid"] + SLEEPER, start_new_session=True)
time.sleep(0.2)
""",
    "outlive_the_deadline": """import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # no parent-death signal
try:
    os.setsid()
except OSError:
    pass
os.execv(sys.executable, SLEEPER)
""",
    "chroot_escape": """import ctypes, os
ctypes.CDLL(None).unshare(0x10000000 | 0x00020000)  # a user and mount namespace of its own, for CAP_SYS_CHROOT
os.makedirs("/tmp/x", exist_ok=True)
os.chroot("/tmp/x")
for _ in range(30):
    os.chdir("..")
os.chroot(".")
open("/var/tmp/TAG-escaped", "w")
print(5)
""",
    "sysv_ipc": """import ctypes
libc = ctypes.CDLL(None)
print(libc.msgget(KEY, 0o1666) >= 0, libc.semget(KEY + 1, 1, 0o1666) >= 0, libc.shmget(KEY + 2, 4096, 0o1666) >= 0)
""",
    "network": """import socket
hits = 0
for family, address in ((socket.AF_INET, ("127.0.0.1", PORT)), (socket.AF_UNIX, "\\0TAG")):
    s = socket.socket(family)
    s.settimeout(1)
    try:
        s.connect(address)
        hits += 1
    except OSError:
        pass
if hits:
    print(5)
""",
    "kill_everyone": """import os, time
if os.fork() == 0:
    os.setsid()
    end = time.time() + 2
    while time.time() < end:
        for pid in list(range(2, 5000)) + [-1]:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    os._exit(0)
os.kill(os.getppid(), 9)
time.sleep(0.3)
""",
    "shm_hoard": """import ctypes
libc = ctypes.CDLL(None)
libc.shmat.restype = ctypes.c_void_p
held = 0
for _ in range(12):  # 64 MiB at a time, detached once filled: 3x the run's memory in all
    sid = libc.shmget(0, 64 << 20, 0o600)
    addr = libc.shmat(sid, None, 0) if sid >= 0 else None
    if addr in (None, ctypes.c_void_p(-1).value):
        break
    ctypes.memset(addr, 1, 64 << 20)
    libc.shmdt(ctypes.c_void_p(addr))
    held += 64
print(5 if held > 256 else held)
""",
    "fork_memory": """import os
r, w = os.pipe()
for _ in range(4):
    if os.fork() == 0:
        block = b"x" * (200 << 20)
        os.write(w, b"1")
        __import__("time").sleep(2)
        os._exit(0)
os.close(w)
block, got = b"x" * (200 << 20), b""
while len(got) < 4:
    chunk = os.read(r, 4)
    if not chunk:
        break
    got += chunk
print(5 if len(got) == 4 else len(got))  # 1 GB held at once
""",
    "keyrings": """import ctypes, os
libc = ctypes.CDLL(None)
add_key, keyctl = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
hits = [libc.syscall(add_key, b"user", b"TAG", b"secret", 6, ring) >= 0 for ring in (-3, -4, -5)]
buf = ctypes.create_string_buffer(4096)
hits.append(libc.syscall(keyctl, 11, -3, buf, 4096) >= 0)  # KEYCTL_READ the session keyring
print(5 if any(hits) else hits)
""",
    "kernel_interfaces": """import ctypes, os, struct
libc = ctypes.CDLL(None)
nr = {"x86_64": (425, 323, 298, 321), "aarch64": (425, 282, 241, 280)}[os.uname().machine]
io_uring = libc.syscall(nr[0], 1, ctypes.create_string_buffer(120))
uffd = libc.syscall(nr[1], 1)  # UFFD_USER_MODE_ONLY
attr = ctypes.create_string_buffer(128)
struct.pack_into("IIQ", attr, 0, 1, 128, 0)  # a software CPU clock
perf = libc.syscall(nr[2], attr, 0, -1, -1, 0)
bpf = libc.syscall(nr[3], 0, ctypes.create_string_buffer(struct.pack("IIII", 2, 4, 4, 1), 72), 72)
fds = [io_uring, uffd, perf, bpf]
print(5 if max(fds) >= 0 else fds)
""",
    "hold_processes": """import os, time
for _ in range(64):
    try:
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
    except OSError:
        break
time.sleep(3)
""",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "fork_then_answer": "import os, time\nfor _ in range(64):\n    if os.fork() == 0:\n        time.sleep(60)\n"
                        "print(5)",
}

NEEDLE_HUNT = """import gc, os, re, sys
pattern = re.compile("needle" + "-[0-9a-f]{32}")
found = set()
def look(text):
    found.update(pattern.findall(text if isinstance(text, str) else repr(text)))
frame = sys._getframe()
while frame:
    look(frame.f_locals)
    look(frame.f_globals)
    frame = frame.f_back
for obj in gc.get_objects():
    if isinstance(obj, (dict, list, tuple)):
        look(obj)
look(dict(os.environ))
look(sys.stdin.read())
for top in ("/tmp", "/var/tmp", "/dev/shm", "/work", "/", "/root", "/home", "/proc/self/fd", "/proc/1",
            "HOST"):
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in ("usr", "proc", "sys")] if folder == "/" else []
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    look(f.read(1 << 20).decode("latin-1"))
            except OSError:
                pass
def hook(kind, value, tb):
    while tb:
        look(tb.tb_frame.f_locals)
        tb = tb.tb_next
    print(*sorted(found)[:1])
sys.excepthook = hook
if not found:
    raise RuntimeError("nothing found: look at the traceback's frames")
print(*sorted(found)[:1])
"""


def fill(program: str, tag: str, key: int, port: int, host: str = "") -> str:
    return (program.replace("SLEEPER", SLEEPER).replace("TAG", tag).replace("KEY", str(key))
            .replace("PORT", str(port)).replace("HOST", host))


def adds(answer: str = "5\n") -> dict:
    return {"question": "Read a and b, print a + b.", "input_output": {"inputs": ["2 3\n"], "outputs": [answer]}}


def leftovers(tag: str, key: int) -> list[str]:
    """Whatever on this host carries `tag` (or the IPC keys from `key`)."""
    found = [f"{d}/{n}" for d in ("/tmp", "/var/tmp", "/run/lock", "/dev/shm", "/") if os.path.isdir(d)
             for n in os.listdir(d) if tag in n]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if tag.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(f"process {pid}")
        except OSError:
            continue
    for kind in ("msg", "sem", "shm"):
        path = Path("/proc/sysvipc") / kind
        keys = {int(line.split()[0]) for line in path.read_text().splitlines()[1:]} if path.exists() else set()
        found += [f"{kind} {k}" for k in keys & {key, key + 1, key + 2}]
    return found


@pytest.fixture(scope="module")
def task():
    task = AppsTask(sandbox=LIMITS)
    try:
        assert task.sandbox.isolation.startswith("isolated")
    except UserError as e:
        pytest.skip(f"no OS isolation on this machine: {e}")
    return task


@pytest.fixture
def listeners():
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    tag = uuid.uuid4().hex
    unix.bind("\0" + tag)
    unix.listen()
    for s in (tcp, unix):
        s.setblocking(False)
    yield tcp.getsockname()[1], tag
    for s in (tcp, unix):
        with pytest.raises(BlockingIOError):  # nothing ever connected
            s.accept()
        s.close()


def test_attacks_score_zero_leave_nothing_and_spare_their_neighbours(task, listeners, tmp_path):
    port, tag = listeners
    key = int(tag[:6], 16) + 1000
    correct = ("import threading, time\ntime.sleep(0.5)\nt = threading.Thread(target=time.sleep, args=(0.1,))\n"
               "t.start()\nt.join()\na, b = map(int, input().split())\nprint(a + b)")  # a thread: a process budget's
    programs = {name: fill(code, tag, key, port) for name, code in ATTACKS.items()}
    names = [n for name in programs for n in (name, "correct")]  # each attack beside a correct program
    rewards = task.rewards([programs.get(n, correct) for n in names], [adds() for _ in names])
    assert [n for n, r in zip(names, rewards) if r != (n == "correct")] == []
    assert task.rewards([correct] * 2, [adds()] * 2) == [1.0, 1.0]  # and the runs after them too
    assert leftovers(tag, key) == []


def test_nothing_reveals_the_expected_output(task, tmp_path, monkeypatch):
    needle = f"needle-{uuid.uuid4().hex}"
    monkeypatch.setenv("LITE_SELFTRAIN_SECRET", needle)  # in the parent's environment
    for folder in (tmp_path, Path("/tmp")):  # a world-readable copy of the tests
        (folder / f"{needle}.json").write_text(json.dumps(adds(needle)))
        os.chmod(folder / f"{needle}.json", 0o644)
    try:
        hunt = fill(NEEDLE_HUNT, "", 0, 0, host=str(tmp_path))
        assert task.outcomes(hunt, adds(needle + "\n")) in (["fail"], ["error"])
        assert task.sandbox.run(hunt, stdin=needle).stdout == needle + "\n"  # it finds what is there to find
        hook = f"import sys\nsys.excepthook = lambda *a: print('{needle}')\nraise SystemError"
        assert task.outcomes(hook, adds(needle + "\n")) == ["error"]  # right output, but from a crashed program
        assert task.outcomes(f"print('{needle}')", adds(needle + "\n")) == ["pass"]
    finally:
        Path("/tmp", f"{needle}.json").unlink()


def test_forged_equality_and_early_exits_score_zero():
    humaneval = HumanEvalTask(sandbox=LIMITS)
    (ex,) = [e for e in humaneval.load("test", str(ROOT / "tests/data/humaneval.jsonl")) if "digit_sum" in e["prompt"]]
    always = "class Always:\n    def __eq__(self, other):\n        return True\n    __ne__ = lambda s, o: False\n"
    forged = [always + "def digit_sum(n):\n    return Always()\n",
              "class Int(int):\n    def __eq__(self, other):\n        return True\n"
              "def digit_sum(n):\n    return Int(0)\n",
              "import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
              "def digit_sum(n):\n    import sys\n    print(sys._getframe(1).f_locals)\n    return 0\n"]
    right = "def digit_sum(n):\n    return sum(map(int, str(n)))\n"
    assert humaneval.rewards(forged + [right], [ex] * (len(forged) + 1)) == [0.0] * len(forged) + [1.0]
    apps = AppsTask(sandbox=LIMITS)
    call = {"question": "q", "input_output": {"fn_name": "f", "inputs": [[1]], "outputs": [[2]]}}
    assert apps.rewards([always + "def f(x):\n    return Always()", "def f(x):\n    return x + 1"],
                        [call, call]) == [0.0, 1.0]


HELPER = """
import json, os, sys, types
sys.path.append(os.environ.pop("LITE_SELFTRAIN_SITE"))  # the package's own dependencies (pydantic), read-only
for name, path in (("box", sys.argv[1] + "/lite_selftrain"), ("box.tasks", sys.argv[1] + "/lite_selftrain/tasks")):
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
from box.tasks.sandbox import Sandbox, SandboxConfig

box = Sandbox(SandboxConfig(**json.loads(sys.argv[2])))
runs = [box.run(code) for code in sys.argv[3:]]
print(json.dumps({"isolation": box.isolation, "uid": os.getuid(), "mine": os.path.exists("mine.txt"),
                  "runs": [[r.stdout, r.stderr[-300:]] for r in runs]}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as an ordinary user")
def test_contained_when_run_by_an_ordinary_user(tmp_path, monkeypatch):
    """As an ordinary user (`nobody`), the sandbox isolates with a user namespace; the same attacks fail."""
    import pwd
    import tempfile

    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
    if python is None or subprocess.run([python, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                                        user="nobody", cwd="/").returncode:
        pytest.skip("no Python >= 3.10 that an ordinary user can run")
    import pydantic

    site = os.path.dirname(os.path.dirname(pydantic.__file__))
    user, tag = pwd.getpwnam("nobody"), uuid.uuid4().hex
    key = int(tag[:6], 16) + 1000
    home = tempfile.mkdtemp(prefix="sandbox-user-")
    os.chown(home, user.pw_uid, user.pw_gid)
    secret = f"needle-{uuid.uuid4().hex}"
    names = ("fork_bomb", "double_fork_setsid", "files_outside", "sysv_ipc", "outlive_the_deadline", "shm_hoard",
             "fork_memory", "keyrings", "kernel_interfaces")
    attacks = [fill(ATTACKS[n], tag, key, 9) for n in names]
    attacks += [f"open({home + '/mine.txt'!r}, 'w')", "import os\nprint(os.getuid(), sorted(os.environ))",
                "import os\nprint(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"]
    try:
        run = subprocess.run([python, "-c", HELPER, str(ROOT), json.dumps(LIMITS), *attacks], user=user.pw_uid,
                             group=user.pw_gid, extra_groups=[], cwd=home, capture_output=True, text=True,
                             env={"LITE_SELFTRAIN_SECRET": secret, "PATH": os.defpath, "LITE_SELFTRAIN_SITE": site},
                             timeout=60)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert run.returncode == 0, run.stderr  # the helper, parent of every program, survived
    out = json.loads(run.stdout)
    assert out["isolation"].startswith("isolated (user namespaces") and out["uid"] == user.pw_uid
    assert not out["mine"]
    bomb, _, _, ipc, _, *bounded, write, env, caps = out["runs"]
    assert "BlockingIOError" in bomb[1]  # without a cgroup, a run is one process
    assert ipc[0] == "False False False\n"  # no SysV IPC, even in its own namespace
    assert [r[0] for r in bounded if r[0] == "5\n"] == []  # shm, fork x memory, keyrings, kernel interfaces
    assert "No such file" in write[1] and secret not in env[0] and caps[0] == "0000000000000000\n"
    assert leftovers(tag, key) == []
    assert sys.executable  # the test process itself is untouched
