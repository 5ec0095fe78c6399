"""One program run in its own namespaces, under limits: the child side of `sandbox.py`.

The parent runs `python -s -S -c <this file's text> JOB_FD` with the program's stdin, stdout and stderr
in place, and writes a job to JOB_FD (in marshal's format: both ends are the same interpreter): the
source, the resource limits, the host paths to show read-only, whom to run as, and optionally a function
to call. When isolating:

1. unshare(2): new mount, PID, network, IPC and UTS namespaces, plus a user namespace when not root;
2. fork: the child is PID 1 of the new PID namespace, so when it ends the kernel kills whatever is left
   there, setsid or not. It starts its own session, so nothing it signals reaches this process, which
   waits for it, passes its exit status on (a signal by raising the same one), and kills it on SIGTERM
   (the parent's way to end a run); it also dies with this process (PR_SET_PDEATHSIG);
3. the child builds a root on a small tmpfs: read-only binds of the interpreter and the system's
   libraries, /dev/null and its kin, its own /proc, and private tmpfs for /tmp, /dev/shm and the work
   dir /work (the folders above a bound path get the host's modes and owners); then it chroots there
   (the kernel lets no chrooted process make a user namespace, the one way it could regain
   CAP_SYS_CHROOT and climb out). The network namespace's loopback is down; the IPC namespace allows
   no SysV shared memory, message queue or semaphore;
4. it gives up root (to the job's user) and every capability, sets no_new_privs, joins a new session
   keyring, installs the job's seccomp filter, sets the limits, and runs the program in this same
   interpreter as PID 1 (no second start-up to pay for).

Without isolation (the parent's `unsafe` fallback) only step 4's limits apply, in the current folder.
With `calls`, the named function (or `Solution().name`, LeetCode style) is called on each argument list
once the program has run, and each result goes to VALUES_FD as one line of typed JSON (`encode`, `dumps`):
data for the parent to judge, never a verdict. A value that is not plain builtin data (say an object whose
`__eq__` always says yes) cannot be encoded and ends the run with a TypeError.
Only the standard library, and as little of it as will do: each import is paid again by every run
(json, contextlib and signal would add about a third to a run's start-up, so they are left out or late).
"""

from __future__ import annotations

import marshal
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_STRICTATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
KEYCTL_JOIN_SESSION_KEYRING = 1
IPC_LIMITS = {"shmmax": "0", "shmall": "0", "shmmni": "0", "msgmni": "0", "sem": "0 0 0 0"}  # kernel.* sysctls
SIGKILL, SIGTERM = 9, 15
NEW_ROOT = "/tmp"  # any existing folder serves as the mount point: the new mount namespace is private
DEVICES = ("null", "zero", "full", "random", "urandom")


# -- values in and out: JSON that keeps Python's builtin types apart ---------------------------------------
def encode(value):
    """Plain builtin data as JSON: tuples, sets, dicts and bytes become one-key objects; anything else
    (a subclass included, whatever its `__eq__`) is refused."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [encode(v) for v in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [encode(v) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    raise TypeError(f"a {kind.__name__} is not plain data (None, bool, int, float, str, bytes, list, tuple, "
                    "set, dict)")


_ESCAPES = {c: f"\\u{c:04x}" for c in (*range(0x20), *range(0xD800, 0xE000))}  # control chars, lone surrogates
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})


def dumps(tree) -> str:
    """JSON text of `encode`'s output (NaN and Infinity as Python's json writes them), one line."""
    kind = type(tree)
    if tree is None or kind is bool:
        return {None: "null", True: "true", False: "false"}[tree]
    if kind is int:
        return str(tree)
    if kind is float:
        return repr(tree) if tree - tree == 0 else "NaN" if tree != tree else "Infinity" if tree > 0 else "-Infinity"
    if kind is str:
        return '"' + tree.translate(_ESCAPES) + '"'
    if kind is list:
        return "[" + ",".join(map(dumps, tree)) + "]"
    return "{" + ",".join(dumps(k) + ":" + dumps(v) for k, v in tree.items()) + "}"


# -- the system calls, through ctypes ------------------------------------------------------------------
def _call(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _call(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _bind_read_only(libc, source: str, target: str) -> None:
    """Bind `source` at `target`, read-only, keeping the flags a user namespace may not drop."""
    _mount(libc, source, target, None, MS_BIND | MS_REC)
    have = os.statvfs(target).f_flag
    keep = MS_STRICTATIME if not have & (os.ST_NOATIME | os.ST_RELATIME) else 0
    for st_flag, ms_flag in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME)):
        keep |= ms_flag if have & st_flag else 0
    _mount(libc, None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def _make_parents(root: str, path: str, owners: bool) -> None:
    """The folders above `path` under `root`, each with its host folder's mode (and with `owners`, its
    owner): a folder closed to the program's user on the host stays closed inside."""
    here = ""
    for part in path.split("/")[1:-1]:
        here += "/" + part
        if os.path.lexists(root + here):
            continue
        host = os.stat(here)
        os.mkdir(root + here)
        if owners:
            os.chown(root + here, host.st_uid, host.st_gid)
        os.chmod(root + here, host.st_mode & 0o7777)


