"""Student quality on full SST-2: fine-tuning alone, KD, and KD with a teacher-labelled transfer set, per student
initialisation, each cell over several seeds.

    python bench/quality.py                          # every cell, 3 seeds; resumes from bench/results/quality.json
    python bench/quality.py --cells fresh-kd,pca-aug5 --seeds 3
    python bench/quality.py --report                 # re-render bench/results/quality.md from the JSON
    python bench/quality.py --list                   # the cells, in the order they run

Every run goes through ``DistillationEngine`` (the code a worker runs) on the shared teacher's cached logits; the
transfer sets are built by the engine too (``augment`` in the study spec). Each finished run is appended to
``bench/results/quality.json`` with the device it ran on, so an interrupted bench resumes where it stopped and rows
from a GPU machine and from this CPU can sit in one table, each labelled. Accuracy is the trial's score: the best
epoch on the validation split, as the seed's card reports it (the last epoch's is kept in the JSON too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import machine_name, mean_std, merge_results, per_row_ms  # noqa: E402 - after the path

SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
RESULTS_JSON = RESULTS / "quality.json"
CACHE = ROOT / "bench" / ".cache"  # teacher logits and transfer sets, kept between runs (git-ignored)

TINY = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
# The student initialisations compared. fresh and pca have BERT-Tiny's shape (4.4M parameters).
STUDENTS: dict[str, dict[str, Any]] = {
    "fresh": {"config": TINY},
    "pca": {"config": TINY, "embedding_init": "teacher_pca"},
    "trunc2": {"truncate_teacher": {"num_layers": 2}},
}
STUDENT_LABELS = {
    "fresh": "L2-H128 fresh (random init)",
    "pca": "L2-H128, embeddings = teacher PCA",
    "trunc2": "2 teacher layers (truncate_teacher)",
}
# KD hyperparameters: for the 128-wide students those of the seed's 50-trial search (lr 7.2e-4; T 4, alpha 0.5 as in
# bench/trial_speed.py). The 384-wide truncated student starts from the fine-tuned teacher, so it takes a
# fine-tuning learning rate. Batch 128, linear decay, no warm-up, as in every kdsearch trial.
KD_PARAMS = {
    "fresh": {"learning_rate": 7.2e-4, "temperature": 4.0, "alpha": 0.5},
    "pca": {"learning_rate": 7.2e-4, "temperature": 4.0, "alpha": 0.5},
    "trunc2": {"learning_rate": 1e-4, "temperature": 4.0, "alpha": 0.5},
}
CONDITIONS = {
    "ft": "fine-tuning alone (alpha = 1)",
    "kd": "KD",
    "aug5": "KD + transfer set, 5 copies",
    "aug20": "KD + transfer set, 20 copies",
}
# Run order: cheapest and most informative first, so a bench cut short still answers the main questions.
CELL_ORDER = ["fresh-ft", "fresh-kd", "pca-ft", "pca-kd", "pca-aug5", "trunc2-kd", "trunc2-ft", "fresh-aug5",
              "trunc2-aug5", "pca-aug20", "fresh-aug20", "trunc2-aug20"]


@dataclasses.dataclass
class Run:
    cell: str
    seed: int
    accuracy: float
    last_accuracy: float
    best_epoch: int
    epochs: int
    train_rows: int
    train_seconds: float
    device: str
    machine: str
    finished: str


def spec_for(cell: str, data_dir: Path, teacher: Path) -> dict[str, Any]:
    student, condition = cell.split("-")
    spec: dict[str, Any] = {"name": "quality", "teacher": str(teacher), "student": STUDENTS[student],
                            "dataset": {"path": str(data_dir), "max_seq_length": 128}}
    if condition.startswith("aug"):
        spec["augment"] = {"copies": int(condition[3:])}
    return spec


def params_for(cell: str, epochs: int) -> dict[str, Any]:
    student, condition = cell.split("-")
    params = {**KD_PARAMS[student], "num_train_epochs": epochs, "batch_size": 128}
    if condition == "ft":
        params["alpha"] = 1.0  # the teacher's logits are ignored: plain fine-tuning on the gold labels
    return params


def load_runs() -> list[Run]:
    if not RESULTS_JSON.is_file():
        return []
    return [Run(**r) for r in json.loads(RESULTS_JSON.read_text())["runs"]]


def _key(run: Run) -> tuple[str, int, int]:
    return run.cell, run.seed, run.epochs


def save_runs(runs: list[Run], extra: dict[str, Any]) -> None:
    """Merge ``runs`` into the JSON (several bench processes may share it: one per core)."""
    merge_results(RESULTS_JSON, [dataclasses.asdict(r) for r in runs], extra, key=lambda r: _key(Run(**r)))


def run_cells(cells: list[str], seeds: list[int], epochs: int, device: str, data_dir: Path, teacher: Path) -> None:
    from distill import DistillationEngine
    from distill.train import EpochResult
    from search_space import StudySpec

    engine = DistillationEngine(CACHE, device=device)
    for cell in cells:
        spec = StudySpec.model_validate(spec_for(cell, data_dir, teacher))
        for seed in seeds:
            runs = load_runs()  # another bench process may have recorded runs since
            if any(_key(r) == (cell, seed, epochs) for r in runs):
                continue
            prepared = engine.prepare(spec)  # cached after the first call (teacher logits, transfer set)
            save_runs([], {"teacher_accuracy": prepared.cache.teacher_metrics["accuracy"],
                             "n_train": prepared.cache.meta["n_train"], "n_eval": prepared.cache.meta["n_eval"]})
            with tempfile.TemporaryDirectory(prefix="kdsearch-quality-") as tmp:
                def progress(epoch: EpochResult, cell: str = cell, seed: int = seed) -> None:
                    print(f"{cell} seed {seed}: epoch {epoch.epoch}/{epochs} accuracy {epoch.score:.4f} "
                          f"({epoch.seconds:.0f} s)", flush=True)

                outcome = engine.run_trial(prepared, params_for(cell, epochs), seed, progress, Path(tmp) / "ckpt")
            run = Run(cell=cell, seed=seed, accuracy=outcome.best_score,
                      last_accuracy=outcome.history[-1].score, best_epoch=outcome.best_epoch, epochs=epochs,
                      train_rows=len(prepared.train), train_seconds=round(sum(h.seconds for h in outcome.history), 1),
                      device=engine.device.type, machine=machine_name(engine.device.type),
                      finished=time.strftime("%Y-%m-%d %H:%M"))
            save_runs([run], {})
            print(f"{cell:12s} seed {seed}: accuracy {run.accuracy:.4f} (last epoch {run.last_accuracy:.4f}) "
                  f"{run.train_rows} rows x {epochs} epochs in {run.train_seconds:.0f} s on {run.machine}", flush=True)


def measure_models(data_dir: Path, teacher: Path) -> dict[str, dict[str, float]]:
    """Parameters and CPU inference latency per sentence (batch 1 and 32) of each student shape and the teacher."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from distill import build_student
    from distill.data import load_split
    from search_space import DatasetSpec, StudentSpec

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    texts = load_split(DatasetSpec(path=str(data_dir)), "validation").texts
    teacher_config = AutoConfig.from_pretrained(teacher)
    teacher_model = AutoModelForSequenceClassification.from_pretrained(teacher)
    models = {"teacher": teacher_model}
    for name, student in STUDENTS.items():
        models[name] = build_student(StudentSpec.model_validate(student), teacher_config, seed=0,
                                     teacher_state=teacher_model.state_dict())

    out = {}
    for name, model in models.items():
        out[name] = {"params": sum(p.numel() for p in model.parameters()),
                     "ms_batch1": per_row_ms(model, tokenizer, texts, None, 1, 200),
                     "ms_batch32": per_row_ms(model, tokenizer, texts, None, 32, 864)}
        print(f"{name:8s} {out[name]['params'] / 1e6:5.1f}M params, {out[name]['ms_batch1']:.2f} ms/sentence "
              f"at batch 1, {out[name]['ms_batch32']:.2f} at batch 32", flush=True)
    return out


