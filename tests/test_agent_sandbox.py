"""The agent's code-execution sandbox: known escapes stay inside, every limit ends a call with a clear reason.

Each escape runs through ``Sandbox.python``/``Sandbox.bash`` and is checked from the host side (the file it
tried to write does not exist, the secret it tried to read did not come back), with a marker in the workdir
proving the escape code really ran. Limits are small so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
import uuid
from pathlib import Path

import pytest

from longkv.agent import sandbox as sbmod
from longkv.agent.sandbox import CGROUP_PREFIX, Limits, Sandbox, sandbox_problem
from longkv.errors import LongKVError

PROBLEM = sandbox_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"no sandbox here: {PROBLEM}")

REPO = Path(__file__).resolve().parents[1]
SMALL = Limits(wall_s=5, cpu_s=5, memory_bytes=256 << 20, file_bytes=1 << 20, processes=64,
               output_bytes=64 << 10, tmp_bytes=4 << 20)  # fmt: skip
PLAN = sbmod._cgroup_plan()
CGROUP_PIDS = PLAN is not None and "pids" in PLAN.parents
CGROUP_MEMORY = PLAN is not None and "memory" in PLAN.parents


def _procs_with(marker: str) -> list[str]:
    """Command lines of host processes that mention ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(cmd)
    return found


@pytest.fixture(autouse=True)
def _no_cgroups_left():
    """After every test: no per-call cgroup of this process is left behind."""
    yield
    if PLAN is not None:
        mine = re.compile(re.escape(f"{CGROUP_PREFIX}{os.getpid()}-"))
        left = [p for parent in set(PLAN.parents.values()) for p in parent.iterdir() if mine.match(p.name)]
        assert not left, f"cgroups left behind: {left}"


@pytest.fixture
def sb(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path, SMALL)


# --------------------------------------------------------------------------- happy paths


def test_bash_exit_code_and_output_in_arrival_order(sb: Sandbox):
    res = sb.bash("echo out; echo err >&2; echo out2; exit 3")
    assert (res.exit_code, res.output, res.killed, res.truncated) == (3, "out\nerr\nout2\n", None, False)


def test_python_exit_code_output_and_host_interpreter(sb: Sandbox):
    code = "import sys\nprint('a')\nsys.stderr.write('b\\n')\nprint(sys.executable)\nraise SystemExit(4)"
    res = sb.python(code)
    assert res.exit_code == 4 and res.killed is None
    assert res.output == f"a\nb\n{sys.executable}\n"


def test_python_can_import_numpy_from_host_site_packages(tmp_path: Path):
    pytest.importorskip("numpy")
    res = Sandbox(tmp_path, Limits(wall_s=20, processes=1024)).python("import numpy\nprint(numpy.arange(4).sum())")
    assert (res.exit_code, res.output) == (0, "6\n"), res.output


def test_workdir_is_cwd_and_files_written_there_show_on_host(sb: Sandbox, tmp_path: Path):
    res = sb.bash("pwd; echo hello > made.txt; mkdir -p sub && echo x > sub/y")
    assert (res.exit_code, res.output) == (0, f"{tmp_path}\n")
    assert (tmp_path / "made.txt").read_text() == "hello\n" and (tmp_path / "sub" / "y").read_text() == "x\n"
    (tmp_path / "made_mod.py").write_text("X = 7")
    res = sb.python("import made_mod; print(made_mod.X)")
    assert res.output == "7\n"  # the workdir is on sys.path, like python -c


def test_large_stdin_and_output_stream_through(tmp_path: Path):
    data = "".join(f"line {i}\n" for i in range(30_000))  # ~300 KB: more than a pipe buffer both ways
    res = Sandbox(tmp_path, Limits(wall_s=10, output_bytes=1 << 20)).run(["cat"], stdin=data)
    assert (res.exit_code, res.output == data, res.truncated) == (0, True, False)


def test_sigpipe_has_its_default_action(sb: Sandbox):
    # Python ignores SIGPIPE; a launcher that leaked that into the command would make `yes` report EPIPE forever.
    res = sb.bash("yes | head -n 2")
    assert (res.exit_code, res.output) == (0, "y\ny\n")


def test_missing_program_is_a_result_not_an_exception(sb: Sandbox):
    res = sb.run(["no-such-program-longkv"])
    assert res.exit_code not in (0, None) and "no-such-program-longkv" in res.output


# --------------------------------------------------------------------------- escapes


