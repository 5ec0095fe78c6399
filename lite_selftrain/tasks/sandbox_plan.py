"""How this machine runs sandboxed programs, found once per `Sandbox`: interpreter, user, bounds, in one line.

Under root each run gets a user id of its own (`RUN_UID_BASE` + its launcher's pid, unique among the
runs alive at once), so no two runs share a process budget (RLIMIT_NPROC), a user keyring or files;
a named `user` shares one id across runs instead. Without root a user namespace gives each run its own
ids. Programs run on this interpreter, unless (under root) other users could not reach its folders on
the host: then on the system's python3, since the sandbox shows no folder more open than the host does.

Usage:
    plan = make_plan(cfg)   # then the caller probes it with one run
    plan.description        # e.g. "isolated (namespaces, a uid per run; cgroup v1: 1024 MiB, 16 tasks, 1 CPU; seccomp)"
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from ..errors import UserError
from .sandbox_limits import Cgroups, find_cgroups, seccomp_filter, syscall_numbers

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
SYSTEM_PYTHON = "/usr/bin/python3"
RUN_UID_BASE = 2_000_000_000  # + a pid (at most 2**22): far above any account's id, below 2**31


@dataclass
class Plan:
    python: str  # the interpreter programs run on
    readable: list[str]  # host paths shown read-only inside
    drop: tuple[int, int] | None  # a named user's (uid, gid) to become, under root
    uid_per_run: bool  # under root without a named user: RUN_UID_BASE + the launcher's pid
    isolate: bool
    cgroups: Cgroups | None  # a cgroup per run, or None: one process per run
    seccomp: bytes  # the child's BPF filter (b"": none known for this machine)
    keyctl: int | None  # keyctl's system call number, to give each run a fresh session keyring
    description: str  # one line for the run's records


def count_tasks(uid: int) -> int | None:
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


def readable_paths(python: str, prefix: str) -> list[str]:
    """The system's library folders, the interpreter's install and /etc/ld.so.cache, none inside another
    (top-level links such as /lib -> usr/lib are kept: they are copied as links)."""
    wanted = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    wanted += [os.path.realpath(prefix), os.path.dirname(python)]
    out: list[str] = []
    for path in wanted:
        real = os.path.realpath(path)
        inside = any(real == os.path.realpath(o) or real.startswith(os.path.realpath(o) + os.sep) for o in out)
        if os.path.islink(path) or not inside:
            out.append(path)
    return out


def closed_folder(path: str) -> str | None:
    """The first folder above `path` that users other than its owner may not pass through, if any."""
    parts = os.path.realpath(path).split(os.sep)[1:-1]
    for i in range(len(parts)):
        folder = os.sep + os.sep.join(parts[: i + 1])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def _interpreter(cfg, as_root: bool) -> tuple[str, str, str]:
    """(interpreter, its prefix, a note for the description)."""
    python = os.path.realpath(cfg.python or getattr(sys, "_base_executable", "") or sys.executable)
    if not os.access(python, os.X_OK):
        raise UserError(f"sandbox python {cfg.python!r} is not an interpreter this user can run")
    closed = as_root and (closed_folder(python) or closed_folder(sys.base_prefix if not cfg.python else python))
    note = ""
    if closed and not cfg.python:  # a program's user could not reach it on the host: not inside either
        system = os.path.realpath(SYSTEM_PYTHON)
        if not os.path.exists(system) or closed_folder(system):
            raise UserError(f"sandbox: other users cannot reach this interpreter ({closed} is closed to them) "
                            f"and there is no {SYSTEM_PYTHON}; set sandbox python to one they can reach")
        python, note = system, f", on {system}"
    elif closed:
        raise UserError(f"sandbox python {cfg.python}: other users cannot reach it ({closed} is closed to them)")
    if python == os.path.realpath(sys.executable) or python == os.path.realpath(getattr(sys, "_base_executable", "")):
        return python, sys.base_prefix, note
    run = subprocess.run([python, "-S", "-c", "import sys; print(sys.base_prefix, sys.version_info >= (3, 10))"],
                         capture_output=True, text=True, env={})
    prefix, recent = (run.stdout.split() + ["", ""])[:2]
    if run.returncode or recent != "True":
        raise UserError(f"sandbox python {python}: not a Python >= 3.10")
    return python, prefix, note


def _per_run_ids_mapped() -> bool:
    """Whether this user namespace maps every id a run may get."""
    try:
        with open("/proc/self/uid_map") as f:
            spans = [tuple(map(int, line.split())) for line in f]
    except OSError:
        return True
    return any(inside <= RUN_UID_BASE and inside + count >= RUN_UID_BASE + (1 << 22) for inside, _, count in spans)


def make_plan(cfg) -> Plan:
    """The isolated plan for `cfg` (the caller probes it); raises `UserError` for a bad user or interpreter."""
    as_root = os.geteuid() == 0
    python, prefix, note = _interpreter(cfg, as_root)
    drop, per_run = None, False
    if as_root and (cfg.user or not _per_run_ids_mapped()):
        import pwd

        try:
            entry = pwd.getpwnam(cfg.user or "nobody")
        except KeyError:
            raise UserError(f"sandbox user '{cfg.user}' does not exist; set sandbox user to another") from None
        drop = (entry.pw_uid, entry.pw_gid)
    per_run = as_root and drop is None
    who = ("a uid per run" if per_run else f"as {cfg.user or 'nobody'}") if as_root else "user namespaces"
    groups, why = find_cgroups()
    if groups is not None:
        groups.sweep()
        try:  # a read-only cgroup file system (some containers) lists the controllers but refuses a folder
            groups.remove(groups.create(f"lite_selftrain-{os.getpid()}-probe", cfg))
        except OSError as e:
            groups, why = None, f"cgroups not writable here ({e.strerror})"
    seccomp = seccomp_filter(one_process=groups is None)
    bounds = groups.describe(cfg) if groups else f"no cgroup ({why}): " + (
        "one process, threads only" if seccomp else "memory bounded per process only")
    filtered = "seccomp" if seccomp else "no seccomp filter for this machine"
    how = f"{'namespaces, ' if as_root else ''}{who}{note}; {bounds}; {filtered}"
    return Plan(python, readable_paths(python, prefix), drop, per_run, True, groups, seccomp,
                syscall_numbers().get("keyctl"), f"isolated ({how})")


def unsafe_plan(reason: str) -> Plan:
    python = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    return Plan(python, [], None, False, False, None, b"", None,
                f"not isolated ({reason}): limits only, as uid {os.getuid()}")


def limits(cfg, plan: Plan) -> dict[str, tuple[int, int]]:
    """The run's per-process resource limits."""
    mb = 1 << 20
    out = {
        "RLIMIT_CPU": (cfg.cpu_seconds, cfg.cpu_seconds + 1),  # SIGXCPU first, SIGKILL a second later
        "RLIMIT_AS": (cfg.memory_mb * mb, cfg.memory_mb * mb),
        "RLIMIT_FSIZE": (cfg.file_size_mb * mb, cfg.file_size_mb * mb),
        "RLIMIT_NOFILE": (cfg.open_files, cfg.open_files),
        "RLIMIT_CORE": (0, 0),  # a crash must not leave a core file
        "RLIMIT_MSGQUEUE": (0, 0),  # no POSIX message queue: kernel memory no other limit counts
    }
    if plan.isolate and not plan.drop:  # a user namespace, or a uid of its own: only its own processes count
        out["RLIMIT_NPROC"] = (cfg.max_processes,) * 2
    else:  # NPROC counts every process of the user: allow what it runs already, plus ours
        running = count_tasks(plan.drop[0] if plan.drop else os.getuid())
        if running is not None:
            out["RLIMIT_NPROC"] = (running + cfg.max_processes,) * 2
    return out
