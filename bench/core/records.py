"""Run records: one folder per run, the single source of truth for its state and results.

Layout: ``<out>/<dataset>/<method>/<config hash>/seed<k>/`` holding

* ``config.json``: the resolved config, the dataset's group structure, package versions, git commit;
* ``metrics.jsonl``: one line per evaluation (per epoch), with per-group correct/total counts of
  every evaluated model on val and test, so every metric and selection rule can be recomputed;
* ``checkpoint.pt``: the state after the last finished epoch (models, optimisers, method state,
  RNG states, how many metric lines it covers), replaced atomically after every epoch;
* ``final.json``: written last, atomically; its presence means the run is done;
* ``failed.json``: why a run failed (exception, non-finite loss); a failed run never looks done.

Every file is written to a temporary name in the same folder and renamed, so a killed process
never leaves a half-written file behind; ``metrics.jsonl`` is append-only and a torn last line is
dropped on read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"
FAILED_FILE = "failed.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(identity: dict[str, Any]) -> str:
    """Short, stable hash of the parts of a config that define a run (not its seed or device)."""
    return hashlib.sha1(canonical_json(identity).encode()).hexdigest()[:10]


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON so that ``path`` holds either the old or the complete new content, never a part."""
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch  # here, not at the top: every `bench` command imports this module, few need torch (~2 s)

    with _atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and flush it to disk."""
    line = json.dumps(obj, sort_keys=True, default=str) + "\n"
    with open(path, "a") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a JSON-lines file; a torn (unterminated or unparsable) last line is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text().split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number >= len(lines) - 2:  # only the last line may be torn by a kill
                break
            raise ValueError(f"{path}: line {number + 1} is not valid JSON") from None
    return records


def truncate_jsonl(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` records (used on resume to drop lines past the checkpoint)."""
    records = read_jsonl(path)[:n_lines]
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))


class RunDir:
    """Paths and state of one run's folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_run(cls, out: str | Path, dataset: str, method: str, identity: dict[str, Any], seed: int) -> RunDir:
        return cls(Path(out) / dataset / method / config_hash(identity) / f"seed{seed}")

    config = property(lambda self: self.path / CONFIG_FILE)
    metrics = property(lambda self: self.path / METRICS_FILE)
    checkpoint = property(lambda self: self.path / CHECKPOINT_FILE)
    final = property(lambda self: self.path / FINAL_FILE)
    failed = property(lambda self: self.path / FAILED_FILE)

    def is_done(self) -> bool:
        return self.final.exists()

    def is_failed(self) -> bool:
        return self.failed.exists() and not self.final.exists()

    def read_final(self) -> dict[str, Any]:
        return json.loads(self.final.read_text())

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config.read_text())

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics)

    def state(self) -> str:
        """``done``, ``failed``, ``incomplete`` (started, resumable) or ``new``."""
        if self.is_done():
            return "done"
        if self.failed.exists():
            return "failed"
        if self.config.exists():
            return "incomplete"
        return "new"
