"""The benchmark table on the synthetic twins: every method, its defaults, N seeds, one command.

Runs ``bench run`` for each (dataset, method) into one results folder (finished seeds are skipped, so
an interrupted benchmark continues where it stopped), then ``bench report`` on that folder, and
writes the leaderboard with the command that made it to ``docs/benchmark-twins.md`` and the report's
files (tables, plots) to ``docs/benchmark-twins/``.

    python benchmarks/twin_leaderboard.py [--seeds 5] [--datasets waterbirds-synth,urbancars-synth]
                                          [--methods erm,groupdro,jtt,dfr,lff,ule] [--out results/twins]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from bench.cli import main as bench

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", default="waterbirds-synth,urbancars-synth,celeba-synth")
    parser.add_argument("--methods", default="erm,groupdro,jtt,dfr,lff,ule")
    parser.add_argument("--out", default=str(ROOT / "results" / "twins"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args()
    command = "python benchmarks/twin_leaderboard.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    timings = []
    for dataset in args.datasets.split(","):
        for method in args.methods.split(","):
            started = time.perf_counter()
            status = bench(["run", "--method", method, "--dataset", dataset, "--seeds", str(args.seeds),
                            "--out", args.out, "--quiet"])
            timings.append((dataset, method, time.perf_counter() - started, status))
            print(f"{dataset} {method}: exit {status}, {timings[-1][2]:.0f} s", file=sys.stderr, flush=True)
    docs = Path(args.docs)
    report_dir = docs / "benchmark-twins"
    report_status = bench(["report", args.out, "--output", str(report_dir)])
    leaderboard = (report_dir / "leaderboard.md").read_text()
    lines = [
        "# Benchmark on the synthetic twins",
        "",
        f"Made by `{command.strip()}` (every method with its defaults, {args.seeds} seeds, CPU).",
        "Tables: `bench report` on the results folder, model selection by validation worst-group accuracy.",
        "Plots and the LaTeX/CSV versions: [benchmark-twins/](benchmark-twins/).",
        "",
        leaderboard,
        "",
        "## Wall-clock time per (dataset, method), all seeds",
        "",
        "| dataset | method | seconds | exit status |",
        "| --- | --- | --- | --- |",
        *[f"| {d} | {m} | {s:.0f} | {status} |" for d, m, s, status in timings],
    ]
    (docs / "benchmark-twins.md").write_text("\n".join(lines) + "\n")
    return report_status


if __name__ == "__main__":
    sys.exit(main())
