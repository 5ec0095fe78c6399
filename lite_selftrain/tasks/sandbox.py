"""Running model-written Python programs in isolation, under limits: the sandbox behind the code rewards.

Each program runs in a fresh interpreter (`python -s -S`: no site-packages, no user site, an empty
environment but for a fixed hash seed and UTF-8 mode) that `sandbox_child.py` walls in with the kernel's
own mechanisms: new mount, PID, network, IPC and UTS namespaces (and a user namespace when we are not
root). Inside it sees a read-only view of the interpreter and the system's libraries and nothing else of
the file system (the folders above them as closed as on the host), an empty private tmpfs for /tmp,
/dev/shm and its work dir, no network, and no process but its own; under root it runs as a user id of
its own (`sandbox_plan.py`), without capabilities, under resource limits (CPU seconds, address space,
file size, open files, processes), with a fresh session keyring and a seccomp filter. Each run as a
whole is bounded too (`sandbox_limits.py`): a cgroup of its own for memory, tasks and CPU where the
machine allows one, else one process; no SysV IPC. When its first process ends, the kernel kills every
other process it started, setsid or not, and everything it created (files, IPC objects, sockets) goes
with the namespaces. A wall-clock deadline kills it from outside; stdout and stderr are read with a cap.

Verdicts are the caller's, from data: stdout for standard-input tasks, and for function calls
(`run(..., calls=(name, argument lists))`) each result as typed JSON on a pipe of its own, decoded into
builtin values against a deadline (`sandbox_values.py`, `RunResult.values`). Nothing the program
prints can pass for a result, and what it is checked against never enters the sandbox.

Where no isolation works (no root and no user namespaces), the first run says so in one line and
raises `UserError`, unless `unsafe=True` (`--unsafe-sandbox`): then programs run with the limits, a
temporary work dir and the deadline only, as this user, and `isolation` says so for the run's records.

Usage:
    box = Sandbox(SandboxConfig(timeout=2))
    box.run("print(int(input()) * 2)", stdin="21\\n").stdout  # "42\\n"
    box.run("def f(x):\\n    return [x, x]", calls=("f", [[1], ["a"]])).values  # [[1, 1], ["a", "a"]]

Simplifications: one program per set of namespaces, built and torn down each run (a few ms); programs see
the host's kernel (through a filter that refuses a few of its interfaces only) and its /usr; the new
root is a chroot on a private mount namespace (its mountinfo lists the sandbox's own mounts only); a
program over the cgroup's memory bound is killed (SIGKILL) by the kernel: `memory_exceeded`, an "error".
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
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

from ..config import Count, PositiveFloat, PositiveInt, check_fields
from ..errors import UserError
from .sandbox_plan import RUN_UID_BASE, Plan, limits, make_plan, unsafe_plan
from .sandbox_values import decode, encode, values

CHILD = Path(__file__).with_name("sandbox_child.py")
ENV = {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1"}  # the same set order and text encoding on every machine
RUNS = itertools.count()  # numbers this process's runs (their cgroups' names)


@dataclass
class SandboxConfig:
    """Limits of each program run; a zero or negative limit would let nothing (or everything) run."""

    timeout: PositiveFloat = 4.0  # wall-clock seconds per program: the APPS harness's per-test limit
    cpu_seconds: PositiveInt = 4  # CPU time: ends a busy loop even if the wall-clock kill cannot reach it
    memory_mb: PositiveInt = 1024  # a run's memory (and each process's address space): ample for contest programs
    file_size_mb: PositiveInt = 16  # largest file a program may write
    scratch_mb: PositiveInt = 64  # size of each private tmpfs (/tmp, /dev/shm, the work dir); they live in memory
    max_processes: PositiveInt = 16  # processes and threads a program may run
    cpus: PositiveFloat = 1.0  # CPU time per second a run's processes share (with a cgroup): a program is one process
    open_files: PositiveInt = 64  # file descriptors: enough for any test program, too few to exhaust the system
    max_output_bytes: PositiveInt = 1 << 20  # stdout (and stderr, and call results) kept per program; more ends it
    user: str = ""  # under root, programs run as this user; "" = a user id of their own per run
    python: str = ""  # the interpreter programs run on; "" = this one (if other users may reach it)
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
    memory_exceeded: bool = False  # the run's cgroup ran out of memory: the kernel killed one of its processes

    @property
    def ok(self) -> bool:
        """Exited normally with status 0, in time, within the output cap."""
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded

    def outcome(self, passed: bool) -> str:
        """One test's outcome: "pass", "fail" (wrong answer), "timeout" (wall clock or CPU) or "error"."""
        if self.output_exceeded or self.memory_exceeded:
            return "error"
        if self.timed_out or self.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return "timeout"  # the CPU limit ends a program with SIGXCPU, or SIGKILL a second later
        if not self.ok:
            return "fail" if self.stderr.rstrip().endswith("AssertionError") else "error"
        return "pass" if passed else "fail"


