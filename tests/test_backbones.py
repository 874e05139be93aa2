"""Backbones: the registry (built-ins and timm/<model>), each backbone's input size and normalisation
and their use by the runner, the packaged ImageNet weights of efficientnet-lite0 (checked against
ImageNet's labels of bundled photos), and the offline errors of weights that would need a download
(tested against a local HTTP server or an unreachable proxy: nothing is ever downloaded)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_custom_dataset

from bench import runner
from bench.core import weights as weight_files
from bench.core.backbones import (
    IMAGENET_NORMALISATION,
    SYMMETRIC_NORMALISATION,
    backbone_names,
    build_backbone,
    efficientnet_lite0_imagenet,
    get_backbone,
)
from bench.core.dataset import InMemoryImages, SpuriousDataset, make_split
from bench.core.device_data import DeviceData
from bench.core.errors import ConfigError
from bench.core.precision import Precision
from methods import get_method
from methods.base import resolve_hparams


def error_of(function, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as caught:
        function(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# The registry


def test_built_in_backbones_report_their_input() -> None:
    assert backbone_names() == ["small-cnn", "resnet18", "resnet50", "efficientnet-lite0"]
    assert get_backbone("small-cnn").input.normalisation == SYMMETRIC_NORMALISATION
    assert get_backbone("small-cnn").input.size == 32
    for name in ("resnet18", "resnet50"):
        assert get_backbone(name).input.normalisation == IMAGENET_NORMALISATION
        assert get_backbone(name).input.size == 224
    lite0 = get_backbone("efficientnet-lite0").input
    import timm

    cfg = timm.get_pretrained_cfg(weight_files.LITE0_ARCHITECTURE)
    assert (lite0.size, lite0.normalisation.mean, lite0.normalisation.std, lite0.interpolation) == (
        cfg.input_size[-1], cfg.mean, cfg.std, cfg.interpolation)


def test_timm_models_take_their_input_from_pretrained_cfg_and_build_without_weights() -> None:
    vit = get_backbone("timm/vit_small_patch16_224")
    assert vit.input.fixed_size and vit.input.size == 224
    assert vit.input.normalisation.mean == (0.5, 0.5, 0.5)
    convnext = get_backbone("timm/convnext_tiny")
    assert convnext.input.normalisation == IMAGENET_NORMALISATION and not convnext.input.fixed_size
    torch.manual_seed(0)
    model = build_backbone("timm/resnet18", n_classes=3, pretrained=False)
    assert model.loaded_weights is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.featurizer(torch.randn(2, 3, 32, 32)).shape == (2, model.n_features) == (2, 512)
    # The features are what the model outputs without its classifier, also where timm's num_features
    # (the last stage's width) is not that (a head convolution before the classifier).
    mobilenet = build_backbone("timm/mobilenetv3_small_050", n_classes=2)
    assert mobilenet.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 2) and mobilenet.n_features == 1024
    # A fixed-size backbone refuses images of another size before anything trains.
    assert "takes 224x224 images only" in error_of(vit.check_image_size, (3, 28, 28))
    vit.check_image_size((3, 224, 224))


def test_unknown_backbones_say_how_to_name_one() -> None:
    message = error_of(get_backbone, "resnet34")
    assert "unknown backbone 'resnet34'" in message and "timm/<model>" in message and "efficientnet-lite0" in message
    message = error_of(get_backbone, "timm/resnet_nope")
    assert "has no model 'resnet_nope'" in message and "timm.list_models()" in message
    # The backbone hparam is checked against the registry, timm models included.
    erm = get_method("erm")
    assert resolve_hparams(erm, "x", {}, {"backbone": "timm/resnet18"})["backbone"] == "timm/resnet18"
    assert resolve_hparams(erm, "x", {}, {"backbone": "efficientnet-lite0"})["backbone"] == "efficientnet-lite0"
    message = error_of(resolve_hparams, erm, "x", {}, {"backbone": "timm/nope"})
    assert message.startswith("hparam backbone='timm/nope': unknown backbone")


def test_local_weights_files_load_into_any_backbone_and_are_recorded(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_backbone("small-cnn", 3)
    torch.save(source.state_dict(), tmp_path / "small.pt")
    model = build_backbone("small-cnn", 3, weights=tmp_path / "small.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert model.loaded_weights.origin == "--weights"
    assert model.loaded_weights.sha256 == hashlib.sha256((tmp_path / "small.pt").read_bytes()).hexdigest()
    import timm

    net = timm.create_model("resnet18", pretrained=False, num_classes=1000)  # with ImageNet's head: dropped
    save_file(net.state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = build_backbone("timm/resnet18", 2, weights=tmp_path / "resnet18.safetensors")
    assert torch.equal(model.featurizer.conv1.weight, net.conv1.weight)
    (tmp_path / "broken.pt").write_bytes(b"not a state dict")
    assert "not a readable state dict" in error_of(build_backbone, "resnet18", 2, weights=tmp_path / "broken.pt")


# --------------------------------------------------------------------------------------------
# Normalisation: the backbone's, applied by DeviceData as the runner hands it over


def _one_image_dataset(value: int) -> SpuriousDataset:
    pixels = torch.full((2, 3, 4, 4), value, dtype=torch.uint8)
    splits = {name: make_split(name, torch.tensor([0, 1]), torch.tensor([0, 1]), InMemoryImages(pixels), [2])
              for name in ("train", "val", "test")}
    return SpuriousDataset("toy", ["a", "b"], ["c"], [["u", "v"]], splits, "plain")


def test_device_data_normalises_with_the_normalisation_it_is_given() -> None:
    dataset = _one_image_dataset(51)  # 51 / 255 = 0.2
    for normalisation in (SYMMETRIC_NORMALISATION, IMAGENET_NORMALISATION):
        data = DeviceData(dataset, torch.device("cpu"), False, normalisation=normalisation)
        images = data.images("val", torch.tensor([0]), train=False)
        expected = [(0.2 - m) / s for m, s in zip(normalisation.mean, normalisation.std)]
        torch.testing.assert_close(images[0, :, 0, 0], torch.tensor(expected))


@pytest.mark.parametrize("backbone,expected", [("small-cnn", SYMMETRIC_NORMALISATION),
                                               # a small network with ImageNet's normalisation
                                               ("timm/mobilenetv3_small_050", IMAGENET_NORMALISATION)])
def test_the_runner_normalises_with_the_backbones_normalisation(tmp_path, monkeypatch, backbone, expected) -> None:
    seen = []

    class Spy(DeviceData):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(kwargs["normalisation"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runner, "DeviceData", Spy)
    data = write_custom_dataset(tmp_path / "data", n_per_group=2, size=8)
    request = runner.RunRequest(method="erm", dataset="custom", data_root=str(data), backbone=backbone, epochs=1,
                                hparam_overrides=["pretrained=false", "batch_size=4"], out=str(tmp_path / "out"))
    prepared = runner.prepare(request)
    assert runner.execute(prepared, 0, quiet=True)["status"] == "done"
    assert seen == [expected]
    config = prepared.run_dir(0).read_config()
    assert config["backbone_input"]["mean"] == list(expected.mean) and config["backbone_weights"] is None


# --------------------------------------------------------------------------------------------
# efficientnet-lite0: packaged ImageNet weights


@pytest.fixture(scope="module")
def lite0_imagenet():  # type: ignore[no-untyped-def]
    net, loaded = efficientnet_lite0_imagenet()
    return net.eval(), loaded


def test_efficientnet_lite0_classifies_bundled_photos_as_imagenet_does(lite0_imagenet) -> None:
    """The external truth: ImageNet's labels of two photos that ship with scikit-image."""
    import skimage.data
    import timm
    from PIL import Image

    net, _ = lite0_imagenet
    # The preprocessing of the weights' pretrained_cfg: bicubic resize to 256 (crop_pct 0.875), centre
    # crop 224, mean = std = 0.5.
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))
    top1 = {}
    for name in ("chelsea", "coffee"):
        x = transform(Image.fromarray(getattr(skimage.data, name)()))[None]
        with torch.no_grad():
            top1[name] = int(net(x).argmax())
    assert 281 <= top1["chelsea"] <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1["coffee"] == 967  # espresso