def _targets(tag: str) -> list[Path]:
    """Host paths outside the workdir that an escape tries to create."""
    name = f"longkv-escape-{tag}"
    return [Path("/etc") / name, Path.home() / name, REPO / name, Path("/tmp") / name]


def _shell_writes(targets: list[Path]) -> str:
    return "".join(f"echo pwned > {t} 2>/dev/null; " for t in targets) + "echo ran > escape-ran"


ESCAPES = {
    "ctypes-system": lambda cmd: f"import ctypes\nctypes.CDLL(None).system({cmd!r}.encode())",
    "subclasses-popen": lambda cmd: (
        "subs = ().__class__.__base__.__subclasses__\n"
        "wrap = [c for c in subs() if c.__name__ == '_wrap_close'][0]\n"
        "wrap.__init__.__globals__['__builtins__']['__import__']('subprocess')\n"
        "popen = [c for c in subs() if c.__name__ == 'Popen'][0]\n"
        f"popen(['sh', '-c', {cmd!r}]).wait()"
    ),
    "import-os-system": lambda cmd: f"__import__('o' + 's').system({cmd!r})",
    "bash": lambda cmd: cmd,
}


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_escape_cannot_write_outside_the_workdir(sb: Sandbox, tmp_path: Path, escape: str):
    targets = _targets(uuid.uuid4().hex[:12])
    code = ESCAPES[escape](_shell_writes(targets))
    try:
        res = sb.bash(code) if escape == "bash" else sb.python(code)
        assert (tmp_path / "escape-ran").exists(), f"the escape did not run: {res}"
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_plain_writes_outside_the_workdir_fail(sb: Sandbox):
    targets = _targets(uuid.uuid4().hex[:12])
    code = (f"for t in {[str(t) for t in targets]!r}:\n"
            "    try:\n        open(t, 'w').write('x')\n        print('wrote', t)\n"
            "    except OSError as e:\n        print('refused', t, e.strerror)")  # fmt: skip
    try:
        res = sb.python(code)
        # /etc, the home and the repository are read-only; /tmp is the sandbox's own, gone after the call
        # (so is a checkout that lives under /tmp: writes there land in the private /tmp too)
        def private(t: Path) -> bool:
            return t == targets[3] or str(t).startswith("/tmp/")

        assert [line.split()[:2] for line in res.output.splitlines()] == [
            ["wrote" if private(t) else "refused", str(t)] for t in targets], res.output  # fmt: skip
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_host_environment_secrets_do_not_reach_the_command(sb: Sandbox, monkeypatch: pytest.MonkeyPatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("LONGKV_TEST_SECRET", secret)
    res = sb.python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('LONGKV_TEST_SECRET'))")
    assert res.exit_code == 0 and secret not in res.output and "LONGKV_TEST_SECRET" not in res.output
    res = sb.bash("cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; env")
    assert res.exit_code == 0 and "PATH=" in res.output and secret not in res.output


def test_host_files_outside_the_workdir_are_invisible(sb: Sandbox, tmp_path_factory: pytest.TempPathFactory):
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("host secret")
    paths = [outside, Path(__file__).resolve(), REPO / "pyproject.toml", Path("/etc/shadow"), Path("/etc/pip.conf")]
    code = (f"for p in {[str(p) for p in paths]!r}:\n"
            "    try:\n        open(p).read()\n        print('read', p)\n"
            "    except OSError as e:\n        print('hidden', p, e.strerror)")  # fmt: skip
    res = sb.python(code)
    assert res.output.count("hidden") == len(paths), res.output
    # The host's home: only the way down to this Python's prefix (when it lives there) may show.
    home = Path.home()
    res = sb.python(f"import json, os\nprint(json.dumps(os.listdir({str(home)!r}) if os.path.isdir({str(home)!r}) else []))")
    shown = set(json.loads(res.output))
    allowed = {Path(p).relative_to(home).parts[0] for p in sbmod._python_paths() if Path(p).is_relative_to(home)}
    assert shown <= allowed, f"host home entries visible in the sandbox: {shown - allowed}"


def test_no_capabilities_and_no_host_processes(sb: Sandbox):
    res = sb.bash("grep CapEff /proc/self/status; ls /proc | grep -c '^[0-9]'")
    cap, count = res.output.split("\n")[:2]
    assert cap.split()[1] == "0000000000000000", "the sandboxed command kept capabilities (mount, mknod, ...)"
    assert int(count) <= 4, "host processes are visible: no pid namespace"


