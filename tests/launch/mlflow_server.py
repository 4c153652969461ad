"""A real `mlflow server` for tests: sqlite store and proxied artifacts under a tmp dir.

Import it from a test module next to this file (pytest puts tests/launch on sys.path):

    from mlflow_server import MlflowServer, start_mlflow_server, stop_mlflow_server

The server runs in its own process group, so stopping it also ends its uvicorn worker.
Starting takes ~7 s and ~740 MB with one worker (FACTS.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

MLFLOW_EXE = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """An `mlflow server` process that can be stopped and started again on the same port/store.

    Args:
        root: directory for the sqlite store, the artifacts and `server.log`.
        port: TCP port; a free one when None.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """Tracking URI of the server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until `/health` answers.

        Raises:
            RuntimeError: it exited or did not answer within `timeout` (log tail included).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        log_file = open(self.root / "server.log", "ab")  # noqa: SIM115 - kept by the process
        command = [
            str(MLFLOW_EXE), "server",
            "--backend-store-uri", f"sqlite:///{(self.root / 'mlflow.db').resolve()}",
            "--artifacts-destination", str((self.root / "artifacts").resolve()),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        # No job runner: MLflow 3 starts a huey consumer process beside the server for its
        # own server-side jobs (~2.6 CPU-s at each start); lmforge submits none.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}):\n"
                                   + self._log_tail())
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n" + self._log_tail())

    def healthy(self) -> bool:
        """Whether `/health` answers 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL after 3 s); idempotent.

        uvicorn waits for open keep-alive connections on SIGTERM, and a test's MlflowClient
        holds one, hence the short grace period.
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            stop_mlflow_server(process)
        except ProcessLookupError:
            pass
        self._wait_port_free()

    def _wait_port_free(self, timeout: float = 10.0) -> None:
        # The uvicorn worker may outlive its parent for a moment; a restart needs the port.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def _log_tail(self, lines: int = 30) -> str:
        path = self.root / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_mlflow_server(tmp_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a real MLflow server with its store under `tmp_path`; stop it with
    `stop_mlflow_server(process)`.

    Returns:
        (tracking URI, server process).
    """
    server = MlflowServer(tmp_path)
    server.start()
    assert server.process is not None
    return server.uri, server.process


def stop_mlflow_server(process: subprocess.Popen[bytes]) -> None:
    """Stop a server started by `start_mlflow_server` (its whole process group)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
