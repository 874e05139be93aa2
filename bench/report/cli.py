"""``bench report``: its arguments and what it prints and writes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.core.selection import DEFAULT_RULE, RULES
from bench.display import display_path
from bench.report.aggregate import aggregate
from bench.report.load import RunIssue, load_results
from bench.report.published import load_published
from bench.report.render import to_csv, to_latex, to_markdown, write_report
from bench.report.tables import collapsed_warning


def _print_issues(issues: Sequence[RunIssue], limit: int = 20) -> None:
    if not issues:
        return
    for issue in issues[:limit]:
        print(f"skipped {issue.state} run {display_path(issue.path)}: {issue.reason}", file=sys.stderr)
    if len(issues) > limit:
        print(f"... and {len(issues) - limit} more skipped runs (all listed in skipped_runs.csv)", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    results = load_results(args.results)
    _print_issues(results.issues)
    board = aggregate(results, args.select, primary_only=args.primary_only)
    if warning := collapsed_warning(board):
        print(warning, file=sys.stderr)
    published = load_published() if args.published else None
    renderers = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}
    sys.stdout.write(renderers[args.format](board, published))
    if not args.no_files:
        folder = Path(args.output) if args.output else Path(args.results) / f"report-{args.select}"
        try:
            write_report(board, folder, with_html=args.html, with_plots=not args.no_plots, published=published)
        except OSError as error:
            raise BenchError(f"cannot write the report to {folder} ({error.strerror}); choose --output") from None
        print(f"report written to {display_path(folder)}", file=sys.stderr)
    return 0


def register(subparsers: dict[str, Any]) -> dict[str, Any]:
    """Add ``bench report`` (see bench.cli.COMMAND_MODULES)."""
    parser = subparsers["top"].add_parser(
        "report", help="leaderboard tables and plots from a results folder",
        description="Aggregate every finished run under a results folder into leaderboard tables (printed) and "
                    "write them with plots to --output (default RESULTS/report-RULE).",
    )
    parser.add_argument("results", nargs="?", default="results", help="results folder (default: results/)")
    parser.add_argument("--select", default=DEFAULT_RULE, choices=list(RULES),
                        help=f"model selection rule (default {DEFAULT_RULE}); oracle-test is an upper bound, marked "
                             "as such everywhere")
    parser.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"],
                        help="format printed to stdout (default markdown); the files hold all three")
    parser.add_argument("--output", help="folder for tables, plots and HTML (default: RESULTS/report-RULE)")
    parser.add_argument("--html", action="store_true", help="also write one self-contained report.html")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument("--no-files", action="store_true", help="print the table only, write nothing")
    parser.add_argument("--published", action="store_true",
                        help="beside each cell of a real dataset, the published number, its source and the difference "
                             "(where the protocols match); synthetic twins are never compared with a paper")
    parser.add_argument("--primary-only", action="store_true",
                        help="leave out the secondary models of multi-model methods (ULE's student, LfF's biased)")
    return {"report": cmd_report}
