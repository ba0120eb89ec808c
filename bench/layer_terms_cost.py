"""Cost of the layer-wise distillation terms (issue 25): seconds per training epoch of a trial with the hidden,
attention-relation and embedding terms on (the teacher run live on every batch) against a logit-only trial.

    python bench/layer_terms_cost.py [--rows 1000] [--precision bf16|fp32] [--threads 1]

An L2-H128-A2-I512 student on the first ``--rows`` MRPC training pairs from ../shared (max length 128, batch 32,
one epoch), the shared MRPC teacher (MiniLM-L6-H384) run live for the layer terms. The teacher's logits are a
placeholder (random: what they are does not change the time; a study reads them from its cache). Evaluation is on 32
rows (its time is in neither number: the epoch's training steps are timed alone). One thread, as a CPU worker runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
if not SHARED.exists():
    SHARED = Path("/work/shared")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", default="logits,layers")
    parser.add_argument("--teacher-only", action="store_true")
    args = parser.parse_args()
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    from distill import train as train_module
    from distill.data import TokenizedSplit
    from distill.train import TrainConfig, train_student
    from search_space import TaskInfo

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    print(f"load (1 min) at start: {os.getloadavg()[0]:.2f}")
    teacher_dir = SHARED / "models" / "mrpc-teacher"
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    with open(SHARED / "data" / "mrpc" / "train.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:args.rows + 32]
    encoded = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True,
                        max_length=128, padding="max_length", return_tensors="pt")
    lengths = encoded["attention_mask"].sum(1)
    labels = torch.tensor([int(r["label"]) for r in rows])

    def split(sl: slice) -> TokenizedSplit:
        return TokenizedSplit(encoded["input_ids"][sl], lengths[sl], labels[sl], pad_id=tokenizer.pad_token_id,
                              token_type_ids=encoded["token_type_ids"][sl])

    train, eval_split = split(slice(0, args.rows)), split(slice(args.rows, args.rows + 32))
    logits = torch.randn(args.rows, 2, generator=torch.Generator().manual_seed(0))
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    task = TaskInfo("classification", 2, "accuracy", ("0", "1"))
    base = {"learning_rate": 3e-4, "alpha": 0.5, "temperature": 4.0, "num_train_epochs": 1, "batch_size": 32}
    configs = {
        "logits": {},
        "hidden": {"hidden_weight": 1.0},
        "attention": {"attention_weight": 1.0},
        "layers": {"hidden_weight": 1.0, "attention_weight": 1.0, "embedding_weight": 1.0},
    }
    # Time the epoch's training steps alone: evaluation is wrapped out.
    evaluate = train_module.evaluate
    eval_seconds: list[tuple[float, float]] = []

    def timed_evaluate(*a, **k):  # type: ignore[no-untyped-def]
        started, cpu_started = time.perf_counter(), time.process_time()
        out = evaluate(*a, **k)
        eval_seconds.append((time.perf_counter() - started, time.process_time() - cpu_started))
        return out

    train_module.evaluate = timed_evaluate
    if args.teacher_only:  # the live teacher's share: its forward passes alone over the epoch's batches
        from distill.data import length_bucketed_batches
        from distill.internals import teacher_internals
        from kdsearch.terms import Needs

        for label, needs in (("hidden states", Needs(teacher_hidden_states=True)), ("q/k/v", Needs(teacher_qkv=True))):
            cpu_started = time.process_time()
            for idx in length_bucketed_batches(train.lengths, 32, torch.Generator().manual_seed(0), 50):
                teacher_internals(teacher, train.batch(idx), logits[idx], needs, args.precision)  # type: ignore[arg-type]
            print(f"teacher forward alone ({label}): {time.process_time() - cpu_started:.1f} s CPU per epoch")
    results: dict[str, tuple[float, float]] = {}
    for name in ["warm-up", *args.configs.split(",")]:
        torch.manual_seed(33)
        student = BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=512, num_labels=2))
        cfg = TrainConfig.from_params({**base, **configs.get(name, configs["layers"])}, regression=False, seed=33,
                                      precision=args.precision)
        rows = train if name != "warm-up" else split(slice(0, 64))  # first calls' one-off costs, not timed
        started = time.perf_counter()
        cpu_started = time.process_time()
        result = train_student(student, rows, logits, eval_split, cfg, task=task, teacher=teacher)
        wall = time.perf_counter() - started - eval_seconds[-1][0]
        cpu = time.process_time() - cpu_started - eval_seconds[-1][1]
        if name == "warm-up":
            continue
        results[name] = (wall, cpu)
        print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU per epoch of training ({args.rows} rows, "
              f"{args.precision}, {args.threads} thread(s)); loss {result.history[0].train_loss:.3f}", flush=True)
    if "logits" in results:
        for name, (wall, cpu) in results.items():
            print(f"ratio {name} / logits: {wall / results['logits'][0]:.2f}x wall, "
                  f"{cpu / results['logits'][1]:.2f}x CPU")
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    print(f"cpu: {model}; avx512_bf16: {'avx512_bf16' in cpuinfo}; load (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
