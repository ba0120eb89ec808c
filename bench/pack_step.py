"""One training step of a pack of K students: one by one (``loop``) against stacked (``distill.stacked``).

    python bench/pack_step.py                      # CPU: K = 1, 2, 4, 8
    python bench/pack_step.py --cuda               # GPU: K = 1, 4, 16, 64
    python bench/pack_step.py --ks 1,4 --steps 20 --reps 3

What ``KDSEARCH_PACK_STEP=auto`` is chosen by. The students are the trial_speed shape (L2-H128-A2-I512, BERT's
30,522-word vocabulary, random weights: only the shapes matter for speed), each with its own learning rate,
temperature and alpha; batches of 128 rows of random token ids at a fixed length (``--seq-len``: 40 on CPU, about an
SST-2 batch after length bucketing; 64 on CUDA), teacher logits random. Timed: ``--steps`` steps after ``--warmup``
untimed ones, the device synchronised around them; ``loop`` and ``stacked`` alternate within each repetition.
Reported: ms per step of the whole pack, ms per member, and the pack's speed-up in member-steps per second over
K = 1 run one by one (what packing would multiply trials per hour by, evaluation aside). Results are merged into
bench/results/pack-step-<device>.json and written to bench/results/pack-step-<device>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import machine_name, merge_results  # noqa: E402 - after the path
from bench.trial_speed import STUDENT  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VOCAB, BATCH = 30_522, 128


def build_pack(k: int, device: Any) -> list[Any]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from distill.packed import PackMember
    from distill.train import TrainConfig

    members = []
    for i in range(k):
        torch.manual_seed(100 + i)
        config = BertConfig(vocab_size=VOCAB, num_labels=2, **STUDENT)
        model = BertForSequenceClassification(config).to(device)
        cfg = TrainConfig.from_params({"learning_rate": 3e-4 * (1 + i % 5), "alpha": (i % 10) / 10,
                                       "num_train_epochs": 3, "temperature": 1.0 + i % 8, "batch_size": BATCH},
                                      regression=False, seed=100 + i)
        members.append(PackMember(model, cfg))
    return members


def stepper(kind: str, members: list[Any], device: Any) -> Any:
    from distill.stacked import StackedStudents
    from distill.train import LoopStep
    from search_space import TaskInfo

    task = TaskInfo("classification", 2, "accuracy", ("negative", "positive"))
    if kind == "stacked":
        return StackedStudents([m.model for m in members], [m.cfg for m in members], 8000, task, device)
    for member in members:
        member.model.train()
    return LoopStep(members, 8000, task, device)


def time_steps(step: Any, batch: tuple[Any, Any, Any], steps: int, warmup: int, device: Any) -> float:
    """Median ms of one step over ``steps`` timed steps."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step.step(*batch)
    sync()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step.step(*batch)
        sync()  # the one sync per step: the time is the device's, not the launch queue's
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--ks", default=None, help="pack sizes (default 1,2,4,8 on CPU, 1,4,16,64 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--report", action="store_true", help="only re-render the report from the JSON")
    args = parser.parse_args()
    device_name = "cuda" if args.cuda else "cpu"
    out = RESULTS / f"pack-step-{device_name}.json"
    if not args.report:
        measure(args, device_name, out)
    report(out, RESULTS / f"pack-step-{device_name}.md")


def measure(args: argparse.Namespace, device_name: str, out: Path) -> None:
    import torch

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device here")
    ks = [int(k) for k in (args.ks or ("1,4,16,64" if args.cuda else "1,2,4,8")).split(",")]
    steps = args.steps or (50 if args.cuda else 10)
    seq_len = args.seq_len or (64 if args.cuda else 40)
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, VOCAB, (BATCH, seq_len), generator=generator).to(device),
              "attention_mask": torch.ones(BATCH, seq_len, dtype=torch.long).to(device)}
    from kdsearch.terms import TeacherOutputs

    batch = (inputs, TeacherOutputs((torch.randn(BATCH, 2, generator=generator) * 3).to(device)),
             torch.randint(0, 2, (BATCH,), generator=generator).to(device))
    runs = []
    for rep in range(args.reps):
        for k in ks:
            for kind in ("loop", "stacked"):
                members = build_pack(k, device)
                load = os.getloadavg()[0]
                ms = time_steps(stepper(kind, members, device), batch, steps, args.warmup, device)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                runs.append({"k": k, "step": kind, "rep": rep, "ms_per_step": round(ms, 2), "steps": steps,
                             "seq_len": seq_len, "load_before": round(load, 2), "peak_gib": peak,
                             "threads": torch.get_num_threads()})
                print(f"rep {rep} K={k:3d} {kind:8s} {ms:9.1f} ms/step  {ms / k:8.1f} ms/member  load {load:.2f}",
                      flush=True)
                del members
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    merge_results(out, runs, {"machine": machine_name(device_name), "torch": torch.__version__,
                              "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")},
                  key=lambda r: (r["k"], r["step"], r["rep"], r["seq_len"]))


def report(path: Path, md: Path) -> None:
    import json

    payload = json.loads(path.read_text())
    runs = payload["runs"]
    by: dict[tuple[int, str, int], list[float]] = {}
    for run in runs:
        by.setdefault((run["k"], run["step"], run["seq_len"]), []).append(run["ms_per_step"])
    lines = [f"# One training step of a pack of K students ({payload['machine']})", "",
             f"Generated by `python bench/pack_step.py{' --cuda' if 'cuda' in md.name else ''}` ({payload['when']}, "
             f"torch {payload['torch']}). L2-H128-A2-I512 students (30,522-word vocabulary, random weights), batch "
             f"{BATCH}, each member its own lr, T and alpha. Median ms per step over the timed steps; the median of "
             "the repetitions below. Speed-up: member-steps per second against K = 1 one by one (the same "
             "sequence length).", "",
             "| K | seq len | loop ms/step | stacked ms/step | loop ms/member | stacked ms/member | stacked vs loop "
             "| loop speed-up | stacked speed-up | repetitions | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, seq_len in sorted({(k, s) for k, _, s in by}):
        loop, stacked = by.get((k, "loop", seq_len)), by.get((k, "stacked", seq_len))
        base = by.get((1, "loop", seq_len))
        if not loop or not stacked or not base:
            continue
        lm, sm, bm = statistics.median(loop), statistics.median(stacked), statistics.median(base)
        loads = [r["load_before"] for r in runs if r["k"] == k and r["seq_len"] == seq_len]
        lines.append(f"| {k} | {seq_len} | {lm:.1f} | {sm:.1f} | {lm / k:.1f} | {sm / k:.1f} | {lm / sm:.2f}x | "
                     f"{bm * k / lm:.2f}x | **{bm * k / sm:.2f}x** | {len(loop)} | {min(loads):.2f}-{max(loads):.2f} |")
    notes = md.with_suffix(".notes.md")
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
