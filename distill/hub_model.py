"""Write a trial checkpoint out as a ready Hugging Face model directory with a Hub-ready model card."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from distill.engine import TRIAL_RECORD
from kdsearch.errors import Fault, KdsearchError
from kdsearch.objectives import COST_BY_NAME, COSTS, ObjectiveInfo
from kdsearch.terms import resolve_terms, search_params
from search_space import METRIC_TITLES, StudentSpec
from search_space.tasks import HUB_METRIC_IDS


class ExportError(KdsearchError, RuntimeError):
    """The export cannot be written as asked.

    ``Fault.USER``: the request is what cannot be met (no such trial, none within the limits, a non-empty or
    linked output folder, impossible options); the message says what to change. A ``RuntimeError`` still, for
    callers that catch that."""

    fault = Fault.USER


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def is_local_model(reference: str) -> bool:
    """Whether a teacher or student reference names a local folder rather than a Hub id: a folder that exists
    here, or a path (absolute, ``./``, ``../`` or ``~``) even where it does not (an export on another host)."""
    return Path(reference).expanduser().is_dir() or reference.startswith(("/", ".", "~"))


def model_reference(reference: str) -> str:
    """How a card names a model: a Hub id as it is, a local folder by its name alone (never a local path)."""
    return Path(reference).name if is_local_model(reference) else reference


def teacher_card_data(teacher: str) -> dict[str, Any]:
    """The teacher's own model card metadata (``license``, ``language``...); {} where it has no card or it
    cannot be read (a Hub teacher offline)."""
    from huggingface_hub import ModelCard

    try:
        if is_local_model(teacher):
            readme = Path(teacher).expanduser() / "README.md"
            return ModelCard.load(readme).data.to_dict() if readme.is_file() else {}
        return ModelCard.load(teacher).data.to_dict()
    except Exception:  # noqa: BLE001 - a missing, unreachable or malformed card only leaves the defaults
        return {}


def _listed(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _dataset_card_fields(dataset: dict[str, Any]) -> dict[str, str]:
    if dataset.get("hub"):
        return {"name": dataset["hub"], "type": dataset["hub"], "config": dataset.get("config") or ""}
    name = Path(dataset["path"]).name
    return {"name": name, "type": name, "config": ""}


def _augment_sentence(augment: dict[str, Any], regression: bool = False) -> str:
    if not augment.get("copies"):
        return ""
    target = "`MSE(student, teacher)`" if regression else "`T^2 * KL`"
    return (f" The train split was augmented with {augment['copies']} teacher-labelled variants per sentence "
            f"(word masking p={augment['p_mask']}, same-context word replacement p={augment['p_replace']}, "
            f"n-gram sampling p={augment['p_ngram']} with n up to {augment['max_ngram']}; seed {augment['seed']}, "
            "after Tang et al., 2019; a pair is augmented side by side); the variants have no gold label and were "
            f"trained on the teacher's outputs alone ({target})." + _pairs_sentence(augment.get("pairs") or {}))


def _pairs_sentence(pairs: dict[str, Any]) -> str:
    """What the pair strategies of ``augment.pairs`` (``distill.pair_corpus``) added, if any."""
    hard, rand, perturbed = (pairs.get(k) or 0 for k in ("hard_negatives", "random_pairs", "perturbed"))
    if not (hard or rand or perturbed):
        return ""
    return (f" Of the variant rows, a share of {hard:g} paired the first sentence with a lexically close sentence of "
            f"another pair (TF-IDF hard negatives), {rand:g} with a random one, and {perturbed:g} were perturbed "
            f"copies of the pair (words replaced by the teacher's embedding-space neighbours p={pairs['p_neighbour']}, "
            f"deleted p={pairs['p_delete']}, swapped p={pairs['p_swap']}; sentence order swapped "
            f"p={pairs['p_order']}); the rest were augmented side by side.")


def _predistilled_sentence(predistilled: dict[str, Any] | None) -> str:
    """The card's word on a student whose encoder started from pre-distilled weights (``distill.predistill``)."""
    if not predistilled:
        return ""
    hidden = (", and its last hidden states matched to the teacher's through a learned projection (TinyBERT, MSE "
              f"weight {predistilled['hidden_weight']:g})" if predistilled.get("hidden_weight") else "")
    pairs = ""
    if predistilled.get("task_pairs"):
        splits = predistilled.get("task_pair_splits") or []
        pairs = (f" The examples also held the task's own {predistilled['task_pairs']:,} pairs ({', '.join(splits)} "
                 f"split{'s' if len(splits) > 1 else ''}, {predistilled.get('task_pair_copies', 1)} times each).")
        if predistilled.get("scored_split") in splits:
            pairs += (f" Those include the {predistilled['scored_split']} split it is scored on: the score above is "
                      "transductive (the student was fitted to the teacher's internals on those very pairs) and says "
                      "nothing of pairs it has not seen.")
    return (f" Before task training, its encoder was pre-distilled from the teacher on {predistilled['sentences']:,} "
            f"unlabelled sentences ({predistilled['epochs']} epochs): the teacher's self-attention query, key and "
            f"value relations ({predistilled['relation_heads']} relation heads, MiniLMv2, Wang et al., 2021) "
            f"distilled into its last layer{hidden}; no labels read.{pairs}")


