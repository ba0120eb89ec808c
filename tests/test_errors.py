"""One error hierarchy: every kdsearch exception is a ``KdsearchError`` saying whose fault it is; ``fault_of`` sorts
any error (a library's too) into the user's, the infrastructure's or the trial's; one backoff policy on tenacity."""

from __future__ import annotations

import errno
import importlib
import inspect
import pkgutil
import sqlite3
from pathlib import Path

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from optuna.exceptions import StorageInternalError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError

import storage
from distill.data import DataError, SampleProblem
from distill.deploy import DeployError
from distill.hub_model import ExportError
from distill.train import MemberDiverged, TrainingDiverged
from kdsearch.errors import (
    Fault,
    InfrastructureError,
    KdsearchError,
    TrialError,
    TrialStopped,
    UserError,
    fault_of,
    is_transient,
)
from kdsearch.retry import backoff_delay
from search_space import MetricMismatch, SpecError, StudySpec
from service.api.errors import kdsearch_error
from service.settings import Settings
from storage import (
    ManifestRefused,
    NothingToRetryError,
    SchemaMismatch,
    StoreError,
    StudyBusyError,
    StudyExistsError,
    retry_operational,
)

PACKAGES = ("kdsearch", "storage", "distill", "search_space", "service")
SKIPPED_MODULES = ("storage.migrations",)  # Alembic's scripts: they run inside Alembic only

# Each class's fault, and the builtin base its callers catch it by.
EXPECTED: dict[type[BaseException], tuple[Fault, type[BaseException]]] = {
    DataError: (Fault.USER, ValueError),
    SampleProblem: (Fault.USER, ValueError),
    SpecError: (Fault.USER, ValueError),
    MetricMismatch: (Fault.USER, ValueError),
    StudyExistsError: (Fault.USER, ValueError),
    StudyBusyError: (Fault.USER, RuntimeError),
    NothingToRetryError: (Fault.USER, RuntimeError),
    ExportError: (Fault.USER, RuntimeError),
    ManifestRefused: (Fault.INFRASTRUCTURE, ValueError),
    SchemaMismatch: (Fault.INFRASTRUCTURE, RuntimeError),
    StoreError: (Fault.TRIAL, RuntimeError),
    DeployError: (Fault.TRIAL, RuntimeError),
    TrainingDiverged: (Fault.TRIAL, ArithmeticError),
    MemberDiverged: (Fault.TRIAL, ArithmeticError),
}


def exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of ``PACKAGES``, by dotted name."""
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        names = [package, *(info.name for info in pkgutil.walk_packages(root.__path__, f"{package}."))]
        for name in names:
            if name.startswith(SKIPPED_MODULES):
                continue
            module = importlib.import_module(name)
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                    found[f"{name}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_class_is_a_kdsearch_error() -> None:
    classes = exception_classes()
    assert {f"{cls.__module__}.{cls.__qualname__}" for cls in EXPECTED} <= set(classes), "the walk found them all"
    outside = {name for name, cls in classes.items() if not issubclass(cls, KdsearchError)}
    assert outside == set(), "every exception kdsearch raises says whose fault it is"


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_each_class_has_its_fault_and_keeps_its_builtin_base(cls: type[BaseException]) -> None:
    fault, builtin = EXPECTED[cls]
    assert issubclass(cls, KdsearchError) and cls.fault is fault
    assert issubclass(cls, builtin), "callers that catch the builtin still catch it"
    assert issubclass(cls, UserError) == (builtin is ValueError and fault is Fault.USER)


def test_user_errors_keep_their_field() -> None:
    spec = SpecError("dataset.path", "no such folder")
    assert (spec.field, spec.message, str(spec)) == ("dataset.path", "no such folder", "dataset.path: no such folder")
    sample = SampleProblem("dataset.text_column", "train.tsv: no column 'text'")
    assert sample.field == "dataset.text_column" and fault_of(sample) is Fault.USER


def _raised_from(cause: BaseException, exc: BaseException) -> BaseException:
    """``exc`` as ``raise exc from cause`` leaves it."""
    with pytest.raises(type(exc)) as raised:
        raise exc from cause
    return raised.value


def _validation_error() -> Exception:
    with pytest.raises(ValidationError) as raised:
        StudySpec.model_validate({})
    return raised.value


DROPPED = OperationalError("SELECT", {}, psycopg.OperationalError("server closed the connection unexpectedly"))
DUPLICATE = IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed: kd_studies.name"))
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("make", "fault"), [
    pytest.param(lambda: DataError("split 'train' has no column 'text'"), Fault.USER, id="DataError"),
    pytest.param(lambda: SpecError("teacher", "no such model"), Fault.USER, id="SpecError"),
    pytest.param(_validation_error, Fault.USER, id="pydantic-ValidationError"),
    pytest.param(lambda: ENOSPC, Fault.INFRASTRUCTURE, id="OSError-ENOSPC"),
    pytest.param(lambda: OSError(errno.EIO, "Input/output error"), Fault.INFRASTRUCTURE, id="OSError-EIO"),
    # safetensors (and torch) wrap the OSError in their own error, keeping only its text
    pytest.param(lambda: __import__("safetensors").SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
        Fault.INFRASTRUCTURE, id="SafetensorError-no-space"),
    pytest.param(lambda: DROPPED, Fault.INFRASTRUCTURE, id="OperationalError-dropped-connection"),
    pytest.param(lambda: _raised_from(DROPPED, StorageInternalError("An exception is raised during the commit.")),
                 Fault.INFRASTRUCTURE, id="StorageInternalError-from-dropped-connection"),
    pytest.param(lambda: DUPLICATE, Fault.TRIAL, id="IntegrityError"),
    pytest.param(lambda: OperationalError("SELECT", {}, sqlite3.OperationalError("no such column: attempts")),
                 Fault.TRIAL, id="OperationalError-missing-column"),
    pytest.param(lambda: RuntimeError("shape mismatch"), Fault.TRIAL, id="RuntimeError"),
    pytest.param(lambda: _raised_from(ENOSPC, RuntimeError("cannot save the checkpoint")), Fault.INFRASTRUCTURE,
                 id="RuntimeError-from-ENOSPC"),
    pytest.param(lambda: _raised_from(ENOSPC, DeployError("ONNX export failed")), Fault.INFRASTRUCTURE,
                 id="DeployError-from-ENOSPC"),
    pytest.param(lambda: _raised_from(ENOSPC, DataError("cannot read split 'train'")), Fault.INFRASTRUCTURE,
                 id="DataError-from-ENOSPC"),
    pytest.param(lambda: DeployError("verification failed"), Fault.TRIAL, id="DeployError"),
    pytest.param(lambda: StoreError("claiming a trial slot", DUPLICATE), Fault.TRIAL, id="StoreError"),
    pytest.param(lambda: SchemaMismatch("the database's kdsearch schema is at revision x"), Fault.INFRASTRUCTURE,
                 id="SchemaMismatch"),
    pytest.param(lambda: InfrastructureError("the bucket is gone"), Fault.INFRASTRUCTURE, id="InfrastructureError"),
    pytest.param(lambda: TrialError("loss diverged"), Fault.TRIAL, id="TrialError"),
])
def test_fault_of(make, fault: Fault) -> None:  # type: ignore[no-untyped-def]
    assert fault_of(make()) is fault


def test_fault_of_an_object_store_error() -> None:
    botocore = pytest.importorskip("botocore.exceptions")
    denied = botocore.ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                                  "PutObject")
    assert fault_of(denied) is Fault.INFRASTRUCTURE


def test_a_stopped_trial_is_not_a_study_or_infrastructure_fault() -> None:
    stopped = TrialStopped(TrialStopped.SHUTDOWN)
    assert isinstance(stopped, KdsearchError) and not isinstance(stopped, TrialError | UserError)
    assert stopped.reason == str(stopped) == "worker shutting down"
    # The worker tells a stop from a failure by its type, before it asks fault_of (which calls it the trial's).
    assert fault_of(stopped) is Fault.TRIAL
    assert fault_of(TrialStopped(TrialStopped.LOST_CLAIM)) is Fault.TRIAL


def test_backoff_delay_doubles_up_to_its_cap() -> None:
    assert [backoff_delay(0.5, n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(0.5, 6, max_delay_s=10.0) == 10.0
    assert backoff_delay(30.0, 20) == 300.0, "capped at five minutes by default"
    assert backoff_delay(2.0, 0) == 2.0, "no failure yet counts as the first"


def test_storage_keeps_exporting_is_transient() -> None:
    assert storage.is_transient is is_transient
    assert is_transient(DROPPED) and not is_transient(DUPLICATE)


class Flaky:
    """Fails with each of ``errors`` in turn, then returns 42."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 42


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr("storage._db._pause", waited.append)  # the wait, seen from inside (no public name)
    return waited


