"""Running model-written Python programs under limits: the sandbox behind the code tasks' rewards.

Each program runs in a fresh interpreter (`python -I`: no environment variables, no user site, no
current directory on sys.path), started in a new session so a timeout kills its whole process group:

- a small launcher, run in the program's own process before its first line, sets the resource limits
  (CPU seconds, address space, file size, open files, processes and threads) and then runs it;
- the working directory is an empty `tempfile.mkdtemp` folder, removed afterwards; the environment is
  empty; stdin comes from an unlinked temporary file; stdout and stderr are read with a size cap;
- run as root, the program runs as an unprivileged user (`nobody`): the kernel never enforces
  RLIMIT_NPROC for root (a fork bomb would fill the process table), and an unprivileged user can
  neither write our files nor signal or read our processes (/proc/<pid>/environ); world-writable
  folders such as /tmp are the exception, closed by the audit hook below;
- an audit hook (PEP 578) refuses process creation, signals to other processes, writes outside the
  working directory and reads of other processes' /proc entries.

A program that runs to its last line makes the launcher print a random end marker, so an early
`sys.exit(0)` or `os._exit(0)` cannot pass for a finished test suite.

Usage:
    box = Sandbox(SandboxConfig(timeout=2))
    box.run("print(int(input()) * 2)", stdin="21\\n").stdout  # "42\\n"

Simplifications: the audit hook is a tripwire for ordinary Python, not a security boundary (ctypes can
get round it); the boundary is the unprivileged user plus the limits. Run as a normal user, a program
has that user's rights and only the hook keeps it from writing to their files: for untrusted code at
scale run as root (dropping to `nobody`) or in a container. Under root, programs use the first Python
that the sandbox user can execute (this one, else the system's python3). A process that leaves the
group (setsid, after getting round the hook) escapes the group kill and ends only at its CPU limit,
or never if it sleeps; there is no network isolation.
This file imports only the standard library, so it can also be loaded on its own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# The launcher: reads its job from a pipe, limits itself, installs the guard, runs the program, and
# prints the end marker only when the program's last line has run. Kept to Python 3.8 syntax, since
# under root it may run on the system's interpreter.
_LAUNCHER = r"""
import json, os, resource, sys

def _guard(home, me):
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    spawn = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
             "subprocess.Popen", "pty.spawn", "os.killpg"}
    paths = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
             "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
    mine = ("/proc/self", "/proc/thread-self", "/proc/%d" % me)

    def inside(path):
        path = os.path.realpath(os.fsdecode(path))
        return path == home or path.startswith(home + os.sep)

    def hook(event, args):
        if event in spawn or (event == "os.kill" and args[0] not in (0, me)):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open" and not isinstance(args[0], int):
            flags = args[2] if isinstance(args[2], int) else 0
            mode = args[1] if isinstance(args[1], str) else ""
            if (flags & write or set(mode) & set("wax+")) and not inside(args[0]):
                raise PermissionError("sandbox: writing outside the working directory")
            real = os.path.realpath(os.fsdecode(args[0]))
            if real.startswith("/proc/") and not real.startswith(mine):
                raise PermissionError("sandbox: other processes are off limits")
        if event in paths:
            for arg in args[:2]:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError("sandbox: %s outside the working directory" % event)

    sys.addaudithook(hook)

def _main():
    with os.fdopen(int(sys.argv[1]), "rb") as f:
        job = json.loads(f.read())
    for name, (soft, hard) in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    sys.argv = ["program.py"]
    code = compile(job["source"], "program.py", "exec")
    marker = job["marker"]
    if job["guard"]:
        _guard(os.getcwd(), os.getpid())
    del job
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, ("\n" + marker + "\n").encode())
    os._exit(0)

_main()
"""


@dataclass
class SandboxConfig:
    timeout: float = 4.0  # wall-clock seconds per program: the APPS harness's per-test limit
    cpu_seconds: int = 4  # CPU time: ends a busy loop even if the wall-clock kill cannot reach it
    memory_mb: int = 1024  # address space: ample for contest programs, stops a memory hog at once
    file_size_mb: int = 16  # largest file a program may write (in its own directory)
    max_processes: int = 16  # processes and threads beyond those the sandbox user already runs
    open_files: int = 64  # file descriptors: enough for any test program, too few to exhaust the system
    max_output_bytes: int = 1 << 20  # stdout (and stderr) kept per program; more ends the program
    user: str = "nobody"  # under root, programs run as this user ("" keeps root: NPROC is then unenforced)
    python: str = ""  # interpreter for programs; "" = this one, or a system python3 the user can run
    guard: bool = True  # the audit-hook tripwire; the tests turn it off to check the OS limits alone
    workers: int = 0  # programs run at once; 0 = one per CPU core (threads only wait on processes)


@dataclass
class RunResult:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool  # the wall clock ran out before the program ended
    output_exceeded: bool  # more than max_output_bytes was written
    completed: bool  # the program ran to its last line (the launcher's end marker was seen)
    seconds: float
    pid: int  # the program's process id, which was also its process group's id
    workdir: str  # the (already removed) working directory

    @property
    def ok(self) -> bool:
        """Exited normally with status 0, in time, within the output cap."""
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded

    def outcome(self, passed: bool) -> str:
        """One test's outcome: "pass", "fail" (wrong answer), "timeout" (wall clock or CPU) or "error"."""
        if self.output_exceeded:
            return "error"
        if self.timed_out or self.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return "timeout"  # the CPU limit ends a program with SIGXCPU, then SIGKILL
        if not self.ok:
            return "fail" if self.stderr.rstrip().endswith("AssertionError") else "error"
        return "pass" if passed else "fail"


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