def _send(fd: int, data: bytes) -> None:
    """Write all of `data` to a pipe and close it; a closed reader (the interpreter died) is ignored."""
    with contextlib.suppress(BrokenPipeError):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    os.close(fd)


def _arguments(arg_lists: list) -> bytes:
    """The calls' argument lists for the child, in marshal's version 2: builtin types kept exactly, and no
    object shared between arguments (version 3 would keep such sharing); anything else is refused."""
    for args in arg_lists:
        encode(list(args))  # TypeError for what is not plain data
    return marshal.dumps([list(a) for a in arg_lists], 2)


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


class Sandbox:
    """Runs programs under `SandboxConfig`; `run` one, or `map` a function over items in parallel."""

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self._lock = threading.Lock()
        self._plan: Plan | None = None  # found on first use, with one probe run

    @property
    def isolation(self) -> str:
        """How programs run here, in one line (probed on first use); raises `UserError` if they may not."""
        return self.plan().description

    def plan(self) -> Plan:
        with self._lock:
            if self._plan is None:
                self._plan = self._find_plan()
            return self._plan

    def _find_plan(self) -> Plan:
        cfg = self.cfg
        reason = "isolate = false"
        if cfg.isolate:
            plan = make_plan(cfg)
            probe = self._run(plan, "print('ok')", "", None, 60.0)
            if probe.ok and probe.stdout == "ok\n":
                return plan
            lines = probe.stderr.strip().splitlines()
            reason = lines[-1] if lines else f"exit status {probe.returncode}"
        if not cfg.unsafe:
            raise UserError(f"sandbox: no OS isolation here ({reason}); pass --unsafe-sandbox (Python: "
                            "sandbox={'unsafe': True}) to run model-written code with limits only")
        plan = unsafe_plan(reason)
        print(f"sandbox: {plan.description}", file=sys.stderr)
        return plan

    # -- one program ---------------------------------------------------------------------------------
    def run(self, source: str, stdin: str = "", *, calls: tuple[str, list] | None = None,
            timeout: float | None = None) -> RunResult:
        """Run `source` with `stdin`, then `calls` = (function name, [argument list, ...]) if given: the
        outcome, (capped) output and call results; never an exception for the program's faults."""
        return self._run(self.plan(), source, stdin, calls, timeout or self.cfg.timeout)

    def _run(self, plan: Plan, source: str, stdin: str, calls, timeout: float) -> RunResult:
        cgroups = plan.cgroups.create(f"lite_selftrain-{os.getpid()}-{next(RUNS)}", self.cfg) if plan.cgroups else []
        workdir = None if plan.isolate else tempfile.mkdtemp(prefix="sandbox-")
        start = time.monotonic()
        try:
            proc, values_read = self._start(plan, source, stdin, calls, cgroups, workdir)
            with os.fdopen(values_read, "rb") as values_pipe:
                (out, err, vals), timed_out, exceeded = self._collect(
                    proc, [proc.stdout, proc.stderr, values_pipe], start + timeout)
            _stop(proc.pid, ended=not (timed_out or exceeded))
            returncode = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            out_of_memory = bool(cgroups) and plan.cgroups.out_of_memory(cgroups)
        finally:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            if cgroups:
                plan.cgroups.remove(cgroups)
        return RunResult(returncode=returncode, stdout=out.decode("utf-8", errors="replace"),
                         stderr=err.decode("utf-8", errors="replace"), timed_out=timed_out,
                         output_exceeded=exceeded, seconds=time.monotonic() - start, values=values(vals),
                         isolated=plan.isolate, memory_exceeded=out_of_memory)

    def _start(self, plan: Plan, source: str, stdin: str, calls, cgroups: list[str], workdir: str | None):
        """Start the launcher, put it in the run's cgroups, then hand it the job: (process, values pipe)."""
        values_read, values_write = os.pipe()
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
            try:  # it waits for the job: nothing runs before it is in the cgroups
                if plan.cgroups:
                    plan.cgroups.enter(cgroups, proc.pid)
            except OSError:
                for fd in (job_write, values_read):
                    os.close(fd)
                _stop(proc.pid, ended=False)
                proc.communicate()
                raise
            drop = (RUN_UID_BASE + proc.pid,) * 2 if plan.uid_per_run else plan.drop
            job = {"source": source, "limits": limits(self.cfg, plan), "isolate": plan.isolate,
                   "readable": plan.readable, "drop": drop, "scratch_mb": self.cfg.scratch_mb,
                   "values_fd": values_write, "parent": os.getpid(), "seccomp": plan.seccomp, "keyctl": plan.keyctl,
                   "calls": {"fn": calls[0], "args": _arguments(calls[1])} if calls else None}
            _send(job_write, marshal.dumps(job))
        return proc, values_read

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