def test_retry_operational_retries_an_outage_then_succeeds(pauses: list[float]) -> None:
    flaky = Flaky(DROPPED, DROPPED, DROPPED)
    assert retry_operational(flaky, purpose="claiming a trial slot") == 42
    assert flaky.calls == 4 and pauses == [0.2, 0.4, 0.8], "exponential from 0.2 s"


def test_retry_operational_caps_its_delay_and_gives_up_with_the_outage(pauses: list[float]) -> None:
    flaky = Flaky(*[DROPPED] * 8)
    with pytest.raises(OperationalError) as raised:
        retry_operational(flaky, purpose="claiming a trial slot")
    assert raised.value is DROPPED and flaky.calls == 8
    assert pauses == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0], "capped at 10 s"


def test_retry_operational_raises_other_errors_at_once(pauses: list[float]) -> None:
    flaky = Flaky(DUPLICATE)
    with pytest.raises(StoreError, match=r"^creating a study: IntegrityError: UNIQUE constraint failed") as raised:
        retry_operational(flaky, purpose="creating a study")
    assert raised.value.__cause__ is DUPLICATE and raised.value.purpose == "creating a study"
    assert flaky.calls == 1 and pauses == []
    with pytest.raises(IntegrityError):
        retry_operational(Flaky(DUPLICATE))  # no purpose: the error itself
    with pytest.raises(ValueError, match="not a database error"):
        retry_operational(Flaky(ValueError("not a database error")), purpose="anything")
    assert pauses == []


def test_retry_operational_waits_on_an_event_not_time_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """libfaketime (the multi-host tests) makes ``time.sleep`` fail: the wait must not use it."""

    def no_sleep(seconds: float) -> None:
        raise AssertionError("time.sleep called")

    monkeypatch.setattr("time.sleep", no_sleep)
    flaky = Flaky(DROPPED)
    assert retry_operational(flaky, first_delay_s=0.01) == 42 and flaky.calls == 2


def _app_raising(exc: BaseException) -> TestClient:
    app = FastAPI()
    app.add_exception_handler(KdsearchError, kdsearch_error)

    @app.post("/boom")
    def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


def test_a_user_error_escaping_a_route_is_a_4xx_naming_the_field() -> None:
    answer = _app_raising(SpecError("dataset.path", "no such folder")).post("/boom")
    assert answer.status_code == 422
    assert answer.json() == {"detail": [{"type": "value_error", "loc": ["body", "dataset", "path"],
                                         "msg": "no such folder", "input": None}]}
    answer = _app_raising(SampleProblem("dataset.label_column", "train.tsv row 3: not a class id")).post("/boom")
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "dataset", "label_column"]
    answer = _app_raising(MetricMismatch("'mse' does not fit the teacher's task")).post("/boom")
    assert answer.status_code == 422 and answer.json() == {"detail": "'mse' does not fit the teacher's task"}
    answer = _app_raising(StudyBusyError("study 'x' is running: cancel it first")).post("/boom")
    assert answer.status_code == 409 and answer.json() == {"detail": "study 'x' is running: cancel it first"}


def test_other_kdsearch_errors_escaping_a_route_stay_server_errors() -> None:
    assert _app_raising(StoreError("listing studies", DUPLICATE)).post("/boom").status_code == 500
    assert _app_raising(_raised_from(ENOSPC, DataError("cannot read split"))).post("/boom").status_code == 500


def test_the_app_registers_the_handler(tmp_path: Path) -> None:
    from service.api import create_app

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", artifacts=tmp_path / "artifacts"))
    assert app.exception_handlers[KdsearchError] is kdsearch_error
