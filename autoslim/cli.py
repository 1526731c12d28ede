"""The ``autoslim`` command line.

    autoslim optimize studies/quickstart.yaml [--n-trials N] [--timeout S] [--storage URL] [--study-name NAME]
    autoslim show studies/quickstart.yaml [-f table|json|csv]      (alias: best)

Bad input gives one line on stderr and exit code 2; nothing is written to storage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from autoslim.errors import UsageError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_optimize(args) -> int:
    from autoslim.config import load_study
    from autoslim.study import optimize

    cfg = load_study(args.study)
    study = optimize(cfg, n_trials=args.n_trials, timeout=args.timeout, storage=args.storage,
                     study_name=args.study_name, log=_log if not args.quiet else (lambda s: None))
    _print_front(study, "table", history=True)
    return 0


def cmd_show(args) -> int:
    from autoslim.study import open_study

    study = open_study(args.study, study_name=args.study_name, storage=args.storage)
    _print_front(study, args.format, history=args.history)
    return 0


def _print_front(study, fmt: str, *, history: bool = False) -> None:
    import pandas as pd

    from autoslim.search.pareto import COLUMNS, format_table, summary

    result = summary(study)
    rows = result["hypervolume_history"] if history else result["front"]
    if fmt == "json":
        print(json.dumps(result, indent=2, default=str))
    elif fmt == "csv":
        print(pd.DataFrame(rows).to_csv(index=False), end="")
    else:
        ref = ", ".join(f"{k} {v:,.6g}" for k, v in result["reference_point"].items())
        print(f"\nPareto front of study {study.study_name!r} ({len(result['front'])} of {result['trials']} trials "
              f"on it; {result['pruned']} stopped early, {result['infeasible']} infeasible; "
              f"objectives: {', '.join(result['objectives'])}):")
        print(format_table(pd.DataFrame(result["front"], columns=COLUMNS)))
        print(f"\nHypervolume {result['hypervolume']:.4f} (reference point: {ref}; "
              "accuracy as is, other objectives divided by the reference)")
        if history:
            print("after trial: " + ", ".join(f"{r['trial']}: {r['hypervolume']:.4f}" for r in rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoslim", description="Search compression methods for small networks with Optuna.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def storage_args(p):
        p.add_argument("--storage", help="Optuna storage URL (default: the study file's, else sqlite:///<name>.db beside it)")
        p.add_argument("--study-name", help="study name (default: the study file's name)")

    p = sub.add_parser("optimize", help="create or resume a study and run its trials")
    p.add_argument("study", help="study file (studies/*.yaml)")
    p.add_argument("--n-trials", type=int, help="total number of finished trials to reach")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--quiet", action="store_true", help="print only the Pareto front")
    storage_args(p)
    p.set_defaults(func=cmd_optimize)

    for name in ("show", "best"):
        p = sub.add_parser(name, help="print the Pareto front of an existing study")
        p.add_argument("study", help="study file or storage URL")
        p.add_argument("-f", "--format", choices=["table", "json", "csv"], default="table")
        p.add_argument("--history", action="store_true",
                       help="with -f csv: the hypervolume after each trial instead of the front; with table: both")
        storage_args(p)
        p.set_defaults(func=cmd_show)
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
