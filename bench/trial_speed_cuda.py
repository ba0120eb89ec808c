"""GPU mode of bench/trial_speed.py: a random-weight BERT-base-shaped teacher and a BERT-Tiny-shaped student over
SST-2-length synthetic batches (timing does not depend on the weights), and trials per GPU-hour when N trial
processes share the GPU (what ``kdsearch worker --gpus all --workers-per-gpu N`` does).

    python bench/trial_speed.py --cuda
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
N_TRAIN, N_EVAL, EPOCHS, BATCH = 8000, 872, 3, 128
TEACHER = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
STUDENT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}


def synthetic_lengths(n: int, seed: int):  # type: ignore[no-untyped-def]
    """Token lengths shaped like SST-2 train (median about 10, long tail to about 66)."""
    import torch

    normal = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return (normal * 0.6 + 2.4).exp().clamp(3, 66).round().long()  # log-normal


def make_split(n: int, seed: int, vocab: int = 30522):  # type: ignore[no-untyped-def]
    import torch

    from distill.data import TokenizedSplit

    lengths = synthetic_lengths(n, seed)
    ids = torch.randint(1000, vocab, (n, int(lengths.max())), generator=torch.Generator().manual_seed(seed))
    ids[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return TokenizedSplit(ids, lengths, labels, 0)


def bert(shape: dict, seed: int):  # type: ignore[no-untyped-def]
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_labels=2, **shape))


def run_reference() -> dict:
    """The seed's cost structure: teacher forward + student step on randomly ordered, padded batches."""
    import torch

    from kdsearch.terms import distillation_loss

    device = torch.device("cuda")
    train = make_split(N_TRAIN, 0).to(device)
    teacher, student = bert(TEACHER, 0).to(device).eval(), bert(STUDENT, 1).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=7.2e-4)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for epoch in range(EPOCHS):
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(epoch)).to(device)
        for idx in perm.split(BATCH):
            ids, mask = train.batch(idx)  # padded to the batch's longest row, as DataCollatorWithPadding does
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            loss = distillation_loss(student(input_ids=ids, attention_mask=mask).logits, t_logits,
                                     train.labels[idx], 0.5, 4.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
            _ = loss.item()  # Trainer logs the loss every step
    torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - started}


def run_kdsearch() -> dict:
    import torch

    from distill import predict_logits
    from distill.train import TrainConfig, train_student

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    train, evaluation = make_split(N_TRAIN, 0), make_split(N_EVAL, 2)
    started = time.perf_counter()
    teacher = bert(TEACHER, 0)
    logits = predict_logits(teacher.to(device), train, 512, device)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    del teacher
    cfg = TrainConfig.from_params({"learning_rate": 7.2e-4, "temperature": 4.0, "alpha": 0.5,
                                   "num_train_epochs": EPOCHS, "batch_size": BATCH}, regression=False, seed=33)
    started = time.perf_counter()
    train_student(bert(STUDENT, 1), train.to(device), logits.to(device), evaluation.to(device), cfg)
    torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - started, "build_s": build_s}


def child(side: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, side], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trials_per_gpu_hour(processes: int) -> float:
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "kdsearch"], stdout=subprocess.DEVNULL, cwd=ROOT)
             for _ in range(processes)]
    for p in procs:
        p.wait()
    return processes * 3600 / (time.perf_counter() - started)


def cuda_main(reps: int) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device visible")
    runs: dict[str, list[dict]] = {"reference": [], "kdsearch": []}
    for _ in range(max(reps, 2)):
        for side in runs:
            runs[side].append(child(side))
            print(side, runs[side][-1], flush=True)
    med = {side: statistics.median(r["wall_s"] for r in rs) for side, rs in runs.items()}
    build = statistics.median(r["build_s"] for r in runs["kdsearch"])
    throughput = {n: trials_per_gpu_hour(n) for n in (1, 2, 4, 8)}
    name = torch.cuda.get_device_name().replace(" ", "-")
    lines = [
        f"# Trial speed on {torch.cuda.get_device_name()}",
        "",
        "Random-weight BERT-base-shaped teacher, BERT-Tiny-shaped student, 8,000 synthetic SST-2-length rows, "
        "3 epochs, batch 128. Reference: teacher forward every step on randomly ordered batches; kdsearch: "
        "cached teacher logits, length-bucketed batches, bf16 autocast, fused AdamW, TF32.",
        "",
        "| | reference | kdsearch | ratio |",
        "|---|---:|---:|---:|",
        f"| wall time per trial, median (s) | {med['reference']:.2f} | {med['kdsearch']:.2f} | "
        f"**{med['reference'] / med['kdsearch']:.1f}x** |",
        f"| teacher-logit cache build (s) | - | {build:.2f} | |",
        "",
        "| trial processes on the GPU | trials per GPU-hour |",
        "|---:|---:|",
        *[f"| {n} | {t:.0f} |" for n, t in throughput.items()],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"trial_speed-cuda-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_reference() if sys.argv[1] == "reference" else run_kdsearch()))
