"""Running model-written Python programs in isolation, under limits: the sandbox behind the code rewards.

Each program runs in a fresh interpreter (`python -s -S`: no site-packages, no user site, an empty
environment but for a fixed hash seed and UTF-8 mode) that `sandbox_child.py` walls in with the kernel's own mechanisms:
new mount, PID, network, IPC and UTS namespaces (and a user namespace when we are not root). Inside it
sees a read-only view of the interpreter and the system's libraries and nothing else of the file
system, an empty private tmpfs for /tmp, /dev/shm and its work dir, no network, and no process but its
own; it runs as `nobody` under root, without capabilities, under resource limits (CPU seconds, address
space, file size, open files, processes). When its first process ends, the kernel kills every other
process it started, setsid or not, and everything it created (files, IPC objects, sockets) goes with
the namespaces. A wall-clock deadline kills it from outside; stdout and stderr are read with a cap.

Verdicts are the caller's, from data: stdout for standard-input tasks, and for function calls
(`run(..., calls=(name, argument lists))`) each result as typed JSON on a pipe of its own, decoded here
into builtin values (`RunResult.values`). Nothing the program prints can pass for a result, and what it
is checked against never enters the sandbox.

Where no isolation works (no root and no user namespaces), the first run says so in one line and
raises `UserError`, unless `unsafe=True` (`--unsafe-sandbox`): then programs run with the limits, a
temporary work dir and the deadline only, as this user, and `isolation` says so for the run's records.

Usage:
    box = Sandbox(SandboxConfig(timeout=2))
    box.run("print(int(input()) * 2)", stdin="21\\n").stdout  # "42\\n"
    box.run("def f(x):\\n    return [x, x]", calls=("f", [[1], ["a"]])).values  # [[1, 1], ["a", "a"]]

Simplifications: one program per set of namespaces, built and torn down each run (a few ms); programs see
the host's kernel (no seccomp filter) and its /usr; the new root is a chroot, not a pivot_root, so the
host's mount table is still listed in /proc/self/mountinfo though none of it can be reached; under root
programs share one user id, so their process counts share one RLIMIT_NPROC budget.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import marshal
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Count, Name, PositiveFloat, PositiveInt, check_fields
from ..errors import UserError
from .sandbox_child import decode, encode

CHILD = Path(__file__).with_name("sandbox_child.py")
ENV = {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1"}  # the same set order and text encoding on every machine
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")


@dataclass
class SandboxConfig:
    """Limits of each program run; a zero or negative limit would let nothing (or everything) run."""

    timeout: PositiveFloat = 4.0  # wall-clock seconds per program: the APPS harness's per-test limit
    cpu_seconds: PositiveInt = 4  # CPU time: ends a busy loop even if the wall-clock kill cannot reach it
    memory_mb: PositiveInt = 1024  # address space: ample for contest programs, stops a memory hog at once
    file_size_mb: PositiveInt = 16  # largest file a program may write
    scratch_mb: PositiveInt = 64  # size of each private tmpfs (/tmp, /dev/shm, the work dir); they live in memory
    max_processes: PositiveInt = 16  # processes and threads a program may run
    open_files: PositiveInt = 64  # file descriptors: enough for any test program, too few to exhaust the system
    max_output_bytes: PositiveInt = 1 << 20  # stdout (and stderr, and call results) kept per program; more ends it
    user: Name = "nobody"  # under root, programs run as this user
    unsafe: bool = False  # where no isolation works, run programs with limits only instead of refusing
    isolate: bool = True  # False (with unsafe): never isolate, to measure what isolation costs
    workers: Count = 0  # programs run at once; 0 = one per CPU core (threads only wait on processes)

    def __post_init__(self):
        check_fields(self)


@dataclass
class RunResult:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool  # the wall clock ran out before the program ended
    output_exceeded: bool  # more than max_output_bytes was written
    seconds: float
    values: list = field(default_factory=list)  # results of `calls`, decoded, as many as came before the end
    isolated: bool = True  # ran inside its own namespaces

    @property
    def ok(self) -> bool:
        """Exited normally with status 0, in time, within the output cap."""
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded

    def outcome(self, passed: bool) -> str:
        """One test's outcome: "pass", "fail" (wrong answer), "timeout" (wall clock or CPU) or "error"."""
        if self.output_exceeded:
            return "error"
        if self.timed_out or self.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return "timeout"  # the CPU limit ends a program with SIGXCPU, or SIGKILL a second later
        if not self.ok:
            return "fail" if self.stderr.rstrip().endswith("AssertionError") else "error"
        return "pass" if passed else "fail"


