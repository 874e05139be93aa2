"""How much of each spurious attribute the twins' *core* region (outside the spurious mask) still shows.

rrr, the oracle of docs/ule.md, may only silence the input gradient on the spurious mask. If the
spurious attribute can be read from the pixels the mask leaves open (the object's own pixels: blended
edges, an object colour chosen to contrast with the background), no penalty on the mask can remove the
shortcut. This fits a logistic regression from simple statistics of the open pixels only (the mean and
standard deviation of each channel over the core region) to each attribute, on the training split, and
reports its accuracy on the test split's images, beside the majority-class rate. The label is fitted too,
as a reference: the core region must show it.

    python scripts/mask_leak.py urbancars-synth waterbirds-synth
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.core.dataset import Split  # noqa: E402
from datasets import load_dataset  # noqa: E402


def core_statistics(split: Split, erode: int) -> tuple[np.ndarray, float, float]:
    """Per image: each channel's mean and standard deviation over the core region (the pixels outside the
    spurious mask, less ``erode`` outer rings); the core's share of all pixels; the share of images whose
    core keeps more than one pixel."""
    pixels = split.images.pixels.float() / 255.0  # [N, C, H, W]
    core = (1 - split.spurious_mask.float())[:, None]  # 1 where the object is
    for _ in range(erode):  # drop the object's outer ring of pixels, where it blends with the background
        core = -torch.nn.functional.max_pool2d(-core, 3, stride=1, padding=1)
    count = core.sum(dim=(2, 3)).clamp_min(1.0)
    mean = (pixels * core).sum(dim=(2, 3)) / count
    variance = ((pixels - mean[..., None, None]) ** 2 * core).sum(dim=(2, 3)) / count
    statistics = torch.cat([mean, variance.sqrt()], dim=1).numpy()
    return statistics, float(core.mean()), float((count[:, 0] > 1).float().mean())


def fitted_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    centre, scale = train_x.mean(0), train_x.std(0) + 1e-6
    a = torch.tensor((train_x - centre) / scale, dtype=torch.float32)
    b = torch.tensor((test_x - centre) / scale, dtype=torch.float32)
    classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(0)
    model = torch.nn.Linear(a.shape[1], classes)
    optimiser = torch.optim.LBFGS(model.parameters(), max_iter=500)
    target = torch.tensor(train_y, dtype=torch.long)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(a), target) + 1e-4 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return float((model(b).argmax(1).numpy() == test_y).mean())


def main() -> int:
    for name in sys.argv[1:]:
        dataset = load_dataset(name)
        train, test = dataset.splits["train"], dataset.splits["test"]
        targets = [("label", train.y.numpy(), test.y.numpy())]
        targets += [(f"attribute {attribute}", train.attrs[:, i].numpy(), test.attrs[:, i].numpy())
                    for i, attribute in enumerate(dataset.attr_names)]
        for erode in (0, 1):
            (x_train, _, _), (x_test, share, nonempty) = core_statistics(train, erode), core_statistics(test, erode)
            print(f"{name}, the core region" + (f" without its outer {erode} pixel ring" if erode else "")
                  + f" ({share:.1%} of the test pixels; more than one pixel in {nonempty:.0%} of the test images):")
            for what, y_train, y_test in targets:
                majority = np.bincount(y_test).max() / len(y_test)
                accuracy = fitted_accuracy(x_train, y_train, x_test, y_test)
                print(f"  {what:<24} from the core region's pixels: {accuracy:.1%} (majority class {majority:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
