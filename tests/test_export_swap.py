"""export-best --force builds the export in a fresh folder beside the target and swaps it in (issue 26, item 8): no
file of an earlier export is left behind, and no link in the target is written through."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from distill.hub_model import ExportError, write_export
from kdsearch.testing import tiny_spec
from service.api import create_app
from service.export_best import export_best
from service.settings import Settings
from service.worker import Worker


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_assets) -> Settings:  # type: ignore[no-untyped-def]
    """A finished two-trial study, "swap", in a SQLite store."""
    root = tmp_path_factory.mktemp("swap")
    settings = Settings(database_url=f"sqlite:///{root / 'db'}", artifacts=root / "artifacts")
    with TestClient(create_app(settings)) as client:
        spec = tiny_spec(tiny_assets, name="swap", n_trials=2, search_space={"num_train_epochs": 1, "batch_size": 32,
                                                                              "learning_rate": 5e-3})
        assert client.post("/api/studies", json=spec).status_code == 201
        Worker(settings, device="cpu", exit_when_idle=True).run()
        assert client.get("/api/studies/swap").json()["status"] == "finished"
    return settings


def _quiet(_: str) -> None:
    pass


def test_a_forced_export_leaves_nothing_of_the_earlier_one(finished: Settings, tmp_path: Path) -> None:
    out = tmp_path / "model"
    # force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
    export_best(finished, "swap", out, trial_number=0, force=True, log=_quiet)
    # The earlier export had an ONNX model (and a file of the user's); the new one has none.
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_bytes(b"an earlier trial's graph")
    (out / "notes.txt").write_text("mine")
    first = (out / "model.safetensors").read_bytes()
    export_best(finished, "swap", out, trial_number=1, force=True, log=_quiet)
    assert not (out / "onnx").exists() and not (out / "notes.txt").exists()
    assert (out / "model.safetensors").read_bytes() != first, "the new trial's weights"
    assert "ONNX" not in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no staging folder left beside it"


def test_links_in_the_target_are_never_written_through(finished: Settings, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "README.md").write_text("someone's readme")
    (elsewhere / "config.json").write_text('{"someone": "else"}')
    out = tmp_path / "model"
    out.mkdir()
    (out / "README.md").symlink_to(elsewhere / "README.md")
    (out / "config.json").symlink_to(elsewhere / "config.json")
    export_best(finished, "swap", out, force=True, log=_quiet)
    assert (elsewhere / "README.md").read_text() == "someone's readme"
    assert (elsewhere / "config.json").read_text() == '{"someone": "else"}'
    assert not (out / "README.md").is_symlink() and "swap" in (out / "README.md").read_text()
    assert not (out / "config.json").is_symlink() and '"hidden_size"' in (out / "config.json").read_text()


def test_a_target_that_is_a_link_is_refused(finished: Settings, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("theirs")
    link = tmp_path / "model"
    link.symlink_to(elsewhere, target_is_directory=True)
    for force in (False, True):
        with pytest.raises(ExportError, match="is a symbolic link"):
            export_best(finished, "swap", link, force=force, log=_quiet)
    assert [p.name for p in elsewhere.iterdir()] == ["config.json"]
    assert (elsewhere / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "model"]


def test_a_failed_export_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    out = write_export(checkpoint, tmp_path / "model", "first card")
    (checkpoint / "broken").symlink_to(tmp_path / "missing")  # copying it fails midway
    with pytest.raises(OSError):
        write_export(checkpoint, out, "second card", force=True)
    assert (out / "README.md").read_text() == "first card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model"], "the half-built folder is removed"


def test_exported_files_get_the_users_umask_not_the_checkpoints_private_mode(tmp_path: Path) -> None:
    """A checkpoint's files are private (0600, written as temporary files); the export's follow the umask (issue 27:
    the weights came out 0600 beside 0644 files)."""
    import os

    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "sub/extra.txt"):
        (checkpoint / name).write_text(name)
        (checkpoint / name).chmod(0o600)
    old_umask = os.umask(0o022)
    try:
        out = write_export(checkpoint, tmp_path / "export", "# card")
    finally:
        os.umask(old_umask)
    for name in ("model.safetensors", "config.json", "sub/extra.txt", "README.md"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
        assert (out / name).read_text() == ("# card" if name == "README.md" else name)


def test_a_killed_exports_leftovers_are_removed_by_the_next_export(tmp_path: Path) -> None:
    """An export killed before its swap leaves its staging folder (and maybe the earlier export renamed aside)
    beside the target; the next export to that target removes what a dead process left, never a live one's."""
    import os
    import subprocess
    import sys

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    target = tmp_path / "export"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    abandoned = [tmp_path / f".export.export-{dead_pid}-0123456789ab",
                 tmp_path / f".export.export-{dead_pid}-0123456789ab.earlier"]
    live = tmp_path / f".export.export-{os.getpid()}-ba9876543210"
    for folder in (*abandoned, live):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half written")
    write_export(checkpoint, target, "# card")
    assert not any(folder.exists() for folder in abandoned)
    assert live.is_dir(), "a live process's staging folder is not touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint", "export", live.name])
