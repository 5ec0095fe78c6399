"""What bounds a sandboxed run as a whole, beyond its per-process limits: a cgroup per run and a seccomp filter.

Per-process limits (address space, CPU seconds) do not bound a program: its processes each get them,
and SysV shared memory detached from every process is counted by none. So each run gets, where the
machine allows it (root, and cgroup v2 with the memory, pids and cpu controllers, or the v1 hierarchies
of the three), a cgroup of its own: all its memory (swap none), `max_processes` tasks and `cpus` cores
of CPU time, however it forks or calls setsid. Where no cgroup can be made, a run may not start a
second process (threads only): its one address space is then its whole memory, and its CPU one
scheduling entity. Either way its IPC namespace allows no SysV shared memory, message queues or
semaphores (the child sets that up), and a seccomp filter refuses the kernel's keyrings, io_uring,
userfaultfd, perf_event_open and bpf: interfaces no test program needs, which reach past the
namespaces (the keyrings outlive a run) or have been the way into the kernel's bugs.

Cost: making and removing a run's cgroups takes under a millisecond; moving the launcher into them
waits for an RCU grace period (the kernel's cgroup_threadgroup_rwsem: a few ms, more on a loaded
machine), while the launcher's interpreter starts, so that only the excess adds to a run.

Usage:
    groups, why = find_cgroups()              # None and the reason where the machine gives none
    dirs = groups.create("run-1", cfg)        # then groups.enter(dirs, pid) before it starts
    groups.remove(dirs)                       # once every process of the run has ended
    seccomp_filter(one_process=groups is None)  # the BPF program the child installs, b"" if unknown arch
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import struct
import threading
import time

CGROUP_ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "pids", "cpu")
PERIOD_US = 100_000  # the CPU quota's period: the kernel's default
STALE_SECONDS = 600  # a run's cgroup older than this, of a process not running here, is a leftover

# seccomp: audit architecture and the system call numbers the filter names, per machine
ARCHES = {
    "x86_64": (0xC000003E, {"keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup": 425,
                            "io_uring_enter": 426, "io_uring_register": 427, "userfaultfd": 323,
                            "perf_event_open": 298, "bpf": 321, "memfd_create": 319, "fork": 57, "vfork": 58,
                            "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {"keyctl": 219, "add_key": 217, "request_key": 218, "io_uring_setup": 425,
                             "io_uring_enter": 426, "io_uring_register": 427, "userfaultfd": 282,
                             "perf_event_open": 241, "bpf": 280, "memfd_create": 279, "clone": 220, "clone3": 435}),
}
DENIED = ("keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
          "userfaultfd", "perf_event_open", "bpf")
X32_BIT = 0x40000000  # x86_64's x32 system calls carry this bit
CLONE_THREAD = 0x00010000
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K


# -- the seccomp filter ------------------------------------------------------------------------------------
def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter


def _deny(nr: int, err: int) -> bytes:
    """If the system call is `nr`, fail it with `err`; else go on."""
    return _op(JEQ, nr, 0, 1) + _op(RET, RET_ERRNO | err)


def seccomp_filter(one_process: bool, machine: str | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) the child installs; b"" on a machine whose numbers we lack.

    It refuses `DENIED` (EPERM) and every call of another ABI (ENOSYS: i386 or x32 on x86_64, arm32 on
    aarch64). With `one_process`, it also refuses new processes (EAGAIN, as RLIMIT_NPROC does): fork, vfork
    and a clone without CLONE_THREAD; clone3 says ENOSYS, so the C library falls back to clone (whose
    flags a filter can read) for its threads."""
    arch = ARCHES.get(machine or platform.machine())
    if arch is None:
        return b""
    audit_arch, nrs = arch
    prog = _op(LD_ABS, 4) + _op(JEQ, audit_arch, 1, 0) + _op(RET, RET_ERRNO | errno.ENOSYS)  # seccomp_data.arch
    prog += _op(LD_ABS, 0)  # seccomp_data.nr
    if audit_arch == ARCHES["x86_64"][0]:
        prog += _op(JGE, X32_BIT, 0, 1) + _op(RET, RET_ERRNO | errno.ENOSYS)
    for name in DENIED:
        prog += _deny(nrs[name], errno.EPERM)
    if one_process:
        for name in ("fork", "vfork", "memfd_create"):  # memfd: memory no address space counts
            if name in nrs:
                prog += _deny(nrs[name], errno.EPERM if name == "memfd_create" else errno.EAGAIN)
        prog += _deny(nrs["clone3"], errno.ENOSYS)
        prog += _op(JEQ, nrs["clone"], 0, 4) + _op(LD_ABS, 16)  # not clone: on to the end; else args[0]'s
        prog += _op(JSET, CLONE_THREAD, 0, 1) + _op(RET, RET_ALLOW)  # low half, the flags: a thread passes
        prog += _op(RET, RET_ERRNO | errno.EAGAIN)
    return prog + _op(RET, RET_ALLOW)


def syscall_numbers(machine: str | None = None) -> dict[str, int]:
    return dict(ARCHES.get(machine or platform.machine(), (0, {}))[1])


