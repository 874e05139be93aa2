"""Run-scoped artifacts: what a method may cache between the stages of one run (DFR's features).

The trainer owns the store and gives it to the method through its context; the method names an
artifact and gets it back, and never sees a path. The store of a run writes ``<name>.pt`` into the
run's folder, atomically, so a resumed run finds what the interrupted one saved; without a folder
(tests, benchmarks) it keeps the artifacts in memory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.core import records

_NAME = re.compile(r"[a-z][a-z0-9_]*")


class ArtifactStore:
    """Named tensors (dicts of tensors and plain values) kept for the lifetime of a run."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, Any] = {}

    def _path(self, name: str) -> Path | None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"artifact name {name!r}: use lower-case letters, digits and _")
        return self.folder / f"{name}.pt" if self.folder is not None else None

    def load(self, name: str) -> Any | None:
        """The artifact saved under ``name``, or None if there is none (or it cannot be read)."""
        path = self._path(name)
        if path is None:
            return self._memory.get(name)
        if not path.is_file():
            return None
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache is recomputed, never fatal
            return None

    def save(self, name: str, value: Any) -> None:
        path = self._path(name)
        if path is None:
            self._memory[name] = value
        else:
            records.atomic_torch_save(path, value)
