"""The deployment files, checked without a Docker engine; and the packaging names other tools rely on."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).parent.parent


def test_compose_wires_postgres_api_and_cpu_and_gpu_workers() -> None:
    """docker-compose.yml, read as YAML: no Docker engine or compose plugin runs on the test machines (its `docker`
    has no `compose` command and no daemon), so `docker compose config` and a real `up` are not run here."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "api", "worker-cpu", "worker-gpu"} <= set(services)
    assert "healthcheck" in services["postgres"] and "pgdata" in str(services["postgres"]["volumes"])
    # Secrets come from .env: compose refuses to start without them (${VAR:?message}), nothing is hard-coded.
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for name in ("api", "worker-cpu", "worker-gpu"):
        service = services[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        env = service["environment"]
        assert env["KDSEARCH_DATABASE_URL"].startswith("postgresql+psycopg://kdsearch:${POSTGRES_PASSWORD:?")
        assert "@postgres:5432/" in env["KDSEARCH_DATABASE_URL"]
        # The API binds 0.0.0.0 in its container: the token is required, never defaulted to empty.
        assert env["KDSEARCH_API_TOKEN"].startswith("${KDSEARCH_API_TOKEN:?")
        assert env["KDSEARCH_ARTIFACTS"] == "/artifacts" and env["KDSEARCH_ALLOWED_ROOTS"] == "/shared"
        # Data and models mounted read-only at /shared: from the image's /app, the examples' ../shared paths.
        assert "artifacts:/artifacts" in service["volumes"]
        assert "${KDSEARCH_SHARED:-../shared}:/shared:ro" in service["volumes"]
    assert services["api"]["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    # A CPU profile that comes up without the NVIDIA runtime, beside the GPU one.
    cpu, gpu = services["worker-cpu"], services["worker-gpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["command"] == ["worker", "--device", "cpu"] and "deploy" not in cpu
    assert gpu["profiles"] == ["gpu"] and gpu["command"][:3] == ["worker", "--gpus", "all"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in services["api"] and "profiles" not in services["postgres"]
    assert {"pgdata", "artifacts"} <= set(compose["volumes"])
    # Every variable compose interpolates is documented in .env.example, and .env itself is never committed.
    example = (ROOT / ".env.example").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "docker-compose.yml").read_text()))
    assert used and all(f"{name}=" in example for name in used), used
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_image_runs_as_an_unprivileged_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    last_user = max(i for i, line in enumerate(dockerfile) if line.startswith("USER "))
    assert not any(line.startswith("RUN ") for line in dockerfile[last_user:]), "nothing runs as root after USER"
    assert any("chown kdsearch:kdsearch /artifacts" in line for line in dockerfile)
    assert any(line.startswith("WORKDIR /app") for line in dockerfile)


def test_console_scripts_and_packages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "kdsearch"
    assert project["scripts"] == {"kdsearch": "service.cli:main", "export-best": "service.cli:export_best_main"}
    help_text = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("serve", "worker", "submit", "status", "export-best", "demo"):
        assert command in help_text


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, "-m", "service.cli", "submit", str(tmp_path / "none.json")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "spec.json").write_text('{"name": "x"}')
    unreachable = subprocess.run([sys.executable, "-m", "service.cli", "submit", str(tmp_path / "spec.json"),
                                  "--url", "http://127.0.0.1:9"], capture_output=True, text=True)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    sqlite3.connect(tmp_path / "empty.db").close()  # an empty database file (a missing one is refused as such)
    env_db = {"KDSEARCH_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}", "PATH": "/usr/bin:/bin"}
    no_study = subprocess.run([sys.executable, "-m", "service.cli", "export-best", "ghost", "--out",
                               str(tmp_path / "out")], capture_output=True, text=True, env=env_db)
    assert no_study.returncode == 1 and "no study 'ghost'" in no_study.stderr
