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
import math
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
             "metric": "accuracy", "report": ("accuracy", "f1", "matthews_correlation"),
             "pairs": ("sentence1", "sentence2")},
    "stsb": {"label": "STS-B (similarity, regression 0-5)", "data": "stsb", "teacher": "stsb-teacher",
             "metric": "pearson", "report": ("pearson", "spearmanr"), "pairs": ("sentence1", "sentence2")},
    "sst2": {"label": "SST-2 (sentiment, 2 classes)", "data": "sst2", "teacher": "sst2-teacher",
             "metric": "accuracy", "report": ("accuracy",), "pairs": ("sentence", None)},
}
TINY = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
MID = {"num_hidden_layers": 4, "hidden_size": 192, "num_attention_heads": 4, "intermediate_size": 512}
STUDENTS: dict[str, dict[str, Any]] = {
    "fresh": {"config": TINY},
    "pca": {"config": TINY, "embedding_init": "teacher_pca"},
    "mid": {"config": MID, "embedding_init": "teacher_pca"},
    "trunc2": {"truncate_teacher": {"num_layers": 2}},
    "sia": {"config": TINY, "embedding_init": "teacher_pca", "pair_encoding": "siamese"},
    "siamid": {"config": MID, "embedding_init": "teacher_pca", "pair_encoding": "siamese"},
    "siaint": {"config": TINY, "embedding_init": "teacher_pca", "pair_encoding": "siamese", "pair_head": "interaction"},
}
STUDENT_LABELS = {
    "fresh": "L2-H128 fresh (random init)",
    "pca": "L2-H128 (BERT-Tiny's shape), embeddings = teacher PCA",
    "mid": "L4-H192-I512, embeddings = teacher PCA",
    "trunc2": "2 teacher layers (truncate_teacher)",
    "sia": "L2-H128 siamese (each sentence alone, cosine head), embeddings = teacher PCA",
    "siamid": "L4-H192-I512 siamese, embeddings = teacher PCA",
    "siaint": "L2-H128 siamese, interaction head (cos, u, v, |u - v|, u * v), embeddings = teacher PCA",
}
# The unlabelled pre-distillation corpus of every bench cell: the three shared tasks' texts, every split, both sides
# (~90k distinct sentences); no label is read.
CORPUS = [
    {"path": str(SHARED / "data" / "sst2"), "splits": ["train", "validation"], "text_columns": ["sentence"]},
    {"path": str(SHARED / "data" / "mrpc"), "splits": ["train", "validation"],
     "text_columns": ["sentence1", "sentence2"]},
    {"path": str(SHARED / "data" / "stsb"), "splits": ["train", "validation"],
     "text_columns": ["sentence1", "sentence2"]},
]
PREDISTILL = {"task_texts": True, "corpus": CORPUS, "epochs": 3}
# The pair corpus of the bench: 8 teacher-labelled rows per train pair, 20% with a TF-IDF hard negative as second
# sentence, 10% a random one, 40% perturbed copies (teacher-embedding neighbours, deletions, swaps, order), the rest
# each side augmented on its own (distill.pair_corpus).
PAIR_CORPUS = {"copies": 8, "pairs": {"hard_negatives": 0.2, "random_pairs": 0.1, "perturbed": 0.4}}
# A cell's recipe: its label, the spec's augment block, whether the student is pre-distilled, its parameters over
# the student's defaults, and its epochs. The first six are the grid before pre-distillation (issue 25's baseline).
RECIPES: dict[str, dict[str, Any]] = {
    "ft": {"label": "fine-tuning alone (alpha = 1)", "params": {"alpha": 1.0}},
    "kd": {"label": "KD"},
    "aug5": {"label": "KD + transfer set, 5 copies", "augment": {"copies": 5}},
    "pd": {"label": "pre-distilled + KD", "predistilled": 1, "params": {"learning_rate": 2e-4}},
    "pdrel": {"label": "pre-distilled on the relations alone (no hidden-state MSE) + KD", "predistilled": 1,
              "predistill": {"hidden_weight": 0.0}, "params": {"learning_rate": 2e-4}},
    "pdaug10": {"label": "pre-distilled + KD + per-side transfer set, 10 copies", "predistilled": 1,
                "augment": {"copies": 10}, "params": {"learning_rate": 2e-4}},
    "aug10": {"label": "KD + per-side transfer set, 10 copies", "augment": {"copies": 10}},
    "pdpair": {"label": "pre-distilled + KD + pair corpus, 8 copies", "predistilled": 1, "augment": PAIR_CORPUS,
               "params": {"learning_rate": 2e-4}},
    "pair": {"label": "KD + pair corpus, 8 copies", "augment": PAIR_CORPUS},
    "pair2": {"label": "KD + pair corpus, first 2 of its 8 copies", "augment": PAIR_CORPUS,
              "params": {"transfer_copies": 2}},
    "pair4": {"label": "KD + pair corpus, first 4 of its 8 copies", "augment": PAIR_CORPUS,
              "params": {"transfer_copies": 4}},
    "pdpairbal": {"label": "pre-distilled + KD + pair corpus, 8 copies, matched to the train label mix",
                  "predistilled": 1, "augment": {**PAIR_CORPUS, "match_label_mix": True},
                  "params": {"learning_rate": 2e-4}},
    # Transductive: the validation split's own pairs among the pre-distillation examples (the student is fitted to
    # the teacher's internals on what it is scored on). Reported, never counted towards a target.
    "pdtaskpair": {"label": "pre-distilled with the task's own pairs, validation's too (2 copies; transductive) + KD",
                   "predistilled": 1, "transductive": True,
                   "predistill": {"task_pairs": 2, "task_pair_splits": ["train", "validation"]},
                   "params": {"learning_rate": 2e-4}},
    # Held out ("heldout": spec_for keeps the task's validation texts out of pre-distillation; the other tasks'
    # sources keep both splits).
    "pdtaskpairtrain": {"label": "pre-distilled with the task's own train pairs (2 copies), no validation text + KD",
                        "predistilled": 1, "predistill": {"task_pairs": 2}, "heldout": True,
                        "params": {"learning_rate": 2e-4}},
    # Held out, like pdtaskpairtrain, with related pairs from the corpus (each first sentence with one of its 5
    # nearest by TF-IDF cosine) in place of random partners.
    "pdlexpairtrain": {"label": "pre-distilled on related pairs (TF-IDF partners) and the task's own train pairs "
                            "(2 copies), no validation text + KD", "predistilled": 1, "heldout": True,
                   "predistill": {"task_pairs": 2, "pair_partners": "lexical"},
                   "params": {"learning_rate": 2e-4}},
    "pdlr": {"label": "pre-distilled + KD, lr 1e-3", "predistilled": 1, "params": {"learning_rate": 1e-3}},
    # SST-2's 67k rows: 4 teacher-labelled copies (337k rows an epoch), 2 epochs, lr 3e-4 over the task's 5e-4.
    "pdaug4": {"label": "pre-distilled + KD + per-side transfer set, 4 copies, lr 3e-4", "predistilled": 1,
               "augment": {"copies": 4}, "force": {"learning_rate": 3e-4}},
    "pdaug4train": {"label": "pre-distilled without the validation sentences + KD + per-side transfer set, 4 copies, "
                             "lr 3e-4", "predistilled": 1, "heldout": True,
                    "augment": {"copies": 4}, "force": {"learning_rate": 3e-4}},
    "pdpairL": {"label": "pre-distilled + KD + pair corpus, 8 copies + layer terms (hidden 1, attention 1)",
                "predistilled": 1, "augment": PAIR_CORPUS,
                "params": {"learning_rate": 2e-4, "hidden_weight": 1.0, "attention_weight": 1.0}},
}
# Small data sets: batch 32. The 128-wide students train from scratch at a student learning rate; the truncated one
# starts from the fine-tuned teacher and takes a fine-tuning rate. T 4 (classification only), alpha 0.5.
KD_PARAMS = {
    "fresh": {"learning_rate": 5e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "pca": {"learning_rate": 5e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "mid": {"learning_rate": 5e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "trunc2": {"learning_rate": 5e-5, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "sia": {"learning_rate": 3e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "siamid": {"learning_rate": 3e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
    "siaint": {"learning_rate": 3e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 32},
}
# Epochs per (student, recipe); a k-copy epoch is k + 1 times the train split. Cells not listed: 3 epochs.
EPOCHS = {("pca", "pdrel"): 8, ("fresh", "ft"): 8, ("fresh", "kd"): 8, ("fresh", "aug5"): 3,
          ("pca", "ft"): 8, ("pca", "kd"): 8, ("pca", "aug5"): 3,
          ("trunc2", "ft"): 4, ("trunc2", "kd"): 4, ("trunc2", "aug5"): 2,
          ("pca", "pd"): 8, ("pca", "pdlr"): 8, ("pca", "pdtaskpair"): 8, ("pca", "pdtaskpairtrain"): 8,
          ("pca", "pdlexpairtrain"): 8,
          ("pca", "pdaug4"): 2, ("pca", "pdaug4train"): 2, ("mid", "pd"): 8, ("mid", "kd"): 8,
          ("sia", "kd"): 6, ("sia", "pd"): 6, ("sia", "pair2"): 3, ("sia", "pair4"): 3,
          ("siamid", "kd"): 6, ("siamid", "pair2"): 3, ("siamid", "pair4"): 3,
          ("siaint", "pair2"): 3}
# Run order: per task, the levers first, so a bench cut short still answers the main questions; then the old grid.
CELL_ORDER = [f"{task}-{cell}" for task in TASKS for cell in (
    "sia-kd", "sia-pair2", "sia-pair4", "sia-pd", "siamid-kd", "siamid-pair2", "siamid-pair4", "siaint-pair2",
    "pca-pd", "pca-pdtaskpair", "pca-pdtaskpairtrain", "pca-pdlexpairtrain", "pca-pdlr", "pca-pdrel", "pca-pdpair",
    "pca-pdpairbal", "pca-pdpairL", "pca-pair", "pca-pdaug4", "pca-pdaug4train", "pca-pdaug10", "pca-aug10",
    "mid-pd", "mid-pdpair", "mid-kd", "pca-kd", "trunc2-kd", "trunc2-aug5", "pca-aug5", "trunc2-ft", "pca-ft",
    "fresh-kd", "fresh-ft", "fresh-aug5")
    if not (task == "sst2" and ("pair" in cell or cell.startswith("sia")))]  # SST-2: single sentences


def epochs_of(cell: str) -> int:
    task, student, recipe = cell.split("-")
    if task == "sst2":  # 67k rows: 3 epochs at most
        return min(EPOCHS.get((student, recipe), 3), 3)
    return EPOCHS.get((student, recipe), 3)


def spec_for(cell: str) -> dict[str, Any]:
    task, student, recipe = cell.split("-")
    conf, settings = TASKS[task], RECIPES[recipe]
    first, second = conf["pairs"]
    spec: dict[str, Any] = {
        "name": f"tasks-{task}", "teacher": str(SHARED / "models" / conf["teacher"]), "student": STUDENTS[student],
        "dataset": {"path": str(SHARED / "data" / conf["data"]), "text_column": first,
                    "text_pair_column": second, "max_seq_length": 128},
        "metric": conf["metric"], "predistill": {**PREDISTILL, **settings.get("predistill", {})},
        "search_space": {"predistilled": settings.get("predistilled", 0)},
    }
    if settings.get("heldout"):  # no text of the task's validation split: its own texts and source, train only
        spec["predistill"]["task_splits"] = ["train"]
        spec["predistill"]["corpus"] = [
            {**source, "splits": ["train"]} if source["path"].endswith("/" + conf["data"]) else source
            for source in spec["predistill"]["corpus"]]
    if "augment" in settings:
        spec["augment"] = settings["augment"]
    return spec


# SST-2's 67k rows: batch 128 (the quality bench's), and a rate to match.
TASK_PARAMS: dict[str, dict[str, Any]] = {"sst2": {"batch_size": 128, "learning_rate": 5e-4}}


def params_for(cell: str, epochs: int) -> dict[str, Any]:
    task, student, recipe = cell.split("-")
    return {**KD_PARAMS[student], **RECIPES[recipe].get("params", {}), **TASK_PARAMS.get(task, {}),
            **RECIPES[recipe].get("force", {}), "num_train_epochs": epochs,
            "predistilled": RECIPES[recipe].get("predistilled", 0)}


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
        task = cell.split("-")[0]
        epochs = epochs_of(cell)
        if any(_key(r) == (cell, seed, epochs) for r in load_payload().get("runs", [])):
            continue  # done, here or by another bench process
        started = time.perf_counter()
        prepared = engine.prepare(StudySpec.model_validate(spec_for(cell)))  # cached after the first call
        prepare_s = time.perf_counter() - started
        builds = load_payload().get("predistill_builds", {})
        for built in prepared.predistilled.values():
            if built.key not in builds:  # the build's cost, as its builder recorded it
                builds[built.key] = {**{k: built.meta[k] for k in ("sentences", "examples", "final_loss",
                                                                   "build_seconds", "precision")},
                                     "epochs": built.meta["recipe"]["epochs"], "task": task,
                                     "student": cell.split("-")[1], "machine": machine_name("cpu")}
        merge_results(RESULTS_JSON, [], {"predistill_builds": builds, f"teacher_{task}": {
            "metrics": prepared.cache.teacher_metrics, "n_train": prepared.cache.meta["n_train"],
            "n_eval": prepared.cache.meta["n_eval"]}}, key=_key)
        params = params_for(cell, epochs)
        with tempfile.TemporaryDirectory(prefix="kdsearch-tasks-") as tmp:
            def progress(epoch: EpochResult, cell: str = cell, seed: int = seed, epochs: int = epochs) -> None:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in epoch.metrics.items())
                print(f"{cell} seed {seed}: epoch {epoch.epoch}/{epochs} {shown} ({epoch.seconds:.0f} s)", flush=True)

            outcome = engine.run_trial(prepared, params, seed, progress, Path(tmp) / "ckpt")
        # The rows an epoch of this run reads (transfer_copies: the train split and the first copies only).
        train_rows = len(engine.train_split(prepared, engine.train_config(prepared, params, seed))[0])
        run = {"cell": cell, "task": task, "seed": seed, "epochs": epochs, "score": outcome.best_score,
               "metrics": outcome.best_metrics, "last_metrics": outcome.history[-1].metrics,
               "best_epoch": outcome.best_epoch, "train_rows": train_rows,
               "train_seconds": round(sum(h.seconds for h in outcome.history), 1), "device": engine.device.type,
               "precision": outcome.precision, "machine": machine_name(engine.device.type),
               "load_1m": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M")}
        if prepare_s > 60:  # this run paid for a build (teacher cache, transfer set, pre-distillation)
            run["prepare_seconds"] = round(prepare_s, 1)
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
        if run["epochs"] == epochs_of(run["cell"]):
            groups.setdefault(run["cell"], []).append(run)
    return groups


def _values(group: list[dict[str, Any]], metric: str) -> list[float]:
    return [r["metrics"][metric] for r in group if metric in r["metrics"]]


def _cost(group: list[dict[str, Any]]) -> str:
    """Wall minutes per run on the machine's 2 cores (training and evaluation), and what the cell's first run paid
    once to prepare (teacher cache, transfer set, pre-distillation: whichever it built)."""
    minutes = statistics.fmean(r["train_seconds"] for r in group) / 60
    built = max((r.get("prepare_seconds", 0.0) for r in group), default=0.0) / 60
    return f"{minutes:.1f}" + (f" (+ {built:.1f} once)" if built else "")


def _task_section(task: str, payload: dict[str, Any], groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    conf = TASKS[task]
    report = conf["report"]
    info = payload.get(f"teacher_{task}", {})
    teacher = info.get("metrics", {})
    models = payload.get("models", {}).get(task, {})
    lines = [
        f"## {conf['label']}", "",
        f"Train {info.get('n_train', '?')} rows, validation {info.get('n_eval', '?')} rows; teacher "
        f"../shared/models/{conf['teacher']} (MiniLM-L6-H384, 22.7M): "
        + ", ".join(f"{m} **{teacher[m]:.4f}**" for m in report if m in teacher) + ". Runs are scored (best epoch) "
        f"by {conf['metric']}.", "",
        "| student | recipe | " + " | ".join(f"{m} (mean ± std)" for m in report)
        + " | seeds | per seed | train rows x epochs | min per run (wall, 2 cores) | machine, precision |",
        "|---|---|" + "---:|" * len(report) + "---:|---|---:|---:|---|",
    ]
    for cell in CELL_ORDER:
        if not cell.startswith(task + "-") or cell not in groups:
            continue
        group = groups[cell]
        _task, student, recipe = cell.split("-")
        cols = " | ".join(mean_std(_values(group, m), bold=m == conf["metric"]) if _values(group, m) else "-"
                          for m in report)
        per_seed = ", ".join(f"{r['score']:.4f}" for r in group)
        machines = ", ".join(sorted({f"{r['machine']}, {r.get('precision') or 'fp32'}" for r in group}))
        lines.append(f"| {STUDENT_LABELS[student]} | {RECIPES[recipe]['label']} | {cols} | {len(group)} | {per_seed} "
                     f"| {group[0]['train_rows']:,} x {group[0]['epochs']} | {_cost(group)} | {machines} |")
    baseline = payload.get("baselines", {}).get(task)
    if baseline:
        shown = ", ".join(f"{m} {v:.4f}" for m, v in baseline.items() if m in report)
        lines += ["", f"No training at all (`--baselines`): the cosine of the two sentences' mean input embeddings in "
                  f"the teacher-PCA student's starting table scores {shown}"
                  + (f" (threshold {baseline['threshold']:.3f}, chosen on the train split)" if "threshold" in baseline
                     else "") + "."]
    builds = payload.get("predistill_builds", {})
    for key, meta in builds.items():
        if meta.get("task") == task:
            lines += ["", f"Pre-distillation of {STUDENT_LABELS[meta['student']]} from this teacher (entry `{key}`): "
                      f"{meta['sentences']:,} sentences, {meta['examples']:,} examples x {meta['epochs']} epochs in "
                      f"**{meta['build_seconds'] / 60:.1f} CPU min** on {meta['machine']} ({meta['precision']}), "
                      f"final loss {meta['final_loss']:.3f}; paid once per (teacher, shape, corpus, recipe)."]
    if models:
        t = models["teacher"]
        lines += ["", f"Size and CPU inference latency per pair on {payload.get('latency_machine', 'this CPU')} "
                  "(validation pairs, tokenization excluded, median of 3 passes):", "",
                  "| model | params | ms/pair, batch 1 | ms/pair, batch 32 | vs teacher (batch 1 / 32) |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in models.items():
            label = "teacher (MiniLM-L6-H384)" if name == "teacher" else STUDENT_LABELS.get(name, name)
            lines.append(f"| {label} | {m['params'] / 1e6:.1f}M | {m['ms_batch1']:.2f} | {m['ms_batch32']:.3f} | "
                         f"{t['ms_batch1'] / m['ms_batch1']:.1f}x / {t['ms_batch32'] / m['ms_batch32']:.1f}x |")
    return lines


# Issue 25's targets for a <= 4.4M student: a pre-trained BERT-Tiny fine-tuned (google-research/bert README, GLUE
# test; SST-2 the issue's own bar), per task and metric.
BERT_TINY = {"mrpc": {"accuracy": 0.711, "f1": 0.811, "matthews_correlation": 0.30}, "stsb": {"pearson": 0.743},
             "sst2": {"accuracy": 0.850}}
SMALL_STUDENTS = ("pca", "fresh", "sia", "siaint")  # <= 4.4M parameters
THIRD_STUDENTS = ("pca", "fresh", "mid", "sia", "siamid", "siaint")  # <= 7.6M parameters (a third of the teacher)
NEAR_TEACHER = {"mrpc": ("accuracy", "f1"), "stsb": ("pearson",)}
# Each lever on and off: (cell without, cell with, the lever), a cell being "student-recipe" of each task.
LEVERS = [
    ("pca-kd", "sia-kd", "a siamese student (each sentence alone, cosine head) in place of the cross-encoder"),
    ("pca-pdpairL", "sia-kd", "a siamese student with KD alone, against the best cross-encoder recipe"),
    ("sia-kd", "sia-pair2", "2 copies of the pair corpus, on a siamese student"),
    ("sia-pair2", "sia-pair4", "4 copies of the pair corpus instead of 2, on a siamese student"),
    ("sia-kd", "sia-pd", "pre-distillation, on a siamese student"),
    ("sia-kd", "siamid-kd", "a 7.6M siamese student (L4-H192) instead of 4.4M"),
    ("sia-pair2", "siamid-pair2", "a 7.6M siamese student (L4-H192) instead of 4.4M, both with 2 pair-corpus copies"),
    ("siamid-pair2", "siamid-pair4", "4 copies of the pair corpus instead of 2, on a 7.6M siamese student"),
    ("sia-pair2", "siaint-pair2", "the interaction head in place of the cosine head, both with 2 pair-corpus copies"),
    ("pca-kd", "pca-pd", "pre-distillation"),
    ("pca-pdrel", "pca-pd", "the hidden-state MSE in pre-distillation"),
    ("pca-pair", "pca-pdpair", "pre-distillation, with the pair corpus"),
    ("pca-pd", "pca-pdpair", "the 8-copy pair corpus, on a pre-distilled student"),
    ("pca-kd", "pca-pair", "the 8-copy pair corpus, without pre-distillation"),
    ("pca-pdpair", "pca-pdpairbal", "matching the pair corpus's teacher labels to the train label mix"),
    ("pca-kd", "pca-pdpairbal", "pre-distillation and the label-matched pair corpus together"),
    ("pca-pd", "pca-pdlr", "lr 1e-3 instead of 2e-4 after pre-distillation"),
    ("pca-pd", "pca-pdtaskpair", "the task's own pairs (2 copies) among the pre-distillation examples"),
    ("pca-pdtaskpairtrain", "pca-pdtaskpair", "the validation split's texts and pairs in pre-distillation"),
    ("pca-pdtaskpairtrain", "pca-pdlexpairtrain", "related (TF-IDF) partners in place of random ones, held out"),
    ("pca-pdpair", "pca-pdpairL", "layer terms (hidden, attention), on top"),
    ("pca-pdaug4train", "pca-pdaug4", "the validation split's sentences in pre-distillation (the default corpus)"),
    ("pca-pd", "pca-pdaug10", "a 10-copy per-side transfer set, on a pre-distilled student"),
    ("pca-pd", "pca-pdaug4", "a 4-copy per-side transfer set (and lr 3e-4), on a pre-distilled student"),
    ("mid-kd", "mid-pd", "pre-distillation"),
]


def _transductive(cell: str) -> bool:
    return bool(RECIPES[cell.split("-")[2]].get("transductive"))


def _best(groups: dict[str, list[dict[str, Any]]], task: str, students: tuple[str, ...],
          rank: Any, transductive: bool = False) -> tuple[str, list[dict[str, Any]]] | None:
    """The best 3-seed cell of ``task`` among ``students``: held-out cells, or with ``transductive`` those alone."""
    full = {c: g for c, g in groups.items() if c.startswith(task + "-") and c.split("-")[1] in students
            and len(g) >= 3 and _transductive(c) == transductive}
    return max(full.items(), key=lambda item: rank(item[1])) if full else None


def _targets(payload: dict[str, Any], groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["## Targets", "", "Means over 3 seeds; a cell with fewer seeds does not count, nor does a transductive "
             "cell (its pre-distillation read the validation pairs it is scored on): its figure is given beside, for "
             "what it shows, not as a result.", ""]
    for task, bars in BERT_TINY.items():
        for transductive in (False, True):
            best = _best(groups, task, SMALL_STUDENTS, lambda g, bars=bars: min(
                statistics.fmean(_values(g, m) or [0.0]) - bar for m, bar in bars.items()), transductive)
            if best is None:
                if not transductive:
                    lines.append(f"- {task}, a <= 4.4M student above BERT-Tiny: no <= 4.4M cell has 3 seeds yet.")
                continue
            cell, group = best
            parts = [f"{m} {statistics.fmean(_values(group, m) or [math.nan]):.4f} (bar {bar})"
                     for m, bar in bars.items()]
            met = all(statistics.fmean(_values(group, m) or [0.0]) >= bar for m, bar in bars.items())
            lines.append(f"  - not counted, transductive: {_label(cell)}: {', '.join(parts)}." if transductive else
                         f"- {task}, a <= 4.4M student above BERT-Tiny: **{'met' if met else 'NOT met'}**. Best "
                         f"cell: {_label(cell)}: {', '.join(parts)}.")
    for task, metrics in NEAR_TEACHER.items():
        teacher = payload.get(f"teacher_{task}", {}).get("metrics", {})
        best = _best(groups, task, THIRD_STUDENTS, lambda g, teacher=teacher, metrics=metrics: -_worst_gap(
            g, teacher, metrics))
        if best is None or not teacher:
            lines.append(f"- {task}, a <= 7.6M student within 3 points of the teacher: no cell has 3 seeds yet.")
            continue
        cell, group = best
        gaps = ", ".join(f"{m} {statistics.fmean(_values(group, m)):.4f} "
                         f"({100 * (teacher[m] - statistics.fmean(_values(group, m))):.2f} points below the teacher)"
                         for m in metrics)
        met = _worst_gap(group, teacher, metrics) <= 3.0
        lines.append(f"- {task}, a <= 7.6M student within 3 points of the teacher: **{'met' if met else 'NOT met'}**."
                     f" Closest cell: {_label(cell)}: {gaps}.")
    lines += ["", "## What each lever adds, and costs", "",
              "The study metric, mean over seeds, with against without; measurable when the difference exceeds twice "
              "its standard error (Welch, from the seed spreads). Cost: wall minutes per run on the 2 cores, with "
              "against without (and what the cell paid once to prepare).",
              ""]
    for task, conf in TASKS.items():
        for off, on, lever in LEVERS:
            a, b = groups.get(f"{task}-{off}", []), groups.get(f"{task}-{on}", [])
            student = on.split("-")[0]
            if len(a) < 2 or len(b) < 2:
                continue
            va, vb = _values(a, conf["metric"]), _values(b, conf["metric"])
            diff = statistics.fmean(vb) - statistics.fmean(va)
            se = (statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb)) ** 0.5
            verdict = "measurable gain" if diff > 2 * se else ("measurable loss" if diff < -2 * se else "within noise")
            lines.append(f"- {task}, {STUDENT_LABELS[student]}, {lever}: {conf['metric']} {diff * 100:+.2f} points "
                         f"(± {2 * se * 100:.2f} at 2 SE): {verdict}; {_cost(a)} -> {_cost(b)} min per run.")
    return lines


def _worst_gap(group: list[dict[str, Any]], teacher: dict[str, float], metrics: tuple[str, ...]) -> float:
    """The largest distance below the teacher (points, metric x 100) over ``metrics``."""
    return max(100 * (teacher[m] - statistics.fmean(_values(group, m))) for m in metrics)


def _label(cell: str) -> str:
    _task, student, recipe = cell.split("-")
    return f"{STUDENT_LABELS[student]}, {RECIPES[recipe]['label']}"


def embedding_baseline(task: str) -> dict[str, float]:
    """No training at all: the cosine of the two sentences' mean input embeddings in the pca student's starting
    table (the teacher's word embeddings through their PCA, ``distill.student``), special tokens left out. STS-B:
    its Pearson and Spearman with the gold score; MRPC: accuracy, F1 and MCC at the threshold best on the train
    split."""
    import numpy as np
    import torch
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from distill.data import read_split
    from distill.models import load_teacher
    from distill.student import build_student
    from search_space import StudySpec

    spec = StudySpec.model_validate(spec_for(f"{task}-pca-kd"))
    teacher, tokenizer = load_teacher(spec.teacher)
    student = build_student(spec.student, teacher.config, seed=0, teacher_state=teacher.state_dict())
    table = student.get_input_embeddings().weight.detach()

    def cosines(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = read_split(spec.dataset, split)
        first, second = TASKS[task]["pairs"]

        def mean(texts: list[str]) -> torch.Tensor:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return torch.stack([table[i].mean(0) if i else torch.zeros(table.shape[1]) for i in ids])

        sims = torch.nn.functional.cosine_similarity(mean(list(rows[first])), mean(list(rows[second])), dim=1)
        return sims.numpy(), np.asarray(rows[spec.dataset.label_column], dtype=float)

    sims, gold = cosines(spec.dataset.eval_split)
    if TASKS[task]["metric"] == "pearson":
        return {"pearson": float(pearsonr(sims, gold)[0]), "spearmanr": float(spearmanr(sims, gold)[0])}
    train_sims, train_gold = cosines(spec.dataset.train_split)
    threshold = max(np.unique(train_sims), key=lambda t: accuracy_score(train_gold, train_sims >= t))
    predicted = sims >= threshold
    return {"accuracy": float(accuracy_score(gold, predicted)), "f1": float(f1_score(gold, predicted)),
            "matthews_correlation": float(matthews_corrcoef(gold, predicted)), "threshold": float(threshold)}


def write_report() -> None:
    payload = load_payload()
    runs = [r for r in payload.get("runs", []) if r["cell"] in CELL_ORDER]
    groups = _groups(runs)
    lines = [
        "# Students on every task: pre-distillation, transfer sets, layer terms", "",
        f"Generated by `python bench/tasks.py` (last run {max((r['finished'] for r in runs), default='-')}). Each "
        "run is the code a kdsearch worker runs (`DistillationEngine`): the teacher's outputs cached once per task, "
        "the transfer set built and labelled by the engine, a pre-distilled student built once per key "
        "(`distill.predistill`). Inputs are the tokenizer's pair encoding (segment ids included), max length 128. "
        "Every figure is on the validation split; each run names its machine (CPU model, cores, native bf16 or not) "
        "and precision.", "",
        "- KD: classification `alpha * CE + (1 - alpha) * T^2 * KL` (T 4); regression `alpha * MSE(gold) + "
        "(1 - alpha) * MSE(teacher)`; alpha 0.5; fine-tuning alone is alpha = 1. Batch 32, AdamW, linear decay; lr "
        "5e-4 for the 128/192-wide students from their own initialisation, 2e-4 from pre-distilled weights, 5e-5 for "
        "the truncated teacher. SST-2 (67k rows): batch 128 and lr 5e-4 for every student, 3 epochs at most "
        "(`pdaug4`: lr 3e-4, 2 epochs).",
        "- Pre-distillation (`predistill`): MiniLMv2 query/key/value self-attention relations (8 relation heads) of "
        "the teacher's last layer into the student's last layer, plus the last hidden states through a learned "
        "projection (MSE, weight 1; `pdrel`: relations alone), on the three shared tasks' texts (every split, "
        "both sides of a pair, labels never read; half the examples two sentences in the pair encoding), 3 epochs, "
        "lr 5e-4, batch 64; one build per teacher and student shape. `pdtaskpairtrain`: the task's own train pairs "
        "(labels never read) twice more among the examples, and no text of its validation split; `pdtaskpair`: its "
        "validation pairs too, which makes the cell transductive (the student is fitted to the teacher's internals "
        "on the very pairs it is scored on; not counted towards a target).",
        "- Pair corpus matched to the label mix (`pdpairbal`, `augment.match_label_mix`): each round of the "
        "teacher-labelled set keeps a seeded sample at the train split's label mix.",
        "- Transfer set (`augment.copies` k): k teacher-labelled variants per train row, no gold label; an epoch is "
        "k + 1 times the train split.",
        "- Each metric: the best epoch's (by the study metric), mean ± sample std over the seeds listed. MRPC's "
        "validation split has 408 pairs, 68% of them paraphrases: F1 0.81 is what answering \"equivalent\" to "
        "everything scores, so accuracy and the Matthews correlation are the honest figures.", "",
    ]
    for task in TASKS:
        if any(c.startswith(task + "-") for c in groups):
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
    parser.add_argument("--baselines", action="store_true",
                        help="the no-training embedding-cosine baseline of each pair task (seconds)")
    parser.add_argument("--report", action="store_true", help="only re-render the report from the JSON")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    args = parser.parse_args()
    if args.note:
        merge_results(RESULTS_JSON, [], {"notes": load_payload().get("notes", []) + args.note}, key=_key)
    if args.list:
        for cell in CELL_ORDER:
            print(f"{cell:20s} {_label(cell)}, {epochs_of(cell)} epochs")
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
        if args.baselines:
            baselines = {task: embedding_baseline(task) for task in TASKS if TASKS[task]["pairs"][1]}
            merge_results(RESULTS_JSON, [], {"baselines": baselines}, key=_key)
            write_report()
            return
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
