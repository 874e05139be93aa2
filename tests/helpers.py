"""Small generated datasets for tests: nothing is downloaded, everything is made on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
