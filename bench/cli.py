"""The ``bench`` command line: ``bench run``, ``bench list``, ``bench data info``.

User errors (unknown names, bad hparams, missing or malformed data) print one line starting with
``error:`` and exit with status 2, before anything is written to disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.errors import BenchError
from bench.metrics import AVERAGE_LABELS
from bench.selection import DEFAULT_RULE, RULES, describe

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1

# Modules that add subcommands: each defines ``register(subparsers) -> dict[str, handler]``, where
# ``subparsers["top"]`` adds ``bench NAME`` and ``subparsers["data"]`` adds ``bench data NAME``; the
# returned keys are "NAME" or "data NAME", and a handler takes the parsed arguments and returns the
# exit status. Add one line per module.
COMMAND_MODULES: list[str] = [
    "bench.sweep",
    "bench.report",
    "bench.data_tools",
]


def _parse_kv(items: Sequence[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise BenchError(f"--data-option {item!r}: expected key=value")
        key, value = item.split("=", 1)
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
    run.add_argument("--backbone", help="override the backbone: small-cnn, resnet18, resnet50")
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
    run.add_argument("--select", default=DEFAULT_RULE, choices=[r for r in RULES if r != "oracle-test"],
                     help=f"model selection rule for the printed table (default {DEFAULT_RULE})")
    run.add_argument("--force", action="store_true", help="rerun seeds that are already done")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--json", action="store_true", help="print the final results as JSON instead of a table")

    listing = sub.add_parser("list", help="list methods, datasets and backbones")
    listing.add_argument("--data-root", help="folder holding the datasets (default: $BENCH_DATA_ROOT)")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="print a dataset's group counts per split")
    info.add_argument("name")
    info.add_argument("--data-root")
    info.add_argument("--attrs")
    info.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE")
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
        options["attrs"] = args.attrs
    return options


def _percent(value: float | None) -> str:
    return "-" if value is None or np.isnan(value) else f"{100 * value:.1f}"


def _mean_std(values: list[float]) -> str:
    array = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if len(array) == 0:
        return "-"
    std = array.std(ddof=1) if len(array) > 1 else 0.0
    return f"{100 * array.mean():.1f} ± {100 * std:.1f}"


def run_table(finals: list[dict[str, Any]], rule: str) -> str:
    """One row per seed and a mean ± std row, for the primary model and any secondary ones."""
    from tabulate import tabulate

    done = [f for f in finals if f.get("status") == "done"]
    if not done:
        return "no finished seed"
    primary = done[0]["primary"]
    predictors = [primary] + sorted(p for p in done[0]["selection"][rule] if p != primary)
    average_kind = done[0]["average_kind"]
    urbancars = average_kind == "urbancars_id"
    columns: list[tuple[str, str]] = [("worst-group", "worst_group_accuracy")]
    if urbancars:
        columns += [("I.D. Acc", "id_acc"), ("BG Gap", "bg_gap"), ("CoObj Gap", "coobj_gap"),
                    ("BG+CoObj Gap", "bg_coobj_gap")]
    else:
        columns += [(f"avg ({average_kind.replace('_', '-')})", "average_accuracy")]
    headers = ["seed"]
    for predictor in predictors:
        prefix = "" if len(predictors) == 1 else f"{predictor} "
        headers += [f"{prefix}{label}" for label, _ in columns] + [f"{prefix}epoch"]
    rows = []
    values: dict[tuple[str, str], list[float]] = {}
    for final in done:
        row: list[Any] = [final["seed"]]
        for predictor in predictors:
            chosen = final["selection"][rule][predictor]
            for _, key in columns:
                value = chosen["test"][key]
                values.setdefault((predictor, key), []).append(value)
                row.append(_percent(value))
            row.append(f"{chosen['stage']}:{chosen['epoch']}")
        rows.append(row)
    summary_row: list[Any] = [f"mean ± std (n={len(done)})"]
    for predictor in predictors:
        summary_row += [_mean_std(values[(predictor, key)]) for _, key in columns] + [""]
    rows.append(summary_row)
    lines = [
        tabulate(rows, headers=headers, tablefmt="github"),
        "",
        f"Test accuracy in %, at the epoch picked by {rule} ({describe(rule)}); std is the sample std over seeds.",
        f"avg = {AVERAGE_LABELS[average_kind]}."
        + (f" The method's result is the {primary}; other rows are recorded beside it." if len(predictors) > 1 else ""),
    ]
    if urbancars:
        lines.append("Gaps (Whac-A-Mole): accuracy on the cue-conflicting cells minus I.D. Acc; closer to 0 is better.")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import RunRequest, execute, prepare

    if args.seeds < 1:
        raise BenchError("--seeds must be at least 1")
    request = RunRequest(
        method=args.method,
        dataset=args.dataset,
        hparams=args.hparams,
        epochs=args.epochs,
        backbone=args.backbone,
        data_root=args.data_root,
        dataset_options=_dataset_options(args),
        weights=args.weights,
        out=args.out,
        device=args.device,
        workers=args.workers,
        deterministic=args.deterministic,
    )
    prepared = prepare(request)
    if not args.quiet:
        hp = " ".join(f"{k}={v}" for k, v in sorted(prepared.hparams.items()))
        print(f"{args.method} on {args.dataset} ({prepared.device}); hparams: {hp}", file=sys.stderr)
    finals = []
    for seed in range(args.seed_offset, args.seed_offset + args.seeds):
        final = execute(prepared, seed, quiet=args.quiet, force=args.force)
        if final.get("skipped") and not args.quiet:
            print(f"seed {seed}: already done ({prepared.run_dir(seed).path}), skipped; --force reruns it",
                  file=sys.stderr)
        if final.get("status") == "failed":
            print(f"seed {seed} failed: {final['error_type']}: {final['reason']} "
                  f"(details in {prepared.run_dir(seed).failed})", file=sys.stderr)
        finals.append({**final, "seed": seed})
    if args.json:
        print(json.dumps(finals, indent=2, default=str))
    else:
        print(f"\n{args.method} on {args.dataset}, results in {prepared.run_dir(args.seed_offset).path.parent}")
        print(run_table(finals, args.select))
    return EXIT_RUN_FAILED if any(f.get("status") == "failed" for f in finals) else 0


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.backbones import BACKBONES
    from datasets import dataset_names, get_dataset, resolve_data_root
    from methods import get_method, method_names

    rows = [[name, get_method(name).paper] for name in method_names()]
    print(tabulate(rows, headers=["method", "paper"], tablefmt="github"))
    print()
    root = resolve_data_root(args.data_root)
    rows = []
    for name in dataset_names():
        source = get_dataset(name)
        if not source.needs_data_root:
            status = "built in (synthetic)"
        else:
            located = source.locate(root) if root else None
            status = f"found: {located}" if located else "not found" + ("" if root else " (no --data-root)")
        rows.append([name, status, source.description])
    print(tabulate(rows, headers=["dataset", "files", "description"], tablefmt="github"))
    print()
    print("backbones: " + ", ".join(BACKBONES))
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from datasets import load_dataset

    dataset = load_dataset(args.name, args.data_root, _dataset_options(args))
    splits = list(dataset.splits)
    counts = {split: dataset.group_counts(split) for split in splits}
    rows = [[g, name] + [counts[s][g] for s in splits] for g, name in enumerate(dataset.group_names)]
    rows.append(["", "total"] + [sum(counts[s]) for s in splits])
    print(f"{dataset.name}: classes {dataset.class_names}; attributes "
          + ", ".join(f"{a} {v}" for a, v in zip(dataset.attr_names, dataset.attr_value_names))
          + f"; images {'x'.join(map(str, dataset.image_shape))}; average kind: {dataset.average_kind}")
    print(tabulate(rows, headers=["group", "name"] + splits, tablefmt="github"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    data_subparsers = next(
        a for a in subparsers.choices["data"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    handlers = {"run": cmd_run, "list": cmd_list, "data info": cmd_data_info}
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