# -- cgroups ---------------------------------------------------------------------------------------------
def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class Cgroups:
    """Where this process makes its runs' cgroups: one parent folder per hierarchy (one on v2, three on v1)."""

    def __init__(self, version: int, parents: dict[str, str]):
        self.version, self.parents = version, parents  # controller (or "" on v2) -> parent folder
        self._pending: list[str] = []  # cgroups still busy when their run ended
        self._lock = threading.Lock()

    def describe(self, cfg) -> str:
        return (f"cgroup v{self.version}: {cfg.memory_mb} MiB, {cfg.max_processes} tasks, "
                f"{cfg.cpus:g} CPU")

    def create(self, name: str, cfg) -> list[str]:
        """Make the run's cgroup(s) with its bounds; removes what it made if one step fails."""
        dirs: list[str] = []
        try:
            for controller, parent in self.parents.items():
                path = os.path.join(parent, name)
                os.mkdir(path)
                dirs.append(path)
                self._limit(controller, path, cfg)
        except OSError:
            self.remove(dirs)
            raise
        return dirs

    def _limit(self, controller: str, path: str, cfg) -> None:
        memory, quota = cfg.memory_mb << 20, max(1000, int(cfg.cpus * PERIOD_US))
        tasks = str(cfg.max_processes + 1)  # the launcher that waits for the program counts too
        if self.version == 2:
            for name, value in (("memory.max", str(memory)), ("memory.swap.max", "0"), ("memory.oom.group", "1"),
                                ("pids.max", tasks), ("cpu.max", f"{quota} {PERIOD_US}")):
                if name != "memory.swap.max" or os.path.exists(f"{path}/{name}"):  # no swap file: no swap
                    _write(f"{path}/{name}", value)
        elif controller == "memory":
            _write(f"{path}/memory.limit_in_bytes", str(memory))
            if os.path.exists(f"{path}/memory.memsw.limit_in_bytes"):  # memory and swap together
                _write(f"{path}/memory.memsw.limit_in_bytes", str(memory))
        elif controller == "pids":
            _write(f"{path}/pids.max", tasks)
        else:
            _write(f"{path}/cpu.cfs_period_us", str(PERIOD_US))
            _write(f"{path}/cpu.cfs_quota_us", str(quota))

    def enter(self, dirs: list[str], pid: int) -> None:
        for path in dirs:
            _write(f"{path}/cgroup.procs", str(pid))

    def out_of_memory(self, dirs: list[str]) -> bool:
        """Whether the kernel killed a process of the run for its memory bound."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for path in dirs:
            with contextlib.suppress(OSError), open(f"{path}/{name}") as f:
                counts = dict(line.split() for line in f if len(line.split()) == 2)
                return int(counts.get("oom_kill", 0)) > 0
        return False

    def remove(self, dirs: list[str]) -> None:
        """Remove the run's cgroups. A process still being torn down (a large one the kernel killed) keeps
        a cgroup busy a while: it gets 20 ms, then it is tried again after each later run."""
        with self._lock:
            dirs, self._pending = self._pending + dirs, []
        for path in dirs:
            for _ in range(10):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.002)
            else:
                with self._lock:
                    self._pending.append(path)

    def sweep(self) -> None:
        """Remove the empty cgroups that runs of ended processes left behind: those of a pid not running
        here, made over `STALE_SECONDS` ago (a process of another PID namespace may own a new one)."""
        for parent in self.parents.values():
            with contextlib.suppress(OSError):
                for entry in os.scandir(parent):
                    owner = (entry.name.split("-") + [""])[1]
                    if (entry.name.startswith("lite_selftrain-") and owner.isdigit()
                            and not os.path.exists(f"/proc/{owner}")
                            and entry.stat().st_mtime < time.time() - STALE_SECONDS):
                        self.remove([entry.path])


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and "" -> its v2 path."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                out[name] = path
    return out


def _enable_controllers(parent: str) -> None:
    """Let `parent`'s children have the memory, pids and cpu controllers (OSError where it may not)."""
    with open(f"{parent}/cgroup.subtree_control") as f:
        enabled = f.read().split()
    missing = [c for c in CONTROLLERS if c not in enabled]
    if missing:  # refused (EBUSY) where the folder holds processes and is not the hierarchy's root
        _write(f"{parent}/cgroup.subtree_control", " ".join("+" + c for c in missing))


def find_cgroups() -> tuple[Cgroups | None, str]:
    """The cgroups this machine lets us make per run, or None and why not. On v2, under our own cgroup
    where it may have children with the controllers, else under the hierarchy's root."""
    if os.geteuid() != 0:
        return None, "not root"
    try:
        own = _own_cgroups()
    except OSError:
        return None, "no /proc/self/cgroup"
    if os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers") and "" in own:  # cgroup v2 alone
        why = ""
        for parent in dict.fromkeys([(CGROUP_ROOT + own[""]).rstrip("/"), CGROUP_ROOT]):
            try:
                _enable_controllers(parent)
                return Cgroups(2, {"": parent}), ""
            except OSError as e:
                why = e.strerror
        return None, f"cgroup v2 controllers unavailable here ({why})"
    if all(os.path.isfile(f"{CGROUP_ROOT}/{c}/cgroup.procs") and c in own for c in CONTROLLERS):  # v1
        parents = {c: (CGROUP_ROOT + f"/{c}" + own[c]).rstrip("/") for c in CONTROLLERS}
        return Cgroups(1, {c: p if os.path.isdir(p) else f"{CGROUP_ROOT}/{c}" for c, p in parents.items()}), ""
    return None, "no cgroup memory, pids and cpu controllers"


__all__ = ["Cgroups", "find_cgroups", "seccomp_filter", "syscall_numbers"]
