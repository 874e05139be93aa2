"""Bad input fed to ``bench run`` as a hostile user would: malformed datasets, arguments and run folders.

Every case must end the same way: exit status 2, one line on stderr starting with ``error:``, no
traceback, and no final.json written anywhere (a final.json that a case planted stays as it was).
Cases whose fault is met only while training (an unreadable image) also mark the run failed
(tests/test_run_integrity.py checks the failed.json and `bench status` of those).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_custom_dataset
from PIL import Image

from bench import run_lock
from bench.cli import main
from bench.core import records

HPARAMS = ("pretrained=false", "batch_size=8", "optimizer=adam")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A clean dataset, a finished 2-epoch run of it, and a decompression bomb, made once."""
    folder = tmp_path_factory.mktemp("bad-input")
    data = write_custom_dataset(folder / "data", n_per_group=2)
    done = folder / "done"
    assert main(Context.run_args(data, done)) == 0
    bomb = folder / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 196 M pixels, past Pillow's decompression-bomb limit
    return data, done, bomb


@dataclass
class Context:
    tmp: Path
    data: Path
    done: Path
    bomb: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @staticmethod
    def run_args(root: Path, out: Path, *extra: str, hparams: tuple[str, ...] = HPARAMS) -> list[str]:
        return ["run", "--method", "erm", "--dataset", "custom", "--data-root", str(root), "--backbone", "small-cnn",
                "--epochs", "2", "--out", str(out), "--quiet", *extra, "--hparams", *hparams]

    def run(self, root: Path | None = None, *extra: str, hparams: tuple[str, ...] = HPARAMS) -> list[str]:
        return self.run_args(root or self.data, self.tmp / "out", *extra, hparams=hparams)

    def data_copy(self) -> Path:
        return Path(shutil.copytree(self.data, self.tmp / "data"))  # keeps modification times: the same identity

    def edit_metadata(self, root: Path, old: str, new: str) -> None:
        path = root / "metadata.csv"
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new, 1))

    def image_outside(self) -> Path:
        """A good image outside the dataset folder."""
        return Path(shutil.copyfile(self.data / TRAIN_IMAGE, self.tmp / "x.png"))

    def list_instead_of_train_image(self, filename: str, write: Callable[[Path], object] | None = None) -> list[str]:
        """A command on a copy of the dataset whose metadata.csv names ``filename`` in a training row
        (``write(path)`` makes that file in the copy)."""
        root = self.data_copy()
        self.edit_metadata(root, f"{TRAIN_IMAGE},", f"{filename},")
        if write is not None:
            write(root / filename)
        return self.run(root)

    def resumable_run(self) -> Path:
        """The finished run copied to this case's --out without its final.json: a run to resume."""
        shutil.copytree(self.done, self.tmp / "out")
        (run_path,) = (self.tmp / "out").glob("custom/erm/*/seed0")
        (run_path / "final.json").unlink()
        return run_path


CASES: dict[str, Callable[[Context], list[str]]] = {}


def case(function: Callable[[Context], list[str]]) -> Callable[[Context], list[str]]:
    CASES[function.__name__] = function
    return function


# -- malformed datasets -------------------------------------------------------------------------------

TRAIN_IMAGE = "img/train_1_red_1.png"


