"""The real benchmarks' loaders on miniature copies of their on-disk layouts (generated tiny images).

Waterbirds is also checked against its real metadata.csv (tests/data/waterbirds_metadata.csv.gz,
see its SOURCE.txt) with a placeholder image for each of its 11,788 rows: the loader and `bench data
check waterbirds` must reproduce the published group counts exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main
from bench.core.dataset import FileImages
from bench.core.errors import BenchError, ConfigError
from bench.display import display_path
from datasets import get_dataset, load_dataset, resolve_data_root

DATA = Path(__file__).parent / "data"
REAL_WATERBIRDS_METADATA = DATA / "waterbirds_metadata.csv.gz"
REAL_WATERBIRDS_MD5 = "7a8f1a6063bec1872361c0846b458cae"
WATERBIRDS_PUBLISHED = {"train": [3498, 184, 56, 1057], "val": [467, 466, 133, 133], "test": [2255, 2255, 642, 642]}
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()
URBANCARS_PUBLISHED = {"train": [3610, 190, 190, 10, 10, 190, 190, 3610], "val": [125] * 8, "test": [125] * 8}


# --------------------------------------------------------------------------------------------
# Layout writers


def save_image(path: Path, seed: int, size: tuple[int, int] = (16, 16)) -> None:
    """A small image whose pixels depend on ``seed`` (JPEG or PNG by the suffix). size: (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_waterbirds(root: Path, counts: dict[str, list[int]] | None = None, folder: str =
                     "waterbird_complete95_forest2water2", size: tuple[int, int] = (16, 16)) -> Path:
    """group_DRO's layout: ``folder/metadata.csv`` and CUB-style class folders; ``counts[split][g]`` rows per group."""
    counts = counts or {"train": [4, 2, 2, 4], "val": [2, 2, 2, 2], "test": [2, 2, 2, 2]}
    dataset = root / folder
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    img_id = 0
    for code, split in enumerate(("train", "val", "test")):
        for group, n in enumerate(counts[split]):
            y, place = divmod(group, 2)
            for _ in range(n):
                img_id += 1
                relpath = f"{(img_id % 5) + 1:03d}.Class_{img_id % 5}/Bird_{img_id:05d}.jpg"
                save_image(dataset / relpath, img_id, size)
                lines.append(f"{img_id},{relpath},{y},{code},{place},/x/{img_id}.jpg")
    (dataset / "metadata.csv").write_text("\n".join(lines) + "\n")
    return dataset


def write_waterbirds_from_real_metadata(root: Path) -> Path:
    """The real metadata.csv with one tiny JPEG hard-linked (copied where links fail) for each row."""
    dataset = root / "waterbird_complete95_forest2water2"
    dataset.mkdir(parents=True)
    text = gzip.decompress(REAL_WATERBIRDS_METADATA.read_bytes())
    (dataset / "metadata.csv").write_bytes(text)
    placeholder = root / "placeholder.jpg"
    save_image(placeholder, 0, (8, 8))
    for line in text.decode().splitlines()[1:]:
        target = dataset / line.split(",")[1]
        target.parent.mkdir(exist_ok=True)
        try:
            os.link(placeholder, target)
        except OSError:
            shutil.copyfile(placeholder, target)
    return dataset


def write_celeba(root: Path, variant: str = "txt", counts: dict[str, list[int]] | None = None,
                 images: str = "img_align_celeba") -> Path:
    """A miniature CelebA: ``variant`` "txt" (mmlab files, 1-2 space separated) or "csv" (Kaggle files).

    Group (Blond_Hair, Male) counts per split; every other attribute is drawn at random, Smiling and
    Young follow the image number so that other attribute pairs have known groups.
    """
    counts = counts or {"train": [5, 4, 3, 2], "val": [2, 2, 2, 1], "test": [2, 2, 1, 1]}
    rng = np.random.default_rng(0)
    rows: list[tuple[str, list[int], int]] = []
    number = 0
    for code, split in enumerate(("train", "val", "test")):
        for group, n in enumerate(counts[split]):
            blond, male = divmod(group, 2)
            for _ in range(n):
                number += 1
                values = list(rng.choice([-1, 1], size=len(CELEBA_ATTRIBUTES)))
                values[CELEBA_ATTRIBUTES.index("Blond_Hair")] = 1 if blond else -1
                values[CELEBA_ATTRIBUTES.index("Male")] = 1 if male else -1
                values[CELEBA_ATTRIBUTES.index("Smiling")] = 1 if number % 2 else -1
                values[CELEBA_ATTRIBUTES.index("Young")] = 1 if number % 3 else -1
                rows.append((f"{number:06d}.jpg", values, code))
    dataset = root / "celeba"
    for name, _, _ in rows:
        save_image(dataset / images / name, int(name[:6]), size=(20, 16))
    if variant == "txt":
        attr_lines = [str(len(rows)), " ".join(CELEBA_ATTRIBUTES) + " "]
        attr_lines += [name + "".join(f" {v:>2}" for v in values) for name, values, _ in rows]
        (dataset / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
        (dataset / "list_eval_partition.txt").write_text("".join(f"{name} {code}\n" for name, _, code in rows))
    else:
        attr_lines = ["image_id," + ",".join(CELEBA_ATTRIBUTES)]
        attr_lines += [name + "," + ",".join(str(v) for v in values) for name, values, _ in rows]
        (dataset / "list_attr_celeba.csv").write_text("\n".join(attr_lines) + "\n")
        (dataset / "list_eval_partition.csv").write_text(
            "image_id,partition\n" + "".join(f"{name},{code}\n" for name, _, code in rows))
    return dataset


def write_spawrious(root: Path, per_folder: int = 6, environments: tuple[str, ...] = ("0", "1")) -> Path:
    """``spawrious224/{env}/{location}/{breed}/NNN.png`` for every location and breed."""
    from datasets.spawrious import CLASSES, LOCATIONS

    dataset = root / "spawrious224"
    seed = 0
    for env in environments:
        for location in LOCATIONS:
            for breed in CLASSES:
                for k in range(per_folder):
                    seed += 1
                    save_image(dataset / env / location / breed / f"{breed}_{k:03d}.png", seed, (12, 12))
                (dataset / env / location / breed / "notes.txt").write_text("not an image")
    return dataset


def write_urbancars(root: Path, counts: dict[str, list[int]] | None = None, link: bool = False) -> Path:
    """Whac-A-Mole's generated layout: 8 group folders per split, ``NNN.jpg`` plus the two mask PNGs."""
    from datasets.urbancars import SPLIT_FOLDERS, group_folder

    counts = counts or {"train": [6, 2, 2, 1, 1, 2, 2, 6], "val": [2] * 8, "test": [2] * 8}
    dataset = root / "urbancars"
    placeholder = root / "placeholder.jpg"
    save_image(placeholder, 0, (8, 8))
    seed = 0
    for split, folder in SPLIT_FOLDERS.items():
        for group, n in enumerate(counts[split]):
            obj, bg, co = group // 4, (group // 2) % 2, group % 2
            directory = dataset / folder / group_folder(obj, bg, co)
            directory.mkdir(parents=True)
            for i in range(n):
                seed += 1
                if link:
                    os.link(placeholder, directory / f"{i:03d}.jpg")
                else:
                    save_image(directory / f"{i:03d}.jpg", seed, (12, 12))
                    save_image(directory / f"{i:03d}_mask.png", seed, (12, 12))
                    save_image(directory / f"{i:03d}_co_occur_obj_mask.png", seed, (12, 12))
    return dataset


def error_of(function, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(BenchError) as info:
        function(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def cli(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def load(name: str, root: Path, **options):  # type: ignore[no-untyped-def]
    return get_dataset(name).load(root, {"image_size": 16, **options})


# --------------------------------------------------------------------------------------------
# Waterbirds


def test_waterbirds_real_metadata_gives_published_counts_and_check_passes(tmp_path, capsys):
    assert hashlib.md5(gzip.decompress(REAL_WATERBIRDS_METADATA.read_bytes())).hexdigest() == REAL_WATERBIRDS_MD5
    dataset_folder = write_waterbirds_from_real_metadata(tmp_path)
    dataset = load("waterbirds", tmp_path)
    assert {split: dataset.group_counts(split) for split in ("train", "val", "test")} == WATERBIRDS_PUBLISHED
    assert dataset.group_names == ["landbird/land", "landbird/water", "waterbird/land", "waterbird/water"]
    assert dataset.average_kind == "train_weighted"
    # Row 1 of the real file: Black_Footed_Albatross_0046_18, waterbird on water, test split.
    test = dataset.splits["test"]
    assert test.images.paths[0] == dataset_folder / "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert (int(test.y[0]), int(test.attrs[0, 0]), int(test.group[0])) == (1, 1, 3)

    status, out, err = cli(capsys, "data", "check", "waterbirds", "--data-root", str(tmp_path), "--quiet")
    assert status == 0, err
    assert "11788 image files" in out and "All 11788 image files decode." in out
    assert "Group counts match the published counts." in out
    for name, g in (("landbird/land", 0), ("waterbird/water", 3)):
        line = next(line for line in out.splitlines() if f" {name} " in line)
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2:5] == [str(WATERBIRDS_PUBLISHED[split][g]) for split in ("train", "val", "test")]
    assert "differ from the published" not in out  # no table of differences when there is none


@pytest.mark.parametrize("folder", ["waterbird_complete95_forest2water2", "waterbirds_v1.0",
                                    "cub/data/waterbird_complete95_forest2water2"])
def test_waterbirds_layouts_are_found_from_parent_or_folder(tmp_path, folder):
    dataset_folder = write_waterbirds(tmp_path, folder=folder)
    assert get_dataset("waterbirds").locate(tmp_path) == dataset_folder
    assert get_dataset("waterbirds").locate(dataset_folder) == dataset_folder
    for root in (tmp_path, dataset_folder):
        dataset = load("waterbirds", root)
        assert dataset.group_counts("train") == [4, 2, 2, 4]
        assert dataset.group_counts("val") == [2, 2, 2, 2]
    x = dataset.splits["train"].images.load(0, train=False)
    assert tuple(x.shape) == (3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert dataset.image_shape == (3, 16, 16)


def test_waterbirds_labels_follow_metadata_rows(tmp_path):
    dataset_folder = write_waterbirds(tmp_path)
    lines = (dataset_folder / "metadata.csv").read_text().splitlines()[1:]
    dataset = load("waterbirds", tmp_path)
    val_rows = [line.split(",") for line in lines if line.split(",")[3] == "1"]
    split = dataset.splits["val"]
    for i, row in enumerate(val_rows):
        assert split.images.paths[i] == dataset_folder / row[1]
        assert (int(split.y[i]), int(split.attrs[i, 0]), int(split.group[i])) == (
            int(row[2]), int(row[4]), 2 * int(row[2]) + int(row[4]))


def test_data_root_from_environment_and_missing_dataset(tmp_path, monkeypatch):
    write_waterbirds(tmp_path / "data")
    monkeypatch.setenv("BENCH_DATA_ROOT", str(tmp_path / "data"))
    assert resolve_data_root(None) == tmp_path / "data"
    assert load_dataset("waterbirds", None, {"image_size": 16}).group_counts("train") == [4, 2, 2, 4]
    (tmp_path / "empty").mkdir()
    message = error_of(load, "waterbirds", tmp_path / "empty")
    assert f"{tmp_path / 'empty' / 'waterbird_complete95_forest2water2' / 'metadata.csv'}" in message
    assert "nlp.stanford.edu" in message
    assert "no such folder" in error_of(load, "waterbirds", tmp_path / "absent")
    for name in ("celeba", "urbancars", "spawrious-o2o-easy"):
        message = error_of(load, name, tmp_path / "empty")
        assert str(tmp_path / "empty") in message and "get it from" in message


def _set_cell(csv: Path, row: int, column: str, value: str) -> None:
    """Set one cell of metadata.csv; ``row`` counts data rows from 0."""
    lines = [line.split(",") for line in csv.read_text().splitlines()]
    lines[row + 1][lines[0].index(column)] = value
    csv.write_text("\n".join(",".join(cells) for cells in lines) + "\n")


def test_waterbirds_malformed_metadata(tmp_path, capsys):
    dataset_folder = write_waterbirds(tmp_path)
    csv = dataset_folder / "metadata.csv"
    original = csv.read_text()

    csv.write_text("\n".join(",".join(line.split(",")[:4] + line.split(",")[5:]) for line in original.splitlines()))
    assert f"{csv}: missing column 'place'" in error_of(load, "waterbirds", tmp_path)
    status, _, err = cli(capsys, "data", "check", "waterbirds", "--data-root", str(tmp_path))
    assert status == 2 and "missing column 'place'" in err and "\n" not in err.strip()

    csv.write_text(original)
    _set_cell(csv, 2, "split", "3")
    assert f"{csv}, row 4: split='3' is not one of 0, 1, 2" in error_of(load, "waterbirds", tmp_path)
    status, _, err = cli(capsys, "data", "info", "waterbirds", "--data-root", str(tmp_path))
    assert status == 2 and "row 4: split='3'" in err

    csv.write_text(original)
    _set_cell(csv, 4, "y", "waterbird")
    assert f"{csv}, row 6: y='waterbird' is not one of 0, 1" in error_of(load, "waterbirds", tmp_path)

    csv.write_text(original)
    missing = dataset_folder / original.splitlines()[7].split(",")[1]
    missing.unlink()
    assert error_of(load, "waterbirds", tmp_path) == f"{csv}, row 8: image file {missing} not found"
    status, _, err = cli(capsys, "run", "--method", "erm", "--dataset", "waterbirds", "--data-root", str(tmp_path),
                         "--backbone", "small-cnn", "--hparams", "pretrained=false", "--out", str(tmp_path / "out"))
    assert status == 2 and f"row 8: image file {missing} not found" in err
    assert not (tmp_path / "out").exists()


def test_truncated_image_is_reported_by_path(tmp_path, capsys):
    dataset_folder = write_waterbirds(tmp_path, size=(64, 64))
    victim = dataset_folder / (dataset_folder / "metadata.csv").read_text().splitlines()[3].split(",")[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * 0.6)])
    status, out, err = cli(capsys, "data", "check", "waterbirds", "--data-root", str(tmp_path), "--quiet")
    assert status == 2
    assert f"1 of 28 image files cannot be read: {display_path(victim)}" in err and "truncated" in err
    assert f"unreadable: {display_path(victim)}" in out
    dataset = load("waterbirds", tmp_path)
    assert f"{victim}: cannot read image" in error_of(dataset.splits["train"].images.load, 2, False)


def test_waterbirds_transforms_follow_group_dro(tmp_path):
    write_waterbirds(tmp_path, size=(40, 60))
    dataset = load("waterbirds", tmp_path, image_size=32)
    source = dataset.splits["train"].images
    assert isinstance(source, FileImages)
    # eval: Resize((int(32*256/224),) * 2) = 36x36, then CenterCrop(32); no augmentation by default.
    image = Image.open(source.paths[0]).convert("RGB")
    expected = np.asarray(image.resize((36, 36), Image.BILINEAR))[2:34, 2:34].transpose(2, 0, 1) / 255.0
    assert torch.allclose(source.load(0, train=False), torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert torch.equal(source.load(0, train=True), source.load(0, train=False))
    augmented = load("waterbirds", tmp_path, image_size=32, augment="true").splits["train"].images
    torch.manual_seed(0)
    draws = [augmented.load(0, train=True) for _ in range(4)]
    assert all(tuple(d.shape) == (3, 32, 32) for d in draws)
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(augmented.load(0, train=False), source.load(0, train=False))
    assert "not an option of waterbirds" in error_of(load, "waterbirds", tmp_path, augmnet="true")
    assert "expected true or false" in error_of(load, "waterbirds", tmp_path, augment="maybe")


def test_training_defaults_and_origin_are_stated():
    for name in ("waterbirds", "celeba", "urbancars", "spawrious-o2o-easy", "spawrious-m2m-hard"):
        source = get_dataset(name)
        assert source.training_defaults["backbone"] == "resnet50" and source.training_defaults["pretrained"]
        assert source.training_defaults["optimizer"] == "sgd" and source.defaults_origin
        assert source.accepts_image_size and source.needs_data_root and source.obtain_hint
    assert get_dataset("waterbirds").training_defaults["lr"] == 1e-3
    assert get_dataset("celeba").training_defaults["lr"] == 1e-4
    assert get_dataset("celeba").training_defaults["epochs"] == 50


# --------------------------------------------------------------------------------------------
# CelebA


def test_celeba_txt_and_csv_variants_agree(tmp_path):
    txt = load("celeba", write_celeba(tmp_path / "a", "txt").parent)
    csv = load("celeba", write_celeba(tmp_path / "b", "csv"))
    expected = {"train": [5, 4, 3, 2], "val": [2, 2, 2, 1], "test": [2, 2, 1, 1]}
    for dataset in (txt, csv):
        assert {s: dataset.group_counts(s) for s in expected} == expected
        assert dataset.group_names == ["not Blond_Hair/not Male", "not Blond_Hair/Male",
                                       "Blond_Hair/not Male", "Blond_Hair/Male"]
        assert dataset.average_kind == "plain" and dataset.image_shape == (3, 16, 16)
    for split in expected:
        assert torch.equal(txt.splits[split].group, csv.splits[split].group)
        assert [p.name for p in txt.splits[split].images.paths] == [p.name for p in csv.splits[split].images.paths]
    assert txt.splits["train"].images.paths[0].name == "000001.jpg"


def test_celeba_other_layouts(tmp_path):
    nested = write_celeba(tmp_path / "kaggle", "csv", images="img_align_celeba/img_align_celeba")
    assert load("celeba", tmp_path / "kaggle").splits["test"].images.paths[0].parent == (
        nested / "img_align_celeba" / "img_align_celeba")
    drive = write_celeba(tmp_path / "drive", "txt", images="Img/img_align_celeba")
    (drive / "Anno").mkdir()
    (drive / "Eval").mkdir()
    (drive / "list_attr_celeba.txt").rename(drive / "Anno" / "list_attr_celeba.txt")
    (drive / "list_eval_partition.txt").rename(drive / "Eval" / "list_eval_partition.txt")
    assert load("celeba", drive).group_counts("train") == [5, 4, 3, 2]
    group_dro = tmp_path / "gdro"
    shutil.copytree(write_celeba(tmp_path / "plain", "csv"), group_dro / "celebA" / "data")
    assert get_dataset("celeba").locate(group_dro) == group_dro / "celebA" / "data"


def test_celeba_attribute_options(tmp_path):
    root = write_celeba(tmp_path, "txt")
    dataset = load("celeba", root, target="Smiling", attrs="Male,Young")
    assert dataset.class_names == ["not Smiling", "Smiling"] and dataset.attr_names == ["Male", "Young"]
    assert dataset.n_groups == 8
    split = dataset.splits["train"]
    for i, path in enumerate(split.images.paths):
        number = int(path.name[:6])
        assert int(split.y[i]) == number % 2 and int(split.attrs[i, 1]) == int(number % 3 != 0)
        assert int(split.group[i]) == 4 * int(split.y[i]) + 2 * int(split.attrs[i, 0]) + int(split.attrs[i, 1])
    assert get_dataset("celeba").published_counts({"attrs": "Male,Young"}) is None
    assert get_dataset("celeba").published_counts({}) is not None
    assert "'Hat' is not a CelebA attribute" in error_of(load, "celeba", root, attrs="Hat")
    assert "cannot also be a spurious attribute" in error_of(load, "celeba", root, target="Male")
    with pytest.raises(ConfigError):
        load("celeba", root, target="Nope")


def test_celeba_attrs_flag_and_data_option_reach_the_loader(tmp_path, capsys):
    write_celeba(tmp_path, "txt")
    status, out, err = cli(capsys, "data", "info", "celeba", "--data-root", str(tmp_path), "--attrs", "Young",
                           "--data-option", "target=Smiling")
    assert status == 0, err
    assert "Smiling/Young" in out and "not Smiling/not Young" in out


def test_celeba_malformed_files(tmp_path):
    root = write_celeba(tmp_path, "txt")
    attr, partition = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    attr_text, partition_text = attr.read_text(), partition.read_text()

    lines = attr_text.splitlines()
    lines[4] = lines[4][:-2] + " 0"  # the last attribute of image 3 (Young) becomes 0
    attr.write_text("\n".join(lines) + "\n")
    assert load("celeba", root).group_counts("train") == [5, 4, 3, 2]  # Young is not used by default
    assert f"{attr}, line 5: Young='0' is not -1 or 1" in error_of(load, "celeba", root, attrs="Young")

    attr.write_text(attr_text.replace("\n000003.jpg", "\n000003.jpg -1", 1))
    assert f"{attr}: not a readable index file" in error_of(load, "celeba", root)

    attr.write_text("x\n" + attr_text.split("\n", 1)[1])
    assert f"{attr}, line 1: expected the number of images" in error_of(load, "celeba", root)

    attr.write_text(attr_text)
    partition.write_text(partition_text.replace("000004.jpg 0", "000004.jpg 5"))
    assert f"{partition}, line 4: partition '5' is not 0, 1 or 2" in error_of(load, "celeba", root)

    partition.write_text(partition_text.replace("000004.jpg 0", "999999.jpg 0"))
    assert f"{partition}, line 4: image 999999.jpg has no row in {attr}" in error_of(load, "celeba", root)

    partition.write_text(partition_text)
    (root / "img_align_celeba" / "000006.jpg").unlink()
    message = error_of(load, "celeba", root)
    assert message == f"{partition}, line 6: image file {root / 'img_align_celeba' / '000006.jpg'} not found"
    (root / "list_eval_partition.txt").unlink()
    assert "list_eval_partition.txt: not found" in error_of(load, "celeba", root)


def test_celeba_check_reports_differences_from_published_counts(tmp_path, capsys):
    write_celeba(tmp_path, "csv")
    status, out, err = cli(capsys, "data", "check", "celeba", "--data-root", str(tmp_path), "--quiet")
    assert status == 2
    assert "differ from the published ones in 12 (group, split) cells" in err
    line = next(line for line in out.splitlines() if line.startswith("| train ") and "| Blond_Hair/Male " in line)
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells == ["train", "3", "Blond_Hair/Male", "2", "1387", "-1385"]  # found, published, diff
    assert max(len(line) for line in out.splitlines() if line.startswith("|")) <= 100
    status, out, err = cli(capsys, "data", "check", "celeba", "--data-root", str(tmp_path), "--quiet",
                           "--attrs", "Young")
    assert status == 0 and "No published group counts" in out


# --------------------------------------------------------------------------------------------
# Spawrious


def test_spawrious_reference_counts():
    from datasets.spawrious import CLASSES, LOCATIONS, construction, expected_counts

    def group(breed: str, location: str) -> int:
        return CLASSES.index(breed) * len(LOCATIONS) + LOCATIONS.index(location)

    easy = expected_counts("o2o_easy")
    assert sum(easy["train+val"]) == 25344 and sum(easy["test"]) == 4 * 2 * 3168
    assert easy["train+val"][group("bulldog", "desert")] == 3072 + 2756
    assert easy["train+val"][group("corgi", "snow")] == 3072 + 2756
    assert all(easy["train+val"][group(breed, "beach")] == 96 + 412 for breed in CLASSES)
    assert easy["test"][group("labrador", "desert")] == 2 * 3168
    hard = expected_counts("m2m_hard")
    assert hard["train+val"][group("dachshund", "dirt")] == 3168 and hard["train+val"][group("dachshund", "jungle")]
    # m2m_hard test (snow, beach, dirt, jungle): corgi at t3 = jungle and t2 = dirt.
    assert hard["test"][group("corgi", "jungle")] == 3168 and hard["test"][group("corgi", "dirt")] == 3168
    assert sum(hard["test"]) == 8 * 3168
    train, test = construction("m2m_medium")
    assert {take.env for take in train + test} == {"0"}
    train, test = construction("o2o_medium")
    assert [(t.env, t.location, t.breed, t.limit) for t in train[:5]] == [
        ("0", "mountain", "bulldog", 3072), ("0", "beach", "dachshund", 3072), ("0", "dirt", "labrador", 3072),
        ("0", "jungle", "corgi", 3072), ("0", "desert", "bulldog", 96)]


def test_spawrious_construction_on_a_folder_tree(tmp_path):
    from datasets.spawrious import CLASSES, LOCATIONS, SpawriousChallenge, load_challenge

    folder = write_spawrious(tmp_path, per_folder=10)
    pipeline = SpawriousChallenge.pipeline({"image_size": 16, "augment": "false"})
    # total=10: the construction's proportions at a tenth of a folder: int(9.7) = 9 and int(8.7) = 8
    # spurious images per breed, 1 and 2 filler images.
    dataset = load_challenge("spawrious-o2o-easy", "o2o_easy", folder, pipeline, 0.25, 0, total=10)
    n_train = 4 * (9 + 1) + 4 * (8 + 2)
    assert len(dataset.splits["train"]) + len(dataset.splits["val"]) == n_train
    assert len(dataset.splits["val"]) == int(n_train * 0.25)
    combined = [a + b for a, b in zip(dataset.group_counts("train"), dataset.group_counts("val"))]

    def group(breed: str, location: str) -> int:
        return CLASSES.index(breed) * len(LOCATIONS) + LOCATIONS.index(location)

    assert combined[group("bulldog", "desert")] == 9 + 8 and combined[group("corgi", "beach")] == 1 + 2
    assert dataset.group_counts("test")[group("dachshund", "snow")] == 20  # 10 from 0/ and 10 from 1/
    train_paths = {p.relative_to(folder).as_posix() for s in ("train", "val") for p in dataset.splits[s].images.paths}
    # The first 9 names in sorted order of 0/desert/bulldog, the first 1 of 0/beach/corgi.
    assert {f"0/desert/bulldog/bulldog_{k:03d}.png" for k in range(9)} <= train_paths
    assert "0/desert/bulldog/bulldog_009.png" not in train_paths
    assert "0/beach/corgi/corgi_000.png" in train_paths and "0/beach/corgi/corgi_001.png" not in train_paths
    assert {"1/beach/corgi/corgi_000.png", "1/beach/corgi/corgi_001.png"} <= train_paths
    again = load_challenge("spawrious-o2o-easy", "o2o_easy", folder, pipeline, 0.25, 0, total=10)
    assert again.splits["val"].images.paths == dataset.splits["val"].images.paths
    other_seed = load_challenge("spawrious-o2o-easy", "o2o_easy", folder, pipeline, 0.25, 1, total=10)
    assert other_seed.splits["val"].images.paths != dataset.splits["val"].images.paths


def test_spawrious_registered_challenges(tmp_path, capsys):
    write_spawrious(tmp_path, per_folder=5)
    names = [f"spawrious-{kind}-{level}" for kind in ("o2o", "m2m") for level in ("easy", "medium", "hard")]
    for name in names:
        dataset = load(name, tmp_path)
        assert dataset.n_classes == 4 and dataset.attr_names == ["location"] and dataset.n_groups == 24
        assert dataset.average_kind == "plain"
        n_train = len(dataset.splits["train"]) + len(dataset.splits["val"])
        assert len(dataset.splits["val"]) == int(n_train * 0.2)
        assert len(dataset.splits["test"]) == 8 * 5
        train_groups = set(torch.cat([dataset.splits["train"].group, dataset.splits["val"].group]).tolist())
        assert not train_groups & set(dataset.splits["test"].group.tolist())  # test locations are new per breed
    assert get_dataset("spawrious-o2o-easy").locate(tmp_path / "spawrious224") == tmp_path / "spawrious224"
    x = load("spawrious-o2o-easy", tmp_path).splits["train"].images.load(0, train=True)
    assert tuple(x.shape) == (3, 16, 16)
    assert "val_fraction=1.5" in error_of(load, "spawrious-o2o-easy", tmp_path, val_fraction="1.5")
    shutil.rmtree(tmp_path / "spawrious224" / "1" / "beach" / "corgi")
    assert f"{tmp_path / 'spawrious224' / '1' / 'beach' / 'corgi'}: no such folder" in error_of(
        load, "spawrious-o2o-easy", tmp_path)
    assert load("spawrious-m2m-easy", tmp_path).n_groups == 24  # M2M reads 0/ only
    status, out, err = cli(capsys, "data", "check", "spawrious-m2m-easy", "--data-root", str(tmp_path), "--quiet")
    assert status == 2 and "differ from the published ones in 16 (group, split) cells" in err
    assert any(line.startswith("| train+val ") for line in out.splitlines())  # the joined split's differences
    assert max(len(line) for line in out.splitlines() if line.startswith("|")) <= 100


# --------------------------------------------------------------------------------------------
# UrbanCars


def test_urbancars_layout_labels_and_masks_ignored(tmp_path):
    folder = write_urbancars(tmp_path)
    for root in (tmp_path, folder):
        dataset = load("urbancars", root)
        assert dataset.group_counts("train") == [6, 2, 2, 1, 1, 2, 2, 6]
        assert dataset.group_counts("test") == [2] * 8
    assert dataset.attr_names == ["bg", "co_occur_obj"] and dataset.average_kind == "urbancars_id"
    assert dataset.group_names[5] == "country car/urban/country"
    split = dataset.splits["train"]
    for i, path in enumerate(split.images.paths):
        assert path.suffix == ".jpg" and "mask" not in path.name
        obj, bg, co = (int(split.y[i]), int(split.attrs[i, 0]), int(split.attrs[i, 1]))
        names = ("urban", "country")
        assert path.parent.name == f"obj-{names[obj]}_bg-{names[bg]}_co_occur_obj-{names[co]}"
    # 256-pixel images at the ResNets' 224 input: no resize; small-cnn's 32 -> int(32*256/224) = 36.
    assert get_dataset("urbancars").pipeline({"image_size": 224}).frame == (256, 256)
    assert dataset.image_shape == (3, 18, 18)
    shutil.rmtree(folder / "bg-0.5_co_occur_obj-0.5" / "val" / "obj-urban_bg-country_co_occur_obj-urban")
    assert "obj-urban_bg-country_co_occur_obj-urban: no such folder" in error_of(load, "urbancars", tmp_path)


def test_urbancars_published_counts_check(tmp_path, capsys):
    write_urbancars(tmp_path, URBANCARS_PUBLISHED, link=True)
    status, out, err = cli(capsys, "data", "check", "urbancars", "--data-root", str(tmp_path), "--quiet")
    assert status == 0, err
    assert "10000 image files" in out and "Group counts match the published counts." in out


# --------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_bench_run_erm_on_waterbirds_fixture(tmp_path, capsys, monkeypatch):
    write_waterbirds(tmp_path / "data", {"train": [3, 2, 2, 3], "val": [1, 1, 1, 1], "test": [1, 1, 1, 1]},
                     size=(32, 32))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = ["run", "--method", "erm", "--dataset", "waterbirds", "--data-root", str(tmp_path / "data"),
            "--backbone", "resnet18", "--epochs", "1", "--out", str(tmp_path / "out"), "--quiet", "--json"]

    def offline(*args, **kwargs):  # type: ignore[no-untyped-def]
        import urllib.error

        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # never download in a test
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    status, _, err = cli(capsys, *base)
    assert status == 2 and "cannot get the pretrained weights of resnet18" in err and "pretrained=false" in err
    assert not (tmp_path / "out").exists()

    status, out, err = cli(capsys, *base, "--hparams", "pretrained=false")
    assert status == 0, err
    import json

    final = json.loads(out)[0]
    assert final["status"] == "done" and final["average_kind"] == "train_weighted"
    chosen = final["selection"]["val-worst-group"]["model"]["test"]
    assert 0.0 <= chosen["worst_group_accuracy"] <= 1.0
