"""The deployment files, checked without a Docker engine; and the packaging names other tools rely on."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).parent.parent


def test_compose_wires_postgres_api_and_gpu_workers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "api", "worker"} <= set(services)
    assert "healthcheck" in services["postgres"] and "pgdata" in str(services["postgres"]["volumes"])
    for name in ("api", "worker"):
        service = services[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        env = service["environment"]
        assert env["KDSEARCH_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:5432/" in \
            env["KDSEARCH_DATABASE_URL"]
        assert env["KDSEARCH_ARTIFACTS"] == "/artifacts"
        assert "artifacts:/artifacts" in service["volumes"]
    assert services["worker"]["command"][:3] == ["worker", "--gpus", "all"]
    device = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert {"pgdata", "artifacts"} <= set(compose["volumes"])


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
