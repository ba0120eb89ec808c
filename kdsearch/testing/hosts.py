"""What makes several "hosts" on one machine, for the scale-out tests and the soak and fault benches: an
S3-compatible server as a real process (moto's server mode, from PyPI), and clocks that disagree (libfaketime, from
Debian's ``faketime`` package, preloaded into a worker process: its Python, Optuna and SQLAlchemy all see the shifted
time)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from kdsearch.testing.processes import free_port

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


def skewed_clock(seconds: int) -> dict[str, str]:
    """Environment for a process whose clock runs ``seconds`` ahead (or behind, when negative) of the real one."""
    if not LIBFAKETIME.exists():
        raise RuntimeError(f"{LIBFAKETIME} is missing: apt-get install faketime (make test installs it as root)")
    # Only the wall clock disagrees between hosts; the monotonic clock stays real, as timed waits (a heartbeat's
    # Event.wait) measure against it.
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{seconds:+d}s", "FAKETIME_DONT_RESET": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@contextmanager
def s3_server(bucket: str, log: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on a loopback port with ``bucket`` created; yields the AWS environment that points boto3
    (in every kdsearch process) at it."""
    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "kdsearch-test",
           "AWS_SECRET_ACCESS_KEY": "kdsearch-test", "AWS_DEFAULT_REGION": "us-east-1"}
    server_bin = Path(sys.executable).with_name("moto_server")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(server_bin), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(env["AWS_ENDPOINT_URL"], timeout=1)
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                    time.sleep(0.2)
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # this test process's boto3 clients too
            try:
                import boto3

                boto3.client("s3").create_bucket(Bucket=bucket)
                yield env
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        finally:
            proc.terminate()
            proc.wait(timeout=30)
