"""Real processes for tests and benches: the API under uvicorn and ``kdsearch worker`` subprocesses on a loopback
port, started as commands (``KDSEARCH``), so nothing here imports the service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

KDSEARCH = [sys.executable, "-m", "service.cli"]
# The repository root: the processes' working directory, so ``service.cli`` and the test engines import from it.
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """An API server and any number of workers sharing one database and artifacts directory."""

    def __init__(self, db_url: str, root: Path, **env: str) -> None:
        # The stack's own folder (where its datasets and models are written) is an allowed root, beside the caller's
        # (or the default's: the processes' working directory, ROOT, and ../shared); ``env`` may say otherwise.
        given = os.environ.get("KDSEARCH_ALLOWED_ROOTS", "").split(os.pathsep)
        allowed = [*filter(None, given)] or [str(ROOT), str(ROOT.parent / "shared")]
        allowed.append(str(root.resolve()))
        self.env = {**os.environ, "KDSEARCH_DATABASE_URL": db_url, "KDSEARCH_ARTIFACTS": str(root / "artifacts"),
                    "KDSEARCH_POLL_INTERVAL": "0.2", "HF_HUB_OFFLINE": "1",
                    "KDSEARCH_ALLOWED_ROOTS": os.pathsep.join(allowed), **env}
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.root / log, "a")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([*KDSEARCH, *args], env={**self.env, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)

    def start_api(self) -> subprocess.Popen:
        self.api = self._spawn(["serve", "--port", str(self.port), "--log-level", "warning"], "api.log")
        for _ in range(300):
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    return self.api
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("API did not start: " + self.log("api.log"))

    def start_worker(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """A worker process; ``env`` adds to (or overrides) the stack's environment, e.g. another host's. One
        process unless ``args`` says ``--procs N`` (the last one given wins), so a test can signal the worker."""
        index = len(self.workers)
        worker = self._spawn(["worker", "--device", "cpu", "--procs", "1", *args], f"worker-{index}.log", env)
        self.workers.append(worker)
        return worker

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text() if path.exists() else ""

    def worker_logs(self) -> str:
        return "\n".join(self.log(f"worker-{i}.log") for i in range(len(self.workers)))

    def submit(self, spec: dict) -> dict:
        response = httpx.post(f"{self.url}/api/studies", json=spec, timeout=60)
        assert response.status_code == 201, response.text
        return response.json()

    def study(self, name: str) -> dict:
        return httpx.get(f"{self.url}/api/studies/{name}", timeout=30).json()

    def trials(self, name: str) -> list[dict]:
        return httpx.get(f"{self.url}/api/studies/{name}/trials", timeout=30).json()["trials"]

    def wait_for(self, predicate: Callable[[], object], timeout_s: float = 240, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; worker logs:\n{self.worker_logs()[-6000:]}")

    def wait_status(self, name: str, statuses: tuple[str, ...] = ("finished", "failed", "cancelled"),
                    timeout_s: float = 240) -> dict:
        self.wait_for(lambda: self.study(name)["status"] in statuses, timeout_s, f"study {name} to end")
        return self.study(name)

    def stop(self) -> None:
        procs = [p for p in [*self.workers, self.api] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

