"""Distillation beyond SST-2: MRPC (paraphrase pairs, accuracy and F1) and STS-B (similarity regression, Pearson and
Spearman) with the shared cross-encoder teachers; fine-tuning alone, KD, and KD with a 5-copy transfer set, for three
students, each cell over several seeds.

    python bench/tasks.py                            # every cell, seeds 1-3; resumes from bench/results/tasks.json
    python bench/tasks.py --shard 0/2 & python bench/tasks.py --shard 1/2    # one process per core
    python bench/tasks.py --cells mrpc-pca-aug5 --seed-list 2
    python bench/tasks.py --latency                  # parameters and CPU latency per pair (run it on an idle machine)
    python bench/tasks.py --report                   # re-render bench/results/tasks.md from the JSON
    python bench/tasks.py --list

Every run goes through ``DistillationEngine`` (what a kdsearch worker runs): the teacher's outputs are cached once
per task, the transfer sets are built by the engine (pairs augmented side by side, the teacher labelling the pair).
Each finished run is merged into ``bench/results/tasks.json`` with the machine it ran on, so the bench resumes where
it stopped. A run's score is its best epoch on the validation split by the task's study metric (MRPC: accuracy,
the metric F1 cannot flatter; STS-B: Pearson); every metric of that epoch is kept.
"""

from __future__ import annotations

import argparse
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
RESULTS_JSON = RESULTS / "tasks.json"
CACHE = ROOT / "bench" / ".cache"  # teacher outputs and transfer sets, kept between runs (git-ignored)

