"""Small generated datasets for tests: nothing is downloaded, everything is made on the fly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def write_custom_dataset(root: Path, n_per_group: int = 6, size: int = 16, seed: int = 0) -> Path:
    """A tiny ``custom`` dataset: class = bright/dark centre square, attribute ``colour`` = red/blue tint.

    Every (y, colour) group has ``n_per_group`` images in each split.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["filename,y,split,colour"]
    for split in ("train", "val", "test"):
        for y in (0, 1):
            for colour in ("red", "blue"):
                for k in range(n_per_group):
                    image = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
                    image[..., 0 if colour == "red" else 2] += 120
                    lo, hi = size // 4, 3 * size // 4
                    image[lo:hi, lo:hi, :] = 230 if y == 1 else 20
                    name = f"img/{split}_{y}_{colour}_{k}.png"
                    (root / "img").mkdir(exist_ok=True)
                    Image.fromarray(image).save(root / name)
                    lines.append(f"{name},{y},{split},{colour}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


class Interrupt(Exception):
    """Raised by :func:`run_seed0` to stop a run after an epoch, as a kill would."""


def run_seed0(request: Any, monkeypatch: pytest.MonkeyPatch, interrupt_after: int | None) -> tuple[Path, int]:
    """Run seed 0 of a ``bench.runner.RunRequest`` through the runner, stopping after
    ``interrupt_after`` epochs of this call when given; returns the run folder and the epochs trained
    in this call (a resumed run trains only the epochs it had not finished)."""
    from bench import runner, trainer

    epochs_seen: list[int] = []

    def train_with_interrupt(*args: object, **kwargs: object) -> dict:
        def on_epoch_end() -> None:
            epochs_seen.append(1)
            if interrupt_after is not None and len(epochs_seen) == interrupt_after:
                raise Interrupt

        return trainer.train(*args, on_epoch_end=on_epoch_end, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "train", train_with_interrupt)
    prepared = runner.prepare(request)
    try:
        runner.execute(prepared, seed=0, quiet=True)
    except Interrupt:
        pass
    return prepared.run_dir(0).path, len(epochs_seen)
