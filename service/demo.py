"""``kdsearch demo``: the embedded default end to end, offline.

Starts the API and one worker as subprocesses on the configured database (SQLite by default), submits
``examples/sst2-demo.json``, shows progress, prints the best trial, exports it (Hugging Face, ONNX and int8, with
CPU latencies against the teacher) and prints the dashboard URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from distill.deploy import DeployError
from distill.hub_model import VARIANT_LABELS, ExportError
from kdsearch.testing.processes import free_port
from service.export_best import export_best
from service.preparation_progress import eta_text
from service.redaction import mask_database_url
from service.settings import get_settings


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the API server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the API server did not come up")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_demo(spec_path: Path, *, port: int = 0, keep_serving: bool | None = None) -> int:
    console = Console()
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        console.print(f"[red]kdsearch demo: cannot read {escape(str(spec_path))}: {escape(str(exc))}[/]")
        return 2
    spec["name"] = f"{spec['name']}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    settings = get_settings()
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    local = not settings.artifacts.startswith("s3://")
    logs = (Path(settings.artifacts) if local else settings.local_cache) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kd = [sys.executable, "-m", "service.cli"]
    with open(logs / "demo-api.log", "w") as api_log, open(logs / "demo-worker.log", "w") as worker_log:
        server = subprocess.Popen([*kd, "serve", "--port", str(port), "--log-level", "warning"], env=env,
                                  stdout=api_log, stderr=subprocess.STDOUT)
        worker: subprocess.Popen | None = None
        try:
            _wait_healthy(url, server)  # the server upgrades the schema first: a worker never does
            worker = subprocess.Popen([*kd, "worker", "--device", "auto"], env=env, stdout=worker_log,
                                      stderr=subprocess.STDOUT)
            console.print(f"database [bold]{escape(mask_database_url(settings.database_url))}[/], "
                          f"artifacts [bold]{escape(settings.artifacts)}[/]")
            console.print(f"dashboard: [link={url}/studies/{spec['name']}]{url}/studies/{spec['name']}[/]")
            response = httpx.post(f"{url}/api/studies", json=spec, timeout=120)
            if response.status_code != 201:
                console.print(f"[red]submit failed ({response.status_code}): {escape(response.text)}[/]")
                return 1
            study = _follow(console, url, spec["name"], worker)
            if study["status"] != "finished" or study["best_trial"] is None:
                console.print(f"[red]study ended {study['status']}: "
                              f"{escape(study.get('error') or 'no finished trial')}[/]")
                return 1
            _print_best(console, study)
            out = Path("demo-export") / spec["name"]
            try:  # ONNX and int8 beside the HF model, verified and timed against PyTorch and the teacher
                result = export_best(settings, spec["name"], out, onnx=True, quantize="int8",
                                     log=lambda line: console.print(f"[dim]{escape(line)}[/]"))
            except (ExportError, DeployError) as exc:
                console.print(f"[red]export failed: {escape(str(exc))}[/]")
                return 1
            console.print(f"exported the best student to [bold]{result.out_dir}[/] "
                          f"(try: transformers.pipeline('text-classification', model='{result.out_dir}'))")
            if result.deployment is not None:
                _print_latency(console, result.deployment)
            console.print(f"dashboard: {url}/studies/{spec['name']}  (worker log: {logs / 'demo-worker.log'})")
            if keep_serving if keep_serving is not None else sys.stdin.isatty():
                console.print("serving the dashboard; press Ctrl-C to stop")
                with contextlib.suppress(KeyboardInterrupt):
                    server.wait()
            else:
                console.print("run `kdsearch serve` to open the dashboard again")
            return 0
        finally:
            if worker is not None:
                _stop(worker)
            _stop(server)


def _describe(study: dict) -> str:
    """What the study is doing, as the API says: preparing (rows, rate, ETA), or its trials."""
    prep = study.get("preparing")
    if prep:
        eta = f", ETA {eta_text(prep['eta_s'])}" if prep.get("eta_s") is not None else ""
        return f"preparing {prep['stage'].replace('_', ' ')}: {prep['done']:,} / {prep['total']:,} rows{eta}"
    c = study["counts"]
    best = f" best {study['best_value']:.4f}" if study["best_value"] is not None else ""
    return f"running {c['running']} pruned {c['pruned']} failed {c['failed']}{best}"


def _follow(console: Console, url: str, name: str, worker: subprocess.Popen) -> dict:
    """Follow the study until it ends: a live bar in a terminal; elsewhere (a CI log, a pipe) a plain line whenever
    something changes, never a bar redrawn into a truncated line."""
    live = console.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[detail]}"), console=console, disable=not live)
    last_line = ""
    with progress:
        task = progress.add_task(f"study {name}", total=None, detail="waiting for the worker")
        while True:
            study = httpx.get(f"{url}/api/studies/{name}", timeout=30).json()
            detail = _describe(study)
            progress.update(task, total=study["n_trials"], completed=study["finished"], detail=detail)
            line = f"study {name}: {study['finished']}/{study['n_trials']} trials finished; {detail}"
            if not live and line != last_line:
                console.print(line, soft_wrap=True)
                last_line = line
            if study["status"] not in ("queued", "running"):
                return study
            if worker.poll() is not None:
                study["status"], study["error"] = "failed", f"the worker exited with code {worker.returncode}"
                return study
            time.sleep(1)


def _print_latency(console: Console, deployment: dict) -> None:
    """The three exported forms of the student, and the teacher: metric and CPU latency per sentence."""
    metric = deployment["metric"]
    table = Table(title=f"CPU latency per sentence ({deployment['threads']} thread(s); ONNX verified against "
                        f"PyTorch within atol {deployment['tolerance']['atol']:g})")
    for column in ("model", metric, "batch 1 (ms)", "batch 32 (ms)"):
        table.add_column(column)
    for name, v in deployment["variants"].items():
        table.add_row(VARIANT_LABELS[name], f"{v['metrics'][metric]:.4f}", f"{v['ms_batch1']:.2f}",
                      f"{v['ms_batch32']:.3f}")
    if deployment.get("teacher"):
        table.add_row("teacher (PyTorch)", "", f"{deployment['teacher']['ms_batch1']:.2f}",
                      f"{deployment['teacher']['ms_batch32']:.3f}")
    console.print(table)
    if deployment.get("int8_flagged"):
        console.print(f"[red]the int8 model scores {deployment['int8_drop_points']:.2f} points below fp32[/]")


def _print_best(console: Console, study: dict) -> None:
    best = study["best_trial"]
    metric = study.get("metric") or "score"
    table = Table(title=f"best trial #{best['number']}: eval {metric} {best['value']:.4f} (epoch {best['epoch']})")
    table.add_column("hyperparameter")
    table.add_column("value")
    for key, value in best["params"].items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    if study.get("teacher_metric") is not None:
        console.print(f"teacher eval {metric}: {study['teacher_metric']:.4f}")
