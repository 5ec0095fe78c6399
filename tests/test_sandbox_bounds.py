"""A run is bounded as a whole and shares nothing with other runs; the seccomp filter says what it means.

The attack programs themselves are in test_sandbox_attacks.py; here: the CPU a run's processes get
together, folders closed on the host staying closed inside, a user id per run under root, and the
filter's BPF program read by an interpreter of the BPF rules (for both machines it knows).
"""

import dataclasses
import errno
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

from lite_selftrain.errors import UserError
from lite_selftrain.tasks.sandbox import Sandbox, SandboxConfig
from lite_selftrain.tasks.sandbox_limits import ARCHES, seccomp_filter
from lite_selftrain.tasks.sandbox_plan import closed_folder

LIMITS = dict(timeout=5.0, cpu_seconds=2, memory_mb=256, max_processes=8, max_output_bytes=1 << 16, workers=2)
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
CLONE_THREADS, SIGCHLD = 0x003D0F00, 17  # what pthread_create passes; what fork passes
BUSY_CHILDREN = """import os, time
start, kids = time.time(), []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        os.setsid()  # a session, and so a scheduler group, of its own
        while time.time() - start < 1.5:
            pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
t = os.times()
print((t.children_user + t.children_system) / (time.time() - start))
"""


@pytest.fixture(scope="module")
def box():
    box = Sandbox(SandboxConfig(**LIMITS))
    try:
        assert box.isolation.startswith("isolated")
    except UserError as e:
        pytest.skip(f"no OS isolation on this machine: {e}")
    return box


def run_filter(prog: bytes, nr: int, arch: int, flags: int = 0) -> int:
    """What the kernel would do with a system call: classic BPF over struct seccomp_data."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, flags, 0, 0, 0, 0, 0)
    ops = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc = acc = 0
    while True:
        code, jt, jf, k = ops[pc]
        if code == 0x06:  # BPF_RET|BPF_K
            return k
        if code == 0x20:  # BPF_LD|BPF_W|BPF_ABS
            acc, pc = struct.unpack_from("=I", data, k)[0], pc + 1
            continue
        taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]  # JEQ, JGE, JSET
        pc += 1 + (jt if taken else jf)


@pytest.mark.parametrize("machine", sorted(ARCHES))
def test_the_filter_refuses_what_it_names_and_nothing_else(machine):
    arch, nrs = ARCHES[machine]
    for one_process in (False, True):
        prog = seccomp_filter(one_process, machine)
        for name in ("keyctl", "add_key", "request_key", "io_uring_setup", "userfaultfd", "perf_event_open", "bpf"):
            assert run_filter(prog, nrs[name], arch) == ERRNO | errno.EPERM, name
        for nr in (0, 1, 63, 64, 200, 434, 436):  # read, write, ... whatever they are here: allowed
            if nr not in nrs.values():
                assert run_filter(prog, nr, arch) == ALLOW
        assert run_filter(prog, nrs["keyctl"], 0x40000003) == ERRNO | errno.ENOSYS  # i386 or arm32 (another ABI)
        assert run_filter(prog, nrs["clone"], arch, CLONE_THREADS) == ALLOW  # threads always
        forked = run_filter(prog, nrs["clone"], arch, SIGCHLD)
        assert forked == (ERRNO | errno.EAGAIN if one_process else ALLOW)
        assert run_filter(prog, nrs["clone3"], arch) == (ERRNO | errno.ENOSYS if one_process else ALLOW)
        if "fork" in nrs:
            assert run_filter(prog, nrs["fork"], arch) == (ERRNO | errno.EAGAIN if one_process else ALLOW)
    if machine == "x86_64":
        assert run_filter(prog, 0x40000000 | nrs["keyctl"], arch) == ERRNO | errno.ENOSYS  # x32
    assert seccomp_filter(True, "sparc") == b""


def test_a_runs_processes_share_its_cpu_bound(box):
    """Busy children, each in a session of its own, get `cpus` of CPU time together (a cgroup's quota);
    where there is no cgroup they cannot start at all."""
    r = box.run(BUSY_CHILDREN)
    if "one process" in box.isolation:
        assert "BlockingIOError" in r.stderr
    else:
        assert r.ok, r.stderr
        assert float(r.stdout) <= box.cfg.cpus * 1.15  # CPU seconds per wall second, all three together


@pytest.mark.skipif(os.geteuid() != 0, reason="folders closed to other users: only root can make one for them")
def test_folders_closed_on_the_host_stay_closed_inside(box):
    outer = Path(tempfile.mkdtemp(dir="/var/tmp"))  # mode 0700: closed to the program's user on the host
    try:
        prefix = outer / "prefix"  # as an interpreter's install inside such a folder would be shown
        prefix.mkdir(mode=0o755)
        (prefix / "notes.txt").write_text("private")
        os.chmod(prefix / "notes.txt", 0o644)
        inner = Sandbox(box.cfg)
        inner._plan = dataclasses.replace(box.plan(), readable=box.plan().readable + [str(prefix)])
        r = inner.run(f"print(open({str(prefix / 'notes.txt')!r}).read())")
        assert "private" not in r.stdout and "PermissionError" in r.stderr
    finally:
        shutil.rmtree(outer)
    plan = box.plan()  # and the interpreter programs run on is one they could reach on the host
    assert [p for p in [plan.python, *plan.readable] if closed_folder(p)] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a user id per run is for root; a user namespace otherwise")
def test_runs_under_root_share_no_user(box):
    uids = [r.stdout for r in box.map(box.run, ["import os, time\nprint(os.getuid())\ntime.sleep(0.3)"] * 4)]
    assert len(set(uids)) == 4 and all(int(u) > 65535 for u in uids)
