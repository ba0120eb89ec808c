"""Artifacts in an S3-compatible object store (``KDSEARCH_ARTIFACTS=s3://bucket/prefix``), for hosts that share a
database and a bucket but no file system.

- Checkpoints go through Optuna's ``Boto3ArtifactStore`` under ``<prefix>/optuna/``.
- Cache entries (teacher logits, transfer sets) live under ``<prefix>/cache/<key>/``: their files first, then a
  ``manifest.json`` with every file's size and SHA-256, written last: an entry without a manifest does not exist
  yet. Each host keeps a read-through copy under ``KDSEARCH_LOCAL_CACHE``: an entry is downloaded once per host,
  verified against the manifest into a temporary directory and renamed into place, so it is never read half
  written; one that fails verification (a truncated or corrupted object) is deleted from the bucket and rebuilt,
  never trained on.
- A manifest is data from the bucket, so it is checked before any name in it touches the disk: it must name exactly
  an entry's files (``ENTRY_FILES``, plain names: no path, no ``..``) for its own key, and each target must resolve
  inside the download folder. With ``KDSEARCH_ARTIFACT_KEY`` (a secret kept outside the bucket) writers sign the
  manifest (HMAC-SHA256 over its key and files) and readers refuse one unsigned or signed with another key: the
  checksums come from the bucket too, so only the signature proves a writer holding the key made the entry. A
  refused manifest is treated as a corrupt entry: logged, removed from the bucket and rebuilt.
- One process in the cluster builds an entry: the builder holds a PostgreSQL advisory lock on the key (on a
  connection of its own, released by the server if the builder dies); a local file lock also serialises the
  processes of one host.

Endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), as for any boto3 client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from optuna.artifacts import Boto3ArtifactStore
from pydantic import SecretStr
from sqlalchemy import Engine, text

from kdsearch.errors import Fault, KdsearchError
from storage._artifacts import ENTRY_FILES, ArtifactLayout

log = logging.getLogger("kdsearch.artifacts")
MANIFEST = "manifest.json"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix``)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"KDSEARCH_ARTIFACTS {url!r}: no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def s3_client() -> Any:
    try:
        import boto3
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("KDSEARCH_ARTIFACTS is an s3:// URL: install boto3 (pip install 'kdsearch[s3]')") from exc
    return boto3.client("s3")


class PrefixedArtifactStore:
    """An Optuna artifact store keeping its objects under a key prefix of a shared bucket."""

    def __init__(self, inner: Boto3ArtifactStore, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix.strip("/")

    def _key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.inner.open_reader(self._key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.inner.write(self._key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(self._key(artifact_id))


def file_digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


class ManifestRefused(KdsearchError, ValueError):
    """A manifest that must not be acted on: malformed, naming files an entry never has, or not signed by us.

    ``Fault.INFRASTRUCTURE``: the artifact store holds a damaged or foreign entry (the user's spec and the trial
    are not to blame); the reader removes it and the entry is built again, never charging a trial for it."""

    fault = Fault.INFRASTRUCTURE


def _manifest_signature(signing_key: bytes, key: str, files: dict[str, Any]) -> str:
    """HMAC-SHA256 of an entry's key and files (canonical JSON), so a manifest cannot be moved to another key."""
    payload = json.dumps({"key": key, "files": files}, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(signing_key, payload, hashlib.sha256).hexdigest()


def sign_manifest(key: str, files: dict[str, Any], signing_key: bytes | None) -> dict[str, Any]:
    """The manifest of entry ``key``: its files, and their signature when a signing key is set."""
    manifest: dict[str, Any] = {"key": key, "files": files}
    if signing_key is not None:
        manifest["signature"] = _manifest_signature(signing_key, key, files)
    return manifest


def checked_files(manifest: Any, key: str, directory: Path, signing_key: bytes | None) -> dict[str, dict[str, Any]]:
    """The files a manifest of entry ``key`` lists, once it is known safe to write them under ``directory``: exactly
    an entry's files (``ENTRY_FILES``), each with a size and a SHA-256, each resolving to a file directly inside
    ``directory``; signed with ``signing_key`` when one is set. Else ``ManifestRefused`` saying why (never quoting
    more of the manifest than a name)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestRefused("not a manifest (no files mapping)")
    if manifest.get("key") != key:
        raise ManifestRefused("it is the manifest of another entry")
    files: dict[str, Any] = manifest["files"]
    unexpected = sorted(str(name) for name in files if name not in ENTRY_FILES)
    if unexpected:  # named in the log: a few, shortened (the manifest is anyone's with write access to the bucket)
        shown = ", ".join(repr(name[:80]) for name in unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise ManifestRefused(f"it names {len(unexpected)} file(s) a cache entry never has: {shown}")
    if set(files) != ENTRY_FILES:
        raise ManifestRefused(f"it lacks {sorted(ENTRY_FILES - set(files))!r}")
    root = directory.resolve()
    for name, meta in files.items():
        if (root / name).resolve().parent != root:
            raise ManifestRefused(f"{name!r} resolves outside the entry's folder")
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            raise ManifestRefused(f"{name!r} has no size and SHA-256")
    if signing_key is not None:
        signature = manifest.get("signature")
        if not isinstance(signature, str):
            raise ManifestRefused("it is not signed, and KDSEARCH_ARTIFACT_KEY is set")
        if not hmac.compare_digest(signature, _manifest_signature(signing_key, key, files)):
            raise ManifestRefused("its signature does not match KDSEARCH_ARTIFACT_KEY")
    return files


class RemoteCache:
    """Cache entries in the bucket, with a verified local read-through copy on this host. ``signing_key``: sign
    the manifests written, and refuse any read that is not signed with it."""

    def __init__(self, client: Any, bucket: str, prefix: str, local_root: Path,
                 signing_key: bytes | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.local_root = local_root
        self.signing_key = signing_key

    def _key(self, key: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, "cache", key, name) if p)

    def manifest(self, key: str) -> Any:
        """The parsed manifest object of entry ``key`` as the bucket holds it (unchecked), or None when absent."""
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key, MANIFEST))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        try:
            return json.loads(body)
        except ValueError:
            return {}  # not JSON: refused as malformed by checked_files

    def download(self, key: str, directory: Path) -> bool:
        """Download and verify entry ``key`` into ``directory`` (absent: created); False when the bucket has no
        complete entry, or one that fails verification (then removed from the bucket, to be rebuilt)."""
        manifest = self.manifest(key)
        if manifest is None:
            return False
        tmp = directory.with_name(f".{directory.name}.download-{os.getpid()}")
        try:
            files = checked_files(manifest, key, tmp, self.signing_key)
        except ManifestRefused as exc:
            log.warning("cache entry %s: refusing its manifest (%s): removing it from the bucket, it will be rebuilt",
                        key, exc)
            self.remove(key)
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, expected in files.items():
                target = tmp / name
                self.client.download_file(self.bucket, self._key(key, name), str(target))
                got = file_digest(target)
                if got != expected:
                    log.warning("cache entry %s: %s is %s, the manifest says %s: removing it from the bucket, it "
                                "will be rebuilt", key, name, got, expected)
                    self.remove(key)
                    return False
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            shutil.rmtree(directory, ignore_errors=True)
            tmp.rename(directory)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def upload(self, key: str, directory: Path) -> None:
        """Upload every file of ``directory``, then the manifest (the entry exists once the manifest does)."""
        files = {item.name: file_digest(item) for item in sorted(directory.iterdir())
                 if item.is_file() and item.name != MANIFEST}
        if set(files) != ENTRY_FILES:  # a reader would refuse the entry: fail the build here, not every reader
            raise ValueError(f"cache entry {key}: holds {sorted(files)}, an entry is exactly {sorted(ENTRY_FILES)}")
        for name in files:
            self.client.upload_file(str(directory / name), self.bucket, self._key(key, name))
        manifest = sign_manifest(key, files, self.signing_key)
        (directory / MANIFEST).write_text(json.dumps(manifest))
        self.client.put_object(Bucket=self.bucket, Key=self._key(key, MANIFEST), Body=json.dumps(manifest).encode())

    def remove(self, key: str) -> None:
        """Forget an entry: its manifest first, so no reader ever trusts the files left behind."""
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key, MANIFEST))


def _lock_id(key: str) -> int:
    """A signed 64-bit advisory-lock id for a cache key."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


@contextmanager
def cluster_lock(db: Engine | None, key: str) -> Iterator[None]:
    """Hold the cluster-wide build lock of ``key`` (PostgreSQL advisory lock on a connection of its own, released
    by the server if this process dies); on SQLite (one host) or without a database, nothing to take."""
    if db is None or db.dialect.name != "postgresql":
        yield
        return
    with db.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _lock_id(key)})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _lock_id(key)})


