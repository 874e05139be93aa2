"""How the command line shows things to people: paths relative to where they stand, tables that fit."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def display_path(path: str | Path) -> str:
    """``path`` relative to the working directory (``../`` steps included), never this machine's
    absolute path; a path on another drive or mount that has no relative form is shown as given."""
    try:
        return os.path.relpath(Path(path).expanduser().absolute(), Path.cwd())
    except ValueError:  # no relative path between them (e.g. another Windows drive)
        return str(path)


TERMINAL_WIDTH = 100  # every table and wrapped text bench prints fits a terminal this wide
CAVEAT_MARK = "†"  # beside a method that carries a caveat (Method.caveat), in every table that names it


def fit_table(
    rows: Sequence[Sequence[Any]], headers: Sequence[str], width: int = TERMINAL_WIDTH, column_width: int = 40
) -> str:
    """A github table that fits ``width``: a cell of any column but the last that is wider than
    ``column_width`` is wrapped onto continuation rows (empty in the other columns); the LAST column is
    shortened (``…``) to the room left."""
    from tabulate import tabulate

    wrapped: list[list[str]] = []
    for row in rows:
        pieces = [textwrap.wrap(str(cell), column_width, break_long_words=False, break_on_hyphens=False) or [""]
                  for cell in row[:-1]]
        for line in range(max(len(piece) for piece in pieces) if pieces else 1):
            first = line == 0
            wrapped.append([piece[line] if line < len(piece) else "" for piece in pieces]
                           + [str(row[-1]) if first else ""])
    # tabulate's github columns: "| " + cell + " " each, a closing "|"; a header gets 2 more spaces of padding.
    fixed = [max([len(str(headers[i])) + 2, *(len(row[i]) for row in wrapped)]) + 3
             for i in range(len(headers) - 1)]
    room = max(width - sum(fixed) - 4, len(headers[-1]) + 2)
    shortened = [[*row[:-1], textwrap.shorten(row[-1], room, placeholder=" …") if row[-1] else ""]
                 for row in wrapped]
    return tabulate(shortened, headers=list(headers), tablefmt="github", disable_numparse=True)
