"""export-best: find the study's best trial in the store, fetch its checkpoint, write the model directory."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from sqlalchemy import inspect

from distill.engine import TRIAL_RECORD
from distill.export import ExportError, model_card, write_export
from service.settings import Settings
from storage import ArtifactLayout, get_study, make_engine, make_optuna_storage, session_scope, unpack_directory


@dataclass
class ExportResult:
    out_dir: Path
    trial_number: int
    accuracy: float


def export_best(settings: Settings, study: str, out_dir: Path, *, force: bool = False) -> ExportResult:
    """The best COMPLETE trial (best PRUNED one if none completed) is written out; nothing is retrained."""
    db = make_engine(settings.database_url)
    try:
        if not inspect(db).has_table("kd_studies"):
            raise ExportError(f"no study {study!r}: {db.url.render_as_string()} holds no kdsearch studies")
        with session_scope(db) as session:
            row = get_study(session, study)
            if row is None:
                raise ExportError(f"no study {study!r} in {settings.database_url}")
            name, spec = row.name, dict(row.spec)
    finally:
        db.dispose()
    storage = make_optuna_storage(settings.database_url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        candidates = [t for t in trials if t.value is not None and "checkpoint_artifact_id" in t.user_attrs]
        complete = [t for t in candidates if t.state == TrialState.COMPLETE]
        if not candidates:
            raise ExportError(f"study {name!r} has no finished trial with a checkpoint yet")
        best = max(complete or candidates, key=lambda t: t.value)  # type: ignore[arg-type,return-value]
        layout = ArtifactLayout(settings.artifacts)
        with tempfile.TemporaryDirectory(prefix="kdsearch-export-") as tmp:
            tar_path = Path(tmp) / "checkpoint.tar"
            optuna.artifacts.download_artifact(artifact_store=layout.checkpoints, file_path=str(tar_path),
                                               artifact_id=best.user_attrs["checkpoint_artifact_id"])
            checkpoint = Path(tmp) / "checkpoint"
            unpack_directory(tar_path, checkpoint)
            record = json.loads((checkpoint / TRIAL_RECORD).read_text())
            card = model_card(name=Path(out_dir).resolve().name, spec=spec, record=record, trial_number=best.number,
                              n_trials_run=len(trials), study_name=name)
            write_export(checkpoint, Path(out_dir), card, force=force)
        return ExportResult(Path(out_dir), best.number, float(record["eval_accuracy"]))
    finally:
        storage.engine.dispose()
