"""Trials per hour through the real worker: precision, worker processes and packed trials.

    python bench/throughput.py                          # CPU: every configuration, SST-2 from ../shared
    python bench/throughput.py --configs fp32-1x2,fp32-2x1 --reps 2
    python bench/throughput.py --parity-seeds 5         # fp32 against bf16 accuracy over seeds
    python bench/throughput.py --cuda                   # GPU: random-weight models, synthetic SST-2-length data
    python bench/throughput.py --report

The workload is bench/trial_speed.py's: 8,000 SST-2 train rows, the 872 validation rows, an L2-H128-A2-I512 student,
3 epochs, batch 128, max length 128. Each configuration runs a fresh 16-trial study (random sampler, one seed, so
every configuration trains the same 16 parameter sets: the sampler is seeded per slot) through ``kdsearch serve``
and ``kdsearch worker --exit-when-idle`` processes, on SQLite, with the teacher-logit cache built beforehand (not
timed). Trials per hour = finished trials / (last trial's end - first trial's start), read from Optuna's own
timestamps; the wall time with process start-up is reported beside it. A configuration that would run far longer
than the baseline (bf16 emulated on a CPU without native bf16) is stopped at ``--max-minutes`` and scored on the
trials it finished. Configurations alternate (A B C ... A B C ...) with ``--reps``. Results are merged into
bench/results/throughput-<device>.json (resumable) and written to bench/results/throughput-<device>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import machine_name, merge_results  # noqa: E402 - after the path
from bench.trial_speed import INIT_SEED, MAX_LEN, N_TRAIN, STUDENT  # noqa: E402

SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache" / "throughput"
N_TRIALS = 16
# Searched around trial_speed's fixed parameters (lr 7.2e-4, T 4, alpha 0.5); epochs and batch fixed, so every trial
# costs the same and configurations compare on speed alone.
SEARCH_SPACE: dict[str, Any] = {
    "learning_rate": {"low": 3e-4, "high": 2e-3, "log": True},
    "temperature": {"low": 1.0, "high": 8.0},
    "alpha": {"low": 0.0, "high": 1.0},
    "num_train_epochs": 3,
    "batch_size": 128,
}
PARITY_PARAMS = {"learning_rate": 7.2e-4, "temperature": 4.0, "alpha": 0.5, "num_train_epochs": 3, "batch_size": 128}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    precision: str
    procs: int
    threads: int
    pack: int
    what: str
    step: str = "auto"  # --pack-step: how a pack trains (auto: stacked on CUDA, loop on CPU)


CPU_CONFIGS = [
    Config("fp32-1x2", "fp32", 1, 2, 1, "today: fp32, one worker with 2 threads"),
    Config("bf16-1x2", "bf16", 1, 2, 1, "bf16 autocast, one worker with 2 threads"),
    Config("fp32-2x1", "fp32", 2, 1, 1, "fp32, --procs 2 --threads-per-proc 1"),
    Config("bf16-2x1", "bf16", 2, 1, 1, "bf16 and --procs 2 --threads-per-proc 1"),
    Config("pack2", "fp32", 1, 2, 2, "fp32, one 2-thread worker, --pack 2"),
    Config("pack4", "fp32", 1, 2, 4, "fp32, one 2-thread worker, --pack 4"),
    Config("pack8", "fp32", 1, 2, 8, "fp32, one 2-thread worker, --pack 8"),
    Config("pack4-stacked", "fp32", 1, 2, 4, "fp32, one 2-thread worker, --pack 4 --pack-step stacked", "stacked"),
]
CUDA_CONFIGS = [
    Config("cuda-k1", "auto", 1, 1, 1, "one worker, K = 1"),
    Config("cuda-k4", "auto", 1, 1, 4, "one worker, --pack 4 (auto: stacked)"),
    Config("cuda-k16", "auto", 1, 1, 16, "one worker, --pack 16 (auto: stacked)"),
    Config("cuda-k64", "auto", 1, 1, 64, "one worker, --pack 64 (auto: stacked)"),
    Config("cuda-k16-loop", "auto", 1, 1, 16, "one worker, --pack 16 --pack-step loop", "loop"),
    Config("cuda-w4", "auto", 4, 1, 1, "--workers-per-gpu 4, K = 1"),
]
BASELINE = {"cpu": "fp32-1x2", "cuda": "cuda-k1"}
TARGET = {"cpu": 2.5, "cuda": 10.0}


def spec_for(data: Path, teacher: Path, name: str, n_trials: int) -> dict[str, Any]:
    return {"name": name, "teacher": str(teacher), "student": {"config": STUDENT},
            "dataset": {"path": str(data), "max_train_samples": N_TRAIN, "max_seq_length": MAX_LEN},
            "search_space": SEARCH_SPACE, "n_trials": n_trials, "sampler": "random", "pruner": "none",
            "seed": INIT_SEED}


def load_average() -> float:
    return os.getloadavg()[0]


def worker_args(config: Config, device: str) -> list[str]:
    if device == "cuda":
        where = ["--gpus", "0", "--workers-per-gpu", str(config.procs)]
    else:
        where = ["--device", "cpu", "--procs", str(config.procs), "--threads-per-proc", str(config.threads)]
    packing = ["--pack", str(config.pack), "--pack-step", config.step] if config.pack > 1 else []  # K = 1: no pack
    return [*where, *packing, "--exit-when-idle"]


def run_config(config: Config, data: Path, teacher: Path, device: str, n_trials: int, max_minutes: float,
               rep: int) -> dict[str, Any]:
    """One configuration's study through a real API and real worker processes."""
    import httpx
    import optuna
    from optuna.trial import TrialState

    from kdsearch.testing import KDSEARCH, Stack

    with tempfile.TemporaryDirectory(prefix="kdsearch-throughput-") as tmp:
        root = Path(tmp)
        stack = Stack(f"sqlite:///{root / 'kd.db'}", root, KDSEARCH_ARTIFACTS=str(CACHE / f"artifacts-{device}"),
                      KDSEARCH_PRECISION=config.precision, KDSEARCH_POLL_INTERVAL="0.5",
                      KDSEARCH_ALLOWED_ROOTS=os.pathsep.join([str(ROOT), str(SHARED), str(CACHE)]))
        try:
            stack.start_api()
            name = f"{config.name}-{rep}"
            stack.submit(spec_for(data, teacher, name, n_trials))
            load_before = load_average()
            started = time.monotonic()
            worker = subprocess.Popen([*KDSEARCH, "worker", *worker_args(config, device)], env=stack.env,
                                      stdout=open(root / "worker.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)  # noqa: SIM115
            try:
                code = worker.wait(timeout=max_minutes * 60)
                stopped_early = False
            except subprocess.TimeoutExpired:
                worker.send_signal(signal.SIGTERM)  # running trials stop at their next epoch boundary
                code = worker.wait(timeout=600)
                stopped_early = True
            wall_s = time.monotonic() - started
            load_after = load_average()
            if code != 0:
                raise RuntimeError(f"{config.name}: worker exited {code}:\n{(root / 'worker.log').read_text()[-3000:]}")
            study = optuna.load_study(study_name=name, storage=stack.env["KDSEARCH_DATABASE_URL"])
            done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
            if not done:
                raise RuntimeError(f"{config.name}: no trial finished in {max_minutes} min")
            first = min(t.datetime_start for t in done if t.datetime_start)
            last = max(t.datetime_complete for t in done if t.datetime_complete)
            span_s = (last - first).total_seconds()
            detail = httpx.get(f"{stack.url}/api/studies/{name}/trials", timeout=60).json()["trials"]
            precisions = sorted({t["precision"] for t in detail if t.get("precision")})
        finally:
            stack.stop()
    values = {t.user_attrs["slot"]: t.value for t in done}
    return {
        "config": config.name, "rep": rep, "device": device, "machine": machine_name(device),
        "what": config.what, "precision": precisions, "trials": len(done), "span_s": round(span_s, 1),
        "wall_s": round(wall_s, 1), "trials_per_hour": round(len(done) / span_s * 3600, 1),
        "stopped_early": stopped_early, "accuracy_by_slot": values,
        "load_before": round(load_before, 2), "load_after": round(load_after, 2),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
    }


def run_parity(data: Path, teacher: Path, seeds: int, precision: str, device: str, results: Path) -> None:
    """Accuracy of one configuration (trial_speed's parameters) over ``seeds`` init seeds, in ``precision``; merged
    into ``results`` after every seed (an interrupted run keeps the seeds it finished)."""
    from distill import DistillationEngine
    from search_space import StudySpec

    engine = DistillationEngine(CACHE / f"artifacts-{device}", device=device, precision=precision,
                                log=lambda _m: None)
    prepared = engine.prepare(StudySpec.model_validate(spec_for(data, teacher, "parity", 1)))
    scores, seconds, loads = [], [], []
    for seed in range(1, seeds + 1):
        loads.append(load_average())
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            outcome = engine.run_trial(prepared, PARITY_PARAMS, seed, None, Path(tmp) / "ckpt")
            seconds.append(time.perf_counter() - started)
        scores.append(outcome.best_score)
        print(f"parity {precision} seed {seed}: accuracy {outcome.best_score:.4f} ({seconds[-1]:.0f} s)", flush=True)
        merge_results(results, [{"config": f"parity-{precision}", "rep": 0, "device": device,
                                 "precision": [engine.precision], "scores": scores, "seconds": seconds,
                                 "seeds_asked": seeds, "machine": machine_name(device), "load": load_average(),
                                 "loads": loads, "scored_in": "fp32",
                                 "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M")}], {},
                      key=lambda r: (r["config"], r["rep"]))


def prepare_cache(data: Path, teacher: Path, device: str) -> None:
    """The teacher-logit cache every configuration reads (built once, never timed)."""
    from distill import DistillationEngine
    from search_space import StudySpec

    DistillationEngine(CACHE / f"artifacts-{device}", device=device).prepare(
        StudySpec.model_validate(spec_for(data, teacher, "cache", 1)))


def synthetic_assets(root: Path, tiny: bool) -> tuple[Path, Path]:
    """A random-weight BERT-base-shaped teacher (BERT-Tiny-shaped with ``tiny``) with a 30,522-word word-level
    vocabulary, and SST-2-length synthetic sentences (bench/trial_speed_cuda.py's lengths): timing on a GPU does not
    depend on the weights, and ../shared does not travel to a lent GPU machine."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from bench.trial_speed_cuda import TEACHER, synthetic_lengths

    teacher_dir, data_dir = root / "teacher", root / "data"
    if (teacher_dir / "config.json").is_file() and (data_dir / "validation.tsv").is_file():
        return data_dir, teacher_dir
    words = [f"w{i}" for i in range(30522 - 5)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    teacher_dir.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(teacher_dir)
    torch.manual_seed(0)
    shape = STUDENT if tiny else TEACHER
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), num_labels=2, **shape)).save_pretrained(teacher_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n, seed in (("train", N_TRAIN, 0), ("validation", 872, 1)):
        lengths = synthetic_lengths(n, seed).tolist()
        rows = [" ".join(rng.choices(words, k=max(1, length - 2))) + f"\t{rng.randint(0, 1)}\n" for length in lengths]
        (data_dir / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(rows))
    return data_dir, teacher_dir


def _fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def write_report(device: str) -> None:
    import json

    path = RESULTS / f"throughput-{device}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    configs = CUDA_CONFIGS if device == "cuda" else CPU_CONFIGS
    lines = [f"# Trials per hour ({device})", "",
             f"Generated by `python bench/throughput.py{' --cuda' if device == 'cuda' else ''}` "
             f"(last run {max((r['date'] for r in runs), default='never')}). " + (__doc__ or "").split("\n\n")[2]
             .replace("\n", " "), ""]
    study_runs = [r for r in runs if not r["config"].startswith("parity")]
    if not study_runs:
        lines += ["**Not run**: " + ("no GPU was lent to any session so far; `python bench/throughput.py --cuda` "
                                     "on a CUDA machine fills this file." if device == "cuda" else "no runs yet."), ""]
    else:
        base = [r["trials_per_hour"] for r in study_runs if r["config"] == BASELINE[device]]
        base_rate = statistics.fmean(base) if base else None
        lines += [f"Machine: {study_runs[0]['machine']}.", "",
                  "| configuration | what | precision | runs | trials | trials/hour | x baseline (same rep) "
                  "| wall s (with start-up) | accuracy over the trials | 1-min load before → after |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
        for config in configs:
            mine = [r for r in study_runs if r["config"] == config.name]
            if not mine:
                lines.append(f"| {config.name} | {config.what} | | 0 | | not run | | | | |")
                continue
            rate = statistics.fmean(r["trials_per_hour"] for r in mine)
            accuracies = [v for r in mine for v in r["accuracy_by_slot"].values()]
            # Against the baseline of the same repetition (a batch run under the same conditions), averaged.
            base_by_rep = {r["rep"]: r["trials_per_hour"] for r in study_runs if r["config"] == BASELINE[device]}
            paired = [r["trials_per_hour"] / base_by_rep[r["rep"]] for r in mine if r["rep"] in base_by_rep]
            ratio = f"{statistics.fmean(paired):.2f}x" if paired else "—"
            early = " (stopped at the time limit)" if any(r["stopped_early"] for r in mine) else ""
            lines.append(
                f"| {config.name} | {config.what} | {', '.join(sorted({p for r in mine for p in r['precision']}))} "
                f"| {len(mine)} | {sum(r['trials'] for r in mine)}{early} | {rate:.0f} | {ratio} "
                f"| {_fmt([r['wall_s'] for r in mine], 0)} | {_fmt(accuracies)} "
                f"| {', '.join(str(r['load_before']) + ' → ' + str(r['load_after']) for r in mine)} |")
        base_by_rep = {r["rep"]: r["trials_per_hour"] for r in study_runs if r["config"] == BASELINE[device]}

        def paired(name: str) -> list[float]:
            """A configuration's trials per hour over the baseline's of the same repetition (batches differ)."""
            return [r["trials_per_hour"] / base_by_rep[r["rep"]] for r in study_runs
                    if r["config"] == name and r["rep"] in base_by_rep]

        best = max(configs, key=lambda c: statistics.fmean(paired(c.name) or [0.0]))
        best_paired = paired(best.name)
        if base_rate and best_paired:
            ratio_best = statistics.fmean(best_paired)
            met = ratio_best >= TARGET[device]
            lines += ["", f"Best: **{best.name}** at {ratio_best:.2f}x the baseline of its repetitions "
                          f"({'meets' if met else 'misses'} the ≥ {TARGET[device]}x target)."]
    parity = {r["config"]: r for r in runs if r["config"].startswith("parity")}
    if parity:
        lines += ["", "## fp32 against bf16 over seeds", "",
                  "trial_speed's parameters (lr 7.2e-4, T 4, alpha 0.5, 3 epochs, batch 128), init seeds 1…N, "
                  "in one process on the cached logits (`DistillationEngine.run_trial`). Each run trains in its "
                  "precision and is scored in fp32, as every trial is (the exported model's accuracy).", "",
                  "| precision | seeds | accuracy (scored in fp32) | seconds per trial | machine | 1-min load |",
                  "|---|---:|---|---:|---|---|"]
        for key in ("parity-fp32", "parity-bf16"):
            if key in parity:
                r = parity[key]
                asked = r.get("seeds_asked", len(r["scores"]))
                stopped = f" of {asked} (stopped for CPU time)" if asked > len(r["scores"]) else ""
                count = f"{len(r['scores'])}{stopped}"
                loads = r.get("loads") or [r["load"]]
                lines.append(f"| {r['precision'][0]} | {count} | {_fmt(r['scores'])} | {_fmt(r['seconds'], 1)} "
                             f"| {r['machine']} | {min(loads):.2f} to {max(loads):.2f} |")
    notes = RESULTS / f"throughput-{device}.notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    (RESULTS / f"throughput-{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="GPU mode: random-weight models, synthetic data")
    parser.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--reps", type=int, default=1, help="alternating repetitions of every configuration")
    parser.add_argument("--first-rep", type=int, default=0, help="number repetitions from here (keeps earlier ones)")
    parser.add_argument("--trials", type=int, default=N_TRIALS)
    parser.add_argument("--max-minutes", type=float, default=12.0, help="stop a configuration's study after this")
    parser.add_argument("--parity-seeds", type=int, default=0, help="fp32 against bf16 over this many seeds")
    parser.add_argument("--parity-precisions", default="fp32,bf16",
                        help="with --parity-seeds: the precisions to run (comma-separated; a rerun of one keeps the "
                             "other's recorded seeds)")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "sst2")
    parser.add_argument("--teacher", type=Path, default=SHARED / "models" / "sst2-teacher")
    parser.add_argument("--tiny", action="store_true", help="a check of the bench itself: tiny synthetic models")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"
    if args.report:
        write_report(device)
        return
    data, teacher = args.data, args.teacher
    if args.cuda or args.tiny:
        data, teacher = synthetic_assets(CACHE / ("synthetic-tiny" if args.tiny else "synthetic"), args.tiny)
    configs = CUDA_CONFIGS if args.cuda else CPU_CONFIGS
    if args.configs:
        wanted = [c.strip() for c in args.configs.split(",")]
        unknown = set(wanted) - {c.name for c in configs}
        if unknown:
            known = ", ".join(c.name for c in configs)
            parser.error(f"--configs: unknown {', '.join(sorted(unknown))}; known: {known}")
        configs = [c for c in configs if c.name in wanted]
    results = (CACHE / f"throughput-{device}-tiny.json") if args.tiny else RESULTS / f"throughput-{device}.json"
    prepare_cache(data, teacher, device)
    for precision in args.parity_precisions.split(",") if args.parity_seeds else ():
        run_parity(data, teacher, args.parity_seeds, precision, device, results)
    for rep in range(args.first_rep, args.first_rep + args.reps):
        for config in configs:
            print(f"{config.name} (rep {rep}): {config.what}", flush=True)
            run = run_config(config, data, teacher, device, args.trials, args.max_minutes, rep)
            print(f"  {run['trials']} trials in {run['span_s']:.0f} s: {run['trials_per_hour']:.0f} trials/hour "
                  f"(load {run['load_before']} → {run['load_after']})", flush=True)
            merge_results(results, [run], {}, key=lambda r: (r["config"], r["rep"]))
    if not args.tiny:
        write_report(device)


if __name__ == "__main__":
    main()
