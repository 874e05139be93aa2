"""Which image files a dataset reads, and how: 16-bit images scaled, paths confined to the dataset folder,
a file in two splits warned about, an undecodable file a one-line error (in worker processes too)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_custom_dataset
from PIL import Image

from bench.core.backbones import SYMMETRIC_NORMALISATION
from bench.core.dataset import FileImages, rgb_image
from bench.core.device_data import DeviceData
from bench.core.errors import DataError
from datasets import get_dataset
from datasets._files import FOLLOW_SYMLINKS_ENV, ImagePipeline

SIXTEEN_BIT = np.array([[300, 30000, 65535, 0]], dtype=np.uint16)
EIGHT_BIT = [1, 117, 255, 0]  # the high byte of each value


def _file_images(path: Path) -> FileImages:
    from torchvision import transforms

    return FileImages([path], transforms.ToTensor(), transforms.ToTensor(), (3, 1, 4))


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(SIXTEEN_BIT).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    pixels = (_file_images(path).load(0, train=False) * 255).round().to(torch.uint8)
    assert pixels.shape == (3, 1, 4)
    assert pixels[0].flatten().tolist() == EIGHT_BIT and (pixels[0] == pixels[1]).all()
    # the image cache's frames go through the same conversion
    with Image.open(path) as image:
        frame = ImagePipeline(frame=(1, 4), crop=(1, 4)).frame_array(image)
    assert frame[0].flatten().tolist() == EIGHT_BIT


def test_32_bit_images_are_taken_as_16_bit_when_they_fit_and_refused_otherwise(tmp_path):
    assert np.asarray(rgb_image(Image.fromarray(SIXTEEN_BIT.astype(np.int32))))[..., 0].flatten().tolist() == EIGHT_BIT
    with pytest.raises(ValueError, match="32-bit integer"):
        rgb_image(Image.fromarray(np.array([[70000]], dtype=np.int32)))
    path = tmp_path / "float.tiff"
    Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)).save(path)
    with pytest.raises(DataError, match="floating-point image"):
        _file_images(path).load(0, train=False)


def test_a_decompression_bomb_is_a_one_line_data_error(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(path)  # 196 M pixels: past Pillow's limit
    with pytest.raises(DataError) as info:
        _file_images(path).load(0, train=False)
    assert "bomb.png: cannot read image" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture()
def data(tmp_path):
    return write_custom_dataset(tmp_path / "data", n_per_group=2)


def _point_row_at(root: Path, filename: str) -> None:
    """Make the first data row (row 2) of metadata.csv name ``filename``."""
    path = root / "metadata.csv"
    header, first, *rest = path.read_text().splitlines()
    path.write_text("\n".join([header, filename + first[first.index(","):], *rest]) + "\n")


def _load_error(root: Path) -> str:
    with pytest.raises(DataError) as info:
        get_dataset("custom").load(root, {"image_size": 16})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_image_paths_outside_the_dataset_folder_are_refused(data, tmp_path, monkeypatch):
    outside = tmp_path / "outside.png"
    shutil.copyfile(data / "img" / "train_0_red_0.png", outside)
    for filename, reason in (("../outside.png", "climbs out"), (str(outside), "absolute path"),
                             ("img/../../outside.png", "climbs out")):
        _point_row_at(data, filename)
        message = _load_error(data)
        assert "metadata.csv, row 2" in message and reason in message, message

    (data / "img" / "link.png").symlink_to(outside)  # a link out of the folder
    _point_row_at(data, "img/link.png")
    message = _load_error(data)
    assert "row 2" in message and "symbolic link" in message and FOLLOW_SYMLINKS_ENV in message
    monkeypatch.setenv(FOLLOW_SYMLINKS_ENV, "1")  # links the user trusts
    get_dataset("custom").load(data, {"image_size": 16})
    monkeypatch.delenv(FOLLOW_SYMLINKS_ENV)

    (data / "elsewhere").symlink_to(tmp_path, target_is_directory=True)  # a folder link out of it
    _point_row_at(data, "elsewhere/outside.png")
    assert "symbolic link" in _load_error(data)

    (data / "img" / "inside.png").symlink_to(data / "img" / "train_0_red_0.png")  # links within are fine
    _point_row_at(data, "img/inside.png")
    get_dataset("custom").load(data, {"image_size": 16})


def test_the_real_layouts_refuse_paths_outside_their_folder_too(tmp_path):
    from test_real_datasets import write_waterbirds

    folder = write_waterbirds(tmp_path / "wb")
    shutil.copyfile(next(folder.glob("*/*.jpg")), tmp_path / "wb" / "x.jpg")
    metadata = folder / "metadata.csv"
    header, first, *rest = metadata.read_text().splitlines()
    fields = first.split(",")
    fields[1] = "../x.jpg"
    metadata.write_text("\n".join([header, ",".join(fields), *rest]) + "\n")
    with pytest.raises(DataError, match=r"metadata.csv, row 2: image file \.\./x\.jpg climbs out"):
        get_dataset("waterbirds").load(tmp_path / "wb", {"image_size": 16})


def test_a_file_in_two_splits_is_warned_about(data, capsys):
    get_dataset("custom").load(data, {"image_size": 16})
    assert "warning" not in capsys.readouterr().err
    path = data / "metadata.csv"
    path.write_text(path.read_text().replace("img/test_0_red_0.png,0,test", "img/train_0_red_0.png,0,test"))
    get_dataset("custom").load(data, {"image_size": 16})
    err = capsys.readouterr().err
    assert "warning: 1 image file(s) are in more than one split" in err and "train_0_red_0.png in train and test" in err


def test_an_unreadable_image_in_a_worker_process_is_the_same_one_line_error(data):
    (data / "img" / "train_1_blue_1.png").write_text("not an image, named .png")
    dataset = get_dataset("custom").load(data, {"image_size": 16})
    device_data = DeviceData(dataset, torch.device("cpu"), train_groups_allowed=False, workers=1,
                             normalisation=SYMMETRIC_NORMALISATION)
    with pytest.raises(DataError) as info:
        list(device_data.iter_images("train", torch.arange(device_data.n("train")), 4, train=True))
    message = str(info.value)
    assert message.startswith(f"{data / 'img' / 'train_1_blue_1.png'}: cannot read image") and "\n" not in message
