"""Code-execution sandbox for the agent's ``bash`` and ``python`` tools.

Each call runs in a fresh bubblewrap (``bwrap``) sandbox: new user, pid, network, ipc, uts and cgroup
namespaces, every capability dropped, a read-only view of the system (``/usr``, the ``/lib`` links, a short
allowlist of ``/etc``) and of this Python's prefix and site-packages, the workdir bind-mounted read-write at
its own path as the current directory, a private size-limited ``/tmp`` and ``/dev/shm``, a fresh ``/proc``
and a minimal ``/dev``, and a fixed environment (no host variable leaks in). Nothing else of the host is
visible: not the user's home, not the repository checkout, not the host's ``/tmp``.

Limits per call (:class:`Limits`), and what enforces them:

- processes: a cgroup's ``pids.max`` (cgroup v2 when the unified hierarchy is writable, else the v1 ``pids``
  controller); hitting it ends the call. Without a writable cgroup, ``RLIMIT_NPROC`` (which root ignores): forks
  then fail inside the command until the wall clock ends it.
- memory: a cgroup's memory limit (the kernel OOM-kills inside the call only); without one, ``RLIMIT_AS``.
- cpu: ``RLIMIT_CPU`` (per process); file size: ``RLIMIT_FSIZE``; ``/tmp`` and ``/dev/shm``: tmpfs size.
- wall clock and output size: watched here; at the limit the whole tree is killed (SIGKILL to the process
  group, every process of the call's cgroup, and the pid namespace, which dies with its first process).

Processes join the call's cgroup and get their rlimits before the command starts: the command is launched
through a tiny gate that waits on a pipe until both are in place (no ``preexec_fn``, so this is safe in a
threaded host). :meth:`Sandbox.describe` says which mechanism holds each limit on this machine.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import re
import resource
import selectors
import shutil
import signal
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from longkv.errors import LongKVError

BWRAP = "bwrap"
"""The bubblewrap executable, looked up on ``PATH`` at each check."""

INSTALL_HINT = "install bubblewrap: apt-get install -y bubblewrap, or pass --no-sandbox"

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "longkv-sandbox-"
"""Per-call cgroups are named ``longkv-sandbox-<host pid>-<n>``."""

SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# /etc entries the sandbox sees (read-only, when present): name resolution, the dynamic linker, time zone,
# certificates, Debian alternatives, locale and terminal basics. Everything else of /etc (shadow, ssh host
# keys, sudoers, pip/npm/git configs that may hold tokens, ...) stays out.
ETC_ALLOW = (
    "passwd", "group", "hosts", "nsswitch.conf", "host.conf", "gai.conf", "resolv.conf", "networks",
    "protocols", "services", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone",
    "alternatives", "ssl/certs", "ssl/openssl.cnf", "ca-certificates", "ca-certificates.conf", "pki/tls/certs",
    "pki/ca-trust", "crypto-policies", "mime.types", "magic", "magic.mime", "bash.bashrc", "inputrc",
    "locale.alias", "locale.conf", "os-release", "lsb-release", "debian_version", "fonts", "terminfo",
    "matplotlibrc", "mtab",
)  # fmt: skip
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# The gate: wait for one byte on fd argv[1] (sent once the cgroup and rlimits are in place), then exec. Python
# ignores SIGPIPE and SIGXFSZ and an ignored signal stays ignored across exec: give them back their defaults.
_GATE = (
    "import ctypes,os,signal,sys\n"
    "for s in (signal.SIGPIPE,signal.SIGXFSZ):signal.signal(s,signal.SIG_DFL)\n"
    "try:ctypes.CDLL(None).prctl(1,signal.SIGKILL)\n"  # PR_SET_PDEATHSIG: the command dies with the agent, even by kill -9
    "except (AttributeError,OSError):pass\n"  # not Linux
    "fd=int(sys.argv[1])\n"
    "if os.read(fd,1)!=b'x':os._exit(126)\n"
    "os.close(fd)\n"
    "try:os.execvp(sys.argv[2],sys.argv[2:])\n"
    "except OSError as e:sys.stderr.write(f'{sys.argv[2]}: {e.strerror}\\n');os._exit(127)\n"
)
_POLL_S = 0.02  # how often a running call is checked for its exit, the pids cap and the clock
_KILL_WAIT_S = 3.0  # how long a killed call's processes get to disappear before the cgroup is left for later
_names = itertools.count()


@dataclass(frozen=True)
class Limits:
    """Per-call limits. Sizes in bytes, times in seconds."""

    wall_s: float = 60.0  # wall clock per call; the whole process tree is killed at the limit
    cpu_s: int = 60  # RLIMIT_CPU
    memory_bytes: int = 2 << 30  # address space / memory cgroup
    file_bytes: int = 256 << 20  # largest file one call may write (RLIMIT_FSIZE)
    processes: int = 256  # processes/threads of the call at once
    output_bytes: int = 4 << 20  # stdout+stderr kept; beyond it the call is killed, output marked truncated
    tmp_bytes: int = 256 << 20  # size of the private /tmp (tmpfs)


@dataclass(frozen=True)
class ExecResult:
    """What one call did.

    ``exit_code`` is the command's exit status (128+N when signal N ended it, as a shell reports it), or None
    when a limit ended the call; ``killed`` then names the limit: "time", "cpu", "memory", "output",
    "processes" or "file size". ``output`` is stdout and stderr together in arrival order (like ``2>&1``).
    """

    exit_code: int | None
    output: str
    killed: str | None
    seconds: float
    truncated: bool

    def __str__(self) -> str:
        """The call as a model reads it: the output, then its exit status or the limit that ended it."""
        out = self.output.rstrip("\n")
        tail = f"[killed: {self.killed} limit reached after {self.seconds:.1f} s]" if self.killed else f"[exit code {self.exit_code}]"
        if self.truncated:
            tail = "[output cut at the sandbox's output limit] " + tail
        return f"{out}\n{tail}" if out else tail


def sandbox_problem() -> str | None:
    """None when bubblewrap can create a sandbox here, else one line saying why, with a fix hint."""
    bwrap = shutil.which(BWRAP)
    if bwrap is None:
        return f"bubblewrap ({BWRAP}) is not installed: {INSTALL_HINT}"
    return _probe(bwrap)


@functools.lru_cache(maxsize=8)
def _probe(bwrap: str) -> str | None:
    """Run ``true`` in a sandbox with the namespaces a real call uses; None when it works."""
    argv = [bwrap, *_NAMESPACE_ARGS, "--ro-bind", "/", "/", "--proc", "/proc", "--", "true"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap ({bwrap}) cannot run ({exc}): reinstall it ({INSTALL_HINT})"
    if proc.returncode == 0:
        return None
    why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return (
        f"bubblewrap cannot create a sandbox here ({why}): allow unprivileged user namespaces "
        "(sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=10000; in a container, run it "
        "with a seccomp profile that permits them), or pass --no-sandbox"
    )


_NAMESPACE_ARGS = (
    "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
    "--disable-userns", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
)  # fmt: skip


# --------------------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class _CgroupPlan:
    """Where per-call cgroups go: ``parents[controller]`` for "pids" and/or "memory" (v2: the same dir)."""

    version: int  # 1 or 2
    parents: dict[str, Path]


def _self_cgroups(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller (or "" for v2): path}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                out[name] = parts[2]
    return out


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def _find_cgroups(root: Path, self_cgroup: str) -> _CgroupPlan | None:
    """Pick where this process may create per-call cgroups with a pids and/or memory controller.

    cgroup v2 (``root/cgroup.controllers`` exists and ``root`` is writable): the nearest cgroup, from this
    process's own up to the root, whose ``cgroup.subtree_control`` enables pids and memory (else pids alone,
    else memory alone) and that is writable. cgroup v1: ``root/pids`` and ``root/memory``, at this process's
    own cgroup when present there, else at the hierarchy's root. None when nothing usable is found.
    """
    own = _self_cgroups(self_cgroup)
    if (root / "cgroup.controllers").is_file():
        if not os.access(root, os.W_OK):
            return None
        rel = own.get("", "/").strip("/")
        chain = [root / rel] if rel else [root]
        while chain[-1] != root:
            chain.append(chain[-1].parent)
        for wanted in ({"pids", "memory"}, {"pids"}, {"memory"}):
            for cand in chain:
                try:
                    enabled = set((cand / "cgroup.subtree_control").read_text().split())
                except OSError:
                    continue
                if wanted <= enabled and _writable_dir(cand):
                    return _CgroupPlan(2, dict.fromkeys(sorted(wanted), cand))
        return None
    parents: dict[str, Path] = {}
    for ctrl in ("pids", "memory"):
        mount = root / ctrl
        if not (mount / "cgroup.procs").is_file() or (mount / "cgroup.controllers").exists():
            continue
        rel = own.get(ctrl, "/").strip("/")
        cand = mount / rel if rel and (mount / rel).is_dir() else mount
        if _writable_dir(cand):
            parents[ctrl] = cand
    return _CgroupPlan(1, parents) if parents else None


class _CallCgroup:
    """The cgroup(s) of one call: created with limits set, joined by the gate, killed and removed at the end."""

    def __init__(self, plan: _CgroupPlan, limits: Limits) -> None:
        self.plan = plan
        name = f"{CGROUP_PREFIX}{os.getpid()}-{next(_names)}"
        self.dirs: dict[str, Path] = {}
        try:
            for ctrl, parent in plan.parents.items():
                path = parent / name
                if path not in self.dirs.values():
                    path.mkdir()
                self.dirs[ctrl] = path
            if "pids" in self.dirs:
                (self.dirs["pids"] / "pids.max").write_text(str(limits.processes))
            if "memory" in self.dirs:
                mem = self.dirs["memory"]
                if plan.version == 2:
                    (mem / "memory.max").write_text(str(limits.memory_bytes))
                    _try_write(mem / "memory.swap.max", "0")
                else:
                    (mem / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
                    _try_write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        except OSError as exc:
            self.remove()
            raise LongKVError(
                f"cannot set up the sandbox's cgroup in {plan.parents} ({exc}): fix the cgroup permissions, "
                "or run longkv as a user without cgroup write access (limits then use rlimits)"
            ) from None

    def add(self, pid: int) -> None:
        """Move process ``pid`` into every controller's cgroup."""
        for path in dict.fromkeys(self.dirs.values()):
            (path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        path = next(iter(self.dirs.values()))
        try:
            return [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def pids_hit(self) -> bool:
        """Whether a fork or clone failed at ``pids.max`` during the call."""
        return "pids" in self.dirs and _event(self.dirs["pids"] / "pids.events", "max") > 0

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of the call at its memory limit."""
        if "memory" not in self.dirs:
            return False
        mem = self.dirs["memory"]
        return _event(mem / ("memory.events" if self.plan.version == 2 else "memory.oom_control"), "oom_kill") > 0

    def kill(self) -> None:
        """SIGKILL every process of the call (v2 ``cgroup.kill`` when the kernel has it)."""
        first = next(iter(self.dirs.values()))
        if self.plan.version == 2 and _try_write(first / "cgroup.kill", "1"):
            return
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, wait_s: float = _KILL_WAIT_S) -> bool:
        """Kill what is left, wait for it to go, remove the directories; False if one could not be removed."""
        deadline = time.monotonic() + wait_s
        if self.dirs:
            while self.pids() and time.monotonic() < deadline:
                self.kill()
                time.sleep(0.005)
        ok = True
        for path in dict.fromkeys(self.dirs.values()):
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        ok = False
                        break
                    time.sleep(0.01)
        return ok


def _event(path: Path, key: str) -> int:
    """The count after ``key`` in a flat-keyed cgroup file (``pids.events``, ``memory.events``); 0 if absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _try_write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
        return True
    except OSError:
        return False


def _remove_stale(plan: _CgroupPlan) -> None:
    """Remove per-call cgroups left by longkv processes that no longer run (killed mid-call)."""
    pattern = re.compile(re.escape(CGROUP_PREFIX) + r"(\d+)-\d+$")
    for parent in dict.fromkeys(plan.parents.values()):
        with contextlib.suppress(OSError):
            for child in parent.iterdir():
                m = pattern.match(child.name)
                if m and int(m.group(1)) != os.getpid() and not Path(f"/proc/{m.group(1)}").exists():
                    stale = _CallCgroup.__new__(_CallCgroup)
                    stale.plan, stale.dirs = plan, {"pids": child}
                    stale.remove(wait_s=0.5)


def reap_stale() -> None:
    """Kill what is left of the calls of longkv processes that died mid-call (kill -9), and remove their cgroups.

    An agent killed while a tool ran may leave that call's processes running for a moment (the kill reaches the
    sandbox asynchronously, and not at all in the instant between the launcher's go and bubblewrap's start):
    ``resume`` calls this before it looks at what the interrupted call changed. A no-op without cgroups.
    """
    plan = _cgroup_plan()
    if plan is not None:
        _remove_stale(plan)


@functools.lru_cache(maxsize=1)
def _cgroup_plan() -> _CgroupPlan | None:
    try:
        own = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    plan = _find_cgroups(CGROUP_ROOT, own)
    if plan is not None:
        _remove_stale(plan)
    return plan


# --------------------------------------------------------------------------- the sandbox


def _size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1 (``"64 KiB"``, ``"2 GiB"``)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"


def _python_paths() -> list[str]:
    """This interpreter's prefixes, its binary's directory and site-packages, outermost first, outside /usr."""
    cands = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, *site.getsitepackages()}
    cands.add(str(Path(sys.executable).resolve().parent))
    cands.add(str(Path(sys.executable).parent))
    real = sorted({os.path.realpath(p) for p in cands if os.path.isdir(p)}, key=len)
    keep: list[str] = []
    for p in real:
        if p == "/" or any(p == s or p.startswith(s + "/") for s in (*SYSTEM_DIRS, *keep)):
            continue
        keep.append(p)
    return keep


class Sandbox:
    """Runs commands in ``workdir`` under :class:`Limits`, isolated by bubblewrap unless ``enabled`` is False."""

    def __init__(self, workdir: Path, limits: Limits = Limits(), enabled: bool = True) -> None:
        """``enabled=False`` is ``--no-sandbox``: the command runs directly in ``workdir`` with the limits only
        (rlimits, cgroup caps when available, the wall clock, the output cap) and no isolation.

        Raises:
            LongKVError: ``workdir`` is not a directory, a limit is not positive, or ``enabled`` and bubblewrap
                cannot run here.
        """
        workdir = Path(workdir)
        for field, value in vars(limits).items():
            if not value > 0:
                raise LongKVError(f"sandbox limit {field} must be positive, got {value}: raise it or keep the default")
        if not workdir.is_dir():
            raise LongKVError(f"the sandbox workdir {workdir} is not a directory: create it or pass an existing one")
        self.workdir = workdir.resolve()
        self.limits = limits
        self.enabled = enabled
        self._bwrap: str | None = None
        if enabled:
            problem = sandbox_problem()
            if problem is not None:
                raise LongKVError(problem)
            self._bwrap = shutil.which(BWRAP)
        self._plan = _cgroup_plan()
        self._leftover: list[_CallCgroup] = []
        home = "/tmp" if enabled else str(self.workdir)
        self._env = {
            "PATH": f"{Path(sys.executable).parent}:{SANDBOX_PATH}",
            "HOME": home,
            "TMPDIR": "/tmp" if enabled else os.environ.get("TMPDIR", "/tmp"),
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.mechanisms = self._mechanisms()
        self._prefix = self._bwrap_argv() if enabled else []

    # ---------------------------------------------------------------- public

    def run(self, argv: list[str], stdin: str | None = None) -> ExecResult:
        """Run ``argv`` (looked up on the sandbox's ``PATH``) with ``stdin`` as its input (none when None).

        A misbehaving command never raises: a limit shows in :attr:`ExecResult.killed`, a missing program as
        exit status 127 (or 1 from bwrap) with the reason in the output.

        Raises:
            LongKVError: ``argv`` is empty, or the cgroup for the call cannot be set up.
        """
        if not argv:
            raise LongKVError("the sandbox command is empty: pass a program and its arguments, e.g. ['ls']")
        self._leftover = [cg for cg in self._leftover if not cg.remove(wait_s=0)]
        cg = _CallCgroup(self._plan, self.limits) if self._plan is not None else None
        try:
            return self._run(list(argv), stdin, cg)
        finally:
            if cg is not None and not cg.remove():
                self._leftover.append(cg)

    def bash(self, command: str) -> ExecResult:
        """Run ``command`` with ``bash -c``."""
        return self.run(["bash", "-c", command])

    def python(self, code: str) -> ExecResult:
        """Run ``code`` with this host's Python (``sys.executable``), fed on stdin; ``sys.path[0]`` is the workdir.

        Python ignores SIGXFSZ, so a write past ``file_bytes`` raises ``OSError`` (EFBIG, "File too large") in the
        code instead of ending the call with ``killed="file size"``.
        """
        return self.run([sys.executable, "-"], stdin=code)

    def describe(self) -> str:
        """One line per mechanism: what isolates the call and what holds each limit on this machine."""
        return "\n".join(f"{key}: {value}" for key, value in self.mechanisms.items())

    # ---------------------------------------------------------------- internals

    def _mechanisms(self) -> dict[str, str]:
        lim, plan = self.limits, self._plan
        cg = {} if plan is None else {c: f"cgroup v{plan.version} {c} ({p})" for c, p in plan.parents.items()}
        root = os.geteuid() == 0
        if "pids" in cg:
            procs = f"{cg['pids']}: pids.max={lim.processes}"
        elif root:
            procs = "none (root ignores RLIMIT_NPROC and no cgroup is writable): only the wall clock ends a fork bomb"
        else:
            procs = f"RLIMIT_NPROC={lim.processes} above this user's running processes"
        if "memory" in cg:
            mem = f"{cg['memory']}: {_size(lim.memory_bytes)}"
        else:
            mem = f"RLIMIT_AS={_size(lim.memory_bytes)} (allocations fail inside the command)"
        kill = "SIGKILL to the process group" + (", the cgroup" if cg else "")
        if self.enabled:
            isolation = (f"bubblewrap ({self._bwrap}): user, pid, net, ipc, uts, cgroup namespaces; no capabilities; "
                         f"read-only system and Python; read-write workdir {self.workdir}; private /tmp")  # fmt: skip
            kill += " and the pid namespace"
        else:
            isolation = f"none (--no-sandbox): runs in {self.workdir} with the host's view and network"
        out = {
            "isolation": isolation,
            "processes": procs,
            "memory": mem,
            "cpu": f"RLIMIT_CPU={lim.cpu_s} s per process",
            "file size": f"RLIMIT_FSIZE={_size(lim.file_bytes)}",
            "time": f"{kill} after {lim.wall_s:g} s",
            "output": f"killed past {_size(lim.output_bytes)}",
        }
        if self.enabled:
            out["tmp"] = f"tmpfs /tmp and /dev/shm of {_size(lim.tmp_bytes)} each"
        return out

    def _bwrap_argv(self) -> list[str]:
        """The bwrap command line up to ``--``: namespaces, mounts, environment, working directory."""
        assert self._bwrap is not None
        a = [self._bwrap, *_NAMESPACE_ARGS, "--hostname", "sandbox", "--clearenv"]
        for key, value in self._env.items():
            a += ["--setenv", key, value]
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                a += ["--ro-bind", d, d]
        for name in ETC_ALLOW:
            a += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        size = str(self.limits.tmp_bytes)
        a += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm"]
        for p in _python_paths():
            a += ["--ro-bind", p, p]
        wd = str(self.workdir)
        a += ["--bind", wd, wd, "--remount-ro", "/", "--chdir", wd, "--"]
        return a

    def _rlimits(self) -> list[tuple[int, tuple[int, int]]]:
        lim, cg = self.limits, (self._plan.parents if self._plan else {})
        out = [
            (resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1)),
            (resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes)),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        if "memory" not in cg:
            out.append((resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes)))
        if "pids" not in cg and os.geteuid() != 0:
            n = lim.processes + _count_processes(os.getuid())
            out.append((resource.RLIMIT_NPROC, (n, n)))
        return out

    def _spawn(self, argv: list[str], stdin: str | None, cg: _CallCgroup | None) -> subprocess.Popen[bytes]:
        """Start the gate, put it in the cgroup and under the rlimits, then let it exec the command."""
        cmd = self._prefix + argv
        gate_r, gate_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _GATE, str(gate_r), *cmd],
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(gate_r,),
                cwd=self.workdir,
                env=self._env,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(gate_w)
            raise LongKVError(f"cannot start the sandboxed command ({exc}): check that {sys.executable} runs") from None
        finally:
            os.close(gate_r)
        try:
            if cg is not None:
                cg.add(proc.pid)
            for res, value in self._rlimits():
                resource.prlimit(proc.pid, res, value)
            os.write(gate_w, b"x")
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, OSError):
                raise LongKVError(f"cannot apply the sandbox limits ({exc}): check cgroup and rlimit permissions") from None
            raise
        finally:
            os.close(gate_w)
        return proc

    def _run(self, argv: list[str], stdin: str | None, cg: _CallCgroup | None) -> ExecResult:
        lim = self.limits
        start = time.monotonic()
        proc = self._spawn(argv, stdin, cg)
        assert proc.stdout is not None
        out_fd = proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(out_fd, selectors.EVENT_READ)
        try:
            pidfd = os.pidfd_open(proc.pid)  # readable once the process exits: no polling for that
            sel.register(pidfd, selectors.EVENT_READ)
        except OSError:
            pidfd = -1
        pending = memoryview((stdin or "").encode())
        if proc.stdin is not None:
            if pending:
                os.set_blocking(proc.stdin.fileno(), False)
                sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        out = bytearray()
        truncated = eof = False
        killed: str | None = None
        exited_at: float | None = None

        def kill_tree() -> None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)  # the gate, then bwrap: its pid namespace dies with it
            if cg is not None:
                cg.kill()

        while True:
            now = time.monotonic()
            if exited_at is None and _exited(proc.pid):
                exited_at = now  # not reaped yet, so its process group id cannot be reused while we kill
                kill_tree()  # leftovers (background jobs) would otherwise keep the output pipe open
                if pidfd >= 0:
                    sel.unregister(pidfd)
            if exited_at is not None and (eof or now - exited_at > 1.0):
                break
            if exited_at is None and killed is None:
                if truncated:
                    killed = "output"
                elif cg is not None and cg.pids_hit():
                    killed = "processes"
                elif now - start >= lim.wall_s:
                    killed = "time"
                if killed is not None:
                    kill_tree()
            timeout = min(_POLL_S, max(0.0, start + lim.wall_s - now) + 0.001)
            for key, _ in sel.select(timeout=timeout):
                if key.fd == out_fd:
                    chunk = os.read(out_fd, 1 << 16)
                    if not chunk:
                        eof = True
                        sel.unregister(out_fd)
                    elif not truncated:
                        room = lim.output_bytes - len(out)
                        out += chunk[:room]
                        truncated = len(chunk) > room
                elif key.fd != pidfd:
                    assert proc.stdin is not None
                    try:
                        n = os.write(key.fd, pending[: 1 << 16])
                    except BlockingIOError:
                        n = 0
                    except BrokenPipeError:
                        n = len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(key.fd)
                        proc.stdin.close()
        sel.close()
        if pidfd >= 0:
            os.close(pidfd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            cpu_used = usage.ru_utime + usage.ru_stime
        except ChildProcessError:  # reaped by someone else (a SIGCHLD handler in the host): status lost
            code, cpu_used = 255, 0.0
        seconds = time.monotonic() - start
        proc.returncode = code
        proc.stdout.close()
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if killed is None and code != 0:
            if cg is not None and cg.oom_killed():
                killed = "memory"
            elif cg is not None and cg.pids_hit():
                killed = "processes"
            elif code == 128 + signal.SIGXCPU or (
                code == 128 + signal.SIGKILL and cpu_used >= lim.cpu_s
            ):
                killed = "cpu"
            elif code == 128 + signal.SIGXFSZ:
                killed = "file size"
        text = bytes(out).decode("utf-8", errors="replace")
        return ExecResult(None if killed else code, text, killed, seconds, truncated)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (its pid and process group id stay reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _count_processes(uid: int) -> int:
    """How many processes ``uid`` runs now (RLIMIT_NPROC counts them all, not only the call's)."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                n += entry.stat().st_uid == uid
    return n


__all__ = ["INSTALL_HINT", "ExecResult", "Limits", "Sandbox", "reap_stale", "sandbox_problem"]
