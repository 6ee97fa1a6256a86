"""The ``leakbench`` command line."""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

from leakbench.splitnn.errors import ParameterError
from leakbench.splitnn.faults import WriteFailure

EXIT_CONFIG_ERROR = 2
#: Exit status when stdout was closed by its reader, as a shell reports a process ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def _cmd_validate(args: argparse.Namespace) -> int:
    from leakbench.evaluation.config import load_config

    config = load_config(args.config, args.device)
    cells = config.cells()
    for cell in cells:
        print(f"{cell.key}  {cell.label()}")
    if not _affordable(config, args):
        return EXIT_CONFIG_ERROR
    print(f"{len(cells)} cells in {config.name}: config is valid")
    return 0


def _affordable(config, args: argparse.Namespace) -> bool:
    """Print the config's notes and cost; False (with the reasons on stderr) if it is over a bound, unless
    ``--force``."""
    for note in config.notes:
        print(f"note: {note}")
    cost = config.cost()
    print(cost.describe())
    problems = cost.problems()
    for problem in problems:
        print(f"leakbench: {args.config}: {problem}"
              + ("" if args.force else "; rerun with --force to accept it"), file=sys.stderr)
    return args.force or not problems


def _cmd_run(args: argparse.Namespace) -> int:
    from leakbench.evaluation.config import load_config
    from leakbench.evaluation.executors import from_option
    from leakbench.evaluation.outputs import write_outputs
    from leakbench.evaluation.runner import Matrix
    from leakbench.evaluation.store import ResultStore
    from leakbench.evaluation.store_lock import RunLock

    config = load_config(args.config, args.device)  # validated completely before any work
    if not _affordable(config, args):
        return EXIT_CONFIG_ERROR
    out = Path(args.out) if args.out else Path("results") / config.name
    start = time.perf_counter()
    matrix = Matrix(config, cache_dir=args.cache_dir, progress=not args.quiet)
    matrix.forced(args.recompute)  # an unknown --recompute name fails before any work
    executor = from_option(args.dask, args.workers)
    waiting = lambda busy: print(f"leakbench: {busy}; waiting for it to finish (--wait)",  # noqa: E731
                                 file=sys.stderr, flush=True)
    with RunLock(out, wait=args.wait, on_wait=waiting), ResultStore(out / "results.sqlite") as store:
        summary = matrix.run(store, executor, recompute=args.recompute)
        outputs = write_outputs(store, matrix, out)
    elapsed = time.perf_counter() - start
    print(outputs.summary)
    print(f"(the full table: {outputs.paths['table']})\n{outputs.stale}")
    print(f"\n{summary.counts_line()} in {elapsed:.1f} s ({executor.describe()})")
    print(summary.cache_line())
    for name, path in outputs.paths.items():
        print(f"{name}: {path}")
    return 1 if summary.failed else 0