def _has_exited(pid: int) -> bool:
    """Whether `pid` has ended, without reaping it (its group id stays reserved until we kill the group)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


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


class Sandbox:
    """Runs programs under `SandboxConfig`'s limits; `run` one, or `map` a function over items in parallel."""

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self._lock = threading.Lock()
        self._plan: tuple[str, int | None, int | None] | None = None  # (python, uid, gid), found once

    # -- who runs the programs, and with which interpreter ------------------------------------------
    def _target(self) -> tuple[str, int | None, int | None]:
        with self._lock:
            if self._plan is None:
                self._plan = self._find_target()
            return self._plan

    def _find_target(self) -> tuple[str, int | None, int | None]:
        cfg = self.cfg
        if os.geteuid() != 0 or not cfg.user:
            return cfg.python or sys.executable, None, None
        import pwd

        try:
            entry = pwd.getpwnam(cfg.user)
        except KeyError:
            from ..errors import UserError  # imported here: the top of this file stays standard-library only

            raise UserError(f"sandbox user '{cfg.user}' does not exist; set sandbox user to another one") from None
        uid, gid = entry.pw_uid, entry.pw_gid
        candidates = [cfg.python] if cfg.python else [
            sys.executable, getattr(sys, "_base_executable", ""), shutil.which("python3", path=os.defpath) or ""]
        for python in dict.fromkeys(c for c in candidates if c):
            try:  # can the sandbox user start it? (e.g. not when it lives under /root)
                probe = subprocess.run([python, "-I", "-c", "pass"], env={}, cwd="/", user=uid, group=gid,
                                       extra_groups=[], capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                continue
            if probe.returncode == 0:
                return python, uid, gid
        from ..errors import UserError

        raise UserError(f"no Python interpreter that user '{cfg.user}' can run (tried {', '.join(candidates)}); "
                        "set sandbox python to one it can read")

    def _limits(self, uid: int | None) -> dict[str, tuple[int, int]]:
        cfg, mb = self.cfg, 1 << 20
        limits = {
            "RLIMIT_CPU": (cfg.cpu_seconds, cfg.cpu_seconds + 1),  # SIGXCPU first, SIGKILL a second later
            "RLIMIT_AS": (cfg.memory_mb * mb, cfg.memory_mb * mb),
            "RLIMIT_FSIZE": (cfg.file_size_mb * mb, cfg.file_size_mb * mb),
            "RLIMIT_NOFILE": (cfg.open_files, cfg.open_files),
            "RLIMIT_CORE": (0, 0),  # a crash must not leave a core file
        }
        running = _count_tasks(os.getuid() if uid is None else uid)
        if running is not None:  # NPROC is per user: allow what the user runs already, plus ours
            limits["RLIMIT_NPROC"] = (running + cfg.max_processes,) * 2
        return limits

    # -- one program ---------------------------------------------------------------------------------
    def run(self, source: str, stdin: str = "", *, timeout: float | None = None) -> RunResult:
        """Run `source` with `stdin`; the outcome and (capped) output, never an exception for its faults."""
        python, uid, gid = self._target()
        marker = secrets.token_hex(16)
        job = json.dumps({"source": source, "marker": marker, "guard": self.cfg.guard,
                          "limits": self._limits(uid)}).encode()
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        start = time.monotonic()
        try:
            if uid is not None:
                os.chown(workdir, uid, gid)
            with tempfile.TemporaryFile() as stdin_file:
                stdin_file.write(stdin.encode())
                stdin_file.seek(0)
                job_read, job_write = os.pipe()
                try:
                    drop = dict(user=uid, group=gid, extra_groups=[]) if uid is not None else {}
                    proc = subprocess.Popen([python, "-I", "-c", _LAUNCHER, str(job_read)], stdin=stdin_file,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env={},
                                            start_new_session=True, pass_fds=(job_read,), umask=0o077, **drop)
                finally:
                    os.close(job_read)
                _send(job_write, job)
            out, err, timed_out, exceeded = self._collect(proc, start + (timeout or self.cfg.timeout))
            _kill_group(proc.pid)
            returncode = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        text = out.decode("utf-8", errors="replace")
        end = f"\n{marker}\n"
        completed = text.endswith(end) and not timed_out
        return RunResult(returncode=returncode, stdout=text[: -len(end)] if completed else text,
                         stderr=err.decode("utf-8", errors="replace"), timed_out=timed_out,
                         output_exceeded=exceeded, completed=completed and returncode == 0,
                         seconds=time.monotonic() - start, pid=proc.pid, workdir=workdir)

    def _collect(self, proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, bool, bool]:
        """Read stdout/stderr until both close, the deadline passes, or the output cap is hit."""
        cap = self.cfg.max_output_bytes
        bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        timed_out = exceeded = False
        exited_at = None
        with selectors.DefaultSelector() as sel:
            for fd in bufs:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map() and not exceeded:
                now = time.monotonic()
                if exited_at is None and _has_exited(proc.pid):
                    exited_at = now
                    _kill_group(proc.pid)  # leftover children would hold the pipes open
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
        out, err = (bytes(b[:cap]) for b in bufs.values())
        return out, err, timed_out, exceeded

    # -- many programs -------------------------------------------------------------------------------
    def map(self, fn: Callable, items: Iterable) -> list:
        """`[fn(item) for item in items]`, run `workers` at a time: each call waits on its own programs."""
        items = list(items)
        workers = self.cfg.workers or os.cpu_count() or 1
        if workers == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            return list(pool.map(fn, items))