def test_no_network_not_even_the_hosts_loopback(sb: Sandbox):
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        code = (f"import socket\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
                "    try:\n        socket.create_connection(addr, timeout=2).close()\n        print('connected', addr)\n"
                "    except OSError as e:\n        print('blocked', addr, e)")  # fmt: skip
        res = sb.python(code)
    finally:
        server.close()
    assert res.output.count("blocked") == 2, res.output


# --------------------------------------------------------------------------- limits


@pytest.mark.skipif(not CGROUP_PIDS and os.geteuid() == 0, reason="root without a writable pids cgroup: no process cap")
def test_fork_bomb_is_held_at_the_process_cap(tmp_path: Path):
    marker = f"longkv-bomb-{uuid.uuid4().hex[:12]}"
    box = Sandbox(tmp_path, Limits(wall_s=10, processes=32))
    res = box.run(["bash", "-c", "f(){ f|f& }; f; sleep 30", marker])
    assert res.killed == ("processes" if CGROUP_PIDS else "time") and res.exit_code is None
    assert res.seconds < 10
    assert _procs_with(marker) == []
    assert box.bash("echo still fine").output == "still fine\n"


def test_big_file_stops_at_the_file_size_limit(sb: Sandbox, tmp_path: Path):
    res = sb.bash("head -c 10M /dev/zero > big")
    assert res.killed == "file size" and res.exit_code is None
    assert (tmp_path / "big").stat().st_size == 1 << 20
    # Python ignores SIGXFSZ: the write fails with EFBIG instead of killing it.
    res = sb.python("open('big2', 'wb').write(bytes(10 << 20))")
    assert res.exit_code == 1 and "File too large" in res.output
    assert (tmp_path / "big2").stat().st_size <= 1 << 20


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_many_files_fill_only_the_private_tmpfs(sb: Sandbox, where: str):
    tag = f"longkv-fill-{uuid.uuid4().hex[:12]}"
    code = (f"n = 0\ntry:\n    while True:\n        open(f'{where}/{tag}-{{n}}', 'wb').write(bytes(256 << 10))\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.strerror)")  # fmt: skip
    res = sb.python(code)
    count, why = res.output.split(" ", 1)
    assert res.exit_code == 0 and why.strip() == "No space left on device"
    assert 0 < int(count) * (256 << 10) <= SMALL.tmp_bytes
    assert list(Path(where).glob(f"{tag}-*")) == []  # the host's own directory got nothing


def test_memory_bomb_is_stopped(sb: Sandbox):
    res = sb.python("chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))")
    if CGROUP_MEMORY:
        assert res.killed == "memory" and res.exit_code is None
    else:
        assert res.exit_code == 1 and "MemoryError" in res.output
    assert res.seconds < SMALL.wall_s


def test_infinite_loop_is_killed_at_the_wall_clock(tmp_path: Path):
    res = Sandbox(tmp_path, Limits(wall_s=1.0, cpu_s=30)).python("while True:\n    pass")
    assert res.killed == "time" and res.exit_code is None and 1.0 <= res.seconds < 3.0


def test_cpu_limit(tmp_path: Path):
    res = Sandbox(tmp_path, Limits(wall_s=10, cpu_s=1)).python("while True:\n    pass")
    assert res.killed == "cpu" and res.exit_code is None and res.seconds < 5


@pytest.mark.parametrize("enabled", [True, False])
def test_background_process_does_not_survive_the_call(tmp_path: Path, enabled: bool):
    if not enabled and not PLAN:
        pytest.skip("without a cgroup, --no-sandbox cannot follow a process that left with setsid")
    nap = f"1000.{uuid.uuid4().int % 10**9}"
    res = Sandbox(tmp_path, SMALL, enabled=enabled).bash(f"setsid nohup sleep {nap} & echo started")
    assert (res.exit_code, res.output, res.killed) == (0, "started\n", None)
    assert res.seconds < 0.9  # its inherited stdout did not hold the call open (up to the 1 s drain)
    assert _procs_with(nap) == []


def test_output_flood_is_truncated(sb: Sandbox):
    res = sb.python("while True:\n    print('x' * 1000)")
    assert res.killed == "output" and res.truncated and res.exit_code is None
    assert len(res.output) == SMALL.output_bytes and set(res.output) == {"x", "\n"}


# --------------------------------------------------------------------------- --no-sandbox and set-up errors