@case
def metadata_header_only(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    (root / "metadata.csv").write_text("filename,y,split,colour\n")
    return ctx.run(root)


@case
def metadata_binary_garbage(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    (root / "metadata.csv").write_bytes(bytes(range(256)) * 4)
    return ctx.run(root)


@case
def metadata_missing_column(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    path = root / "metadata.csv"
    path.write_text(path.read_text().replace("filename,y,split,colour", "file,y,split,colour"))
    return ctx.run(root)


@case
def label_not_an_integer(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    ctx.edit_metadata(root, f"{TRAIN_IMAGE},1,", f"{TRAIN_IMAGE},1.5,")
    return ctx.run(root)


@case
def image_file_missing(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    (root / TRAIN_IMAGE).unlink()
    return ctx.run(root)


@case
def image_zero_bytes(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    (root / TRAIN_IMAGE).write_bytes(b"")
    return ctx.run(root)


@case
def image_is_text_named_png(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    (root / TRAIN_IMAGE).write_text("this is not a picture\n")
    return ctx.run(root)


@case
def image_truncated_jpeg(ctx: Context) -> list[str]:
    def write(path: Path) -> None:
        pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:600])

    return ctx.list_instead_of_train_image("img/cut.jpg", write)


@case
def image_decompression_bomb(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    shutil.copyfile(ctx.bomb, root / TRAIN_IMAGE)
    return ctx.run(root)


@case
def image_floating_point_tiff(ctx: Context) -> list[str]:
    return ctx.list_instead_of_train_image("img/float.tiff",
                                           lambda path: Image.fromarray(np.ones((16, 16), np.float32)).save(path))


@case
def image_path_climbs_out(ctx: Context) -> list[str]:
    ctx.image_outside()
    return ctx.list_instead_of_train_image("../x.png")


@case
def image_path_climbs_far_out(ctx: Context) -> list[str]:
    return ctx.list_instead_of_train_image("../../x.png")


@case
def image_path_absolute(ctx: Context) -> list[str]:
    return ctx.list_instead_of_train_image(str(ctx.image_outside()))


@case
def image_symlink_outside(ctx: Context) -> list[str]:
    root = ctx.data_copy()
    (root / TRAIN_IMAGE).unlink()
    (root / TRAIN_IMAGE).symlink_to(ctx.image_outside())
    return ctx.run(root)


@case
def data_root_is_a_file(ctx: Context) -> list[str]:
    (ctx.tmp / "file").write_text("x")
    return ctx.run(ctx.tmp / "file")


@case
def data_root_missing(ctx: Context) -> list[str]:
    return ctx.run(ctx.tmp / "nowhere")


# -- malformed arguments ------------------------------------------------------------------------------


@case
def out_is_a_file(ctx: Context) -> list[str]:
    (ctx.tmp / "out").write_text("a file")
    return ctx.run()


@case
def out_on_a_read_only_file_system(ctx: Context) -> list[str]:
    out, mkdir = str(ctx.tmp / "out"), os.mkdir

    def read_only_mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).startswith(out):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    ctx.monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    return ctx.run()


@case
def out_on_a_full_file_system(ctx: Context) -> list[str]:
    def full_fsync(fd: int) -> None:  # where a full disk often shows first (delayed allocation, NFS)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx.monkeypatch.setattr(os, "fsync", full_fsync)
    return ctx.run()


@case
def epochs_zero(ctx: Context) -> list[str]:
    args = ctx.run()
    args[args.index("--epochs") + 1] = "0"
    return args


@case
def epochs_negative(ctx: Context) -> list[str]:
    args = ctx.run()
    args[args.index("--epochs") + 1] = "-3"
    return args


@case
def hparam_epochs_zero(ctx: Context) -> list[str]:
    args = ctx.run(hparams=(*HPARAMS, "epochs=0"))
    index = args.index("--epochs")
    return args[:index] + args[index + 2:]


@case
def hparam_given_twice(ctx: Context) -> list[str]:
    return ctx.run(hparams=(*HPARAMS, "lr=0.1", "lr=0.01"))


@case
def hparam_without_value(ctx: Context) -> list[str]:
    return ctx.run(hparams=(*HPARAMS, "lr"))


@case
def hparam_unknown(ctx: Context) -> list[str]:
    return ctx.run(hparams=(*HPARAMS, "learning_rate=0.1"))


# name -> flags added to a good command
BAD_FLAGS: dict[str, tuple[str, ...]] = {
    "data_option_unknown": ("--data-option", "colour=red"),
    "data_option_given_twice": ("--data-option", "image_size=16", "image_size=20"),
    "data_option_without_value": ("--data-option", "average"),
    "data_option_image_size_not_a_number": ("--data-option", "image_size=big"),
    "data_option_n_classes_not_a_number": ("--data-option", "n_classes=two"),
    "attrs_not_a_column": ("--attrs", "shape"),
    "seeds_zero": ("--seeds", "0"),
    "workers_negative": ("--workers", "-1"),
    "device_unknown": ("--device", "tpu9"),
    "weights_missing": ("--weights", "no-such-folder/none.pt"),
}


def _with_flags(flags: tuple[str, ...]) -> Callable[[Context], list[str]]:
    return lambda ctx: ctx.run(None, *flags)


for _name, _flags in BAD_FLAGS.items():
    CASES[_name] = _with_flags(_flags)


@case
def data_option_unknown_for_a_twin(ctx: Context) -> list[str]:
    args = ctx.run(None, "--data-option", "attrs=colour")
    args[args.index("custom")] = "waterbirds-synth"
    return args


# -- damaged run folders, then a rerun ----------------------------------------------------------------


def _keep_first_line(path: Path) -> None:
    path.write_text(path.read_text().splitlines(keepends=True)[0])


def _garble_first_line(path: Path) -> None:
    first, second = path.read_text().splitlines(keepends=True)
    path.write_text(first[:40] + "\n" + second)


def _reverse_group_names(path: Path) -> None:
    config = json.loads(path.read_text())
    config["dataset_info"]["group_names"] = list(reversed(config["dataset_info"]["group_names"]))
    path.write_text(json.dumps(config))


# name -> (file of the resumable run, what is done to it)
DAMAGES: dict[str, tuple[str, Callable[[Path], object]]] = {
    "checkpoint_empty": ("checkpoint.pt", lambda p: p.write_bytes(b"")),
    "checkpoint_not_a_checkpoint": ("checkpoint.pt", lambda p: p.write_text("12345 not a checkpoint\n")),
    "checkpoint_of_something_else": ("checkpoint.pt", lambda p: torch.save({"model": torch.zeros(3)}, p)),
    "final_json_garbage": ("final.json", lambda p: p.write_text("{garbage")),
    "final_json_not_an_object": ("final.json", lambda p: p.write_text("[1, 2]\n")),
    "metrics_deleted_after_the_checkpoint": ("metrics.jsonl", Path.unlink),
    "metrics_truncated_after_the_checkpoint": ("metrics.jsonl", _keep_first_line),
    "metrics_line_garbled": ("metrics.jsonl", _garble_first_line),
    "config_json_garbage": ("config.json", lambda p: p.write_text("{")),
    "config_groups_differ": ("config.json", _reverse_group_names),
}


def _damaged_run(file_name: str, damage: Callable[[Path], object]) -> Callable[[Context], list[str]]:
    def setup(ctx: Context) -> list[str]:
        damage(ctx.resumable_run() / file_name)
        return ctx.run()

    return setup


for _name, (_file_name, _damage) in DAMAGES.items():
    CASES[_name] = _damaged_run(_file_name, _damage)


@case
def run_held_by_a_live_process(ctx: Context) -> list[str]:
    run_path = ctx.resumable_run()
    holder = subprocess.Popen(["sleep", "60"])
    ctx.cleanups.append(lambda: (holder.kill(), holder.wait()))
    now = time.time()
    records.atomic_write_json(run_path / run_lock.RUNNING, {
        "host": socket.gethostname(), "pid": holder.pid, "pid_start": run_lock.process_start(holder.pid),
        "started": now, "heartbeat": now, "token": "the other process"})
    return ctx.run()


def _finals(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("final.json")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_error_line_and_writes_no_result(name, base, tmp_path, monkeypatch, capsys):
    data, done, bomb = base
    ctx = Context(tmp_path, data, done, bomb, monkeypatch)
    try:
        argv = CASES[name](ctx)
        planted = _finals(tmp_path)
        status = main(argv)
        monkeypatch.undo()  # the simulated file system faults end with the command
        err = capsys.readouterr().err
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert _finals(tmp_path) == planted  # no final.json written or changed
