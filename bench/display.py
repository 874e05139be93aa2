"""How the command line shows things to people: paths relative to where they stand, tables that fit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def display_path(path: str | Path) -> str:
    """``path`` relative to the working directory (``../`` steps included), never this machine's
    absolute path; a path on another drive or mount that has no relative form is shown as given."""
    try:
        return os.path.relpath(Path(path).expanduser().absolute(), Path.cwd())
    except ValueError:  # no relative path between them (e.g. another Windows drive)
        return str(path)


TERMINAL_WIDTH = 100  # every table bench prints fits a terminal this wide


def fit_table(rows: list[list[Any]], headers: list[str], wrap: list[int], width: int = TERMINAL_WIDTH) -> str:
    """A github-style table no wider than ``width``: the text of the columns ``wrap`` (indices) is
    wrapped onto several lines when the table would be wider otherwise."""
    from tabulate import tabulate

    natural = [max(len(str(cell)) for cell in [header, *(row[i] for row in rows)]) for i, header in enumerate(headers)]
    fixed = sum(w for i, w in enumerate(natural) if i not in wrap)
    room = width - fixed - 3 * len(headers) - 1  # "| " before each cell, " |" after the last, " | " between
    per_column = max(room // max(len(wrap), 1), 12)
    widths = [per_column if i in wrap and natural[i] > per_column else None for i in range(len(headers))]
    return tabulate(rows, headers=headers, tablefmt="github", maxcolwidths=widths, disable_numparse=True)
