"""What mixed precision changes in results: the same runs (method, dataset, seeds) in fp32 and bf16, side by side.

    OMP_NUM_THREADS=1 python benchmarks/precision_results.py [--methods erm,ule] [--dataset urbancars-synth]
        [--seeds 3] [--epochs 3] [--precisions fp32,bf16] [--out results/precision] [--jobs 2]

Runs ``bench run`` for every (method, precision) into one results folder (finished seeds are skipped,
so an interrupted comparison continues), then prints, per method and seed, the primary model's test
worst-group and average accuracy at the epoch chosen by validation worst-group accuracy, and the last
epoch's training loss, in each precision, with the differences to fp32. Each run is seeded, so the
only difference between two columns of one seed is the arithmetic (and what it changes downstream).
``--jobs N`` runs N of the (method, precision) pairs at once, each with one torch thread.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.cli import main as bench
from bench.core.records import RunDir
from bench.runner import RunRequest, run_identity

ROOT = Path(__file__).resolve().parent.parent
RULE = "val-worst-group"


def run_pair(method: str, dataset: str, precision: str, seeds: int, epochs: int | None, out: str) -> tuple[str, float]:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    arguments = ["run", "--method", method, "--dataset", dataset, "--seeds", str(seeds), "--precision", precision,
                 "--out", out, "--quiet"]
    if epochs is not None:
        arguments += ["--epochs", str(epochs)]
    with contextlib.redirect_stdout(io.StringIO()):  # its own table; the comparison is printed below
        status = bench(arguments)
    seconds = time.perf_counter() - started
    print(f"{method} {precision}: exit {status}, {seconds:.0f} s", file=sys.stderr, flush=True)
    return f"{method} {precision}", seconds


def seed_results(method: str, dataset: str, precision: str, seed: int, epochs: int | None, out: str
                 ) -> dict[str, float] | None:
    """The primary model's test worst-group and average accuracy (%) at the selected epoch, and the last
    epoch's training losses, of one finished run (None when it is not finished)."""
    identity = run_identity(RunRequest(method=method, dataset=dataset, epochs=epochs, precision=precision))
    run = RunDir.for_run(out, dataset, method, identity, seed)
    if not run.is_done():
        return None
    final = run.read_final()
    chosen = final["selection"][RULE][final["primary"]]["test"]
    last = run.read_metrics()[-1]["train"]
    return {"worst": 100 * chosen["worst_group_accuracy"], "average": 100 * chosen["average_accuracy"],
            "seconds": final["train_seconds_total"], **{f"loss {k}": v for k, v in last.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="erm,ule")
    parser.add_argument("--dataset", default="urbancars-synth")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="override the epochs of every run (default: the protocol's)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--out", default=str(ROOT / "results" / "precision"))
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    methods, precisions = args.methods.split(","), args.precisions.split(",")
    pairs = [(m, args.dataset, p, args.seeds, args.epochs, args.out) for m in methods for p in precisions]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        timings = dict(pool.map(run_pair, *zip(*pairs)))

    print(f"{args.dataset}, seeds 0-{args.seeds - 1}, epochs {args.epochs or 'of the protocol'}, torch "
          f"{torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; test accuracy (%) "
          f"of the primary model at the epoch picked by {RULE}")
    reference = precisions[0]
    for method in methods:
        print(f"\n{method} (wall: " + ", ".join(f"{p} {timings[f'{method} {p}']:.0f} s" for p in precisions) + ")")
        header = ["seed"] + [f"{p} {k}" for p in precisions for k in ("worst", "avg")]
        header += [f"{p}-{reference} {k}" for p in precisions[1:] for k in ("worst", "avg")]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        deltas: dict[str, list[float]] = {}
        losses: dict[str, dict[str, list[float]]] = {p: {} for p in precisions}
        for seed in range(args.seeds):
            results = {p: seed_results(method, args.dataset, p, seed, args.epochs, args.out) for p in precisions}
            if any(r is None for r in results.values()):
                print(f"| {seed} | " + " | ".join("-" for _ in header[1:]) + " |")
                continue
            for p in precisions:
                for key, value in results[p].items():  # type: ignore[union-attr]
                    if key.startswith("loss "):
                        losses[p].setdefault(key[5:], []).append(value)
            row = [str(seed)] + [f"{results[p][k]:.1f}" for p in precisions for k in ("worst", "average")]
            for p in precisions[1:]:
                for k in ("worst", "average"):
                    delta = results[p][k] - results[reference][k]  # type: ignore[index]
                    deltas.setdefault(f"{p} {k}", []).append(delta)
                    row.append(f"{delta:+.1f}")
            print("| " + " | ".join(row) + " |")
        for key, values in deltas.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"  {key} difference to {reference}: mean {statistics.mean(values):+.2f}, "
                  f"mean |d| {statistics.mean(abs(v) for v in values):.2f}, std {spread:.2f} (n={len(values)})")
        for p in precisions:
            means = ", ".join(f"{k} {statistics.mean(v):.4f}" for k, v in losses[p].items())
            print(f"  {p} last-epoch training losses (mean over seeds): {means}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