TASKS: dict[str, dict[str, Any]] = {
    "mrpc": {"label": "MRPC (paraphrase pairs, 2 classes)", "data": "mrpc", "teacher": "mrpc-teacher",
             "metric": "accuracy", "report": ("accuracy", "f1")},
    "stsb": {"label": "STS-B (similarity, regression 0-5)", "data": "stsb", "teacher": "stsb-teacher",
             "metric": "pearson", "report": ("pearson", "spearmanr")},
}
TINY = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
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
CONDITIONS = {"ft": "fine-tuning alone (alpha = 1)", "kd": "KD", "aug5": "KD + transfer set, 5 copies"}
# Small data sets: batch 32. The 128-wide students train from scratch at a student learning rate; the truncated one
# starts from the fine-tuned teacher and takes a fine-tuning rate. T 4 (classification only), alpha 0.5.
KD_PARAMS = {
    "fresh": {"learning_rate": 5e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "pca": {"learning_rate": 5e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "trunc2": {"learning_rate": 5e-5, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
}
# Epochs per (student, condition): a 5-copy epoch is 6 times the train split.
EPOCHS = {("fresh", "ft"): 8, ("fresh", "kd"): 8, ("fresh", "aug5"): 3,
          ("pca", "ft"): 8, ("pca", "kd"): 8, ("pca", "aug5"): 3,
          ("trunc2", "ft"): 4, ("trunc2", "kd"): 4, ("trunc2", "aug5"): 2}
# Run order: per task, cheap and informative first, so a bench cut short still answers the main questions.
CELL_ORDER = [f"{task}-{cell}" for task in TASKS for cell in (
    "pca-kd", "trunc2-kd", "trunc2-aug5", "pca-aug5", "trunc2-ft", "pca-ft", "fresh-kd", "fresh-ft", "fresh-aug5")]


def spec_for(cell: str) -> dict[str, Any]:
    task, student, condition = cell.split("-")
    conf = TASKS[task]
    spec: dict[str, Any] = {
        "name": f"tasks-{task}", "teacher": str(SHARED / "models" / conf["teacher"]), "student": STUDENTS[student],
        "dataset": {"path": str(SHARED / "data" / conf["data"]), "text_column": "sentence1",
                    "text_pair_column": "sentence2", "max_seq_length": 128},
        "metric": conf["metric"],
    }
    if condition.startswith("aug"):
        spec["augment"] = {"copies": int(condition[3:])}
    return spec


def params_for(cell: str, epochs: int) -> dict[str, Any]:
    _, student, condition = cell.split("-")
    params = {**KD_PARAMS[student], "num_train_epochs": epochs}
    if condition == "ft":
        params["alpha"] = 1.0  # the teacher's outputs are ignored: plain fine-tuning on the gold labels
    return params


def _key(run: dict[str, Any]) -> tuple[str, int, int]:
    return run["cell"], run["seed"], run["epochs"]


def load_payload() -> dict[str, Any]:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}


def work_items(cells: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    return [(cell, seed) for cell in cells for seed in seeds]


def run_cells(items: list[tuple[str, int]], device: str) -> None:
    from distill import DistillationEngine
    from distill.train import EpochResult
    from search_space import StudySpec

    engine = DistillationEngine(CACHE, device=device)
    for cell, seed in items:
        task, student, condition = cell.split("-")
        epochs = EPOCHS[(student, condition)]
        if any(_key(r) == (cell, seed, epochs) for r in load_payload().get("runs", [])):
            continue  # done, here or by another bench process
        prepared = engine.prepare(StudySpec.model_validate(spec_for(cell)))  # cached after the first call
        merge_results(RESULTS_JSON, [], {f"teacher_{task}": {
            "metrics": prepared.cache.teacher_metrics, "n_train": prepared.cache.meta["n_train"],
            "n_eval": prepared.cache.meta["n_eval"]}}, key=_key)
        with tempfile.TemporaryDirectory(prefix="kdsearch-tasks-") as tmp:
            def progress(epoch: EpochResult, cell: str = cell, seed: int = seed, epochs: int = epochs) -> None:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in epoch.metrics.items())
                print(f"{cell} seed {seed}: epoch {epoch.epoch}/{epochs} {shown} ({epoch.seconds:.0f} s)", flush=True)

            outcome = engine.run_trial(prepared, params_for(cell, epochs), seed, progress, Path(tmp) / "ckpt")
        run = {"cell": cell, "task": task, "seed": seed, "epochs": epochs, "score": outcome.best_score,
               "metrics": outcome.best_metrics, "last_metrics": outcome.history[-1].metrics,
               "best_epoch": outcome.best_epoch, "train_rows": len(prepared.train),
               "train_seconds": round(sum(h.seconds for h in outcome.history), 1), "device": engine.device.type,
               "machine": machine_name(engine.device.type), "finished": time.strftime("%Y-%m-%d %H:%M")}
        merge_results(RESULTS_JSON, [run], {}, key=_key)
        print(f"{cell:18s} seed {seed}: {TASKS[task]['metric']} {run['score']:.4f} "
              f"({run['train_rows']} rows x {epochs} epochs in {run['train_seconds']:.0f} s on {run['machine']})",
              flush=True)


def measure_models(task: str) -> dict[str, dict[str, float]]:
    """Parameters and CPU inference latency per pair (batch 1 and 32, validation pairs) of each student and the
    teacher."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill import build_student, load_split
    from search_space import DatasetSpec, StudentSpec

    conf = TASKS[task]
    teacher_dir = SHARED / "models" / conf["teacher"]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    split = load_split(DatasetSpec(path=str(SHARED / "data" / conf["data"]), text_column="sentence1",
                                   text_pair_column="sentence2"), "validation",
                       None if task != "stsb" else _regression())
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    models = {"teacher": teacher}
    for name, student in STUDENTS.items():
        models[name] = build_student(StudentSpec.model_validate(student), teacher.config, seed=0,
                                     teacher_state=teacher.state_dict())
    out = {}
    n32 = min(len(split.texts), 384)
    for name, model in models.items():
        out[name] = {"params": sum(p.numel() for p in model.parameters()),
                     "ms_batch1": per_row_ms(model, tokenizer, split.texts, split.text_pairs, 1, 150),
                     "ms_batch32": per_row_ms(model, tokenizer, split.texts, split.text_pairs, 32, n32)}
        print(f"{task} {name:8s} {out[name]['params'] / 1e6:5.1f}M params, {out[name]['ms_batch1']:.2f} ms/pair at "
              f"batch 1, {out[name]['ms_batch32']:.2f} at batch 32", flush=True)
    return out


def _regression():  # type: ignore[no-untyped-def]
    from search_space import TaskInfo

    return TaskInfo("regression", 1, "pearson")


# ----------------------------------------------------------------------------------------------------- report


def _groups(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs by cell in CELL_ORDER (each at its one epoch budget), sorted by seed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: (CELL_ORDER.index(r["cell"]), r["seed"])):
        student, condition = run["cell"].split("-")[1:]
        if run["epochs"] == EPOCHS[(student, condition)]:
            groups.setdefault(run["cell"], []).append(run)
    return groups


def _values(group: list[dict[str, Any]], metric: str) -> list[float]:
    return [r["metrics"][metric] for r in group]


def _task_section(task: str, payload: dict[str, Any], groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    conf = TASKS[task]
    report = conf["report"]
    info = payload.get(f"teacher_{task}", {})
    teacher = info.get("metrics", {})
    models = payload.get("models", {}).get(task, {})
    lines = [
        f"## {conf['label']}", "",
        f"Train {info.get('n_train', '?')} pairs, validation {info.get('n_eval', '?')} pairs; teacher "
        f"../shared/models/{conf['teacher']} (MiniLM-L6-H384, 22.7M): "
        + ", ".join(f"{m} **{teacher[m]:.4f}**" for m in report if m in teacher) + ". Runs are scored (best epoch) "
        f"by {conf['metric']}.", "",
        "| student | params | condition | " + " | ".join(f"{m} (mean ± std)" for m in report)
        + " | seeds | per seed | train rows x epochs | s per run | device |",
        "|---|---:|---|" + "---:|" * len(report) + "---:|---|---:|---:|---|",
    ]
    for student in STUDENTS:
        params = models.get(student, {}).get("params")
        params_txt = f"{params / 1e6:.1f}M" if params else "-"
        for condition in CONDITIONS:
            group = groups.get(f"{task}-{student}-{condition}", [])
            if not group:
                lines.append(f"| {STUDENT_LABELS[student]} | {params_txt} | {CONDITIONS[condition]} | "
                             + " | ".join("not run" for _ in report) + " | 0 | | | | |")
                continue
            cols = " | ".join(mean_std(_values(group, m), bold=m == conf["metric"]) for m in report)
            per_seed = ", ".join(f"{r['score']:.4f}" for r in group)
            machines = ", ".join(sorted({r["machine"] for r in group}))
            lines.append(f"| {STUDENT_LABELS[student]} | {params_txt} | {CONDITIONS[condition]} | {cols} | "
                         f"{len(group)} | {per_seed} | {group[0]['train_rows']:,} x {group[0]['epochs']} | "
                         f"{statistics.fmean(r['train_seconds'] for r in group):.0f} | {machines} |")
    if models:
        t = models["teacher"]
        lines += ["", f"Size and CPU inference latency per pair on {payload.get('latency_machine', 'this CPU')} "
                  "(validation pairs, tokenization excluded, median of 3 passes):", "",
                  "| model | params | ms/pair, batch 1 | ms/pair, batch 32 | vs teacher (batch 1 / 32) |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in models.items():
            label = "teacher (MiniLM-L6-H384)" if name == "teacher" else STUDENT_LABELS[name]
            lines.append(f"| {label} | {m['params'] / 1e6:.1f}M | {m['ms_batch1']:.2f} | {m['ms_batch32']:.3f} | "
                         f"{t['ms_batch1'] / m['ms_batch1']:.1f}x / {t['ms_batch32'] / m['ms_batch32']:.1f}x |")
    return lines


def _worst_gap(group: list[dict[str, Any]], teacher: dict[str, float], metrics: tuple[str, ...]) -> float:
    """The largest distance below the teacher (points, metric x 100) over ``metrics``."""
    return max(100 * (teacher[m] - statistics.fmean(_values(group, m))) for m in metrics)


def _targets(payload: dict[str, Any], groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["## Targets", ""]
    for task, conf in TASKS.items():
        teacher = payload.get(f"teacher_{task}", {}).get("metrics", {})
        full = {cell: g for cell, g in groups.items() if cell.startswith(task + "-") and len(g) >= 3}
        if not full or not teacher:
            lines.append(f"- {task}: no cell has 3 seeds yet.")
            continue

        cell, group = min(full.items(), key=lambda item: _worst_gap(item[1], teacher, conf["report"]))
        means = {m: statistics.fmean(_values(group, m)) for m in conf["report"]}
        gaps = ", ".join(f"{m} {v:.4f} ({100 * (teacher[m] - v):.2f} points below the teacher)"
                         for m, v in means.items())
        verdict = "met" if _worst_gap(group, teacher, conf["report"]) <= 3.0 else "NOT met"
        lines.append(f"- {task}: best student within 3 points of the teacher on {' and '.join(conf['report'])}: "
                     f"**{verdict}**. Closest cell: {_label(cell)}: {gaps}.")
    lines += ["", "Does the transfer set help? KD + 5 copies against KD alone, same student, the study metric, mean "
              "over seeds; the difference counts as measurable when it exceeds twice its standard error "
              "(Welch, from the seed spreads):", ""]
    for task, conf in TASKS.items():
        for student in STUDENTS:
            kd, aug = groups.get(f"{task}-{student}-kd", []), groups.get(f"{task}-{student}-aug5", [])
            if len(kd) < 2 or len(aug) < 2:
                continue
            a, b = _values(kd, conf["metric"]), _values(aug, conf["metric"])
            diff = statistics.fmean(b) - statistics.fmean(a)
            se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
            verdict = "measurable gain" if diff > 2 * se else ("measurable loss" if diff < -2 * se else "within noise")
            lines.append(f"- {task}, {STUDENT_LABELS[student]}: {conf['metric']} {diff * 100:+.2f} points "
                         f"(± {2 * se * 100:.2f} at 2 SE): {verdict}.")
    return lines


def _label(cell: str) -> str:
    _task, student, condition = cell.split("-")
    return f"{STUDENT_LABELS[student]}, {CONDITIONS[condition]}"


def write_report() -> None:
    payload = load_payload()
    runs = [r for r in payload.get("runs", []) if r["cell"] in CELL_ORDER]
    groups = _groups(runs)
    lines = [
        "# Beyond SST-2: sentence pairs and regression", "",
        f"Generated by `python bench/tasks.py` (last run {max((r['finished'] for r in runs), default='-')}). Each "
        "run is the code a kdsearch worker runs (`DistillationEngine`) on the shared teacher's cached outputs; "
        "inputs are the tokenizer's pair encoding (segment ids included), max length 128.", "",
        "- KD: classification `alpha * CE + (1 - alpha) * T^2 * KL` (T 4); regression `alpha * MSE(gold) + "
        "(1 - alpha) * MSE(teacher)` (no temperature); alpha 0.5; fine-tuning alone is alpha = 1. Batch 32, AdamW, "
        "linear decay; lr 5e-4 for the 128-wide students, 5e-5 for the truncated teacher.",
        "- Epochs: 8 (ft, KD) and 3 (5 copies) for the 128-wide students, 4 and 2 for the truncated student; a "
        "5-copy epoch is 6 times the train split. Transfer set: per pair, 5 variants, each side augmented on its own "
        "(masking p 0.1, same-context replacement p 0.1, n-gram p 0.25), labelled by the teacher; no gold label.",
        "- Each metric: the best epoch's (by the study metric), mean ± sample std over the seeds listed. MRPC's "
        "validation split has 408 pairs (one pair is 0.25 points of accuracy), 64% of them paraphrases, so F1 "
        "alone flatters a model that says \"equivalent\" to everything; both are reported.", "",
    ]
    for task in TASKS:
        lines += [*_task_section(task, payload, groups), ""]
    lines += _targets(payload, groups)
    notes = payload.get("notes")
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    (RESULTS / "tasks.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'tasks.md'}")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=",".join(CELL_ORDER), help="comma-separated cells (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    parser.add_argument("--seed-list", help="exactly these seeds, e.g. 3 or 2,3")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th (cell, seed) from the i-th (one "
                                                       "process per core)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--latency", action="store_true",
                        help="only measure parameters and CPU latency (alone on the machine: timings)")
    parser.add_argument("--report", action="store_true", help="only re-render the report from the JSON")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    args = parser.parse_args()
    if args.note:
        merge_results(RESULTS_JSON, [], {"notes": load_payload().get("notes", []) + args.note}, key=_key)
    if args.list:
        for cell in CELL_ORDER:
            print(f"{cell:20s} {_label(cell)}, {EPOCHS[tuple(cell.split('-')[1:])]} epochs")  # type: ignore[index]
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.report:
        cells = [c.strip() for c in args.cells.split(",") if c.strip()]
        unknown = [c for c in cells if c not in CELL_ORDER]
        if unknown:
            raise SystemExit(f"unknown cells {unknown}; see --list")
        for conf in TASKS.values():
            if not (SHARED / "models" / conf["teacher"] / "config.json").is_file():
                raise SystemExit(f"needs {SHARED / 'models' / conf['teacher']} and {SHARED / 'data' / conf['data']}")
        if args.latency:
            models = {task: measure_models(task) for task in TASKS}
            merge_results(RESULTS_JSON, [], {"models": models, "latency_machine": machine_name("cpu")}, key=_key)
            write_report()
            return
        index, count = (int(x) for x in args.shard.split("/"))
        seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(1, args.seeds + 1))
        run_cells(work_items(cells, seeds)[index::count], args.device)
    write_report()


if __name__ == "__main__":
    main()
