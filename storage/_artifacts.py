"""Where files live: trial checkpoints through Optuna's artifact store, and per-study data caches.

Checkpoints are directories (``save_pretrained`` output) packed as one tar file, because an Optuna artifact is one
file. Every write goes to a temporary name first and is renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts._protocol import ArtifactStore
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from storage._db import retry_operational

# The files of a cache entry (``distill.cache.build_once``): its tensors and its meta. No other name is ever written
# into an entry, so no other name is accepted from a manifest that names an entry's files.
ENTRY_TENSORS = "data.safetensors"
ENTRY_META = "meta.json"
ENTRY_FILES = frozenset({ENTRY_TENSORS, ENTRY_META})


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system store, writing to a temporary file and renaming it into place."""

    def __init__(self, base_path: str | Path) -> None:
        Path(base_path).mkdir(parents=True, exist_ok=True)
        super().__init__(base_path)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        target = self._get_filepath(artifact_id)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(content_body, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class ArtifactLayout:
    """The artifacts root: ``optuna/`` (checkpoints) and ``cache/<key>/`` (tokenized data and teacher logits).

    Cache entries are built once (``distill.cache.build_once``): ``fetch_entry`` finds a complete entry, else the
    builder takes ``build_lock``, looks again, builds into a temporary directory and ``publish_entry`` renames it
    into place. Here (a local or shared directory): a file lock across this host's processes; an entry is complete
    once its directory exists (it is renamed into place whole). ``ObjectStoreLayout`` keeps entries in a bucket.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.checkpoints: ArtifactStore = AtomicFileSystemArtifactStore(self.root / "optuna")
        self.cache_root = self.root / "cache"

    def cache_dir(self, key: str) -> Path:
        return self.cache_root / key

    def fetch_entry(self, key: str) -> Path | None:
        """The directory of a complete cache entry, or None."""
        directory = self.cache_dir(key)
        return directory if (directory / ENTRY_META).is_file() else None

    def publish_entry(self, key: str, built: Path) -> Path:
        """Move a complete entry built in ``built`` (a sibling temporary directory) into place."""
        directory = self.cache_dir(key)
        shutil.rmtree(directory, ignore_errors=True)
        built.rename(directory)
        return directory

    def scratch_dir(self, key: str) -> Path:
        """An empty directory to build entry ``key`` in, on the same file system as the entry."""
        tmp = self.cache_root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    @contextmanager
    def build_lock(self, key: str) -> Iterator[None]:
        """Exclusive lock on one cache entry across this host's processes: one builds, the others wait."""
        with self.locked(key):
            yield

    def store_checkpoint(self, directory: Path, study_or_trial: optuna.Study | optuna.Trial | FrozenTrial,
                         storage: BaseStorage | None = None) -> str:
        """Pack a checkpoint directory into one tar and upload it as an Optuna artifact; returns its id."""
        with tempfile.TemporaryDirectory(prefix="kdsearch-pack-") as tmp:
            tar_path = Path(tmp) / "checkpoint.tar"
            pack_directory(directory, tar_path)
            return retry_operational(lambda: optuna.artifacts.upload_artifact(
                artifact_store=self.checkpoints, file_path=str(tar_path), study_or_trial=study_or_trial,
                storage=storage, mimetype="application/x-tar"))

    @contextmanager
    def locked(self, key: str) -> Iterator[Path]:
        """Exclusive lock on one cache entry across processes on this host: one builds, the others wait."""
        self.cache_root.mkdir(parents=True, exist_ok=True)
        with open(self.cache_root / f"{key}.lock", "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield self.cache_dir(key)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def pack_directory(directory: Path, tar_path: Path) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for item in sorted(directory.iterdir()):
            tar.add(item, arcname=item.name)


def unpack_directory(tar_path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "r") as tar:
        tar.extractall(directory, filter="data")
