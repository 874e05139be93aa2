"""``bench data download NAME --data-root DIR``: fetch, check, unpack, then ``bench data check NAME``.

Files are fetched into ``DIR/.bench-downloads/`` (resumable: rerun the command after an interruption),
checked (MD5 where the dataset's source publishes one), unpacked into the layout the loader reads
(bench.download.install) and deleted unless ``--keep``. A file already in the downloads folder is
checked and used as it is: that is how CelebA (no plain download) and an offline machine get their
files. ``--mirror URL`` fetches every file from ``URL/<file name>`` instead (a local copy).
UrbanCars is generated, not downloaded: the command prints the generation steps and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError, DataError
from bench.display import display_path
from bench.download.fetch import download, verify
from bench.download.install import MARKER, install, read_marker
from bench.download.releases import URBANCARS_STEPS, Release, release_for

DOWNLOADS = ".bench-downloads"


def register(subparsers: dict[str, Any]) -> dict[str, Any]:
    """Adds ``bench data download`` (see bench.cli.COMMAND_MODULES)."""
    parser = subparsers["data"].add_parser(
        "download", help="fetch a real dataset's published files, check and unpack them where the loader reads "
                         "them, then run bench data check")
    parser.add_argument("name", help="waterbirds, celeba, spawrious-* (urbancars: prints how to generate it)")
    parser.add_argument("--data-root", help="folder to put the dataset in (default: $BENCH_DATA_ROOT)")
    parser.add_argument("--mirror", metavar="URL", help="fetch each file from URL/<file name> instead of its "
                                                        "official location (checksums still apply)")
    parser.add_argument("--force", action="store_true", help="replace the dataset's folder if it is already there")
    parser.add_argument("--keep", action="store_true", help="keep the downloaded files once unpacked")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding images in the final check")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return {"data download": cmd_download}


def print_wrapped(lines: tuple[str, ...] | list[str]) -> None:
    """Print text lines wrapped at 100 columns, each keeping its own indentation (URLs and paths unbroken)."""
    for line in lines:
        indent = line[: len(line) - len(line.lstrip())]
        print(textwrap.fill(line.strip(), 100, initial_indent=indent, subsequent_indent=indent + "   ",
                            break_long_words=False, break_on_hyphens=False))


def _already_there(release: Release, source: Any, root: Path) -> bool:
    """The dataset's files are in ``root``: its folder (for a shared folder: its archive in the folder's
    marker, or a tree the loader reads without error)."""
    if source.locate(root) is None:
        return False
    if not release.shared:
        return True
    held = read_marker(root / release.target).get("files", {})
    if any(file.name in held for file in release.files) or "spawrious224__entire_dataset.tar.gz" in held:
        return True
    from datasets import load_dataset

    try:
        load_dataset(release.dataset, root, {})
    except DataError:
        return False
    return True


def _progress_bar(name: str, quiet: bool) -> Any:
    from tqdm import tqdm

    bar = tqdm(desc=name, unit="B", unit_scale=True, disable=quiet, leave=False, file=sys.stderr, mininterval=0.5)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return bar, update


def _check(args: argparse.Namespace, root: Path) -> int:
    from bench.data_tools import cmd_check

    print(f"\nbench data check {args.name} --data-root {display_path(root)}")
    return cmd_check(argparse.Namespace(name=args.name, data_root=str(root), attrs=None, data_option=[],
                                        workers=args.workers, quiet=args.quiet))


def fetch_files(release: Release, downloads: Path, mirror: str | None, quiet: bool) -> tuple[dict[str, Path],
                                                                                            dict[str, str]]:
    """Every file of the release in ``downloads``, fetched where missing and checked: (paths, SHA-256s)."""
    missing = [f.name for f in release.files if f.url is None and not mirror and not (downloads / f.name).exists()]
    if missing:
        print_wrapped([*release.manual_steps, f"Downloads folder: {display_path(downloads)}/"])
        raise DataError(f"{release.dataset}: {', '.join(missing)} not in {display_path(downloads)}/; fetch them as "
                        "described above (no plain download exists) and rerun, or pass --mirror URL")
    paths, digests = {}, {}
    for file in release.files:
        path = downloads / file.name
        if not path.exists():
            url = f"{mirror.rstrip('/')}/{file.name}" if mirror else file.url
            assert url is not None
            print(f"downloading {file.name} from {url}", file=sys.stderr)
            bar, update = _progress_bar(file.name, quiet)
            with bar:
                download(url, path, update)
        digests[file.name] = verify(path, file.md5, release.checksum_origin)
        checked = (f"MD5 as published ({release.checksum_origin})" if file.md5 else
                   f"no published checksum ({release.checksum_origin}); SHA-256 {digests[file.name]}")
        print_wrapped([f"{file.name}: {checked}"])
        paths[file.name] = path
    return paths, digests


def cmd_download(args: argparse.Namespace) -> int:
    from datasets import get_dataset, resolve_data_root

    source = get_dataset(args.name)
    if not source.needs_data_root:
        raise BenchError(f"{args.name} is built in (a synthetic twin, generated offline): nothing to download")
    if args.name == "urbancars":
        print_wrapped(URBANCARS_STEPS)
        raise DataError("urbancars is generated, not downloaded: follow the steps above, then run "
                        "`bench data check urbancars --data-root DIR`")
    release = release_for(args.name)
    if release is None:
        raise BenchError(f"{args.name}: no published files to download (custom is your own images: "
                         "see `bench data info custom`)")
    root = resolve_data_root(args.data_root)
    if root is None:
        raise DataError("bench data download needs --data-root DIR (or BENCH_DATA_ROOT): the folder to put the "
                        "dataset in")
    downloads = root / DOWNLOADS
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create {downloads} ({error.strerror}); choose a writable --data-root") from None
    if _already_there(release, source, root) and not args.force:
        print(f"{args.name} is already in {display_path(root / release.target)} ({MARKER} lists what was "
              "downloaded; --force downloads it again)")
        return _check(args, root)
    paths, digests = fetch_files(release, downloads, args.mirror, args.quiet)
    folder = install(release, paths, root, digests, replace=args.force)
    print(f"{args.name}: unpacked into {display_path(folder)}")
    if not args.keep:
        for path in paths.values():
            path.unlink(missing_ok=True)
        if not any(downloads.iterdir()):
            downloads.rmdir()
    if source.locate(root) is None:
        raise DataError(f"{args.name}: unpacked, but not in the layout the loader reads (expected "
                        f"{display_path(root / release.target)}); please report it")
    return _check(args, root)
