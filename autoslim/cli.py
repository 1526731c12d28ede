"""The ``autoslim`` command line.

    autoslim optimize studies/quickstart.yaml [--n-trials N] [--timeout S] [--storage URL] [--study-name NAME]
                                              [--workers N [--devices cuda:0,cuda:1|auto|cpu]] [--device DEV]
    autoslim show studies/quickstart.yaml [-f table|json|csv]      (alias: best)
    autoslim dashboard studies/quickstart.yaml [--host 127.0.0.1] [--port 8080] [--artifact-store DIR|s3://B/P]
    autoslim report studies/quickstart.yaml [--out DIR]
    autoslim export studies/quickstart.yaml --trial N | --pareto | --best-under-params K [--out DIR] [--retrain]
    autoslim train exports/trial_N/config.yaml [--out DIR]
    autoslim recover studies/quickstart.yaml --older-than 10m [--storage URL] [--study-name NAME]
    autoslim methods [NAME ...] [-f table|json]      (every method, built-in and installed, with its knobs)
    autoslim storage-proxy postgresql://user:pw@db/autoslim [--host 0.0.0.0] [--port 13000]

Bad input gives one line on stderr and exit code 2; nothing is written to storage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import pandas as pd
import torch

from autoslim.config import load_study
from autoslim.dashboard import serve
from autoslim.errors import UsageError
from autoslim.methods import describe_method, list_methods
from autoslim.export import export_trial, select_trials, train_config_file
from autoslim.recover import parse_age, recover
from autoslim.report import default_report_dir, write_report
from autoslim.search.pareto import COLUMNS, format_table, summary
from autoslim.storage import open_artifact_store, serve_storage_proxy
from autoslim.study import check_study, open_study, optimize, study_locations
from autoslim.workers import Workers, check_shareable, parse_devices


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_optimize(args) -> int:
    cfg = load_study(args.study)
    if args.devices is not None and args.workers is None:
        raise UsageError("--devices: only with --workers N (one device per worker)")
    if args.workers is not None:
        return _optimize_with_workers(args, cfg)
    if args.device is not None:
        cfg.device = args.device
    study = optimize(cfg, n_trials=args.n_trials, timeout=args.timeout, storage=args.storage,
                     study_name=args.study_name, artifact_store=args.artifact_store,
                     strict_timeout=args.strict_timeout, log=_log if not args.quiet else (lambda s: None))
    _print_front(study, "table", history=True)
    return 0


def _optimize_with_workers(args, cfg) -> int:
    """``--workers N``: N ``autoslim optimize`` processes (:mod:`autoslim.workers`), then the Pareto front."""
    if args.workers < 1:
        raise UsageError(f"--workers: must be at least 1, got {args.workers}")
    if args.device is not None:
        raise UsageError("--device: not with --workers; give each worker its device with --devices")
    check_study(cfg)
    url = args.storage or cfg.storage or cfg.default_storage()
    check_shareable(url, workers=args.workers)
    devices = parse_devices(args.devices or "auto", workers=args.workers, gpus=torch.cuda.device_count())
    argv = [args.study, "--storage", url]
    for flag, value in (("--n-trials", args.n_trials), ("--timeout", args.timeout),
                        ("--study-name", args.study_name), ("--artifact-store", args.artifact_store)):
        argv += [flag, str(value)] if value is not None else []
    argv += ["--strict-timeout"] if args.strict_timeout else []
    code = Workers(argv, devices=devices, n_trials=args.n_trials or cfg.n_trials,
                   log=(lambda s: None) if args.quiet else _log).run()
    if code == 0:
        _print_front(open_study(args.study, study_name=args.study_name, storage=url), "table", history=True)
    return code


def cmd_show(args) -> int:
    study = open_study(args.study, study_name=args.study_name, storage=args.storage)
    _print_front(study, args.format, history=args.history)
    return 0


def cmd_dashboard(args) -> int:
    serve(args.study, study_name=args.study_name, storage=args.storage, host=args.host, port=args.port,
          artifact_store=args.artifact_store, log=lambda s: print(s, flush=True))
    return 0


def cmd_report(args) -> int:
    study = open_study(args.study, study_name=args.study_name, storage=args.storage)
    for path in write_report(study, out=args.out or default_report_dir(study.study_name)).values():
        print(path)
    return 0


def cmd_export(args) -> int:
    study = open_study(args.study, study_name=args.study_name, storage=args.storage)
    url, location = study_locations(args.study, storage=args.storage, artifact_store=args.artifact_store)
    store = open_artifact_store(url, location=location)
    for trial in select_trials(study, trial=args.trial, pareto=args.pareto, best_under_params=args.best_under_params):
        print(export_trial(study, trial, out=args.out, artifact_store=store, retrain=args.retrain, log=_log))
    return 0


def cmd_train(args) -> int:
    result = train_config_file(args.config, out=args.out, log=_log)
    print(f"val accuracy {100 * result.val_accuracy:.2f}%, test accuracy {100 * result.test_accuracy:.2f}%, "
          f"params {result.params:,}" + (f"; model files in {args.out}" if args.out else ""))
    return 0


def cmd_recover(args) -> int:
    older_than = parse_age(args.older_than)
    study = open_study(args.study, study_name=args.study_name, storage=args.storage)
    recover(study, older_than=older_than, log=print)  # each failure is a check-and-set: no lock needed
    return 0


def cmd_storage_proxy(args) -> int:
    serve_storage_proxy(args.url, host=args.host, port=args.port, log=lambda s: print(s, flush=True))
    return 0


def cmd_methods(args) -> int:
    infos = [describe_method(name) for name in args.names or list_methods()]
    if args.format == "json":
        print(json.dumps(infos, indent=2))
        return 0
    for info in infos:
        print(f"{info['name']} ({info['origin']}{', builds its own model' if info['builds_model'] else ''}): "
              f"{info['summary']}")
        rows = [(k["name"], k["type"], _domain(k),
                 str(k["default"]).lower() if isinstance(k["default"], bool) else str(k["default"]),
                 ("searched" if k["searched"] else "setting")
                 + (" (size: not sampled under a size target)" if k["name"] in info["size_knobs"] else ""))
                for k in info["knobs"]]
        widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else []
        for row in rows:
            print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    return 0


def _domain(knob: dict) -> str:
    """'1 to 6', '0.0001 to 0.1 (log)', 'std, fraction' or 'false, true'."""
    if knob["type"] == "bool":
        return "false, true"
    if knob["type"] == "categorical":
        return ", ".join(map(str, knob["choices"]))
    step = f", step {knob['step']:g}" if knob.get("step") is not None else ""
    return f"{knob['low']:g} to {knob['high']:g}" + (" (log)" if knob["log"] else "") + step


def _print_front(study, fmt: str, *, history: bool = False) -> None:
    result = summary(study)
    rows = result["hypervolume_history"] if history else result["front"]
    if fmt == "json":
        print(json.dumps(result, indent=2, default=str))
    elif fmt == "csv":
        print(pd.DataFrame(rows).to_csv(index=False), end="")
    else:
        ref = ", ".join(f"{k} {v:,.6g}" for k, v in result["reference_point"].items())
        unfinished = ", ".join(f"{result[k]} {word}" for k, word in (("running", "running"), ("waiting", "queued"))
                               if result[k])
        print(f"\nPareto front of study {study.study_name!r} ({len(result['front'])} of {result['trials']} finished "
              f"trials on it; {result['pruned']} stopped early, {result['infeasible']} infeasible, "
              f"{result['failed']} failed{'; ' + unfinished if unfinished else ''}; "
              f"objectives: {', '.join(result['objectives'])}):")
        print(format_table(pd.DataFrame(result["front"], columns=COLUMNS)))
        print(f"\nHypervolume {result['hypervolume']:.4f} (reference point: {ref}; "
              "accuracy as is, other objectives divided by the reference)")
        if history:
            print("after trial: " + ", ".join(f"{r['trial']}: {r['hypervolume']:.4f}" for r in rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoslim", description="Search compression methods for small networks with Optuna.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def artifact_arg(p):
        p.add_argument("--artifact-store", "--artifact-dir", dest="artifact_store", metavar="DIR_OR_URL",
                       help="trial artifacts and checkpoints: a folder or s3://BUCKET/PREFIX (endpoint and keys from "
                            "the AWS environment variables; --artifact-dir is its older name) "
                            "(default: the study file's artifact_store, else <db name>-artifacts "
                                              "beside a SQLite or journal file; other storages keep none without it)")

    def storage_args(p):
        p.add_argument("--storage", help="Optuna storage URL (default: the study file's, else sqlite:///<name>.db beside it)")
        p.add_argument("--study-name", help="study name (default: the study file's name)")

    p = sub.add_parser("optimize", help="create or resume a study and run its trials")
    p.add_argument("study", help="study file (studies/*.yaml)")
    p.add_argument("--n-trials", type=int, help="total number of finished trials to reach")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--strict-timeout", action="store_true",
                   help="also stop a trial still running at the timeout, at its next training step (pruned)")
    p.add_argument("--quiet", action="store_true", help="print only the Pareto front")
    p.add_argument("--workers", type=int, metavar="N",
                   help="run N worker processes on the study's storage (a journal file or an RDB URL, not SQLite), "
                        "their progress in one view; Ctrl-C stops them all and requeues their trials")
    p.add_argument("--devices", metavar="LIST",
                   help="with --workers: one device per worker, round robin: cuda:0,cuda:1,... | auto (every "
                        "visible GPU, else the CPU; the default) | cpu")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"],
                   help="train on this device (overrides the study file's device)")
    storage_args(p)
    artifact_arg(p)
    p.set_defaults(func=cmd_optimize)

    for name in ("show", "best"):
        p = sub.add_parser(name, help="print the Pareto front of an existing study")
        p.add_argument("study", help="study file or storage URL")
        p.add_argument("-f", "--format", choices=["table", "json", "csv"], default="table")
        p.add_argument("--history", action="store_true",
                       help="with -f csv: the hypervolume after each trial instead of the front; with table: both")
        storage_args(p)
        p.set_defaults(func=cmd_show)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard for a study (trials, Pareto front, artifacts)")
    p.add_argument("study", help="study file or storage URL")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080)
    storage_args(p)
    artifact_arg(p)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("report", help="write trials.csv and Pareto-front and hypervolume charts (HTML, PNG)")
    p.add_argument("study", help="study file or storage URL")
    p.add_argument("--out", help="output folder (default: reports/<study name>)")
    storage_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="export trials' compressed models: config.yaml, model.pt, TorchScript, ONNX")
    p.add_argument("study", help="study file or storage URL")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, metavar="N", help="trial number N")
    which.add_argument("--pareto", action="store_true", help="every trial on the Pareto front")
    which.add_argument("--best-under-params", type=int, metavar="K",
                       help="the most accurate trial with at most K parameters")
    p.add_argument("--out", default="exports", help="output folder; each trial goes to OUT/trial_<N> (default: exports)")
    p.add_argument("--retrain", action="store_true",
                   help="retrain from the stored config instead of using the trial's model artifact")
    storage_args(p)
    artifact_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="rebuild and retrain an exported config.yaml (same method, same seed)")
    p.add_argument("config", help="a trial's config.yaml (from autoslim export)")
    p.add_argument("--out", help="write model.pt, model.ts, model.onnx and config.yaml there")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recover", help="fail trials whose worker died (no sign of life for --older-than) and "
                                       "queue retries that resume from their last epoch checkpoint")
    p.add_argument("study", help="study file or storage URL")
    p.add_argument("--older-than", required=True, metavar="AGE",
                   help="a running trial silent (no heartbeat, epoch checkpoint or start) for longer than this is "
                        "stale: 90s, 10m, 2h, 1d; at least twice recovery.heartbeat_interval")
    storage_args(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("methods", help="list every compression method (built-in and installed) with its knobs")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="only these methods (names, entry points or import strings 'package.module:Class')")
    p.add_argument("-f", "--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("storage-proxy", help="serve an RDB storage to many workers through Optuna's gRPC proxy "
                                             "(workers: --storage grpc://HOST:PORT)")
    p.add_argument("url", help="the RDB storage URL, e.g. postgresql://user:pw@db/autoslim")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=13000, help="port (default: 13000)")
    p.set_defaults(func=cmd_storage_proxy)
    return parser




def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "n_trials", None) is not None and args.n_trials < 1:
        parser.exit(2, "autoslim: error: --n-trials: must be at least 1\n")
    try:
        return args.func(args)
    except UsageError as e:
        print(f"autoslim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoslim: interrupted; finished trials are kept in storage, run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
