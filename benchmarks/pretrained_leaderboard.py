"""The benchmark in the pretrained regime: the twins written as files, an ImageNet-pretrained backbone.

Exports waterbirds-synth and urbancars-synth in their real layouts (``bench data export``, 64 px by
default), then fine-tunes the offline ImageNet-pretrained ``efficientnet-lite0`` on them with every
method through the real file loader and image cache (``bench data prepare``), and runs ERM from a
random initialisation of the same backbone at the same size as a reference. Writes
``docs/benchmark-pretrained.md`` (the hand-written reading below its marker survives) and the report's
files to ``docs/benchmark-pretrained/``.

One fine-tuning protocol for every method, not the papers' (300 epochs at lr 1e-5 does not fit a
CPU): the shared training hparams of :data:`PROTOCOL` and each method's own knobs at their twin
defaults (:data:`METHOD_KNOBS`), on a fixed subsample of every split (``--subsample``). Each run is an
ordinary run folder; finished seeds are reused, so an interrupted benchmark continues.

    python benchmarks/pretrained_leaderboard.py [--seeds 3] [--epochs 3] [--subsample 0.2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.cli import main as bench
from bench.core.records import RunDir

ROOT = Path(__file__).resolve().parent.parent
NOTES_MARKER = "<!-- notes below are written by hand and kept when this file is regenerated -->"
TWINS = {"waterbirds": "waterbirds-synth", "urbancars": "urbancars-synth"}
PROTOCOL = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 32}
# The methods' own knobs on the twins (their defaults_per_dataset for the *-synth names), since the
# exported twins load under the real datasets' names, whose per-dataset defaults are the papers'.
METHOD_KNOBS = {
    "erm": {},
    "groupdro": {"eta": 0.1},
    "jtt": {"id_epochs": 1, "upweight": 50},
    "dfr": {},
    "lff": {},
    "ule": {},
}


def run_arguments(method: str, dataset: str, args: argparse.Namespace, pretrained: bool, out: str) -> list[str]:
    hparams = {**PROTOCOL, "pretrained": pretrained, **METHOD_KNOBS.get(method, {})}
    return ["run", "--method", method, "--dataset", dataset, "--data-root", args.data_root, "--backbone",
            args.backbone, "--epochs", str(args.epochs), "--seeds", str(args.seeds), "--out", out, "--quiet",
            "--data-option", f"subsample={args.subsample}", "--hparams",
            *(f"{key}={value}" for key, value in hparams.items())]


def run_chain(units: list[list[str]]) -> list[tuple[str, float, int]]:
    """``bench run`` for each argument list in turn (DFR after ERM, so that it may reuse ERM's runs)."""
    done = []
    for arguments in units:
        started = time.perf_counter()
        status = bench(arguments)
        label = f"{arguments[2]} {arguments[4]}" + (" (from scratch)" if "pretrained=False" in arguments else "")
        done.append((label, time.perf_counter() - started, status))
        print(f"{label}: exit {status}, {done[-1][1]:.0f} s", file=sys.stderr, flush=True)
    return done


def recorded_seconds(out: Path) -> list[tuple[str, str, float, int]]:
    """(dataset, method, mean train_seconds_total over seeds, seeds) of every config under ``out``."""
    rows = []
    for config_dir in sorted(out.glob("*/*/*")):
        finals = [run.read_final() for run in map(RunDir, sorted(config_dir.glob("seed*"))) if run.is_done()]
        if finals:
            seconds = sum(f.get("train_seconds_total", 0.0) for f in finals) / len(finals)
            rows.append((config_dir.parts[-3], config_dir.parts[-2], seconds, len(finals)))
    return rows


def _leaderboard(report_dir: Path) -> str:
    page = report_dir / "leaderboard.md"
    return page.read_text() if page.exists() else "No finished run."


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subsample", type=float, default=0.2, help="fraction of each group of each split")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--datasets", default="waterbirds,urbancars")
    parser.add_argument("--methods", default="erm,groupdro,jtt,dfr,lff,ule")
    parser.add_argument("--data-root", default=str(ROOT / "results" / "pretrained-data"))
    parser.add_argument("--out", default=str(ROOT / "results" / "pretrained"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--jobs", type=int, default=1, help="chains of runs at once, one torch thread each")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the page from the runs already finished under --out")
    args = parser.parse_args()
    command = "python benchmarks/pretrained_leaderboard.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    datasets, methods = args.datasets.split(","), args.methods.split(",")
    started = time.perf_counter()
    for dataset in [] if args.report_only else datasets:  # export and cache once; skipped when already there
        if not (Path(args.data_root) / "bench-export-done" / dataset).exists():
            if bench(["data", "export", TWINS[dataset], args.data_root, "--image-size", str(args.image_size),
                      "--force"]) != 0:
                return 1
            (Path(args.data_root) / "bench-export-done" / dataset).mkdir(parents=True, exist_ok=True)
        if bench(["data", "prepare", dataset, "--data-root", args.data_root, "--quiet"]) != 0:
            return 1
    scratch_out = args.out.rstrip("/") + "-scratch"  # beside, not inside: a report reads a folder's every run
    chains: list[list[list[str]]] = []
    for dataset in datasets:
        for method in methods:
            if method == "dfr" and "erm" in methods:
                continue
            chain = [run_arguments(method, dataset, args, True, args.out)]
            if method == "erm" and "dfr" in methods:
                chain.append(run_arguments("dfr", dataset, args, True, args.out))
            chains.append(chain)
        chains.append([run_arguments("erm", dataset, args, False, scratch_out)])
    cost_rank = {"ule": 0, "lff": 1, "jtt": 2}  # the costliest first, so that no job waits alone at the end
    chains.sort(key=lambda chain: cost_rank.get(chain[0][2], 3))
    if args.report_only:
        timings = []
    elif args.jobs <= 1:
        timings = [t for chain in chains for t in run_chain(chain)]
    else:
        # spawn, not fork: a forked child of a process that already runs torch's thread pools can hang.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_set_threads, initargs=(1,)) as pool:
            timings = [t for future in [pool.submit(run_chain, chain) for chain in chains] for t in future.result()]
    total = time.perf_counter() - started
    docs = Path(args.docs)
    report_dir = docs / "benchmark-pretrained"
    status = bench(["report", args.out, "--output", str(report_dir)])
    scratch_dir = report_dir / "scratch"
    status |= bench(["report", scratch_out, "--output", str(scratch_dir), "--no-plots"])
    protocol = ", ".join(f"{k} {v}" for k, v in PROTOCOL.items())
    knobs = "; ".join(f"{m}: {', '.join(f'{k}={v}' for k, v in knobs.items())}" for m, knobs in METHOD_KNOBS.items()
                      if knobs)
    lines = [
        "# Benchmark in the pretrained regime",
        "",
        f"Made by `{command.strip()}`: the twins exported at {args.image_size} px (`bench data export`), read "
        "through the real loaders and the image cache, fine-tuned from the offline ImageNet weights of "
        f"`{args.backbone}`, {args.seeds} seeds, {args.epochs} epochs, a fixed {args.subsample:.0%} subsample of "
        "every group of every split, CPU, one torch thread per run"
        + (" (the runs' own times: the table at the end)." if args.report_only else
           f", {args.jobs} job(s) at once ({total / 60:.0f} min for this invocation; finished runs are reused)."),
        f"One protocol for every method: {protocol}; the methods' knobs at their twin defaults ({knobs}).",
        "Tables: `bench report`, model selection by validation worst-group accuracy. Plots and the "
        "LaTeX/CSV versions: [benchmark-pretrained/](benchmark-pretrained/).",
        "",
        _leaderboard(report_dir),
        "",
        f"## Reference: ERM from a random initialisation of `{args.backbone}`",
        "",
        _leaderboard(scratch_dir),
        "",
        "## Training time per run",
        "",
        "Seconds of training and evaluation per seed as each run recorded it (`train_seconds_total`, mean over "
        "its seeds), one torch thread each; and the exit status of each `bench run`.",
        "",
        "| dataset | method | s/run | seeds |",
        "| --- | --- | --- | --- |",
        *[f"| {d} | {m} | {s:.0f} | {n} |" for d, m, s, n in recorded_seconds(Path(args.out))],
        *[f"| {d} | {m} (from scratch) | {s:.0f} | {n} |" for d, m, s, n in recorded_seconds(Path(scratch_out))],
        "",
        "Exit status: " + ", ".join(f"{label} {code}" for label, _, code in timings) + "." if timings else
        "Written with `--report-only` from the runs finished under the results folder; a method or dataset "
        "missing from a table had no finished run.",
    ]
    target = docs / "benchmark-pretrained.md"
    previous = target.read_text() if target.exists() else ""
    notes = previous[previous.index(NOTES_MARKER):] if NOTES_MARKER in previous else NOTES_MARKER + "\n"
    target.write_text("\n".join(lines) + "\n\n" + notes)
    return status


if __name__ == "__main__":
    sys.exit(main())
