"""``bench data check|prepare|export|clean``: verify a dataset's files, build its image cache, write a
twin as files, delete stale twin caches.

``check`` loads the dataset (which validates its index files and that every image file exists),
decodes every image file completely (a truncated or unreadable file is reported by path), prints
the group counts of every split and compares them with the published counts of the release (for a
twin written by ``export``: with the twin's own counts): any difference is an error (exit status 2),
shown per group and split in the printed table.

``prepare`` decodes and resizes every image once into the dataset's image cache (see
datasets/_files.py) at the resolution training will use: ``--image-size`` (default: the size an
exported twin was written at, else the input size of ``--backbone``, itself resnet50 by default).
Training finds and uses the cache automatically.

``export`` writes a synthetic twin in its real counterpart's layout (bench/data_export.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.core.errors import BenchError, DataError
from bench.display import display_path

MAX_LISTED = 5  # unreadable files named in the one-line error (all of them are printed above it)
DEFAULT_EXPORT_SIZE = 64  # pixels of an exported twin's images, by default (4.5 times the twins' own 28)


def register(subparsers: dict[str, Any]) -> dict[str, Any]:
    data = subparsers["data"]
    check = data.add_parser("check", help="check a dataset's files and compare its group counts with the published")
    _common_arguments(check)
    prepare = data.add_parser("prepare", help="build the image cache (decoded, resized images) for fast training")
    _common_arguments(prepare)
    prepare.add_argument("--image-size", type=int,
                         help="input size of the backbone the cache is for (default: the size an exported twin was "
                              "written at, else that of --backbone)")
    prepare.add_argument("--backbone", default="resnet50", help="backbone whose input size to use (default resnet50)")
    prepare.add_argument("--cache-dir", help="where to write the cache (default: $BENCH_IMAGE_CACHE_DIR, "
                                             "else .bench-cache/ in the dataset folder)")
    prepare.add_argument("--force", action="store_true", help="rebuild the cache even if it is up to date")
    export = data.add_parser("export", help="write a synthetic twin as files in the layout of its real dataset")
    export.add_argument("name", help="the twin: waterbirds-synth, celeba-synth, urbancars-synth, spawrious-synth")
    export.add_argument("dir", help="folder to write the dataset folder into (the --data-root of the real loader)")
    export.add_argument("--image-size", type=int, default=DEFAULT_EXPORT_SIZE,
                        help=f"pixels of the written images (default {DEFAULT_EXPORT_SIZE}; the twins are 28 px, "
                             "upscaled bicubically)")
    export.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE",
                        help="the twin's options: data_seed=N (default 0)")
    export.add_argument("--force", action="store_true", help="replace the dataset folder if it exists")
    clean = data.add_parser("clean", help="delete the synthetic twins' cached files that the current code no "
                                          "longer reads (left by older versions of a twin)")
    clean.add_argument("--dry-run", action="store_true", help="only list them")
    return {"data check": cmd_check, "data prepare": cmd_prepare, "data export": cmd_export, "data clean": cmd_clean}


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="dataset name (see `bench list`)")
    parser.add_argument("--data-root", help="folder holding the dataset (default: $BENCH_DATA_ROOT)")
    parser.add_argument("--attrs", help="spurious attributes (celeba, custom), comma-separated")
    parser.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE", help="dataset options")
    parser.add_argument("--workers", type=int, default=0, help="processes that decode images (default: this one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from bench.cli import _dataset_options

    return _dataset_options(args)


def _bar(total: int, description: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=description, disable=quiet, leave=False, dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr)


def count_table(dataset: Any, expected: dict[str, list[int]] | None, label: str = "the published"
                ) -> tuple[str, int]:
    """The group counts found (one column per split, plus any joined split the expected counts use, e.g.
    ``train+val``) and, when they differ from the ``expected`` counts (published, or an exported twin's
    own: ``label`` names them), a second table of the differing (split, group) cells with both counts;
    returns the text and the number of differing cells. Both tables fit 100 columns whatever the number
    of splits."""
    from tabulate import tabulate

    found = {split: np.asarray(dataset.group_counts(split)) for split in dataset.splits}
    keys = list(found)
    for key in expected or {}:
        if key not in found:
            found[key] = sum(found[part] for part in key.split("+"))
            keys.append(key)
    rows = [[g, name] + [int(found[key][g]) for key in keys] for g, name in enumerate(dataset.group_names)]
    rows.append(["", "total"] + [int(found[key].sum()) for key in keys])
    text = tabulate(rows, headers=["group", "name", *keys], tablefmt="github")
    differing = []
    for key, counts in (expected or {}).items():
        wanted = np.asarray(counts)
        if wanted.shape != found[key].shape:
            raise BenchError(f"{label} counts of {key} have {len(wanted)} groups, the dataset "
                             f"{len(found[key])}; the dataset's group definition is not the {label} one")
        for g in np.flatnonzero(found[key] != wanted):
            difference = int(found[key][g] - wanted[g])
            differing.append([key, int(g), dataset.group_names[g], int(found[key][g]), int(wanted[g]),
                              f"{difference:+d}"])
    if differing:
        text += f"\n\nCells that differ from {label} counts:\n" + tabulate(
            differing, headers=["split", "group", "name", "found", "expected", "diff"], tablefmt="github",
            disable_numparse=True)
    return text, len(differing)


def image_paths(dataset: Any) -> list[Path]:
    """Every distinct image file of a file-backed dataset (none for the synthetic twins)."""
    from bench.core.dataset import FileImages

    files = dataset.extra.get("image_files")
    if files is not None:
        return files.paths()
    return sorted({path for split in dataset.splits.values() if isinstance(split.images, FileImages)
                   for path in split.images.paths})


def cmd_check(args: argparse.Namespace) -> int:
    from datasets import get_dataset, load_dataset, resolve_data_root
    from datasets._files import EXPORT_MARKER, find_unreadable

    source = get_dataset(args.name)
    options = _options(args)
    dataset = load_dataset(args.name, args.data_root, options)
    marker = source.export_marker(resolve_data_root(args.data_root))
    if marker is not None:
        from bench.data_export import expected_counts

        expected = expected_counts(marker, dataset, options)
        label = f"the twin {marker['twin']}'s"
        origin = (f"the twin {marker['twin']}'s own counts: this folder was written by `bench data export` (its "
                  f"{EXPORT_MARKER}), so the real release's published counts do not apply")
        current = get_dataset(marker["twin"]).data_version()
        if marker["data_version"] != current:
            print(f"note: exported from {marker['twin']} data version {marker['data_version']}; the current code "
                  f"generates {current} (export again for the current twin)")
    else:
        published_of = getattr(source, "published_counts", None)
        expected = published_of(options) if published_of else None
        label = "the published"
        origin = getattr(source, "published_origin", "")
    paths = image_paths(dataset)
    files = dataset.extra.get("image_files")
    print(f"{dataset.name}" + (f" in {display_path(files.root)}" if files is not None else "")
          + f": {len(paths)} image files" + (f" (the synthetic twin {dataset.synthetic})" if dataset.synthetic else ""))
    table, n_differences = count_table(dataset, expected, label)
    print(table)
    if expected is None:
        print(f"No published group counts to compare with for {dataset.name}"
              + (" with these options" if options else "") + ".")
    else:
        print(textwrap.fill(f"Expected counts: {origin}.", 100) if origin else "")

    if paths:
        with _bar(len(paths), f"decoding {dataset.name} images", args.quiet) as bar:
            unreadable = find_unreadable(paths, args.workers, bar.update)
        for path, reason in unreadable:
            print(f"unreadable: {display_path(path)}: {reason}")
        if unreadable:
            listed = "; ".join(f"{display_path(path)} ({reason})" for path, reason in unreadable[:MAX_LISTED])
            more = f" and {len(unreadable) - MAX_LISTED} more (listed above)" if len(unreadable) > MAX_LISTED else ""
            raise DataError(f"{len(unreadable)} of {len(paths)} image files cannot be read: {listed}{more}; "
                            "re-copy or re-extract them")
        print(f"All {len(paths)} image files decode.")
    if n_differences:
        what = "the twin's own" if marker is not None else "the published ones"
        raise DataError(f"{dataset.name}: group counts differ from {what} in {n_differences} (group, split) cells "
                        "(listed above); the files are not "
                        + ("the exported twin" if marker is not None else "the published release"))
    if expected is not None:
        print(f"Group counts match {label} counts.")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from bench.core.backbones import get_backbone
    from datasets import SUBSAMPLE_OPTION, get_dataset, resolve_data_root
    from datasets._files import CACHE_ENV, FileDatasetSource, build_cache, stale_caches

    source = get_dataset(args.name)
    if not issubclass(source, FileDatasetSource):
        raise BenchError(f"bench data prepare: {args.name} has no image cache; it applies to the file-backed "
                         "benchmarks (waterbirds, celeba, spawrious-*, urbancars)")
    root = resolve_data_root(args.data_root)
    if args.image_size is None:  # what `bench run` trains at: an export's size, else the backbone's input size
        marker = source.export_marker(root)
        image_size = marker["image_size"] if marker else get_backbone(args.backbone).input.size
    else:
        image_size = args.image_size
    if args.cache_dir:
        os.environ[CACHE_ENV] = str(args.cache_dir)
    options = {**_options(args), "image_size": image_size}
    options.pop(SUBSAMPLE_OPTION, None)  # the cache holds every image; a subsampled run reads its rows from it
    dataset = source.load(root, options)
    files, pipeline = dataset.extra["image_files"], dataset.extra["pipeline"]
    if dataset.extra["image_cache"] is not None and not args.force:
        print(f"{dataset.name}: the image cache is up to date: {dataset.extra['image_cache']}")
        return 0
    for stale in stale_caches(dataset.name, files, pipeline.frame):
        stale.unlink(missing_ok=True)
        print(f"removed the stale cache {stale} (built from other files)")
    started = time.perf_counter()
    with _bar(len(files), f"caching {dataset.name} at {pipeline.frame[0]}x{pipeline.frame[1]}", args.quiet) as bar:
        path = build_cache(dataset.name, files, pipeline, args.workers, bar.update)
    seconds = time.perf_counter() - started
    print(f"{dataset.name}: cached {len(files)} images at {pipeline.frame[0]}x{pipeline.frame[1]} in {path} "
          f"({path.stat().st_size / 1e9:.2f} GB, {seconds:.0f} s); training at image size {image_size} uses it")
    if args.cache_dir:
        print(f"set {CACHE_ENV}={args.cache_dir} when training so that the cache is found")
    return 0


def stale_twin_caches(twin_names: list[str]) -> list[Path]:
    """Cached twin files that no twin of the current code reads: those written by an older generator
    (another ``GENERATOR_VERSION`` or code fingerprint). Each edit of a twin's code leaves one behind.
    (Here rather than in datasets/_synth.py, whose every edit changes the twins' code fingerprint.)"""
    from datasets._synth import cache_dir, twin_cache_path

    stale = []
    for name in twin_names:
        # What follows the seed in the current code's file name (its version and code fingerprint).
        current = twin_cache_path(name, 0).name.removeprefix(f"{name}-seed0")
        stale.extend(path for path in sorted(cache_dir().glob(f"{name}-seed*.npz")) if not path.name.endswith(current))
    return stale


def cmd_clean(args: argparse.Namespace) -> int:
    from datasets import dataset_names, get_dataset
    from datasets._synth import SyntheticTwinSource, cache_dir

    twins = [name for name in dataset_names() if issubclass(get_dataset(name), SyntheticTwinSource)]
    stale = stale_twin_caches(twins)
    freed = 0
    for path in stale:
        size = path.stat().st_size
        if not args.dry_run:
            path.unlink(missing_ok=True)
        freed += size
        print(f"{'would remove' if args.dry_run else 'removed'} {path} ({size / 1e6:.1f} MB)")
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(stale)} stale twin file(s) in {cache_dir()}; {verb} {freed / 1e6:.1f} MB")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bench.data_export import export_twin
    from datasets._synth import data_seed_from

    options = _options(args)
    unknown = [key for key in options if key != "data_seed"]
    if unknown:
        raise BenchError(f"--data-option {unknown[0]}: bench data export takes only data_seed=N (the twin's)")
    started = time.perf_counter()
    folder, marker = export_twin(args.name, Path(args.dir), args.image_size, data_seed_from(options), args.force)
    print(f"wrote {marker['n_images']} images of {args.name} ({marker['image_size']} px, upscaled with "
          f"{marker['resampling']}, {marker['image_format']}) in the layout of {marker['dataset']} to "
          f"{display_path(folder)} in {time.perf_counter() - started:.0f} s")
    print(f"read it with: --dataset {marker['dataset']} --data-root {display_path(args.dir)} (e.g. bench data check "
          f"{marker['dataset']} --data-root {display_path(args.dir)})")
    return 0
