"""The ``kdsearch`` command line: serve, worker, submit, status, cancel, retry, delete, export-best, db, demo."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdsearch.objectives import COSTS, ObjectiveInfo

EXIT_CODES = ("exit status: 0 success; 1 a failure at run time (the API or the database unreachable, a request the "
              "API refused, a study not found, an export step that failed); 2 a usage error (an unknown option, a "
              "wrong value, options that do not go together)")


def _fail(message: str, code: int = 1) -> int:
    """``message`` on stderr (any database password in it masked: every error the CLI shows passes here)."""
    from service.redaction import scrub_database_error

    print(f"kdsearch: error: {scrub_database_error(message, os.environ.get('KDSEARCH_DATABASE_URL'))}",
          file=sys.stderr)
    return code


def _client_settings() -> tuple[str, str | None]:
    """The API this client talks to and its token: ``KDSEARCH_URL`` and ``KDSEARCH_API_TOKEN`` from the
    environment or a ``.env`` file where the command runs (the server's own settings, read the same way)."""
    from pydantic import ValidationError

    from service.settings import get_settings

    try:
        settings = get_settings()
    except ValidationError as exc:
        raise SystemExit(_fail(f"invalid KDSEARCH_* setting: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}",
                               2)) from None
    return settings.url, settings.api_token


def _client_headers() -> dict[str, str]:
    token = _client_settings()[1]
    return {"Authorization": f"Bearer {token}"} if token else {}


def _console() -> Any:
    """A rich console: the terminal's width, or no width limit when the output is piped or redirected (rich would
    otherwise cut tables at 80 columns)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)


def _all_trials(url: str, study: str) -> list[dict[str, Any]]:
    """Every trial of a study, page by page (the API pages at 500)."""
    trials: list[dict[str, Any]] = []
    while True:
        page = _request("GET", f"{url}/api/studies/{study}/trials", params={"offset": len(trials), "limit": 500})
        trials += page["trials"]
        if not page["trials"] or len(trials) >= page["total"]:
            return trials


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _request(method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
    import httpx

    try:
        response = httpx.request(method, url, headers={**_client_headers(), **(headers or {})}, timeout=60, **kwargs)
    except httpx.HTTPError as exc:
        raise SystemExit(_fail(f"cannot reach the kdsearch API at {url}: {exc}")) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if isinstance(detail, list):  # pydantic errors: name each field
            detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
        raise SystemExit(_fail(f"{response.status_code}: {detail}"))
    return response.json() if response.content else None


def _check_database() -> str | None:
    """None when the configured database answers, else a one-line reason."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from service.redaction import mask_database_url, scrub_database_error
    from service.settings import get_settings
    from storage import make_engine, ping

    url = get_settings().database_url
    try:
        db = make_engine(url)
    except (ArgumentError, ValueError, ImportError) as exc:
        return scrub_database_error(f"KDSEARCH_DATABASE_URL {mask_database_url(url)!r} is not a database URL ({exc})",
                                    url)
    try:
        ping(db)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return scrub_database_error(f"cannot reach the database at {mask_database_url(url)}: "
                                    f"{reason[0] if reason else exc}", url)
    finally:
        db.dispose()
    return None


def _upgrade_database() -> str:
    """Bring the configured database to this release's schema; returns the revision (``SchemaMismatch`` for one
    newer than this release)."""
    from service.settings import get_settings
    from storage import make_engine, upgrade_schema

    db = make_engine(get_settings().database_url)
    try:
        return upgrade_schema(db)
    finally:
        db.dispose()


def cmd_db(args: argparse.Namespace) -> int:
    from service.settings import get_settings
    from storage import SchemaMismatch, current_revision, head_revision, make_engine, missing_sqlite_file

    url = get_settings().database_url
    if args.action == "current" and (missing := missing_sqlite_file(url)) is not None:  # would create it empty
        return _fail(f"no database at {url} ({missing} does not exist); set KDSEARCH_DATABASE_URL", 2)
    if problem := _check_database():
        return _fail(problem, 2)
    if args.action == "upgrade":
        try:
            revision = _upgrade_database()
        except SchemaMismatch as exc:
            return _fail(str(exc), 2)
        print(f"kdsearch schema at revision {revision}")
        return 0
    db = make_engine(url)
    try:
        current = current_revision(db)
    finally:
        db.dispose()
    print(f"database: {current or 'no kdsearch schema version'}; this kdsearch: {head_revision()}")
    return 0 if current == head_revision() else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api import create_app
    from service.settings import get_settings
    from storage import SchemaMismatch

    if problem := _check_database():
        return _fail(problem, 2)
    try:  # the API upgrades the schema at start-up (workers never do)
        revision = _upgrade_database()
    except SchemaMismatch as exc:
        return _fail(str(exc), 2)
    print(f"kdsearch: database schema at revision {revision}")
    settings = get_settings()
    host = args.host or "127.0.0.1"
    if not settings.api_token:
        if _is_loopback(host):
            print("kdsearch: no KDSEARCH_API_TOKEN set: listening on loopback only (set a token to expose it "
                  "with --host)")
        elif not args.allow_no_token:
            return _fail(f"--host {host}: listening beyond loopback needs KDSEARCH_API_TOKEN (or --allow-no-token "
                         "for a network you trust: anyone who reaches it could launch and cancel studies)", 2)
        else:
            print(f"kdsearch: warning: no KDSEARCH_API_TOKEN set and listening on {host}: anyone who reaches it "
                  "can launch studies", file=sys.stderr)
    print(f"kdsearch: serving the API and dashboard on http://{host}:{args.port}/", flush=True)
    _audit_to_stderr()
    uvicorn.run(create_app(settings, bind_host=host), host=host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to any interface


def _audit_to_stderr() -> None:
    """The API's audit lines (logger ``kdsearch.audit``: who deleted or re-queued what) go to stderr, whatever
    ``--log-level`` says."""
    audit = logging.getLogger("kdsearch.audit")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s AUDIT %(message)s"))
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    audit.propagate = False


def cmd_worker(args: argparse.Namespace) -> int:
    from service.settings import get_settings
    from service.supervisor import cpu_children, cpu_layout, gpu_children, run_worker_processes
    from service.worker import Worker, configure_logging, visible_gpus

    if problem := _check_database():
        return _fail(problem, 2)
    configure_logging(args.log_level.upper())
    extra = ["--log-level", args.log_level]
    if args.exit_when_idle:
        extra.append("--exit-when-idle")
    if args.max_trials is not None:
        extra += ["--max-trials", str(args.max_trials)]
    pack: str | None = None
    if args.pack is not None:
        from distill.packed import parse_pack

        try:
            pack = str(parse_pack(args.pack))
        except ValueError as exc:
            return _fail(f"--pack: {exc}", 2)
        extra += ["--pack", pack]
    if args.pack_step is not None:
        extra += ["--pack-step", args.pack_step]
    if args.gpus:
        gpus = visible_gpus(args.gpus)
        if not gpus:
            return _fail("--gpus: no CUDA device is visible on this host", 2)
        if problem := _check_schema():
            return _fail(f"worker not started: {problem}", 2)
        return run_worker_processes(gpu_children(gpus, args.workers_per_gpu, extra))
    from distill import resolve_device

    try:
        device = str(resolve_device(args.device))
    except RuntimeError as exc:
        return _fail(f"--device: {exc}", 2)
    threads = 0
    if device == "cpu":
        try:
            procs, threads = cpu_layout(args.procs, args.threads_per_proc)
        except ValueError as exc:
            return _fail(str(exc), 2)
        if procs > 1:
            if problem := _check_schema():
                return _fail(f"worker not started: {problem}", 2)
            return run_worker_processes(cpu_children(procs, threads, extra))
    elif args.procs not in ("auto", "1"):
        return _fail(f"--procs is for CPU workers (this one runs on {device}); use --gpus with "
                     "--workers-per-gpu for several GPU workers", 2)
    from storage import SchemaMismatch

    settings = get_settings()
    if threads:
        settings = settings.model_copy(update={"threads": threads})
    if pack is not None:
        settings = settings.model_copy(update={"pack": pack})
    if args.pack_step is not None:
        settings = settings.model_copy(update={"pack_step": args.pack_step})
    try:
        worker = Worker(settings, device=device, exit_when_idle=args.exit_when_idle, max_trials=args.max_trials)
    except SchemaMismatch as exc:
        return _fail(f"worker not started: {exc}", 2)
    return worker.run()


def _check_schema() -> str | None:
    """Why this database's schema does not match this release's (workers never migrate), or None."""
    from service.settings import get_settings
    from storage import SchemaMismatch, check_schema, make_engine

    db = make_engine(get_settings().database_url)
    try:
        check_schema(db)
    except SchemaMismatch as exc:
        return str(exc)
    finally:
        db.dispose()
    return None


def _count_or_auto(value: str) -> str:
    if value == "auto" or (value.isdigit() and 1 <= int(value) <= 256):
        return value
    raise argparse.ArgumentTypeError(f"expected a number from 1 to 256 or 'auto', not {value!r}")


def _local_path(value: Any, cwd: Path) -> Any:
    """A relative or ``~`` path that exists from ``cwd``, made absolute; anything else (a hub id, a path that is not
    here, a value that is not text) as it is, for the server to judge."""
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    path = cwd / Path(value).expanduser()
    return os.path.abspath(path) if path.exists() else value


def absolute_paths(spec: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """The spec with its local paths (teacher, student model, dataset directory, pre-distillation corpus
    directories) resolved from ``cwd``, where the user stands: the server would resolve them from its own working
    directory."""
    spec = dict(spec)
    if "teacher" in spec:
        spec["teacher"] = _local_path(spec["teacher"], cwd)
    for section, key in (("student", "model"), ("dataset", "path")):
        if isinstance(spec.get(section), dict) and key in spec[section]:
            spec[section] = {**spec[section], key: _local_path(spec[section][key], cwd)}
    predistill = spec.get("predistill")
    if isinstance(predistill, dict) and isinstance(predistill.get("corpus"), list):
        spec["predistill"] = {**predistill, "corpus": [
            {**source, "path": _local_path(source["path"], cwd)} if isinstance(source, dict) and "path" in source
            else source for source in predistill["corpus"]]}
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        spec = json.loads(Path(args.spec).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return _fail(f"cannot read {args.spec}: {exc}", 2)
    if not isinstance(spec, dict):
        return _fail(f"{args.spec} holds no JSON object (a study spec)", 2)
    spec = absolute_paths(spec, Path.cwd())
    if args.name:
        spec["name"] = args.name
    # Sent as read: a NaN or Infinity literal stays one (httpx's JSON encoder refuses them), so the server's 422
    # names its field.
    study = _request("POST", f"{args.url}/api/studies", content=json.dumps(spec),
                     headers={"Content-Type": "application/json"})
    print(f"queued study {study['name']} (id {study['id']}, {study['n_trials']} trials)")
    print(f"dashboard: {args.url}/studies/{study['name']}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    study = _request("POST", f"{args.url}/api/studies/{args.study}/cancel", json={})
    print(f"study {study['name']} is {study['status']}: no new trials start, running ones stop at their next epoch "
          f"({study['finished']}/{study['n_trials']} finished)")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    before = _request("GET", f"{args.url}/api/studies/{args.study}")
    study = _request("POST", f"{args.url}/api/studies/{args.study}/retry", json={})
    queued = study["counts"]["waiting"] - before["counts"]["waiting"]
    print(f"study {study['name']} is {study['status']}: {queued} failed trial(s) queued again")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _request("DELETE", f"{args.url}/api/studies/{args.study}", json={})
    print(f"deleted study {args.study}: its trial slots, checkpoints and Optuna study; its name is free again")
    return 0


def cmd_trials(args: argparse.Namespace) -> int:
    """A study's trials, every page: a table, or JSON (``--json``, as ``optuna trials -f json``)."""
    from rich.markup import escape
    from rich.table import Table

    trials = [t for t in _all_trials(args.url, args.study) if args.state is None or t["state"] == args.state]
    if args.json:
        _print_json(trials)
        return 0
    table = Table("#", "state", "value", "best epoch", "epochs", "params", "precision", "worker", "duration s", "note")
    for t in trials:
        table.add_row(str(t["number"]), t["state"], f"{t['value']:.4f}" if t["value"] is not None else "",
                      str(t.get("best_epoch") or ""), str(len(t["epochs"])),
                      escape(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in t["params"].items())),
                      t.get("precision") or "", escape(t.get("worker") or ""),
                      f"{t['duration_s']:.1f}" if t["duration_s"] else "",
                      escape(_trial_note(t)))
    _console().print(table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    if args.study and args.json:
        _print_json({"study": _request("GET", f"{args.url}/api/studies/{args.study}"),
                     "trials": _all_trials(args.url, args.study)})
        return 0
    if args.json:
        _print_json(_request("GET", f"{args.url}/api/studies"))
        return 0
    if args.study:  # whatever the API returns is printed as text, never read as markup (an error may hold "[/]")
        study = _request("GET", f"{args.url}/api/studies/{args.study}")
        page = _request("GET", f"{args.url}/api/studies/{args.study}/trials")
        metric = study.get("metric") or "score"
        best = f"{study['best_value']:.4f}" if study["best_value"] is not None else "none yet"
        console.print(f"[bold]{escape(study['name'])}[/] {study['status']}: {study['finished']}/{study['n_trials']}"
                      f" finished, best {escape(metric)} {best}")
        if study.get("teacher_metric") is not None:
            console.print(f"teacher {escape(metric)}: {study['teacher_metric']:.4f}")
        if (best_trial := study.get("best_trial") or {}).get("degenerate"):
            console.print(f"[yellow]the best trial ({best_trial['number']}) is {DEGENERATE}:[/] "
                          f"{escape(best_trial['degenerate'])}; export-best refuses it without --force")
        for note in study.get("notes", []):
            console.print(f"[yellow]note:[/] {escape(note)}")
        if study.get("error"):
            console.print(f"[red]{escape(study['error'])}[/]")
        if (preparation := _preparation_line(study)) is not None:
            console.print(preparation, markup=False)
        ignored = set((study.get("task") or {}).get("ignored_params", []))
        tuned = _tuned_hyperparameters(args.url)  # one request, for the trials table and the front
        columns = [c for c in tuned if c not in ignored]
        table = Table("#", "state", metric, "epochs", *columns, "shape", *(cost.short for cost in COSTS),
                      "precision", "duration s", "note")
        for t in page["trials"]:
            p = t["params"]
            table.add_row(str(t["number"]), t["state"], f"{t['value']:.4f}" if t["value"] is not None else "",
                          str(len(t["epochs"])),
                          *(f"{p[c]:.3g}" if isinstance(p.get(c), int | float) else "" for c in columns),
                          *_size_cells(t.get("profile")), t.get("precision") or "",
                          f"{t['duration_s']:.1f}" if t["duration_s"] else "",
                          DEGENERATE if t.get("degenerate") else "")
        console.print(table)
        if len(study.get("objectives") or []) > 1:  # a single-objective study has one best trial, not a front
            print_front(console, _request("GET", f"{args.url}/api/studies/{args.study}/pareto"), tuned)
        return 0
    table = Table("id", "name", "status", "priority", "finished", "running", "failed", "metric", "best")
    for s in _request("GET", f"{args.url}/api/studies"):
        retries = (s.get("prepare_retry") or {}).get("attempts")
        state = f"{s['status']} (preparation failed {retries}x)" if retries else s["status"]
        table.add_row(str(s["id"]), escape(s["name"]), state, str(s["priority"]),
                      f"{s['finished']}/{s['n_trials']}", str(s["counts"]["running"]), str(s["counts"]["failed"]),
                      s.get("metric") or "",
                      f"{s['best_value']:.4f}" if s["best_value"] is not None else "")
    console.print(table)
    return 0


# How a trial whose best epoch's outputs are degenerate (distill.task_metrics.degenerate_reason) is marked.
DEGENERATE = "degenerate"


def _trial_note(trial: dict[str, Any]) -> str:
    """A trial row's note: why it stopped or failed, and why it is degenerate."""
    notes = [trial.get("stop_reason") or trial.get("fail_reason") or ""]
    if trial.get("degenerate"):
        notes.append(f"{DEGENERATE}: {trial['degenerate']}")
    return "; ".join(n for n in notes if n)


def _preparation_line(study: dict[str, Any]) -> str | None:
    """A study's preparation as ``status`` shows it: the failures it is retrying after, else its progress."""
    retry = study.get("prepare_retry")
    if retry:
        when = f", next try at {retry['retry_at']}" if retry.get("retry_at") else ""
        return (f"preparation failed {retry['attempts']} time(s) in a row (retried up to "
                f"KDSEARCH_MAX_PREPARE_ATTEMPTS times{when}): {retry.get('last_error') or 'no reason recorded'}")
    preparing = study.get("preparing")
    if preparing:
        return f"preparing: {preparing['stage']} {preparing['done']}/{preparing['total']} rows"
    return None


def _shape_cell(shape: dict[str, int]) -> str:
    return (f"L{shape.get('num_hidden_layers')} H{shape.get('hidden_size')} A{shape.get('num_attention_heads')} "
            f"I{shape.get('intermediate_size')}")


def _cost_cell(cost: ObjectiveInfo, profile: dict[str, Any], abbreviated: bool = False) -> str:
    """A cost of a profile: ``4,400,000`` (``4.40M`` abbreviated) or ``1.50``; blank where not measured."""
    if profile.get(cost.name) is None:
        return ""
    value = cost.read(profile)
    return f"{value / 1e6:.2f}M" if abbreviated and cost.is_count else cost.format(value)


def _size_cells(profile: dict[str, Any] | None) -> tuple[str, ...]:
    """Shape and every cost (counts in millions) of a trial's student, blank where not measured."""
    if not profile:
        return ("",) * (1 + len(COSTS))
    return _shape_cell(profile["shape"]), *(_cost_cell(cost, profile, abbreviated=True) for cost in COSTS)


def _tuned_hyperparameters(url: str) -> list[str]:
    """The hyperparameters a trial's row shows beside its epochs: the learning rate and every distillation term's
    (``GET /api/hyperparameters``, in the search space's order)."""
    shown = _request("GET", f"{url}/api/hyperparameters")
    return [h["name"] for h in shown if h["name"] not in ("num_train_epochs", "batch_size")]


def print_front(console: Any, pareto: dict[str, Any], columns: list[str]) -> None:
    """The Pareto front (``GET /api/studies/{id}/pareto``) as a table, with the teacher as the reference;
    ``columns``: the hyperparameters shown."""
    from rich.table import Table

    metric, axis = pareto.get("metric") or "score", pareto["cost"]
    table = Table("#", metric, *(cost.short for cost in COSTS), "shape", *columns,
                  title=f"Pareto front: {metric} (higher) vs {axis} (lower), {len(pareto['front'])} of "
                        f"{pareto['n_complete']} complete trials")
    for point in pareto["front"]:
        p, kd = point["profile"], point["params"]
        table.add_row(str(point["number"]), f"{point['value']:.4f}", *(_cost_cell(cost, p) for cost in COSTS),
                      _shape_cell(p["shape"]),
                      *(f"{kd[k]:.3g}" if isinstance(kd.get(k), int | float) else "" for k in columns))
    teacher = pareto.get("teacher_profile")
    if teacher:
        score = pareto.get("teacher_metric")
        table.add_row("teacher", f"{score:.4f}" if score is not None else "",
                      *(_cost_cell(cost, teacher) for cost in COSTS), _shape_cell(teacher["shape"]),
                      *("" for _ in columns), style="dim")
    console.print(table)


def cmd_export_best(args: argparse.Namespace) -> int:
    from distill.data import DataError
    from distill.deploy import DeployError
    from distill.hub_model import ExportError
    from service.export_best import check_deploy_options, export_best
    from service.settings import get_settings

    try:
        check_deploy_options(args.onnx, args.quantize)
    except ExportError as exc:
        return _fail(str(exc), 2)
    try:
        result = export_best(get_settings(), args.study, Path(args.out), force=args.force, seeds=args.seeds,
                             device=args.device, onnx=args.onnx, quantize=args.quantize, trial_number=args.trial,
                             **{cost.flag: getattr(args, cost.flag) for cost in COSTS})
    except DeployError as exc:
        return _fail(f"{exc} (the Hugging Face export in {args.out} was written and stays)")
    except (ExportError, DataError) as exc:
        return _fail(str(exc))
    if result.spread is not None:
        spread = result.spread
        std = f" ± {spread.std:.4f}" if spread.std is not None else ""
        print(f"trial {result.trial_number} retrained with {len(spread.seeds)} seeds: eval {result.metric} "
              f"{spread.mean:.4f}{std} (mean{' ± sample std' if std else ''}); exporting seed {spread.best_seed}")
    others = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != result.metric)
    print(f"exported trial {result.trial_number}, {result.selection} (eval {result.metric} {result.score:.4f}"
          f"{'; ' + others if others else ''}) to {result.out_dir}")
    if result.degenerate:
        print(f"warning: trial {result.trial_number} is {DEGENERATE}: {result.degenerate} (exported with --force; "
              "its model card says so)")
    if result.deployment is not None:
        print_deployment(result.deployment)
    # Uploading is huggingface_hub's job (its `hf` command, installed with kdsearch): the one command to run.
    print(f"upload it to the Hugging Face Hub with: hf upload YOUR-USER/{result.out_dir.name} {result.out_dir}")
    return 0


def print_deployment(deployment: dict[str, Any]) -> None:
    """The exported variants' metric and CPU latency, and the teacher's, as the model card's table has them."""
    from distill.hub_model import VARIANT_LABELS

    metric = deployment["metric"]
    print(f"verified: ONNX fp32 logits within atol {deployment['tolerance']['atol']:g} + rtol "
          f"{deployment['tolerance']['rtol']:g} of PyTorch's on {deployment['eval_rows']} eval rows (largest "
          f"difference {deployment['max_abs_logit_diff']:.2g}); latency per sequence with {deployment['threads']} "
          "CPU thread(s):")
    for name, v in deployment["variants"].items():
        print(f"  {VARIANT_LABELS[name]:20s} {metric} {v['metrics'][metric]:.4f}   batch 1: {v['ms_batch1']:7.2f} ms"
              f"   batch 32: {v['ms_batch32']:7.3f} ms   {v['file']}")
    if deployment.get("teacher"):
        t = deployment["teacher"]
        print(f"  {'teacher (PyTorch)':20s} {'':>{len(metric) + 7}}   batch 1: {t['ms_batch1']:7.2f} ms"
              f"   batch 32: {t['ms_batch32']:7.3f} ms")
    if deployment.get("int8_flagged"):
        print(f"WARNING: the int8 model scores {deployment['int8_drop_points']:.2f} points below fp32 on {metric} "
              "(more than 1 point); the model card says so", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(Path(args.spec), port=args.port, keep_serving=args.keep_serving)


def _add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="study name or id")
    parser.add_argument("--out", required=True, help="directory to write the Hugging Face model into")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a non-empty --out directory, and export a degenerate trial (one that "
                             "predicts one class for every row, or whose MCC or Pearson is near 0)")
    parser.add_argument("--seeds", type=_seed_count, default=0, metavar="N",
                        help="retrain the best configuration with N fresh seeds, report mean ± std and export the "
                             "best seed (0: export the trial's own checkpoint)")
    parser.add_argument("--device", default="auto", help="for --seeds: cpu, cuda, cuda:N or auto")
    parser.add_argument("--onnx", action="store_true",
                        help="also write onnx/model.onnx, verified against PyTorch, with CPU latency on the card")
    parser.add_argument("--quantize", default=None, metavar="int8",
                        help="with --onnx: also write onnx/model.<int8>.onnx (dynamic quantization)")
    pick = parser.add_argument_group(
        "which trial", "none given: the best trial (a study with two objectives needs one of these: it has a front)")
    pick.add_argument("--trial", type=_count("--trial", 0), default=None, metavar="N", help="this trial")
    for cost in COSTS:  # --max-params, --max-flops, --max-latency-ms: one per cost of the registry
        if cost.is_count:
            pick.add_argument(cost.option, dest=cost.flag, type=_count(cost.option, 1), default=None, metavar="N",
                              help=f"the most accurate trial with at most N {cost.limit_help} (4400000 or 4.4e6)")
        else:
            pick.add_argument(cost.option, dest=cost.flag, type=_positive(cost.option), default=None, metavar="X",
                              help=f"the most accurate trial with at most X {cost.limit_help}")
    parser.set_defaults(func=cmd_export_best)


def _count(flag: str, minimum: int) -> Callable[[str], int]:
    """An integer option (``4400000`` or ``4.4e6``) of at least ``minimum``."""
    def parse(value: str) -> int:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number (got {value!r})") from None
        if number != int(number) or number < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= {minimum} (got {value})")
        return int(number)
    return parse


def _positive(flag: str) -> Callable[[str], float]:
    """A number option above 0."""
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number (got {value!r})") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be > 0 (got {value})")
        return number
    return parse


def _seed_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be an integer (got {value!r})") from None
    if not 0 <= count <= 100:
        raise argparse.ArgumentTypeError(f"--seeds must be within 0..100 (got {count})")
    return count


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (none for a flag, or an option that is unset by default); descriptions
    and the exit codes kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or isinstance(action, argparse._VersionAction):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdsearch")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdsearch", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, formatter_class=_HelpFormatter, epilog=EXIT_CODES)
    url = _client_settings()[0]
    url_help = "the kdsearch API (KDSEARCH_URL, or .env)"

    serve = add("serve", help="run the REST API and dashboard")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback only by default; any other "
                       "needs KDSEARCH_API_TOKEN)")
    serve.add_argument("--allow-no-token", action="store_true",
                       help="listen beyond loopback without KDSEARCH_API_TOKEN (refused without it)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (audit lines are always printed)")
    serve.set_defaults(func=cmd_serve)

    worker = add("worker", help="run trials from the shared study store")
    where = worker.add_mutually_exclusive_group()
    where.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when visible, else CPU)")
    where.add_argument("--gpus", help="'all' or a list like 0,1: one worker process per GPU")
    worker.add_argument("--workers-per-gpu", type=int, default=1, choices=range(1, 33), metavar="N",
                        help="with --gpus: worker processes per GPU (small students leave a GPU idle)")
    worker.add_argument("--procs", type=_count_or_auto, default="auto", metavar="N|auto",
                        help="CPU workers: worker processes on this host (auto: one per physical core)")
    worker.add_argument("--threads-per-proc", type=_count_or_auto, default="auto", metavar="M|auto",
                        help="CPU workers: torch threads per process (auto: 1 with --procs auto, else the cores "
                             "shared out)")
    worker.add_argument("--exit-when-idle", action="store_true", help="exit once no trial is left to run")
    worker.add_argument("--max-trials", type=int, default=None, help="exit after this many trials (per worker process)")
    worker.add_argument("--pack", metavar="K|auto", help="claim up to K trials of a study and train them together "
                        "(unset: KDSEARCH_PACK, whose default is auto)")
    worker.add_argument("--pack-step", choices=["auto", "loop", "stacked"], default=None,
                        help="how a pack trains: stacked (one vectorised step for all its trials), loop (one by "
                             "one, each exactly as alone), auto: stacked on CUDA, loop on CPU (unset: "
                             "KDSEARCH_PACK_STEP)")
    worker.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="the worker's log level")
    worker.set_defaults(func=cmd_worker)

    submit = add("submit", help="launch a study from a JSON spec")
    submit.add_argument("spec", help="a JSON study spec (local paths in it are sent resolved from here)")
    submit.add_argument("--name", help="override the spec's name")
    submit.add_argument("--url", default=url, help=url_help)
    submit.set_defaults(func=cmd_submit)

    status = add("status", help="show studies, or one study's trials")
    status.add_argument("study", nargs="?", help="a study's name or id: its trials (all studies without it)")
    status.add_argument("--json", action="store_true", help="print the API's JSON (one study: with every trial)")
    status.add_argument("--url", default=url, help=url_help)
    status.set_defaults(func=cmd_status)

    trials = add("trials", help="list a study's trials (every page)")
    trials.add_argument("study", help="study name or id")
    trials.add_argument("--state", choices=["COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL"], default=None,
                        help="only trials in this state")
    trials.add_argument("--json", action="store_true", help="print the trials as JSON (as optuna trials -f json)")
    trials.add_argument("--url", default=url, help=url_help)
    trials.set_defaults(func=cmd_trials)

    for name, func, what in (("cancel", cmd_cancel, "stop a study: no new trials, running ones stop at their next "
                                                    "epoch"),
                             ("retry", cmd_retry, "queue a study's failed trials again (a failed study's unrun ones "
                                                  "too)"),
                             ("delete", cmd_delete, "delete a study that is not running: its trial slots, checkpoints "
                                                    "and Optuna study")):
        command = add(name, help=what)
        command.add_argument("study", help="study name or id")
        command.add_argument("--url", default=url, help=url_help)
        command.set_defaults(func=func)

    _add_export_args(add("export-best", help="write the best trial's student as a HF model"))

    db = add("db", help="the database schema: upgrade it, or show its revision")
    db.add_argument("action", choices=["upgrade", "current"],
                    help="upgrade: migrate KDSEARCH_DATABASE_URL to this release; current: show its revisions")
    db.set_defaults(func=cmd_db)

    demo = add("demo", help="run a small SST-2 search end to end, offline")
    demo.add_argument("--spec", default="examples/sst2-demo.json", help="the study spec the demo runs")
    demo.add_argument("--port", type=int, default=0, help="API port (0: a free one)")
    demo.add_argument("--keep-serving", action=argparse.BooleanOptionalAction, default=None,
                      help="keep the API up after the demo (unset: when run in a terminal)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run a subcommand; a database that is down or malformed is one line on stderr, not a traceback."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from service.redaction import mask_database_url, scrub_database_error

    try:
        return args.func(args)
    except (SQLAlchemyError, ArgumentError) as exc:
        reason = getattr(exc, "orig", None) or exc
        first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        url = os.environ.get("KDSEARCH_DATABASE_URL")
        where = mask_database_url(url) if url else "default database"
        return _fail(scrub_database_error(f"database error ({where}): {first_line}", url))


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def export_best_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="export-best", description="Write a study's best student as a HF model.",
                                     formatter_class=_HelpFormatter, epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add_export_args(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