def _locally_complete(directory: Path, key: str, signing_key: bytes | None) -> bool:
    """A local copy is usable when its manifest is there, passes ``checked_files``, and every file has the
    manifest's size (a copy is only ever renamed into place whole; the size check catches one damaged on disk
    since). A refused local manifest is logged and the entry downloaded again."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        files = checked_files(json.loads(manifest_path.read_text()), key, directory, signing_key)
    except ValueError as exc:  # ManifestRefused, or not JSON
        log.warning("cache entry %s: refusing the local copy's manifest (%s): downloading the entry again", key, exc)
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size == meta["size"]
               for name, meta in files.items())


class ObjectStoreLayout(ArtifactLayout):
    """Artifacts in an S3-compatible bucket (``s3://bucket/prefix``), cache entries read through a local copy under
    ``local_cache``, built once in the cluster under a database lock."""

    def __init__(self, url: str, local_cache: Path, db: Engine | None = None, client: Any = None,
                 signing_key: SecretStr | None = None) -> None:
        bucket, prefix = parse_s3_url(url)
        super().__init__(Path(local_cache) / bucket / (prefix or "_"))
        self.url = url
        self.db = db
        self.client = client or s3_client()
        self.checkpoints = PrefixedArtifactStore(Boto3ArtifactStore(bucket, self.client),
                                                 "/".join(p for p in (prefix, "optuna") if p))
        self.signing_key = signing_key.get_secret_value().encode() if signing_key else None
        self.remote = RemoteCache(self.client, bucket, prefix, self.cache_root, self.signing_key)

    def fetch_entry(self, key: str) -> Path | None:
        directory = self.cache_dir(key)
        if _locally_complete(directory, key, self.signing_key):
            return directory
        # One download per host at a time (its own lock: the builder calls this while holding the build lock).
        with self.locked(f"{key}.download"):
            if _locally_complete(directory, key, self.signing_key) or self.remote.download(key, directory):
                return directory
        return None

    def publish_entry(self, key: str, built: Path) -> Path:
        self.remote.upload(key, built)  # files, then the manifest: the entry exists for every host from here
        return super().publish_entry(key, built)

    @contextmanager
    def build_lock(self, key: str) -> Iterator[None]:
        with super().build_lock(key), cluster_lock(self.db, key):
            yield


def default_local_cache() -> Path:
    """``$XDG_CACHE_HOME/kdsearch`` (``~/.cache/kdsearch``): where a host keeps copies of remote cache entries."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdsearch"


def make_layout(artifacts: str | Path, local_cache: Path | None = None, db: Engine | None = None,
                signing_key: SecretStr | None = None) -> ArtifactLayout:
    """The artifact layout for ``KDSEARCH_ARTIFACTS``: a directory, or ``s3://bucket/prefix`` (then ``db``, the
    shared database, holds the cluster-wide build locks, and ``signing_key``, ``KDSEARCH_ARTIFACT_KEY``, signs and
    checks the cache manifests)."""
    if str(artifacts).startswith("s3://"):
        return ObjectStoreLayout(str(artifacts), local_cache or default_local_cache(), db, signing_key=signing_key)
    return ArtifactLayout(artifacts)
