"""Resumable HTTP downloads and checksum verification.

A file is written to ``<name>.part`` in the downloads folder and renamed to ``<name>`` only when
complete. A later call resumes a ``.part`` with an HTTP ``Range`` request; a server that answers
with the whole file (200 instead of 206) is read from the start again. Every failure is one-line
:class:`bench.core.errors.DataError` saying what was tried and what to do; the ``.part`` stays for
the next attempt.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench.core.errors import DataError
from bench.display import display_path

CHUNK = 1 << 20
TIMEOUT_S = 60
USER_AGENT = "debias-bench (bench data download)"
PART_SUFFIX = ".part"


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", header or "")
    return int(match.group(1)) if match else None


def download(url: str, target: Path, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch ``url`` into ``target`` (resuming ``target.part``); returns ``target``.

    ``progress(done, total)`` is called as bytes arrive (total None when the server does not say).
    """
    part = target.with_name(target.name + PART_SUFFIX)
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    what = f"{url} (into {display_path(part)})"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing after the end: the .part is whole (killed before its rename)
            os.replace(part, target)
            return target
        raise DataError(f"downloading {what}: HTTP {error.code} {error.reason}; the location may have moved: "
                        f"fetch the file another way into {display_path(target.parent)}/ and rerun") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(f"cannot reach {url} ({reason}); check the network (or HTTPS_PROXY), or fetch "
                        f"{target.name} another way into {display_path(target.parent)}/ and rerun (a file there "
                        "is checked and used)") from None
    with response:
        resumed = offset > 0 and response.status == 206 and _content_range_start(
            response.headers.get("Content-Range")) == offset
        if not resumed:
            offset = 0  # no range support (or another range): start again
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        done = offset
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except (http.client.IncompleteRead, OSError) as error:
            raise DataError(f"download of {target.name} interrupted after {done} of {total or '?'} bytes "
                            f"({type(error).__name__}); rerun the same command to resume it") from None
    if total is not None and done != total:
        raise DataError(f"download of {target.name} interrupted after {done} of {total} bytes; rerun the same "
                        "command to resume it")
    os.replace(part, target)
    return target


def file_digests(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def verify(path: Path, md5: str | None, origin: str) -> str:
    """Check ``path`` against its published MD5 (when there is one) and return its SHA-256. A file that
    does not match is deleted (so that a rerun downloads it again) and a DataError says so."""
    actual_md5, sha256 = file_digests(path)
    if md5 is not None and actual_md5 != md5.lower():
        path.unlink(missing_ok=True)
        raise DataError(f"{path.name}: MD5 {actual_md5} differs from the published {md5} ({origin}); the file "
                        "is corrupt or another version, and was deleted: rerun to fetch it again")
    return sha256