def test_no_sandbox_runs_in_the_workdir_and_keeps_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap reachable: --no-sandbox must not need it
    box = Sandbox(tmp_path, Limits(wall_s=1.0), enabled=False)
    res = box.bash("pwd; echo hi > f.txt")
    assert (res.exit_code, res.output) == (0, f"{tmp_path}\n") and (tmp_path / "f.txt").exists()
    res = box.bash("sleep 30")
    assert res.killed == "time" and res.seconds < 3
    assert box.mechanisms["isolation"].startswith("none")


@pytest.mark.parametrize("enabled", [True, False])
def test_a_command_dies_with_an_agent_killed_by_sigkill(tmp_path: Path, enabled: bool):
    """The agent process is killed with SIGKILL while its command sleeps: the command goes too (it never writes
    its last line), with or without the sandbox."""
    import signal
    import subprocess
    import time

    host = (f"from longkv.agent.sandbox import Sandbox\n"
            f"Sandbox({str(tmp_path)!r}, enabled={enabled}).bash('echo start > log.txt; sleep 2; echo end >> log.txt')")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", host], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while not (tmp_path / "log.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    assert (tmp_path / "log.txt").read_text() == "start\n"


@pytest.mark.parametrize("enabled", [True, False])
def test_missing_workdir_is_a_longkv_error(tmp_path: Path, enabled: bool):
    with pytest.raises(LongKVError, match="not a directory") as err:
        Sandbox(tmp_path / "missing", enabled=enabled)
    assert "\n" not in str(err.value)


def test_sandbox_problem_gives_the_install_hint_without_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = sandbox_problem()
    assert problem is not None and "apt-get install -y bubblewrap" in problem and "--no-sandbox" in problem
    with pytest.raises(LongKVError, match="apt-get install -y bubblewrap"):
        Sandbox(tmp_path)


def test_sandbox_problem_reports_a_bwrap_that_cannot_create_namespaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = sandbox_problem()
    assert problem is not None and "uid map: Permission denied" in problem and "--no-sandbox" in problem
    assert "\n" not in problem


def test_empty_command_is_a_longkv_error(sb: Sandbox):
    with pytest.raises(LongKVError, match="empty"):
        sb.run([])


# --------------------------------------------------------------------------- which mechanism holds what


def test_describe_names_the_mechanisms_in_use(sb: Sandbox):
    text = sb.describe()
    assert "bubblewrap" in text and "net" in text
    if CGROUP_PIDS:
        assert f"cgroup v{PLAN.version} pids" in sb.mechanisms["processes"]
    if CGROUP_MEMORY:
        assert f"cgroup v{PLAN.version} memory" in sb.mechanisms["memory"]
    else:
        assert "RLIMIT_AS" in sb.mechanisms["memory"]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_cgroup_v2_picks_the_nearest_cgroup_that_delegates_pids_and_memory(tmp_path: Path):
    root = _tree(tmp_path, {"cgroup.controllers": "cpu memory pids", "cgroup.subtree_control": "cpu memory pids",
                            "user.slice/cgroup.subtree_control": "pids", "user.slice/s.scope/cgroup.procs": ""})  # fmt: skip
    plan = sbmod._find_cgroups(root, "0::/user.slice/s.scope\n")
    assert plan is not None and plan.version == 2 and plan.parents == {"memory": root, "pids": root}
    (root / "user.slice/cgroup.subtree_control").write_text("memory pids")
    plan = sbmod._find_cgroups(root, "0::/user.slice/s.scope\n")
    assert plan is not None and plan.parents == {"memory": root / "user.slice", "pids": root / "user.slice"}


def test_cgroup_v1_uses_own_cgroup_per_controller_and_none_without_any(tmp_path: Path):
    root = _tree(tmp_path / "v1", {"pids/cgroup.procs": "", "memory/cgroup.procs": "", "memory/job/cgroup.procs": ""})
    plan = sbmod._find_cgroups(root, "8:pids:/\n4:memory:/job\n0::/\n")
    assert plan is not None and plan.version == 1
    assert plan.parents == {"pids": root / "pids", "memory": root / "memory" / "job"}
    assert sbmod._find_cgroups(_tree(tmp_path / "none", {"x": ""}), "0::/\n") is None


def test_non_positive_limit_is_a_longkv_error(tmp_path: Path):
    with pytest.raises(LongKVError, match="processes must be positive"):
        Sandbox(tmp_path, Limits(processes=0), enabled=False)