def _teacher_link(teacher: str) -> str:
    if is_local_model(teacher):
        return f"`{model_reference(teacher)}` (a local model)"
    return f"[{teacher}](https://huggingface.co/{teacher})"


def normalized_record(record: dict[str, Any]) -> dict[str, Any]:
    """A trial record with ``task``, ``metric``, ``score``, ``metrics`` and ``teacher_metrics``; records written
    before task metrics held ``eval_accuracy`` and ``teacher_eval_accuracy`` alone."""
    if "score" in record:
        return record
    accuracy = float(record["eval_accuracy"])
    teacher = record.get("teacher_eval_accuracy")
    history = [{**h, "score": h["eval_accuracy"], "metrics": {"accuracy": h["eval_accuracy"]}}
               for h in record.get("history", [])]
    return {**record, "metric": "accuracy", "score": accuracy, "metrics": {"accuracy": accuracy},
            "teacher_metrics": None if teacher is None else {"accuracy": teacher}, "history": history,
            "task": {"type": "classification", "metric": "accuracy", "metrics": ["accuracy"]}}


def record_degenerate(record: dict[str, Any]) -> str | None:
    """Why a trial record's best epoch is degenerate (``distill.task_metrics.degenerate_reason``, kept in each epoch
    of its history); None when it is not, or the record predates the check."""
    return next((h.get("degenerate") for h in record.get("history", []) if h.get("epoch") == record.get("best_epoch")),
                None)


def degenerate_warning(reason: str) -> list[str]:
    """The card's warning for a degenerate student (exported with ``--force``): a paragraph of its own."""
    return ["", f"> **Warning: this student is degenerate: {reason}.** Its scores on the evaluation set may look "
            "acceptable (a majority class can score a high F1 or accuracy), but it has learnt (almost) nothing "
            "about the task: do not use it.", ""]


def _title(metric: str) -> str:
    title = METRIC_TITLES.get(metric, metric)
    return title[0].upper() + title[1:]


def _seed_lines(seed_results: dict[int, float], metric: str, exported_seed: int, search_seed: int) -> list[str]:
    values = list(seed_results.values())
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.4f} (sample std)" if len(values) > 1 else ""
    per_seed = ", ".join(f"seed {seed}: {value:.4f}" for seed, value in seed_results.items())
    plural = "s" if len(values) > 1 else ""
    return [
        "## Results over seeds", "",
        f"The chosen configuration was retrained from the cached teacher logits with {len(values)} fresh "
        f"seed{plural} (none of them the search's seed {search_seed}, so the mean is not "
        "inflated by picking the best trial):", "",
        f"- {_title(metric)}: **{mean:.4f}{spread}** over {len(values)} seed{plural}",
        f"- Per seed: {per_seed}",
        f"- This export is seed {exported_seed}, the best of them; expect the mean from a rerun of the recipe.", "",
    ]