def test_efficientnet_lite0_records_the_weights_file_and_its_checksum(lite0_imagenet) -> None:
    _, loaded = lite0_imagenet
    path = Path(loaded.file)
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.sha256.startswith("57934424")  # the hash prefix torch hub puts in a file's name
    model = build_backbone("efficientnet-lite0", n_classes=2, pretrained=True)
    assert model.loaded_weights == loaded and model.n_features == 1280
    state = model.featurizer.state_dict()
    reference = lite0_imagenet[0].state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in state)  # every tensor but the 1000-class head


def test_a_mismatch_of_the_packaged_weights_is_an_error_and_loads_nothing(monkeypatch, lite0_imagenet) -> None:
    import timm

    original = weight_files.read_state_dict(weight_files.efficientnet_lite0_file(), "weights")
    names = list(original)
    wrong_shape = dict(original)
    wrong_shape[names[1]] = torch.zeros(33)
    missing = {k: v for k, v in original.items() if k != names[-1]}
    # Same shapes, but the first batch norm's running_var stored before its running_mean.
    swapped = {k: original[k] for k in [*names[:3], names[4], names[3], *names[5:]]}
    for broken, expected in ((wrong_shape, "does not fit"), (missing, "295 tensors, the model has 296"),
                             (swapped, "does not fit")):
        monkeypatch.setattr(weight_files, "read_state_dict", lambda path, what, broken=broken: broken)
        net = timm.create_model(weight_files.LITE0_ARCHITECTURE, pretrained=False)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        assert expected in error_of(weight_files.load_efficientnet_lite0, net)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_efficientnet_lite0_without_its_package_names_the_extra(monkeypatch) -> None:
    real_find_spec = weight_files.importlib.util.find_spec
    monkeypatch.setattr(weight_files.importlib.util, "find_spec",
                        lambda name: None if name == weight_files.LITE0_MODULE else real_find_spec(name))
    message = error_of(build_backbone, "efficientnet-lite0", 2, pretrained=True)
    assert "debias-bench[offline-weights]" in message and "--weights PATH" in message
    assert build_backbone("efficientnet-lite0", 2, pretrained=False).loaded_weights is None


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """One torch thread: on the shared two-core test machine, two OpenMP threads wait on each other
    for most of a small network's step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_ule_step_through_efficientnet_lite0(one_thread) -> None:
    """ULE's penalty differentiates the input gradient again: through lite0's batch norm, ReLU6 and
    TF-style padded convolutions. The penalty must reach the teacher's weights, the stem included."""
    from methods.base import Batch, MethodContext
    from methods.ule import ULE

    def teacher_gradients(penalty_weight: float) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        hparams = resolve_hparams(ULE, "test", {"optimizer": "sgd", "lr": 0.01, "batch_size": 4},
                                  {"warmup_epochs": "0", "penalty_weight": str(penalty_weight)})
        torch.manual_seed(0)
        context = MethodContext(hparams=hparams, dataset_info={"n_classes": 2, "n_groups": 4},
                                device=torch.device("cpu"), seed=0,
                                make_model=lambda: build_backbone("efficientnet-lite0", 2, pretrained=True))
        method = ULE(context)
        generator = torch.Generator().manual_seed(1)
        batch = Batch(x=torch.randn(4, 3, 32, 32, generator=generator), y=torch.tensor([0, 1, 0, 1]),
                      index=torch.arange(4))
        log = method.update(batch)
        return log, {n: p.grad.clone() for n, p in method.teacher.named_parameters() if p.grad is not None}

    log, with_penalty = teacher_gradients(1.0)
    assert log["penalty"] > 0 and all(np.isfinite(v) for v in log.values())
    _, without = teacher_gradients(0.0)
    stem = "featurizer.conv_stem.weight"
    assert not torch.allclose(with_penalty[stem], without[stem])
    assert not torch.allclose(with_penalty["featurizer.bn1.weight"], without["featurizer.bn1.weight"])