def _accuracies(runs: list[Run], last_epoch: bool = False) -> list[float]:
    return [r.last_accuracy if last_epoch else r.accuracy for r in runs]


def _groups(runs: list[Run]) -> dict[tuple[str, int], list[Run]]:
    """Runs by (cell, epoch budget) in CELL_ORDER, each sorted by seed: runs of different lengths are never averaged
    together."""
    groups: dict[tuple[str, int], list[Run]] = {}
    known = [r for r in runs if r.cell in CELL_ORDER]
    for run in sorted(known, key=lambda r: (CELL_ORDER.index(r.cell), r.epochs, r.seed)):
        groups.setdefault((run.cell, run.epochs), []).append(run)
    return groups


def _group_label(key: tuple[str, int]) -> str:
    cell, epochs = key
    student, condition = cell.split("-")
    return f"{STUDENT_LABELS[student]}, {CONDITIONS[condition]}, {epochs} epoch{'s' if epochs > 1 else ''}"


def write_report() -> None:
    payload = json.loads(RESULTS_JSON.read_text())
    runs = [Run(**r) for r in payload["runs"]]
    models = payload.get("models", {})
    teacher_acc = payload.get("teacher_accuracy")
    groups = _groups(runs)
    lines = [
        "# Student quality on SST-2", "",
        f"Generated by `python bench/quality.py` (last run {max((r.finished for r in runs), default='-')}); every "
        "row below is one cell of the grid, each a mean over seeds, each run the code a kdsearch worker runs "
        "(`DistillationEngine`) on the shared teacher's cached logits.", "",
        f"- Data: the full GLUE SST-2 train split ({payload.get('n_train', '?')} rows) and validation split "
        f"({payload.get('n_eval', '?')} rows), max length 128.",
        f"- Teacher: ../shared/models/sst2-teacher (MiniLM-L6-H384, 22.7M parameters), validation accuracy "
        f"**{teacher_acc:.4f}**." if teacher_acc is not None else "- Teacher: ../shared/models/sst2-teacher.",
        "- KD: `alpha * CE + (1 - alpha) * T^2 * KL`; lr 7.2e-4 (the seed search's), T 4, alpha 0.5 for the "
        "128-wide students, lr 1e-4 for the truncated one; batch 128, AdamW, linear decay. Fine-tuning alone is "
        "the same run with alpha = 1. Transfer-set rows have no gold label and train on `T^2 * KL` alone.",
        "- Transfer set (`augment`): per sentence, `copies` variants by word masking (p 0.1), same-context word "
        "replacement (p 0.1) and n-gram sampling (p 0.25, n 1..5), labelled by the teacher once and cached.",
        "- Accuracy: the best epoch's validation accuracy (the trial score, as on the seed's card), mean ± sample "
        "std over the seeds listed. Picking the best of a few epochs on 872 sentences flatters a run by up to a few "
        "tenths of a point (one sentence is 0.11), so the last epoch's mean is given beside it.", "",
        "| student | params | condition | accuracy (mean ± std) | last epoch | seeds | per seed | "
        "train rows x epochs | device | s per run |",
        "|---|---:|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for cell in (f"{student}-{condition}" for student in STUDENTS for condition in CONDITIONS):  # grouped by student
        student, condition = cell.split("-")
        params = models.get(student, {}).get("params")
        params_txt = f"{params / 1e6:.1f}M" if params else "-"
        cell_groups = [(epochs, group) for (group_cell, epochs), group in groups.items() if group_cell == cell]
        if not cell_groups:
            lines.append(f"| {STUDENT_LABELS[student]} | {params_txt} | {CONDITIONS[condition]} | not run | | 0 | | "
                         "| | |")
        for epochs, group in cell_groups:  # one row per epoch budget a cell was run with
            best_txt = mean_std(_accuracies(group), bold=True)
            last_txt = mean_std(_accuracies(group, last_epoch=True))
            per_seed = ", ".join(f"{r.accuracy:.4f}" for r in group)
            devices = ", ".join(sorted({r.machine for r in group}))
            lines.append(
                f"| {STUDENT_LABELS[student]} | {params_txt} | {CONDITIONS[condition]} | {best_txt} | "
                f"{last_txt} | {len(group)} | {per_seed} | {group[0].train_rows:,} x {epochs} | "
                f"{devices} | {statistics.fmean(r.train_seconds for r in group):.0f} |")
    if models:
        teacher = models["teacher"]
        lines += [
            "", "## Size and CPU inference latency", "",
            f"Per sentence on {payload.get('latency_machine', 'this CPU')}, validation sentences, tokenization "
            "excluded, median of 3 passes (batch 1: 200 sentences; batch 32: 864, padded per batch).", "",
            "| model | params | ms/sentence, batch 1 | ms/sentence, batch 32 | vs teacher (batch 1 / 32) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, m in models.items():
            label = "teacher (MiniLM-L6-H384)" if name == "teacher" else STUDENT_LABELS[name]
            speedup = f"{teacher['ms_batch1'] / m['ms_batch1']:.1f}x / {teacher['ms_batch32'] / m['ms_batch32']:.1f}x"
            lines.append(f"| {label} | {m['params'] / 1e6:.1f}M | {m['ms_batch1']:.2f} | {m['ms_batch32']:.3f} | "
                         f"{speedup} |")
    lines += ["", "## Targets (issue 7)", ""]
    small = [(key, _accuracies(group)) for key, group in groups.items()
             if key[0].split("-")[0] in ("fresh", "pca") and len(group) >= 3]
    if small:
        best_key, best_values = max(small, key=lambda item: statistics.fmean(item[1]))
        verdict = "met" if statistics.fmean(best_values) >= 0.833 else "NOT met"
        last = mean_std(_accuracies(groups[best_key], last_epoch=True))
        lines.append(f"- A student of at most 4.4M parameters at >= 83.3% (mean of 3 seeds): **{verdict}**; the best "
                     f"such cell is {_group_label(best_key)}: {mean_std(best_values)} (last epoch {last}).")
    trunc = [(key, _accuracies(group)) for key, group in groups.items()
             if key[0].startswith("trunc2") and len(group) >= 3]
    if trunc and teacher_acc is not None:
        best_key, best_values = max(trunc, key=lambda item: statistics.fmean(item[1]))
        lines.append(f"- 2-layer truncated-teacher student: best cell {_group_label(best_key)} at "
                     f"{mean_std(best_values)}, {100 * (teacher_acc - statistics.fmean(best_values)):.2f} points below "
                     "the teacher.")
    notes = payload.get("notes")
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'quality.md'}")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=",".join(c for c in CELL_ORDER if not c.endswith("aug20")),
                        help="comma-separated cells (default: all but the 20-copy ones)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    parser.add_argument("--seed-list", help="exactly these seeds, e.g. 3 or 2,3 (to split a cell across processes)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; two 1-thread processes train small students faster than one")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "sst2")
    parser.add_argument("--teacher", type=Path, default=SHARED / "models" / "sst2-teacher")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--report", action="store_true", help="only re-render the report from the JSON")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    parser.add_argument("--clear-notes", action="store_true")
    args = parser.parse_args()
    if args.note or args.clear_notes:
        old = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}
        notes = [] if args.clear_notes else old.get("notes", [])
        save_runs([], {"notes": notes + args.note})
    if args.list:
        for cell in CELL_ORDER:
            student, condition = cell.split("-")
            print(f"{cell:13s} {STUDENT_LABELS[student]}: {CONDITIONS[condition]}")
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.report:
        cells = [c.strip() for c in args.cells.split(",") if c.strip()]
        unknown = [c for c in cells if c not in CELL_ORDER]
        if unknown:
            raise SystemExit(f"unknown cells {unknown}; see --list")
        if not (args.data / "train.tsv").is_file() or not (args.teacher / "config.json").is_file():
            raise SystemExit(f"needs {args.data} and {args.teacher}")
        if not args.skip_latency:
            models = measure_models(args.data, args.teacher)
            save_runs([], {"models": models, "latency_machine": machine_name("cpu")})
        seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(1, args.seeds + 1))
        run_cells(cells, seeds, args.epochs, args.device, args.data, args.teacher)
    write_report()


if __name__ == "__main__":
    main()