def _write_and_list(write: Callable[[], Mapping[str, str | Path]]) -> int:
    """Run a command that writes files from a results folder; print what it wrote, or why it could not."""
    try:
        paths = write()
    except RuntimeError as exc:
        print(f"leakbench: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from leakbench.evaluation.export import export

    return _write_and_list(lambda: export(args.results, args.format, args.out))


def _cmd_report(args: argparse.Namespace) -> int:
    from leakbench.evaluation.report import write_report

    return _write_and_list(lambda: write_report(args.results))


def defense_rows() -> list[dict[str, str]]:
    """One row per registered defense: name, kind, parameters with defaults, guarantee type, summary."""
    import inspect

    from leakbench import defenses

    rows = []
    for name in defenses.names():
        cls = defenses.defense_class(name)
        params = [f"{p.name}={p.default!r}" for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name not in ("self", "seed")]
        hooks = [h for h, on in (("fit on training data", cls.needs_fit), ("uses the cut", cls.uses_cut)) if on]
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        rows.append({"name": name, "kind": cls.kind + (f" ({', '.join(hooks)})" if hooks else ""),
                     "parameters": ", ".join(params) or "-", "guarantee": cls.guarantee_type, "what": doc})
    return rows


def _cmd_defenses(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    rows = defense_rows()
    if args.verbose:
        for row in rows:
            print(f"{row['name']} [{row['kind']}]\n  parameters: {row['parameters']} (and seed=0)\n"
                  f"  guarantee: {row['guarantee']}\n  {row['what']}\n")
    else:
        print(tabulate([{k: row[k] for k in ("name", "kind", "parameters", "guarantee")} for row in rows],
                       headers="keys", tablefmt="simple"))
        print("\nevery defense also takes seed (default 0); `leakbench defenses -v` describes each one")
    return 0


def _workers(text: str) -> int:
    """``--workers``: an integer of at least 1 (0 would start a cluster that never computes anything)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leakbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every cell of a YAML config and write the results")
    run.add_argument("config", help="path to the YAML config")
    run.add_argument("--out", help="output directory (default: results/<config name>)")
    run.add_argument("--cache-dir", help="where trained models are cached (default: $LEAKBENCH_CACHE "
                                         "or ~/.cache/leakbench)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dask", metavar="local|ADDRESS",
                     help="compute cells on Dask: 'local' starts a LocalCluster on this machine, anything else is "
                          "a scheduler address (e.g. tcp://host:8786); default: sequentially in this process")
    run.add_argument("--workers", type=_workers, default=2,
                     help="workers of --dask local (1 thread each; at least 1; default 2)")
    run.add_argument("--wait", action="store_true",
                     help="if another `leakbench run` is writing the same --out, wait for it to finish instead of "
                          "exiting with status 2")
    run.add_argument("--recompute", action="append", default=[], metavar="ATTACK|DEFENSE",
                     help="recompute the cells of this attack or defense even if the store has them from the "
                          "installed code (repeatable); cells stored by other code are always recomputed")
    run.add_argument("--force", action="store_true", help="run a grid over the cell-count or memory bound")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's device, else auto)")
    run.set_defaults(func=_cmd_run)
    export = sub.add_parser("export", help="write the cells and per-image rows of a result store as CSV or Parquet")
    export.add_argument("results", help="a results directory (leakbench run --out) or its results.sqlite")
    export.add_argument("--format", choices=("csv", "parquet"), default="csv")
    export.add_argument("--out", help="base path: writes OUT.<format> and OUT_images.<format> "
                                      "(default: cells.<format> beside the store)")
    export.set_defaults(func=_cmd_export)
    report = sub.add_parser("report", help="write report.html (self-contained), table.tex and the figures (PNG, PDF) "
                                           "of a results directory")
    report.add_argument("results", help="a results directory (leakbench run --out) or its results.sqlite")
    report.set_defaults(func=_cmd_report)
    validate = sub.add_parser("validate", help="check a config and list the cells it would run")
    validate.add_argument("config")
    validate.add_argument("--force", action="store_true", help="accept a grid over the cell-count or memory bound")
    validate.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's device, else auto)")
    validate.set_defaults(func=_cmd_validate)
    listing = sub.add_parser("defenses", help="list every defense with its kind, parameters and guarantee")
    listing.add_argument("-v", "--verbose", action="store_true", help="one paragraph per defense")
    listing.set_defaults(func=_cmd_defenses)
    return parser


def main(argv: list[str] | None = None) -> int:
    from leakbench.evaluation.store import StoreVersionError
    from leakbench.evaluation.store_lock import StoreBusy

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ParameterError as exc:
        print(f"leakbench: config error in {getattr(args, 'config', '<arguments>')}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StoreBusy as exc:
        print(f"leakbench: {exc}: wait for it to finish, or rerun with --wait to start when it does",
              file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StoreVersionError as exc:
        print(f"leakbench: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except WriteFailure as exc:  # during a run, the finished cells are in the store already: a rerun skips them
        kept = "; the cells finished before are kept in the store, and a rerun resumes after them" \
            if args.command == "run" else ""
        print(f"leakbench: cannot write {exc.filename}: {exc.strerror}{kept}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except BrokenPipeError:  # the reader closed stdout (`leakbench validate x.yaml | head`): no config error
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        where = getattr(exc, "filename", "") or getattr(args, "config", "")
        print(f"leakbench: cannot read {where}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_CONFIG_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail a second time on the closed pipe."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # not a real file (a test's)
        pass


if __name__ == "__main__":
    sys.exit(main())