def _inputs_sentence(dataset: dict[str, Any]) -> str:
    if not dataset.get("text_pair_column"):
        return f"Inputs are single texts (column `{dataset['text_column']}`)."
    return (f"Inputs are sentence pairs (columns `{dataset['text_column']}` and `{dataset['text_pair_column']}`), "
            "encoded as the tokenizer's pair encoding with segment ids: give a text-classification pipeline "
            '`{"text": first, "text_pair": second}`.')


def _objective(params: dict[str, Any], regression: bool) -> str:
    """The trial's loss as its distillation terms that are on describe themselves (``kdsearch.terms``), with its
    settings, the layer mapping and the two-stage schedule where a layer-wise term is on."""
    settings = [s for s in resolve_terms(params, regression) if s.term.active(s.config)]
    terms = [setting.term.describe(setting.config, regression) for setting in settings]
    text = "; plus ".join(terms)
    if any(s.term.intermediate for s in settings):
        text += f" (layer mapping {params.get('layer_map', 'uniform')}"
        if int(params.get("intermediate_epochs", 0)):
            text += (f"; first {int(params['intermediate_epochs'])} epochs on the layer-wise terms alone, then the "
                     "others")
        text += ")"
    return text


VARIANT_LABELS = {"pytorch_fp32": "PyTorch fp32", "onnx_fp32": "ONNX fp32", "onnx_int8": "ONNX int8 (dynamic)"}


