"""``bench list`` and ``bench data info NAME``: what the harness has, in tables that fit a terminal.

``bench list`` prints one short line per method, dataset and preset (long texts shortened to fit
:data:`TERMINAL_WIDTH` columns); ``bench list --long`` prints every entry in full, wrapped, one block per
entry; ``bench list --presets`` lists the sweep presets (bench.sweep.presets). ``bench data info
NAME`` prints a dataset's full description, where its files come from, its training protocol and
its group counts per split (the published counts when the files are not there).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.display import CAVEAT_MARK, TERMINAL_WIDTH, display_path, fit_table

INDENT = "    "


def register(subparsers: dict[str, Any]) -> dict[str, Any]:
    """Adds ``bench list`` and ``bench data info`` (see bench.cli.COMMAND_MODULES)."""
    listing = subparsers["top"].add_parser("list", help="list methods, datasets, backbones and sweep presets")
    listing.add_argument("--data-root", help="folder holding the datasets (default: $BENCH_DATA_ROOT)")
    listing.add_argument("--long", action="store_true", help="every entry in full: papers, descriptions, "
                                                             "where the files come from, hyperparameters")
    listing.add_argument("--presets", action="store_true", help="the sweep presets (presets/NAME.yaml), each "
                                                                "reproducing a paper's protocol, with its source")
    info = subparsers["data"].add_parser("info", help="a dataset's description, source, protocol and group counts")
    info.add_argument("name")
    info.add_argument("--data-root")
    info.add_argument("--attrs")
    info.add_argument("--data-option", nargs="*", default=[], metavar="KEY=VALUE")
    return {"list": cmd_list, "data info": cmd_data_info}


def block(name: str, fields: Sequence[tuple[str, str]]) -> str:
    """``name`` then each ``label: text`` wrapped at :data:`TERMINAL_WIDTH` under it (paths are never broken)."""
    lines = [name]
    for label, text in fields:
        if text:
            lines.append(textwrap.fill(f"{label}: {text}", TERMINAL_WIDTH, initial_indent=INDENT,
                                       subsequent_indent=INDENT + "  ", break_long_words=False,
                                       break_on_hyphens=False))
    return "\n".join(lines)


def _summary(module_name: str) -> str:
    doc = sys.modules[module_name].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _files_status(source: Any, root: Any) -> tuple[str, str]:
    """(short status, where) of a dataset's files; a folder written by ``bench data export`` says so."""
    if not source.needs_data_root:
        return "built in", "generated offline and cached (synthetic twin)"
    located = source.locate(root) if root else None
    if located:
        return "found" + _export_note(source.name, located), display_path(located)
    return "not found", "no --data-root given" if root is None else f"not under {display_path(root)}"


def _export_note(name: str, folder: Path) -> str:
    """What ``bench list`` adds to a dataset folder written by ``bench data export``."""
    from datasets._files import read_export_marker

    try:
        marker = read_export_marker(folder, None)
    except BenchError as error:
        return f" ({error})"
    if marker is None:
        return ""
    if marker["dataset"] != name:
        return f" (the twin {marker['twin']} for {marker['dataset']}: not readable as {name})"
    return f" (the twin {marker['twin']}, {marker['image_size']} px)"


def _backbone_table() -> str:
    from bench.core.backbones import BUILT_IN, TIMM_PREFIX

    rows = [[backbone.name, backbone.pretrained_weights,
             f"{backbone.input.size} px, {backbone.input.normalisation.describe()}"] for backbone in BUILT_IN.values()]
    # The descriptions are in ``bench list --long``: with them no column here would be readable in 100.
    return (fit_table(rows, ["backbone", "pretrained=true loads", "input"]) + "\n"
            + textwrap.fill(f"Any timm model is a backbone too: --backbone {TIMM_PREFIX}<model>, e.g. "
                            f"{TIMM_PREFIX}convnext_tiny (names: python -c 'import timm; print(timm.list_models())'); "
                            "its input size and normalisation come from timm's pretrained_cfg, its pretrained "
                            "weights from timm's caches.", TERMINAL_WIDTH))


def _download_hint(name: str) -> str:
    from bench.download.releases import release_for

    release = release_for(name)
    return f"bench data download {name} --data-root DIR ({release.kind_text})" if release else ""


def _list_presets(long: bool) -> str:
    from bench.sweep.presets import presets

    found = presets()
    if long:
        return "\n\n".join(block(p.name, [("title", p.title), ("source", p.source), ("notes", p.notes),
                                          ("methods", ", ".join(p.methods)), ("datasets", ", ".join(p.datasets)),
                                          ("run", f"bench sweep presets/{p.name}.yaml --data-root DIR "
                                                  "--launcher slurm")])
                           for p in found)
    rows = [[p.name, f"{len(p.methods)} x {len(p.datasets)}", p.title] for p in found]
    return (fit_table(rows, ["preset", "methods x datasets", "title (source: --long)"]) + "\n\n"
            + textwrap.fill("bench sweep presets/NAME.yaml --data-root DIR --launcher slurm runs one; "
                            "bench list --presets --long shows each one's source and notes.", TERMINAL_WIDTH))


