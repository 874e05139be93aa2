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
never leaves a half-written file behind (a temporary file a kill left is deleted when the run is taken
up again: :func:`remove_temporaries`); ``metrics.jsonl`` is append-only and a torn last line is
dropped on read. Files get the permissions the process's umask gives (others in a shared results
folder can read them). A record that cannot be written (a full disk, a read-only folder) raises
:class:`RecordWriteError`, a one-line user error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError, DataError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"
FAILED_FILE = "failed.json"
TEMPORARY_SUFFIX = ".tmp"

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class RecordWriteError(BenchError):
    """A record could not be written: the file system refused (full, read-only, no permission)."""

    def __init__(self, path: Path, error: BaseException, stopped_short: bool = False) -> None:
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[-1]
        code = getattr(error, "errno", None)
        if stopped_short:  # torch's writer reports no errno; a write that stops short is most likely a full disk
            reason = f"the write stopped short, most likely a full disk: {reason}"
        if code in _FULL or stopped_short:
            hint = "free some space, or pass another --out"
        elif code in _READ_ONLY:
            hint = "pass a folder you can write to as --out"
        else:
            hint = "check the results folder (--out)"
        super().__init__(f"cannot write {path} ({reason}); {hint}")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(identity: dict[str, Any]) -> str:
    """Short, stable hash of the parts of a config that define a run (not its seed or device)."""
    return hashlib.sha1(canonical_json(identity).encode()).hexdigest()[:10]


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}"
        # os.open with mode 0o666 lets the umask decide the permissions (tempfile.mkstemp forces 0o600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise RecordWriteError(path, error) from None
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        raise RecordWriteError(path, error) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON so that ``path`` holds either the old or the complete new content, never a part."""
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch  # here, not at the top: every `bench` command imports this module, few need torch (~2 s)

    with _atomic_path(Path(path)) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as error:  # torch's file writer reports a failed write (a full disk) this way
            raise RecordWriteError(Path(path), error, stopped_short=True) from None


def append_jsonl(path: Path, obj: Any) -> str:
    """Append one JSON line and flush it to disk; returns the line (without its newline)."""
    line = json.dumps(obj, sort_keys=True, default=str)
    try:
        with open(path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise RecordWriteError(Path(path), error) from None
    return line


def read_jsonl_lines(path: Path) -> list[str]:
    """The complete lines of a JSON-lines file, as written; a torn (unterminated or unparsable) last line
    is dropped, any other line that is not JSON is a ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return []
    kept = []
    lines = path.read_text().split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if number >= len(lines) - 2:  # only the last line may be torn by a kill
                break
            raise ValueError(f"{path}: line {number + 1} is not valid JSON") from None
        kept.append(line)
    return kept


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a JSON-lines file; a torn (unterminated or unparsable) last line is dropped."""
    return [json.loads(line) for line in read_jsonl_lines(path)]


def truncate_jsonl(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines as they are (used on resume to drop lines past the checkpoint)."""
    lines = read_jsonl_lines(path)[:n_lines]
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


class LinesDigest:
    """A running SHA-256 of JSON lines as written: the checkpoint records it, so that a resumed run can
    tell that ``metrics.jsonl`` still holds exactly the evaluations the checkpoint follows."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._hash = hashlib.sha256()
        for line in lines:
            self.add(line)

    def add(self, line: str) -> None:
        self._hash.update(line.encode() + b"\n")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (call it only while holding the
    folder's run lock: a live writer's temporary file would go too); returns them."""
    removed = []
    for path in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _read_json_object(path: Path) -> dict[str, Any]:
    """A record file's JSON object; DataError naming the file when it is not one."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: unreadable (not a JSON object)")
    return content


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

    def final_problem(self) -> str | None:
        """Why final.json exists but does not record a finished run (None when it does, or is absent)."""
        if not self.final.exists():
            return None
        try:
            final = _read_json_object(self.final)
        except DataError as error:
            return str(error)
        if final.get("status") != "done":
            return f"{self.final}: status {final.get('status')!r}, not 'done'"
        return None

    def is_done(self) -> bool:
        """Whether final.json records a finished run (a readable JSON object with status "done")."""
        return self.final.exists() and self.final_problem() is None

    def is_failed(self) -> bool:
        return self.failed.exists() and not self.is_done()

    def read_final(self) -> dict[str, Any]:
        return _read_json_object(self.final)

    def read_config(self) -> dict[str, Any]:
        return _read_json_object(self.config)

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