# -- steps 1 to 3 ----------------------------------------------------------------------------------------
def enter_namespaces(libc) -> None:
    """Steps 1-2. Returns in the child, PID 1 of the new namespaces; this process waits and relays."""
    uid, gid, user_ns = os.getuid(), os.getgid(), os.geteuid() != 0
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    _call(libc.unshare(flags | (CLONE_NEWUSER if user_ns else 0)), "unshare")
    if user_ns:  # our ids as the namespace's root: its IPC limits are root's to set; gid_map needs setgroups denied
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        os.setsid()  # its own session and group: nothing it signals by group reaches this process
        return
    for fd in (0, 1, 2):  # only the program holds the pipes, so they close when it ends
        os.close(fd)
    import signal  # here, while the child sets up: its import is not on the run's path

    alive = [True]  # until it is reaped, its pid cannot name another process
    signal.signal(SIGTERM, lambda *_: alive[0] and os.kill(pid, SIGKILL))  # the parent's way to end the run
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    alive[0] = False
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.WTERMSIG(status) not in (SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def build_root(libc, job: dict) -> None:
    """Step 3: a new root with only what the job names, then chroot into it and enter /work."""
    os.umask(0o022)
    root, scratch = NEW_ROOT, f"size={job['scratch_mb']}m,nr_inodes=4096"
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount reaches the host
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in job["readable"]:
        target = root + path
        _make_parents(root, path, owners=bool(job["drop"]))  # under root; a user namespace maps no other id
        if os.path.islink(path):  # e.g. /lib -> usr/lib on a merged-/usr system
            os.symlink(os.readlink(path), target)
            continue
        if os.path.isdir(path):
            os.mkdir(target)
        else:
            open(target, "w").close()
        _bind_read_only(libc, path, target)
    for name in ("dev", "dev/shm", "proc", "tmp", "work"):
        os.mkdir(f"{root}/{name}")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _mount(libc, f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    owner = f"uid={job['drop'][0]},gid={job['drop'][1]}" if job["drop"] else f"uid={os.getuid()},gid={os.getgid()}"
    for name, mode in (("tmp", "1777"), ("dev/shm", "1777"), ("work", "0700," + owner)):
        _mount(libc, "tmpfs", f"{root}/{name}", "tmpfs", MS_NOSUID | MS_NODEV, f"{scratch},mode={mode}")
    try:  # a /proc of this PID namespace; some containers refuse it in a user namespace  # noqa: SIM105
        _mount(libc, "proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass
    _mount(libc, None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for name, value in IPC_LIMITS.items():  # this IPC namespace's own: memory that no process limit counts
        _write(f"/proc/sys/kernel/{name}", value)
    libc.sethostname(b"sandbox", 7)
    os.chdir(root)
    os.chroot(".")
    os.chdir("/work")


def drop_privileges(libc, job: dict) -> None:
    """Step 4's first half: the job's user under root, then no capabilities and no way to gain any."""
    if job["drop"]:
        uid, gid = job["drop"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # again: a change of user id cleared it
    _call(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _call(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")  # effective, permitted, inheritable: none
    if job["keyctl"] is not None:  # a new, empty session keyring (refused where keyrings are: then none)
        libc.syscall(job["keyctl"], KEYCTL_JOIN_SESSION_KEYRING, None)
    if job["seccomp"]:
        prog = ctypes.create_string_buffer(job["seccomp"], len(job["seccomp"]))

        class Program(ctypes.Structure):  # struct sock_fprog
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fprog = Program(len(job["seccomp"]) // 8, ctypes.addressof(prog))
        _call(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


# -- step 4: the program ---------------------------------------------------------------------------------
def run_program(job: dict) -> None:
    for name, (soft, hard) in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    import builtins

    builtins.exit = builtins.quit = sys.exit  # what `site` would add (-S leaves it out); programs call exit()
    sys.argv, sys.path = ["program.py"], [p for p in sys.path if p]  # nothing importable from /work
    calls, scope = job["calls"], {"__name__": "__main__", "__builtins__": builtins}
    values = os.fdopen(job["values_fd"], "w", encoding="utf-8") if calls else None
    if not calls:
        os.close(job["values_fd"])
    code = compile(job["source"], "program.py", "exec")
    del job
    exec(code, scope)
    if calls:
        name = calls["fn"]
        fn = scope[name] if callable(scope.get(name)) else getattr(scope["Solution"](), name)
        for args in marshal.loads(calls["args"]):
            values.write(dumps(encode(fn(*args))) + "\n")
            values.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    sys.path = [p for p in sys.path if p]
    with os.fdopen(int(sys.argv[1]), "rb") as f:
        job = marshal.loads(f.read())
    if job["isolate"]:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0)  # if the parent dies, end the run as it would
        if os.getppid() != job["parent"]:  # it died before that
            sys.exit(1)
        enter_namespaces(libc)
        build_root(libc, job)
        drop_privileges(libc, job)
    run_program(job)


if __name__ == "__main__":
    main()