# --------------------------------------------------------------------------------------------
# Channels-last (what CUDA runs use, bench.core.backbones.memory_format) and bf16 autocast, on the CPU


def test_efficientnet_lite0_in_bf16_and_channels_last_classifies_the_photos_as_in_fp32(lite0_imagenet) -> None:
    import copy

    import skimage.data
    import timm
    from PIL import Image

    net = lite0_imagenet[0]
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))
    x = torch.cat([transform(Image.fromarray(getattr(skimage.data, name)()))[None]
                   for name in ("chelsea", "coffee", "astronaut", "rocket")])
    channels_last = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = net(x).softmax(dim=1)
        same_math = Precision("fp32").forward(channels_last, x_last).softmax(dim=1)
        bf16 = Precision("bf16").forward(channels_last, x_last)
    torch.testing.assert_close(same_math, reference, atol=1e-5, rtol=0)
    assert bf16.dtype == torch.float32  # autocast's outputs come back as float32
    assert torch.equal(bf16.argmax(dim=1), reference.argmax(dim=1))
    assert float((bf16.softmax(dim=1) - reference).abs().max()) < 0.05  # 0.019 measured


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "timm/mobilenetv3_small_050"])
def test_a_bf16_step_on_channels_last_weights_trains_every_parameter(one_thread, backbone) -> None:
    from methods.base import erm_step

    torch.manual_seed(0)
    model = build_backbone(backbone, 2).to(memory_format=torch.channels_last)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    logits, loss = erm_step(model, optimizer, x.contiguous(memory_format=torch.channels_last),
                            torch.tensor([0, 1, 0, 1]), Precision("bf16"))
    assert logits.dtype == torch.float32 and np.isfinite(loss)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name
        if p.dim() == 4:  # the optimiser step kept the convolutions' layout
            assert p.is_contiguous(memory_format=torch.channels_last), name