def deployment_lines(deployment: dict[str, Any]) -> list[str]:
    """The card's deployment section: each exported variant's file, metric and CPU latency, beside the teacher's."""
    metric = deployment["metric"]
    variants = deployment["variants"]
    base = variants["pytorch_fp32"]
    lines = ["## Deployment", ""]
    if deployment.get("int8_flagged"):
        lines += [f"> **Warning: the int8 model scores {deployment['int8_drop_points']:.2f} points below the fp32 "
                  f"one on {metric}** (more than 1 point): serve `onnx/model.onnx` instead, or check the int8 "
                  "model on your own data first.", ""]
    lines += [
        f"Every variant re-scored on the evaluation split ({deployment['eval_rows']} rows). The ONNX fp32 logits "
        f"match PyTorch's within atol {deployment['tolerance']['atol']:g} + rtol {deployment['tolerance']['rtol']:g} "
        f"(largest difference {deployment['max_abs_logit_diff']:.2g}). Latency per sequence on "
        f"{deployment['machine']}{_load_text(deployment)} with {deployment['threads']} thread(s), median of 5 "
        "passes over "
        f"{deployment['latency_rows']['batch1']} eval sequences at batch 1 and "
        f"{deployment['latency_rows']['batch32']} at batch 32, tokenization excluded.", "",
        f"| model | file | {METRIC_TITLES.get(metric, metric)} | ms/sequence, batch 1 | ms/sequence, batch 32 | "
        "speed-up vs PyTorch (batch 1 / 32) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, v in variants.items():
        lines.append(f"| {VARIANT_LABELS.get(name, name)} | `{v['file']}` | {v['metrics'][metric]:.4f} | "
                     f"{v['ms_batch1']:.2f} | {v['ms_batch32']:.3f} | {base['ms_batch1'] / v['ms_batch1']:.1f}x / "
                     f"{base['ms_batch32'] / v['ms_batch32']:.1f}x |")
    teacher = deployment.get("teacher")
    if teacher:
        ratio = f"{base['ms_batch1'] / teacher['ms_batch1']:.1f}x / {base['ms_batch32'] / teacher['ms_batch32']:.1f}x"
        lines.append(f"| teacher, PyTorch fp32 | | | {teacher['ms_batch1']:.2f} | {teacher['ms_batch32']:.3f} | "
                     f"{ratio} |")
    lines += ["", "Load the ONNX model with `onnxruntime.InferenceSession(\"onnx/model.onnx\")` (inputs: the "
              "tokenizer's `input_ids`, `attention_mask` and, where the model takes them, `token_type_ids`; output "
              "`logits`), or with optimum's `ORTModelForSequenceClassification.from_pretrained(\"onnx\")`: the "
              "directory holds the config and tokenizer too.", ""]
    return lines


def _load_text(measured: dict[str, Any]) -> str:
    """The host's load when a latency was measured (figures recorded before kdsearch kept it have none)."""
    load = measured.get("load_1min")
    return "" if load is None else f" (1-minute load average {load:.2f} when measured)"


def _shape_text(shape: dict[str, Any]) -> str:
    return (f"{shape.get('num_hidden_layers')} layers, hidden {shape.get('hidden_size')}, "
            f"{shape.get('num_attention_heads')} heads, intermediate {shape.get('intermediate_size')}")


def _cost_columns() -> list[tuple[str, ObjectiveInfo, str]]:
    """The cards' cost columns, in the registry's order: (header, cost, profile key), each cost followed by its
    extra columns (parameters, then without embeddings)."""
    return [column for cost in COSTS
            for column in [(cost.column, cost, cost.name), *((title, cost, key) for title, key in cost.extra_columns)]]


def _cost_cells(p: dict[str, Any]) -> str:
    return " | ".join(cost.format(float(p[key])) if p.get(key) is not None else "" for _, cost, key in _cost_columns())


def size_lines(profile: dict[str, Any], teacher: dict[str, Any] | None) -> list[str]:
    """The card's size-and-speed section: the student's shape and every cost of the registry beside the teacher's,
    as kdsearch measured them before training (``distill.profile``)."""
    columns = _cost_columns()
    how = [cost.measured.format_map(profile) for cost in COSTS if cost.measured and profile.get(cost.name) is not None]
    lines = [
        "## Size and speed", "",
        "Measured by kdsearch on the architecture" + (": " + "; ".join(how) if how else "")
        + f", on {profile['machine']}{_load_text(profile)}.", "",
        "| model | shape | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    rows = [("this student", profile), *([("teacher", teacher)] if teacher else [])]
    for label, p in rows:
        lines.append(f"| {label} | {_shape_text(p['shape'])} | {_cost_cells(p)} |")
    ratios = [f"{cost.read(profile) / cost.read(teacher):.1%} of its {cost.title}" for cost in COSTS
              if teacher and profile.get(cost.name) is not None and teacher.get(cost.name)]
    if ratios:
        lines += ["", "Against the teacher, the student has " + ", ".join(ratios[:-1])
                  + (" and " if len(ratios) > 1 else "") + ratios[-1] + "."]
    return [*lines, ""]


def front_lines(front: list[dict[str, Any]], trial_number: int, metric: str, cost: str, how: str) -> list[str]:
    """The card's Pareto section: the front this export was chosen from, the exported trial marked."""
    title = COST_BY_NAME[cost].title if cost in COST_BY_NAME else cost
    lines = [
        "## Pareto front", "",
        f"The study optimised {METRIC_TITLES.get(metric, metric)} (higher) and {title} (lower) "
        f"together, so it has no one best trial but a front of {len(front)} trial{'s' if len(front) != 1 else ''} that "
        f"no other trial beats on both. This model is trial {trial_number} ({how}).", "",
        f"| trial | {_title(metric)} | " + " | ".join(c.column for c in COSTS) + " | shape |",
        "|---|---:|" + "---:|" * len(COSTS) + "---|",
    ]
    for entry in front:
        p = entry.get("profile") or {}
        mark = " (this model)" if entry["number"] == trial_number else ""
        cells = " | ".join(c.format(c.read(p)) if p.get(c.name) is not None else "" for c in COSTS)
        lines.append(f"| {entry['number']}{mark} | {entry['value']:.4f} | {cells} | "
                     f"{_shape_text(p['shape']) if p.get('shape') else ''} |")
    return [*lines, ""]


_PAIR_SCORING = {
    "cosine": "the pair scored by the cosine of their mean encodings",
    "interaction": "the pair scored from their mean encodings u and v by a linear head over "
                   "(cos, u, v, |u - v|, u * v)",
}


def _how_to_use(name: str, pair: bool, regression: bool, siamese_scoring: str | None = None) -> list[str]:
    call = ('classifier({"text": "first sentence", "text_pair": "second sentence"})' if pair
            else 'classifier("a sentence to classify")')
    note = ("# a regression head: pass function_to_apply=\"none\" for the raw score"
            if regression else "# [{'label': ..., 'score': ...}]")
    remote = ", trust_remote_code=True" if siamese_scoring else ""
    lines = [
        "## How to use", "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("text-classification", model="{name}"{remote})  # this folder, or the Hub repo '
        "it is uploaded to",
        f"{call}  {note}",
        "```", "",
    ]
    if siamese_scoring:
        lines += [f"A siamese student: each sentence is encoded on its own, {siamese_scoring} "
                  "(`modeling_siamese.py`, beside the weights, is its code; `trust_remote_code=True` runs it). It "
                  "takes the tokenizer's pair encoding, like the teacher.", ""]
    return lines


def _intended_uses(task_desc: str, dataset_name: str, teacher_name: str, metric: str) -> list[str]:
    return [
        "## Intended uses & limitations", "",
        f"A smaller, faster stand-in for the teacher `{teacher_name}` on its own task ({task_desc} on "
        f"{dataset_name}), where the teacher's accuracy is not needed at any cost. It was trained to imitate that "
        "teacher, so it inherits the teacher's errors and biases, and knows nothing the teacher's task data did not "
        "show it. It has not been evaluated beyond the evaluation split named below; the search chose this trial by "
        f"its {METRIC_TITLES.get(metric, metric)} on that same split, so the figure is optimistic for new data of "
        "the same kind (retrain over seeds with `export-best --seeds N` for an unbiased mean), and unknown for text "
        "of another domain.", "",
    ]


def model_card(*, name: str, spec: dict[str, Any], record: dict[str, Any], trial_number: int, n_trials_run: int,
               study_name: str, seed_results: dict[int, float] | None = None,
               deployment: dict[str, Any] | None = None, selection: str | None = None,
               profile: dict[str, Any] | None = None, teacher_profile: dict[str, Any] | None = None,
               front: list[dict[str, Any]] | None = None, teacher_card: dict[str, Any] | None = None,
               widget_text: str | None = None) -> str:
    """A Hub-ready card with every metric of the task. ``seed_results`` (seed → the study's metric of a
    retraining) adds the mean and spread; ``deployment`` (``distill.deploy.deploy``) the ONNX variants;
    ``profile`` and ``teacher_profile`` the size and speed section; ``front`` (a study with several objectives:
    number, value and profile of each front trial) the front this trial was chosen from, ``selection`` how.
    ``teacher_card`` (``teacher_card_data``) gives the license and language unless the spec's ``card`` does;
    ``widget_text`` the Hub widget's example (single-text tasks)."""
    record = normalized_record(record)
    params = record["params"]
    dataset = spec["dataset"]
    ds = _dataset_card_fields(dataset)
    metric = record["metric"]
    metrics: dict[str, float] = record["metrics"]
    regression = record["task"]["type"] == "regression"
    num_labels = record["task"].get("num_labels")
    task_desc = "regression" if regression else f"{num_labels}-class classification" if num_labels else "classification"
    history = record["history"]
    best = next((h for h in history if h["epoch"] == record["best_epoch"]), history[-1] if history else None)
    student = spec["student"]
    shape = (profile or {}).get("shape")
    if student.get("model"):
        student_desc = student["model"]
    elif student.get("config"):
        student_desc = f"fresh, {_shape_text(shape)}" if shape else f"fresh {json.dumps(student['config'])}"
    else:
        layers = shape["num_hidden_layers"] if shape else student["truncate_teacher"]["num_layers"]
        student_desc = f"{layers} layers truncated from the teacher"
    searched = [k for k, v in (student.get("config") or student.get("truncate_teacher") or {}).items()
                if isinstance(v, dict)]
    if searched:
        student_desc += f" (shape searched: {', '.join(searched)})"
    siamese_scoring = None
    if student.get("pair_encoding") == "siamese":
        features = StudentSpec.model_validate(student).pair_features(1 if regression else int(num_labels or 2))
        siamese_scoring = _PAIR_SCORING[features]
        student_desc += f", siamese (each sentence encoded alone, {siamese_scoring})"
    chosen_how = selection if selection and selection != "the best trial" else None
    teacher_name = model_reference(spec["teacher"])
    card_spec = spec.get("card") or {}
    inherited = teacher_card or {}
    pair = bool(dataset.get("text_pair_column"))
    # The study's metric first (what the search optimised), then the others; only metrics with a Hub id.
    # The Hub's text-classification widget takes one text: an example for single-text tasks only.
    widget: dict[str, Any] = {"widget": [{"text": widget_text}]} if widget_text and not pair else {}
    hub_metrics = [(key, metrics[key]) for key in sorted(metrics, key=lambda k: k != metric) if key in HUB_METRIC_IDS]
    card_data = ModelCardData(
        model_name=name,
        # The model this one was distilled from; a local teacher by its folder's name (no local path in a card).
        base_model=teacher_name,
        license=card_spec.get("license") or inherited.get("license"),
        language=card_spec.get("language") or _listed(inherited.get("language")),
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["knowledge-distillation", "kdsearch"],
        datasets=[ds["name"]] if dataset.get("hub") else None,  # a Hub id only: a local folder is no dataset id
        metrics=sorted({HUB_METRIC_IDS[key][0] for key, _ in hub_metrics}),
        eval_results=[EvalResult(
            task_type="text-classification", task_name="Text Classification", dataset_type=ds["type"],
            dataset_name=ds["name"], dataset_config=ds["config"] or None, dataset_split=dataset["eval_split"],
            # The dataset's config name, as Trainer's model cards record it; huggingface_hub declares the field as
            # Metric.compute()'s arguments (dict[str, Any]), though it writes any value through to the card's YAML.
            dataset_args=ds["config"] or None,  # type: ignore[arg-type]
            metric_type=HUB_METRIC_IDS[key][0], metric_name=_title(key), metric_args=HUB_METRIC_IDS[key][1],
            metric_value=round(value, 4),
        ) for key, value in hub_metrics],
        **widget,
    )
    names = list(metrics)
    rows = "\n".join(
        f"| {h['train_loss']:.4f} | {h['epoch']:.1f} | {h['step']} | {h['eval_loss']:.4f} | "
        + " | ".join(f"{h['metrics'].get(k, float('nan')):.4f}" for k in names) + " |"
        for h in history
    )
    teacher = record.get("teacher_metrics") or {}
    chosen = f" (the study's metric, {'retrained' if seed_results else 'searched'} on)"
    precision = record.get("precision")
    degenerate = record_degenerate(record)
    lines = [
        "---", card_data.to_yaml(), "---", "",
        "<!-- This model card was generated by kdsearch export-best. -->", "",
        f"# {name}", "",
        f"This model is a distilled student of {_teacher_link(spec['teacher'])} on the "
        f"{ds['name']}{'/' + ds['config'] if ds['config'] else ''} dataset ({task_desc}), "
        + (f"trial {trial_number} ({chosen_how}) of a {n_trials_run}-trial kdsearch study `{study_name}`"
           if chosen_how else f"the best trial ({trial_number}) of a {n_trials_run}-trial kdsearch study "
                              f"`{study_name}` by {METRIC_TITLES.get(metric, metric)}")
        + (f", retrained with {len(seed_results)} seeds." if seed_results else "."),
        *(degenerate_warning(degenerate) if degenerate else []),
        "It achieves the following results on the evaluation set (measured in fp32, with the weights exported "
        "here" + (f"; the student trained in {precision}" if precision else "") + "):",
        f"- Loss: {best['eval_loss']:.4f}" if best else "- Loss: n/a",
        *(f"- {_title(k)}: {v:.4f}" + (chosen if k == metric else "") for k, v in metrics.items()),
        *( [f"- {_title(metric)} over {len(seed_results)} seeds: {statistics.fmean(seed_results.values()):.4f}"
            + (f" ± {statistics.stdev(seed_results.values()):.4f}" if len(seed_results) > 1 else "")]
           if seed_results else []),
        *( ["- Teacher on the same split: " + ", ".join(f"{_title(k)} {v:.4f}" for k, v in teacher.items())]
           if teacher else []),
        "",
        *(_seed_lines(seed_results, metric, int(record["seed"]), int(spec.get("seed", 33))) if seed_results else []),
        *(size_lines(profile, teacher_profile) if profile else []),
        *(front_lines(front, trial_number, metric, (spec.get("objectives") or ["metric", "cost"])[-1],
                      chosen_how or "chosen by number") if front is not None else []),
        *(deployment_lines(deployment) if deployment else []),
        *_how_to_use(name, pair, regression, siamese_scoring),
        *_intended_uses(task_desc, f"{ds['name']}{'/' + ds['config'] if ds['config'] else ''}", teacher_name,
                        metric),
        "## Model description", "",
        f"Student: {student_desc}. Trained by {_objective(params, regression)}; "
        "the teacher's outputs were computed once and cached for every trial. " + _inputs_sentence(dataset)
        + _predistilled_sentence(record.get("predistilled")), "",
        "## Training and evaluation data", "",
        f"Train split `{dataset['train_split']}`"
        + (f" (a fixed random subset of {n} rows)" if (n := dataset.get("max_train_samples")) else "")
        + f", evaluation split `{dataset['eval_split']}`, max sequence length {dataset['max_seq_length']}."
        + _augment_sentence(spec.get("augment") or {}, regression), "",
        "## Training procedure", "",
        "### Training hyperparameters", "",
        "The following hyperparameters were used during training:",
        f"- learning_rate: {params['learning_rate']}",
        *[f"- {p.name}: {params[p.name]}" for p in search_params()
          if p.name in params and not (regression and p.classification_only)],
        f"- train_batch_size: {params.get('batch_size', 128)}",
        f"- seed: {record['seed']}",
        *([f"- training_precision: {precision}"
           + (" (bf16 autocast of the student's forward pass; weights, loss and optimizer in fp32)"
              if precision == "bf16" else "")] if precision else []),
        "- optimizer: AdamW with betas=(0.9,0.999) and epsilon=1e-08",
        f"- weight_decay: {params.get('weight_decay', 0.0)}",
        "- lr_scheduler_type: linear",
        f"- lr_scheduler_warmup_ratio: {params.get('warmup_ratio', 0.0)}",
        f"- num_epochs: {params['num_train_epochs']}",
        f"- teacher: {teacher_name}",
        f"- student: {student_desc}",
        *([f"- student_shape: {json.dumps(shape)}"] if shape else []),
        f"- best epoch kept (by {METRIC_TITLES.get(metric, metric)}): {record['best_epoch']}"
        + (f" (trial stopped early: {record['stopped']})" if record.get("stopped") else ""),
        "",
        "### Training results", "",
        "| Training Loss | Epoch | Step | Validation Loss | " + " | ".join(_title(k) for k in names) + " |",
        "|:-------------:|:-----:|:----:|:---------------:|" + "".join(":-----:|" for _ in names),
        rows, "",
        "### Framework versions", "",
        f"- Transformers {_version('transformers')}",
        f"- Pytorch {_version('torch')}",
        f"- Optuna {_version('optuna')}",
        f"- kdsearch {_version('kdsearch')}", "",
    ]
    return "\n".join(lines)


def check_export_target(out_dir: Path, force: bool) -> None:
    """Refuse a target an export must not replace: a link (an export never writes through one), a file, or a
    directory with files in it unless ``force``."""
    if out_dir.is_symlink():
        raise ExportError(f"{out_dir} is a symbolic link; give a real directory (an export never writes through one)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} is not empty; pass --force to overwrite")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_abandoned_staging(out_dir: Path) -> list[Path]:
    """Remove what killed exports to ``out_dir`` left beside it: staging folders (and folders renamed aside for a
    swap) named for a process of this host that is gone. A live export's, or one whose name carries no process id,
    is left alone. Returns what was removed."""
    removed = []
    for sibling in out_dir.parent.glob(f".{out_dir.name}.export-*"):
        pid_text = sibling.name[len(f".{out_dir.name}.export-"):].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)) and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def export_staging_dir(out_dir: Path, force: bool = False) -> Path:
    """A fresh, empty folder beside ``out_dir`` (on its file system, so it can be renamed into place) that an export
    is built in; ``swap_in_export`` puts it in place of ``out_dir``. Its name carries this process's id, so the next
    export to ``out_dir`` removes it if this process is killed before the swap (``remove_abandoned_staging``)."""
    out_dir = Path(os.path.abspath(out_dir))
    check_export_target(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.export-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def swap_in_export(staging: Path, out_dir: Path, force: bool = False) -> None:
    """Put the export built in ``staging`` in place of ``out_dir``: the earlier export is renamed aside, the new one
    renamed in, then the earlier one removed (its files and links deleted, never followed), so no file of it is left
    behind and nothing is written through a link the target held."""
    out_dir = Path(os.path.abspath(out_dir))
    check_export_target(out_dir, force)  # again: the target may have changed while the export was built
    earlier = staging.with_name(f"{staging.name}.earlier") if out_dir.exists() else None
    if earlier is not None:
        os.rename(out_dir, earlier)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if earlier is not None:
            os.rename(earlier, out_dir)
        raise
    if earlier is not None:
        shutil.rmtree(earlier)


@contextmanager
def staged_export(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """A fresh folder beside ``out_dir`` to build an export in, swapped in for ``out_dir`` when the block ends
    without an error; on an error (or a failed swap) it is removed and ``out_dir`` is left as it was."""
    staging = export_staging_dir(out_dir, force)
    try:
        yield staging
        swap_in_export(staging, out_dir, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a swap


def fill_export(checkpoint_dir: Path, export_dir: Path, card: str) -> None:
    """Copy the checkpoint's model and tokenizer files into a fresh ``export_dir`` and add README.md.

    Contents only (``shutil.copyfile``), never the checkpoint's permissions: its files were written private (0600,
    as temporary files are), while an export's files get the user's umask, as any file they write."""
    for item in checkpoint_dir.iterdir():
        if item.name == TRIAL_RECORD:
            continue
        if item.is_dir():
            shutil.copytree(item, export_dir / item.name, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(item, export_dir / item.name)
    (export_dir / "README.md").write_text(card, encoding="utf-8")


def write_export(checkpoint_dir: Path, out_dir: Path, card: str, *, force: bool = False) -> Path:
    """The checkpoint's model and tokenizer files and README.md as ``out_dir``, built beside it and swapped in."""
    with staged_export(out_dir, force) as staging:
        fill_export(checkpoint_dir, staging, card)
    return Path(out_dir)
