"""Start ``longkv serve`` in a child process on a free loopback port (tests and benchmarks).

Example::

    with ServerProcess(model_path, "--dtype", "float32") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import longkv

PROJECT_ROOT = Path(longkv.__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m longkv serve --model MODEL --port P ARGS...`` as a child process.

    Args:
        model: model reference passed to ``--model``.
        args: further ``longkv serve`` options.
        host: address to bind (loopback by default).
        timeout: seconds to wait for ``/health``.
        command: the command line instead of ``longkv serve`` (``{port}`` is filled in),
            e.g. another server to compare with.

    Raises:
        RuntimeError: the server exited or did not answer in time (with its log's tail).
    """

    def __init__(
        self,
        model: str,
        *args: str,
        host: str = "127.0.0.1",
        timeout: float = 180.0,
        command: list[str] | None = None,
        health_path: str = "/health",
    ) -> None:
        self.host, self.port = host, free_port(host)
        self.url = f"http://{host}:{self.port}"
        if command is None:
            command = [sys.executable, "-m", "longkv", "serve", "--model", model, "--host", host, "--port", "{port}", *args]
        self.command = [c.replace("{port}", str(self.port)) for c in command]
        self.timeout = timeout
        self.health_path = health_path
        self.log = tempfile.NamedTemporaryFile("w+", prefix="longkv-serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(PROJECT_ROOT))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"server did not answer {self.health_path} within {self.timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        """The last ``n`` characters of the server's log."""
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and remove its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        keep = os.environ.get("LONGKV_SERVER_LOG")  # debugging: keep the server's log there
        if keep:
            with open(keep, "a") as out:
                out.write(Path(self.log.name).read_text(errors="replace"))
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