# --------------------------------------------------------------------------------------------
# Weights that would need a network: the caches, and the one-line error offline


class _NotFound(http.server.BaseHTTPRequestHandler):
    """A local 'hub' that has nothing: every request is answered 404 (and counted)."""

    requests: list[str] = []

    def _answer(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.end_headers()

    do_GET = do_HEAD = do_CONNECT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_server():  # type: ignore[no-untyped-def]
    _NotFound.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _NotFound.requests
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("backbone", ["timm/resnet18", "resnet18"])
def test_pretrained_weights_offline_give_the_one_line_error(tmp_path, local_server, monkeypatch, capsys,
                                                             backbone) -> None:
    """The Hugging Face hub is the local server (404 everywhere) and https goes through it as a proxy
    (it refuses to tunnel): nothing can be downloaded, and the run stops at once with one line."""
    import huggingface_hub.constants

    from bench.cli import main

    address, requests = local_server
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", address)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name, value in {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": address, "HTTPS_PROXY": address,
                        "no_proxy": "", "NO_PROXY": ""}.items():
        monkeypatch.setenv(name, value)
    data = write_custom_dataset(tmp_path / "data", n_per_group=2, size=8)
    status = main(["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data), "--backbone", backbone,
                   "--hparams", "pretrained=true", "--out", str(tmp_path / "out"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    message = lines[0]
    assert f"cannot get the pretrained weights of {backbone}" in message and "--weights PATH" in message
    if backbone.startswith("timm/"):
        assert "Hugging Face hub id timm/resnet18.a1_in1k" in message
        assert str(tmp_path / "hf" / "models--timm--resnet18.a1_in1k") in message and "HTTP 404" in message
        # One HEAD per candidate file, no retry loop.
        assert requests == ["HEAD /timm/resnet18.a1_in1k/resolve/main/model.safetensors",
                            "HEAD /timm/resnet18.a1_in1k/resolve/main/pytorch_model.bin"]
    else:
        assert "resnet18-f37072fd.pth" in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
        assert requests == ["CONNECT download.pytorch.org:443"]
    assert not (tmp_path / "out").exists()


def test_timm_weights_in_the_hub_cache_are_used_without_a_network(tmp_path, monkeypatch) -> None:
    """A file in the Hugging Face cache layout (what a download leaves there) is loaded and recorded."""
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    planted = timm.create_model("resnet18", pretrained=False).state_dict()
    snapshot = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(planted, str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(weight_files, "unreachable_reason", lambda url: pytest.fail(f"network asked for {url}"))
    model = build_backbone("timm/resnet18", n_classes=2, pretrained=True)
    assert torch.equal(model.featurizer.conv1.weight, planted["conv1.weight"])
    assert model.loaded_weights.file == str((snapshot / "model.safetensors").resolve())
    assert model.loaded_weights.sha256 == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
