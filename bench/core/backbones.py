"""Backbones: a small CNN for the synthetic twins, torchvision ResNet-18/50 for real datasets.

Every backbone is a :class:`Classifier`: ``featurizer`` maps images to a feature vector (the
penultimate layer, which DFR refits on) and ``classifier`` is the final linear layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.core.errors import ConfigError


class Classifier(nn.Module):
    """``featurizer`` (images -> features) followed by a linear ``classifier``."""

    def __init__(self, featurizer: nn.Module, n_features: int, n_classes: int) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.n_features = n_features
        self.classifier = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (32/64/128 channels by default), two max-pools, global average pool.

    No batch normalisation on purpose: each example's input gradient then depends on that example
    alone, which input-gradient methods (ULE) rely on, and a small CNN trains well without it.
    """

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_features = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _small_cnn(n_classes: int, in_channels: int, pretrained: bool, weights: Path | None) -> Classifier:
    if pretrained:
        raise ConfigError("backbone 'small-cnn' has no pretrained weights; use --hparams pretrained=false")
    featurizer = SmallCNN(in_channels)
    model = Classifier(featurizer, featurizer.out_features, n_classes)
    if weights is not None:
        _load_local_weights(model, weights, strict=True)
    return model


def _resnet(depth: int) -> Callable[[int, int, bool, Path | None], Classifier]:
    def build(n_classes: int, in_channels: int, pretrained: bool, weights: Path | None) -> Classifier:
        import torchvision

        constructor = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
        enum = {18: torchvision.models.ResNet18_Weights, 50: torchvision.models.ResNet50_Weights}[depth]
        net = constructor(weights=None)
        if weights is not None:
            _load_local_weights(net, weights, strict=False)
        elif pretrained:
            net.load_state_dict(_download_imagenet_weights(enum.IMAGENET1K_V1, f"resnet{depth}"))
        if in_channels != 3:
            raise ConfigError(f"resnet{depth} expects 3-channel images, the dataset has {in_channels}")
        n_features = net.fc.in_features
        net.fc = nn.Identity()
        return Classifier(net, n_features, n_classes)

    return build


def _download_imagenet_weights(weights_enum: object, name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from its cache, downloading them if needed; a clear error offline."""
    url = weights_enum.url  # type: ignore[attr-defined]
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)
    except Exception as error:  # urllib raises many kinds; any of them means "not available here"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        raise ConfigError(
            f"cannot get ImageNet weights for {name} ({type(error).__name__}): download {url} to {cache} "
            f"on a machine with internet access, or pass --weights PATH, or --hparams pretrained=false"
        ) from error


def _load_local_weights(model: nn.Module, path: Path, strict: bool) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"--weights {path}: not a PyTorch state dict ({error})") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # Drop a classification head of another size (e.g. ImageNet's 1000 classes).
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state and not k.startswith(("fc.", "classifier."))]
    if strict and missing or len(state) == 0:
        raise ConfigError(f"--weights {path}: does not match the backbone (missing {missing[:3]}...)")
    model.load_state_dict(state, strict=False)


# Input resolution each backbone is used at when a dataset resizes its images on load.
INPUT_SIZE = {"small-cnn": 32, "resnet18": 224, "resnet50": 224}

BACKBONES: dict[str, Callable[[int, int, bool, Path | None], Classifier]] = {
    "small-cnn": _small_cnn,
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
}


def build_backbone(
    name: str, n_classes: int, in_channels: int = 3, pretrained: bool = False, weights: Path | None = None
) -> Classifier:
    """Build a fresh classifier; the caller seeds torch beforehand for a reproducible init."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name](n_classes, in_channels, pretrained, weights)


def memory_format(device: torch.device) -> torch.memory_format:
    """The memory format of the backbones' weights and input batches on ``device``.

    Every backbone here is convolutional. On CUDA, channels-last (NHWC) lets cuDNN use its tensor-core
    convolution kernels without transposing every activation (the larger gain under bf16/fp16); on
    the CPU the default (NCHW) layout is kept, so CPU runs compute exactly what they always did.
    """
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# torch.compile's backend. Tests set "aot_eager": the same graph capture and compiled autograd, without
# generating kernels (which takes about a minute on a CPU).
COMPILE_BACKEND = "inductor"


def compile_model(model: nn.Module) -> None:
    """Compile ``model``'s forward pass in place (``nn.Module.compile``: its ``state_dict`` keys stay those
    of the plain module, so checkpoints of compiled and plain runs load into each other).

    Methods take several backward passes over one forward graph (``retain_graph``: ULE's student, fp16's
    input gradients), which AOTAutograd's donated buffers forbid; they are a memory optimisation only,
    so they are turned off.
    """
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    model.compile(backend=COMPILE_BACKEND)
