"""Several worker processes on one host: one per GPU (``--gpus``) or N on the CPU (``--procs``).

The supervisor starts ``kdsearch worker`` children, each with its own device or thread count, its own database
connections and its own heartbeat, and passes SIGTERM and SIGINT on (each child finishes its trial at the next
epoch boundary). A child killed by a signal the supervisor did not send (the OOM killer, a stray ``kill -9``) is
started again: its slot is retried by whichever worker reaps it, as for any dead worker. A child that exits on its
own (``--exit-when-idle``, ``--max-trials``, or an error it must not spin on, such as a schema mismatch) is not.
Children get SIGTERM if the supervisor itself dies (Linux), so none is left orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

log = logging.getLogger("kdsearch.worker")

WORKER_COMMAND = [sys.executable, "-m", "service.cli", "worker"]
MAX_RESTARTS_PER_CHILD = 5  # a child that keeps dying is given up on, not restarted in a tight loop
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass
class ChildSpec:
    """One worker process: its arguments after ``kdsearch worker`` and its environment additions."""

    args: list[str]
    env: dict[str, str]
    label: str  # for the log: "GPU 0", "CPU 1/2"


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once; a CPU affinity mask respected)."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    logical = psutil.cpu_count(logical=True) or physical
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return max(1, min(physical, allowed * physical // logical))


def cpu_layout(procs: str, threads_per_proc: str) -> tuple[int, int]:
    """(worker processes, torch threads each) for ``--procs`` and ``--threads-per-proc`` (numbers or ``auto``).

    ``auto``: one process per physical core with one thread each. bench/results/throughput-cpu.md measured two
    1-thread workers against one 2-thread worker on this project's 2-core machine; see the README for the figures.
    """
    cores = physical_cores()
    n = cores if procs == "auto" else int(procs)
    shared_out = 1 if procs == "auto" else max(1, cores // n)
    threads = shared_out if threads_per_proc == "auto" else int(threads_per_proc)
    if n < 1 or threads < 1:
        raise ValueError("--procs and --threads-per-proc must be at least 1")
    return n, threads


def cpu_children(n: int, threads: int, extra_args: list[str]) -> list[ChildSpec]:
    env = {"KDSEARCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [ChildSpec(["--device", "cpu", "--procs", "1", "--threads-per-proc", str(threads), *extra_args], env,
                      f"CPU {i + 1}/{n}") for i in range(n)]


def gpu_children(gpus: list[str], workers_per_gpu: int, extra_args: list[str]) -> list[ChildSpec]:
    """``workers_per_gpu`` processes per GPU, each seeing only its own device (several keep a GPU busy when one
    small student cannot: each trial is its own CUDA context)."""
    return [ChildSpec(["--device", "cuda", *extra_args], {"CUDA_VISIBLE_DEVICES": gpu}, f"GPU {gpu}")
            for gpu in gpus for _ in range(workers_per_gpu)]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Not Linux: children outlive a killed supervisor, and are reaped like any dead worker.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, children: list[ChildSpec]) -> None:
        self.specs = children
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = [0] * len(children)
        self.stopping = threading.Event()

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        spec = self.specs[index]
        proc = subprocess.Popen([*WORKER_COMMAND, *spec.args], env={**os.environ, **spec.env},
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.info("started worker pid %d (%s)", proc.pid, spec.label)
        return proc

    def forward(self, signum: int, _frame: Any = None) -> None:
        self.stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        self.procs = [self._start(i) for i in range(len(self.specs))]
        codes: dict[int, int] = {}
        while len(codes) < len(self.procs):
            for i, proc in enumerate(self.procs):
                if i in codes or (code := proc.poll()) is None:
                    continue
                killed = code < 0 and not self.stopping.is_set()
                if killed and self.restarts[i] < MAX_RESTARTS_PER_CHILD:
                    self.restarts[i] += 1
                    log.warning("worker pid %d (%s) was killed by signal %d; starting it again (restart %d of %d)",
                                proc.pid, self.specs[i].label, -code, self.restarts[i], MAX_RESTARTS_PER_CHILD)
                    self.procs[i] = self._start(i)
                    continue
                codes[i] = code
                if code:
                    log.warning("worker pid %d (%s) exited with %d", proc.pid, self.specs[i].label, code)
            self.stopping.wait(0.2)
        # A signal is a stop, not a failure; otherwise the worst exit status (2: refused to start, 1: stopped on an
        # error it must not spin on).
        return max((max(code, 0) for code in codes.values()), default=0)


def run_worker_processes(children: list[ChildSpec]) -> int:
    return Supervisor(children).run()

