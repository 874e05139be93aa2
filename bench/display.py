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


def fit_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], width: int = TERMINAL_WIDTH) -> str:
    """A github table whose LAST column is shortened (``…``) so that every line fits ``width``."""
    from tabulate import tabulate

    # tabulate's github columns: "| " + cell + " " each, a closing "|"; a header gets 2 more spaces of padding.
    fixed = [max([len(str(headers[i])) + 2, *(len(str(row[i])) for row in rows)]) + 3
             for i in range(len(headers) - 1)]
    room = max(width - sum(fixed) - 4, len(headers[-1]) + 2)
    shortened = [[*row[:-1], textwrap.shorten(str(row[-1]), room, placeholder=" …")] for row in rows]
    return tabulate(shortened, headers=list(headers), tablefmt="github", disable_numparse=True)
