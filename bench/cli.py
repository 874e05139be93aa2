"""The ``bench`` command line: ``bench run``, and the subcommands of :data:`COMMAND_MODULES`.

User errors (unknown names, bad hparams, missing or malformed data) print one line starting with
``error:`` and exit with status 2, before anything is written to disk; one met while training (an
unreadable image, a damaged record) exits the same way, with the run marked failed (failed.json).
A seed another process is training stops ``bench run`` with status 2 naming that process (``--wait``
waits for it instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.core.precision_names import PRECISIONS
from bench.core.selection import DEFAULT_RULE, RULES
from bench.display import display_path

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1

# Modules that add subcommands: each defines ``register(subparsers) -> dict[str, handler]``, where
# ``subparsers["top"]`` adds ``bench NAME`` and ``subparsers["data"]`` adds ``bench data NAME``; the
# returned keys are "NAME" or "data NAME", and a handler takes the parsed arguments and returns the
# exit status. Add one line per module.
COMMAND_MODULES: list[str] = [
    "bench.catalog",
    "bench.download.cli",
    "bench.sweep.cli",
    "bench.report.cli",
    "bench.data_tools",
]


def _parse_kv(items: Sequence[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise BenchError(f"--data-option {item!r}: expected key=value")
        key, value = item.split("=", 1)
        if key in result:
            raise BenchError(f"--data-option {key} is given twice ({result[key]!r} and {value!r}); give it once")
        result[key] = value
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="Benchmark harness for methods that resist spurious correlations."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a method on a dataset for one or more seeds")
    run.add_argument("--method", required=True, help="method name (see `bench list`)")
    run.add_argument("--dataset", required=True, help="dataset name (see `bench list`)")
    run.add_argument("--seeds", type=int, default=1, help="number of seeds, run one after another (default 1)")
    run.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    run.add_argument("--epochs", type=int, help="override the epochs of the main stage")
    run.add_argument("--backbone", help="override the backbone: small-cnn, resnet18, resnet50, efficientnet-lite0, "
                                        "or any timm model as timm/<model> (see `bench list`)")
    run.add_argument("--hparams", nargs="*", default=[], metavar="KEY=VALUE", help="override hyperparameters")
    run.add_argument("--data-root", help="folder holding the dataset (default: $BENCH_DATA_ROOT)")
    run.add_argument("--attrs", help="custom dataset: comma-separated attribute columns (default: all others)")
    run.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE", help="dataset options")
    run.add_argument("--weights", help="local backbone weights file (instead of downloading ImageNet weights)")
    run.add_argument("--out", default="results", help="results folder (default: results/)")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic GPU kernels only, so that a seed reproduces a run on CUDA too (slower)")
    run.add_argument("--workers", type=int, default=0, help="data loading worker processes for image files")
    run.add_argument("--precision", default="fp32", choices=PRECISIONS,
                     help="the networks' arithmetic: fp32 (default), bf16 or fp16 mixed precision (autocast)")
    run.add_argument("--compile", action="store_true",
                     help="compile the models with torch.compile (not for methods that take double backwards)")
    run.add_argument("--select", default=DEFAULT_RULE, choices=[r for r in RULES if r != "oracle-test"],
                     help=f"model selection rule for the printed table (default {DEFAULT_RULE})")
    run.add_argument("--force", action="store_true", help="rerun seeds that are already done")
    run.add_argument("--wait", action="store_true",
                     help="when another process is training a seed, wait for it instead of stopping (exit 2)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--json", action="store_true", help="print the final results as JSON instead of a table")

    data = sub.add_parser("data", help="dataset tools")
    data.add_subparsers(dest="data_command", required=True)
    return parser


def _command_handlers(subparsers: Any) -> dict[str, Any]:
    import importlib

    handlers: dict[str, Any] = {}
    for module_name in COMMAND_MODULES:
        handlers.update(importlib.import_module(module_name).register(subparsers))
    return handlers


def _dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = _parse_kv(args.data_option)
    if getattr(args, "attrs", None):
        if "attrs" in options and options["attrs"] != args.attrs:
            raise BenchError(f"--attrs {args.attrs} and --data-option attrs={options['attrs']} disagree; give one")
        options["attrs"] = args.attrs
    return options


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import RunRequest, execute, prepare

    if args.seeds < 1:
        raise BenchError("--seeds must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        raise BenchError(f"--epochs {args.epochs}: a run trains at least 1 epoch")
    if args.workers < 0:
        raise BenchError(f"--workers {args.workers}: give 0 (load images in this process) or more")
    request = RunRequest(
        method=args.method,
        dataset=args.dataset,
        hparam_overrides=args.hparams,
        epochs=args.epochs,
        backbone=args.backbone,
        data_root=args.data_root,
        dataset_options=_dataset_options(args),
        weights=args.weights,
        out=args.out,
        device=args.device,
        workers=args.workers,
        deterministic=args.deterministic,
        precision=args.precision,
        compile=args.compile,
        wait=args.wait,
    )
    prepared = prepare(request)
    if not args.quiet:
        hp = " ".join(f"{k}={v}" for k, v in sorted(prepared.hparams.items()))
        how = f"{prepared.device}" + (f", {args.precision}" if args.precision != "fp32" else "") + (
            ", compiled" if args.compile else "")
        print(f"{args.method} on {args.dataset} ({how}); hparams: {hp}", file=sys.stderr)
    finals = []
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    for seed in seeds:
        final = execute(prepared, seed, quiet=args.quiet, force=args.force)
        if final.get("skipped") and not args.quiet:
            print(f"seed {seed}: already done ({display_path(prepared.run_dir(seed).path)}), skipped; --force "
                  "reruns it", file=sys.stderr)
        if final.get("status") == "failed":
            print(f"seed {seed} failed: {final['error_type']}: {final['reason']} "
                  f"(details in {display_path(prepared.run_dir(seed).failed)})", file=sys.stderr)
        finals.append({**final, "seed": seed})
    if args.json:
        print(json.dumps(finals, indent=2, default=str))
    else:
        print(f"\n{args.method} on {args.dataset}, results in "
              f"{display_path(prepared.run_dir(args.seed_offset).path.parent)}")
        print(seed_tables([prepared.run_dir(seed).path for seed in seeds], args.out, args.select))
    return EXIT_RUN_FAILED if any(f.get("status") == "failed" for f in finals) else 0


def seed_tables(run_dirs: list[Path], out: str, rule: str) -> str:
    """``bench run``'s tables of its seeds: the report's aggregation of exactly these run folders."""
    from bench.report.aggregate import aggregate
    from bench.report.load import load_runs
    from bench.report.run_table import run_tables

    results = load_runs(run_dirs, out)
    if results.runs.empty:
        return "no finished seed"
    return run_tables(aggregate(results, rule))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    data_subparsers = next(
        a for a in subparsers.choices["data"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    handlers = {"run": cmd_run}
    handlers.update(_command_handlers({"top": subparsers, "data": data_subparsers}))
    args = parser.parse_args(argv)
    key = f"data {args.data_command}" if args.command == "data" else args.command
    try:
        return handlers[key](args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
