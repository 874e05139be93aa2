"""The ``custom`` dataset: loading, groups, and every validation error (one line, file and row, exit 2)."""

import pytest
from helpers import write_custom_dataset

from bench.cli import main
from bench.core.errors import DataError
from datasets import get_dataset


@pytest.fixture()
def data(tmp_path):
    return write_custom_dataset(tmp_path / "data", n_per_group=3)


def load(root, **options):
    return get_dataset("custom").load(root, {"image_size": 16, **options})


def _edit_csv(root, transform):
    path = root / "metadata.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(transform(lines)) + "\n")


def test_loads_groups_and_names(data):
    dataset = load(data)
    assert dataset.attr_names == ["colour"]
    assert dataset.attr_value_names == [["blue", "red"]]
    assert dataset.group_names == ["0/blue", "0/red", "1/blue", "1/red"]
    assert dataset.group_counts("train") == [3, 3, 3, 3]
    x = dataset.splits["val"].images.load(0, train=False)
    assert tuple(x.shape) == (3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_attrs_option_chooses_columns(data):
    _edit_csv(data, lambda lines: [lines[0] + ",site"] + [line + ",a" for line in lines[1:]])
    assert load(data).attr_names == ["colour", "site"]
    assert load(data, attrs="colour").attr_names == ["colour"]
    with pytest.raises(DataError, match="--attrs 'nope'"):
        load(data, attrs="nope")


def _error(root, **options) -> str:
    with pytest.raises(DataError) as info:
        load(root, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_and_folder(tmp_path):
    assert "no such folder" in _error(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    assert "metadata.csv: not found" in _error(tmp_path / "empty")


def test_missing_column(data):
    _edit_csv(data, lambda lines: [line.rsplit(",", 3)[0] + "," + ",".join(line.split(",")[2:]) for line in lines])
    assert "missing column 'y'" in _error(data)


def test_unknown_split_names_the_row(data):
    _edit_csv(data, lambda lines: lines[:3] + [lines[3].replace(",train,", ",training,")] + lines[4:])
    message = _error(data)
    assert "row 4" in message and "split='training'" in message


def test_non_integer_and_negative_labels(data):
    _edit_csv(data, lambda lines: lines[:2] + [lines[2].replace(",0,train,", ",zero,train,")] + lines[3:])
    assert "row 3" in _error(data) and "not an integer" in _error(data)


def test_label_out_of_range(data):
    _edit_csv(data, lambda lines: lines[:2] + [lines[2].replace(",0,train,", ",-1,train,")] + lines[3:])
    assert "out of range" in _error(data)


def test_label_above_declared_classes(data):
    assert "out of range for n_classes=1" in _error(data, n_classes=1)


def test_missing_image_names_file_and_row(data):
    first_image = data / (data / "metadata.csv").read_text().splitlines()[1].split(",")[0]
    first_image.unlink()
    message = _error(data)
    assert "row 2" in message and str(first_image) in message


def test_group_empty_in_a_split(data):
    _edit_csv(data, lambda lines: [line for line in lines if not (",test," in line and line.endswith(",red")
                                                                   and ",1,test" in line)])
    message = _error(data)
    assert "group 1/red" in message and "none in test" in message


def test_cli_malformed_metadata_exits_2_without_writing(data, tmp_path, capsys):
    _edit_csv(data, lambda lines: lines[:2] + [lines[2].replace(",train,", ",bogus,")] + lines[3:])
    out = tmp_path / "results"
    status = main(["run", "--method", "erm", "--dataset", "custom", "--data-root", str(data),
                   "--backbone", "small-cnn", "--hparams", "pretrained=false", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "row 3" in err
    assert not out.exists()
