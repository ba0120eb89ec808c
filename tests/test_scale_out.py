"""Scale-out for real: three worker "hosts" that share nothing but PostgreSQL and an S3 bucket (moto's server as a
real process), each with its own local cache directory; one host's clock runs 120 s ahead and one 120 s behind
(libfaketime preloaded into the worker process, see kdsearch/testing/hosts.py)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import optuna
import pytest

from kdsearch.testing import KDSEARCH, ROOT, Stack, s3_server, skewed_clock, tiny_spec

pytestmark = pytest.mark.postgres
BUCKET = "kdsearch-scale-out"
PREFIX = "cluster-a"


@pytest.fixture
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Stack, dict[str, str]]]:
    with s3_server(BUCKET, tmp_path / "moto.log") as aws:
        stack = Stack(postgres_url, tmp_path, KDSEARCH_ARTIFACTS=f"s3://{BUCKET}/{PREFIX}",
                      KDSEARCH_LOCAL_CACHE=str(tmp_path / "api-cache"), KDSEARCH_HEARTBEAT_INTERVAL="1",
                      # 12 s: three workers, the API, PostgreSQL and moto on 2 cores can starve a heartbeat for
                      # several seconds; the hosts' 120 s skews still dwarf it, so a clock mix-up still shows.
                      KDSEARCH_GRACE_PERIOD="12", KDSEARCH_POLL_INTERVAL="0.2",
                      # Every host signs and checks the cache manifests (KDSEARCH_ARTIFACT_KEY, kept out of the bucket).
                      KDSEARCH_ARTIFACT_KEY="cluster-a-signing-key", **aws)
        stack.start_api()
        try:
            yield stack, aws
        finally:
            stack.stop()


def host(tmp_path: Path, name: str, skew_s: int = 0) -> dict[str, str]:
    env = {"KDSEARCH_LOCAL_CACHE": str(tmp_path / f"host-{name}" / "cache")}
    return {**env, **(skewed_clock(skew_s) if skew_s else {})}


def _objects(prefix: str) -> list[str]:
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def test_three_hosts_skewed_clocks_and_a_bucket(cluster, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, aws = cluster
    n_trials = 8
    stack.submit(tiny_spec(tiny_assets, name="cluster", n_trials=n_trials,
                           search_space={"num_train_epochs": 25, "batch_size": 16, "learning_rate": 3e-3}))
    hosts = {"a": 0, "ahead": 120, "behind": -120}
    for name, skew in hosts.items():
        stack.start_worker(env=host(tmp_path, name, skew))

    # One worker is killed mid-trial: its trial must be retried elsewhere, and only that one reaped.
    stack.wait_for(lambda: stack.study("cluster")["counts"]["running"] >= 2, 180, "trials to run")
    victim = stack.workers[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    study = stack.wait_status("cluster", timeout_s=600)
    assert study["status"] == "finished", study
    assert study["finished"] == n_trials and study["counts"]["complete"] + study["counts"]["pruned"] == n_trials

    trials = stack.trials("cluster")
    stale = [t for t in trials if t["state"] == "FAIL"]
    # Only the killed worker's trial was reaped: the skewed hosts' healthy trials never looked stale.
    assert len(stale) <= 1 and all(t["fail_reason"] == "stale heartbeat" for t in stale), [
        (t["number"], t["worker"], t["fail_reason"]) for t in stale]
    workers_done = {t["worker"].split(":")[1] for t in trials if t["state"] in ("COMPLETE", "PRUNED")}
    assert len(workers_done) >= 2  # the survivors, skewed clocks included, shared the work
    logs = stack.worker_logs()
    assert logs.count("building teacher-logit cache") == 1  # once in the cluster, not once per host
    assert "slot taken over" not in logs and "was taken over" not in logs

    # Caches and checkpoints live in the bucket; each host keeps its own verified copy of the cache entry.
    keys = _objects(PREFIX)
    assert any(k.startswith(f"{PREFIX}/cache/") and k.endswith("manifest.json") for k in keys)
    assert sum(k.startswith(f"{PREFIX}/optuna/") for k in keys) >= n_trials
    copies = [p for p in (tmp_path / "host-ahead").rglob("manifest.json")] + [
        p for p in (tmp_path / "host-behind").rglob("manifest.json")]
    assert copies, "the surviving hosts read the entry through their own local cache"

    # export-best from a fourth directory with nothing local: the checkpoint comes from the bucket.
    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    out = elsewhere / "best"
    env = {**stack.env, **aws, "KDSEARCH_LOCAL_CACHE": str(elsewhere / "cache")}
    # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
    done = subprocess.run([*KDSEARCH, "export-best", "cluster", "--out", str(out), "--force"], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    from transformers import pipeline

    with open(Path(tiny_assets["data"]) / "validation.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    predictions = pipeline("text-classification", model=str(out), device="cpu")([r["sentence"] for r in rows])
    accuracy = sum(p["label"] == ("positive" if r["label"] == "1" else "negative")
                   for p, r in zip(predictions, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(study["best_trial"]["value"], abs=1 / len(rows) + 1e-9)

    # Every stamp the queue compares came from the database's clock, whatever the hosts' clocks said.
    plain = optuna.load_study(study_name="cluster", storage=stack.env["KDSEARCH_DATABASE_URL"])
    assert len([t for t in plain.trials if t.state.is_finished()]) == n_trials + len(stale)


def test_a_corrupted_cache_object_is_rebuilt(cluster, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, _ = cluster
    spec = tiny_spec(tiny_assets, name="first", n_trials=1, search_space={"num_train_epochs": 1})
    stack.submit(spec)
    stack.start_worker("--exit-when-idle", env=host(tmp_path, "one"))
    assert stack.wait_status("first")["status"] == "finished"
    data_key = next(k for k in _objects(f"{PREFIX}/cache/") if k.endswith("data.safetensors"))
    s3 = boto3.client("s3")
    whole = s3.get_object(Bucket=BUCKET, Key=data_key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=data_key, Body=whole[: len(whole) // 2])  # truncated, manifest unchanged

    # A host with an empty local cache downloads the entry, finds the checksum wrong, rebuilds it.
    stack.submit({**spec, "name": "second", "seed": 7})
    stack.start_worker("--exit-when-idle", env=host(tmp_path, "two"))
    assert stack.wait_status("second")["status"] == "finished"
    log = stack.log("worker-1.log")
    assert "the manifest says" in log and "building teacher-logit cache" in log
    rebuilt = s3.get_object(Bucket=BUCKET, Key=data_key)["Body"].read()
    assert len(rebuilt) == len(whole)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=data_key.replace("data.safetensors", "manifest.json"))[
        "Body"].read())
    assert manifest["files"]["data.safetensors"]["size"] == len(rebuilt)
    assert isinstance(manifest["signature"], str)  # signed with KDSEARCH_ARTIFACT_KEY, through the settings
    # The first host's own verified copy never changed: it was complete when it was made.
    assert any((tmp_path / "host-one").rglob("data.safetensors"))
    assert httpx.get(f"{stack.url}/api/studies/second").json()["counts"]["complete"] == 1
