"""Unpacking a release into exactly the layout its loader reads, with nothing half-extracted left behind.

Everything is unpacked into a staging folder next to the target (``<root>/.bench-unpack-<dataset>-<pid>``,
on the same file system), checked, and moved into place with one rename. A staging folder left by a
killed run is removed by the next one. Archives that several datasets share a folder with
(Spawrious' challenges, all under ``spawrious224/``) are merged into the existing folder file by file,
each file by one rename: a file in the target is always whole, and the folder's marker
(:data:`MARKER`, which lists the archives it holds) is written last.

Archives are read in full: a ``.tar.gz`` to the end of its gzip stream, so that gzip's CRC checks every
byte, a ``.zip`` member by member with its CRC; members that would land outside the staging folder
(absolute paths, ``..``, links out, devices) are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from bench.core import records
from bench.core.errors import DataError
from bench.download.releases import Release

STAGING_PREFIX = ".bench-unpack-"
MARKER = ".bench-download.json"
CHUNK = 1 << 20


def _refuse(archive: Path, member: str, why: str) -> DataError:
    return DataError(f"{archive.name}: member {member!r} {why}; refusing to unpack it")


def _check_member_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise _refuse(archive, name, "would be written outside the dataset folder")


def _unpack_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, filter="data")
        else:  # Python 3.10 before the extraction filters: the same refusals by hand
            members = tar.getmembers()
            for member in members:
                _check_member_name(archive, member.name)
                if member.isdev():
                    raise _refuse(archive, member.name, "is a device file")
                if (member.issym() or member.islnk()) and (
                        PurePosixPath(member.linkname).is_absolute() or ".." in PurePosixPath(member.linkname).parts):
                    raise _refuse(archive, member.name, "links outside the dataset folder")
            tar.extractall(into, members=members)
        while tar.fileobj is not None and tar.fileobj.read(CHUNK):
            pass  # to the end of the compressed stream: gzip checks its CRC there


def _unpack_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            _check_member_name(archive, info.filename)
            zipped.extract(info, into)  # reads the member in full: a CRC mismatch raises BadZipFile


def unpack(archive: Path, into: Path) -> None:
    """Unpack ``archive`` into the folder ``into``. A damaged archive is deleted (a rerun fetches it
    again) and reported in one line."""
    try:
        (_unpack_zip if archive.suffix == ".zip" else _unpack_tar)(archive, into)
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as error:
        if isinstance(error, OSError) and error.errno:  # the disk, not the archive (a bad gzip has no errno)
            raise DataError(f"cannot unpack {archive.name} into {into} ({error.strerror}); free disk space or "
                            "choose another --data-root") from None
        archive.unlink(missing_ok=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{archive.name} is damaged ({reason}); it was deleted: rerun to download it "
                        "again") from None


def staging_folder(root: Path, dataset: str) -> Path:
    return root / f"{STAGING_PREFIX}{dataset}-{os.getpid()}"


def remove_stale_staging(root: Path, dataset: str) -> None:
    """Staging folders of this dataset left by a killed run (never a live one: the name holds the pid)."""
    for folder in root.glob(f"{STAGING_PREFIX}{dataset}-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_marker(folder: Path) -> dict[str, Any]:
    try:
        content = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _merge(source: Path, target: Path) -> None:
    """Move every file of ``source`` that ``target`` lacks into it, one rename each."""
    for folder, _, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            destination = target / relative / name
            if not destination.exists():
                os.replace(Path(folder) / name, destination)


def install(release: Release, fetched: dict[str, Path], root: Path, digests: dict[str, str],
            replace: bool = False) -> Path:
    """Unpack/place the fetched files (``fetched[name]``) into ``root/release.target``; returns it.

    ``digests[name]``: each file's SHA-256, recorded in the folder's marker. An existing target is
    merged into when the release is ``shared``, replaced with ``replace``, else a DataError.
    """
    remove_stale_staging(root, release.dataset)
    staging = staging_folder(root, release.dataset)
    staging.mkdir(parents=True)
    final = root / release.target
    try:
        for file in release.files:
            destination = staging / file.dest
            if file.is_archive:
                destination.mkdir(parents=True, exist_ok=True)
                unpack(fetched[file.name], destination)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fetched[file.name], destination)
        built = staging / release.target
        if not built.is_dir():
            found = ", ".join(sorted(p.name for p in staging.iterdir())) or "nothing"
            raise DataError(f"{release.dataset}: the files hold no {release.target}/ folder (found: {found}); "
                            "they are not the published release")
        marker = read_marker(final) if final.is_dir() else {}
        files = {**marker.get("files", {}),
                 **{f.name: {"sha256": digests[f.name], "url": f.url} for f in release.files}}
        records.atomic_write_json(built / MARKER, {"dataset_files": release.target, "files": files})
        if final.exists() and release.shared:
            marker_file = built / MARKER
            os.replace(marker_file, staging / MARKER)  # written last, once every file is in place
            _merge(built, final)
            os.replace(staging / MARKER, final / MARKER)
        elif final.exists() and not replace:
            raise DataError(f"{final} already exists; check it with `bench data check {release.dataset}`, or pass "
                            "--force to replace it")
        else:
            if final.exists():
                os.replace(final, staging / ".replaced")  # removed with the staging folder
            os.replace(built, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