@dataclass
class _Plan:
    python: str  # the interpreter programs run on
    readable: list[str]  # host paths shown read-only inside
    drop: tuple[int, int] | None  # (uid, gid) to become, under root
    isolate: bool
    description: str  # one line for the run's records


def _count_tasks(uid: int) -> int | None:
    """Processes and threads owned by `uid` (what RLIMIT_NPROC counts); None without /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended while we looked
                continue
    return n


def _readable_paths(python: str) -> list[str]:
    """The system's library folders, the interpreter's install and /etc/ld.so.cache, none inside another
    (top-level links such as /lib -> usr/lib are kept: they are copied as links)."""
    wanted = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    wanted += [os.path.realpath(sys.base_prefix), os.path.dirname(python)]
    out: list[str] = []
    for path in wanted:
        real = os.path.realpath(path)
        inside = any(real == os.path.realpath(o) or real.startswith(os.path.realpath(o) + os.sep) for o in out)
        if os.path.islink(path) or not inside:
            out.append(path)
    return out


def _send(fd: int, data: bytes) -> None:
    """Write all of `data` to a pipe and close it; a closed reader (the interpreter died) is ignored."""
    with contextlib.suppress(BrokenPipeError):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    os.close(fd)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, signal.SIGKILL)


def _stop(pid: int, ended: bool) -> None:
    """End a run. The launcher exits by itself once its program has `ended` (after the kernel tears down
    the namespaces); otherwise SIGTERM asks it to kill its namespace's PID 1, and with it all the rest.
    Then its process group is killed. Nothing is reaped before, so no id can have been reused."""
    handle = os.pidfd_open(pid)  # readable once the launcher has exited: a wait with a timeout, not reaping
    try:
        if not select.select([handle], [], [], 1.0 if ended else 0)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            select.select([handle], [], [], 2.0)
    finally:
        os.close(handle)
    _kill_group(pid)


def _has_exited(pid: int) -> bool:
    """Whether `pid` has ended, without reaping it (its group id stays reserved until we kill the group)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _values(raw: bytes) -> list:
    """Call results, one typed-JSON line each, up to the first that is not one (or is cut off)."""
    out = []
    for line in raw.split(b"\n")[:-1]:
        try:
            out.append(decode(json.loads(line)))
        except (ValueError, TypeError, RecursionError):
            break
    return out