def cmd_list(args: argparse.Namespace) -> int:
    from bench.core.backbones import BUILT_IN
    from datasets import dataset_names, get_dataset, resolve_data_root
    from methods import get_method, method_names

    if args.presets:
        print(_list_presets(args.long))
        return 0
    root = resolve_data_root(args.data_root)
    if args.long:
        blocks = []
        for name in method_names():
            cls = get_method(name)
            own = "; ".join(f"{key} (default {spec.default!r}): {spec.doc}" for key, spec in cls.own_hparams.items())
            fields = [("what", _summary(cls.__module__)), ("paper", cls.paper),
                      *([("caveat", cls.caveat)] if cls.caveat else []), ("own hparams", own)]
            blocks.append(block(f"method {name}", fields))
        for name in dataset_names():
            source = get_dataset(name)
            status, where = _files_status(source, root)
            blocks.append(block(f"dataset {name}", [
                ("what", source.description), ("files", f"{status}: {where}"), ("get it", source.obtain_hint),
                ("download", _download_hint(name)), ("details", f"bench data info {name}")]))
        blocks.append(block("backbones", [(backbone.name, f"{backbone.description}; input {backbone.input.size} px, "
                                                          f"{backbone.input.normalisation.describe()}; pretrained=true "
                                                          f"loads {backbone.pretrained_weights}")
                                         for backbone in BUILT_IN.values()]))
        print("\n\n".join(blocks))
        return 0
    methods = [get_method(name) for name in method_names()]
    print(fit_table([[cls.name + (CAVEAT_MARK if cls.caveat else ""), cls.paper] for cls in methods],
                    ["method", "paper"]))
    for cls in methods:
        if cls.caveat:
            print(textwrap.fill(f"{CAVEAT_MARK} {cls.name}: {cls.caveat}", TERMINAL_WIDTH))
    print()
    rows = [[name, _files_status(get_dataset(name), root)[0], get_dataset(name).description]
            for name in dataset_names()]
    print(fit_table(rows, ["dataset", "files", "description"]))
    print()
    print(_backbone_table())
    print(textwrap.fill("In full (papers, descriptions, where files are, hparams): bench list --long; one dataset: "
                        "bench data info NAME; sweep presets of the papers' protocols: bench list --presets.",
                        TERMINAL_WIDTH))
    return 0


def _count_rows(dataset: Any) -> tuple[list[list[Any]], list[str]]:
    splits = list(dataset.splits)
    counts = {split: dataset.group_counts(split) for split in splits}
    rows = [[g, name] + [counts[s][g] for s in splits] for g, name in enumerate(dataset.group_names)]
    rows.append(["", "total"] + [sum(counts[s]) for s in splits])
    return rows, ["group", "name"] + splits


def cmd_data_info(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench.cli import _dataset_options
    from datasets import get_dataset, load_dataset, resolve_data_root

    source = get_dataset(args.name)
    options = _dataset_options(args)
    root = resolve_data_root(args.data_root)
    status, where = _files_status(source, root)
    protocol = ", ".join(f"{k} {v}" for k, v in source.training_defaults.items())
    print(block(args.name, [("what", source.description), ("files", f"{status}: {where}"),
                            ("get it", source.obtain_hint), ("download", _download_hint(args.name)),
                            ("training protocol", protocol), ("protocol from", source.defaults_origin)]))
    print()
    if source.needs_data_root and status != "found":
        published_of = getattr(source, "published_counts", None)
        published = published_of(options) if published_of else None
        if published:
            print(f"Published group counts (the files are {status}; with them, the counts found are shown):")
            n_groups = len(next(iter(published.values())))
            print(tabulate([[g, *(published[key][g] for key in published)] for g in range(n_groups)],
                           headers=["group", *published], tablefmt="github"))
        else:
            print(f"Group counts: the files are {status}; pass --data-root DIR to count them.")
        return 0
    dataset = load_dataset(args.name, args.data_root, options)
    print(textwrap.fill(f"{dataset.name}: classes {dataset.class_names}; attributes "
                        + ", ".join(f"{a} {v}" for a, v in zip(dataset.attr_names, dataset.attr_value_names))
                        + f"; images {'x'.join(map(str, dataset.image_shape))}; average kind: "
                        f"{dataset.average_kind}", TERMINAL_WIDTH))
    rows, headers = _count_rows(dataset)
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0
