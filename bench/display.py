"""How the command line shows things to people: paths relative to where they stand."""

from __future__ import annotations

import os
from pathlib import Path


def display_path(path: str | Path) -> str:
    """``path`` relative to the working directory (``../`` steps included), never this machine's
    absolute path; a path on another drive or mount that has no relative form is shown as given."""
    try:
        return os.path.relpath(Path(path).expanduser().absolute(), Path.cwd())
    except ValueError:  # no relative path between them (e.g. another Windows drive)
        return str(path)