class Sandbox:
    """Runs programs under `SandboxConfig`; `run` one, or `map` a function over items in parallel."""

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self._lock = threading.Lock()
        self._plan: _Plan | None = None  # found on first use, with one probe run

    @property
    def isolation(self) -> str:
        """How programs run here, in one line (probed on first use); raises `UserError` if they may not."""
        return self.plan().description

    def plan(self) -> _Plan:
        with self._lock:
            if self._plan is None:
                self._plan = self._find_plan()
            return self._plan

    def _find_plan(self) -> _Plan:
        cfg = self.cfg
        python = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
        drop = None
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam(cfg.user)
            except KeyError:
                raise UserError(f"sandbox user '{cfg.user}' does not exist; set sandbox user to another") from None
            drop = (entry.pw_uid, entry.pw_gid)
        how = f"namespaces, as {cfg.user}" if drop else "user namespaces"
        plan = _Plan(python, _readable_paths(python), drop, True, f"isolated ({how})")
        reason = "isolate = false"
        if cfg.isolate:
            probe = self._run(plan, "print('ok')", "", None, 60.0)
            if probe.ok and probe.stdout == "ok\n":
                return plan
            lines = probe.stderr.strip().splitlines()
            reason = lines[-1] if lines else f"exit status {probe.returncode}"
        if not cfg.unsafe:
            raise UserError(f"sandbox: no OS isolation here ({reason}); pass --unsafe-sandbox (Python: "
                            "sandbox={'unsafe': True}) to run model-written code with limits only")
        description = f"not isolated ({reason}): limits only, as uid {os.getuid()}"
        print(f"sandbox: {description}", file=sys.stderr)
        return _Plan(python, [], None, False, description)

    def _limits(self, plan: _Plan) -> dict[str, tuple[int, int]]:
        cfg, mb = self.cfg, 1 << 20
        limits = {
            "RLIMIT_CPU": (cfg.cpu_seconds, cfg.cpu_seconds + 1),  # SIGXCPU first, SIGKILL a second later
            "RLIMIT_AS": (cfg.memory_mb * mb, cfg.memory_mb * mb),
            "RLIMIT_FSIZE": (cfg.file_size_mb * mb, cfg.file_size_mb * mb),
            "RLIMIT_NOFILE": (cfg.open_files, cfg.open_files),
            "RLIMIT_CORE": (0, 0),  # a crash must not leave a core file
        }
        if plan.isolate and not plan.drop:  # a new user namespace counts only its own processes
            limits["RLIMIT_NPROC"] = (cfg.max_processes,) * 2
        else:  # NPROC counts every process of the user: allow what it runs already, plus ours
            running = _count_tasks(plan.drop[0] if plan.drop else os.getuid())
            if running is not None:
                limits["RLIMIT_NPROC"] = (running + cfg.max_processes,) * 2
        return limits

    # -- one program ---------------------------------------------------------------------------------
    def run(self, source: str, stdin: str = "", *, calls: tuple[str, list] | None = None,
            timeout: float | None = None) -> RunResult:
        """Run `source` with `stdin`, then `calls` = (function name, [argument list, ...]) if given: the
        outcome, (capped) output and call results; never an exception for the program's faults."""
        return self._run(self.plan(), source, stdin, calls, timeout or self.cfg.timeout)

    def _run(self, plan: _Plan, source: str, stdin: str, calls, timeout: float) -> RunResult:
        values_read, values_write = os.pipe()
        job = {"source": source, "limits": self._limits(plan), "isolate": plan.isolate, "readable": plan.readable,
               "drop": plan.drop, "scratch_mb": self.cfg.scratch_mb, "values_fd": values_write, "parent": os.getpid(),
               "calls": {"fn": calls[0], "args": [encode(list(a)) for a in calls[1]]} if calls else None}
        workdir = None if plan.isolate else tempfile.mkdtemp(prefix="sandbox-")
        start = time.monotonic()
        try:
            with tempfile.TemporaryFile() as stdin_file:
                stdin_file.write(stdin.encode())
                stdin_file.seek(0)
                job_read, job_write = os.pipe()
                try:
                    proc = subprocess.Popen([plan.python, "-s", "-S", "-c", CHILD.read_text(), str(job_read)],
                                            stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            cwd=workdir or "/", env=ENV, start_new_session=True,
                                            pass_fds=(job_read, values_write), umask=0o077)
                finally:
                    os.close(job_read)
                    os.close(values_write)
                _send(job_write, marshal.dumps(job))
            with os.fdopen(values_read, "rb") as values_pipe:
                (out, err, vals), timed_out, exceeded = self._collect(
                    proc, [proc.stdout, proc.stderr, values_pipe], start + timeout)
            _stop(proc.pid, ended=not (timed_out or exceeded))
            returncode = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        finally:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        return RunResult(returncode=returncode, stdout=out.decode("utf-8", errors="replace"),
                         stderr=err.decode("utf-8", errors="replace"), timed_out=timed_out,
                         output_exceeded=exceeded, seconds=time.monotonic() - start, values=_values(vals),
                         isolated=plan.isolate)

    def _collect(self, proc: subprocess.Popen, pipes: list, deadline: float) -> tuple[list[bytes], bool, bool]:
        """Read the pipes until all close, the deadline passes, or the output cap is hit."""
        cap = self.cfg.max_output_bytes
        bufs = {p.fileno(): bytearray() for p in pipes}
        timed_out = exceeded = False
        exited_at = None
        with selectors.DefaultSelector() as sel:
            for fd in bufs:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map() and not exceeded:
                now = time.monotonic()
                if exited_at is None and _has_exited(proc.pid):
                    exited_at = now
                    _kill_group(proc.pid)  # without namespaces, leftover children would hold the pipes open
                if exited_at is not None and now - exited_at > 0.5:
                    break  # only processes that left the group still hold the pipes
                if now >= deadline:
                    timed_out = exited_at is None
                    break
                for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fd)
                    bufs[key.fd] += data
                    exceeded = exceeded or len(bufs[key.fd]) > cap
        return [bytes(b[:cap]) for b in bufs.values()], timed_out, exceeded

    # -- many programs -------------------------------------------------------------------------------
    def map(self, fn: Callable, items: Iterable) -> list:
        """`[fn(item) for item in items]`, run `workers` at a time: each call waits on its own programs."""
        items = list(items)
        workers = self.cfg.workers or os.cpu_count() or 1
        if workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))


__all__ = ["RunResult", "Sandbox", "SandboxConfig", "decode", "encode"]
